"""Fair share between API keys within a priority level: a small batch sent behind another key's backlog.

    python -m benchmarks.fair_share [--backlog 1950] [--small 50] [--questions 10] [--runs 3] [--model standin|demo]
        [--device-batch-ms 50] [--batch-size 32] [--mixes batch,jobs,three,weighted] [--out FILE] [--smoke]

The goal measured: with two keys at the same priority, a 50-answer batch sent behind another key's backlog of
thousands ends within about the time of its own answers plus one model batch per key holding work, and in any case
while most of that backlog still waits.

One service (benchmarks/fleet.py: its own Redis, the API under gunicorn) with four API keys (a, b, c, and b3 weighted
3 by BLIPQ_KEY_WEIGHTS) and one worker: by default the real worker on the stand-in device
(benchmarks/standin_device.py, --device-batch-ms per model batch, the GIL released), with `--model demo` the real
worker with the shipped demo model. The images are easy-VQA test images by URL from a local image host
(benchmarks/image_server.py), each asked the --questions questions asked most often. In each run of a mix, key a
sends a batch of --backlog answers (and, in mix `three`, key c another); once the worker has ended a first item of
it (a long poll of the batch, not a sleep), the small key sends --small answers: one batch (mixes `batch`, `three`,
`weighted`, where the small key is b3, of weight 3) or as many single jobs from JOB_CLIENTS threads (`jobs`).
Measured: the small work's time from its 202 (the first job's, for jobs) to its last item seen ended (long polls);
how much of the backlog had not ended then; the fleet's answers/s over the same run (from the backlog's first end to
the last end of all); hence its bound, its answers at that rate plus one model batch (--batch-size answers at that
rate) per key holding work, and what first come, first served would give it: the backlog left when it was sent, and
its own answers, at that rate. Also the backlog's answers that ended before the small work's first item ended (what
the worker held and what had been released to it when the small work came) and between its first and its last (the
other keys' turns). --intake sets the worker's BLIPQ_WORKER_INTAKE.
Side by side, alternating with it run by run, the baseline: the same submissions all under key a, whose line is
first come, first served, so that the small work waits behind the backlog. Medians over --runs of each.
Prints a table per mix and whether the goal held (the small work within GOAL_RATIO of its bound, and most of the
backlog still waiting when it ended). About 2 minutes on a 2-core machine, with the stand-in or the demo model;
--smoke: seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from api.auth import hash_api_key, new_api_key
from benchmarks.fleet import Fleet, easy_vqa_image_paths
from benchmarks.image_server import ImageServer
from benchmarks.standin_device import BATCH_MS_VARIABLE
from benchmarks.tagging import tagging_questions
from blipq.client import BlipqClient
from blipq.client_errors import BlipqClientError

KEY_NAMES = ("a", "b", "c", "b3")
WEIGHTED_KEY, WEIGHT = "b3", 3
LONG_POLL_S = 10.0  # each read that waits for a batch's or a job's progress
RUN_TIMEOUT_S = 600  # one run's backlog, at most
READY_TIMEOUT_S = 300  # the API up and the worker's model loaded
JOB_CLIENTS = 10  # threads that send (and then wait for) the single jobs of mix `jobs`
GOAL_RATIO = 1.5  # the small work within this of its bound...
GOAL_WAITING = 0.5  # ...and more than this share of the backlog not yet ended when it ended


@dataclass(frozen=True)
class Mix:
    """Who sends what: a backlog from each of `backlog_keys`, then the small work from `small_key`."""

    name: str
    backlog_keys: tuple[str, ...]
    small_key: str
    jobs: bool  # the small work as single jobs, not one batch


MIXES = {
    "batch": Mix("batch", ("a",), "b", jobs=False),
    "jobs": Mix("jobs", ("a",), "b", jobs=True),
    "three": Mix("three", ("a", "c"), "b", jobs=False),
    "weighted": Mix("weighted", ("a",), WEIGHTED_KEY, jobs=False),
}


@dataclass(frozen=True)
class Run:
    """One run of a mix: fair (each sender its own key) or the baseline (every submission under key a)."""

    mix: str
    fair: bool
    small: int  # answers of the small work
    small_s: float  # from its 202 to its last item seen ended
    sending_s: float  # from its first 202 to its last (single jobs; 0 for a batch)
    backlog: int  # answers of the backlogs together
    left_at_send: int  # of the backlog, not ended when the small work was sent
    left_at_first: int  # of the backlog, not ended when the small work's first item ended
    left_at_end: int  # of the backlog, not ended when the small work ended
    rate: float  # the fleet's answers/s over the run
    failed: int  # items of the run that did not succeed


@dataclass(frozen=True)
class Summary:
    """A mix's medians: the fair runs against the baseline's."""

    mix: str
    keys: int  # keys holding work when the small work is sent, its own included
    small_s: float
    baseline_s: float
    bound_s: float
    fcfs_s: float  # the small work's time behind the whole backlog left, at the run's rate
    waiting: float  # share of the backlog not ended when the small work ended (fair runs)
    ahead: float  # backlog answers ended between the small work's 202 and its first item's end (fair runs)
    beside: float  # backlog answers ended between its first item's end and its last's (fair runs)
    rate: float

    @property
    def held(self) -> bool:
        return self.small_s <= GOAL_RATIO * self.bound_s and self.waiting > GOAL_WAITING


class Service:
    """The run's service, image host and clients: one client per key and thread."""

    def __init__(self, args: argparse.Namespace) -> None:
        count = (args.backlog + args.small) // args.questions
        paths = easy_vqa_image_paths(count)
        self.questions = tagging_questions(args.questions)
        self.server = ImageServer(paths[0].parent)
        urls = [self.server.url(path.name) for path in paths]
        self.backlog_urls = urls[: args.backlog // args.questions]
        self.small_urls = urls[len(self.backlog_urls) :]
        self.small = args.small
        self.keys = {name: new_api_key() for name in KEY_NAMES}
        env = {
            "BLIPQ_API_KEY_HASHES": ",".join(f"{name}:{hash_api_key(key)}" for name, key in self.keys.items()),
            "BLIPQ_KEY_WEIGHTS": f"{WEIGHTED_KEY}={WEIGHT}",
            "BLIPQ_BATCH_MAX_SIZE": str(args.batch_size),
            **({"BLIPQ_WORKER_INTAKE": str(args.intake)} if args.intake else {}),
            "BLIPQ_METRICS_PORT": "0",  # other services on this machine may hold the default port
            BATCH_MS_VARIABLE: str(args.device_batch_ms),
            **self.server.fetch_env(),
        }
        module = "benchmarks.standin_device" if args.model == "standin" else "worker"
        self.local = threading.local()
        try:
            self.fleet = Fleet(1, time_limit_s=300, env=env, worker_module=module)
        except BaseException:
            self.server.stop()
            raise

    def client(self, key: str) -> BlipqClient:
        clients: dict[str, BlipqClient] = self.local.__dict__.setdefault("clients", {})
        if key not in clients:
            clients[key] = BlipqClient(self.fleet.base, api_key=self.keys[key], timeout_s=60)
        return clients[key]

    def read(self, key: str, batch_id: str, after: int | None = None) -> dict[str, Any]:
        """The batch's summary now, or, given `after`, once its ended count differs from it (a long poll)."""
        client = self.client(key)
        params = {} if after is None else {"wait": f"{LONG_POLL_S:g}", "after": str(after)}
        response = client.session.get(
            f"{client.base_url}/v1/batches/{batch_id}", params=params, timeout=client.timeout_s + LONG_POLL_S
        )
        response.raise_for_status()
        summary: dict[str, Any] = response.json()
        return summary

    def wait_batch(self, key: str, batch_id: str) -> tuple[float, dict[str, Any]]:
        """Long-poll the batch until every item ended: when that was seen, and its last summary."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        summary = self.read(key, batch_id)
        while summary["ended"] < summary["count"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {batch_id} did not end within {RUN_TIMEOUT_S} s")
            summary = self.read(key, batch_id, after=summary["ended"])
        return time.perf_counter(), summary

    def wait_job(self, key: str, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while (job := self.client(key).get(job_id, wait_s=LONG_POLL_S))["finished_at"] is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not end within {RUN_TIMEOUT_S} s")
        return job

    def wait_until_answering(self) -> None:
        """Until the API answers and the worker has answered a first batch under every key (its model loaded, every
        key's connections open)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        processes = [self.fleet.api, *(worker.process for worker in self.fleet.workers)]
        while True:
            if any(process.poll() is not None for process in processes):
                raise RuntimeError(f"a process of the service exited; see {self.fleet.data_dir / 'service.log'}")
            try:
                for key in KEY_NAMES:
                    batch_id, _ = self.client(key).submit_batch(self.small_urls[:1], self.questions)
                    self.wait_batch(key, batch_id)
                return
            except BlipqClientError:  # not up yet (or no worker yet: no_worker)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the service did not answer within {READY_TIMEOUT_S} s") from None
                time.sleep(0.5)

    def stop(self) -> None:
        try:
            self.fleet.stop()
        finally:
            self.server.stop()


def run_mix(service: Service, mix: Mix, fair: bool, pool: ThreadPoolExecutor) -> Run:
    """One run: the backlogs, then (once the worker ended a first item of them) the small work, until all ended."""
    backlog_keys = mix.backlog_keys if fair else ("a",) * len(mix.backlog_keys)
    small_key = mix.small_key if fair else "a"
    backlogs = []
    for key in backlog_keys:
        batch_id, _ = service.client(key).submit_batch(service.backlog_urls, service.questions)
        backlogs.append((key, batch_id))
    watchers = [pool.submit(service.wait_batch, key, batch_id) for key, batch_id in backlogs]
    first = service.read(*backlogs[0], after=0)
    while first["ended"] == 0:
        first = service.read(*backlogs[0], after=0)

    def left() -> tuple[int, int]:
        """(answers, not ended) of the backlogs now."""
        summaries = [service.read(key, batch_id) for key, batch_id in backlogs]
        return sum(s["count"] for s in summaries), sum(s["count"] - s["ended"] for s in summaries)

    backlog, left_at_send = left()
    started = time.perf_counter()
    at_first_end: list[int] = []  # the backlog not ended when the small work's first item ended
    first_end = threading.Lock()

    def on_first_end() -> None:
        with first_end:
            if not at_first_end:
                at_first_end.append(left()[1])

    if mix.jobs:
        small_sent, last_sent, small_end, small_failed = send_jobs(service, small_key, pool, on_first_end)
    else:
        batch_id, _ = service.client(small_key).submit_batch(service.small_urls, service.questions)
        small_sent = last_sent = time.perf_counter()
        service.read(small_key, batch_id, after=0)
        on_first_end()
        small_end, summary = service.wait_batch(small_key, batch_id)
        small_failed = summary["count"] - summary["counts"]["succeeded"]
    _, left_at_end = left()
    ends = [watcher.result() for watcher in watchers]
    last_end = max([small_end, *(end for end, _ in ends)])
    answers = left_at_send + service.small  # ended between `started` and the last end
    failed = small_failed + sum(summary["count"] - summary["counts"]["succeeded"] for _, summary in ends)
    return Run(
        mix.name, fair, service.small, small_end - small_sent, last_sent - small_sent, backlog, left_at_send,
        at_first_end[0], left_at_end, answers / (last_end - started), failed,
    )  # fmt: skip


def send_jobs(
    service: Service, key: str, pool: ThreadPoolExecutor, on_end: Callable[[], None]
) -> tuple[float, float, float, int]:
    """The small work as single jobs by URL from JOB_CLIENTS threads: (first 202, last 202, last end seen, jobs
    failed). `on_end` is called as each job is seen ended."""
    items = [(url, question) for url in service.small_urls for question in service.questions][: service.small]

    def send(item: tuple[str, str]) -> tuple[float, str]:
        job_id = service.client(key).submit(item[0], item[1])
        return time.perf_counter(), job_id

    with ThreadPoolExecutor(JOB_CLIENTS) as senders:
        sends = [senders.submit(send, item) for item in items]
        sent = [future.result() for future in sends]

    def wait(job_id: str) -> dict[str, Any]:
        job = service.wait_job(key, job_id)
        on_end()
        return job

    jobs = list(pool.map(wait, [job_id for _, job_id in sent]))
    last_end = time.perf_counter()
    times = [at for at, _ in sent]
    return min(times), max(times), last_end, sum(job["status"] != "succeeded" for job in jobs)


def describe(run: Run) -> str:
    sending = f", its jobs' 202s over {run.sending_s:.3f} s" if run.sending_s else ""
    return (
        f"{'fair' if run.fair else 'one key'}: small work {run.small_s:.3f} s, backlog left {run.left_at_end}/"
        f"{run.backlog}, {run.rate:.0f} answers/s{sending}"
    )


def summarize(args: argparse.Namespace, mix: Mix, runs: list[Run]) -> Summary:
    fair = [run for run in runs if run.fair]
    baseline = [run for run in runs if not run.fair]
    rate = statistics.median(run.rate for run in runs)
    keys = len(mix.backlog_keys) + 1
    bound = args.small / rate + keys * args.batch_size / rate
    return Summary(
        mix.name, keys, statistics.median(run.small_s for run in fair),
        statistics.median(run.small_s for run in baseline),
        bound, statistics.median((run.left_at_send + run.small) / run.rate for run in fair),
        statistics.median(run.left_at_end / run.backlog for run in fair),
        statistics.median(run.left_at_send - run.left_at_first for run in fair),
        statistics.median(run.left_at_first - run.left_at_end for run in fair), rate,
    )  # fmt: skip


def report(args: argparse.Namespace, summaries: list[Summary], runs: list[Run]) -> None:
    device = (
        f"stand-in device, {args.device_batch_ms:g} ms per model batch" if args.model == "standin" else "demo model"
    )
    print(
        f"\none worker ({device}, batches of {args.batch_size}), {os.cpu_count()} CPUs; backlog {args.backlog} answers"
        f" per backlog key, small work {args.small} answers, {args.questions} questions per image; medians of"
        f" {args.runs} runs each; baseline: every submission under one key (first come, first served)"
    )
    print(
        f"{'mix':>8} {'keys':>4} {'answers/s':>9} {'small s':>7} {'bound s':>7} {'/ bound':>7} {'FCFS s':>6}"
        f" {'/ FCFS':>6} {'one key s':>9} {'one key / fair':>14} {'backlog waiting':>15} {'ahead':>5} {'beside':>6}"
        f" {'goal':>4}"
    )
    for s in summaries:
        print(
            f"{s.mix:>8} {s.keys:>4} {s.rate:>9.1f} {s.small_s:>7.3f} {s.bound_s:>7.3f} {s.small_s / s.bound_s:>7.2f}"
            f" {s.fcfs_s:>6.2f} {s.small_s / s.fcfs_s:>6.3f} {s.baseline_s:>9.3f} {s.baseline_s / s.small_s:>14.1f}"
            f" {s.waiting:>15.0%} {s.ahead:>5.0f} {s.beside:>6.0f} {'held' if s.held else 'NOT':>4}"
        )
    print(
        "ahead / beside: the backlog's answers that ended between the small work's 202 and its first item's end, and"
        " between its first item's end and its last's"
    )
    failed = sum(run.failed for run in runs)
    print(f"items that did not succeed: {failed}")
    print(
        f"bound: the small work's answers plus {args.batch_size} answers per key holding work, at the run's answers/s;"
        f" the goal: within {GOAL_RATIO:g}x of it, with more than {GOAL_WAITING:.0%} of the backlog not yet ended"
    )
    held = sum(s.held for s in summaries)
    print(f"fair share goal held in {held} of {len(summaries)} mixes")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=1950, help="answers of each backlog (default 1950)")
    parser.add_argument("--small", type=int, default=50, help="answers of the small work (default 50)")
    parser.add_argument("--questions", type=int, default=10, help="questions asked of every image (default 10)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each mix, fair and baseline each (default 3)")
    parser.add_argument("--model", choices=("standin", "demo"), default="standin", help="the worker's model")
    parser.add_argument("--device-batch-ms", type=float, default=50.0, help="stand-in device per batch (default 50)")
    parser.add_argument("--batch-size", type=int, default=32, help="BLIPQ_BATCH_MAX_SIZE (default 32)")
    parser.add_argument("--intake", type=int, help="BLIPQ_WORKER_INTAKE (default: the worker's, 2 model batches)")
    parser.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated, of {', '.join(MIXES)}")
    parser.add_argument("--out", type=Path, help="write every figure to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="a backlog of 40, small work of 8, one run each")
    args = parser.parse_args()
    if args.smoke:
        args.backlog, args.small, args.questions, args.runs = 40, 8, 4, 1
    unknown = set(args.mixes.split(",")) - set(MIXES)
    if unknown:
        parser.error(f"--mixes: no such mix {sorted(unknown)}")
    if min(args.backlog, args.small) < 1 or args.backlog % args.questions or args.small % args.questions:
        parser.error("--backlog and --small: whole numbers of images, so multiples of --questions")
    return args


def main() -> int:
    args = parse_args()
    mixes = [MIXES[name] for name in args.mixes.split(",")]
    service = Service(args)
    runs: list[Run] = []
    summaries = []
    try:
        service.wait_until_answering()
        with ThreadPoolExecutor(JOB_CLIENTS + 2) as pool:
            for mix in mixes:
                mix_runs = []
                for index in range(args.runs):
                    for fair in (True, False):  # side by side: fair, then its baseline, run by run
                        mix_runs.append(run := run_mix(service, mix, fair, pool))
                        print(f"{mix.name} run {index + 1} {describe(run)}", flush=True)
                runs += mix_runs
                summaries.append(summarize(args, mix, mix_runs))
    finally:
        service.stop()
    report(args, summaries, runs)
    if args.out:
        figures: dict[str, Any] = {"settings": {**vars(args), "out": str(args.out)}, "cpu_count": os.cpu_count()}
        figures["summaries"] = [{**asdict(s), "held": s.held} for s in summaries]
        figures["runs"] = [asdict(run) for run in runs]
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
