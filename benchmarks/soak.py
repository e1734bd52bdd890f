"""Soak run: the whole service under a steady mixed load for a while, its memory and Redis sampled as it goes.

    python -m benchmarks.soak [--minutes 30] [--workers 2] [--rate 5] [--batch-every-s 10] [--kill-every-s 300]
                              [--sample-every-s 30] [--job-ttl-s 300] [--out soak.json] [--smoke]

Starts its own Redis, the API (gunicorn, real HTTP) and N workers serving the shipped demo model, as the other
benchmarks do (benchmarks/fleet.py), then for --minutes applies a steady load through the Python client
(blipq/client.py):
- single easy-VQA questions at --rate per second, every other one uploaded and the rest by URL from a local image
  server, each long-polled to its end by one of --pollers client threads;
- every --batch-every-s, a batch of --batch-images images x --batch-questions questions by URL, waited for and its
  results read back;
- every --kill-every-s, one worker (each in turn) SIGKILLed and a new one started, as a supervisor would. The jobs
  it held come back through the reaper: workers announce every 2 s here and the reaper looks every 2 s, as in
  benchmarks/chaos.py.
Every --sample-every-s it samples the resident memory (VmRSS) of the API (gunicorn's master and its workers), of each
worker (the slot's current process) and of Redis, with Redis's used_memory, keys (by kind), queued answers and
append-only file. Then it stops submitting, waits for every accepted job and batch to end, and prints: jobs and
batch items by how they ended, failures by code, what did not end (must be 0), answers that differ from the model's
in this process, and for each process its memory once warmed up (the first sample after --warmup-s), at the end of
the load and once drained, and its growth per hour: a least-squares slope over the steady samples, in MiB/h (a
worker's within each process's life, as the kills restart them; a process's own first --warmup-s left out).

Job records live BLIPQ_JOB_TTL_S after submission, a day by default, so Redis grows with every job for a day. The
soak runs the service with BLIPQ_JOB_TTL_S=--job-ttl-s (default 300) so that records expire within the run. The TTL
must be above the visibility timeout (--time-limit + 60 s): a killed worker's old messages come back after it, and
a job whose record expired first would be counted as one that never ended. Once the first
records have expired (after the TTL, or the 120 s of a job's wake-up list when that is longer), Redis holds a steady
window of jobs, and the slopes are taken from then on (from the warm-up when the run is too short for that, and it
says so). A slope near zero there says nothing grows without bound; a kind of key that still grows is marked. The
append-only file grows until Redis rewrites it (by default once it doubled and passed 64 MB). The answer cache is
off, as in every benchmark: each answer is the model's.

Writes every sample and the summary as JSON to --out. Exits 1 when an accepted job or batch item did not end.
`--smoke`: 3 s of load on one worker, SIGKILLed once, a sample every second, the JSON in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import queue
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import redis
import requests

from benchmarks.fleet import Fleet, load_items, percentile, wait_until_serving
from benchmarks.image_server import ImageServer
from blipq.client import FINAL_STATUSES, LONG_POLL_S, BlipqClient
from blipq.client_errors import BlipqClientError
from contract.broker import visibility_timeout_for
from contract.job_store import JobStore
from contract.keys import ARRIVED_FIELD_PREFIX, waiting_answers_key
from contract.transitions import ENDED_KEY_TTL_S

MIB = 1024 * 1024
QUICK_RECOVERY = {"BLIPQ_ANNOUNCE_INTERVAL_S": "2", "BLIPQ_REAPER_INTERVAL_S": "2"}  # as chaos.py
TICK_S = 0.5  # the main loop's beat: samples and kills are due on it
BATCH_POLL_S = 1.0  # between two reads of a batch's summary: a soak needs no quicker news
BATCH_FOLLOWERS = 2  # threads that wait for batches: one batch may still run while the next arrives
READY_TIMEOUT_S = 300.0  # for every worker to load its model at the start, on a busy machine
# Parts of a key that name one job, batch or process rather than a kind of key: `blipq:job:<id>` counts as
# `blipq:job:*`. Ids are 22 URL-safe characters (batch items add `.<index>`), digests 64 hex, pids and ports digits.
ID_PART = re.compile(r"[A-Za-z0-9_-]{20,}(\.\d+)?|\d+")


@dataclass(frozen=True)
class PendingJob:
    job_id: str
    reference: str  # what the demo model answers in this process


@dataclass
class Tally:
    """What the clients saw, counted from their threads under one lock."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    jobs_accepted: int = 0
    jobs_by_end: Counter[str] = field(default_factory=Counter)  # a final status, `gone` (404) or `not_ended`
    job_errors: Counter[str] = field(default_factory=Counter)  # failed single jobs by error code
    wrong_answers: int = 0
    latencies: list[float] = field(default_factory=list)  # created -> finished, as the service recorded them
    batches_accepted: int = 0
    batch_items: int = 0
    items_by_end: Counter[str] = field(default_factory=Counter)
    item_errors: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)  # "job <code>" / "batch <code>": the client gave up
    unended_ids: list[str] = field(default_factory=list)  # to look up in the service's log

    def ended_job(self, pending: PendingJob, job: dict[str, Any]) -> None:
        with self.lock:
            status = job["status"]
            self.jobs_by_end[status] += 1
            if status not in FINAL_STATUSES:
                self.unended_ids.append(pending.job_id)
            if status == "failed":
                self.job_errors[(job.get("error") or {}).get("code", "?")] += 1
            if status == "succeeded" and job.get("answer") != pending.reference:
                self.wrong_answers += 1
            if job.get("finished_at"):
                self.latencies.append(seconds_between(job["created_at"], job["finished_at"]))

    def ended_batch(self, count: int, lines: list[dict[str, Any]] | None) -> None:
        """A batch's result lines once it ended (None: it could not be read back: every item counts as not ended)."""
        with self.lock:
            if lines is None:
                self.items_by_end["not_ended"] += count
                return
            for line in lines:
                status = line.get("status") or "gone"  # null: the item's record expired before it was read
                self.items_by_end[status if status in FINAL_STATUSES or status == "gone" else "not_ended"] += 1
                if status == "failed":
                    self.item_errors[(line.get("error") or {}).get("code", "?")] += 1
            if len(lines) < count:  # a batch that was gone: its items were never read back
                self.items_by_end["not_ended"] += count - len(lines)

    def refuse(self, what: str, exc: Exception) -> None:
        with self.lock:
            self.refused[f"{what} {exc.code if isinstance(exc, BlipqClientError) else type(exc).__name__}"] += 1


def paced(stop: threading.Event, interval_s: float, first_s: float = 0.0) -> Iterator[int]:
    """Tick numbers, one every `interval_s` until `stop`; after a stall the next tick comes at once, with no burst
    to catch up."""
    due = time.monotonic() + first_s
    tick = 0
    while not stop.wait(max(0.0, due - time.monotonic())):
        yield tick
        tick += 1
        due = max(due + interval_s, time.monotonic())


def submit_jobs(
    base: str,
    items: list[tuple[bytes, str, str]],
    urls: list[str],
    rate: float,
    stop: threading.Event,
    pending: queue.Queue[PendingJob | None],
    tally: Tally,
) -> None:
    """Submit single jobs at `rate` per second, uploads and URLs in turn, until `stop`."""
    client = BlipqClient(base)
    for tick in paced(stop, 1 / rate):
        index = tick % len(items)
        image, question, reference = items[index]
        try:
            job_id = client.submit(image if tick % 2 == 0 else urls[index], question)
        except (BlipqClientError, requests.RequestException) as exc:  # the client retried for minutes first
            tally.refuse("job", exc)
            continue
        with tally.lock:
            tally.jobs_accepted += 1
        pending.put(PendingJob(job_id, reference))


def follow_jobs(base: str, pending: queue.Queue[PendingJob | None], give_up: threading.Event, tally: Tally) -> None:
    """Long-poll each job taken from `pending` to its end, until a None."""
    client = BlipqClient(base)  # one per thread: its session's connection pool is its own
    while (job := pending.get()) is not None:
        tally.ended_job(job, follow_job(client, job.job_id, give_up))


def follow_job(client: BlipqClient, job_id: str, give_up: threading.Event) -> dict[str, Any]:
    """The job once it ended; `gone` when its record is not there, `not_ended` when `give_up` came first."""
    while True:
        last_try = give_up.is_set()
        try:
            job = client.get(job_id, wait_s=0 if last_try else LONG_POLL_S)
            if job["status"] in FINAL_STATUSES:
                return job
        except BlipqClientError as exc:
            if exc.status == 404:
                return {"status": "gone"}
            time.sleep(1.0)
        except requests.RequestException:
            time.sleep(1.0)
        if last_try:
            return {"status": "not_ended"}


def submit_batches(
    base: str,
    urls: list[str],
    questions: list[str],
    images_per_batch: int,
    every_s: float,
    stop: threading.Event,
    pending: queue.Queue[tuple[str, int] | None],
    tally: Tally,
) -> None:
    """Submit a batch by URL every `every_s`, each over the next `images_per_batch` images, until `stop`."""
    client = BlipqClient(base)
    for tick in paced(stop, every_s, first_s=every_s):
        first = tick * images_per_batch
        images = [urls[(first + offset) % len(urls)] for offset in range(images_per_batch)]
        try:
            batch_id, count = client.submit_batch(images, questions)
        except (BlipqClientError, requests.RequestException) as exc:
            tally.refuse("batch", exc)
            continue
        with tally.lock:
            tally.batches_accepted += 1
            tally.batch_items += count
        pending.put((batch_id, count))


def follow_batches(
    base: str, pending: queue.Queue[tuple[str, int] | None], give_up: threading.Event, tally: Tally
) -> None:
    """Wait for each batch taken from `pending` to end and read its results back, until a None."""
    client = BlipqClient(base)
    while (entry := pending.get()) is not None:
        batch_id, count = entry
        tally.ended_batch(count, follow_batch(client, batch_id, give_up))


def follow_batch(client: BlipqClient, batch_id: str, give_up: threading.Event) -> list[dict[str, Any]] | None:
    """The batch's result lines once every item ended, or as they stand when `give_up` came first."""
    while True:
        last_try = give_up.is_set()
        try:
            summary = client.batch(batch_id)
            if summary["ended"] >= summary["count"] or last_try:
                return list(client.results(batch_id))
        except BlipqClientError as exc:
            if exc.status == 404:
                return []  # the batch is gone: every item counts as not ended
        except requests.RequestException:
            pass
        if last_try:
            return None
        give_up.wait(BATCH_POLL_S)


def child_pids() -> dict[int, list[int]]:
    """Every process's children, from /proc/<pid>/stat (its parent is the field after the command's parenthesis)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):  # gone since the listing
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    return children


def process_tree(pid: int, children: dict[int, list[int]]) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return sorted(tree)


def rss_mib(pids: list[int]) -> float:
    """The processes' resident memory added up (VmRSS; 0 for one that is gone or a zombie)."""
    total_kib = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        total_kib += next((int(line.split()[1]) for line in lines if line.startswith("VmRSS:")), 0)
    return total_kib / 1024


def key_kind(key: bytes) -> str:
    """`blipq:job:<id>` -> `blipq:job:*`: the kind of a key, its ids left out."""
    return ":".join("*" if ID_PART.fullmatch(part) else part for part in key.decode(errors="replace").split(":"))


def sample(
    fleet: Fleet, client: redis.Redis, started: dict[int, float], t0: float, phase: str, tally: Tally
) -> dict[str, Any]:
    """One reading of every process's memory and of Redis."""
    now = time.monotonic()
    children = child_pids()
    api_pids = process_tree(fleet.api.pid, children)
    workers = []
    for worker in fleet.workers:
        pids = process_tree(worker.process.pid, children)
        age = now - started[worker.index]
        workers.append(
            {"slot": worker.index, "pid": worker.process.pid, "age_s": round(age, 1), "rss_mib": rss_mib(pids)}
        )
    redis_pid = fleet.redis.process.pid
    info = client.info("memory")
    kinds = Counter(key_kind(key) for key in client.scan_iter(count=1000))
    counts: dict[bytes, bytes] = client.hgetall(waiting_answers_key())  # type: ignore[assignment]
    waiting = [count for name, count in counts.items() if not name.startswith(ARRIVED_FIELD_PREFIX.encode())]
    aof = sum(path.stat().st_size for path in fleet.redis.data_dir.rglob("*") if path.is_file())
    with tally.lock:
        jobs = {"accepted": tally.jobs_accepted, "ended": sum(tally.jobs_by_end.values())}
    return {
        "t_s": round(now - t0, 1),
        "phase": phase,
        "api": {"pids": api_pids, "rss_mib": rss_mib(api_pids)},
        "workers": workers,
        "redis": {
            "pid": redis_pid,
            "rss_mib": rss_mib([redis_pid]),
            "used_memory_mib": int(info["used_memory"]) / MIB,
            "keys": int(client.dbsize()),
            "aof_mib": aof / MIB,
            "queued_answers": sum(int(value) for value in waiting),
            "key_kinds": dict(kinds.most_common()),
        },
        "jobs": jobs,
    }


def progress_line(reading: dict[str, Any]) -> str:
    workers = "/".join(f"{worker['rss_mib']:.0f}" for worker in reading["workers"])
    r = reading["redis"]
    return (
        f"t={reading['t_s']:6.0f} s  api {reading['api']['rss_mib']:.0f} MiB  workers {workers} MiB  "
        f"redis {r['rss_mib']:.0f} MiB rss / {r['used_memory_mib']:.1f} MiB used, {r['keys']} keys, "
        f"{r['queued_answers']} queued  jobs {reading['jobs']['ended']}/{reading['jobs']['accepted']} ended"
    )


# A meter's reading in one sample: (value, the process it belongs to, that process's age in seconds).
Reading = tuple[float, Hashable, float]


def meters(reading: dict[str, Any], kinds: list[str]) -> dict[str, Reading]:
    """What the summary follows in one sample, by name; memory in MiB. A kind of key absent from it counts 0."""
    t = reading["t_s"]
    r = reading["redis"]
    found: dict[str, Reading] = {"api RSS": (reading["api"]["rss_mib"], tuple(reading["api"]["pids"]), t)}
    for worker in reading["workers"]:
        found[f"worker {worker['slot']} RSS"] = (worker["rss_mib"], worker["pid"], worker["age_s"])
    found["redis RSS"] = (r["rss_mib"], r["pid"], t)
    found["redis used_memory"] = (r["used_memory_mib"], r["pid"], t)
    found["redis AOF"] = (r["aof_mib"], r["pid"], t)
    found["redis keys"] = (r["keys"], r["pid"], t)
    for kind in kinds:
        found[f"keys {kind}"] = (r["key_kinds"].get(kind, 0), r["pid"], t)
    return found


def slope_per_hour(points: list[tuple[float, float, Hashable]]) -> float | None:
    """Least-squares growth per hour of (t, value, process) points, one intercept per process: a restart's drop
    is not a fall, nor is the fresh process's level a rise. None without two points of one process."""
    by_process: dict[Hashable, list[tuple[float, float]]] = {}
    for t, value, process in points:
        by_process.setdefault(process, []).append((t, value))
    sxx = sxy = 0.0
    for series in by_process.values():
        mean_t = statistics.fmean(t for t, _ in series)
        mean_v = statistics.fmean(v for _, v in series)
        sxx += sum((t - mean_t) ** 2 for t, _ in series)
        sxy += sum((t - mean_t) * (v - mean_v) for t, v in series)
    return sxy / sxx * 3600 if sxx > 0 else None


def growth(samples: list[dict[str, Any]], warmup_s: float, window_s: float) -> dict[str, dict[str, Any]]:
    """Each meter at the first sample after the warm-up, at the load's last sample, once drained, and its slope over
    the load's samples from `window_s` on (a process's own first `warmup_s` left out)."""
    kinds = sorted({kind for reading in samples for kind in reading["redis"]["key_kinds"]})
    series: dict[str, list[tuple[float, float, Hashable, float, str]]] = {}
    for reading in samples:
        for name, (value, process, age) in meters(reading, kinds).items():
            series.setdefault(name, []).append((reading["t_s"], value, process, age, reading["phase"]))
    rows = {}
    for name, points in series.items():
        start = next((value for t, value, _, _, _ in points if t >= warmup_s), None)
        steady = [
            (t, value, process)
            for t, value, process, age, phase in points
            if phase == "load" and t >= window_s and age >= warmup_s
        ]
        end = next((value for _, value, _, _, phase in reversed(points) if phase == "load"), None)
        drained = points[-1][1] if points[-1][4] == "drained" else None
        rows[name] = {"start": start, "end": end, "drained": drained, "per_hour": slope_per_hour(steady)}
    return rows


def wait_for_workers(base: str, count: int, timeout_s: float) -> None:
    """Wait until /readyz lists `count` VQA workers with their model loaded (wait_until_serving waits for one).

    /readyz itself stays 503 here, with no captioning worker: its body still lists each task's workers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            tasks = requests.get(f"{base}/readyz", timeout=5).json().get("tasks", {})
            if len(tasks.get("vqa", {}).get("workers", [])) >= count:
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"fewer than {count} workers were ready after {timeout_s:g} s")


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def seconds_between(start: str, end: str) -> float:
    return parse_time(end) - parse_time(start)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="of load (default 30)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=5.0, help="single jobs submitted per second (default 5)")
    parser.add_argument("--batch-every-s", type=float, default=10.0, help="seconds between two batches; 0: none")
    parser.add_argument("--batch-images", type=int, default=20, help="images of each batch (default 20)")
    parser.add_argument("--batch-questions", type=int, default=3, help="questions about each (default 3)")
    parser.add_argument("--kill-every-s", type=float, default=300.0, help="seconds between two SIGKILLs; 0: none")
    parser.add_argument("--sample-every-s", type=float, default=30.0)
    parser.add_argument("--warmup-s", type=float, default=60.0, help="left out of the growth (default 60)")
    parser.add_argument("--job-ttl-s", type=int, default=300, help="BLIPQ_JOB_TTL_S (default 300)")
    parser.add_argument("--time-limit", type=int, default=60, help="BLIPQ_JOB_TIME_LIMIT_S of the workers")
    parser.add_argument("--pollers", type=int, default=8, help="threads that long-poll single jobs (default 8)")
    parser.add_argument("--items", type=int, default=100, help="easy-VQA questions and images in rotation")
    parser.add_argument("--drain-timeout-s", type=float, help="for accepted work to end (default: visibility + 120)")
    parser.add_argument("--out", type=Path, help="where the samples and the summary go (default soak.json)")
    parser.add_argument("--smoke", action="store_true", help="3 s of load, one worker SIGKILLed once, 4 items")
    args = parser.parse_args()
    if args.smoke:
        args.minutes, args.workers, args.rate, args.pollers, args.items = 0.05, 1, 2.0, 2, 4
        args.batch_every_s, args.batch_images, args.batch_questions = 1.5, 2, 1
        args.kill_every_s, args.sample_every_s, args.warmup_s = 2.0, 1.0, 1.0
    args.out = args.out or (
        Path(tempfile.mkdtemp(prefix="blipq-soak-")) / "soak.json" if args.smoke else Path("soak.json")
    )
    if args.job_ttl_s <= visibility_timeout_for(args.time_limit):
        # A killed worker's old messages come back after the visibility timeout: a job whose record expired before
        # could not say how it ended, and the soak would count it lost.
        parser.error(
            f"--job-ttl-s must be above the visibility timeout, {visibility_timeout_for(args.time_limit)} s with "
            f"--time-limit {args.time_limit}"
        )
    if args.rate <= 0 or args.workers < 1 or args.sample_every_s <= 0:
        parser.error("--rate and --sample-every-s must be above 0, --workers at least 1")
    return args


class Soak:
    """The run under way: the service, the clients' threads, the samples taken and the workers killed."""

    def __init__(self, args: argparse.Namespace, fleet: Fleet, items: list[tuple[bytes, str, str]], urls: list[str]):
        self.args, self.fleet = args, fleet
        self.started = {worker.index: time.monotonic() for worker in fleet.workers}  # each slot's process, since
        self.client = redis.Redis.from_url(fleet.redis.url)
        self.tally = Tally()
        self.stop, self.give_up = threading.Event(), threading.Event()
        self.jobs: queue.Queue[PendingJob | None] = queue.Queue()
        self.batches: queue.Queue[tuple[str, int] | None] = queue.Queue()
        self.samples: list[dict[str, Any]] = []
        self.kills = self.revived = 0
        self.t0 = time.monotonic()
        base = fleet.base
        questions = list(dict.fromkeys(question for _, question, _ in items))[: args.batch_questions]
        self.submitters = [daemon(submit_jobs, base, items, urls, args.rate, self.stop, self.jobs, self.tally)]
        if args.batch_every_s > 0:
            batch_args = (urls, questions, args.batch_images, args.batch_every_s, self.stop, self.batches, self.tally)
            self.submitters.append(daemon(submit_batches, base, *batch_args))
        self.followers = [daemon(follow_jobs, base, self.jobs, self.give_up, self.tally) for _ in range(args.pollers)]
        self.followers += [
            daemon(follow_batches, base, self.batches, self.give_up, self.tally) for _ in range(BATCH_FOLLOWERS)
        ]

    def run(self) -> None:
        """Apply the load for --minutes, sampling and killing as they fall due."""
        for thread in self.submitters + self.followers:
            thread.start()
        self.t0 = time.monotonic()
        next_sample, next_kill = 0.0, self.args.kill_every_s
        while (elapsed := time.monotonic() - self.t0) < self.args.minutes * 60:
            self.supervise()
            if elapsed >= next_sample:
                self.take_sample("load")
                next_sample += self.args.sample_every_s
            if self.args.kill_every_s > 0 and elapsed >= next_kill:
                victim = self.fleet.workers[self.kills % len(self.fleet.workers)]
                print(f"t={elapsed:6.0f} s  SIGKILL worker {victim.index} (pid {victim.process.pid})", flush=True)
                self.fleet.restart_worker(victim, signal.SIGKILL)
                self.started[victim.index] = time.monotonic()
                self.kills += 1
                next_kill += self.args.kill_every_s
            time.sleep(TICK_S)

    def drain(self, timeout_s: float) -> None:
        """Stop submitting and wait for every accepted job and batch to end, `timeout_s` at most."""
        print(f"load stopped; waiting up to {timeout_s:g} s for every accepted job and batch to end...", flush=True)
        self.stop.set()
        for thread in self.submitters:
            thread.join()
        for _ in range(self.args.pollers):
            self.jobs.put(None)
        for _ in range(BATCH_FOLLOWERS):
            self.batches.put(None)
        deadline = time.monotonic() + timeout_s
        for thread in self.followers:
            while thread.is_alive() and time.monotonic() < deadline:
                self.supervise()  # a worker that dies now still has work to do
                thread.join(TICK_S)
        self.give_up.set()  # what has not ended by now is read once more and counted as not ended
        for thread in self.followers:
            thread.join()
        self.take_sample("drained")

    def supervise(self) -> None:
        """Stop the run when the API or Redis exited; start a new worker in each slot whose process exited."""
        fleet = self.fleet
        if fleet.api.poll() is not None or fleet.redis.process.poll() is not None:
            raise RuntimeError(f"the API or Redis exited; see {fleet.data_dir / 'service.log'}")
        for worker in fleet.workers:
            if worker.process.poll() is None:
                continue
            print(f"worker {worker.index} exited on its own ({worker.process.returncode}); starting another")
            fleet.restart_worker(worker, signal.SIGKILL)  # whatever is left of its process group goes too
            self.started[worker.index] = time.monotonic()
            self.revived += 1

    def take_sample(self, phase: str) -> None:
        self.samples.append(sample(self.fleet, self.client, self.started, self.t0, phase, self.tally))
        print(progress_line(self.samples[-1]), flush=True)


def daemon(target: Callable[..., None], *args: Any) -> threading.Thread:
    """A daemon thread: an interrupted run does not wait for its clients."""
    return threading.Thread(target=target, args=args, daemon=True)


def main() -> int:
    args = parse_args()
    # SIGTERM (a timeout, a kill) stops the service too, through the `finally` below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    print(f"preparing {args.items} questions and their in-process answers...", flush=True)
    items = load_items(args.items)
    image_dir = Path(tempfile.mkdtemp(prefix="blipq-soak-images-"))
    for index, (image, _, _) in enumerate(items):
        (image_dir / f"{index}.png").write_bytes(image)  # the same bytes by URL as uploaded: the same answer
    server = ImageServer(image_dir)
    env = {
        **QUICK_RECOVERY,
        **server.fetch_env(),
        "BLIPQ_JOB_TTL_S": str(args.job_ttl_s),
        "BLIPQ_METRICS_PORT": "0",  # N workers on one machine would all want the default port
    }
    print(f"starting Redis, the API and {args.workers} worker(s)...", flush=True)
    fleet = Fleet(args.workers, args.time_limit, env)
    soak = Soak(args, fleet, items, [server.url(f"{index}.png") for index in range(len(items))])
    try:
        wait_until_serving(fleet, items[0])
        wait_for_workers(fleet.base, args.workers, READY_TIMEOUT_S)
        print(describe(args), flush=True)
        soak.run()
        soak.drain(args.drain_timeout_s or visibility_timeout_for(args.time_limit) + 120)
        stats = JobStore(soak.client, args.job_ttl_s).stats()
        summary = summarize(args, soak.samples, soak.tally, soak.kills, soak.revived, stats)
        summary["logs"] = str(fleet.data_dir / "service.log")
    finally:
        fleet.stop()
        server.stop()
        soak.client.close()
        shutil.rmtree(image_dir, ignore_errors=True)
    report(summary)
    document = {"config": vars(args) | {"out": str(args.out)}, "env": env, "samples": soak.samples, "summary": summary}
    args.out.write_text(json.dumps(document, indent=1))
    print(f"samples and summary: {args.out}; service logs: {summary['logs']}")
    return 1 if summary["not_ended"] else 0


def describe(args: argparse.Namespace) -> str:
    batches = (
        f" + a batch of {args.batch_images} images x {args.batch_questions} questions every {args.batch_every_s:g} s"
        if args.batch_every_s > 0
        else ""
    )
    kills = f", a worker SIGKILLed every {args.kill_every_s:g} s" if args.kill_every_s > 0 else ""
    return (
        f"soak: {args.minutes:g} min, {args.workers} worker(s), {args.rate:g} single jobs/s (upload and URL)"
        f"{batches}{kills}; BLIPQ_JOB_TTL_S={args.job_ttl_s} (job and batch records expire that long after their "
        f"submission); a sample every {args.sample_every_s:g} s"
    )


def summarize(
    args: argparse.Namespace,
    samples: list[dict[str, Any]],
    tally: Tally,
    kills: int,
    revived: int,
    stats: dict[str, int],
) -> dict[str, Any]:
    duration_s = args.minutes * 60
    # Until the first records expire Redis fills with them; then they expire as fast as they come. A run too short
    # to see a few samples past that takes the slope from the warm-up on, and says so.
    fill_s = max(args.job_ttl_s, ENDED_KEY_TTL_S)
    steady = duration_s - fill_s >= 3 * args.sample_every_s
    window_s = max(args.warmup_s, fill_s if steady else 0)
    with tally.lock:
        latencies = sorted(tally.latencies)
        # Counted from what was accepted: a job or batch that no follower took up did not end either.
        jobs_ended = sum(count for end, count in tally.jobs_by_end.items() if end in FINAL_STATUSES)
        items_ended = sum(count for end, count in tally.items_by_end.items() if end in FINAL_STATUSES)
        not_ended = tally.jobs_accepted - jobs_ended + tally.batch_items - items_ended
        return {
            "duration_s": duration_s,
            "jobs": {
                "accepted": tally.jobs_accepted,
                "by_end": dict(tally.jobs_by_end),
                "failed_by_code": dict(tally.job_errors),
                "wrong_answers": tally.wrong_answers,
                "latency_p50_s": percentile(latencies, 0.5) if latencies else None,
                "latency_p99_s": percentile(latencies, 0.99) if latencies else None,
            },
            "batches": {
                "accepted": tally.batches_accepted,
                "items": tally.batch_items,
                "items_by_end": dict(tally.items_by_end),
                "failed_by_code": dict(tally.item_errors),
            },
            "refused": dict(tally.refused),
            "not_ended": not_ended,
            "not_ended_job_ids": tally.unended_ids[:50],
            "kills": kills,
            "unexpected_worker_exits": revived,
            "stats": stats,
            "warmup_s": args.warmup_s,
            "growth_window_from_s": window_s,
            "steady_state_reached": steady,
            "meters": growth(samples, args.warmup_s, window_s),
        }


def report(summary: dict[str, Any]) -> None:
    """Print the summary as a few readable lines and a table."""
    jobs, batches = summary["jobs"], summary["batches"]
    latency = (
        f"p50 {jobs['latency_p50_s']:.2f} s, p99 {jobs['latency_p99_s']:.2f} s"
        if jobs["latency_p50_s"] is not None
        else "none"
    )
    stats = summary["stats"]
    print()
    print(f"single jobs      accepted {jobs['accepted']}, ended {jobs['by_end']}")
    print(
        f"                 failed by code {jobs['failed_by_code']}, answers differing from the model's "
        f"{jobs['wrong_answers']}, latency (created -> finished) {latency}"
    )
    print(
        f"batches          accepted {batches['accepted']} ({batches['items']} items), items ended "
        f"{batches['items_by_end']}, failed by code {batches['failed_by_code']}"
    )
    print(f"refused          {summary['refused'] or 'none'} (after the client's retries)")
    print(f"NOT ENDED        {summary['not_ended']} (jobs and batch items; must be 0)")
    if summary["not_ended_job_ids"]:
        print(f"                 jobs: {', '.join(summary['not_ended_job_ids'][:10])}")
    print(
        f"worker kills     {summary['kills']} SIGKILLs, {summary['unexpected_worker_exits']} unexpected exits; "
        f"reruns {stats['reruns']}, republished {stats['republished']}, worker_lost {stats['worker_lost']}, "
        f"duplicate executions {stats['duplicate_executions']}"
    )
    window, warmup = summary["growth_window_from_s"], summary["warmup_s"]
    print()
    print(f"start: the first sample from t = {warmup:g} s; end: the load's last; drained: once every accepted job")
    print("and batch ended (or the drain timed out); growth/h: least-squares slope over")
    if summary["steady_state_reached"]:
        print(f"the load's samples from t = {window:g} s (by then records expire as fast as they come),")
    else:
        print(f"the load's samples from t = {window:g} s. The run is too short to pass the job TTL: Redis still fills")
        print("with records, and its growth here is not a steady state's,")
    print(f"a worker's within each process's life, its first {warmup:g} s left out")
    print(f"{'':34s} {'start':>10s} {'end':>10s} {'drained':>10s} {'growth/h':>10s}")
    meters = summary["meters"]
    for name, row in meters.items():
        if not name.startswith("keys "):
            print(table_row(name + ("" if name.endswith("keys") else " MiB"), row, 0 if name.endswith("keys") else 1))
    steady = summary["steady_state_reached"]
    print("redis keys by kind" + ("  (<-: grows in the steady state and stays once drained)" if steady else ""))
    for name, row in meters.items():
        if name.startswith("keys "):
            # Still rising, and still there once every job ended: keys of work in flight drop back when drained.
            grows = steady and (row["per_hour"] or 0) > 0 and (row["drained"] or 0) > (row["start"] or 0)
            print(table_row("  " + name.removeprefix("keys "), row, 0) + ("  <-" if grows else ""))


def table_row(name: str, row: dict[str, float | None], decimals: int) -> str:
    cells = [
        f"{'-':>10s}" if value is None else f"{value:{'+' if column == 'per_hour' else ''}10.{decimals}f}"
        for column, value in row.items()
    ]
    return f"{name:34s} {' '.join(cells)}"


if __name__ == "__main__":
    sys.exit(main())
