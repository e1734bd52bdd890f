"""Photo intake: what the service makes of camera photos on this machine, against the machine's feed limit, in one run.

    python -m benchmarks.photo_intake [--photos 300] [--up-photos 60] [--memory-photos 64] [--photo-mix camera]
        [--quick] [--smoke] [--out FILE]

The camera JPEGs of benchmarks/photos.py (1-12 MP, 5.6 MP on average; --photo-mix mixed for other formats) and,
beside every figure, the feed limit of the same bytes measured in the same run (benchmarks/feed.py: the fastest
decode to the model's input size on one process per core). In order:

1. a near-instant model: a tiny random-weights BLIP whose processor resizes to 384 px as BLIP-base's does
   (tests/support/tiny_model.py, patches of 32 px), generating one token; the service (its own Redis with its
   append-only file, the API under gunicorn, one worker, one torch thread) asked one question about each of --photos
   photos by URL (benchmarks/image_server.py, HTTP/1.1) / the feed limit;
2. the same photos through `blipq tag DIR -q Q` (uploads; the client's work counts, on the same machine) / the feed
   limit;
3. one core against two: every process the benchmark started (Redis, the API, the worker, the image server, this client)
   pinned to one core, then to two (every thread, with sched_setaffinity); the photo rate by URL on each, each
   against the feed limit on as many cores, and 2 cores / 1 core;
4. memory, on the same service: --memory-photos 12 MP photos uploaded while the worker is stopped (SIGSTOP), so that
   all are in flight at once: Redis `used_memory` per photo held, the append-only file's growth per uploaded GB
   (`aof_current_size`), then the worker let go and its peak resident memory while it works through them;
5. `blipq up` as a user starts it (Redis with its append-only file, the API, a VQA and a captioning worker on the
   demo models, every default; started during run 4, which times nothing), and `blipq tag DIR --caption -q Q1 -q Q2`
   over --up-photos photos: answers/s (captions count), against the feed limit at the demo models' 64 px.

Each run prints images/s, answers/s, service / feed limit, the CPU per image of each process and the worker's CPU per
image by stage (its `blipq_worker_stage_cpu_seconds_total`; `n/a` for a worker that does not export it). About 3-4
minutes on a 2-core machine, the first run more (the photos are written once, into ~/.cache/blipq-bench/photos);
--quick, well under a minute; --smoke, every run on 2 photos of the smoke mix (0.3 MP; the memory run too), the path
end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import requests

from benchmarks import feed
from benchmarks.fleet import Fleet
from benchmarks.photo_runs import (
    PHOTO_QUESTIONS,
    Meter,
    PhotoRun,
    PhotoService,
    linked_dir,
    photo_run,
    photo_service,
    print_photo_runs,
    serve_photos,
    submit_photos,
    tag_run,
    wait_for_photos,
)
from benchmarks.photos import MIXES, describe, photo_set
from benchmarks.processes import PeakSampler, pin, tree, tree_rss
from blipq.up_redis import free_port, stop_process

REPO = Path(__file__).resolve().parent.parent
QUESTION = PHOTO_QUESTIONS[0]
UP_QUESTIONS = PHOTO_QUESTIONS[:2]
MAX_NEW_TOKENS = 1  # the tiny model's generate is then near-instant: the intake is what remains
MODEL_SIZE, MODEL_PATCH = 384, 32  # BLIP-base's input size; large patches keep the tiny vision encoder cheap
ANNOUNCE_S = 30  # the worker's record outlives a SIGSTOP of the memory run (3 intervals)
READY_TIMEOUT_S = 300  # for `blipq up` to load its models on a busy machine
SETTLE_S = 1.0  # after a run, before Redis's memory is read
RSS_SAMPLE_S = 0.05  # between two reads of the worker's memory: a 12 MP photo decodes in about 0.1-0.2 s


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=300, help="photos of runs 1-3 (default 300)")
    parser.add_argument("--up-photos", type=int, default=60, help="photos of the blipq up run (default 60)")
    parser.add_argument("--photo-mix", choices=sorted(MIXES), default="camera", help="runs 1-3 and 5 (default camera)")
    parser.add_argument("--memory-photos", type=int, default=64, help="12 MP photos of the memory run (default 64)")
    parser.add_argument("--quick", action="store_true", help="40 photos, 8 for blipq up and 8 for memory")
    parser.add_argument("--smoke", action="store_true", help="2 photos of the smoke mix in every run, memory's too")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args()
    args.memory_mix = "camera-12mp"
    if args.quick:
        args.photos, args.up_photos, args.memory_photos = 40, 8, 8
    if args.smoke:
        args.photos, args.up_photos, args.memory_photos, args.photo_mix, args.memory_mix = 2, 2, 2, "smoke", "smoke"
    return args


def tiny_env(work: Path) -> dict[str, str]:
    """The worker's settings for the near-instant model, built into `work`."""
    from tests.support.tiny_model import build_tiny_vqa_model

    model_dir = build_tiny_vqa_model(work / "model", image_size=MODEL_SIZE, patch_size=MODEL_PATCH)
    return {
        "BLIPQ_MODEL": str(model_dir), "BLIPQ_DEVICE": "cpu", "BLIPQ_DTYPE": "float32",
        "BLIPQ_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS), "BLIPQ_TORCH_THREADS": "1",
        "BLIPQ_ANNOUNCE_INTERVAL_S": str(ANNOUNCE_S),
    }  # fmt: skip


def intake_runs(work: Path, service: PhotoService, photos: list[Path]) -> tuple[list[PhotoRun], dict[str, Any]]:
    """Runs 1-3 on the near-instant model's service."""
    cpus, base, meter, urls = sorted(os.sched_getaffinity(0)), service.fleet.base, service.meter, service.urls(photos)
    pin([os.getpid()], cpus)  # this process's tree: every process the benchmark started
    limit = feed.measure(photos, MODEL_SIZE)
    print(limit.describe(), flush=True)
    by_url = photo_run(f"1 by URL x1, {len(cpus)} cores", meter, base, urls, [QUESTION], limit)
    directory, out = linked_dir(work / "tag-dir", photos), work / "tag.jsonl"
    tagged = tag_run("2 blipq tag DIR x1 (uploads)", meter, base, directory, [QUESTION], out, limit)
    pin([os.getpid()], cpus[:1])
    try:
        one_limit = feed.measure(photos, MODEL_SIZE, processes=1, cpus=cpus[:1])
        print(one_limit.describe(), flush=True)
        one_core = photo_run("3 by URL x1, 1 core", meter, base, urls, [QUESTION], one_limit)
    finally:
        pin([os.getpid()], cpus)
    scaling = {"cores": len(cpus), "rate_all_cores": by_url.image_rate, "rate_one_core": one_core.image_rate,
               "speed_up": by_url.image_rate / one_core.image_rate,
               "feed_speed_up": limit.rate / one_limit.rate}  # fmt: skip
    return [by_url, tagged, one_core], scaling


def aof_size(client: redis.Redis) -> int:
    return int(client.info("persistence")["aof_current_size"])


def memory_run(fleet: Fleet, photos: list[Path]) -> dict[str, Any]:
    """Run 4: the photos uploaded while the worker is stopped, then worked through; Redis and worker memory."""
    client = redis.Redis.from_url(fleet.redis.url)
    worker = fleet.workers[0].process.pid
    time.sleep(SETTLE_S)
    idle_memory, idle_aof, rss_before = int(client.info("memory")["used_memory"]), aof_size(client), tree_rss(worker)
    uploaded = sum(path.stat().st_size for path in photos)
    os.killpg(worker, signal.SIGSTOP)
    try:
        submitted = submit_photos(fleet.base, photos, [QUESTION])
        held_memory, held_aof = int(client.info("memory")["used_memory"]), aof_size(client)
        rewrites = int(client.info("persistence")["aof_rewrites"])
        sampler = PeakSampler(lambda: tree_rss(worker), RSS_SAMPLE_S)
    finally:
        os.killpg(worker, signal.SIGCONT)
    started = time.perf_counter()
    results = wait_for_photos(fleet.base, submitted)
    seconds = time.perf_counter() - started
    peak_rss = sampler.stop()
    time.sleep(SETTLE_S)
    figures = {
        "photos": len(photos), "uploaded_bytes": uploaded, "mean_photo_bytes": uploaded / len(photos),
        "redis_bytes_per_photo_held": (held_memory - idle_memory) / len(photos),
        "redis_over_upload": (held_memory - idle_memory) / uploaded,
        "aof_growth_per_uploaded_gb": (held_aof - idle_aof) / uploaded * 1e9, "aof_rewrites": rewrites,
        "aof_after_run_bytes": aof_size(client), "redis_after_run_bytes": int(client.info("memory")["used_memory"]),
        "worker_rss_before": rss_before, "worker_peak_rss": peak_rss, "seconds": seconds,
        "failed": sum(line["status"] != "succeeded" for line in results),
    }  # fmt: skip
    print(f"4 memory: worker peak RSS {peak_rss / 1e6:.0f} MB (before {rss_before / 1e6:.0f} MB)", flush=True)
    return figures


@dataclass
class Up:
    """`blipq up` as a user starts it (every default; the workers' /metrics on free ports), in a session of its own."""

    process: subprocess.Popen[bytes]
    base: str
    metrics_port: int  # worker i's: metrics_port + i

    @classmethod
    def start(cls, work: Path, checkout: Path = REPO, env: Mapping[str, str] | None = None) -> Up:
        """Start `blipq up` of `checkout` (this one unless told) with its data in `work`, `env` added to this
        process's."""
        port, metrics_port = free_port(), free_port()
        up_env = {**os.environ, "PYTHONPATH": str(checkout), "BLIPQ_METRICS_PORT": str(metrics_port), **(env or {})}
        argv = [sys.executable, "-m", "blipq.cli", "up", "--port", str(port), "--data-dir", str(work / "up")]
        with (work / "up.log").open("wb") as log:
            process = subprocess.Popen(
                argv, env=up_env, cwd=checkout, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return cls(process, f"http://127.0.0.1:{port}", metrics_port)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)  # Ctrl-C: `up` stops its workers, the API, then Redis
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            stop_process(self.process)


def up_run(work: Path, up: Up, photos: list[Path]) -> PhotoRun:
    """Run 5: once `blipq up` is ready, `blipq tag DIR --caption -q Q1 -q Q2` over the photos."""
    from worker.settings import DEMO_MODEL_DIR

    wait_until_ready(up.base, up.process)
    urls = [f"http://127.0.0.1:{up.metrics_port + i}/metrics" for i in range(2)]
    limit = feed.measure(photos, feed.processor_size(DEMO_MODEL_DIR))
    print(limit.describe(), flush=True)
    directory, out = linked_dir(work / "up-dir", photos), work / "up.jsonl"
    meter = Meter(up_processes(up.process.pid), urls)
    name = "5 blipq up, tag --caption -q Q1 -q Q2"
    return tag_run(name, meter, up.base, directory, UP_QUESTIONS, out, limit, caption=True)


def wait_until_ready(base: str, up: subprocess.Popen[bytes]) -> None:
    """Wait until /readyz says both workers loaded their models."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"blipq up exited {up.returncode}")
        try:
            if requests.get(f"{base}/readyz", timeout=5).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError("blipq up was not ready in time")


def up_processes(pid: int) -> dict[str, int]:
    """The processes `blipq up` started, by role, from their command lines."""
    roles = {}
    for process in tree(pid)[1:]:
        line = " ".join(process.cmdline())
        if "redis-server" in line:
            roles["redis"] = process.pid
        elif "gunicorn" in line and "api" not in roles:
            roles["api"] = process.pid
        elif "--hostname=vqa" in line:
            roles["worker"] = process.pid
        elif "--hostname=caption" in line:
            roles["captioner"] = process.pid
    return roles


def report(runs: list[PhotoRun], scaling: dict[str, Any], memory: dict[str, Any], up: PhotoRun) -> None:
    print(f"\nphoto intake, this machine ({os.cpu_count()} CPUs); runs 1-3: tiny BLIP at {MODEL_SIZE} px, 1 token")
    print_photo_runs([*runs, up])
    print(
        f"\n3 {scaling['cores']} cores / 1 core: service {scaling['rate_all_cores']:.1f} /"
        f" {scaling['rate_one_core']:.1f} images/s = {scaling['speed_up']:.2f}x; feed limit"
        f" {scaling['feed_speed_up']:.2f}x"
    )
    print(
        f"4 memory, {memory['photos']} {memory['mix']} ({memory['mean_photo_bytes'] / 1e6:.2f} MB each) uploaded while"
        f" the worker was stopped: Redis used_memory {memory['redis_bytes_per_photo_held'] / 1e6:.2f} MB per photo"
        f" held ({memory['redis_over_upload']:.2f} x its bytes); append-only file +"
        f" {memory['aof_growth_per_uploaded_gb'] / 1e9:.2f} GB per uploaded GB ({memory['aof_rewrites']} rewrites),"
        f" {memory['aof_after_run_bytes'] / 1e6:.0f} MB after the run"
    )
    print(
        f"  worker RSS before {memory['worker_rss_before'] / 1e6:.0f} MB (after runs 1-3), peak"
        f" {memory['worker_peak_rss'] / 1e6:.0f} MB"
        f" while it worked through them ({memory['seconds']:.1f} s, {memory['failed']} failed)"
    )


def main() -> int:
    args = parse_args()
    photos = photo_set(args.photo_mix, args.photos)
    large = photo_set(args.memory_mix, args.memory_photos)
    print(
        f"{MIXES[args.photo_mix].title}: {describe(photos)}\n{MIXES[args.memory_mix].title}: {describe(large)}",
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="blipq-photo-intake-"))
    up: Up | None = None
    try:
        with photo_service(tiny_env(work), photos[0].parent, photos[0]) as service:
            serve_photos(service.fleet.base, service.urls(photos[:16]), [QUESTION])  # connections, imports
            runs, scaling = intake_runs(work, service, photos)
            up = Up.start(work)  # it loads its models during the memory run, which times nothing
            memory = {**memory_run(service.fleet, large), "mix": MIXES[args.memory_mix].title}
        up_figures = up_run(work, up, photos[: args.up_photos])
    finally:
        if up is not None:
            up.stop()
        shutil.rmtree(work, ignore_errors=True)
    report(runs, scaling, memory, up_figures)
    if args.out:
        figures = [run.as_dict() for run in [*runs, up_figures]]
        summary = {"settings": {**vars(args), "out": str(args.out)}, "runs": figures, "scaling": scaling,
                   "memory": memory}  # fmt: skip
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
