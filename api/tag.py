"""`blipq tag`: every question about every image, sent as batches, one JSON line per answer, resumable.

Images are http(s) URLs (the workers fetch them) or local files, found also in directories (recursively, by
extension) and uploaded with the batch. The images stream: requests of at most `--per-request` answers (and, for
uploads, MAX_FILES_PER_UPLOAD files and about MAX_UPLOAD_BYTES) are made as the inputs are read, and up to
`--in-flight` of them wait on the service at once, so that the next uploads overlap the answers of the earlier ones;
a request's lines are written as soon as it ended (and its batch deleted from the service: Redis holds only what is
in flight), and the progress bar moves with every item that ends. Memory holds the requests in flight and one small
hash per pair settled, however many images: a file of a million URLs is read a line at a time. A full queue
(503 `queue_full`) is waited out by the client's retries.

No one file stops the run. Each local file is checked before it is sent, against the service's own limits (from
`GET /v1/models`) and with the service's own header check (worker.contract.images.open_image): a file that cannot be
read, is not an image, or is over the limits gets its own `failed` lines, with the code the service would give, and
is not sent. A check here costs one read of the file, where the service's refusal would cost its upload (and an
upload refused part-way reaches the client as an answer only if every server on the way reads the rest of it;
werkzeug's documentation warns of a reset connection otherwise). Should the service refuse
an image all the same (another service's limits, a URL it finds invalid), it names the image (its index and name)
and the rest of the request is sent again without it: its lines say why. A refusal of a request as a whole (a
question too long, a key refused, a service away) stops the run: the requests in flight are answered and written
first when the service still answers, and canceled otherwise.

OUT (api/tag_lines.py) holds one line per (image, question): `{"image", "question", "status", "answer", "error"}`. A
re-run with the same OUT keeps its settled lines (succeeded, or failed for a permanent reason) and does not ask those
pairs again; every other pair (failed for a transient reason, canceled, expired, or never answered) is asked again
and its old line replaced. Ctrl-C cancels the requests in flight, keeps what was written and says how to go on.

With `--caption` each image is also captioned once (continuing `--prompt`, if any), with or without questions:
OUT then holds, besides any question lines, one `{"image", "prompt", "status", "caption", "error"}` line per image,
resumed the same way. A batch has one task, so the captions go as batches of their own, before the questions'.
"""

from __future__ import annotations

import itertools
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from tqdm import tqdm

from api.client import BlipqClient, BlipqClientError, is_image_url
from api.settings import ClientSettings
from api.tag_inputs import FileLimits, TagInputError, check_file, check_inputs, iter_images, unreadable
from api.tag_lines import ANSWER_KEYS, Tally, keep_settled, pair_key, refused_records, report, write_lines

MAX_ANSWERS_PER_REQUEST = 10_000  # the service's limit on one batch (worker/contract/batches.py MAX_BATCH_ANSWERS)
DEFAULT_PER_REQUEST = 1_000  # answers per request: small enough that lines and progress come often
DEFAULT_IN_FLIGHT = 4  # requests waiting on the service at once: the workers never wait for the next upload
MAX_FILES_PER_UPLOAD = 64  # images in one multipart request: a failed request re-sends little
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # about this many image bytes per multipart request (one larger file goes alone)
POLL_S = 0.2  # between two looks at the requests in flight, when none ended
CANCEL_TIMEOUT_S = 5.0  # a cancel on Ctrl-C is tried once, this long at most: the user is leaving
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT


@dataclass
class Request:
    """One batch request: its images, the texts asked of each, and once submitted its id and the items seen ended.

    A request `refused` here (one file, checked before it was sent) is never sent: its lines say why.
    """

    images: list[str]
    texts: list[str]
    caption: bool = False  # its texts are one caption prompt ("" for none), not questions
    batch_id: str = ""
    shown: int = 0
    refused: dict[str, str] | None = None

    @property
    def text_key(self) -> str:
        """What its texts are in OUT's lines: prompts or questions."""
        return "prompt" if self.caption else "question"


@dataclass
class Run:
    """What a run writes to: OUT, the tally of its pairs, and the progress bar."""

    out: Path
    tally: Tally
    bar: tqdm[Any]

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append lines to OUT, and count them."""
        write_lines(self.out, records, mode="a")
        for record in records:
            self.tally.add(record)
        self.tally.written += len(records)

    def refuse(self, request: Request, image: str, error: dict[str, str]) -> None:
        """Write the lines of an image refused as a whole, one per text asked of it."""
        self.write(refused_records(image, request.text_key, request.texts, error))
        self.bar.update(len(request.texts))


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
        done, tally = keep_settled(out)  # drops the lines of pairs that will be asked again
        pending = sum(
            len(_pending_texts(image, key, texts, done))
            for key, texts in kinds
            for image in iter_images(inputs, urls_file)
        )
    except (TagInputError, OSError) as exc:
        print(f"blipq tag: {exc}", file=sys.stderr)
        return 2
    client = BlipqClient(url, api_key=ClientSettings.from_env().api_key)
    try:
        limits = FileLimits.published(client.models()) if pending else None  # the first contact: is it there?
    except (BlipqClientError, requests.RequestException) as exc:
        print(f"blipq tag: {exc}", file=sys.stderr)
        return 1
    per_request = max(1, min(per_request, MAX_ANSWERS_PER_REQUEST))
    requests_ = itertools.chain.from_iterable(
        plan_requests(
            ((image, _pending_texts(image, key, texts, done)) for image in iter_images(inputs, urls_file)),
            per_request,
            caption=key == "prompt",
            screen=lambda image: check_file(image, limits),
        )
        for key, texts in kinds
    )
    flight: deque[Request] = deque()
    with tqdm(total=pending, unit="answer", file=sys.stderr, dynamic_ncols=True) as bar:
        run = Run(out, tally, bar)
        try:
            stream_requests(client, requests_, flight, max(1, in_flight), run)
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
            cancel_all(client, flight)
            print(
                f"blipq tag: {exc} ({tally.written} answers written; re-run the same command to go on)", file=sys.stderr
            )
            return 1
    return report(tally)


def stream_requests(
    client: BlipqClient, planned: Iterator[Request], flight: deque[Request], in_flight: int, run: Run
) -> None:
    """Keep `in_flight` requests on the service, write each one's lines as soon as it ended, until all are written.

    A refusal of a request as a whole stops the sending; the requests in flight are still waited for and written,
    then it is raised.
    """
    stopped: BlipqClientError | None = None
    while True:
        while stopped is None and len(flight) < in_flight and (request := next(planned, None)) is not None:
            if request.refused is not None:
                run.refuse(request, request.images[0], request.refused)
                continue
            try:
                with ctrl_c_after():  # a batch the service accepted is always in `flight`, so Ctrl-C cancels it
                    request.batch_id = submit(client, request, run)
                    if request.batch_id:
                        flight.append(request)
            except BlipqClientError as exc:
                stopped = exc
        if not flight:
            if stopped is not None:
                raise stopped
            return
        ended_any = False
        for request in list(flight):
            summary = client.batch(request.batch_id)
            run.bar.update(summary["ended"] - request.shown)
            request.shown = summary["ended"]
            if summary["ended"] >= summary["count"]:
                run.write(list(result_records(client, request)))
                client.delete_batch(request.batch_id)  # its lines are saved: Redis holds only what is in flight
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


def submit(client: BlipqClient, request: Request, run: Run) -> str:
    """Submit one request as a batch (its images x its texts); the batch's id ("" when every image was refused).

    An image the service refuses (it names it), or a file gone since it was checked, is taken out of the request,
    its lines written, and the rest sent again; any other refusal is raised.
    """
    while request.images:
        try:
            if request.caption:
                batch_id, _ = client.submit_batch(request.images, caption=True, prompt=request.texts[0] or None)
            else:
                batch_id, _ = client.submit_batch(request.images, request.texts)
            return batch_id
        except BlipqClientError as exc:
            if exc.image_index is None or not 0 <= exc.image_index < len(request.images):
                raise
            index, error = exc.image_index, {"code": exc.code, "message": exc.message}
        except OSError as exc:  # reading a file to upload it
            if exc.filename not in request.images:
                raise
            index, error = request.images.index(exc.filename), unreadable(exc)
        run.refuse(request, request.images.pop(index), error)
    return ""


def result_records(client: BlipqClient, request: Request) -> Iterator[dict[str, Any]]:
    """One OUT record per item of an ended request, in item order (image by image)."""
    text_key = request.text_key
    texts = request.texts
    for item in client.results(request.batch_id):
        image, text = request.images[item["index"] // len(texts)], texts[item["index"] % len(texts)]
        yield {
            "image": image,
            text_key: text,
            "status": item["status"],
            ANSWER_KEYS[text_key]: item["answer"],
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


def _pending_texts(image: str, key: str, texts: list[str], done: set[int]) -> tuple[str, ...]:
    return tuple(text for text in texts if pair_key(image, key, text) not in done)


def plan_requests(
    images: Iterable[tuple[str, tuple[str, ...]]],
    per_request: int,
    caption: bool = False,
    screen: Callable[[str], dict[str, str] | None] = lambda image: None,
) -> Iterator[Request]:
    """Group images, in the order read, with the texts still to ask of each, into tagging-shape requests (images x
    texts) of at most `per_request` answers.

    Consecutive images that need the same texts go together; URLs and local files never share a request. An image
    that `screen` refuses goes alone, as a request refused with its error, never sent.
    """
    run: list[str] = []
    run_key: tuple[bool, tuple[str, ...]] | None = None
    size = 0
    for image, texts in images:
        if not texts:
            continue
        refused = screen(image)
        if refused is not None:
            yield Request([image], list(texts), caption, refused=refused)
            continue
        is_url = is_image_url(image)
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
