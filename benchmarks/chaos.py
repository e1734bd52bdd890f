"""Chaos run: a stream of jobs through the real service while workers are killed and the Redis primary is lost.

    python -m benchmarks.chaos [--jobs 3000] [--rate 60] [--workers 2] [--time-limit 30] [--redis sentinel|single]
    python -m benchmarks.chaos --kill-loop 50 [--workers 3] [--rate 20] [--batch-every-s 2] [--seed N] ...
    python -m benchmarks.chaos --smoke   # the kill loop at its smallest: one kill, two workers, one Redis

Starts its own Redis (by default a primary, two replicas and three sentinels, which every process goes through; with
`--redis single`, one server with its append-only file on), the API (gunicorn, real HTTP) and N workers serving the
shipped demo model; submits easy-VQA test questions as uploads at a steady rate while, one after the other: a worker
is SIGKILLed (twice, on two workers: the OOM killer, a lost node), a worker gets SIGTERM (a deploy), and the Redis
primary is SIGKILLed (the sentinels promote a replica; the old primary comes back as a replica) or, with a single
server, Redis is stopped and started again. Every stopped worker is started again, as a supervisor would. Then it
waits for every accepted job to end and prints: submitted, accepted, refused by code, succeeded, failed (by code),
202s lost, jobs run although their submission was refused, duplicate executions, answers changed, the delay before
each job a killed worker held (running, or received and not started) ran again, with the worst, and p50/p99
end-to-end latency.

"Answers changed" counts answers that differ from the same model answering in this process, one job at a time (an
undisturbed run), plus answers that changed between two readings. The jobs a killed worker held are published again
by the reaper once the worker's record expires (workers announce every 2 s here, so 6 s; the reaper looks every 2 s);
their old messages come back after the visibility timeout (--time-limit + 60 s) and are skipped. "Run although
refused" counts the job records that are not pending and were never answered 202 (a submission answered 503 is
withdrawn, or stays pending, which nothing runs).

With --kill-loop KILLS, the blows are instead KILLS SIGKILLs at random instants (--kill-gap-s apart, at random; the
schedule's seed is printed, --seed replays it) of a worker picked at random among those holding messages then (any
live one when none does), each started again at once, while single jobs stream at --rate (200 distinct questions,
cycled, until the kills are done) and a batch of 3 images x 2 questions goes every --batch-every-s; a kill waits until
two workers are live, so that one stays up. Each kill's
victim is noted as holding messages or not (its set of messages held: received and not finished), and each job or
batch chunk it stranded (open, and in no place a live worker takes it from: its queue's list, a live worker's held
set, a run on a live worker, just after the kill, though it was in one just before). It prints the kills, the jobs
and items accepted and how they ended, outcomes that changed between two readings (duplicates a client would see),
the time from each kill to the end of each job and item it stranded (p50, p99, worst), and end-to-end latency.
"""

from __future__ import annotations

import argparse
import itertools
import secrets
import signal
import socket
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import redis
import requests
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from benchmarks.fleet import Fleet, Worker, load_items, wait_until_serving
from benchmarks.kill_loop import KillLoop, report_kill_loop, run_kill_loop
from contract.broker import visibility_timeout_for
from contract.job_store import JobStore
from contract.keys import held_key, job_key

FINAL = (b"succeeded", b"failed")
BLOW_INTERVAL_S = 6.0  # between two blows: long enough for the fleet to be busy again
QUEUE = "blipq"  # the queue of the fleet's workers (the VQA task's default)
KILL_LOOP_QUESTIONS = 200  # distinct questions of a kill loop's stream


@dataclass
class Run:
    """What the run saw: accepted jobs, refusals, and the blows with the jobs each one hit."""

    items: list[tuple[bytes, str, str]]  # (image, question, reference answer)
    accepted: dict[str, int] = field(default_factory=dict)  # job id -> item index
    submitted: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # error code (or HTTP status) -> count, all retried
    blows: list[tuple[str, float, set[str]]] = field(default_factory=list)  # (kind, wall time, jobs it hit)
    held: dict[str, tuple[float, str]] = field(default_factory=dict)  # job received, not started -> (blow, worker)
    before: set[str] = field(default_factory=set)  # job ids in Redis before the run (the warm-up job)
    done_submitting: threading.Event = field(default_factory=threading.Event)
    stop_submitting: threading.Event = field(default_factory=threading.Event)  # set: submit no more


def submit_all(base: str, run: Run, rate: float) -> None:
    """Submit every item at `rate` per second; a 503 (Redis away) is retried after a pause, as a client would."""
    session = requests.Session()
    for index, (image, question, _) in enumerate(run.items):
        if run.stop_submitting.is_set():
            break
        due = time.monotonic() + 1 / rate
        while True:
            run.submitted += 1
            try:
                files = {"image": ("q.png", image, "image/png")}
                response = session.post(f"{base}/v1/jobs", data={"question": question}, files=files, timeout=30)
            except requests.RequestException:
                run.refused["no answer"] += 1
                time.sleep(0.5)
                continue
            if response.status_code == 202:
                run.accepted[response.json()["id"]] = index
                break
            try:
                run.refused[f"{response.status_code} {response.json()['error']['code']}"] += 1
            except (ValueError, KeyError):
                run.refused[str(response.status_code)] += 1
            time.sleep(0.5)
        time.sleep(max(0.0, due - time.monotonic()))
    run.done_submitting.set()


def running_on(client: redis.Redis, job_ids: list[str], worker_ids: set[str]) -> set[str]:
    """The jobs now running in one of these pool processes (host:pid, as the worker records them)."""
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(job_key(job_id), ["status", "worker"])
        rows = pipe.execute()
    return {
        job_id
        for job_id, (status, worker) in zip(job_ids, rows, strict=True)
        if status == b"running" and (worker or b"").decode() in worker_ids
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=60.0, help="jobs submitted per second (above capacity: busy)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--time-limit", type=int, default=30, help="BLIPQ_JOB_TIME_LIMIT_S of the workers")
    parser.add_argument("--redis", choices=("sentinel", "single"), default="sentinel")
    parser.add_argument("--kill-loop", type=int, default=0, metavar="KILLS", help="SIGKILLs at random instants instead")
    parser.add_argument("--kill-gap-s", type=float, nargs=2, default=(1.0, 4.0), metavar=("MIN", "MAX"))
    parser.add_argument("--batch-every-s", type=float, default=2.0, help="with --kill-loop: a batch every so often")
    parser.add_argument("--seed", type=int, default=None, help="with --kill-loop: the kill schedule's seed")
    parser.add_argument("--smoke", action="store_true", help="--kill-loop 1, 2 workers, --redis single, 20 jobs at 5/s")
    args = parser.parse_args()
    if args.smoke:
        args.kill_loop, args.workers, args.redis, args.jobs, args.rate = 1, 2, "single", 20, 5.0
        args.kill_gap_s, args.batch_every_s = (0.5, 1.0), 0.5
    return args


def main() -> int:
    args = parse_args()

    # SIGTERM (a timeout, pkill) stops the fleet too, through the `finally` below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))
    # The kill loop cycles through a few hundred questions (each still answered by the model: the fleet runs without
    # the answer cache): it stops submitting when its kills are done, and the in-process answers cost a model call each.
    distinct = min(args.jobs, KILL_LOOP_QUESTIONS) if args.kill_loop else args.jobs
    print(f"preparing {distinct} questions and their in-process answers...", flush=True)
    run = Run(list(itertools.islice(itertools.cycle(load_items(distinct)), args.jobs)))
    quick_recovery = {"BLIPQ_ANNOUNCE_INTERVAL_S": "2", "BLIPQ_REAPER_INTERVAL_S": "2"}
    fleet = Fleet(max(2, args.workers), args.time_limit, quick_recovery, sentinel=args.redis == "sentinel")
    client = fleet.target.client(retry=Retry(ExponentialBackoff(cap=1.0), 30))  # reads ride out the failover
    host = socket.gethostname()
    try:
        wait_until_serving(fleet, run.items[0])
        run.before = {key.decode().removeprefix("blipq:job:") for key in client.scan_iter(match="blipq:job:*")}
        started = time.time()
        submitter = threading.Thread(target=submit_all, args=(fleet.base, run, args.rate), daemon=True)
        submitter.start()
        if args.kill_loop:
            kill_loop(fleet, client, run, submitter, args, started)
            return 0

        def blow(kind: str, worker: Worker | None, action: Callable[[], object]) -> None:
            time.sleep(BLOW_INTERVAL_S)
            holder = {f"{host}:{worker.process.pid}"} if worker else set()
            # Messages the worker received and has not finished, started or not: they, too, must run again.
            held = {
                (member.decode(), worker_id)
                for worker_id in holder
                for member in client.smembers(held_key(QUEUE, worker_id))
            }
            at = time.time()
            outcome = action()
            if isinstance(outcome, float):
                print(f"{at - started:6.1f} s  {kind}: the sentinels named a new primary after {outcome:.1f} s")
            # A job still `running` on the worker after the blow was cut short (that process is gone).
            hit = running_on(client, list(run.accepted), holder) if holder else set()
            run.held |= {
                job_id: (at, worker_id) for job_id, worker_id in held if job_id in run.accepted and job_id not in hit
            }
            run.blows.append((kind, at, hit))
            print(f"{at - started:6.1f} s  {kind}: {len(hit)} running job(s) hit", flush=True)

        first, last = fleet.workers[0], fleet.workers[-1]
        blow("SIGKILL worker", first, lambda: fleet.restart_worker(first, signal.SIGKILL))
        blow("SIGKILL worker", last, lambda: fleet.restart_worker(last, signal.SIGKILL))
        blow("SIGTERM worker", first, lambda: fleet.restart_worker(first, signal.SIGTERM))
        if fleet.group is not None:
            blow("Redis primary SIGKILL", None, fleet.fail_over)
        else:
            blow("Redis restart", None, fleet.restart_redis)
        submitter.join()

        deadline = time.monotonic() + visibility_timeout_for(args.time_limit) + 120
        first_answers = wait_for_all(client, list(run.accepted), deadline)
        report(run, client, JobStore(client, 3600), first_answers, started)
    finally:
        fleet.stop()
        print(f"logs: {fleet.data_dir / 'service.log'}")
    return 0


def kill_loop(
    fleet: Fleet, client: redis.Redis, run: Run, submitter: threading.Thread, args: argparse.Namespace, t0: float
) -> None:
    """--kill-loop: the kills and the batches (benchmarks/kill_loop.py) under the stream of jobs; then the report."""
    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    loop = KillLoop(seed, run.accepted, run.stop_submitting, run.done_submitting)
    print(f"kill schedule seed {seed} (--seed {seed} replays it)", flush=True)
    run_kill_loop(fleet, client, loop, args.kill_loop, tuple(args.kill_gap_s), args.batch_every_s, t0)
    submitter.join()
    deadline = time.monotonic() + visibility_timeout_for(args.time_limit) + 120
    first_answers = wait_for_all(client, list(run.accepted), deadline)
    loop.watcher.join(max(0.0, deadline - time.monotonic()))
    report(run, client, JobStore(client, 3600), first_answers, t0)
    report_kill_loop(loop, client)


def wait_for_all(client: redis.Redis, job_ids: list[str], deadline: float) -> dict[str, str]:
    """Wait until every job ended (or the deadline); the answers as first read."""
    answers: dict[str, str] = {}
    while time.monotonic() < deadline:
        pending = [job_id for job_id in job_ids if job_id not in answers]
        if not pending:
            break
        with client.pipeline(transaction=False) as pipe:
            for job_id in pending:
                pipe.hmget(job_key(job_id), ["status", "answer"])
            rows = pipe.execute()
        for job_id, (status, answer) in zip(pending, rows, strict=True):
            if status in FINAL:
                answers[job_id] = (answer or b"").decode()
        time.sleep(1.0)
    return answers


def report(run: Run, client: redis.Redis, store: JobStore, first: dict[str, str], started: float) -> None:
    """Print the run's figures."""
    fields = ["status", "answer", "error_code", "created_at", "started_at", "finished_at", "attempts", "worker"]
    with client.pipeline(transaction=False) as pipe:
        for job_id in run.accepted:
            pipe.hmget(job_key(job_id), fields)
        raw_rows = pipe.execute()
    rows = {job_id: dict(zip(fields, row, strict=True)) for job_id, row in zip(run.accepted, raw_rows, strict=True)}
    statuses = Counter((row["status"] or b"missing").decode() for row in rows.values())
    failed_codes = Counter((row["error_code"] or b"").decode() for row in rows.values() if row["status"] == b"failed")
    lost = len(run.accepted) - len(first)
    changed_vs_reference = sum(
        1
        for job_id, index in run.accepted.items()
        if rows[job_id]["status"] == b"succeeded" and rows[job_id]["answer"].decode() != run.items[index][2]
    )
    changed_after_read = sum(
        1 for job_id, answer in first.items() if (rows[job_id]["answer"] or b"").decode() != answer
    )
    latencies = sorted(
        seconds_between(row["created_at"], row["finished_at"]) for row in rows.values() if row["status"] in FINAL
    )
    stats = store.stats()
    print()
    print(f"run time                 {time.time() - started:.0f} s")
    print(f"submitted (tries)        {run.submitted}")
    print(f"accepted (202)           {len(run.accepted)}")
    print(f"refused                  {dict(run.refused)}  (0 = no HTTP answer; 503 = Redis away, retried)")
    print(f"succeeded                {statuses.get('succeeded', 0)}")
    print(f"failed by code           {dict(failed_codes)}")
    print(f"202s lost                {lost}")
    print(f"run although refused     {ghosts(client, run)}  (job records never answered 202 that are not pending)")
    print(f"executions               {stats['executions']}  (reruns after a kill: {stats['reruns']})")
    print(f"duplicate executions     {stats['duplicate_executions']}  (answers computed twice, the second dropped)")
    print(f"duplicate deliveries     {stats['duplicate_deliveries']}  (delivered after they ended; not run again)")
    print(
        f"answers changed          {changed_vs_reference + changed_after_read}  "
        f"(vs undisturbed run: {changed_vs_reference}, between two readings: {changed_after_read})"
    )
    every_delay = []
    for kind, at, hit in run.blows:
        delays = [
            seconds_since(at, rows[job_id]["started_at"]) for job_id in hit if int(rows[job_id]["attempts"] or 0) > 1
        ]
        # A held job counts when another worker ran it (the blown one may have started it before it went).
        delays += [
            seconds_since(at, rows[job_id]["started_at"])
            for job_id, (held_at, worker_id) in run.held.items()
            if held_at == at and (rows[job_id]["worker"] or b"").decode() != worker_id
        ]
        every_delay += delays
        shown = ", ".join(f"{delay:.1f} s" for delay in sorted(delays)) or "no job ran again (none was cut short)"
        print(f"redelivery after {kind:22s} {shown}")
    if every_delay:
        print(
            f"redelivery of the jobs killed workers held ({len(every_delay)}, started or not): "
            f"p50 {statistics.median(every_delay):.1f} s, worst {max(every_delay):.1f} s"
        )
    if latencies:
        p50 = statistics.median(latencies)
        p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        print(f"end-to-end latency       p50 {p50:.2f} s, p99 {p99:.2f} s (created -> finished)")


def ghosts(client: redis.Redis, run: Run) -> int:
    """Job records that are not pending (a worker may run them) although no submission was answered 202 with them."""
    count = 0
    for key in client.scan_iter(match="blipq:job:*", count=1000):
        job_id = key.decode().removeprefix("blipq:job:")
        if job_id not in run.accepted and job_id not in run.before and client.hget(key, "pending") != b"1":
            count += 1
    return count


def parse_time(value: bytes | None) -> float:
    return datetime.fromisoformat((value or b"").decode()).timestamp()


def seconds_between(start: bytes | None, end: bytes | None) -> float:
    return parse_time(end) - parse_time(start)


def seconds_since(at: float, value: bytes | None) -> float:
    return parse_time(value) - at


if __name__ == "__main__":
    sys.exit(main())
