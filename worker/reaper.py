"""The reaper: publishes again every message that a dead worker took or that was lost on its way, so that an accepted
job always runs; and ends the queued jobs and batches past their deadline.

Where a message is. The API stores a job pending, then accepts it: from then until a worker starts it, the job is a
member of its queue level's never-started set (`unstarted_key`). First it is held in its API key's line, scored above
every time (contract/fair_share.py): it has no message yet, and the reaper never looks there. Then it is released:
scored with its release time, and its message published, stamped with that time. From then on its message is, in
turn:
1. in its level's list of kombu's Redis transport (`broker_list_key`; each level first in, first out);
2. popped by a worker (BRPOP), in that worker's memory only;
3. recorded by kombu as unacknowledged (its `unacked` hash), a second step after the BRPOP;
4. recorded by the worker in its set of messages held (worker/receipts.py, on Celery's `task_received`, before a
   thread starts it), where it stays until its task returns;
5. started: the start script takes the member off the never-started set; the job is in the queue's running set until
   it ends, and its message stays unacknowledged (and held) until then.
A worker killed at step 2 or 3 leaves the message where no live worker will take it: kombu's unacknowledged copy
comes back only after the visibility timeout (a job's time limit + 60 s). A Redis restart can lose a message too, and
so can a publish whose reply was lost, or a release whose caller died before it published (the member is released,
its message never sent).

Lost messages are found by state, not by age. A released member of a never-started set is accounted for while its
message may still be in its level's list, or while it is in the held set of a worker whose record (contract/fleet.py)
has not expired. A level's list is first in, first out, and a member's score is its message's publish stamp, so its
message has left the list if the list is empty, if it was released before the message at the head of the list (the
next one taken) was published (each message carries that time, broker.PUBLISHED_HEADER; less
CLOCK_SKEW_S, for hosts' clocks), or more than MARK_SKEW_S before a member of its level that has started (the level's
mark). A member accounted for by neither at two looks `grace_s` apart (longer than a live worker takes from the BRPOP
to its held set) has lost its message, which the reaper publishes again, under the same task id. kombu's `unacked`
hash is not a place to look: it does not say which worker took a message, and a dead worker's messages stay there
until the visibility timeout.

A sweep's cost is bounded however deep the queue: per level a GET and an LINDEX of the list's head, and one range of
the never-started set below what they tell, whose front is what live workers hold (their held sets are read too),
then the lost, SWEEP_BATCH at a time.

Dead workers. Once a worker's record has expired, the reaper publishes again at once every message in its held set
whose job or chunk has neither ended nor been started by a live worker since: those it had not started, and those it
was running (their messages, unacknowledged, would come back only after the visibility timeout). A job's next start
counts an attempt: one that kills every worker that takes it ends `worker_lost`. A job published again while it was
running joins its never-started set again, watched as above until a worker starts it. The queue's running set names
each running job's worker too: a run whose worker is gone and that no held set named (its write failed) is published
again from there, within `running_recheck_s` of its worker's record expiring.

So every message a dead worker held, started or not, is published again within about the record's expiry and one
sweep, and a message lost on its way within two looks (`grace_s` and a sweep). A job published needlessly runs once
visibly: the second delivery finds it ended and is skipped, or finds it running and runs it again, and the answer
written second is dropped.

A batch's chunks are watched the same way, as members `chunk:<batch id>:<number>:<answers>` of the same sets (task id
`<batch id>.<number>`): a chunk is published again from the copy its batch keeps until the chunk ends.

The reaper also ends `expired` the queued jobs whose deadline has passed, and closes the batches past theirs, so
that they end (and their webhooks go out) at their deadline rather than when a worker reaches their message. And each
sweep releases held work the workers have room for: work accepted by an API that died before it released any, or
while no worker ran.

One reaper per queue runs at a time (a Redis lock); each worker's main process runs the loop in a thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from celery import Celery

from contract.batch_store import BatchStore
from contract.batches import DEADLINE_MEMBER_PREFIX
from contract.broker import PUBLISHED_HEADER
from contract.fair_share import release
from contract.job_store import JobStore
from contract.keys import (
    HELD_SCORE,
    REAPER_LOCK_PREFIX,
    broker_list_key,
    deadlines_key,
    held_key,
    holders_key,
    missing_key,
    running_key,
    started_mark_key,
    stats_key,
    unstarted_key,
    worker_key,
)
from contract.messages import Message, leave_waiting, look_up, named, task_id_of
from contract.states import JobPriority

log = logging.getLogger("blipq.reaper")

SWEEP_BATCH = 200  # members looked at per level and sweep beyond what live workers hold: a sweep stays short
# A member enqueued this much before the message at the head of its list was published has left the list: hosts'
# clocks may differ a little. Too small costs a needless publish (its second delivery is skipped); too large, a later
# find.
CLOCK_SKEW_S = 0.25
# Likewise before its level's mark, an acceptance time: a job is accepted just after its publish (a Redis round trip,
# or a stalled API).
MARK_SKEW_S = 1.0
MISSING_TTL_S = 3600  # the reaper's notes of members found missing go, should every reaper of the queue stop


@dataclass(frozen=True)
class ReaperPolicy:
    """When a message counts as lost, and how often a running job's worker is looked at."""

    grace_s: float  # found missing at two looks this far apart (0: at one look)
    running_recheck_s: float = 10.0  # a running job's live worker is looked at again this long after


def sweep(store: JobStore, celery: Celery, queue: str, policy: ReaperPolicy) -> int:
    """End the queue's overdue jobs, and publish again what dead workers held and what was lost; returns how many."""
    expire_overdue(store, queue)
    republished = republish_held(store, celery, queue)
    republished += republish_orphans(store, celery, queue, policy)
    republished += republish_missing(store, celery, queue, policy)
    # Work held while no one released it (an API that died after its acceptance...); the window's count recounted.
    release(store, celery, queue, recount=True)
    return republished


def find_missing(store: JobStore, queue: str) -> list[tuple[JobPriority, str]]:
    """The queue's never-started members whose message has left its list and is held by no live worker."""
    client = store.client
    live = _live(client, _decoded(client.smembers(holders_key(queue))))  # type: ignore[arg-type]
    levels = list(JobPriority)
    with client.pipeline(transaction=False) as pipe:
        for priority in levels:
            pipe.get(started_mark_key(queue, priority))
            pipe.lindex(broker_list_key(queue, priority), -1)  # the head: kombu pushes left and pops right
        for worker in live:
            pipe.scard(held_key(queue, worker))
        replies = pipe.execute()
    # The front of a level below what it has taken is what live workers hold, then the lost: read past the first.
    limit = SWEEP_BATCH + sum(replies[2 * len(levels) :])
    with client.pipeline(transaction=False) as pipe:
        for index, priority in enumerate(levels):
            # Never above the held members' scores (contract/fair_share.py): those have no message yet.
            taken_below = min(_taken_below(replies[2 * index], replies[2 * index + 1]), HELD_SCORE)
            pipe.zrangebyscore(unstarted_key(queue, priority), "-inf", f"({taken_below}", start=0, num=limit)
        for worker in live:  # read after the ranges: a message taken meanwhile is found held
            pipe.smembers(held_key(queue, worker))
        replies = pipe.execute()
    held = {task_id for members in replies[len(levels) :] for task_id in _decoded(members)}
    return [
        (priority, member)
        for priority, members in zip(levels, replies[: len(levels)], strict=True)
        for member in _decoded(members)
        if task_id_of(member) not in held
    ]


def _taken_below(mark: bytes | None, head: bytes | None) -> float:
    """The enqueue time below which a level's members have left its list, from its mark and the head of its list."""
    if head is None:  # the list is empty
        return float("inf")
    try:
        published = float(json.loads(head)["headers"][PUBLISHED_HEADER]) - CLOCK_SKEW_S
    except (ValueError, KeyError, TypeError):  # a message from before the header, or not blipq's
        published = float("-inf")
    return max(published, float(mark) - MARK_SKEW_S if mark is not None else float("-inf"))


def confirm_lost(
    client: redis.Redis, queue: str, missing: list[tuple[JobPriority, str]], grace_s: float, now: float
) -> list[tuple[JobPriority, str]]:
    """Those of `missing` that earlier looks found missing too, since at least `grace_s`; the others are noted."""
    key = missing_key(queue)
    notes: dict[bytes, bytes] = client.hgetall(key)  # type: ignore[assignment]  # bytes: the client does not decode
    seen = {member.decode(): float(since) for member, since in notes.items()}
    lost = [(priority, member) for priority, member in missing if now - seen.get(member, now) >= grace_s]
    lost_members = {member for _, member in lost}
    noted = {member: seen.get(member, now) for _, member in missing if member not in lost_members}
    if not seen and not noted:  # nothing was missing, nor is: nothing to write
        return lost
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(key)  # a member found since (held, started or ended) is forgotten
        if noted:
            pipe.hset(key, mapping=noted)  # type: ignore[arg-type]  # redis-py: invariant Mapping
            pipe.expire(key, MISSING_TTL_S)
        pipe.execute()
    return lost


def republish_missing(store: JobStore, celery: Celery, queue: str, policy: ReaperPolicy) -> int:
    """Publish again the queue's lost messages (found missing at two looks `grace_s` apart); returns how many."""
    lost = confirm_lost(store.client, queue, find_missing(store, queue), policy.grace_s, time.time())
    republished = 0
    for priority, member in lost:
        message = look_up(store, celery, queue, task_id_of(member))
        if message is None or not _free(store.client, message):  # ended or expired, or a live worker started it
            leave_waiting(store, queue, priority, member)
            continue
        _publish_again(store, queue, message)
        republished += 1
        log.warning("%s had lost its message; published again", named(member))
    return republished


def republish_held(store: JobStore, celery: Celery, queue: str) -> int:
    """Publish again the messages that the queue's dead workers had received and not finished; returns how many."""
    client = store.client
    holders = _decoded(client.smembers(holders_key(queue)))  # type: ignore[arg-type]
    live = set(_live(client, holders))
    republished = 0
    for worker in (worker for worker in holders if worker not in live):
        held = sorted(_decoded(client.smembers(held_key(queue, worker))))  # type: ignore[arg-type]
        again = 0
        for task_id in held:
            message = look_up(store, celery, queue, task_id)
            if message is not None and _free(client, message):  # not ended, and no live worker started it since
                _publish_again(store, queue, message)
                again += 1
        client.delete(held_key(queue, worker))
        client.srem(holders_key(queue), worker)
        if held:
            log.warning(
                "worker %s is gone with %d messages it had not finished; %d published again", worker, len(held), again
            )
        republished += again
    return republished


def republish_orphans(store: JobStore, celery: Celery, queue: str, policy: ReaperPolicy) -> int:
    """Publish again the queue's running jobs and chunks whose worker is gone (its record expired); returns how many."""
    client = store.client
    now = time.time()
    running = running_key(queue)
    members = _decoded(client.zrangebyscore(running, "-inf", now, start=0, num=SWEEP_BATCH))  # type: ignore[arg-type]
    republished = 0
    for member in members:
        message = look_up(store, celery, queue, task_id_of(member))
        if message is None or not message.worker:  # ended (or expired), or queued again: its next start scores it
            client.zrem(running, member)
        elif not _free(client, message):
            client.zadd(running, {member: now + policy.running_recheck_s})
        else:
            _publish_again(store, queue, message)  # watched in its never-started set from now on
            republished += 1
            log.warning("%s was running on %s, which is gone; published again", named(member), message.worker)
    return republished


def _publish_again(store: JobStore, queue: str, message: Message) -> None:
    """Publish a job or chunk again, and count it. Its wait in its level's never-started set starts again before the
    publish (a worker may start it at once, and take it off the set); a run it had is over (its next start puts it
    in the running set again)."""
    now = time.time()  # its enqueue time and its message's publish time: the same, so that it is not found missing
    store.requeue(message.member, queue, message.priority, message.answers, now)
    store.client.zrem(running_key(queue), message.member)
    message.publish(now)
    store.client.hincrby(stats_key(), "republished", 1)


def _free(client: redis.Redis, message: Message) -> bool:
    """Whether no live worker runs the message's job or chunk (never started, or its worker's record expired)."""
    return not message.worker or not client.exists(worker_key(message.worker))


def _live(client: redis.Redis, workers: list[str]) -> list[str]:
    """Those of `workers` whose record has not expired."""
    if not workers:
        return []
    with client.pipeline(transaction=False) as pipe:
        for worker in workers:
            pipe.exists(worker_key(worker))
        return [worker for worker, live in zip(workers, pipe.execute(), strict=True) if live]


def _decoded(values: Iterable[bytes]) -> list[str]:
    return [value.decode() for value in values]


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
                if self.store.client.set(REAPER_LOCK_PREFIX + self.queue, "1", nx=True, px=lock_ms):
                    sweep(self.store, self.celery, self.queue, self.policy)
            except (redis.RedisError, OSError) as exc:  # Redis away: try again next time
                log.warning("reaper sweep failed: %s", exc)
            except Exception:  # a publish error from kombu, say: never let the thread die
                log.exception("reaper sweep failed")
