"""A Python client of the blipq HTTP API: submit a job, wait for it with back-off, ask and get the answer.

Imports only `requests` (and its urllib3): a user's script can use it without the service's own dependencies.

It never gives up on a service that comes back: connection errors, resets, and 429/502/503/504 answers are retried
with exponential back-off and jitter by urllib3's `Retry` (honouring Retry-After), for about ten minutes. Every job
and batch it submits carries an Idempotency-Key of its own, the same on each retry, so a submission whose answer was
lost returns the first job or batch rather than making a second.

    from api.client import BlipqClient
    client = BlipqClient("http://127.0.0.1:8000")
    print(client.ask("photo.jpg", "how many dogs are in the picture?"))
    print(client.caption("photo.jpg"))  # or caption("photo.jpg", prompt="a picture of")
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

FINAL_STATUSES = frozenset({"succeeded", "failed", "canceled", "expired"})
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})  # rate limited, queue full, Redis or a proxy away: try later
RETRIES = 30  # tries of one request after the first: with the back-off below, about ten minutes
BACKOFF_S = 0.5  # the first retry's wait, doubled each time...
BACKOFF_MAX_S = 30.0  # ...up to this (Retry-After, when the service gives one, is waited out instead)
BACKOFF_JITTER_S = 1.0  # plus up to this much at random: clients that failed together do not retry in step
FIRST_POLL_S = 0.05  # a demo-model answer is ready in tens of milliseconds
MAX_POLL_S = 2.0  # a long job is polled every 2 s, not hammered
LONG_POLL_S = 10.0  # each read of `wait` waits this long on the server for the job to end (GET ...?wait=)
FIRST_BATCH_POLL_S = 0.2  # a batch takes at least a chunk's model call: no need to poll faster
CAPTION = "caption"  # the task of caption jobs; the service's default task, "vqa", answers questions


class BlipqClientError(Exception):
    """Raised when the service refuses a request; `code` is the service's stable error code."""

    def __init__(self, code: str, message: str, status: int = 0) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


class JobFailedError(BlipqClientError):
    """Raised by `ask` when the job ended without an answer (failed, canceled or expired)."""

    def __init__(self, job: dict[str, Any]) -> None:
        error = job.get("error") or {"code": job.get("status", "failed"), "message": f"the job is {job.get('status')}"}
        super().__init__(error["code"], error["message"])
        self.job = job


@dataclass
class BlipqClient:
    """One blipq service, reached over HTTP with an optional API key."""

    base_url: str
    api_key: str | None = None
    timeout_s: float = 30.0  # one HTTP request

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.session = requests.Session()
        retry = Retry(
            total=RETRIES,
            backoff_factor=BACKOFF_S,
            backoff_max=BACKOFF_MAX_S,
            backoff_jitter=BACKOFF_JITTER_S,
            status_forcelist=RETRYABLE_STATUSES,
            allowed_methods=None,  # POSTs too: each carries an Idempotency-Key, so a retry never makes a second job
            respect_retry_after_header=True,
            raise_on_status=False,  # the last answer comes back, and its error code with it
        )
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if self.api_key:
            self.session.headers["Authorization"] = f"Bearer {self.api_key}"

    def submit(self, image: str | Path | bytes, question: str | None = None, **fields: Any) -> str:
        """Submit one question about one image (an http(s) URL, a local file, or image bytes); returns the job id.

        Extra `fields` (priority, deadline_s, webhook...) are sent as they are; `task="caption"` with no question
        (and an optional `prompt`) submits a caption job. Fields that are None are not sent.
        """
        response = self._post_job(image, question, fields)
        if response.status_code != 202:
            raise _error_of(response)
        job_id: str = response.json()["id"]
        return job_id

    def get(self, job_id: str, wait_s: float = 0.0) -> dict[str, Any]:
        """The job as the service shows it now; with `wait_s`, once it ended or after that many seconds."""
        params = {"wait": f"{wait_s:g}"} if wait_s > 0 else {}
        url = f"{self.base_url}/v1/jobs/{job_id}"
        response = self.session.get(url, params=params, timeout=self.timeout_s + wait_s)
        if response.status_code != 200:
            raise _error_of(response)
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

        The images are either all http(s) URLs (sent as JSON) or all local files (uploaded as one multipart form);
        the items are ordered image by image. `caption=True` (or `task="caption"`) captions each image once instead,
        with no questions and an optional `prompt=`.
        """
        if caption:
            fields["task"] = CAPTION
        fields = {key: value for key, value in fields.items() if value is not None}
        captioning = fields.get("task") == CAPTION
        if captioning and questions:
            raise ValueError("a caption batch asks no questions (give an optional prompt=)")
        texts = {} if captioning else {"questions": list(questions)}
        is_url = [isinstance(image, str) and image.startswith(("http://", "https://")) for image in images]
        url = f"{self.base_url}/v1/batches"
        if all(is_url):
            body = {"images": [str(image) for image in images], **texts, **fields}
            response = self._post_once(url, json=body)
        elif not any(is_url):
            form = {key: json.dumps(value) for key, value in texts.items()}
            form |= {key: _form_value(value) for key, value in fields.items()}
            files = [("images", (Path(image).name, Path(image).read_bytes())) for image in images]
            response = self._post_once(url, data=form, files=files)
        else:
            raise ValueError("a batch's images are either all http(s) URLs or all local files")
        created: dict[str, Any] = response.json()
        return created["id"], created["count"]

    def batch(self, batch_id: str) -> dict[str, Any]:
        """The batch's summary as the service shows it now: counts by status, ended, progress."""
        response = self.session.get(f"{self.base_url}/v1/batches/{batch_id}", timeout=self.timeout_s)
        if response.status_code != 200:
            raise _error_of(response)
        summary: dict[str, Any] = response.json()
        return summary

    def results(self, batch_id: str, offset: int = 0, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """The batch's items in order from `offset` (at most `limit`), streamed one JSON line at a time."""
        params = {"offset": offset} if limit is None else {"offset": offset, "limit": limit}
        url = f"{self.base_url}/v1/batches/{batch_id}/results"
        with self.session.get(url, params=params, stream=True, timeout=self.timeout_s) as response:
            if response.status_code != 200:
                raise _error_of(response)
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
        response = self.session.post(f"{self.base_url}/v1/batches/{batch_id}/cancel", timeout=self.timeout_s)
        if response.status_code == 409:
            return {}
        if response.status_code != 200:
            raise _error_of(response)
        counts: dict[str, Any] = response.json()
        return counts

    def delete_batch(self, batch_id: str) -> None:
        """Delete an ended batch and its results now (once they are saved), rather than at its TTL."""
        response = self.session.delete(f"{self.base_url}/v1/batches/{batch_id}", timeout=self.timeout_s)
        if response.status_code not in (204, 404):  # 404: gone already (a retry of a delete that went through)
            raise _error_of(response)

    def _post_once(self, url: str, **body: Any) -> requests.Response:
        """POST a submission under an Idempotency-Key of its own (its retries reuse it); the 202, or its error."""
        headers = {"Idempotency-Key": uuid.uuid4().hex}
        response = self.session.post(url, timeout=self.timeout_s, headers=headers, **body)
        if response.status_code != 202:
            raise _error_of(response)
        return response

    def _post_job(self, image: str | Path | bytes, question: str | None, fields: dict[str, Any]) -> requests.Response:
        url = f"{self.base_url}/v1/jobs"
        headers = {"Idempotency-Key": uuid.uuid4().hex}  # the same on each of the adapter's retries
        fields = {key: value for key, value in {"question": question, **fields}.items() if value is not None}
        if isinstance(image, str) and image.startswith(("http://", "https://")):
            return self.session.post(url, json={"image_url": image, **fields}, timeout=self.timeout_s, headers=headers)
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        name = "image" if isinstance(image, bytes) else Path(image).name
        form = {key: str(value) for key, value in fields.items()}
        return self.session.post(url, data=form, files={"image": (name, data)}, timeout=self.timeout_s, headers=headers)


def _error_of(response: requests.Response) -> BlipqClientError:
    try:
        error = response.json()["error"]
        return BlipqClientError(error["code"], error["message"], response.status_code)
    except (ValueError, KeyError, TypeError):
        return BlipqClientError(
            "http_error", f"HTTP {response.status_code}: {response.text[:200]}", response.status_code
        )


def _form_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)  # `true`, not Python's `True`
