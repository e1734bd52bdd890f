"""A job's or chunk's message as it is published again or for the first time, from what Redis keeps of it: a job's
record, or the copy of a chunk its batch keeps until the chunk ends.

Both the reaper (a message lost, or held by a dead worker: worker/reaper.py) and the release of held work
(contract/fair_share.py) publish from here.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from celery import Celery

from contract.batch_store import BatchStore
from contract.batches import CHUNK_MEMBER_PREFIX, parse_chunk_member
from contract.broker import publish_chunk, publish_job
from contract.job_store import JobStore
from contract.keys import HELD_SCORE, RELEASED_FIELD_PREFIX, job_key, unstarted_key, waiting_answers_key
from contract.states import ENDED_STATUSES, JobPriority, JobStatus

_batch_stores: weakref.WeakKeyDictionary[JobStore, BatchStore] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Message:
    """A job's or chunk's message, ready to publish."""

    member: str  # in the never-started and running sets
    priority: JobPriority
    answers: int
    worker: str  # the worker that started its latest run; "" for a job never started (or queued again)
    publish: Callable[[float], None]  # given the time it is published at


def look_up(store: JobStore, celery: Celery, queue: str, task_id: str) -> Message | None:
    """The message of a job, or of a chunk (`<batch id>.<number>`); None once it ended (or expired)."""
    batch_id, dot, number = task_id.partition(".")
    if dot:
        batches = _batch_store(store)
        payload = batches.chunk_payload(batch_id, int(number))
        if payload is None:
            return None
        member = str(payload["member"])
        priority = JobPriority(payload.get("priority") or JobPriority.NORMAL)
        worker = batches.chunk_worker(batch_id, int(number)) or ""
        publish = partial(publish_chunk, celery, queue, payload)
        return Message(member, priority, parse_chunk_member(member)[2], worker, publish)
    job = store.get(task_id)
    if job is None or job.status in ENDED_STATUSES:
        return None
    raw = store.client.hget(job_key(job.id), "worker") if job.status is JobStatus.RUNNING else None
    worker = raw.decode() if isinstance(raw, bytes) else ""
    return Message(job.id, job.priority, 1, worker, partial(publish_job, celery, job, queue))


def _batch_store(store: JobStore) -> BatchStore:
    """The batch store over `store`, made once: it registers its scripts when made, and releases look up chunks at
    every start."""
    batches = _batch_stores.get(store)
    if batches is None:
        batches = _batch_stores[store] = BatchStore(store)
    return batches


def leave_waiting(store: JobStore, queue: str, priority: JobPriority, member: str) -> None:
    """Take a member that will not be published (again) off its never-started set, with its answers waiting (and
    released, when it was: lib/queue.lua `leave_released`)."""
    unstarted, answers = unstarted_key(queue, priority), member_answers(member)
    score = store.client.zscore(unstarted, member)
    if score is not None and store.client.zrem(unstarted, member):
        store.client.hincrby(waiting_answers_key(), unstarted, -answers)
        if score < HELD_SCORE:
            store.client.hincrby(waiting_answers_key(), RELEASED_FIELD_PREFIX + unstarted, -answers)


def member_answers(member: str) -> int:
    """The answers a never-started or running member stands for: a chunk's are in its name, a job's is one."""
    return parse_chunk_member(member)[2] if member.startswith(CHUNK_MEMBER_PREFIX) else 1


def task_id_of(member: str) -> str:
    """The task id of a never-started or running member: a job's id, or a chunk's `<batch id>.<number>`."""
    if not member.startswith(CHUNK_MEMBER_PREFIX):
        return member
    batch_id, number, _ = parse_chunk_member(member)
    return f"{batch_id}.{number}"


def named(member: str) -> str:
    """A member as the logs name it: `job <id>`, `chunk <n> of batch <id>`."""
    if not member.startswith(CHUNK_MEMBER_PREFIX):
        return f"job {member}"
    batch_id, number, _ = parse_chunk_member(member)
    return f"chunk {number} of batch {batch_id}"
