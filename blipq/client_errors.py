"""What the Python client (blipq/client.py) raises: its errors, each with a stable code, and how a refusal of the
service or a connection that failed becomes one.

Imports only `requests` (and its urllib3), as the client does.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import NameResolutionError


class BlipqClientError(Exception):
    """Raised when the service refuses a request, or the client cannot make it; `code` is a stable error code.

    `status` is the HTTP status of the service's refusal, None where no answer of the service is behind the error;
    `image_index` is the place, in a batch's images, of the image the refusal is about (None: not about one image).
    """

    def __init__(self, code: str, message: str, status: int | None = None, image_index: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status, self.image_index = code, message, status, image_index


class ServiceUnreachableError(BlipqClientError):
    """Raised when the service cannot be reached: its host does not resolve (`service_not_found`), refuses the
    connection (`service_refused`), or fails otherwise, retries included (`service_unreachable`)."""


class JobFailedError(BlipqClientError):
    """Raised by `ask` and `caption` when the job ended without an answer: `code` is the job's error code,
    `job_status` how it ended (failed, canceled or expired), `job` the job as the service showed it."""

    def __init__(self, job: dict[str, Any]) -> None:
        job_status = str(job.get("status") or "failed")
        error = job.get("error") or {"code": job_status, "message": f"the job is {job_status}"}
        super().__init__(code=error["code"], message=error["message"])
        self.job, self.job_id, self.job_status = job, str(job.get("id", "")), job_status


def unreachable(base_url: str, exc: requests.ConnectionError) -> ServiceUnreachableError:
    """Why the service at `base_url` could not be reached, in words and as a code, from what requests raised."""
    causes: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(causes) < 20:  # the chain of urllib3's and the socket's errors under requests'
        cause = todo.pop()
        if isinstance(cause, BaseException) and cause not in causes:
            causes.append(cause)
            todo += [getattr(cause, "reason", None), cause.__cause__, cause.__context__, *cause.args[:1]]
    host = urlsplit(base_url).hostname or base_url
    if any(isinstance(cause, NameResolutionError | socket.gaierror) for cause in causes):
        code, why = "service_not_found", f"the host {host} does not resolve"
    elif any(isinstance(cause, ConnectionRefusedError) for cause in causes):
        code, why = "service_refused", "it refused the connection: is `blipq up` running?"
    else:
        code, why = "service_unreachable", str(getattr(exc.args[0], "reason", exc) if exc.args else exc)
    return ServiceUnreachableError(code=code, message=f"cannot reach the blipq service at {base_url}: {why}")


def error_of(response: requests.Response) -> BlipqClientError:
    """The service's refusal as an error: its code, message and status, and the image it is about (`image_index`)."""
    try:
        error = response.json()["error"]
        image = error.get("image")
        index = image.get("index") if isinstance(image, dict) else None
        return BlipqClientError(
            error["code"], error["message"], response.status_code, index if isinstance(index, int) else None
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return BlipqClientError(
            "http_error", f"HTTP {response.status_code}: {response.text[:200]}", response.status_code
        )
