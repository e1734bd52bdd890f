"""`blipq tag`: every question about every image, sent as batches, one JSON line per answer, resumable.

Images are http(s) URLs (the workers fetch them) or local files, found also in directories (recursively, by
extension) and uploaded with the batch. The images stream: requests of at most `--per-request` answers (and, for
uploads, blipq/tag_requests.py's MAX_FILES_PER_UPLOAD files and about MAX_UPLOAD_BYTES) are made as the inputs are
read, and up to `--in-flight` of them wait on the service at once, so that the next uploads overlap the answers of the
earlier ones; a request's lines are written as soon as it ended (and its batch deleted from the service: Redis holds
only what is in flight), and the progress bar moves with every item that ends. Memory holds the requests in flight
and one small hash per pair settled, however many images: a file of a million URLs is read a line at a time. A full
queue (503 `queue_full`) is waited out by the client's retries.

No one file stops the run. Each local file is checked before it is sent, against the service's own limits (from
`GET /v1/models`) and with the service's own header check (contract.images.open_image): a file that cannot be
read, is not an image, or is over the limits gets its own `failed` lines, with the code the service would give, and
is not sent. A check here costs one read of the file, where the service's refusal would cost its upload (and an
upload refused part-way reaches the client as an answer only if every server on the way reads the rest of it;
werkzeug's documentation warns of a reset connection otherwise). Should the service refuse
an image all the same (another service's limits, a URL it finds invalid), it names the image (its index and name)
and the rest of the request is sent again without it: its lines say why. A refusal of a request as a whole (a
question too long, a key refused, a service away) stops the run: the requests in flight are answered and written
first when the service still answers, and canceled otherwise.

OUT (blipq/tag_lines.py) holds one line per (image, question): `{"image", "question", "status", "answer", "error"}`. A
re-run with the same OUT keeps its settled lines (succeeded, or failed for a permanent reason) and does not ask those
pairs again; every other pair (failed for a transient reason, canceled, expired, or never answered) is asked again
and its old line replaced. Ctrl-C cancels the requests in flight, keeps what was written and says how to go on.

With `--caption` each image is also captioned once (continuing `--prompt`, if any), with or without questions:
OUT then holds, besides any question lines, one `{"image", "prompt", "status", "caption", "error"}` line per image,
resumed the same way. An image's questions and caption go in one batch (blipq/tag_requests.py): it is sent once, and
the vqa and captioning workers each answer their own items.

With `--shrink` (the default) a local file is uploaded as the very pixels the workers would feed their model, made on
this machine's cores (blipq/shrink.py, through the client's `shrink`): the answers are the original's, for a fraction of
the bytes, and the workers decode a small PNG rather than a camera's photo. Where the workers do not all resize the
same way, files are sent as they are (and a line on stderr says so).
"""

from __future__ import annotations

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

from blipq.client import BlipqClient, BlipqClientError, is_image_url
from blipq.settings import ClientSettings
from blipq.tag_inputs import FileLimits, TagInputError, check_file, check_inputs, iter_images, unreadable
from blipq.tag_lines import ANSWER_KEYS, Tally, keep_settled, pair_key, refused_records, report, write_lines
from blipq.tag_requests import PROMPT_KEY, QUESTION_KEY, Asked, Request, file_bytes, plan_requests

MAX_ANSWERS_PER_REQUEST = 10_000  # the service's limit on one batch (contract/batches.py MAX_BATCH_ANSWERS)
DEFAULT_PER_REQUEST = 1_000  # answers per request: small enough that lines and progress come often
DEFAULT_IN_FLIGHT = 4  # requests waiting on the service at once: the workers never wait for the next upload
PNG_BOUND = 1.01  # a shrunk picture's PNG takes at most about its raw pixels' bytes (plus its chunks' few)
POLL_S = 0.2  # between two looks at the requests in flight, when none ended
CANCEL_TIMEOUT_S = 5.0  # a cancel on Ctrl-C is tried once, this long at most: the user is leaving
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT


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
        self.write([record for key, text in request.asked for record in refused_records(image, key, [text], error)])
        self.bar.update(len(request.asked))


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
    shrink: bool = True,
) -> int:
    """Answer every question about every image (and, `caption`, caption every image once) into OUT; with `shrink`,
    uploads are shrunk first (the module's docstring).

    Returns 0 when every pair succeeded, else 1 (2: bad input, 130: interrupted).
    """
    asked: list[Asked] = [(QUESTION_KEY, question) for question in dict.fromkeys(questions)]
    asked += [(PROMPT_KEY, prompt)] if caption else []
    try:
        check_inputs(inputs, urls_file)
        done, tally = keep_settled(out)  # drops the lines of pairs that will be asked again
        pending = sum(len(_pending(image, asked, done)) for image in iter_images(inputs, urls_file))
    except (TagInputError, OSError) as exc:
        print(f"blipq tag: {exc}", file=sys.stderr)
        return 2
    client = BlipqClient(url, api_key=ClientSettings.from_env().api_key, shrink=shrink)
    try:
        limits = FileLimits.published(client.models()) if pending else None  # the first contact: is it there?
        upload_bytes = _upload_bytes(client, inputs, Request([], asked).tasks) if pending else file_bytes
    except (BlipqClientError, requests.RequestException) as exc:
        print(f"blipq tag: {exc}", file=sys.stderr)
        return 1
    per_request = max(1, min(per_request, MAX_ANSWERS_PER_REQUEST))
    requests_ = plan_requests(
        ((image, _pending(image, asked, done)) for image in iter_images(inputs, urls_file)),
        per_request,
        screen=lambda image: check_file(image, limits),
        upload_bytes=upload_bytes,
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
            captioned, prompt = request.prompt is not None, request.prompt or None
            batch_id, _ = client.submit_batch(request.images, request.questions, caption=captioned, prompt=prompt)
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
    """One OUT record per item of an ended request, in item order (image by image, each its questions then its
    caption)."""
    asked = request.asked
    for item in client.results(request.batch_id):
        image, (text_key, text) = request.images[item["index"] // len(asked)], asked[item["index"] % len(asked)]
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


def _pending(image: str, asked: list[Asked], done: set[int]) -> tuple[Asked, ...]:
    return tuple((key, text) for key, text in asked if pair_key(image, key, text) not in done)


def _upload_bytes(client: BlipqClient, inputs: list[str], tasks: list[str]) -> Callable[[str], int]:
    """What a local file will add to its upload (for the planning of requests): about its shrunk pixels' bytes at
    most, when it is shrunk; its size otherwise. Says on stderr when `--shrink` cannot shrink."""
    if not client.shrink or all(is_image_url(name) for name in inputs):
        return file_bytes
    target = client.shrink_target(tasks)
    if target is None:
        print(
            f"blipq tag: pictures are sent as they are: the live {' and '.join(tasks)} workers do not all publish one "
            "input size, filter, decode mode and Pillow release that this client shares (GET /v1/models)",
            file=sys.stderr,
        )
        return file_bytes
    shrunk = int(target.width * target.height * 3 * PNG_BOUND)
    return lambda image: min(file_bytes(image), shrunk)
