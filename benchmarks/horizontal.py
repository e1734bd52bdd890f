"""Horizontal scaling on one machine: 1, 2, 4, 8 workers on one Redis and one API, each on a stand-in device.

    python -m benchmarks.horizontal [--workers 1,2,4,8] [--images 500] [--questions 10] [--device-batch-ms 50]
        [--batch-size 32] [--gpu-rate 2200] [--out FILE] [--smoke]

For each fleet size, a service of its own (benchmarks/fleet.py: its own Redis, the API under gunicorn) with that many
workers, each `python -m benchmarks.standin_device`: the real worker (fetch, decode, Redis, batching, one torch
thread) whose model call is a stand-in device taking --device-batch-ms per model batch (sleeping, the GIL released, as
a GPU kernel's wait does). Once every worker answers a Celery ping and a warm-up batch has gone through, the same
tagging batch: --images easy-VQA test images (64x64 PNGs) x the --questions questions asked most often, the images
by URL from a local image host (benchmarks/image_server.py). That is the mix of docs/performance.md's projection of
one GPU worker (64-px pictures x 10 questions by URL, about 2,200 answers/s of the worker's own Python), so that the
Redis cost measured here is the one that projection meets.
Prints per fleet size: answers/s, its ratio to one worker and to the ideal (n x one worker), Redis's main-thread CPU
per answer (`INFO cpu`: it runs every command), the workers', the API's and the image host's CPU per answer, the cores
the run's processes and the whole machine kept busy, and the load average; then where scaling stops and why, and,
from Redis's CPU per answer, how many answers/s one Redis core carries, hence how many GPU workers at --gpu-rate
answers/s each (a projection) one Redis feeds.
A few minutes on a 2-core machine, most of it starting workers; --smoke: 1 and 2 workers, 4 images x 2 questions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

from benchmarks.fleet import Fleet, easy_vqa_image_paths, run_batch, wait_until_serving
from benchmarks.image_server import ImageServer
from benchmarks.machinery import session_cpu_s
from benchmarks.standin_device import BATCH_MS_VARIABLE, STANDIN_ANSWER
from benchmarks.tagging import tagging_questions

WORKER_MODULE = "benchmarks.standin_device"
SCALING_KEPT = 0.8  # a fleet size scales while it keeps this much of the ideal (n x one worker)
SATURATED = 0.9  # of the machine's cores busy: the machine is the bound
READY_TIMEOUT_S = 600  # every worker of a fleet up (8 on 2 cores load their model in turn)


@dataclass(frozen=True)
class Size:
    """One fleet size's run: its rate, and what each part spent per answer."""

    workers: int
    answers: int
    failed: int
    seconds: float
    redis_us: float  # Redis main-thread CPU per answer
    worker_ms: float  # all workers together, per answer
    api_ms: float
    images_ms: float
    bench_ms: float  # this process: the client and its summary reads
    ours_busy: float  # cores the run's processes kept busy
    machine_busy: float  # cores busy on the whole machine (other users' processes too)
    load: float  # 1-minute load average at the end

    @property
    def rate(self) -> float:
        return self.answers / self.seconds


class Meter:
    """CPU seconds so far: Redis's main thread, each of the fleet's processes, this process, the whole machine."""

    def __init__(self, fleet: Fleet, server: ImageServer) -> None:
        self.fleet, self.server = fleet, server
        self.store = redis.Redis.from_url(fleet.redis.url)

    def read(self) -> dict[str, float]:
        info = self.store.info("cpu")
        machine = psutil.cpu_times()
        # Each process was started in a session of its own, whose id is its pid.
        return {
            "wall": time.perf_counter(),
            "redis": info["used_cpu_user_main_thread"] + info["used_cpu_sys_main_thread"],
            "workers": sum(session_cpu_s(worker.process.pid) for worker in self.fleet.workers),
            "api": session_cpu_s(self.fleet.api.pid),
            "images": session_cpu_s(self.server.pid),
            "bench": time.process_time(),
            "machine": sum(machine) - machine.idle - machine.iowait,
        }


def wait_for_workers(fleet: Fleet, count: int) -> None:
    """Until `count` workers answer a Celery ping: each has loaded its model and takes messages."""
    from contract.broker import create_celery

    app = create_celery(fleet.redis.url, "horizontal-ping")
    deadline = time.monotonic() + READY_TIMEOUT_S
    while len(app.control.ping(timeout=1.0)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {count} workers up after {READY_TIMEOUT_S} s; see {fleet.data_dir}")
        if any(worker.process.poll() is not None for worker in fleet.workers):
            raise RuntimeError(f"a worker exited; see {fleet.data_dir / 'service.log'}")


def run_size(args: argparse.Namespace, workers: int, paths: list[Path], questions: list[str]) -> Size:
    """One fleet size: start it, warm it up, send the batch, read what it cost, stop it."""
    server = ImageServer(paths[0].parent)
    env = {
        "BLIPQ_BATCH_MAX_SIZE": str(args.batch_size),
        "BLIPQ_METRICS_PORT": "0",  # several workers on one machine, and other services may hold the default port
        BATCH_MS_VARIABLE: str(args.device_batch_ms),
        **server.fetch_env(),
    }
    fleet = Fleet(workers, time_limit_s=300, env=env, worker_module=WORKER_MODULE)
    try:
        wait_until_serving(fleet, (paths[0].read_bytes(), questions[0], ""))
        wait_for_workers(fleet, workers)
        urls = [server.url(path.name) for path in paths]
        run_batch(fleet.base, urls[: 4 * workers], questions)  # every worker's connections and threads warm
        meter = Meter(fleet, server)
        before = meter.read()
        seconds, results = run_batch(fleet.base, urls, questions)
        after = meter.read()
    finally:
        fleet.stop()
        server.stop()
    count = len(results)
    spent = {name: after[name] - before[name] for name in before}
    wall = spent["wall"]
    failed = sum(line["status"] != "succeeded" or line.get("answer") != STANDIN_ANSWER for line in results)
    ours = sum(spent[name] for name in ("redis", "workers", "api", "images", "bench"))
    return Size(
        workers, count, failed, seconds, 1e6 * spent["redis"] / count, 1000 * spent["workers"] / count,
        1000 * spent["api"] / count, 1000 * spent["images"] / count, 1000 * spent["bench"] / count,
        ours / wall, spent["machine"] / wall, os.getloadavg()[0],
    )  # fmt: skip


def where_scaling_stops(sizes: list[Size]) -> str:
    """The first fleet size that keeps less than SCALING_KEPT of the ideal, and what bound it."""
    one, cores = sizes[0], os.cpu_count() or 1
    for size in sizes[1:]:
        kept = size.rate / (size.workers / one.workers * one.rate)
        if kept >= SCALING_KEPT:
            continue
        worker_cores = size.worker_ms * size.rate / 1000
        redis_share = size.redis_us * size.rate / 1e6
        if size.machine_busy >= SATURATED * cores:
            why = (
                f"the machine's {cores} cores are saturated ({size.machine_busy:.2f} busy, {size.ours_busy:.2f} by this"
                f" run), {worker_cores:.2f} of them by the workers' own Python; Redis's main thread is"
                f" {redis_share:.0%} busy"
            )
        elif redis_share >= SATURATED:
            why = f"Redis's main thread is {redis_share:.0%} busy"
        else:
            why = (
                f"not the cores ({size.machine_busy:.2f} of {cores} busy) nor Redis ({redis_share:.0%} of its main"
                " thread): the batch is too small for the fleet, or the device's batches run part-full"
            )
        return f"scaling stops at {size.workers} workers ({kept:.0%} of the ideal): {why}"
    return f"scaling holds up to {sizes[-1].workers} workers (each >= {SCALING_KEPT:.0%} of the ideal)"


def report(args: argparse.Namespace, sizes: list[Size]) -> None:
    one, cores = sizes[0], os.cpu_count()
    print(
        f"\n{args.images} easy-VQA images x {args.questions} questions by URL, stand-in device {args.device_batch_ms:g}"
        f" ms per model batch (at most {1000 * args.batch_size / args.device_batch_ms:.0f} answers/s per worker at"
        f" full batches of {args.batch_size}), 1 torch thread per worker, this machine ({cores} CPUs)"
    )
    print(
        f"{'workers':>7} {'answers/s':>9} {'x 1 wkr':>7} {'of ideal':>8} {'Redis us/ans':>12} {'workers ms/ans':>14}"
        f" {'API ms/ans':>10} {'images ms/ans':>13} {'cores busy: run / machine':>25} {'load':>5} {'failed':>6}"
    )
    for size in sizes:
        ratio = size.rate / one.rate
        print(
            f"{size.workers:>7} {size.rate:>9.1f} {ratio:>7.2f} {ratio * one.workers / size.workers:>8.0%}"
            f" {size.redis_us:>12.1f} {size.worker_ms:>14.3f} {size.api_ms:>10.3f} {size.images_ms:>13.3f}"
            f" {size.ours_busy:>13.2f} / {size.machine_busy:<9.2f} {size.load:>5.1f} {size.failed:>6}"
        )
    print(where_scaling_stops(sizes))
    last = sizes[-1]
    carried = 1e6 / last.redis_us if last.redis_us > 0 else float("inf")
    print(
        f"Redis main thread {last.redis_us:.1f} us per answer at {last.workers} workers: one Redis core carries about"
        f" {carried:,.0f} answers/s"
    )
    print(
        f"GPU workers one Redis feeds at {args.gpu_rate:,.0f} answers/s each: {carried / args.gpu_rate:.1f}"
        " (a projection: that rate is docs/performance.md's bound on one worker's Python, not a measured GPU)"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8", help="fleet sizes, comma-separated (default 1,2,4,8)")
    parser.add_argument("--images", type=int, default=500, help="easy-VQA test images (default 500)")
    parser.add_argument("--questions", type=int, default=10, help="questions asked of every image (default 10)")
    parser.add_argument("--device-batch-ms", type=float, default=50.0, help="stand-in device per batch (default 50)")
    parser.add_argument("--batch-size", type=int, default=32, help="BLIPQ_BATCH_MAX_SIZE (default 32)")
    parser.add_argument("--gpu-rate", type=float, default=2200.0, help="answers/s of one GPU worker, projected")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="1 and 2 workers, 4 images x 2 questions")
    args = parser.parse_args()
    if args.smoke:
        args.workers, args.images, args.questions = "1,2", 4, 2
    return args


def main() -> int:
    args = parse_args()
    paths = easy_vqa_image_paths(args.images)
    questions = tagging_questions(args.questions)
    sizes = []
    for workers in (int(count) for count in args.workers.split(",")):
        sizes.append(run_size(args, workers, paths, questions))
        size = sizes[-1]
        print(f"{workers} workers: {size.rate:.1f} answers/s, load {size.load:.1f}", flush=True)
    report(args, sizes)
    if args.out:
        figures: dict[str, Any] = {"settings": {**vars(args), "out": str(args.out)}, "cpu_count": os.cpu_count()}
        figures["sizes"] = [{**asdict(size), "rate": size.rate} for size in sizes]
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
