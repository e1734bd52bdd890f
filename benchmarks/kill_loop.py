"""The kill loop of benchmarks/chaos.py (--kill-loop): SIGKILLs at random instants under a stream of jobs and batches.

Each kill picks, at random, a live worker holding messages then (its set of messages held: received and not
finished), or any live one when none does, once two are live (one stays up); the fleet starts another in its place.
Just before and just after each kill it reads where each open job and batch chunk is: its queue's lists, the live
workers' held sets, the worker of its run. A kill strands what was in one of those places before it and is in none
after it; the time back is from that kill to the job's (or item's) end. Batch items have no end time of their own:
a watcher reads them every WATCH_S, as a client polling would.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import redis
import requests

from benchmarks.fleet import Fleet, easy_vqa_image_paths
from blipq.client import BlipqClient
from blipq.client_errors import BlipqClientError
from contract.keys import batch_outcomes_key, broker_list_key, chunks_key, held_key, job_key, worker_key
from contract.states import JobPriority

QUEUE = "blipq"  # the queue of the fleet's workers (the VQA task's default)
BATCH_QUESTIONS = ("what color is the shape?", "what shape is in the image?")  # easy-VQA's kinds of question
BATCH_IMAGES = 3
RUNNING = b'["running"]'  # a batch item's outcome while the model answers it
WATCH_S = 0.2  # between two readings of the open batches' items


@dataclass
class KillLoop:
    """What a kill loop saw: its kills, and its batches' items as they ended (the single jobs are chaos.py's Run's)."""

    seed: int
    accepted: Mapping[str, int]  # the single jobs accepted (job id -> item index), as the submitter adds them
    stop_submitting: threading.Event  # set by the loop once its kills are done
    done_submitting: threading.Event  # set by the submitter once it stopped
    kills: list[tuple[float, bool, set[str]]] = field(default_factory=list)  # (when, victim held work, stranded)
    batches: dict[str, tuple[float, int]] = field(default_factory=dict)  # batch id -> (accepted at, items)
    items: dict[str, dict[int, tuple[float, bytes]]] = field(default_factory=dict)  # -> index -> (read ended, outcome)
    chunk_items: dict[str, list[int]] = field(default_factory=dict)  # chunk task id -> its items' indices
    ended_jobs: set[str] = field(default_factory=set)
    refused_batches: int = 0
    watcher: threading.Thread = field(default_factory=threading.Thread)

    def open_batches(self) -> list[str]:
        return [bid for bid, (_, count) in list(self.batches.items()) if len(self.items.get(bid, {})) < count]


def run_kill_loop(
    fleet: Fleet,
    client: redis.Redis,
    loop: KillLoop,
    kills: int,
    gap_s: tuple[float, float],
    batch_every_s: float,
    t0: float,
) -> None:
    """SIGKILL a worker `kills` times, `gap_s` apart at random, with batches every `batch_every_s`; then stop the
    submitters (the watcher of batch items goes on until they all ended)."""
    rng = random.Random(loop.seed)
    batcher = threading.Thread(
        target=submit_batches, args=(fleet.base, loop, batch_every_s, easy_vqa_image_paths(50)), daemon=True
    )
    loop.watcher = threading.Thread(target=watch_items, args=(client, loop), daemon=True)
    batcher.start()
    loop.watcher.start()
    host = socket.gethostname()
    for _ in range(kills):
        time.sleep(rng.uniform(*gap_s))
        while len(live := live_workers(fleet, client, host)) < 2:  # one stays up
            time.sleep(0.05)
        before = open_of(client, loop, set(live))
        victim_id = rng.choice([worker_id for worker_id in live if before.holding.get(worker_id)] or live)
        [victim] = [worker for worker in fleet.workers if f"{host}:{worker.process.pid}" == victim_id]
        others = {f"{host}:{worker.process.pid}" for worker in fleet.workers if worker is not victim}
        at = time.time()
        fleet.restart_worker(victim, signal.SIGKILL)
        after = open_of(client, loop, others)
        loop.chunk_items |= after.chunk_items
        held = len(before.holding.get(victim_id, ()))
        loop.kills.append((at, held > 0, after.unaccounted - before.unaccounted))
        stranded = len(loop.kills[-1][2])
        print(f"{at - t0:6.1f} s  SIGKILL {victim_id}: it held {held} message(s); {stranded} stranded", flush=True)
    loop.stop_submitting.set()
    batcher.join()


def live_workers(fleet: Fleet, client: redis.Redis, host: str) -> list[str]:
    """The ids of the fleet's workers whose record is live, sorted."""
    ids = sorted(f"{host}:{worker.process.pid}" for worker in fleet.workers)
    with client.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.exists(worker_key(worker_id))
        return [worker_id for worker_id, live in zip(ids, pipe.execute(), strict=True) if live]


@dataclass(frozen=True)
class Snapshot:
    """Where the open jobs and chunks of a queue are, at one instant."""

    unaccounted: set[str]  # job ids and chunk task ids in no place a live worker takes them from
    holding: dict[str, set[str]]  # worker -> task ids it holds (received and not finished) or runs
    chunk_items: dict[str, list[int]]  # chunk task id -> its items' indices
    ended_jobs: set[str]  # of the jobs asked about, those that ended


def where_open(client: redis.Redis, queue: str, jobs: list[str], batches: list[str], live: set[str]) -> Snapshot:
    """Read the queue's lists, the live workers' held sets, and where each of `jobs` and each open chunk of `batches`
    is. tests/service/test_kill_loop.py reads the service's state the same way."""
    workers = sorted(live)
    with client.pipeline(transaction=False) as pipe:
        for priority in JobPriority:
            pipe.lrange(broker_list_key(queue, priority), 0, -1)
        for worker_id in workers:
            pipe.smembers(held_key(queue, worker_id))
        for job_id in jobs:
            pipe.hmget(job_key(job_id), ["status", "worker"])
        for batch_id in batches:
            pipe.hgetall(chunks_key(batch_id))
        replies = iter(pipe.execute())
    listed = {json.loads(raw)["headers"]["id"] for _ in JobPriority for raw in next(replies)}
    holding = {worker_id: {task_id.decode() for task_id in next(replies)} for worker_id in workers}
    waiting, runs, ended = set(), {}, set()  # runs: task id -> the worker of its latest start
    for job_id in jobs:
        status, worker_id = next(replies)
        if status == b"queued":
            waiting.add(job_id)
        elif status == b"running":
            runs[job_id] = worker_id.decode()
        else:
            ended.add(job_id)
    chunk_items: dict[str, list[int]] = {}
    for batch_id in batches:
        waiting |= _chunks(batch_id, next(replies), runs, chunk_items)
    found = listed | set().union(*holding.values()) | {task_id for task_id, worker in runs.items() if worker in live}
    for task_id, worker_id in runs.items():
        holding.setdefault(worker_id, set()).add(task_id)
    return Snapshot((waiting | set(runs)) - found, holding, chunk_items, ended)


def _chunks(
    batch_id: str, raw: dict[bytes, bytes], runs: dict[str, str], chunk_items: dict[str, list[int]]
) -> set[str]:
    """A batch's chunks not yet ended (its hash of chunks): those never started; the others go in `runs`."""
    fields = {key.decode(): value.decode() for key, value in raw.items()}
    waiting = set()
    for number in filter(str.isdigit, fields):
        task_id = f"{batch_id}.{number}"
        chunk_items[task_id] = [int(i) for image in json.loads(fields[number])["images"] for i, _ in image["items"]]
        if f"{number}:w" in fields:
            runs[task_id] = fields[f"{number}:w"]
        else:
            waiting.add(task_id)
    return waiting


def open_of(client: redis.Redis, loop: KillLoop, live: set[str]) -> Snapshot:
    """Where the loop's open jobs and chunks are; the jobs found ended are not asked about again."""
    jobs = [job_id for job_id in list(loop.accepted) if job_id not in loop.ended_jobs]
    snapshot = where_open(client, QUEUE, jobs, loop.open_batches(), live)
    loop.ended_jobs |= snapshot.ended_jobs
    return snapshot


def submit_batches(base: str, loop: KillLoop, every_s: float, paths: list[Path]) -> None:
    """A batch of BATCH_IMAGES easy-VQA images x BATCH_QUESTIONS (uploads) every `every_s`, while jobs stream."""
    client = BlipqClient(base, timeout_s=30)
    rng = random.Random(loop.seed)
    while not loop.stop_submitting.wait(every_s) and not loop.done_submitting.is_set():
        try:
            batch_id, count = client.submit_batch(rng.sample(paths, BATCH_IMAGES), BATCH_QUESTIONS)
        except (BlipqClientError, requests.RequestException):
            loop.refused_batches += 1
            continue
        loop.batches[batch_id] = (time.time(), count)


def watch_items(client: redis.Redis, loop: KillLoop) -> None:
    """Note when each batch item is first read as ended, and its outcome then, until every batch ended."""
    while (batches := loop.open_batches()) or not loop.stop_submitting.is_set():
        with client.pipeline(transaction=False) as pipe:
            for batch_id in batches:
                pipe.hgetall(batch_outcomes_key(batch_id))
            replies = pipe.execute()
        now = time.time()
        for batch_id, outcomes in zip(batches, replies, strict=True):
            seen = loop.items.setdefault(batch_id, {})
            for index, value in outcomes.items():
                if value != RUNNING and int(index) not in seen:
                    seen[int(index)] = (now, value)
        time.sleep(WATCH_S)


def report_kill_loop(loop: KillLoop, client: redis.Redis) -> None:
    """Print the kill loop's figures: kills, batch items, outcomes changed, time back after each kill."""
    with client.pipeline(transaction=False) as pipe:
        for job_id in loop.accepted:
            pipe.hget(job_key(job_id), "finished_at")
        for batch_id in loop.batches:
            pipe.hgetall(batch_outcomes_key(batch_id))
        replies = iter(pipe.execute())
    ended_at = {}
    for job_id in loop.accepted:
        if finished := next(replies):
            ended_at[job_id] = datetime.fromisoformat(finished.decode()).timestamp()
    items, by_outcome, changed = 0, Counter[str](), 0
    for batch_id, (_, count) in loop.batches.items():
        outcomes, seen = next(replies), loop.items.get(batch_id, {})
        items += count
        for index, (read_at, value) in seen.items():
            ended_at[f"{batch_id}.{index}"] = read_at
            by_outcome[json.loads(value)[0]] += 1
            changed += outcomes.get(str(index).encode()) != value
    back = sorted(time_back(loop, ended_at))
    hits = sum(hit for _, hit, _ in loop.kills)
    span = loop.kills[-1][0] - loop.kills[0][0] if loop.kills else 0.0
    print(f"kills                    {len(loop.kills)} SIGKILLs in {span:.0f} s, {hits} to a worker holding messages")
    print(f"batches                  {len(loop.batches)} accepted ({items} items; {loop.refused_batches} refused)")
    print(f"batch items by outcome   {dict(by_outcome)}; not ended: {items - sum(by_outcome.values())}")
    print(f"item outcomes changed    {changed}  (between their first reading as ended and the last)")
    stranded = sum(len(task_ids) for _, _, task_ids in loop.kills)
    print(f"stranded by the kills    {stranded} jobs and chunks ({len(back)} jobs and items)")
    if back:
        p99 = back[min(len(back) - 1, int(0.99 * len(back)))]
        print(
            f"time back after a kill   p50 {statistics.median(back):.2f} s, p99 {p99:.2f} s, worst {back[-1]:.2f} s"
            "  (from the kill that stranded a job or item to its end)"
        )
    print(f"kill schedule seed       {loop.seed}")


def time_back(loop: KillLoop, ended_at: dict[str, float]) -> list[float]:
    """For each job and item a kill stranded, the seconds from the last kill that stranded it to its end."""
    stranded_at: dict[str, float] = {}
    for at, _, task_ids in loop.kills:
        for task_id in task_ids:
            batch_id = task_id.rpartition(".")[0]
            names = [task_id] if task_id in loop.accepted else [f"{batch_id}.{i}" for i in loop.chunk_items[task_id]]
            for name in names:
                if at < ended_at.get(name, 0.0):
                    stranded_at[name] = max(at, stranded_at.get(name, at))
    return [ended_at[name] - at for name, at in stranded_at.items()]
