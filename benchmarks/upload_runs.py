"""Uploads: what `blipq tag` sends of camera photos and what it costs the service, `--shrink` (blipq/shrink.py) and
`--no-shrink` side by side; run 7 of benchmarks/tag_cli.py.

a. `blipq up` as a user starts it (Redis with its append-only file, the API, a VQA and a captioning worker on the demo
   models at 64 px, every default, the answer cache on; the workers' records refreshed every 30 s, so that they outlive
   the stop of run b), and `blipq tag DIR --caption -q Q1 -q Q2` over two halves of the photos in two rounds, each half
   once in each mode (`--no-shrink` A, `--shrink` B, then `--shrink` A, `--no-shrink` B): no photo is asked twice in one
   mode, so the cache never answers. Per mode, over both rounds: answers/s (captions count), the CPU per photo of each
   process (the client's included), the picture bytes sent (each file's size, or its shrunk PNG's as blipq/shrink.py
   makes it in this process, which is what the client sends) and Redis's network input per photo (INFO stats);
   with `other` (another checkout of blipq), its own `blipq up` and `blipq tag`, beside, on the same halves;
b. on the same service, its workers stopped (SIGSTOP): the photos submitted as `blipq tag --caption -q Q1 -q Q2`
   submits them (BlipqClient.submit_batch, MEMORY_GROUP photos a batch), in each mode, all in flight at once: Redis
   `used_memory` per photo held, the uploads' bytes stored per photo (their keys' STRLEN), and the append-only file's
   growth (`aof_current_size`, its automatic rewrite held off meanwhile) per uploaded GB and per GB of photos; then the
   workers let go and the batches deleted once ended;
c. one worker (benchmarks/fleet.py, the demo model, the cache off) and `blipq tag DIR -q Q` over the photos, the two
   modes twice each in alternating order, each against the feed limit of the same bytes (benchmarks/feed.py; goal >=
   0.8);
d. how the shrunk pixels are best sent, in this process: ENCODING_PHOTOS photos shrunk to the demo models' 64 px and
   to BLIP-base's 384 px, then written in each lossless way the service accepts (ENCODINGS: PNG at zlib levels and
   strategies, BMP, TIFF, lossless WebP): the bytes, the CPU to write them, the CPU a worker spends to read them back
   (decode_for_model), each the least of ENCODING_REPEATS passes, and that the pixels come back the same.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from benchmarks import feed
from benchmarks.fleet import REPO
from benchmarks.photo_intake import Up, up_processes, wait_until_ready
from benchmarks.photo_runs import PHOTO_QUESTIONS, Meter, PhotoRun, linked_dir, photo_service, tag_run
from benchmarks.processes import tree
from blipq.client import BlipqClient
from blipq.shrink import PNG_OPTIONS, ShrinkTarget, shrink

MODES = ("--no-shrink", "--shrink")
ENCODING_PHOTOS = 30
ENCODING_REPEATS = 3
ENCODING_SIZES = (64, 384)  # the demo models' input, BLIP-base's
# Lossless ways to send pixels that the service accepts: (format, Pillow's options); the first is blipq/shrink.py's.
ENCODINGS: list[tuple[str, dict[str, Any]]] = [
    ("PNG", PNG_OPTIONS),
    ("PNG", {"compress_level": 1}),
    ("PNG", {"compress_level": 6}),
    ("PNG", {"compress_level": 9}),
    ("BMP", {}),
    ("TIFF", {}),
    ("TIFF", {"compression": "tiff_deflate"}),
    ("WEBP", {"lossless": True, "method": 0, "quality": 0}),
    ("WEBP", {"lossless": True, "method": 4, "quality": 50}),
]
UP_QUESTIONS = PHOTO_QUESTIONS[:2]
UP_ENV = {"BLIPQ_ANNOUNCE_INTERVAL_S": "30"}  # a stopped worker's record outlives run b (3 intervals)
MEMORY_GROUP = 20  # photos per batch in run b
# Before Redis's memory and file size are read: Redis gives back an idle client's grown query buffer after 2 s, which a
# shorter wait would count against the photos held.
SETTLE_S = 3.0
ENDED_TIMEOUT_S = 600


@dataclass
class UploadRun:
    """One `blipq tag` run of run a: the photo run, and what it sent."""

    mode: str  # --shrink, --no-shrink, or `other`
    run: PhotoRun
    photo_bytes: int  # the photos' files
    sent_bytes: int  # the picture bytes the client sent (0 where not known: another checkout)
    redis_input_bytes: int  # Redis's network input during the run

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "run": self.run.as_dict(), "photo_bytes": self.photo_bytes,
                "sent_bytes": self.sent_bytes, "redis_input_bytes": self.redis_input_bytes}  # fmt: skip


def redis_url_of(work: Path) -> str:
    """The URL of the Redis that `blipq up` started in `work`, as its log says it (`blipq: redis on URL (...)`)."""
    said = re.search(r"redis on (redis://\S+)", (work / "up.log").read_text(errors="replace"))
    if said is None:
        raise RuntimeError(f"blipq up did not say where its Redis is: see {work / 'up.log'}")
    return said[1]


def net_input(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_input_bytes"])


def shrunk_bytes(base: str, photos: Sequence[Path], tasks: list[str]) -> int:
    """What the client sends of `photos` with --shrink: their shrunk PNGs' bytes (or a file's own, when smaller)."""
    target = ShrinkTarget.published(BlipqClient(base).models(), tasks)
    if target is None:
        raise RuntimeError("the service's workers publish no shrink target: --shrink would send the files")
    return sum(len(shrink(path.read_bytes(), target)) for path in photos)


@contextmanager
def serving_up(work: Path, checkout: Path | None = None) -> Iterator[tuple[Up, Meter, redis.Redis]]:
    """`blipq up` (of `checkout`, or this one) once ready: it, a Meter of its processes, a client of its Redis."""
    work.mkdir(parents=True, exist_ok=True)
    up = Up.start(work, checkout or REPO, UP_ENV)
    try:
        wait_until_ready(up.base, up.process)
        urls = [f"http://127.0.0.1:{up.metrics_port + i}/metrics" for i in range(2)]
        yield up, Meter(up_processes(up.process.pid), urls), redis.Redis.from_url(redis_url_of(work))
    finally:
        up.stop()


def up_runs(work: Path, photos: list[Path], other: Path | None) -> tuple[list[UploadRun], dict[str, Any]]:
    """Runs a and b: `blipq up`, tag --caption -q Q1 -q Q2 in each mode (and `other`'s), then the memory run."""
    from worker.settings import DEMO_MODEL_DIR

    halves = (photos[: len(photos) // 2], photos[len(photos) // 2 :])
    limit = feed.measure(photos, feed.processor_size(DEMO_MODEL_DIR))
    print(limit.describe(), flush=True)
    plan = [("--no-shrink", 0), ("--shrink", 1), ("other", 0), ("--shrink", 0), ("--no-shrink", 1), ("other", 1)]
    runs: list[UploadRun] = []
    with serving_up(work / "up") as ours, other_up(work, other) as beside:
        for mode, half in plan:
            service = beside if mode == "other" else ours
            if service is None:
                continue
            up, meter, client = service
            number = len(runs)
            directory = linked_dir(work / f"up-{number}", halves[half])
            name, out = f"7a {mode} tag --caption -q -q, half {'AB'[half]}", work / f"up-{number}.jsonl"
            before = net_input(client)
            options, checkout = ([], other or REPO) if mode == "other" else ([mode], REPO)
            run = tag_run(name, meter, up.base, directory, UP_QUESTIONS, out, limit, caption=True, options=options,
                          checkout=checkout)  # fmt: skip
            received = net_input(client) - before
            photo_bytes = sum(path.stat().st_size for path in halves[half])
            sent = {"--no-shrink": photo_bytes, "other": 0}.get(mode)
            if sent is None:
                sent = shrunk_bytes(up.base, halves[half], ["vqa", "caption"])
            runs.append(UploadRun(mode, run, photo_bytes, sent, received))
        up, _, client = ours
        memory = {mode: memory_run(up, client, photos, mode == "--shrink") for mode in reversed(MODES)}
    return runs, memory


@contextmanager
def other_up(work: Path, other: Path | None) -> Iterator[tuple[Up, Meter, redis.Redis] | None]:
    if other is None:
        yield None
        return
    with serving_up(work / "other", other) as beside:
        yield beside


def signal_workers(up: Up, sig: int) -> None:
    """Send `sig` to every process of `blipq up`'s two workers."""
    roles = up_processes(up.process.pid)
    for role in ("worker", "captioner"):
        for process in tree(roles[role]):
            os.kill(process.pid, sig)


def memory_run(up: Up, client: redis.Redis, photos: list[Path], shrinking: bool) -> dict[str, Any]:
    """Run b, one mode: the photos submitted while the workers are stopped; Redis's memory and file per photo."""
    rewrite = client.config_get("auto-aof-rewrite-percentage")["auto-aof-rewrite-percentage"]
    client.config_set("auto-aof-rewrite-percentage", 0)  # the file grows by what is appended, and no rewrite
    try:
        time.sleep(SETTLE_S)
        idle_memory, idle_aof = int(client.info("memory")["used_memory"]), aof_size(client)
        blipq = BlipqClient(up.base, shrink=shrinking, timeout_s=300)
        signal_workers(up, signal.SIGSTOP)
        try:
            batches = [
                blipq.submit_batch(photos[first : first + MEMORY_GROUP], UP_QUESTIONS, caption=True)[0]
                for first in range(0, len(photos), MEMORY_GROUP)
            ]
            time.sleep(SETTLE_S)
            held_memory, held_aof = int(client.info("memory")["used_memory"]), aof_size(client)
            stored = sum(int(client.strlen(key)) for key in client.scan_iter("blipq:batch-upload:*", count=1000))
        finally:
            signal_workers(up, signal.SIGCONT)
        for batch_id in batches:
            blipq.wait_batch(batch_id, timeout_s=ENDED_TIMEOUT_S)
            blipq.delete_batch(batch_id)
    finally:
        client.config_set("auto-aof-rewrite-percentage", rewrite)
    photo_bytes = sum(path.stat().st_size for path in photos)
    figures = {
        "photos": len(photos), "photo_bytes": photo_bytes, "stored_upload_bytes": stored,
        "redis_bytes_per_photo_held": (held_memory - idle_memory) / len(photos),
        "upload_bytes_per_photo": stored / len(photos),
        "aof_bytes_per_photo": (held_aof - idle_aof) / len(photos),
        "aof_growth_per_uploaded_gb": (held_aof - idle_aof) / stored * 1e9,
        "aof_growth_per_photo_gb": (held_aof - idle_aof) / photo_bytes * 1e9,
    }  # fmt: skip
    print(f"7b {'--shrink' if shrinking else '--no-shrink'}: Redis"
          f" {figures['redis_bytes_per_photo_held'] / 1e3:.1f} kB per photo held", flush=True)  # fmt: skip
    return figures


def aof_size(client: redis.Redis) -> int:
    return int(client.info("persistence")["aof_current_size"])


def feed_runs(work: Path, photos: list[Path]) -> list[tuple[str, PhotoRun]]:
    """Run c: one worker, `blipq tag DIR -q Q` in each mode, twice each in alternating order, against the feed limit."""
    from worker.settings import DEMO_MODEL_DIR

    env = {"BLIPQ_ANSWER_CACHE": "off", "BLIPQ_TORCH_THREADS": "1"}
    directory = linked_dir(work / "feed-photos", photos)
    runs: list[tuple[str, PhotoRun]] = []
    with photo_service(env, photos[0].parent, photos[0]) as service:
        limit = feed.measure(photos, feed.processor_size(DEMO_MODEL_DIR))
        print(limit.describe(), flush=True)
        for mode in (*MODES, *reversed(MODES)):
            name, out = f"7c {mode} tag DIR -q Q, {len(photos)}x1", work / f"feed-{len(runs)}.jsonl"
            run = tag_run(name, service.meter, service.fleet.base, directory, UP_QUESTIONS[:1], out, limit,
                          options=[mode])  # fmt: skip
            runs.append((mode, run))
    return runs


def encoding_runs(photos: list[Path]) -> list[dict[str, Any]]:
    """Run d: each way of sending shrunk pixels, at each size: kB, ms to write, ms to read back, pixels kept."""
    import io

    import numpy as np
    from PIL import Image

    from contract.images import decode_for_model

    rows = []
    datas = [path.read_bytes() for path in photos[:ENCODING_PHOTOS]]
    for side in ENCODING_SIZES:
        size = (side, side)
        pixels = [decode_for_model(data, size, Image.Resampling.BICUBIC, 1 << 62) for data in datas]
        pictures = [Image.fromarray(each) for each in pixels]
        for fmt, options in ENCODINGS:
            write_s, read_s = [], []
            for _ in range(ENCODING_REPEATS):
                started, written = time.process_time(), []
                for picture in pictures:
                    buffer = io.BytesIO()
                    picture.save(buffer, format=fmt, **options)
                    written.append(buffer.getvalue())
                write_s.append(time.process_time() - started)
                started = time.process_time()
                back = [decode_for_model(data, size, Image.Resampling.BICUBIC, 1 << 62) for data in written]
                read_s.append(time.process_time() - started)
            rows.append({
                "size": side, "format": fmt, "options": dict(options),
                "kb": sum(map(len, written)) / len(written) / 1e3, "raw_kb": side * side * 3 / 1e3,
                "write_ms": 1000 * min(write_s) / len(pictures), "read_ms": 1000 * min(read_s) / len(pictures),
                "same": all(np.array_equal(a, b) for a, b in zip(pixels, back, strict=True)),
            })  # fmt: skip
    return rows


def uploads_run(work: Path, photos: list[Path], feed_photos: list[Path], other: Path | None) -> dict[str, Any]:
    """Run 7 (a, b, c, d), in `work` (emptied after)."""
    try:
        runs, memory = up_runs(work, photos, other)
        fed = feed_runs(work, feed_photos) if feed_photos else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"up": runs, "memory": memory, "feed": fed, "encodings": encoding_runs(photos)}


def summed(runs: Sequence[UploadRun], mode: str) -> dict[str, float]:
    """A mode's figures over its runs: photos, answers, seconds, bytes, CPU by process."""
    chosen = [run for run in runs if run.mode == mode]
    photos = sum(run.run.images for run in chosen)
    cpu: dict[str, float] = {}
    for run in chosen:
        for name, seconds in run.run.cpu_s.items():
            cpu[name] = cpu.get(name, 0.0) + seconds
    return {
        "runs": len(chosen), "photos": photos, "answers": sum(run.run.answers for run in chosen),
        "seconds": sum(run.run.seconds for run in chosen), "photo_bytes": sum(run.photo_bytes for run in chosen),
        "sent_bytes": sum(run.sent_bytes for run in chosen),
        "redis_input_bytes": sum(run.redis_input_bytes for run in chosen),
        **{f"cpu_ms_per_photo_{name}": 1000 * seconds / photos for name, seconds in cpu.items()},
        "failed": sum(run.run.failed for run in chosen),
    }  # fmt: skip


def report(figures: dict[str, Any]) -> dict[str, Any]:
    """Print run 7's tables; its summary, for the JSON file."""
    runs: list[UploadRun] = figures["up"]
    modes = [mode for mode in (*MODES, "other") if any(run.mode == mode for run in runs)]
    totals = {mode: summed(runs, mode) for mode in modes}
    print("\n7a blipq up (every default, cache on) + blipq tag DIR --caption -q Q1 -q Q2, camera photos, both halves")
    print(f"  {'mode':<12} {'photos':>6} {'answers':>7} {'seconds':>8} {'answers/s':>9} {'MB photos':>9}"
          f" {'kB sent/photo':>13} {'kB Redis in/photo':>17} {'failed':>6}")  # fmt: skip
    for mode, total in totals.items():
        sent = f"{total['sent_bytes'] / total['photos'] / 1e3:.1f}" if total["sent_bytes"] else "n/a"
        print(f"  {mode:<12} {total['photos']:>6} {total['answers']:>7} {total['seconds']:>8.1f}"
              f" {total['answers'] / total['seconds']:>9.2f} {total['photo_bytes'] / 1e6:>9.1f} {sent:>13}"
              f" {total['redis_input_bytes'] / total['photos'] / 1e3:>17.1f} {total['failed']:>6}")  # fmt: skip
    names = sorted({key.removeprefix("cpu_ms_per_photo_") for total in totals.values() for key in total
                    if key.startswith("cpu_ms_per_photo_")})  # fmt: skip
    print(f"  CPU ms per photo: {'mode':<12} " + " ".join(f"{name:>9}" for name in names) + f" {'all':>8}")
    for mode, total in totals.items():
        cells = [total.get(f"cpu_ms_per_photo_{name}", 0.0) for name in names]
        print(f"                    {mode:<12} " + " ".join(f"{cell:>9.1f}" for cell in cells) + f" {sum(cells):>8.1f}")
    rate = {mode: total["answers"] / total["seconds"] for mode, total in totals.items()}
    print(f"  answers/s --shrink / --no-shrink {rate['--shrink'] / rate['--no-shrink']:.2f}x" + (
        f"; --shrink / other {rate['--shrink'] / rate['other']:.2f}x, --no-shrink / other"
        f" {rate['--no-shrink'] / rate['other']:.2f}x" if "other" in rate else ""))  # fmt: skip
    print("  runs in order: " + "; ".join(
        f"{run.mode} {run.run.answer_rate:.2f}/s (load {run.run.load:.1f})" for run in runs))  # fmt: skip
    memory = figures["memory"]
    print("\n7b the same photos in flight at once, workers stopped (tag --caption -q Q1 -q Q2's batches)")
    print(f"  {'mode':<12} {'photos':>6} {'kB upload/photo':>15} {'kB Redis/photo':>14} {'kB AOF/photo':>12}"
          f" {'AOF GB/uploaded GB':>18} {'AOF GB/photo GB':>15}")  # fmt: skip
    for mode, held in memory.items():
        per_gb = f"{held['aof_growth_per_uploaded_gb'] / 1e9:>18.3f} {held['aof_growth_per_photo_gb'] / 1e9:>15.3f}"
        kilobytes = (held["upload_bytes_per_photo"], held["redis_bytes_per_photo_held"], held["aof_bytes_per_photo"])
        cells = " ".join(f"{value / 1e3:>{width}.1f}" for value, width in zip(kilobytes, (15, 14, 12), strict=True))
        print(f"  {mode:<12} {held['photos']:>6} {cells} {per_gb}")
    fed: list[tuple[str, PhotoRun]] = figures["feed"]
    if fed:
        print(f"\n7c one worker, blipq tag DIR -q Q: {fed[0][1].feed.describe()}")
        for mode in MODES:
            chosen = [run for run_mode, run in fed if run_mode == mode]
            images, seconds = sum(run.images for run in chosen), sum(run.seconds for run in chosen)
            cpu = sum(sum(run.cpu_s.values()) for run in chosen) / images
            print(f"  {mode:<12} {images / seconds:6.2f} images/s, / feed {images / seconds / chosen[0].feed.rate:.2f}"
                  f" (runs: {', '.join(f'{run.ratio:.2f}' for run in chosen)}); CPU {1000 * cpu:.1f} ms per image,"
                  f" x feed {cpu / (chosen[0].feed.cpu_ms_per_image / 1000):.2f}")  # fmt: skip
    print(f"\n7d shrunk pixels of {ENCODING_PHOTOS} photos, each way of sending them (least CPU of"
          f" {ENCODING_REPEATS} passes)")  # fmt: skip
    print(f"  {'size':>4} {'format':<6} {'options':<52} {'kB':>7} {'/ raw':>6} {'write ms':>8} {'read ms':>7} same")
    for row in figures["encodings"]:
        costs = f"{row['write_ms']:>8.2f} {row['read_ms']:>7.2f} {row['same']}"
        print(f"  {row['size']:>4} {row['format']:<6} {row['options']!s:<52} {row['kb']:>7.1f}"
              f" {row['kb'] / row['raw_kb']:>6.2f} {costs}")  # fmt: skip
    return {
        "up": [run.as_dict() for run in runs], "up_totals": totals, "memory": memory,
        "feed": [{"mode": mode, **run.as_dict()} for mode, run in fed], "encodings": figures["encodings"],
    }  # fmt: skip
