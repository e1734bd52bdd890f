"""Every message a killed worker took is back within seconds, wherever the kill lands.

A steady stream of single jobs and batches runs through a few workers while one of them is SIGKILLed at a random
instant, KILLS times (picked at random among those then holding messages, if any is), and a new one is started in
its place after each kill, as a supervisor would (at least one other worker is always up). The workers are real
`python -m worker` processes forked from a process that has imported them already (tests/support/worker_forks.py):
a plain start costs seconds of CPU, and the loop starts dozens. Images come by URL from a local server that answers
each after a random delay (so that workers hold messages while they fetch), or as uploads.

Per job and per batch item, the test asserts that it ends, with the answer the model gives undisturbed, that its
outcome never changes once read as ended, and that it ends within RECOVERY_BOUND_S (the worker record's expiry, one
reaper sweep and a margin) of the later of its acceptance and the last kill that stranded it. A kill strands a job
(or a batch's chunk) that was accounted for just before it and is not just after it: open, and in no place a live
worker takes it from (its level's list, a live worker's held set, a run on a live worker). It also asserts that most
kills found the victim holding messages (received and not finished).

The kill schedule's seed is printed and is in every failure message; BLIPQ_KILL_SEED replays a schedule (the
service's own timing still varies).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
import secrets
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import redis
from flask.testing import FlaskClient

from benchmarks.kill_loop import Snapshot, where_open
from blipq.up_redis import RedisProcess, start_redis
from contract.fleet import fleet_client, live_workers
from contract.images import decode_image
from contract.job_store import JobStore
from contract.keys import batch_outcomes_key, job_key
from tests.support.images import shape_png
from tests.support.service import QuietHandler, api_client, http_server
from tests.support.worker_forks import ForkedWorker, WorkerForks
from worker.inference import answer_questions, load_model

QUEUE = "kill-loop"
WORKERS = 4
KILLS = 50
KILL_GAP_S = (0.3, 1.2)  # between two kills, uniformly at random
ANNOUNCE_S = 0.5
RECORD_EXPIRY_S = max(1, round(ANNOUNCE_S * 3))  # contract/fleet.py: three announce intervals, whole seconds
REAPER_S = 0.5
MARGIN_S = 5.0  # for the job published again to be taken, fetched and answered, on a 2-core machine others share
RECOVERY_BOUND_S = RECORD_EXPIRY_S + REAPER_S + MARGIN_S
HIT_FRACTION = 0.6  # of the kills, at least, find the victim holding messages
JOBS_PER_S = 10
ANSWER_TOKENS = 4  # short answers: the model's part of a run stays small on a busy machine
OPEN_MAX = 12  # answers accepted and not ended, at most, before the stream waits: half what the workers may hold
BATCH_EVERY_S = 1.0  # a batch of 3 images x 2 questions (two chunks of at most 4)
FETCH_DELAY_S = 0.3  # the most an image's server waits before it answers
DRAIN_S = 60  # after the last kill, for every job to end
COLORS = ["red", "green", "blue", "black", "yellow", "teal"]
SHAPES = ["circle", "square"]
QUESTIONS = ["what color is the shape?", "is there a circle?", "what shape is in the image?", "how many?"]
HOST = socket.gethostname()
RUNNING = '["running"]'


@dataclass
class Unit:
    """A single job, or a batch item: when it was accepted, what it must answer, and what was seen of its end."""

    name: str  # a job's id, or an item's `<batch id>.<index>`
    accepted: float
    expected: str
    ended: float | None = None  # epoch seconds
    outcome: str = ""  # as first read once ended
    stranded: list[float] = field(default_factory=list)  # the kills that stranded it

    def stranded_before_end(self) -> list[float]:
        return [at for at in self.stranded if self.ended is not None and at < self.ended]


@dataclass
class Kill:
    at: float
    hit: bool  # the victim held messages: received and not finished
    stranded: int


@dataclass
class Loop:
    """What the loop accepted and saw."""

    singles: dict[str, Unit] = field(default_factory=dict)  # job id -> unit
    items: dict[str, list[Unit]] = field(default_factory=dict)  # batch id -> its items
    kills: list[Kill] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    submitting: threading.Event = field(default_factory=threading.Event)  # cleared: stop submitting
    watching: threading.Event = field(default_factory=threading.Event)  # cleared: stop watching

    def open_singles(self) -> list[str]:
        with self.lock:
            return [job_id for job_id, unit in self.singles.items() if unit.ended is None]

    def open_answers(self) -> int:
        with self.lock:
            return sum(unit.ended is None for unit in (*self.singles.values(), *itertools.chain(*self.items.values())))

    def open_batches(self) -> list[str]:
        with self.lock:
            return [bid for bid, units in self.items.items() if any(unit.ended is None for unit in units)]

    def units(self) -> list[Unit]:
        with self.lock:
            return [*self.singles.values(), *itertools.chain.from_iterable(self.items.values())]


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A Redis of this test's own: its killed workers leave unacknowledged messages that no other test should see."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def slow_images() -> Iterator[str]:
    """A base URL of shape images, `/<color>-<shape>.png?d=<seconds>`, each answered after that delay."""

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            color, shape = url.path.strip("/").removesuffix(".png").split("-")
            time.sleep(float(parse_qs(url.query).get("d", ["0"])[0]))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the worker asking was killed
                self.answer(200, "image/png", shape_png(color, shape=shape))

    with http_server(Handler) as port:
        yield f"http://127.0.0.1:{port}"


def reference_answers(model_dir: Path) -> dict[tuple[str, str, str], str]:
    """What the model answers undisturbed, in this process, for every (color, shape, question)."""
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    return {
        (color, shape, question): answer_questions(
            loaded, [decode_image(shape_png(color, shape=shape), 10**6)], [question], ANSWER_TOKENS
        )[0]
        for color, shape, question in itertools.product(COLORS, SHAPES, QUESTIONS)
    }


def submit_stream(client: FlaskClient, images: str, answers: dict[tuple[str, str, str], str], loop: Loop) -> None:
    """Single jobs at JOBS_PER_S (every third one uploaded) and a batch every BATCH_EVERY_S until told to stop; slower
    while OPEN_MAX answers are open (a machine too busy to keep up would otherwise measure its backlog)."""
    rng = random.Random(1)
    next_due = time.monotonic()
    for number in itertools.count():
        while loop.submitting.is_set() and (time.monotonic() < next_due or loop.open_answers() >= OPEN_MAX):
            time.sleep(0.01)
        if not loop.submitting.is_set():
            return
        next_due = max(next_due, time.monotonic() - 1) + 1 / JOBS_PER_S
        color, shape, question = rng.choice(COLORS), rng.choice(SHAPES), rng.choice(QUESTIONS)
        if number % 3 == 0:
            upload = (io.BytesIO(shape_png(color, shape=shape)), "s.png", "image/png")
            response = client.post("/v1/jobs", data={"question": question, "image": upload})
        else:
            url = f"{images}/{color}-{shape}.png?d={rng.uniform(0, FETCH_DELAY_S):.3f}"
            response = client.post("/v1/jobs", json={"image_url": url, "question": question})
        assert response.status_code == 202, response.get_json()
        job_id = response.get_json()["id"]
        with loop.lock:
            loop.singles[job_id] = Unit(job_id, time.time(), answers[color, shape, question])
        if number % round(JOBS_PER_S * BATCH_EVERY_S) == 0:
            submit_batch(client, images, answers, loop, rng)


def submit_batch(
    client: FlaskClient, images: str, answers: dict[tuple[str, str, str], str], loop: Loop, rng: random.Random
) -> None:
    shapes = [(rng.choice(COLORS), rng.choice(SHAPES)) for _ in range(3)]
    questions = rng.sample(QUESTIONS, 2)
    urls = [f"{images}/{color}-{shape}.png?d={rng.uniform(0, FETCH_DELAY_S):.3f}" for color, shape in shapes]
    response = client.post("/v1/batches", json={"images": urls, "questions": questions})
    assert response.status_code == 202, response.get_json()
    batch_id, accepted = response.get_json()["id"], time.time()
    pairs = [(color, shape, question) for color, shape in shapes for question in questions]  # the items, in order
    with loop.lock:
        loop.items[batch_id] = [Unit(f"{batch_id}.{n}", accepted, answers[pair]) for n, pair in enumerate(pairs)]


def watch_ends(client: redis.Redis, loop: Loop) -> None:
    """Note when each job and item is first read as ended, and its outcome then, until told to stop."""
    while loop.watching.is_set():
        time.sleep(0.1)
        singles, batches = loop.open_singles(), loop.open_batches()
        with client.pipeline(transaction=False) as pipe:
            for job_id in singles:
                pipe.hmget(job_key(job_id), ["status", "answer", "finished_at"])
            for batch_id in batches:
                pipe.hgetall(batch_outcomes_key(batch_id))
            replies = pipe.execute()
        now = time.time()
        with loop.lock:
            for job_id, (status, answer, finished_at) in zip(singles, replies, strict=False):
                if status in (b"succeeded", b"failed"):
                    unit = loop.singles[job_id]
                    unit.outcome = f"{status.decode()}:{(answer or b'').decode()}"
                    unit.ended = parse_iso(finished_at)
            for batch_id, outcomes in zip(batches, replies[len(singles) :], strict=True):
                for index, unit in enumerate(loop.items[batch_id]):
                    value = outcomes.get(str(index).encode())
                    if unit.ended is None and value is not None and value.decode() != RUNNING:
                        unit.outcome, unit.ended = value.decode(), now


def parse_iso(value: bytes) -> float:
    return datetime.fromisoformat(value.decode()).timestamp()


class Workers:
    """The loop's workers, forked from one process, each replaced by a new one as soon as it is killed."""

    def __init__(self, redis_url: str, model_dir: Path, logs: Path) -> None:
        self.env = {
            **os.environ,
            "BLIPQ_REDIS_URL": redis_url,
            "BLIPQ_MODEL": str(model_dir),
            "BLIPQ_QUEUE": QUEUE,
            "BLIPQ_TORCH_THREADS": "1",
            "BLIPQ_FETCH_ALLOW_NETWORKS": "127.0.0.1/32",
            "BLIPQ_FETCH_ALLOW_PORTS": "1024-65535",
            "BLIPQ_METRICS_PORT": "0",
            "BLIPQ_ANNOUNCE_INTERVAL_S": str(ANNOUNCE_S),
            "BLIPQ_REAPER_INTERVAL_S": str(REAPER_S),
            # A few messages each: every worker holds part of the stream, and the rest waits in the queue.
            "BLIPQ_WORKER_CONCURRENCY": "6",
            "BLIPQ_WORKER_INTAKE": "6",
            # Kills go to workers holding messages: a job may well be held by the victim of several kills in a row,
            # which is no poison pill (tests/service/test_chaos.py covers `worker_lost`).
            "BLIPQ_MAX_ATTEMPTS": "1000",
            "BLIPQ_MAX_NEW_TOKENS": str(ANSWER_TOKENS),
        }
        self.logs, self.numbers = logs, itertools.count()
        self.fleet = fleet_client(redis_url)
        self.forks = WorkerForks(dict(os.environ))
        self.up = [self._spawn() for _ in range(WORKERS)]

    def ready(self) -> list[ForkedWorker]:
        """The workers that announced themselves (their model loaded), by pid."""
        announced = {record.id for record in live_workers(self.fleet, QUEUE)}
        return sorted((worker for worker in self.up if identity(worker) in announced), key=lambda w: w.pid)

    def replace(self, killed: ForkedWorker) -> None:
        self.up[self.up.index(killed)] = self._spawn()

    def log_tails(self) -> str:
        return "\n".join(worker.log_tail(10) for worker in self.up)

    def _spawn(self) -> ForkedWorker:
        number = next(self.numbers)
        argv = [f"--hostname=kill{number}@%h", "--loglevel=INFO"]
        return self.forks.spawn(self.env, argv, self.logs / f"worker{number}.log")


def identity(worker: ForkedWorker) -> str:
    """The worker's id, as its record, its held set and the jobs it runs name it."""
    return f"{HOST}:{worker.pid}"


@pytest.mark.timeout(600)  # a minute or two on a quiet 2-core machine; more when it is shared
def test_every_message_a_killed_worker_took_is_back_within_seconds(
    own_redis: RedisProcess, tiny_model_dir: Path, slow_images: str, tmp_path: Path
) -> None:
    # Given: a few workers, and a steady stream of single jobs and batches
    seed = int(os.environ.get("BLIPQ_KILL_SEED") or secrets.randbelow(2**32))
    print(f"kill schedule seed: {seed} (BLIPQ_KILL_SEED={seed} replays it)")
    rng = random.Random(seed)
    answers = reference_answers(tiny_model_dir)
    client = redis.Redis.from_url(own_redis.url)
    loop = Loop()
    workers = Workers(own_redis.url, tiny_model_dir, tmp_path)
    try:
        wait_until(lambda: len(workers.ready()) == WORKERS, "the workers to start", workers)
        api = api_client(own_redis.url, QUEUE, batch_chunk_size=4)
        submitter = threading.Thread(target=submit_stream, args=(api, slow_images, answers, loop), daemon=True)
        watcher = threading.Thread(target=watch_ends, args=(client, loop), daemon=True)
        loop.submitting.set()
        loop.watching.set()
        submitter.start()
        watcher.start()

        # When: a worker is SIGKILLed at a random instant, again and again, and another started in its place
        for _ in range(KILLS):
            time.sleep(rng.uniform(*KILL_GAP_S))
            wait_until(lambda: len(workers.ready()) >= 2, "two workers to be ready", workers)
            kill_one(rng, workers, client, loop)

        # Then: every job and item ends, each within the bound of the kill that stranded it, none visibly twice
        loop.submitting.clear()
        submitter.join()
        wait_until(lambda: not loop.open_singles() and not loop.open_batches(), "every job to end", workers, DRAIN_S)
        check(loop, client, seed)
    finally:
        loop.submitting.clear()
        loop.watching.clear()
        workers.forks.stop()


def kill_one(rng: random.Random, workers: Workers, client: redis.Redis, loop: Loop) -> None:
    """SIGKILL a ready worker, one holding messages if any does, and start another; note what the kill stranded."""
    ready = workers.ready()
    before = where_open(client, QUEUE, loop.open_singles(), loop.open_batches(), {identity(w) for w in workers.up})
    victim = rng.choice([worker for worker in ready if before.holding.get(identity(worker))] or ready)
    at = time.time()
    victim.kill()
    others = {identity(worker) for worker in workers.up if worker is not victim}
    after = where_open(client, QUEUE, loop.open_singles(), loop.open_batches(), others)
    record_kill(loop, at, bool(before.holding.get(identity(victim))), after.unaccounted - before.unaccounted, after)
    workers.replace(victim)


def record_kill(loop: Loop, at: float, hit: bool, stranded: set[str], after: Snapshot) -> None:
    """Note a kill, and the jobs and items it stranded."""
    with loop.lock:
        loop.kills.append(Kill(at, hit, len(stranded)))
        for task_id in stranded:
            if task_id in loop.singles:
                loop.singles[task_id].stranded.append(at)
                continue
            batch_id = task_id.rpartition(".")[0]
            for index in after.chunk_items.get(task_id, []):
                loop.items[batch_id][index].stranded.append(at)


def check(loop: Loop, client: redis.Redis, seed: int) -> None:
    """The loop's assertions, and its figures printed."""
    units = loop.units()
    assert all(unit.ended is not None for unit in units)
    recovery = [(unit.ended - max([unit.accepted, *unit.stranded_before_end()]), unit) for unit in units]
    back = sorted(seconds for seconds, unit in recovery if unit.stranded_before_end())
    slowest = max(recovery, key=lambda pair: pair[0])
    hits = sum(kill.hit for kill in loop.kills)
    stats = JobStore(client, 60).stats()
    figures = (
        f"seed {seed}: {len(loop.kills)} kills in {loop.kills[-1].at - loop.kills[0].at:.0f} s, {hits} of them found"
        f" the victim holding messages, {sum(k.stranded for k in loop.kills)} jobs and chunks stranded; "
        f"{len(loop.singles)} jobs and {len(units) - len(loop.singles)} batch items accepted, all ended; "
        f"time back after the kill that stranded them ({len(back)} jobs and items): {spread(back)}; any job or item, "
        f"from its acceptance or its last stranding: worst {slowest[0]:.2f} s ({slowest[1].name}); "
        f"republished {stats['republished']}, duplicate deliveries {stats['duplicate_deliveries']}, duplicate "
        f"executions {stats['duplicate_executions']} (answers dropped)"
    )
    print(figures)
    succeeded = {f"succeeded:{unit.expected}" for unit in units} | {item_succeeded(unit.expected) for unit in units}
    wrong = [unit for unit in units if unit.outcome not in succeeded]
    assert not wrong, f"{len(wrong)} jobs or items ended otherwise than undisturbed, e.g. {wrong[:3]}; {figures}"
    changed = changed_outcomes(loop, client)
    assert not changed, f"{len(changed)} outcomes changed after they were read as ended: {changed[:3]}; {figures}"
    late = [(round(seconds, 2), unit) for seconds, unit in recovery if seconds > RECOVERY_BOUND_S]
    assert not late, f"{len(late)} ended later than {RECOVERY_BOUND_S} s: {late[:3]}; {figures}"
    assert len(loop.kills) >= KILLS and hits >= HIT_FRACTION * len(loop.kills), figures


def spread(seconds: list[float]) -> str:
    """p50, p99 and worst of sorted durations."""
    if not seconds:
        return "none"
    p99 = seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]
    return f"p50 {statistics.median(seconds):.2f} s, p99 {p99:.2f} s, worst {seconds[-1]:.2f} s"


def changed_outcomes(loop: Loop, client: redis.Redis) -> list[str]:
    """The jobs and items whose outcome now differs from the one first read."""
    changed = []
    with client.pipeline(transaction=False) as pipe:
        for job_id in loop.singles:
            pipe.hmget(job_key(job_id), ["status", "answer"])
        for batch_id in loop.items:
            pipe.hgetall(batch_outcomes_key(batch_id))
        replies = iter(pipe.execute())
    for job_id, unit in loop.singles.items():
        status, answer = next(replies)
        if f"{status.decode()}:{answer.decode()}" != unit.outcome:
            changed.append(job_id)
    for batch_id, units in loop.items.items():
        outcomes = next(replies)
        changed += [
            f"{batch_id}.{i}" for i, unit in enumerate(units) if outcomes[str(i).encode()].decode() != unit.outcome
        ]
    return changed


def item_succeeded(answer: str) -> str:
    """A batch item's outcome as its batch keeps it, once answered (contract/batches.py outcome_value)."""
    return json.dumps(["succeeded", answer], separators=(",", ":"))


def wait_until(condition: Callable[[], bool], what: str, workers: Workers, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout_s} s for {what}\n{workers.log_tails()}"
        time.sleep(0.02)
