"""Fetching image URLs: the worker's CPU per image and images/s, connections kept alive versus a new one per image.

    python -m benchmarks.fetch [--quick] [--smoke] [--repeats 9]

A local HTTP/1.1 server (Python's http.server, keeping connections alive, TCP_NODELAY) runs in a child process and
serves a small PNG (about 5 kB) and a camera-sized JPEG (6 MP, about 1.6 MB). This process fetches them with
`worker.fetch.fetch_image_bytes` through one session shared by its threads, as a worker does, from 1 and 8 threads:
with the default keep-alive (BLIPQ_FETCH_KEEPALIVE_S) and with 0 (a new guarded connection per image: a lookup in a
thread of its own, a connect, `Connection: close`). The two modes take turns within each repeat. CPU per image is this
process's CPU time (every thread of it, the lookup threads included; not the server's) over the images fetched.
The URL's host is the address 127.0.0.1, so a lookup costs the guard's thread and getaddrinfo on a number, not a DNS
round trip: a real name would add its own cost to the new-connection side. Prints medians and ratios. `--smoke`: 16
small images and 8 photos per measurement, one repeat.
"""

from __future__ import annotations

import argparse
import datetime
import io
import ipaddress
import multiprocessing
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from typing import Any

from PIL import Image

from worker.fetch import FetchLimits, fetch_image_bytes, new_session
from worker.keepalive import KEEPALIVE_S
from worker.netguard import NetworkPolicy

THREADS = (1, 8)
PICTURES = ("/small.png", "/camera.jpg")
LIMITS = FetchLimits(max_bytes=20_000_000, max_pixels=40_000_000, connect_timeout_s=5.0, total_timeout_s=30.0)
# Images fetched per measurement (a multiple of the largest thread count), full size and --quick. Short measurements,
# many repeats: on a shared machine the load drifts, and a ratio of two measurements taken back to back drifts less.
IMAGES = {"/small.png": 800, "/camera.jpg": 64}
QUICK_IMAGES = {"/small.png": 200, "/camera.jpg": 16}
SMOKE_IMAGES = {"/small.png": 16, "/camera.jpg": 8}


def small_png() -> bytes:
    """A 40x40 PNG of noise: about 5 kB."""
    rng = random.Random(1)
    image = Image.frombytes("RGB", (40, 40), bytes(rng.getrandbits(8) for _ in range(40 * 40 * 3)))
    return encode(image, "PNG")


def camera_jpeg() -> bytes:
    """A 3000x2000 JPEG (quality 85) of gradients and noise: about 1.6 MB, like a phone's photo."""
    noise = Image.effect_noise((3000, 2000), 30)
    gradient = Image.linear_gradient("L").resize((3000, 2000))
    return encode(Image.merge("RGB", (Image.blend(noise, gradient, 0.5), gradient, noise)), "JPEG", quality=85)


def encode(image: Image.Image, kind: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


def serve(report: Connection) -> None:
    """The image server (the child process): sends its port and the pictures' sizes, then serves until killed."""
    bodies = {"/small.png": ("image/png", small_png()), "/camera.jpg": ("image/jpeg", camera_jpeg())}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keeps a connection unless the client says `Connection: close`
        disable_nagle_algorithm = True  # the body is not held back behind the headers' ACK

        def do_GET(self) -> None:
            content_type, body = bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # new connections from 8 threads at once must not wait on a full backlog

    server = Server(("127.0.0.1", 0), Handler)
    report.send((server.server_address[1], {path: len(body) for path, (_, body) in bodies.items()}))
    server.serve_forever()


def measure(url: str, policy: NetworkPolicy, images: int, threads: int, keepalive_s: float) -> tuple[float, float]:
    """Fetch `url` `images` times from `threads` threads through one new session: CPU ms per image, images/s."""
    session = new_session(policy, keepalive_s=keepalive_s)
    run_in_threads(threads, lambda: fetch_image_bytes(session, url, LIMITS))  # warm: connections open, code loaded
    start = threading.Barrier(threads + 1)

    def fetch_share() -> None:
        start.wait()
        for _ in range(images // threads):
            fetch_image_bytes(session, url, LIMITS)

    workers = [threading.Thread(target=fetch_share) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for worker in workers:
        worker.join()
    cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - wall_started
    session.close()
    fetched = images // threads * threads
    return 1000 * cpu_s / fetched, fetched / wall_s


def run_in_threads(threads: int, call: Callable[[], Any]) -> None:
    workers = [threading.Thread(target=call) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and one repeat: seconds, not minutes")
    parser.add_argument("--smoke", action="store_true", help="a few images, one repeat: the path in seconds")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    images, repeats = (SMOKE_IMAGES, 1) if args.smoke else (QUICK_IMAGES, 1) if args.quick else (IMAGES, args.repeats)

    receive, send = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(send,), daemon=True)
    server.start()
    port, sizes = receive.recv()
    policy = NetworkPolicy(allow_networks=(ipaddress.ip_network("127.0.0.1/32"),), allow_ports=(range(port, port + 1),))
    modes = {"kept": KEEPALIVE_S, "new": 0.0}
    results: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    try:
        for repeat in range(repeats):
            for path in PICTURES:
                for threads in THREADS:
                    order = list(modes) if repeat % 2 == 0 else list(reversed(modes))  # neither always goes first
                    for mode in order:
                        url = f"http://127.0.0.1:{port}{path}"
                        figures = measure(url, policy, images[path], threads, modes[mode])
                        results.setdefault((path, threads, mode), []).append(figures)
    finally:
        server.kill()

    print(f"# fetching image URLs, {datetime.date.today()}, {os.cpu_count()} CPUs, {repeats} repeat(s): medians,")
    print("# and the median of each repeat's ratio kept / new (measured back to back)")
    print(f"# kept: BLIPQ_FETCH_KEEPALIVE_S={KEEPALIVE_S:g}; new: 0 (a new guarded connection per image)")
    print("| picture | threads | images | CPU ms/image kept / new | ratio | images/s kept / new | ratio |")
    print("|---|---|---|---|---|---|---|")
    for path in PICTURES:
        for threads in THREADS:
            kept, new = results[path, threads, "kept"], results[path, threads, "new"]
            cpu_ratio = statistics.median(k[0] / n[0] for k, n in zip(kept, new, strict=True))
            rate_ratio = statistics.median(k[1] / n[1] for k, n in zip(kept, new, strict=True))
            print(
                f"| {path.lstrip('/')} ({sizes[path] / 1000:,.1f} kB) | {threads} | {images[path]} "
                f"| {median(kept, 0):.3f} / {median(new, 0):.3f} | {cpu_ratio:.2f} "
                f"| {median(kept, 1):,.0f} / {median(new, 1):,.0f} | {rate_ratio:.2f} |"
            )


def median(figures: list[tuple[float, float]], index: int) -> float:
    return statistics.median(figure[index] for figure in figures)


if __name__ == "__main__":
    main()
