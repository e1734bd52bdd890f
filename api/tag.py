"""`blipq tag`: every question about every image, sent as batches, one JSON line per answer, resumable.

Images are http(s) URLs (the workers fetch them) or local files, found also in directories (recursively, by
extension) and uploaded with the batch. A request holds at most `--per-request` answers (10,000, the service's limit),
and for uploads at most MAX_FILES_PER_UPLOAD files and about MAX_UPLOAD_BYTES.

OUT holds one line per (image, question): `{"image", "question", "status", "answer", "error"}`. A re-run with the same
OUT keeps its succeeded lines and does not ask those pairs again; every other pair (failed, canceled, expired, or
never answered) is asked again and its old line replaced.

With `--caption` each image is captioned once instead (continuing `--prompt`, if any), and OUT holds
`{"image", "prompt", "status", "caption", "error"}`, resumed the same way.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from api.client import BlipqClient, BlipqClientError

MAX_ANSWERS_PER_REQUEST = 10_000  # the service's limit on one batch (worker/batches.py MAX_BATCH_ANSWERS)
MAX_FILES_PER_UPLOAD = 64  # images in one multipart request: a failed request re-sends little
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # about this many image bytes per multipart request (one larger file goes alone)
URL_PREFIXES = ("http://", "https://")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

Pair = tuple[str, str]  # (image, question), or (image, prompt) for captions


class TagInputError(Exception):
    """Raised when an input is neither an http(s) URL nor an existing file or directory."""


def run_tag(
    url: str,
    inputs: list[str],
    urls_file: Path | None,
    questions: list[str],
    out: Path,
    per_request: int,
    caption: bool = False,
    prompt: str = "",
) -> int:
    """Answer every question about every image (or, `caption`, caption every image once) into OUT.

    Returns 0 when every pair succeeded, else 1 (2: bad input).
    """
    text_key = "prompt" if caption else "question"
    try:
        images = collect_images(inputs, urls_file)
        kept = read_succeeded(out, text_key)
        write_lines(out, kept.values(), mode="w")  # drops the lines of pairs that will be asked again
    except (TagInputError, OSError) as exc:
        print(f"blipq tag: {exc}", file=sys.stderr)
        return 2
    texts = [prompt] if caption else list(dict.fromkeys(questions))
    pending = [(image, text) for image in images for text in texts if (image, text) not in kept]
    client = BlipqClient(url, api_key=os.environ.get("BLIPQ_API_KEY") or None)
    per_request = max(1, min(per_request, MAX_ANSWERS_PER_REQUEST))
    with tqdm(total=len(pending), unit="answer", file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            for batch_images, batch_texts in plan_requests(pending, per_request):
                for record in ask_batch(client, batch_images, batch_texts, bar, caption):
                    kept[(record["image"], record[text_key])] = record
                    write_lines(out, [record], mode="a")
        except (BlipqClientError, OSError, TimeoutError) as exc:
            bar.close()
            print(f"blipq tag: {exc} (re-run the same command to go on)", file=sys.stderr)
            return 1
    return report([kept.get((image, text)) for image in images for text in texts])


def collect_images(inputs: Iterable[str], urls_file: Path | None) -> list[str]:
    """The images to tag, each once: URLs and files as named, directories' image files, `urls_file`'s lines."""
    images: list[str] = []
    for name in inputs:
        if name.startswith(URL_PREFIXES) or Path(name).is_file():
            images.append(name)
        elif Path(name).is_dir():
            found = (path for path in Path(name).rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
            images.extend(str(path) for path in sorted(found) if path.is_file())
        else:
            raise TagInputError(f"{name!r} is not an http(s) URL, a file or a directory")
    if urls_file is not None:
        for line in urls_file.read_text().splitlines():
            url = line.split("#", 1)[0].strip()
            if url:
                images.append(url)
    if not images:
        raise TagInputError("no image: name URLs, files or directories, or a file of URLs with --urls")
    return list(dict.fromkeys(images))


def read_succeeded(out: Path, text_key: str = "question") -> dict[Pair, dict[str, Any]]:
    """The succeeded lines of an earlier run's OUT, by (image, question or prompt); nothing when OUT does not exist.

    `text_key` names the line's text: "question", or "prompt" for captions (lines of the other kind are dropped).
    """
    if not out.exists():
        return {}
    kept: dict[Pair, dict[str, Any]] = {}
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by an interrupted run: its pair is asked again
        if isinstance(record, dict) and record.get("status") == "succeeded" and text_key in record:
            kept[(record["image"], record[text_key])] = record
    return kept


def plan_requests(pending: list[Pair], per_request: int) -> Iterator[tuple[list[str], list[str]]]:
    """Group pending pairs into tagging-shape requests (images x questions) of at most `per_request` answers.

    Images that still need the same questions go together; URLs and local files never share a request.
    """
    by_image: dict[str, list[str]] = {}
    for image, question in pending:
        by_image.setdefault(image, []).append(question)
    groups: dict[tuple[bool, tuple[str, ...]], list[str]] = {}
    for image, image_questions in by_image.items():
        groups.setdefault((image.startswith(URL_PREFIXES), tuple(image_questions)), []).append(image)
    for (is_url, group_questions), group_images in groups.items():
        for first in range(0, len(group_questions), per_request):
            questions = list(group_questions[first : first + per_request])
            most = max(1, per_request // len(questions))
            for images in _split(group_images, most if is_url else min(most, MAX_FILES_PER_UPLOAD), is_url):
                yield images, questions


def _split(images: list[str], most: int, is_url: bool) -> Iterator[list[str]]:
    """`images` in runs of at most `most`, and for local files of about MAX_UPLOAD_BYTES at most."""
    run: list[str] = []
    size = 0
    for image in images:
        image_size = 0 if is_url else Path(image).stat().st_size
        if run and (len(run) == most or size + image_size > MAX_UPLOAD_BYTES):
            yield run
            run, size = [], 0
        run.append(image)
        size += image_size
    if run:
        yield run


def ask_batch(
    client: BlipqClient, images: list[str], texts: list[str], bar: tqdm[Any], caption: bool = False
) -> Iterator[dict[str, Any]]:
    """Submit one batch, advance `bar` as its items end, then yield one OUT record per item.

    `texts` are the questions asked about every image, or (`caption`) the one prompt of every caption.
    """
    if caption:
        batch_id, _count = client.submit_batch(images, caption=True, prompt=texts[0] or None)
    else:
        batch_id, _count = client.submit_batch(images, texts)
    shown = 0

    def on_progress(summary: dict[str, Any]) -> None:
        nonlocal shown
        bar.update(summary["ended"] - shown)
        shown = summary["ended"]

    client.wait_batch(batch_id, on_progress=on_progress)
    text_key, answer_key = ("prompt", "caption") if caption else ("question", "answer")
    for item in client.results(batch_id):
        image, text = images[item["index"] // len(texts)], texts[item["index"] % len(texts)]  # image by image
        yield {
            "image": image,
            text_key: text,
            "status": item["status"],
            answer_key: item["answer"],
            "error": item["error"],
        }


def write_lines(out: Path, records: Iterable[dict[str, Any]], mode: str) -> None:
    """Write (or append) records to OUT as JSON lines, flushed: an interrupted run keeps what it wrote."""
    with out.open(mode, encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")


def report(records: list[dict[str, Any] | None]) -> int:
    """0 when every pair succeeded; else 1, with the count of each error code on stderr."""
    codes: Counter[str] = Counter()
    for record in records:
        if record is None:
            codes["not_answered"] += 1
        elif record["status"] != "succeeded":
            codes[(record.get("error") or {}).get("code") or record["status"] or "unknown"] += 1
    if not codes:
        print(f"blipq tag: {len(records)} answers, all succeeded", file=sys.stderr)
        return 0
    summary = ", ".join(f"{code}: {count}" for code, count in codes.most_common())
    print(f"blipq tag: {sum(codes.values())} of {len(records)} answers failed ({summary})", file=sys.stderr)
    return 1
