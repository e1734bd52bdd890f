"""A local image host for the benchmarks: a directory's files over HTTP/1.1, in a process of its own.

    python -m benchmarks.image_server DIR    # prints its port, then serves on 127.0.0.1 until SIGTERM

It answers as an image host or object store does (HTTP/1.1, connections kept open, Content-Type and Content-Length)
and costs little, so that it is not what bounds a benchmark: a thread per connection (the standard library's
ThreadingHTTPServer), each body sent with sendfile(2) from the page cache, no log line per request. In a process of
its own, it takes no GIL from the benchmark's client and its CPU time is counted apart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from blipq.up_redis import stop_process

REPO = Path(__file__).resolve().parent.parent
MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


class ImageServer:
    """The image host of a run, on 127.0.0.1 and a free port, serving `directory`'s files by name."""

    def __init__(self, directory: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.image_server", str(directory)],
            cwd=REPO, stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.strip().isdigit():
            stop_process(self.process)
            raise RuntimeError(f"the image server did not start: {line!r}")
        self.port = int(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def fetch_env(self) -> dict[str, str]:
        """The worker settings that let it fetch from this server (private addresses and odd ports are refused)."""
        return {"BLIPQ_FETCH_ALLOW_NETWORKS": "127.0.0.1/32", "BLIPQ_FETCH_ALLOW_PORTS": str(self.port)}

    def stop(self) -> None:
        stop_process(self.process)


class ImageHandler(BaseHTTPRequestHandler):
    """GET and HEAD of a file of the served directory by its name; 404 for anything else."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client that reuses connections can
    disable_nagle_algorithm = True  # a kept-alive answer would otherwise wait on the client's delayed ACK (~40 ms)
    directory = Path()

    def do_GET(self) -> None:
        self.answer(send_body=True)

    def do_HEAD(self) -> None:
        self.answer(send_body=False)

    def answer(self, send_body: bool) -> None:
        name = unquote(urlsplit(self.path).path).lstrip("/")
        path = self.directory / name
        if "/" in name or name.startswith(".") or not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with path.open("rb") as file:
            self.send_response(200)
            self.send_header("Content-Type", MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream"))
            self.send_header("Content-Length", str(os.fstat(file.fileno()).st_size))
            self.end_headers()
            if send_body:
                self.wfile.flush()
                self.connection.sendfile(file)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class BackloggedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server with a listen backlog above socketserver's 5: a worker's fetch threads connect at once,
    and connections the kernel drops wait a second for their retry."""

    request_queue_size = 128
    daemon_threads = True


def main() -> int:
    ImageHandler.directory = Path(sys.argv[1])
    server = BackloggedHTTPServer(("127.0.0.1", 0), ImageHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(server.server_address[1], flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
