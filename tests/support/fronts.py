"""A real HTTP front for the API that forwards every request and counts what the client sent through it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import requests

from tests.support.service import QuietHandler, http_server


@dataclass
class Sent:
    """What went through a front: (method, path, body bytes) of each request, in order."""

    requests: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self, method: str, path: str) -> list[int]:
        """The body sizes of the requests of `method` to `path`."""
        return [size for sent_method, sent_path, size in self.requests if (sent_method, sent_path) == (method, path)]


@contextmanager
def counting_front(target: str) -> Iterator[tuple[str, Sent]]:
    """A front of the API at `target`: its base URL, and what was sent through it."""
    sent = Sent()

    class Front(QuietHandler):
        def do_GET(self) -> None:
            self.forward()

        def do_POST(self) -> None:
            self.forward()

        def do_DELETE(self) -> None:
            self.forward()

        def forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with sent.lock:
                sent.requests.append((self.command, self.path.split("?")[0], len(body)))
            headers = {name: value for name, value in self.headers.items() if name.lower() != "host"}
            answer = requests.request(self.command, target + self.path, data=body, headers=headers, timeout=60)
            self.answer(answer.status_code, answer.headers.get("Content-Type", "text/plain"), answer.content)

    with http_server(Front) as port:
        yield f"http://127.0.0.1:{port}", sent
