"""`blipq tag` at volume: the command line a user runs to tag many images, side by side with the inference core.

    python -m benchmarks.tag_cli [--images 1000] [--memory-images 10000] [--small-memory-images 1000] [--photos 100]
        [--upload-photos 120] [--only-uploads] [--other-checkout DIR] [--quick] [--smoke] [--out FILE]

In one run on one machine, with the shipped demo model, one worker (BLIPQ_BATCH_MAX_SIZE=32, BLIPQ_TORCH_THREADS=1)
and one torch thread in this process, over the first --images easy-VQA test images (PNG files in a temporary
directory) and two easy-VQA questions ("what color is the shape?", "what shape is in the image?"):
(1) `blipq tag DIR -q Q1 -q Q2 -o OUT.jsonl --url API` as a subprocess against a fleet with the answer cache off
    (BLIPQ_ANSWER_CACHE=off): its own Redis, the API under gunicorn and the worker; timed from the start of the
    command to its exit, the Python start-up included (printed apart: `blipq tag --help`);
(2) the same with `--urls FILE`, the images served by a local HTTP server that the worker fetches from;
(3) the inference core in this process: each image's bytes read, `decode_image`d and `answer_questions` on 32 answers
    at a time (an image's questions together); the ratios (1)/(3) and (2)/(3) (goal >= 0.8);
(4) with the answer cache on (a second fleet): a first run, the same command again into a new OUT (every pair asked
    again, the cache answers), the speed-up first/second (goal >= 3), and a run with a third question into a new OUT
    (the cache answers two of the three) against the first;
(5) Redis memory: `used_memory` (INFO memory) read every 0.2 s during `blipq tag DIR` over --small-memory-images and
    over --memory-images uploaded images (easy-VQA has 1,000 test images: past those, each is re-encoded with one pixel
    changed, so that no two share their bytes), each on a fleet of its own with the cache off; the peak above the idle
    fleet's, peak(large)/peak(small) (goal <= 1.5), what stays after the run (the results, kept for their TTL) and the
    keys `blipq:batch-upload:*` left when the command exited (goal 0: an upload is freed as its items end);
(6) photos, on a fleet of their own (cache off): `blipq tag DIR` and `blipq tag --urls FILE` over --photos of
    --photo-mix (benchmarks/photos.py: camera JPEGs unless told) x 1 and x 10 questions, each against the feed limit
    of the same bytes at the demo model's 64 px (benchmarks/feed.py), with the CPU per image of each process, the
    client's included, and, where the worker exports it, of each of its stages (benchmarks/photo_runs.py);
(7) uploads, `--shrink` against `--no-shrink` (benchmarks/upload_runs.py): `blipq up` (every default) and `blipq tag
    DIR --caption -q Q1 -q Q2` over --upload-photos camera photos (answers/s, bytes sent, the CPU of every process);
    Redis's memory per photo in flight and the append-only file's growth per uploaded GB; `blipq tag DIR -q Q` against
    the feed limit; how the shrunk pixels are best encoded; with --other-checkout DIR, that checkout's `blipq up` and
    `blipq tag` beside, in run 7a. --only-uploads runs 7 alone (5-8 minutes on a shared 2-core machine).
Every run checks the exit status and that OUT has one succeeded line per pair; the service's answers are compared with
the core's, and the CPU each process spent in runs 1-2 is printed. About 2 minutes on a 2-core machine, then runs 6
and 7; --quick (200 images, memory runs of 200 and 2,000, 30 photos, 20 for run 7), a few minutes; --smoke (4 images,
memory runs of 4 and 8, 2 photos of the smoke mix, 2 of the smoke mix uploaded in run 7; the runs with the same
settings on one fleet), every run's path end to end.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from benchmarks import feed, upload_runs
from benchmarks.fleet import Fleet, easy_vqa_image_paths, run_tag, wait_until_serving
from benchmarks.image_server import ImageServer
from benchmarks.photo_runs import (
    PHOTO_QUESTIONS,
    Meter,
    PhotoRun,
    add_photo_options,
    linked_dir,
    photo_service,
    print_photo_runs,
    tag_run,
)
from benchmarks.photos import MIXES, describe, photo_set
from benchmarks.processes import ChildRun, PeakSampler

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = ["what color is the shape?", "what shape is in the image?"]
THIRD_QUESTION = "what shape is present?"  # easy-VQA's third most asked, for the cache's re-run with a new question
EASY_VQA_TEST_IMAGES = 1000
BATCH_SIZE = 32  # answers per model call, in the worker and in the core
MAX_PIXELS = 40_000_000  # the worker's default BLIPQ_MAX_IMAGE_PIXELS
MEMORY_SAMPLE_S = 0.2
UPLOAD_PATTERN = "blipq:batch-upload:*"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images of runs 1-4 (default 1000)")
    parser.add_argument("--memory-images", type=int, default=10_000, help="the large memory run's images (10000)")
    parser.add_argument("--small-memory-images", type=int, default=1000, help="the small memory run's images (1000)")
    add_photo_options(parser, 100, "run 6")
    parser.add_argument("--upload-photos", type=int, default=120, help="camera photos of run 7 (default 120; 0: none)")
    parser.add_argument("--only-uploads", action="store_true", help="run 7 alone")
    parser.add_argument(
        "--other-checkout", type=Path, metavar="DIR", help="run 7a: also this checkout's blipq up and blipq tag"
    )
    parser.add_argument("--quick", action="store_true", help="200 images; memory runs of 200 and 2,000; 30 photos")
    parser.add_argument("--smoke", action="store_true", help="4 images, memory runs of 4 and 8, 2 small photos")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    args = parser.parse_args()
    if args.quick:
        args.images, args.small_memory_images, args.memory_images, args.photos = 200, 200, 2000, 30
        args.upload_photos = 20
    if args.smoke:
        args.images, args.small_memory_images, args.memory_images, args.photos, args.photo_mix = 4, 4, 8, 2, "smoke"
        args.upload_photos = 2
    return args


def write_images(directory: Path, count: int) -> list[Path]:
    """`count` PNG files: easy-VQA's test images as they are, then again re-encoded with one pixel changed per round,
    so that every file's bytes differ (the answer cache and the uploads see distinct images)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    originals = easy_vqa_image_paths(min(count, EASY_VQA_TEST_IMAGES))
    paths = []
    for index in range(count):
        source, round_ = originals[index % len(originals)], index // len(originals)
        path = directory / f"{index:06d}.png"
        if round_ == 0:
            shutil.copyfile(source, path)
        else:
            image = Image.open(source).convert("RGB")
            image.putpixel((0, 0), (round_ % 256, round_ // 256 % 256, 7))
            image.save(path, format="PNG")
        paths.append(path)
    return paths


def warm_up_image() -> bytes:
    """A PNG outside every run's images: the fleet's first job must not fill the answer cache for them."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


class Fleets:
    """Where the runs' fleets come from. By default each run gets one of its own, so that each starts from an idle,
    empty Redis and a new worker; with `keep` (--smoke, whose figures mean nothing), the runs with the same settings
    share one, started for the first of them and stopped by `stop`."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.kept: dict[frozenset[tuple[str, str]], Fleet] = {}

    @contextmanager
    def serving(self, env: dict[str, str]) -> Iterator[Fleet]:
        """A fleet of one worker on the demo model with `env`, serving (its model loaded) for the block."""
        if self.keep:
            key = frozenset(env.items())
            self.kept[key] = self.kept.get(key) or start_serving(env)
            yield self.kept[key]
            return
        fleet = start_serving(env)
        try:
            yield fleet
        finally:
            stop_serving(fleet)

    def stop(self) -> None:
        for fleet in self.kept.values():
            stop_serving(fleet)


def start_serving(env: dict[str, str]) -> Fleet:
    """A fleet of one worker on the demo model with `env`, once it answered a first job (its model loaded)."""
    from worker.settings import DEMO_MODEL_DIR

    fleet = Fleet(
        1,
        time_limit_s=300,
        env={
            "BLIPQ_MODEL": str(DEMO_MODEL_DIR), "BLIPQ_DEVICE": "cpu", "BLIPQ_DTYPE": "float32",
            "BLIPQ_TORCH_THREADS": "1", "BLIPQ_BATCH_MAX_SIZE": str(BATCH_SIZE),
            "BLIPQ_METRICS_PORT": "0",  # other services may hold the default port on this machine
            **env,
        },
    )  # fmt: skip
    try:
        wait_until_serving(fleet, (warm_up_image(), QUESTIONS[0], ""))
    except BaseException:
        stop_serving(fleet)
        raise
    return fleet


def stop_serving(fleet: Fleet) -> None:
    fleet.stop()
    shutil.rmtree(fleet.data_dir, ignore_errors=True)


def with_cpu(fleet: Fleet, server: ImageServer, run: Callable[[], ChildRun]) -> dict[str, Any]:
    """`run`'s seconds and the CPU seconds each process spent meanwhile: on two cores, who took the model's share.
    `blipq tag`'s own is its rusage; the image server's, the API's, the worker's and Redis's, their process trees'."""
    meter = Meter({"image_server": server.pid, "api": fleet.api.pid, "worker": fleet.workers[0].process.pid,
                   "redis": fleet.redis.process.pid})  # fmt: skip
    before = meter.read()
    child = run()
    spent, _ = Meter.spent(before, meter.read())
    return {"seconds": child.seconds, "cpu_s": {"cli": child.cpu_s, **spent}}


def read_out(out: Path) -> dict[tuple[str, str], str]:
    """OUT's answers by (image file name, question); raises unless every line succeeded."""
    answers = {}
    with out.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            if record["status"] != "succeeded":
                raise RuntimeError(f"{out}: a line did not succeed: {line.strip()}")
            answers[(record["image"].rsplit("/", 1)[-1], record["question"])] = record["answer"]
    return answers


def checked(out: Path, images: int, questions: Sequence[str]) -> dict[tuple[str, str], str]:
    answers = read_out(out)
    if len(answers) != images * len(questions):
        raise RuntimeError(f"{out}: {len(answers)} succeeded pairs, expected {images * len(questions)}")
    return answers


def core_run(loaded: Any, paths: Sequence[Path], questions: Sequence[str]) -> tuple[float, dict[tuple[str, str], str]]:
    """The inference core on every (image, question), BATCH_SIZE answers at a time, each image read and decoded once
    per batch; its seconds and answers."""
    from contract.images import decode_image
    from worker.inference import answer_questions

    items = [(path, question) for path in paths for question in questions]
    answers: dict[tuple[str, str], str] = {}
    started = time.perf_counter()
    for first in range(0, len(items), BATCH_SIZE):
        chunk = items[first : first + BATCH_SIZE]
        decoded = {path: decode_image(path.read_bytes(), MAX_PIXELS) for path in dict.fromkeys(p for p, _ in chunk)}
        texts = answer_questions(loaded, [decoded[path] for path, _ in chunk], [q for _, q in chunk])
        answers.update(((path.name, question), text) for (path, question), text in zip(chunk, texts, strict=True))
    return time.perf_counter() - started, answers


def differing(answers: dict[tuple[str, str], str], reference: dict[tuple[str, str], str]) -> int:
    return sum(answers.get(pair) != answer for pair, answer in reference.items())


def cli_start_s() -> float:
    """What `blipq tag --help` takes: the interpreter and the command line's imports, part of every timed run."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "blipq.cli", "tag", "--help"], cwd=REPO, capture_output=True, check=True)
    return time.perf_counter() - started


def upload_keys(client: redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter(UPLOAD_PATTERN, count=1000))


def memory_run(work: Path, name: str, count: int, fleets: Fleets, env: dict[str, str]) -> dict[str, Any]:
    """`blipq tag DIR` over `count` uploaded images on a fleet of its own (`env`: cache off), Redis's memory
    sampled."""
    directory = work / name
    write_images(directory, count)
    with fleets.serving(env) as fleet:
        client = redis.Redis.from_url(fleet.redis.url)
        time.sleep(1.0)  # the warm-up job's writes settle
        idle = int(client.info("memory")["used_memory"])
        sampler = PeakSampler(lambda: int(client.info("memory")["used_memory"]), MEMORY_SAMPLE_S)
        try:
            seconds = run_tag(fleet.base, [str(directory)], QUESTIONS, work / f"{name}.jsonl").seconds
        finally:
            sampler.stop()
        left = upload_keys(client)
        after = int(client.info("memory")["used_memory"])
        keys = int(client.dbsize())
    checked(work / f"{name}.jsonl", count, QUESTIONS)
    print(f"memory run of {count} images: {seconds:.2f} s, peak {sampler.peak / 1e6:.2f} MB", flush=True)
    shutil.rmtree(directory, ignore_errors=True)
    return {
        "images": count, "answers": count * len(QUESTIONS), "seconds": seconds,
        "rate": count * len(QUESTIONS) / seconds, "idle_bytes": idle, "peak_bytes": sampler.peak,
        "peak_above_idle": sampler.peak - idle, "after_bytes": after, "kept_above_idle": after - idle,
        "peak_above_kept": sampler.peak - after, "samples": sampler.samples, "upload_keys_left": left,
        "keys_after": keys,
    }  # fmt: skip


def throughput_runs(
    work: Path, paths: list[Path], loaded: Any, fleets: Fleets, server: ImageServer, env: dict[str, str]
) -> dict[str, Any]:
    """Runs 1-3: `blipq tag DIR`, `blipq tag --urls FILE` from `server` (`env`: cache off) and the core, on the same
    images."""
    directory, count = paths[0].parent, len(paths)
    core_s, core = core_run(loaded, paths, QUESTIONS)
    urls, uploads_out, urls_out = work / "urls.txt", work / "upload.jsonl", work / "url.jsonl"
    urls.write_text("".join(server.url(path.name) + "\n" for path in paths))
    with fleets.serving(env) as fleet:
        upload = with_cpu(fleet, server, lambda: run_tag(fleet.base, [str(directory)], QUESTIONS, uploads_out))
        upload["upload_keys_left"] = upload_keys(redis.Redis.from_url(fleet.redis.url))
        url = with_cpu(fleet, server, lambda: run_tag(fleet.base, [], QUESTIONS, urls_out, urls=urls))
    answers = count * len(QUESTIONS)
    for run, out in ((upload, "upload.jsonl"), (url, "url.jsonl")):
        run["rate"] = answers / run["seconds"]
        run["differing_from_core"] = differing(checked(work / out, count, QUESTIONS), core)
    return {
        "upload": upload, "url": url, "core": {"seconds": core_s, "rate": answers / core_s},
        "ratio_upload_core": core_s / upload["seconds"], "ratio_url_core": core_s / url["seconds"],
    }  # fmt: skip


def cache_runs(work: Path, paths: list[Path], fleets: Fleets) -> dict[str, Any]:
    """Run 4: with the answer cache on, a first run, the same again into a new OUT, then with a third question."""
    directory, count = str(paths[0].parent), len(paths)
    three = [*QUESTIONS, THIRD_QUESTION]
    with fleets.serving({"BLIPQ_ANSWER_CACHE": "on"}) as fleet:
        first_s = run_tag(fleet.base, [directory], QUESTIONS, work / "cache-first.jsonl").seconds
        again_s = run_tag(fleet.base, [directory], QUESTIONS, work / "cache-again.jsonl").seconds
        third_s = run_tag(fleet.base, [directory], three, work / "cache-third.jsonl").seconds
        entries = sum(1 for _ in redis.Redis.from_url(fleet.redis.url).scan_iter("blipq:answer:*", count=1000))
    first = checked(work / "cache-first.jsonl", count, QUESTIONS)
    return {
        "first_s": first_s, "again_s": again_s, "third_question_s": third_s, "speed_up": first_s / again_s,
        "third_vs_first": third_s / first_s, "entries": entries,
        "differing_again_first": differing(checked(work / "cache-again.jsonl", count, QUESTIONS), first),
        "differing_third_first": differing(checked(work / "cache-third.jsonl", count, three), first),
    }  # fmt: skip


def photo_runs(work: Path, mix: str, count: int) -> list[PhotoRun]:
    """Run 6: `blipq tag` over photos, uploaded (DIR) and by URL (--urls FILE), x 1 and x 10 questions."""
    from worker.settings import DEMO_MODEL_DIR

    photos = photo_set(mix, count)
    print(f"6 photos: {MIXES[mix].title}, {describe(photos)}", flush=True)
    env = {"BLIPQ_ANSWER_CACHE": "off", "BLIPQ_TORCH_THREADS": "1", "BLIPQ_BATCH_MAX_SIZE": str(BATCH_SIZE)}
    directory, urls = linked_dir(work / "photos", photos), work / "photo-urls.txt"
    runs: list[PhotoRun] = []
    with photo_service(env, photos[0].parent, photos[0]) as service:
        urls.write_text("".join(url + "\n" for url in service.urls(photos)))
        limit = feed.measure(photos, feed.processor_size(DEMO_MODEL_DIR))
        print(limit.describe(), flush=True)
        for asked in (PHOTO_QUESTIONS[:1], PHOTO_QUESTIONS):
            for via, listed in (("DIR", None), ("--urls FILE", urls)):
                name, out = f"6 blipq tag {via}, {len(photos)}x{len(asked)}", work / f"photos-{len(runs)}.jsonl"
                base = service.fleet.base
                runs.append(tag_run(name, service.meter, base, directory, asked, out, limit, urls=listed))
    return runs


def report(args: argparse.Namespace, start_s: float, runs: dict[str, Any], cache: dict[str, Any], memory: Any) -> None:
    count, answers = args.images, args.images * len(QUESTIONS)
    upload, url, core = runs["upload"], runs["url"], runs["core"]
    print(
        f"\n{answers} answers ({count} easy-VQA test images x {len(QUESTIONS)} questions), demo model, one worker,"
        f" batch {BATCH_SIZE}, 1 torch thread everywhere, this machine ({os.cpu_count()} CPUs)"
    )
    print(f"`blipq tag --help` (interpreter and imports, in every run below)  {start_s:7.2f} s")
    print(f"{'run':<52} {'seconds':>8} {'answers/s':>10}")
    print(f"{'1 blipq tag DIR (uploads), cache off':<52} {upload['seconds']:8.2f} {upload['rate']:10.1f}")
    print(f"{'2 blipq tag --urls FILE, cache off':<52} {url['seconds']:8.2f} {url['rate']:10.1f}")
    print(f"{'3 inference core in process, decode included':<52} {core['seconds']:8.2f} {core['rate']:10.1f}")
    print(f"ratio (1)/(3) {runs['ratio_upload_core']:5.2f}   (goal >= 0.8)")
    print(f"ratio (2)/(3) {runs['ratio_url_core']:5.2f}   (goal >= 0.8)")
    print(
        f"answers differing from the core: uploads {upload['differing_from_core']}, URLs {url['differing_from_core']}"
        f" of {answers}; {UPLOAD_PATTERN} keys after run 1: {upload['upload_keys_left']}"
    )
    print("CPU seconds by process during runs 1 and 2 (cores busy: their sum / the run's seconds)")
    for label, run in (("1 uploads", upload), ("2 URLs", url)):
        spent = run["cpu_s"]
        busy = sum(spent.values()) / run["seconds"]
        print(f"  {label:<10} {', '.join(f'{name} {cpu:.2f}' for name, cpu in spent.items())}; cores busy {busy:.2f}")
    print("\n4 answer cache on")
    print(f"{'first run':<52} {cache['first_s']:8.2f} {answers / cache['first_s']:10.1f}")
    print(
        f"{'same command, new OUT (the cache answers)':<52} {cache['again_s']:8.2f} {answers / cache['again_s']:10.1f}"
    )
    third = count * (len(QUESTIONS) + 1)
    print(
        f"{'with a third question, new OUT':<52} {cache['third_question_s']:8.2f}"
        f" {third / cache['third_question_s']:10.1f}"
    )
    print(f"speed-up first / again {cache['speed_up']:5.2f}x   (goal >= 3x)")
    print(f"third-question run / first run {cache['third_vs_first']:5.2f}   (one new answer per image against two)")
    print(
        f"answers differing from the first run: again {cache['differing_again_first']}, third-question run"
        f" {cache['differing_third_first']}; cache entries {cache['entries']}"
    )
    small, large = memory["small"], memory["large"]
    print("\n5 Redis used_memory during blipq tag DIR (uploads, cache off, a fresh fleet each)")
    header = ("images", "seconds", "answers/s", "idle MB", "peak MB", "peak-idle", "kept-idle", "peak-kept",
              "uploads left")  # fmt: skip
    widths = (7, 8, 10, 8, 8, 10, 10, 10, 12)
    print(" ".join(f"{name:>{width}}" for name, width in zip(header, widths, strict=True)))
    for run in (small, large):
        print(
            f"{run['images']:>7} {run['seconds']:>8.2f} {run['rate']:>10.1f} {run['idle_bytes'] / 1e6:>8.2f}"
            f" {run['peak_bytes'] / 1e6:>8.2f} {run['peak_above_idle'] / 1e6:>10.2f}"
            f" {run['kept_above_idle'] / 1e6:>10.2f} {run['peak_above_kept'] / 1e6:>10.2f}"
            f" {run['upload_keys_left']:>12}"
        )
    print(f"peak(large)/peak(small) {memory['peak_ratio']:5.2f}   (goal <= 1.5)")
    print(
        f"above idle: peak(large)/peak(small) {memory['peak_above_idle_ratio']:5.2f}; kept-idle: what stays after the"
        " run (results until their TTL); peak-kept: the run's transient (uploads and work in flight)"
    )


def uploads_only(args: argparse.Namespace) -> int:
    """Run 7 alone."""
    photos = photo_set("smoke" if args.smoke else "camera", args.upload_photos)
    print(f"7 uploads: {MIXES['camera'].title}, {describe(photos)}", flush=True)
    figures = upload_runs.uploads_run(Path(tempfile.mkdtemp(prefix="blipq-uploads-")), photos, photos,
                                      args.other_checkout)  # fmt: skip
    summary = upload_runs.report(figures)
    if args.out:
        args.out.write_text(json.dumps({"settings": {**vars(args), "out": str(args.out),
                                                     "other_checkout": str(args.other_checkout)},
                                        "uploads": summary}, indent=2) + "\n")  # fmt: skip
    return 0


def main() -> int:
    args = parse_args()
    if args.only_uploads:
        return uploads_only(args)
    import torch

    from worker.inference import load_model
    from worker.settings import DEMO_MODEL_DIR

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="blipq-tag-cli-"))
    paths = write_images(work / "images", args.images)
    server = ImageServer(paths[0].parent)  # runs 1-3's URLs
    cache_off = {"BLIPQ_ANSWER_CACHE": "off", **server.fetch_env()}
    fleets = Fleets(keep=args.smoke)
    try:
        loaded = load_model(str(DEMO_MODEL_DIR), device="cpu", dtype="float32")
        core_run(loaded, paths[:16], QUESTIONS)  # first calls allocate; the worker is warmed by its first job too
        start_s = cli_start_s()
        runs = throughput_runs(work, paths, loaded, fleets, server, cache_off)
        print(f"runs 1-3: uploads {runs['upload']['rate']:.1f}, URLs {runs['url']['rate']:.1f}, core"
              f" {runs['core']['rate']:.1f} answers/s", flush=True)  # fmt: skip
        cache = cache_runs(work, paths, fleets)
        print(f"run 4: first {cache['first_s']:.2f} s, again {cache['again_s']:.2f} s", flush=True)
        memory: dict[str, Any] = {
            "small": memory_run(work, "memory-small", args.small_memory_images, fleets, cache_off),
            "large": memory_run(work, "memory-large", args.memory_images, fleets, cache_off),
        }
        photos = photo_runs(work, args.photo_mix, args.photos) if args.photos else []
        uploads = None
        if args.upload_photos:
            upload_photos = photo_set("smoke" if args.smoke else "camera", args.upload_photos)
            uploads = upload_runs.uploads_run(work / "uploads", upload_photos, upload_photos, args.other_checkout)
    finally:
        fleets.stop()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    memory["peak_ratio"] = memory["large"]["peak_bytes"] / memory["small"]["peak_bytes"]
    memory["peak_above_idle_ratio"] = memory["large"]["peak_above_idle"] / max(1, memory["small"]["peak_above_idle"])
    report(args, start_s, runs, cache, memory)
    if photos:
        print(f"\n6 blipq tag over {MIXES[args.photo_mix].title}, demo model, cache off, one worker, batch 32")
        print_photo_runs(photos)
    upload_summary = upload_runs.report(uploads) if uploads else None
    if args.out:
        summary = {
            "settings": {**vars(args), "out": str(args.out), "questions": QUESTIONS, "batch_size": BATCH_SIZE,
                         "other_checkout": str(args.other_checkout)},
            "cli_start_s": start_s, "throughput": runs, "cache": cache, "memory": memory,
            "photos": [run.as_dict() for run in photos], "uploads": upload_summary,
        }  # fmt: skip
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
