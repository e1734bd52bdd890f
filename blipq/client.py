"""A Python client of the blipq HTTP API: submit a job, wait for it with back-off, ask and get the answer.

Imports only `requests` (and its urllib3): a user's script can use it without the service's own dependencies.

It never gives up on a service that comes back: once the service has answered, connection errors, resets, and
429/502/503/504 answers are retried with exponential back-off and jitter by urllib3's `Retry` (honouring Retry-After),
for about ten minutes. Before the service has answered at all, a host that does not resolve or refuses the connection
is said at once (ServiceUnreachableError): a mistyped URL or a service that is not up is not waited for. Every job
and batch it submits carries an Idempotency-Key of its own, the same on each retry, so a submission whose answer was
lost returns the first job or batch rather than making a second.

An image is an http(s) URL (the workers fetch it), a local file (uploaded) or bytes; a string with another scheme
(ftp://, s3://, gs://, data:...) is refused with `image_url_invalid`, never read as a file's name. With
`shrink=True`, an upload is first shrunk to the model's input size on this machine's cores (blipq/shrink.py: the very
pixels the workers would feed their model, as a PNG, so every answer is the original's); that needs Pillow, and
numpy, the service's own dependencies.

    from blipq.client import BlipqClient
    client = BlipqClient("http://127.0.0.1:8000")
    print(client.ask("photo.jpg", "how many dogs are in the picture?"))
    print(client.caption("photo.jpg"))  # or caption("photo.jpg", prompt="a picture of")
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from blipq.client_errors import BlipqClientError, JobFailedError, ServiceUnreachableError, error_of, unreachable

if TYPE_CHECKING:
    from concurrent.futures import Executor

    from blipq.shrink import ShrinkTarget

# Its errors are part of the client: `from blipq.client import BlipqClient, BlipqClientError`.
__all__ = ["BlipqClient", "BlipqClientError", "JobFailedError", "ServiceUnreachableError"]

FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "expired"})
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})  # rate limited, queue full, Redis or a proxy away: try later
RETRIES = 30  # tries of one request after the first: with the back-off below, about ten minutes
BACKOFF_S = 0.5  # the first retry's wait, doubled each time...
BACKOFF_MAX_S = 30.0  # ...up to this (Retry-After, when the service gives one, is waited out instead)
BACKOFF_JITTER_S = 1.0  # plus up to this much at random: clients that failed together do not retry in step
# How requests are retried: everything but connecting, which the client's state decides (see __post_init__).
RETRY_POLICY: dict[str, Any] = {
    "total": RETRIES,
    "backoff_factor": BACKOFF_S,
    "backoff_max": BACKOFF_MAX_S,
    "backoff_jitter": BACKOFF_JITTER_S,
    "status_forcelist": RETRYABLE_STATUSES,
    "allowed_methods": None,  # POSTs too: each carries an Idempotency-Key, so a retry never makes a second job
    "respect_retry_after_header": True,
    "raise_on_status": False,  # the last answer comes back, and its error code with it
}
FIRST_POLL_S = 0.05  # a demo-model answer is ready in tens of milliseconds
MAX_POLL_S = 2.0  # a long job is polled every 2 s, not hammered
LONG_POLL_S = 10.0  # each read of `wait` waits this long on the server for the job to end (GET ...?wait=)
FIRST_BATCH_POLL_S = 0.2  # a batch takes at least a chunk's model call: no need to poll faster
CAPTION = "caption"  # the task of caption jobs; the service's default task, "vqa", answers questions
VQA = "vqa"
MODELS_FRESH_S = 60.0  # how long a read of GET /v1/models tells what the workers publish, for shrinking
URL_PREFIXES = ("http://", "https://")  # the images the workers fetch
# A URL of another scheme (ftp://, s3://, data:...): two characters at least, since `C:` starts a Windows path.
OTHER_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


@dataclass
class BlipqClient:
    """One blipq service, reached over HTTP with an optional API key."""

    base_url: str
    api_key: str | None = None
    timeout_s: float = 30.0  # one HTTP request
    shrink: bool = False  # shrink uploads to the model's input size first (blipq/shrink.py), where the workers agree

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self._models: tuple[float, dict[str, Any]] | None = None  # the last read of GET /v1/models, and when
        self._pool: Executor | None = None
        self._pool_lock = threading.Lock()
        self.session = requests.Session()
        # Until the service first answers, a connection it refuses (or a host that does not resolve) is not retried:
        # it is said at once. From its first answer on, the service is one that comes back: every error is retried.
        self._mount(Retry(connect=0, **RETRY_POLICY))
        self.session.hooks["response"].append(self._answered)
        self.answered = False
        if self.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.api_key}"

    def _mount(self, retry: Retry) -> None:
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _answered(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        if not self.answered:
            self.answered = True
            self._mount(Retry(**RETRY_POLICY))

    def _request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One request to the service; ServiceUnreachableError, which says why, when it cannot be reached."""
        try:
            return self.session.request(method, url, **kwargs)
        except requests.ConnectionError as exc:
            raise unreachable(self.base_url, exc) from exc

    def models(self) -> dict[str, Any]:
        """GET /v1/models: each task's models, input size and workers, and the service's upload `limits`."""
        response = self._request("GET", f"{self.base_url}/v1/models", timeout=self.timeout_s)
        if response.status_code != 200:
            raise error_of(response)
        models: dict[str, Any] = response.json()
        self._models = (time.monotonic(), models)
        return models

    def shrink_target(self, tasks: Sequence[str]) -> ShrinkTarget | None:
        """What uploads for `tasks` are shrunk to (blipq.shrink.ShrinkTarget): None when `shrink` is off, or the live
        workers of the tasks do not all resize the same way (nothing is shrunk then). GET /v1/models is read again
        after MODELS_FRESH_S."""
        if not self.shrink:
            return None
        from blipq.shrink import ShrinkTarget

        models = self._models[1] if self._models and time.monotonic() - self._models[0] < MODELS_FRESH_S else None
        return ShrinkTarget.published(models or self.models(), list(tasks))

    def upload_files(self, images: Sequence[str | Path], tasks: Sequence[str]) -> list[tuple[str, bytes]]:
        """The files of an upload of `images` for `tasks`, (file name, bytes) in order: shrunk on this machine's cores
        where shrink_target says (the workers' answers do not change), else as they are.

        A picture the workers would refuse is refused here (BlipqClientError naming its index, as the service does);
        a file that cannot be read raises OSError with its name.
        """
        target = self.shrink_target(tasks)
        if target is None:
            return [(Path(image).name, Path(image).read_bytes()) for image in images]
        from blipq.shrink import shrink_file
        from contract.errors import BlipqError

        futures = [self._shrink_pool().submit(shrink_file, image, target) for image in images]
        try:
            files = []
            for index, (image, future) in enumerate(zip(images, futures, strict=True)):
                try:
                    files.append((Path(image).name, future.result()))
                except BlipqError as exc:
                    raise BlipqClientError(exc.code, exc.message, image_index=index) from None
            return files
        finally:
            for future in futures:
                future.cancel()

    def _shrink_pool(self) -> Executor:
        with self._pool_lock:
            if self._pool is None:
                from blipq.shrink import shrink_pool

                self._pool = shrink_pool()
            return self._pool

    def submit(self, image: str | Path | bytes, question: str | None = None, **fields: Any) -> str:
        """Submit one question about one image (an http(s) URL, a local file, or image bytes); returns the job id.

        Extra `fields` (priority, deadline_s, webhook...) are sent as they are; `task="caption"` with no question
        (and an optional `prompt`) submits a caption job. Fields that are None are not sent.
        """
        response = self._post_job(image, question, fields)
        if response.status_code != 202:
            raise error_of(response)
        job_id: str = response.json()["id"]
        return job_id

    def get(self, job_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        """The job as the service shows it now; with `wait_s`, once it ended or after that many seconds."""
        params = {"wait": f"{wait_s:g}"} if wait_s > 0 else {}
        url = f"{self.base_url}/v1/jobs/{job_id}"
        response = self._request("GET", url, params=params, timeout=self.timeout_s + wait_s)
        if response.status_code != 200:
            raise error_of(response)
        job: dict[str, Any] = response.json()
        return job

    def wait(self, job_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Long-poll the job until it ends (each read waits on the server up to LONG_POLL_S; between reads, a pause
        from 50 ms up to 2 s); TimeoutError after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s

        def read() -> dict[str, Any]:
            left = LONG_POLL_S if deadline is None else min(LONG_POLL_S, deadline - time.monotonic())
            return self.get(job_id, wait_s=left if left >= 0.01 else 0.0)

        return self._poll(
            read,
            lambda job: job["status"] in FINAL_STATUSES,
            f"job {job_id}",
            FIRST_POLL_S,
            timeout_s,
        )

    def ask(self, image: str | Path | bytes, question: str, timeout_s: float | None = None, **fields: Any) -> str:
        """Submit, wait, and return the answer; raises JobFailedError with the job's error code otherwise."""
        return self._answer(self.submit(image, question, **fields), timeout_s)

    def caption(
        self, image: str | Path | bytes, prompt: str = "", timeout_s: float | None = None, **fields: Any
    ) -> str:
        """Submit a caption job (continuing `prompt`, if any), wait, and return the caption; as `ask` otherwise."""
        return self._answer(self.submit(image, task=CAPTION, prompt=prompt or None, **fields), timeout_s)

    def submit_batch(
        self, images: Sequence[str | Path], questions: Sequence[str] = (), caption: bool = False, **fields: Any
    ) -> tuple[str, int]:
        """Submit every question about every image; returns the batch id and its count of answers.

        The images are either all http(s) URLs (sent as JSON) or all local files (uploaded as one multipart form,
        shrunk first with `shrink`); the items are ordered image by image. `caption=True` captions each image once
        too, continuing an optional `prompt=`: after its questions, in the same batch (each file uploaded once), or
        alone without questions (as `task="caption"` does).
        """
        if caption and not questions:
            fields["task"] = CAPTION
        elif caption:
            fields["caption"] = True
        fields = {key: value for key, value in fields.items() if value is not None}
        captioning = fields.get("task") == CAPTION
        if captioning and questions:
            raise ValueError("a caption batch asks no questions (give an optional prompt=)")
        texts = {} if captioning else {"questions": list(questions)}
        tasks = [CAPTION] if captioning else [VQA, *([CAPTION] if fields.get("caption") else [])]
        for image in images:
            check_image_source(image)
        is_url = [is_image_url(image) for image in images]
        url = f"{self.base_url}/v1/batches"
        if all(is_url):
            body = {"images": [str(image) for image in images], **texts, **fields}
            response = self._post_once(url, json=body)
        elif not any(is_url):
            form = {key: json.dumps(value) for key, value in texts.items()}
            form |= {key: _form_value(value) for key, value in fields.items()}
            files = [("images", file) for file in self.upload_files(images, tasks)]
            response = self._post_once(url, data=form, files=files)
        else:
            raise ValueError("a batch's images are either all http(s) URLs or all local files")
        created: dict[str, Any] = response.json()
        return created["id"], created["count"]

    def batch(self, batch_id: str) -> dict[str, Any]:
        """The batch's summary as the service shows it now: counts by status, ended, progress."""
        response = self._request("GET", f"{self.base_url}/v1/batches/{batch_id}", timeout=self.timeout_s)
        if response.status_code != 200:
            raise error_of(response)
        summary: dict[str, Any] = response.json()
        return summary

    def results(self, batch_id: str, offset: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The batch's items in order from `offset` (at most `limit`), streamed one JSON line at a time."""
        params = {"offset": offset} if limit is None else {"offset": offset, "limit": limit}
        url = f"{self.base_url}/v1/batches/{batch_id}/results"
        with self._request("GET", url, params=params, stream=True, timeout=self.timeout_s) as response:
            if response.status_code != 200:
                raise error_of(response)
            for line in response.iter_lines():
                if line:
                    yield json.loads(line)

    def wait_batch(
        self,
        batch_id: str,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Poll the batch, backing off from 0.2 s to 2 s, until every item ended; TimeoutError after `timeout_s`.

        `on_progress` is called with each summary read, the last one included.
        """

        def ended(summary: dict[str, Any]) -> bool:
            if on_progress is not None:
                on_progress(summary)
            return bool(summary["ended"] >= summary["count"])

        return self._poll(lambda: self.batch(batch_id), ended, f"batch {batch_id}", FIRST_BATCH_POLL_S, timeout_s)

    def _poll(
        self,
        read: Callable[[], dict[str, Any]],
        done: Callable[[dict[str, Any]], bool],
        what: str,
        first_delay_s: float,
        timeout_s: float | None,
    ) -> dict[str, Any]:
        """Read until `done`, doubling the wait up to MAX_POLL_S; a 429/503 is waited out; TimeoutError at the end."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        delay = first_delay_s
        while True:
            try:
                value = read()
                if done(value):
                    return value
            except BlipqClientError as exc:
                if exc.status not in RETRYABLE_STATUSES:
                    raise
            if deadline is not None and time.monotonic() + delay > deadline:
                raise TimeoutError(f"{what} did not end within {timeout_s:g} s")
            time.sleep(delay)
            delay = min(delay * 2, MAX_POLL_S)

    def _answer(self, job_id: str, timeout_s: float | None) -> str:
        """Wait for the job and return its answer (or caption); JobFailedError when it ended without one."""
        job = self.wait(job_id, timeout_s)
        if job["status"] != "succeeded":
            raise JobFailedError(job)
        answer: str = job["answer"]
        return answer

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        """Cancel the batch's items not yet answered; its counts ({} when every item had ended already)."""
        response = self._request("POST", f"{self.base_url}/v1/batches/{batch_id}/cancel", timeout=self.timeout_s)
        if response.status_code == 409:
            return {}
        if response.status_code != 200:
            raise error_of(response)
        counts: dict[str, Any] = response.json()
        return counts

    def delete_batch(self, batch_id: str) -> None:
        """Delete an ended batch and its results now (once they are saved), rather than at its TTL."""
        response = self._request("DELETE", f"{self.base_url}/v1/batches/{batch_id}", timeout=self.timeout_s)
        if response.status_code not in (204, 404):  # 404: gone already (a retry of a delete that went through)
            raise error_of(response)

    def _post_once(self, url: str, **body: Any) -> requests.Response:
        """POST a submission under an Idempotency-Key of its own (its retries reuse it); the 202, or its error."""
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        response = self._request("POST", url, timeout=self.timeout_s, headers=headers, **body)
        if response.status_code != 202:
            raise error_of(response)
        return response

    def _post_job(self, image: str | Path | bytes, question: str | None, fields: dict[str, Any]) -> requests.Response:
        url = f"{self.base_url}/v1/jobs"
        headers = {"Idempotency-Key": uuid.uuid4().hex}  # the same on each of the adapter's retries
        fields = {key: value for key, value in {"question": question, **fields}.items() if value is not None}
        check_image_source(image)
        if is_image_url(image):
            body = {"image_url": image, **fields}
            return self._request("POST", url, json=body, timeout=self.timeout_s, headers=headers)
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        name = "image" if isinstance(image, bytes) else Path(image).name
        target = self.shrink_target([str(fields.get("task") or VQA)])
        if target is not None:
            from blipq.shrink import shrink
            from contract.errors import BlipqError

            try:
                data = shrink(data, target)
            except BlipqError as exc:
                raise BlipqClientError(exc.code, exc.message) from None
        form = {key: str(value) for key, value in fields.items()}
        files = {"image": (name, data)}
        return self._request("POST", url, data=form, files=files, timeout=self.timeout_s, headers=headers)


def is_image_url(image: str | Path | bytes) -> bool:
    """Whether an image is an http(s) URL, which the workers fetch (rather than a local file, or bytes)."""
    return isinstance(image, str) and image[:8].lower().startswith(URL_PREFIXES)


def check_image_source(image: str | Path | bytes) -> None:
    """Refuse a URL of another scheme than http(s) (`image_url_invalid`), unless a file has that very name."""
    if not isinstance(image, str) or is_image_url(image):
        return
    scheme = OTHER_SCHEME.match(image)
    if scheme and not Path(image).exists():
        message = f"{image[:100]!r}: only http(s) URLs and local files are accepted, not {scheme[1]}: URLs"
        raise BlipqClientError(code="image_url_invalid", message=message)


def _form_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)  # `true`, not Python's `True`
