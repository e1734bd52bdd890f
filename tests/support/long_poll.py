"""Helpers of the tests of reads that wait (`?wait=S`): a read in a thread, timed, and how to see that it waits."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from flask.testing import FlaskClient
from werkzeug.test import TestResponse


class Read(threading.Thread):
    """A GET of the API in a thread, timed."""

    def __init__(self, client: FlaskClient, path: str) -> None:
        super().__init__(daemon=True)
        self.client, self.path = client, path
        self.response: TestResponse | None = None
        self.took_s = 0.0

    def run(self) -> None:
        began = time.monotonic()
        self.response = self.client.get(self.path)
        self.took_s = time.monotonic() - began

    def job(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """The answer's body (a job's, or a batch's), once the read answered `200`."""
        self.join(timeout_s)
        assert self.response is not None, "the read never answered"
        assert self.response.status_code == 200, self.response.get_json()
        body: dict[str, Any] = self.response.get_json()
        return body


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Look at `condition` every 10 ms until it holds; fail saying it never `what`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"never {what}"
        time.sleep(0.01)


def blocked_in_blmove(client: redis.Redis) -> int:
    """Clients the Redis server holds blocked in BLMOVE: the waiting reads of single jobs (nothing else uses it)."""
    return sum(1 for c in client.client_list() if c["cmd"] == "blmove" and "b" in c["flags"])


def waiting_on_subscription(thread: threading.Thread) -> bool:
    """Whether `thread` is inside redis-py's PubSub.get_message: a read of a batch, or of a batch item, that found
    nothing to answer yet and waits for its batch's next end."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "get_message":
            return True
        frame = frame.f_back
    return False
