"""`blipq tag`: every question about every image, sent as batches, one JSON line per answer, resumable.

Images are http(s) URLs (the workers fetch them) or local files, found also in directories (recursively, by
extension) and uploaded with the batch. The images stream: requests of at most `--per-request` answers (and, for
uploads, MAX_FILES_PER_UPLOAD files and about MAX_UPLOAD_BYTES) are made as the inputs are read, and up to
`--in-flight` of them wait on the service at once, so that the next uploads overlap the answers of the earlier ones;
a request's lines are written as soon as it ended (and its batch deleted from the service: Redis holds only what is
in flight), and the progress bar moves with every item that ends. Memory holds the requests in flight and one small
hash per pair already answered, however many images: a file of a million URLs is read a line at a time. A full
queue (503 `queue_full`) is waited out by the client's retries.

OUT holds one line per (image, question): `{"image", "question", "status", "answer", "error"}`. A re-run with the same
OUT keeps its succeeded lines and does not ask those pairs again; every other pair (failed, canceled, expired, or
never answered) is asked again and its old line replaced. Ctrl-C cancels the requests in flight, keeps what was
written and says how to go on.

With `--caption` each image is also captioned once (continuing `--prompt`, if any), with or without questions:
OUT then holds, besides any question lines, one `{"image", "prompt", "status", "caption", "error"}` line per image,
resumed the same way. A batch has one task, so the captions go as batches of their own, before the questions'.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from api.client import BlipqClient, BlipqClientError
from api.settings import ClientSettings

MAX_ANSWERS_PER_REQUEST = 10_000  # the service's limit on one batch (worker/contract/batches.py MAX_BATCH_ANSWERS)
DEFAULT_PER_REQUEST = 1_000  # answers per request: small enough that lines and progress come often
DEFAULT_IN_FLIGHT = 4  # requests waiting on the service at once: the workers never wait for the next upload
MAX_FILES_PER_UPLOAD = 64  # images in one multipart request: a failed request re-sends little
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # about this many image bytes per multipart request (one larger file goes alone)
POLL_S = 0.2  # between two looks at the requests in flight, when none ended
CANCEL_TIMEOUT_S = 5.0  # a cancel on Ctrl-C is tried once, this long at most: the user is leaving
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT
URL_PREFIXES = ("http://", "https://")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})

TEXT_KEYS = ("question", "prompt")  # what a line's text is: a question, or a caption's prompt


class TagInputError(Exception):
    """Raised when an input is neither an http(s) URL nor an existing file or directory."""


@dataclass
class Request:
    """One batch request: its images, the texts asked of each, and once submitted its id and the items seen ended."""

    images: list[str]
    texts: list[str]
    caption: bool = False  # its texts are one caption prompt ("" for none), not questions
    batch_id: str = ""
    shown: int = 0


@dataclass
class Tally:
    """What the run's pairs came to: succeeded, or the count of each error code; lines written this run."""

    succeeded: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    written: int = 0

    def add(self, record: dict[str, Any]) -> None:
        if record["status"] == "succeeded":
            self.succeeded += 1
        else:
            self.failed[(record.get("error") or {}).get("code") or record["status"] or "unknown"] += 1


def run_tag(
    url: str,
    inputs: list[str],
    urls_file: Path | None,
    questions: list[str],
    out: Path,
    per_request: int = DEFAULT_PER_REQUEST,
    caption: bool = False,
    prompt: str = "",
    in_flight: int = DEFAULT_IN_FLIGHT,
) -> int:
    """Answer every question about every image (and, `caption`, caption every image once) into OUT.

    Returns 0 when every pair succeeded, else 1 (2: bad input, 130: interrupted).
    """
    kinds: list[tuple[str, list[str]]] = []  # ("prompt", [the prompt]) for captions, ("question", questions)
    if caption:
        kinds.append(("prompt", [prompt]))
    if questions:
        kinds.append(("question", list(dict.fromkeys(questions))))
    try:
        check_inputs(inputs, urls_file)
        done = keep_succeeded(out)  # drops the lines of pairs that will be asked again
        pending = sum(
            len(_pending_texts(image, key, texts, done))
            for key, texts in kinds
            for image in iter_images(inputs, urls_file)
        )
    except (TagInputError, OSError) as exc:
        print(f"blipq tag: {exc}", file=sys.stderr)
        return 2
    client = BlipqClient(url, api_key=ClientSettings.from_env().api_key)
    per_request = max(1, min(per_request, MAX_ANSWERS_PER_REQUEST))
    requests_ = itertools.chain.from_iterable(
        plan_requests(
            ((image, _pending_texts(image, key, texts, done)) for image in iter_images(inputs, urls_file)),
            per_request,
            caption=key == "prompt",
        )
        for key, texts in kinds
    )
    tally = Tally(succeeded=len(done))
    flight: deque[Request] = deque()
    with tqdm(total=pending, unit="answer", file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            stream_requests(client, requests_, flight, max(1, in_flight), bar, out, tally)
        except KeyboardInterrupt:
            bar.close()
            canceled = cancel_all(client, flight)
            print(
                f"blipq tag: interrupted; {tally.written} answers written to {out}, {canceled} requests in flight "
                "canceled; re-run the same command to go on",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        except (BlipqClientError, requests.RequestException, OSError, TimeoutError) as exc:
            bar.close()
            print(f"blipq tag: {exc} (re-run the same command to go on)", file=sys.stderr)
            return 1
    return report(tally)


def stream_requests(
    client: BlipqClient,
    planned: Iterator[Request],
    flight: deque[Request],
    in_flight: int,
    bar: tqdm[Any],
    out: Path,
    tally: Tally,
) -> None:
    """Keep `in_flight` requests on the service, write each one's lines as soon as it ended, until all are written."""
    while True:
        while len(flight) < in_flight and (request := next(planned, None)) is not None:
            with ctrl_c_after():  # a batch the service accepted is always in `flight`, so Ctrl-C cancels it
                request.batch_id = submit(client, request)
                flight.append(request)
        if not flight:
            return
        ended_any = False
        for request in list(flight):
            summary = client.batch(request.batch_id)
            bar.update(summary["ended"] - request.shown)
            request.shown = summary["ended"]
            if summary["ended"] >= summary["count"]:
                records = list(result_records(client, request))
                write_lines(out, records, mode="a")
                client.delete_batch(request.batch_id)  # its lines are saved: Redis holds only what is in flight
                for record in records:
                    tally.add(record)
                tally.written += len(records)
                flight.remove(request)
                ended_any = True
        if not ended_any:
            time.sleep(POLL_S)


@contextmanager
def ctrl_c_after() -> Iterator[None]:
    """Hold a first Ctrl-C until the block ended, then raise it; a second one raises at once.

    A submission interrupted between the service's 202 and the batch id being kept would leave a batch that no one
    cancels. Outside the main thread (where no signal arrives) the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []

    def hold(signum: int, frame: object) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def submit(client: BlipqClient, request: Request) -> str:
    """Submit one request as a batch (its images x its texts); the batch's id."""
    if request.caption:
        batch_id, _ = client.submit_batch(request.images, caption=True, prompt=request.texts[0] or None)
    else:
        batch_id, _ = client.submit_batch(request.images, request.texts)
    return batch_id


def result_records(client: BlipqClient, request: Request) -> Iterator[dict[str, Any]]:
    """One OUT record per item of an ended request, in item order (image by image)."""
    text_key, answer_key = ("prompt", "caption") if request.caption else ("question", "answer")
    texts = request.texts
    for item in client.results(request.batch_id):
        image, text = request.images[item["index"] // len(texts)], texts[item["index"] % len(texts)]
        yield {
            "image": image,
            text_key: text,
            "status": item["status"],
            answer_key: item["answer"],
            "error": item["error"],
        }


def cancel_all(client: BlipqClient, flight: Iterable[Request]) -> int:
    """Cancel the requests in flight, once each and quickly (a service that is away is not waited for)."""
    canceled = 0
    for request in flight:
        try:
            response = requests.post(
                f"{client.base_url}/v1/batches/{request.batch_id}/cancel",
                headers=dict(client.session.headers),
                timeout=CANCEL_TIMEOUT_S,
            )
            canceled += response.status_code == 200
        except requests.RequestException:
            pass
    return canceled


def check_inputs(inputs: Iterable[str], urls_file: Path | None) -> None:
    """Refuse at once an input that is neither a URL nor a file or directory, and a run with no input at all."""
    for name in inputs:
        if not (name.startswith(URL_PREFIXES) or Path(name).is_file() or Path(name).is_dir()):
            raise TagInputError(f"{name!r} is not an http(s) URL, a file or a directory")
    if urls_file is not None and not urls_file.is_file():
        raise TagInputError(f"{str(urls_file)!r} (--urls) is not a file")
    if next(iter_images(inputs, urls_file), None) is None:
        raise TagInputError("no image: name URLs, files or directories, or a file of URLs with --urls")


def iter_images(inputs: Iterable[str], urls_file: Path | None) -> Iterator[str]:
    """The images to tag, each once, as they are read: URLs and files as named, directories' image files, and
    `urls_file`'s lines (one at a time). Repeats are recognised by a hash of the name, not kept whole."""
    seen: set[int] = set()

    def named() -> Iterator[str]:
        for name in inputs:
            if Path(name).is_dir() and not name.startswith(URL_PREFIXES):
                found = (path for path in Path(name).rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
                yield from (str(path) for path in sorted(found) if path.is_file())
            else:
                yield name
        if urls_file is not None:
            with urls_file.open(encoding="utf-8") as lines:
                for line in lines:
                    if url := line.split("#", 1)[0].strip():
                        yield url

    for image in named():
        if hash(image) not in seen:
            seen.add(hash(image))
            yield image


def keep_succeeded(out: Path) -> set[int]:
    """Rewrite an earlier run's OUT with its succeeded lines only, a line at a time; the hashes of their pairs
    (image, "question" or "prompt", text)."""
    done: set[int] = set()
    kept = out.with_name(out.name + ".kept")
    with kept.open("w", encoding="utf-8") as stream:
        if out.exists():
            with out.open(encoding="utf-8") as lines:
                for line in lines:
                    record = read_succeeded_line(line)
                    if record is None:
                        continue
                    key = next(key for key in TEXT_KEYS if key in record)
                    pair = hash((record["image"], key, record[key]))
                    if pair not in done:
                        done.add(pair)
                        stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(kept, out)
    return done


def read_succeeded_line(line: str) -> dict[str, Any] | None:
    """The record of a succeeded line of OUT (a question's or a caption's), or None (another status, a line cut
    short)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None  # a line cut short by an interrupted run: its pair is asked again
    if isinstance(record, dict) and record.get("status") == "succeeded" and any(key in record for key in TEXT_KEYS):
        return record
    return None


def _pending_texts(image: str, key: str, texts: list[str], done: set[int]) -> tuple[str, ...]:
    return tuple(text for text in texts if hash((image, key, text)) not in done)


def plan_requests(
    images: Iterable[tuple[str, tuple[str, ...]]], per_request: int, caption: bool = False
) -> Iterator[Request]:
    """Group images, in the order read, with the texts still to ask of each, into tagging-shape requests (images x
    texts) of at most `per_request` answers.

    Consecutive images that need the same texts go together; URLs and local files never share a request.
    """
    run: list[str] = []
    run_key: tuple[bool, tuple[str, ...]] | None = None
    size = 0
    for image, texts in images:
        if not texts:
            continue
        is_url = image.startswith(URL_PREFIXES)
        for first in range(0, len(texts), per_request):
            part = texts[first : first + per_request]
            image_size = 0 if is_url else Path(image).stat().st_size
            most = (
                max(1, per_request // len(part))
                if is_url
                else min(max(1, per_request // len(part)), MAX_FILES_PER_UPLOAD)
            )
            if run and ((is_url, part) != run_key or len(run) == most or size + image_size > MAX_UPLOAD_BYTES):
                assert run_key is not None
                yield Request(run, list(run_key[1]), caption)
                run, size = [], 0
            run_key = (is_url, part)
            run.append(image)
            size += image_size
    if run and run_key is not None:
        yield Request(run, list(run_key[1]), caption)


def write_lines(out: Path, records: Iterable[dict[str, Any]], mode: str) -> None:
    """Write (or append) records to OUT as JSON lines, flushed: an interrupted run keeps what it wrote."""
    with out.open(mode, encoding="utf-8") as stream:
        for record in records:
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")


def report(tally: Tally) -> int:
    """0 when every pair succeeded; else 1, with the count of each error code on stderr."""
    total = tally.succeeded + sum(tally.failed.values())
    if not tally.failed:
        print(f"blipq tag: {total} answers, all succeeded", file=sys.stderr)
        return 0
    summary = ", ".join(f"{code}: {count}" for code, count in tally.failed.most_common())
    print(f"blipq tag: {sum(tally.failed.values())} of {total} answers failed ({summary})", file=sys.stderr)
    return 1
