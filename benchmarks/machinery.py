"""Machinery: what the service costs per answer besides the model, measured as an identity model measures it.

    python -m benchmarks.machinery [--images 500] [--wide-images 2000] [--questions 10] [--single-jobs 300]
        [--idle-jobs 50] [--photos 100] [--batch-size 32] [--gpu-rate 1000,3000,10000] [--quick] [--smoke] [--out FILE]

A tiny random-weights BLIP (tests/support/tiny_model.py) generating one token leaves the machinery's time. In one run,
the service (its own Redis, the API under gunicorn, one worker, one torch thread, BLIPQ_BATCH_MAX_SIZE=--batch-size)
and the inference core in this process (each image's bytes read and `decode_image`d, then `answer_questions` on
--batch-size answers at a time, an image's questions together, one torch thread) answer the same items, mix by mix:
(1) --images synthetic 64x64 PNGs x --questions questions, one batch by URL (a local HTTP server); (2) the same
uploaded; (3) --wide-images images x 1 question uploaded; (4) the same by URL: the summary read at 10 Hz until every
item ended, then the results, timed from the submission to the last line; (5) --single-jobs single jobs (upload, long
polls) from 16 threads against the core at batch 16, then --idle-jobs one at a time against the core on one item.
Prints answers/s of both, their ratio, the machinery's ms per answer (1000 x (1/service - 1/core)), and per answer:
Redis commands (`total_commands_processed`: a script's own calls count too), Redis main-thread CPU (what bounds one
Redis: the answers/s one core carries, the GPU workers it feeds), bytes kept (`used_memory` after the results were
read less before the submission) and each process's CPU.
(6) photos, on the same service: --photos of --photo-mix (benchmarks/photos.py: camera JPEGs unless told) x 1 and x
10 questions, by URL and
uploaded, against the feed limit of the same bytes at the model's input size (benchmarks/feed.py), with the CPU per
image of each process and, where the worker exports it, of each of its stages (benchmarks/photo_runs.py).
About a minute and a half on a 2-core machine; --quick, 40 s; --smoke (4 images, 2 questions, 4 single jobs, 2 photos of
the smoke mix), the path end to end in seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from benchmarks import feed
from benchmarks.fleet import Fleet, percentile, run_clients, wait_until_serving
from benchmarks.image_server import ImageServer
from benchmarks.photo_runs import (
    PHOTO_QUESTIONS,
    Meter,
    PhotoRun,
    add_photo_options,
    linked_dir,
    photo_run,
    print_photo_runs,
)
from benchmarks.photos import MIXES, describe, photo_set
from blipq.client import BlipqClient
from blipq.up_redis import free_port
from contract.batches import MAX_BATCH_ANSWERS

MAX_NEW_TOKENS = 1  # the tiny model's generate is then near-instant: the machinery is what remains
POLL_HZ = 10.0  # a dashboard's reads of a batch's summary, kept at this rate whatever each read costs
SETTLE_S = 1.0  # after a batch's results were read, before its memory is counted
POLL_SAMPLES = 10  # reads of an ended batch's summary that price one
MAX_PIXELS = 40_000_000  # the worker's default BLIPQ_MAX_IMAGE_PIXELS
QUESTIONS = [
    "what color is the shape?", "what shape is this?", "is there a circle?", "is there a square?",
    "is there a triangle?", "is the shape red?", "is the shape blue?", "is the shape green?",
    "what color is the circle?", "is there a shape in the picture?", "how many shapes are there?", "is the shape big?",
]  # fmt: skip


def write_images(directory: Path, count: int) -> list[Path]:
    """`count` easy-VQA-like PNGs (one shape on a plain background), each with distinct bytes."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        x, y, size = rng.randrange(40), rng.randrange(40), rng.randrange(12, 24)
        shape = rng.choice((draw.ellipse, draw.rectangle))
        shape((x, y, x + size, y + size), fill=tuple(rng.randrange(256) for _ in range(3)))
        image.putpixel((63, 63), (index % 256, index // 256 % 256, 7))  # two images never share their bytes
        paths.append(directory / f"{index:05d}.png")
        image.save(paths[-1])
    return paths


def core_seconds(loaded: Any, items: Sequence[tuple[Path, str]], batch_size: int) -> float:
    """The inference core on `items` in chunks of `batch_size`, each image of a chunk read and decoded once."""
    from contract.images import decode_image
    from worker.inference import answer_questions

    started = time.perf_counter()
    for first in range(0, len(items), batch_size):
        chunk = items[first : first + batch_size]
        decoded = {path: decode_image(path.read_bytes(), MAX_PIXELS) for path in dict.fromkeys(p for p, _ in chunk)}
        answer_questions(loaded, [decoded[path] for path, _ in chunk], [q for _, q in chunk], MAX_NEW_TOKENS)
    return time.perf_counter() - started


def session_cpu_s(session: int) -> float:
    """CPU seconds of the live processes of a session (a process the fleet started, and its children)."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == session:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


class Probe:
    """What the service spent so far: Redis's counters (one `INFO all`) and the CPU time of each of its processes."""

    def __init__(self, fleet: Fleet, server: ImageServer) -> None:
        self.store = redis.Redis.from_url(fleet.redis.url)
        # Each was started in a session of its own, whose id is its pid.
        self.sessions = {
            "api": fleet.api.pid, "worker": fleet.workers[0].process.pid, "redis": fleet.redis.process.pid,
            "images": server.pid,
        }  # fmt: skip

    def read(self) -> dict[str, Any]:
        info = self.store.info("all")
        stats = {name[8:]: stat for name, stat in info.items() if name.startswith("cmdstat_")}
        return {
            "commands": info["total_commands_processed"],  # a script's own calls count, each
            "redis_cpu_s": info["used_cpu_user_main_thread"] + info["used_cpu_sys_main_thread"],
            "memory": info["used_memory"],
            "dataset": info["used_memory_dataset"],  # less clients' buffers, the script cache, the AOF buffer
            "calls": {name: stat["calls"] for name, stat in stats.items()},
            "usec": {name: stat["usec"] for name, stat in stats.items()},  # a script's includes its calls'
            "cpu_s": {"bench": time.process_time(), **{n: session_cpu_s(pid) for n, pid in self.sessions.items()}},
        }


def costs(before: dict[str, Any], after: dict[str, Any], count: int) -> dict[str, Any]:
    """Per answer (or job) between two reads of a Probe."""
    usec = {name: (value - before["usec"].get(name, 0)) / count for name, value in after["usec"].items()}
    calls = {name: (value - before["calls"].get(name, 0)) / count for name, value in after["calls"].items()}
    redis_us = 1e6 * (after["redis_cpu_s"] - before["redis_cpu_s"]) / count
    return {
        "commands_per_answer": (after["commands"] - before["commands"]) / count,
        "redis_us_per_answer": redis_us,
        "answers_per_s_one_redis_core": 1e6 / redis_us if redis_us > 0 else math.inf,
        "commandstats_us_per_answer": sum(usec.values()),
        "top_commands": {name: [calls[name], usec[name]] for name in sorted(usec, key=usec.__getitem__)[-5:][::-1]},
        "cpu_ms_per_answer": {name: 1000 * (t - before["cpu_s"][name]) / count for name, t in after["cpu_s"].items()},
    }


def serve_batch(fleet: Fleet, probe: Probe, sources: Sequence[str | Path], questions: list[str]) -> dict[str, Any]:
    """Submit every question about every source (several requests at once past the per-request limit), read the
    summaries at POLL_HZ until all ended, read the results; the wall time, polls, failures and what it cost."""
    per_request = max(1, MAX_BATCH_ANSWERS // len(questions))
    groups = [sources[first : first + per_request] for first in range(0, len(sources), per_request)]
    submitted: list[tuple[str, int]] = [("", 0)] * len(groups)

    def submit(number: int) -> None:
        submitted[number] = BlipqClient(fleet.base, timeout_s=300).submit_batch(groups[number], questions)

    before = probe.read()
    started = time.perf_counter()
    run_clients(len(groups), len(groups), submit)
    client = BlipqClient(fleet.base, timeout_s=300)
    pending, polls, tick = dict(submitted), 0, time.perf_counter()
    while pending:
        for batch_id, count in list(pending.items()):
            polls += 1
            if client.batch(batch_id)["ended"] >= count:
                del pending[batch_id]
        tick += 1 / POLL_HZ
        time.sleep(max(0.0, tick - time.perf_counter()))
    results = [line for batch_id, _ in submitted for line in client.results(batch_id)]
    seconds = time.perf_counter() - started
    after = probe.read()
    time.sleep(SETTLE_S)
    settled = probe.read()
    for _ in range(POLL_SAMPLES):  # what one read of the summary costs Redis, to take the poller out
        client.batch(submitted[0][0])
    polled = probe.read()
    answers, poll_share = len(results), polls / POLL_SAMPLES / len(results)
    figures = costs(before, after, answers)
    figures["commands_without_poller"] = figures["commands_per_answer"] - poll_share * (
        polled["commands"] - settled["commands"] - 1  # the INFO of the read before
    )
    figures["redis_us_without_poller"] = figures["redis_us_per_answer"] - poll_share * 1e6 * (
        polled["redis_cpu_s"] - settled["redis_cpu_s"]
    )
    return {
        "answers": answers, "seconds": seconds, "failed": sum(line["status"] != "succeeded" for line in results),
        "polls": polls, "requests": len(groups), **figures,
        "bytes_kept_per_answer": (settled["memory"] - before["memory"]) / answers,
        "dataset_bytes_per_answer": (settled["dataset"] - before["dataset"]) / answers,
    }  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500, help="images of mixes 1-2 (default 500)")
    parser.add_argument("--questions", type=int, default=10, help="questions per image in mixes 1-2 (default 10)")
    parser.add_argument("--wide-images", type=int, default=2000, help="images of mixes 3-4, one question each")
    parser.add_argument("--single-jobs", type=int, default=300, help="single jobs from 16 clients (default 300)")
    parser.add_argument("--idle-jobs", type=int, default=50, help="single jobs one at a time (default 50)")
    parser.add_argument("--clients", type=int, default=16, help="threads sending single jobs (default 16)")
    add_photo_options(parser, 100, "mix 6")
    parser.add_argument("--batch-size", type=int, default=32, help="answers per model call, everywhere (default 32)")
    parser.add_argument("--gpu-rate", default="1000,3000,10000", help="answers/s of one GPU worker, comma-separated")
    parser.add_argument("--quick", action="store_true", help="50 images, 200 wide, 60 single jobs, 20 idle, 30 photos")
    parser.add_argument("--smoke", action="store_true", help="4 images x 2 questions, 4 single jobs, 2 small photos")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.images, args.wide_images, args.single_jobs, args.idle_jobs, args.photos = 50, 200, 60, 20, 30
    if args.smoke:
        args.images, args.questions, args.wide_images, args.single_jobs, args.idle_jobs = 4, 2, 4, 4, 2
        args.clients, args.photos, args.photo_mix = 2, 2, "smoke"
    for name in ("images", "questions", "wide_images", "single_jobs", "idle_jobs", "clients", "batch_size"):
        if getattr(args, name) < 1:  # every mix measures a rate: none of them may be empty
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


Mixes = dict[str, dict[str, Any]]


def batch_mixes(args: argparse.Namespace, fleet: Fleet, server: ImageServer, loaded: Any, paths: list[Path]) -> Mixes:
    """Mixes 1-4, each through the core then through the service."""
    questions, mixes, probe = QUESTIONS[: args.questions], {}, Probe(fleet, server)
    for warm_up in ([server.url(path.name) for path in paths[:64]], paths[:64]):  # connections, scripts, imports
        serve_batch(fleet, probe, warm_up, questions[:2])
    plan = [
        (f"1 batch {args.images}x{len(questions)} url", paths[: args.images], questions, True),
        (f"2 batch {args.images}x{len(questions)} upload", paths[: args.images], questions, False),
        (f"3 batch {args.wide_images}x1 upload", paths[: args.wide_images], questions[:1], False),
        (f"4 batch {args.wide_images}x1 url", paths[: args.wide_images], questions[:1], True),
    ]
    for name, images, asked, by_url in plan:
        core_s = core_seconds(loaded, [(path, q) for path in images for q in asked], args.batch_size)
        mix = serve_batch(fleet, probe, [server.url(path.name) for path in images] if by_url else images, asked)
        mix["core_rate"], mix["service_rate"] = len(images) * len(asked) / core_s, mix["answers"] / mix["seconds"]
        mix["ratio"] = mix["service_rate"] / mix["core_rate"]
        mix["machinery_ms_per_answer"] = 1000 * (1 / mix["service_rate"] - 1 / mix["core_rate"])
        mixes[name] = mix
        print(f"{name}: {mix['service_rate']:.1f} answers/s, core {mix['core_rate']:.1f}", flush=True)
    return mixes


def single_jobs(
    args: argparse.Namespace, fleet: Fleet, server: ImageServer, loaded: Any, paths: list[Path]
) -> dict[str, Any]:
    """Mix 5: single jobs from many clients against the core at that batch size; then at idle, one at a time."""
    from contract.images import decode_image
    from worker.inference import answer_questions

    items = [(path, QUESTIONS[index % args.questions]) for index, path in enumerate(paths[: args.single_jobs])]
    core_s = core_seconds(loaded, items, args.clients)
    probe = Probe(fleet, server)
    before = probe.read()
    local = threading.local()

    def ask(index: int) -> None:
        local.client = getattr(local, "client", None) or BlipqClient(fleet.base, timeout_s=60)
        local.client.ask(*items[index], timeout_s=120)

    seconds, _ = run_clients(args.clients, len(items), ask)
    spent = costs(before, probe.read(), len(items))
    idle = items[: args.idle_jobs]
    client = BlipqClient(fleet.base)

    def service_one(index: int) -> None:
        client.ask(*idle[index], timeout_s=60)

    def core_one(index: int) -> None:
        path, question = idle[index]
        answer_questions(loaded, [decode_image(path.read_bytes(), MAX_PIXELS)], [question], MAX_NEW_TOKENS)

    _, service_idle = run_clients(1, len(idle), service_one)
    _, core_idle = run_clients(1, len(idle), core_one)
    jobs = {
        "jobs": len(items), "clients": args.clients, "service_rate": len(items) / seconds,
        "core_rate": len(items) / core_s, "idle_jobs": len(idle), **spent,
        "idle_p50_ms": 1000 * percentile(service_idle, 0.5), "core_p50_ms": 1000 * percentile(core_idle, 0.5),
    }  # fmt: skip
    jobs["ratio"] = jobs["service_rate"] / jobs["core_rate"]
    jobs["added_p50_ms"] = jobs["idle_p50_ms"] - jobs["core_p50_ms"]
    return jobs


def photo_mixes(
    args: argparse.Namespace, fleet: Fleet, server: ImageServer, model_dir: Path, served: Path, metrics_url: str
) -> list[PhotoRun]:
    """Mix 6: camera photos x 1 and x 10 questions, by URL and uploaded, against the feed limit of their bytes."""
    photos = photo_set(args.photo_mix, args.photos)
    print(f"6 photos: {MIXES[args.photo_mix].title}, {describe(photos)}", flush=True)
    linked_dir(served, photos)  # the image server serves them beside the easy-VQA images
    limit = feed.measure(photos, feed.processor_size(model_dir))
    print(limit.describe(), flush=True)
    pids = {"worker": fleet.workers[0].process.pid, "api": fleet.api.pid, "redis": fleet.redis.process.pid,
            "images": server.pid, "client": os.getpid()}  # fmt: skip
    meter, runs = Meter(pids, [metrics_url]), []
    for count in (1, len(PHOTO_QUESTIONS)):
        for by_url in (True, False):
            sources = [server.url(path.name) for path in photos] if by_url else photos
            name = f"6 photos {len(photos)}x{count} {'url' if by_url else 'upload'}"
            runs.append(photo_run(name, meter, fleet.base, sources, PHOTO_QUESTIONS[:count], limit))
    return runs


def report(args: argparse.Namespace, mixes: Mixes, jobs: dict[str, Any]) -> None:
    print(
        f"\ntiny BLIP, max_new_tokens={MAX_NEW_TOKENS}, one worker, batch {args.batch_size}, 1 torch thread"
        f" everywhere, summaries read at {POLL_HZ:g} Hz, this machine ({os.cpu_count()} CPUs)"
    )
    print(
        f"{'mix':<26} {'answers':>7} {'service/s':>9} {'core/s':>8} {'ratio':>6} {'machinery ms/ans':>16} {'failed':>6}"
    )
    for name, mix in mixes.items():
        print(
            f"{name:<26} {mix['answers']:>7} {mix['service_rate']:>9.1f} {mix['core_rate']:>8.1f} {mix['ratio']:>6.2f}"
            f" {mix['machinery_ms_per_answer']:>16.2f} {mix['failed']:>6}"
        )
    print(
        f"5 single jobs, {jobs['clients']} clients: service {jobs['service_rate']:.1f} jobs/s, core at batch"
        f" {jobs['clients']} {jobs['core_rate']:.1f} jobs/s, ratio {jobs['ratio']:.2f}"
    )
    print(
        f"5 idle, one job at a time ({jobs['idle_jobs']}): p50 service {jobs['idle_p50_ms']:.1f} ms, core alone"
        f" {jobs['core_p50_ms']:.1f} ms, added {jobs['added_p50_ms']:.1f} ms"
    )
    print(
        "\nper answer (single jobs: per job)  Redis: commands, main-thread us, answers/s one core carries (each w/o the"
        " poller), bytes kept (dataset only);  CPU ms by process, CPU cores busy"
    )
    for name, mix in [*mixes.items(), ("5 single jobs", jobs)]:
        cpu, nan = mix["cpu_ms_per_answer"], math.nan
        busy = sum(cpu.values()) * mix["service_rate"] / 1000
        print(
            f"{name:<26} {mix['commands_per_answer']:5.1f} ({mix.get('commands_without_poller', nan):4.1f})"
            f" {mix['redis_us_per_answer']:5.0f} ({mix.get('redis_us_without_poller', nan):3.0f})"
            f" {mix['answers_per_s_one_redis_core']:6.0f} ({1e6 / mix.get('redis_us_without_poller', nan):5.0f})"
            f" {mix.get('bytes_kept_per_answer', nan):5.0f} ({mix.get('dataset_bytes_per_answer', nan):4.0f})"
            f"  {' '.join(f'{process} {ms:.2f}' for process, ms in cpu.items())}, {busy:.2f}"
        )
    first = next(iter(mixes.values()))
    top = ", ".join(f"{name} {calls:.1f}x {usec:.1f} us" for name, (calls, usec) in first["top_commands"].items())
    print(f"Redis, mix 1, most usec per answer by command (a script's includes its calls): {top}")
    carried, without = first["answers_per_s_one_redis_core"], 1e6 / first["redis_us_without_poller"]
    feeds = ", ".join(f"{carried / float(r):.1f} ({without / float(r):.1f}) at {r}/s" for r in args.gpu_rate.split(","))
    print(f"GPU workers one Redis core can feed, mix 1 (w/o the poller): {feeds}")


def main() -> int:
    args = parse_args()
    import torch

    from tests.support.tiny_model import build_tiny_vqa_model
    from worker.inference import load_model

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="blipq-machinery-"))
    model_dir = build_tiny_vqa_model(work / "model")
    paths = write_images(work / "images", max(args.images, args.wide_images, args.single_jobs, args.idle_jobs))
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    server = ImageServer(work / "images")
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    env = {
        "BLIPQ_MODEL": str(model_dir), "BLIPQ_DEVICE": "cpu", "BLIPQ_DTYPE": "float32",
        "BLIPQ_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS), "BLIPQ_TORCH_THREADS": "1",
        "BLIPQ_BATCH_MAX_SIZE": str(args.batch_size), "BLIPQ_BATCH_CHUNK_SIZE": str(args.batch_size),
        # A free port: other services may hold the default one on this machine.
        "BLIPQ_METRICS_PORT": str(metrics_port), "BLIPQ_METRICS_ADDR": "127.0.0.1",
        **server.fetch_env(),
    }  # fmt: skip
    fleet = Fleet(1, time_limit_s=300, env=env)
    try:
        wait_until_serving(fleet, (paths[0].read_bytes(), QUESTIONS[0], ""))
        mixes = batch_mixes(args, fleet, server, loaded, paths)
        jobs = single_jobs(args, fleet, server, loaded, paths)
        photos = photo_mixes(args, fleet, server, model_dir, work / "images", metrics_url) if args.photos else []
    finally:
        fleet.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(fleet.data_dir, ignore_errors=True)
    report(args, mixes, jobs)
    if photos:
        print(f"\n6 photos, {MIXES[args.photo_mix].title}")
        print_photo_runs(photos)
    if args.out:
        summary = {
            "settings": {**vars(args), "out": str(args.out)}, "batch_mixes": mixes, "single_jobs": jobs,
            "photos": [run.as_dict() for run in photos],
        }  # fmt: skip
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
