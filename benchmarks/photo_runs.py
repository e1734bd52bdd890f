"""The photo figures every throughput benchmark prints, in one shape.

For each photo mix: the service's images/s and answers/s, the feed limit of the same bytes measured in the same run
(benchmarks/feed.py), service / feed limit, the CPU milliseconds per image of each process (worker, API, Redis, the
image server as `images`, the client) and, when the worker exports the counter STAGE_COUNTER, the worker's CPU per
image by stage (`n/a` while it does not); and the machine's load average as each run ended, which says whether
others' work shared the cores. On shared cores the rates fall, but CPU per image holds: `x feed`, all the run's
processes' CPU per image over the feed limit's, says how far the service is from the feed limit whoever else runs.

Also how photos are sent: requests of at most MAX_BATCH_ANSWERS answers and, for uploads, MAX_REQUEST_BYTES, all
submitted at once, their summaries read at POLL_HZ until every item ended; and the service that runs them
(photo_service: one worker, the image server, a Meter).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.feed import FeedLimit
from benchmarks.fleet import REPO, Fleet, run_tag, wait_until_serving
from benchmarks.image_server import ImageServer
from benchmarks.photos import MIXES
from benchmarks.processes import tree_cpu_s
from blipq.up_redis import free_port
from contract.batches import MAX_BATCH_ANSWERS

STAGE_COUNTER = "blipq_worker_stage_cpu_seconds"  # `_total` in the exposition; label `stage`
STAGES = ("fetch", "decode", "resize", "model", "bookkeeping")
MAX_REQUEST_BYTES = 128 * 1024 * 1024  # uploaded bytes per request, half the API's default 256 MiB body limit
POLL_HZ = 10.0  # a dashboard's reads of each request's summary
PROCESSES = ("worker", "captioner", "api", "redis", "images", "client")  # the CPU columns' order (images: the server)
# What a tagger asks of every photo: 1 or all 10 of these.
PHOTO_QUESTIONS = [
    "what is in the picture?", "is there a person?", "is it outdoors?", "what color is it?", "is there an animal?",
    "is it daytime?", "how many people are there?", "is there text?", "what room is this?", "is there a vehicle?",
]  # fmt: skip


def add_photo_options(parser: argparse.ArgumentParser, count: int, runs: str) -> None:
    """--photos (how many) and --photo-mix (which, benchmarks/photos.py's MIXES), the same in every benchmark."""
    parser.add_argument("--photos", type=int, default=count, help=f"photos of {runs} (default {count}; 0: none)")
    parser.add_argument("--photo-mix", choices=sorted(MIXES), default="camera", help="which photos (default camera)")


def worker_stages(metrics_urls: Sequence[str]) -> dict[str, float] | None:
    """The workers' CPU seconds so far by stage, summed over their /metrics; None unless every one of them exports
    STAGE_COUNTER."""
    total: dict[str, float] = {}
    for url in metrics_urls:
        try:
            text = requests.get(url, timeout=5).text
        except requests.RequestException:
            return None
        families = [family for family in text_string_to_metric_families(text) if family.name == STAGE_COUNTER]
        if not families:
            return None
        for sample in families[0].samples:
            if sample.name == f"{STAGE_COUNTER}_total":
                total[sample.labels["stage"]] = total.get(sample.labels["stage"], 0.0) + sample.value
    return total if metrics_urls else None


@dataclass(frozen=True)
class Reading:
    """What a run's processes had spent at one moment: CPU seconds by process, the worker's by stage (or None)."""

    cpu_s: dict[str, float]
    stages: dict[str, float] | None


class Meter:
    """Reads the CPU seconds of named process trees (a pid each; this process's pid: its own threads alone) and the
    workers' stage counters at `metrics_urls` (their /metrics)."""

    def __init__(self, pids: Mapping[str, int], metrics_urls: Sequence[str] = ()) -> None:
        self.pids = dict(pids)
        self.metrics_urls = list(metrics_urls)

    def read(self) -> Reading:
        return Reading({name: tree_cpu_s(pid) for name, pid in self.pids.items()}, worker_stages(self.metrics_urls))

    @staticmethod
    def spent(before: Reading, after: Reading) -> tuple[dict[str, float], dict[str, float] | None]:
        """CPU seconds by process, and by worker stage (None unless both readings have stages), between two reads."""
        cpu = {name: after.cpu_s[name] - before.cpu_s.get(name, 0.0) for name in after.cpu_s}
        if before.stages is None or after.stages is None:
            return cpu, None
        return cpu, {stage: value - before.stages.get(stage, 0.0) for stage, value in after.stages.items()}


@dataclass
class PhotoRun:
    """One photo mix through the service, with the feed limit of the same pictures."""

    name: str
    images: int
    answers: int
    seconds: float
    feed: FeedLimit
    cpu_s: dict[str, float] = field(default_factory=dict)
    stage_cpu_s: dict[str, float] | None = None
    failed: int = 0
    # The machine's 1-minute load average as the run ended: above the core count, others' work shared the cores.
    load: float = field(default_factory=lambda: os.getloadavg()[0])

    @property
    def image_rate(self) -> float:
        return self.images / self.seconds

    @property
    def answer_rate(self) -> float:
        return self.answers / self.seconds

    @property
    def cpu_over_feed(self) -> float:
        """The CPU per image all the run's processes spent over the feed limit's: what the service would reach of the
        feed limit with every core its own and busy is 1 / this, whoever else shared the cores."""
        return sum(self.cpu_s.values()) / self.images / (self.feed.cpu_ms_per_image / 1000)

    @property
    def ratio(self) -> float:
        """Service images/s over the feed limit: the share of the machine's decoding the service turns into answers."""
        return self.image_rate / self.feed.rate

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "images": self.images, "answers": self.answers, "seconds": self.seconds,
            "images_per_s": self.image_rate, "answers_per_s": self.answer_rate, "feed": self.feed.as_dict(),
            "service_over_feed": self.ratio, "cpu_over_feed": self.cpu_over_feed,
            "cpu_s": self.cpu_s, "stage_cpu_s": self.stage_cpu_s,
            "failed": self.failed, "load_average": self.load,
        }  # fmt: skip


def print_photo_runs(runs: Sequence[PhotoRun]) -> None:
    """The rates table, then the CPU table, of photo runs."""
    feeds = list(dict.fromkeys(run.feed for run in runs))
    for number, feed in enumerate(feeds, 1):
        print(f"  [{number}] {feed.describe()}")
    print(
        f"  {'photo mix':<40} {'images':>6} {'answers':>7} {'seconds':>7} {'images/s':>8} {'answers/s':>9}"
        f" {'feed/s':>10} {'/ feed':>6} {'failed':>6} {'load':>5}"
    )
    for run in runs:
        limit = f"{run.feed.rate:.1f} [{feeds.index(run.feed) + 1}]"
        print(
            f"  {run.name:<40} {run.images:>6} {run.answers:>7} {run.seconds:>7.2f} {run.image_rate:>8.1f}"
            f" {run.answer_rate:>9.1f} {limit:>10} {run.ratio:>6.2f} {run.failed:>6} {run.load:>5.1f}"
        )
    names = [name for name in PROCESSES if any(name in run.cpu_s for run in runs)]
    names += sorted({name for run in runs for name in run.cpu_s} - set(names))
    print(
        f"  {'CPU ms per image':<40} {' '.join(f'{n:>9}' for n in names)} {'all':>7} {'x feed':>6} {'cores':>6} |"
        " worker by stage:"
    )
    print(f"  {'':<40} {' ' * 10 * len(names)}{'':>7} {'':>6} {'busy':>6} | {' '.join(STAGES)}")
    for run in runs:
        cells = " ".join(f"{1000 * run.cpu_s[n] / run.images:>9.1f}" if n in run.cpu_s else f"{'':>9}" for n in names)
        busy = sum(run.cpu_s.values()) / run.seconds
        if run.stage_cpu_s is None:
            stages = "n/a"
        else:
            stages = " ".join(f"{1000 * run.stage_cpu_s.get(stage, 0.0) / run.images:.1f}" for stage in STAGES)
        total = 1000 * sum(run.cpu_s.values()) / run.images
        print(f"  {run.name:<40} {cells} {total:>7.1f} {run.cpu_over_feed:>6.2f} {busy:>6.2f} | {stages}")


def request_groups(
    sources: Sequence[str | Path], answers_per_image: int, max_bytes: int = MAX_REQUEST_BYTES
) -> list[list[str | Path]]:
    """The sources in order, cut into requests of at most MAX_BATCH_ANSWERS answers and, for files, `max_bytes`."""
    per_request = max(1, MAX_BATCH_ANSWERS // answers_per_image)
    groups: list[list[str | Path]] = []
    size = 0
    for source in sources:
        source_bytes = source.stat().st_size if isinstance(source, Path) else 0
        if not groups or len(groups[-1]) == per_request or (groups[-1] and size + source_bytes > max_bytes):
            groups.append([])
            size = 0
        groups[-1].append(source)
        size += source_bytes
    return groups


def submit_photos(
    base: str, sources: Sequence[str | Path], questions: Sequence[str], timeout_s: float = 900
) -> list[tuple[str, int]]:
    """Every question about every source, as requests (request_groups) submitted at once; their (id, count)s."""
    from blipq.client import BlipqClient

    groups = request_groups(sources, len(questions))
    submitted: list[tuple[str, int]] = [("", 0)] * len(groups)

    def submit(number: int) -> None:
        submitted[number] = BlipqClient(base, timeout_s=timeout_s).submit_batch(groups[number], questions)

    threads = [threading.Thread(target=submit, args=(number,)) for number in range(len(groups))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if not all(batch_id for batch_id, _ in submitted):
        raise RuntimeError("a photo request was not accepted (see the exception above)")
    return submitted


def wait_for_photos(base: str, submitted: Sequence[tuple[str, int]], timeout_s: float = 900) -> list[dict[str, Any]]:
    """Read each request's summary at POLL_HZ until all ended, then their result lines."""
    from blipq.client import BlipqClient

    client = BlipqClient(base, timeout_s=timeout_s)
    pending, tick, deadline = dict(submitted), time.perf_counter(), time.monotonic() + timeout_s
    while pending:
        for batch_id, count in list(pending.items()):
            if client.batch(batch_id)["ended"] >= count:
                del pending[batch_id]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} photo requests did not end within {timeout_s:g} s")
        tick += 1 / POLL_HZ
        time.sleep(max(0.0, tick - time.perf_counter()))
    return [line for batch_id, _ in submitted for line in client.results(batch_id)]


def serve_photos(
    base: str, sources: Sequence[str | Path], questions: Sequence[str]
) -> tuple[float, list[dict[str, Any]]]:
    """submit_photos then wait_for_photos: the seconds from the first submission to the last line read, the lines."""
    started = time.perf_counter()
    results = wait_for_photos(base, submit_photos(base, sources, questions))
    return time.perf_counter() - started, results


def photo_run(
    name: str, meter: Meter, base: str, sources: Sequence[str | Path], questions: Sequence[str], feed: FeedLimit
) -> PhotoRun:
    """serve_photos, with what each process and each worker stage spent meanwhile."""
    before = meter.read()
    seconds, results = serve_photos(base, sources, questions)
    cpu, stages = Meter.spent(before, meter.read())
    failed = sum(line["status"] != "succeeded" for line in results)
    run = PhotoRun(name, len(sources), len(results), seconds, feed, cpu, stages, failed)
    print(f"{name}: {run.image_rate:.1f} images/s, {run.answer_rate:.1f} answers/s, / feed {run.ratio:.2f}", flush=True)
    return run


def tag_run(
    name: str, meter: Meter, base: str, directory: Path, texts: Sequence[str], out: Path, limit: FeedLimit,
    urls: Path | None = None, caption: bool = False, options: Sequence[str] = (), checkout: Path = REPO,
) -> PhotoRun:  # fmt: skip
    """`blipq tag DIR` (or `--urls FILE`) over the photos, with `options`, as `checkout`'s code runs it (this one's
    unless told); the client's CPU its own (wait4), the others' by `meter`."""
    images = len(list(directory.iterdir()))
    before = meter.read()
    sources = [] if urls else [str(directory)]
    run = run_tag(base, sources, texts, out, urls=urls, caption=caption, options=options, checkout=checkout)
    cpu, stages = Meter.spent(before, meter.read())
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    failed = sum(line["status"] != "succeeded" for line in lines)
    result = PhotoRun(name, images, len(lines), run.seconds, limit, {**cpu, "client": run.cpu_s}, stages, failed)
    print(f"{name}: {result.image_rate:.1f} images/s, {result.answer_rate:.1f} answers/s", flush=True)
    return result


def linked_dir(directory: Path, paths: Sequence[Path]) -> Path:
    """A new directory of links to exactly `paths` (what `blipq tag DIR` is given, or an image server serves)."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in paths:
        (directory / path.name).symlink_to(path)
    return directory


@dataclass
class PhotoService:
    """A service of one worker, the image server its URLs point at, and what reads their costs."""

    fleet: Fleet
    server: ImageServer
    meter: Meter

    def urls(self, photos: Sequence[Path]) -> list[str]:
        return [self.server.url(path.name) for path in photos]


@contextmanager
def photo_service(env: Mapping[str, str], served: Path, warm_up: Path) -> Iterator[PhotoService]:
    """One worker's service (benchmarks.fleet.Fleet, with `env`) and an image server of `served`'s files, the
    worker's /metrics on a free port; once the worker answered a first job (about `warm_up`) until the block ends."""
    server = ImageServer(served)
    metrics_port = free_port()
    env = {**env, "BLIPQ_METRICS_PORT": str(metrics_port), "BLIPQ_METRICS_ADDR": "127.0.0.1", **server.fetch_env()}
    fleet = Fleet(1, time_limit_s=600, env=env)
    try:
        wait_until_serving(fleet, (warm_up.read_bytes(), PHOTO_QUESTIONS[0], ""))
        pids = {"worker": fleet.workers[0].process.pid, "api": fleet.api.pid, "redis": fleet.redis.process.pid,
                "images": server.pid, "client": os.getpid()}  # fmt: skip
        yield PhotoService(fleet, server, Meter(pids, [f"http://127.0.0.1:{metrics_port}/metrics"]))
    finally:
        fleet.stop()
        server.stop()
        shutil.rmtree(fleet.data_dir, ignore_errors=True)
