"""The reaper: republishes jobs whose Celery message was lost, so that an accepted job always runs.

Late acknowledgement and the visibility timeout bring back a job that a worker had received. Two gaps remain that
Celery cannot see, because the message no longer exists anywhere:
- kombu's Redis transport takes a message with BRPOP and records it as unacknowledged in a second step; a worker
  killed between the two loses it;
- the API stores a job and then publishes its message; an API process killed between the two (or a publish whose
  reply was lost) leaves a job with no message.

Every job is in its queue level's set of jobs never started (scored by enqueue time) until a worker starts it, and
each start moves the level's mark to the enqueue time of the job started. Each priority level of a queue is a Redis
list of its own, first in, first out (a high-priority job overtakes low ones, never one of its own level), so a job
still unstarted well after a later job of its level started (by more than a job's time limit, the longest a received
job waits before it starts) has lost its message. So has one that waited longer than the visibility timeout while its
level's list is empty (an idle level moves no mark; a level with messages waiting moves it again once they run, so a
long wait behind higher levels or a deep backlog is not mistaken for a loss). The reaper publishes such a job again,
under the same task id. A job republished needlessly (its message was only slow) runs once all the same: the second
delivery finds it ended and is skipped.

A job whose worker died while running it (the whole worker: killed, out of memory, its machine gone) still has its
message, unacknowledged, but Redis's transport restores it only after the visibility timeout. The reaper publishes it
again as soon as the worker's record (worker/contract/fleet.py, refreshed every few seconds by a live worker) has
expired: the job's next start counts an attempt, so a job that kills every worker that takes it ends `worker_lost`. The
old message, once restored, finds the job ended or running and is skipped or runs once more (its answer is dropped).

A job or chunk that a worker had received but not started yet when it died is not in the running set, and no later
start may move its level's mark soon (a burst's jobs all share a few seconds of enqueue times). A worker therefore
records each message it receives, before a thread starts it, in its set of messages held (`Receipts`; the start
script takes it out): once the worker's record has expired, the reaper publishes again every message in that set
whose job (or chunk) has not started. Every job a dead worker held, started or not, runs again within about the
record's expiry and one sweep.

A batch's chunks are watched the same way, as members `chunk:<batch id>:<number>:<answers>` of the same sets: a chunk
whose message was lost, or whose worker died, is published again from the copy its batch keeps until the chunk ends.

The reaper also ends `expired` the queued jobs whose deadline has passed, and closes the batches past theirs, so
that they end (and their webhooks go out) at their deadline rather than when a worker reaches their message.

One reaper per queue runs at a time (a Redis lock); each worker's main process runs the loop in a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis
from celery import Celery

from worker.contract.batches import (
    CHUNK_MEMBER_PREFIX,
    DEADLINE_MEMBER_PREFIX,
    BatchStore,
    parse_chunk_member,
)
from worker.contract.broker import publish_chunk, publish_job
from worker.contract.fleet import worker_key
from worker.contract.jobs import (
    JobStore,
    broker_list_key,
    deadlines_key,
    held_key,
    holders_key,
    running_key,
    started_mark_key,
    stats_key,
    unstarted_key,
    waiting_answers_key,
)
from worker.contract.jobs import (
    job_key as job_key_of,
)
from worker.contract.states import JobPriority, JobStatus

log = logging.getLogger("blipq.reaper")

SWEEP_BATCH = 200  # jobs looked at per level and sweep, at most: a sweep stays short however deep the backlog
LOCK_PREFIX = "blipq:reaper-lock:"
HELD_TTL_S = 24 * 3600  # a worker's set of messages held outlives any message it names (a job's time limit)


@dataclass(frozen=True)
class ReaperPolicy:
    """When a never-started job counts as lost."""

    behind_mark_s: float  # this much older than the latest job of its level started (a job's time limit)
    waiting_s: float  # or waiting this long while its level's list is empty (the visibility timeout)
    # A running job's worker is looked at again this long after it was found alive, or after its job was republished.
    running_recheck_s: float = 10.0


def find_lost(
    store: JobStore, queue: str, policy: ReaperPolicy, now: float, priority: JobPriority = JobPriority.NORMAL
) -> list[str]:
    """The ids of the queue level's never-started jobs whose message must have been lost."""
    client = store.client
    with client.pipeline(transaction=False) as pipe:
        pipe.get(started_mark_key(queue, priority))
        pipe.llen(broker_list_key(queue, priority))
        mark, waiting_messages = pipe.execute()
    cutoff = now - policy.waiting_s if waiting_messages == 0 else float("-inf")
    if mark is not None:
        cutoff = max(cutoff, float(mark) - policy.behind_mark_s)
    if cutoff == float("-inf"):
        return []
    members: list[bytes] = client.zrangebyscore(  # type: ignore[assignment]  # bytes: the client does not decode
        unstarted_key(queue, priority), "-inf", f"({cutoff}", start=0, num=SWEEP_BATCH
    )
    return [member.decode() for member in members]


def sweep(store: JobStore, celery: Celery, queue: str, policy: ReaperPolicy) -> int:
    """End the queue's overdue jobs, and republish its lost jobs, level by level; returns how many were republished."""
    expire_overdue(store, queue)
    republished = 0
    for priority in JobPriority:
        republished += _republish_lost(store, celery, queue, policy, priority)
    republished += republish_held(store, celery, queue)
    return republished + republish_orphans(store, celery, queue, policy)


def republish_held(store: JobStore, celery: Celery, queue: str) -> int:
    """Publish again the messages that the queue's dead workers had received and not started; returns how many."""
    client = store.client
    holders = [member.decode() for member in client.smembers(holders_key(queue))]  # type: ignore[union-attr]
    if not holders:
        return 0
    with client.pipeline(transaction=False) as pipe:
        for worker in holders:
            pipe.exists(worker_key(worker))
        alive = pipe.execute()
    republished = 0
    for worker in (worker for worker, live in zip(holders, alive, strict=True) if not live):
        held: set[bytes] = client.smembers(held_key(queue, worker))  # type: ignore[assignment]
        for task_id in sorted(member.decode() for member in held):
            republished += _republish_held(store, celery, queue, task_id)
        client.delete(held_key(queue, worker))
        client.srem(holders_key(queue), worker)
        if held:
            log.warning("worker %s is gone with %d messages it had not started; published again", worker, len(held))
    return republished


def _republish_held(store: JobStore, celery: Celery, queue: str, task_id: str) -> int:
    """Publish again a held message (a job id, or `<batch id>.<number>`) unless its job or chunk started; 1 if so."""
    batch_id, dot, number = task_id.partition(".")
    if dot:
        batches = BatchStore(store)
        payload = batches.chunk_payload(batch_id, int(number))
        if payload is None or batches.chunk_worker(batch_id, int(number)) is not None:  # ended, or started
            return 0
        priority = JobPriority(payload.get("priority") or JobPriority.NORMAL)
        _publish_again(store, queue, priority, payload["member"], partial(publish_chunk, celery, queue, payload))
    else:
        job = store.get(task_id)
        if job is None or job.status is not JobStatus.QUEUED:  # ended, started elsewhere, or pending
            return 0
        _publish_again(store, queue, job.priority, job.id, partial(publish_job, celery, job, queue))
    return 1


def _publish_again(
    store: JobStore, queue: str, priority: JobPriority, member: str, publish: Callable[[], None]
) -> None:
    """Publish a job or chunk again, and count it. Its wait in its level's never-started set starts again (it is not
    published a third time unless this message is lost too), before the publish: a worker may start it at once and
    take it off the set, which this must not undo (XX: only a member still waiting)."""
    store.client.zadd(unstarted_key(queue, priority), {member: time.time()}, xx=True)
    publish()
    store.client.hincrby(stats_key(), "republished", 1)


class Receipts:
    """Records each message a worker receives in its set of messages held (one round trip, in the consumer thread,
    before a pool thread starts it): connected to Celery's `task_received`."""

    def __init__(self, client: redis.Redis, queue: str, worker: str) -> None:
        self.client, self.queue, self.worker = client, queue, worker

    def received(self, request: Any, **_: Any) -> None:
        key = held_key(self.queue, self.worker)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.sadd(key, request.id)
                pipe.expire(key, HELD_TTL_S)
                pipe.sadd(holders_key(self.queue), self.worker)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:  # the reaper's slower rules still find the job if this worker dies
            log.warning("cannot record message %s as held: %s", request.id, exc)


def republish_orphans(store: JobStore, celery: Celery, queue: str, policy: ReaperPolicy) -> int:
    """Publish again the queue's running jobs whose worker is gone (its record expired); returns how many."""
    client = store.client
    now = time.time()
    running = running_key(queue)
    members: list[bytes] = client.zrangebyscore(running, "-inf", now, start=0, num=SWEEP_BATCH)  # type: ignore[assignment]
    republished = 0
    for job_id in (member.decode() for member in members):
        if job_id.startswith(CHUNK_MEMBER_PREFIX):
            republished += _republish_orphan_chunk(store, celery, queue, policy, job_id, now)
            continue
        job = store.get(job_id)
        worker = client.hget(job_key_of(job_id), "worker") if job is not None else None
        if job is None or job.status is not JobStatus.RUNNING or not worker:  # ended (or expired) meanwhile
            client.zrem(running, job_id)
            continue
        if client.exists(worker_key(worker.decode())):  # type: ignore[union-attr]
            client.zadd(running, {job_id: now + policy.running_recheck_s})
            continue
        client.zadd(running, {job_id: now + policy.waiting_s})  # published once; its next start scores it anew
        publish_job(celery, job, queue)
        client.hincrby(stats_key(), "republished", 1)
        republished += 1
        log.warning("job %s was running on %s, which is gone; published again", job_id, worker.decode())  # type: ignore[union-attr]
    return republished


def _republish_orphan_chunk(
    store: JobStore, celery: Celery, queue: str, policy: ReaperPolicy, member: str, now: float
) -> int:
    """Publish a running chunk again if its worker is gone; 1 when it did."""
    batches = BatchStore(store)
    batch_id, number, _ = parse_chunk_member(member)
    payload = batches.chunk_payload(batch_id, number)
    worker = batches.chunk_worker(batch_id, number)
    if payload is None or worker is None:  # ended (or expired) meanwhile
        store.client.zrem(running_key(queue), member)
        return 0
    if store.client.exists(worker_key(worker)):
        store.client.zadd(running_key(queue), {member: now + policy.running_recheck_s})
        return 0
    store.client.zadd(running_key(queue), {member: now + policy.waiting_s})  # its next start scores it anew
    publish_chunk(celery, queue, payload)
    store.client.hincrby(stats_key(), "republished", 1)
    log.warning("chunk %s of batch %s was running on %s, which is gone; published again", number, batch_id, worker)
    return 1


def expire_overdue(store: JobStore, queue: str) -> int:
    """End `expired` the queue's jobs (and close the batches) still queued past their deadline; returns how many."""
    expired = 0
    for job_id in store.overdue_job_ids(queue, time.time(), SWEEP_BATCH):
        if job_id.startswith(DEADLINE_MEMBER_PREFIX):
            expired += _close_overdue_batch(store, queue, job_id)
            continue
        job = store.get(job_id)
        if job is None:  # gone with its TTL
            store.client.zrem(deadlines_key(queue), job_id)
        elif store.expire_if_overdue(job, queue):
            expired += 1
            log.info("job %s was still queued at its deadline: expired", job_id)
    return expired


def _close_overdue_batch(store: JobStore, queue: str, member: str) -> int:
    """Close a batch past its deadline (its items not yet answered end `expired`); 1 when it did."""
    store.client.zrem(deadlines_key(queue), member)
    batches = BatchStore(store)
    batch = batches.get(member.removeprefix(DEADLINE_MEMBER_PREFIX))
    if batch is None or not batch.overdue(time.time()):
        return 0
    batches.expire_if_overdue(batch, time.time())
    log.info("batch %s was not answered by its deadline: its items not yet answered expired", batch.id)
    return 1


def _republish_lost_chunk(store: JobStore, celery: Celery, queue: str, priority: JobPriority, member: str) -> int:
    batch_id, number, answers = parse_chunk_member(member)
    payload = BatchStore(store).chunk_payload(batch_id, number)
    if payload is None:  # its batch expired, or a worker started it meanwhile and it ended
        if store.client.zrem(unstarted_key(queue, priority), member):
            store.client.hincrby(waiting_answers_key(), unstarted_key(queue, priority), -answers)
        return 0
    _publish_again(store, queue, priority, member, partial(publish_chunk, celery, queue, payload))
    log.warning("chunk %d of batch %s had lost its message; published again", number, batch_id)
    return 1


def _republish_lost(store: JobStore, celery: Celery, queue: str, policy: ReaperPolicy, priority: JobPriority) -> int:
    republished = 0
    for job_id in find_lost(store, queue, policy, time.time(), priority):
        if job_id.startswith(CHUNK_MEMBER_PREFIX):
            republished += _republish_lost_chunk(store, celery, queue, priority, job_id)
            continue
        job = store.get(job_id)
        if job is None or job.status is not JobStatus.QUEUED:  # expired, or started meanwhile
            if store.client.zrem(unstarted_key(queue, priority), job_id):
                store.client.hincrby(waiting_answers_key(), unstarted_key(queue, priority), -1)
            continue
        _publish_again(store, queue, priority, job_id, partial(publish_job, celery, job, queue))
        republished += 1
        log.warning("job %s had lost its message; published again", job_id)
    return republished


class ReaperThread(threading.Thread):
    """Sweeps one queue every `interval_s`, in whichever worker holds the queue's lock."""

    def __init__(self, store: JobStore, celery: Celery, queue: str, policy: ReaperPolicy, interval_s: float) -> None:
        super().__init__(name=f"blipq-reaper-{queue}", daemon=True)
        self.store, self.celery, self.queue, self.policy, self.interval_s = store, celery, queue, policy, interval_s
        self.stopping = threading.Event()

    def run(self) -> None:
        lock_ms = max(1, int(self.interval_s * 1000))
        while not self.stopping.wait(self.interval_s):
            try:
                # The lock outlives a sweep by design: one sweep per interval across the fleet, not one per worker.
                if self.store.client.set(LOCK_PREFIX + self.queue, "1", nx=True, px=lock_ms):
                    sweep(self.store, self.celery, self.queue, self.policy)
            except (redis.RedisError, OSError) as exc:  # Redis away: try again next time
                log.warning("reaper sweep failed: %s", exc)
            except Exception:  # a publish error from kombu, say: never let the thread die
                log.exception("reaper sweep failed")
