"""The reaper: republishes jobs whose Celery message was lost, so that an accepted job always runs.

Late acknowledgement and the visibility timeout bring back a job that a worker had received. Two gaps remain that
Celery cannot see, because the message no longer exists anywhere:
- kombu's Redis transport takes a message with BRPOP and records it as unacknowledged in a second step; a worker
  killed between the two loses it;
- the API stores a job and then publishes its message; an API process killed between the two (or a publish whose
  reply was lost) leaves a job with no message.

Every job is in its queue's set of jobs never started (scored by enqueue time) until a worker starts it, and each
start moves the queue's mark to the enqueue time of the job started. A queue is first in, first out, so a job still
unstarted well after a later job started (by more than a job's time limit, the longest a received job waits before
it starts) has lost its message; so has one that waited longer than the visibility timeout (an idle queue moves no
mark). The reaper publishes such a job again, under the same task id. A job republished needlessly (its message was
only slow) runs once all the same: the second delivery finds it ended and is skipped.

One reaper per queue runs at a time (a Redis lock); each worker's main process runs the loop in a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis
from celery import Celery

from worker.jobs import TASK_VQA, JobStatus, JobStore, started_mark_key, stats_key, unstarted_key

log = logging.getLogger("blipq.reaper")

SWEEP_BATCH = 200  # jobs looked at per sweep, at most: a sweep stays short however deep the backlog
LOCK_PREFIX = "blipq:reaper-lock:"


@dataclass(frozen=True)
class ReaperPolicy:
    """When a never-started job counts as lost."""

    behind_mark_s: float  # this much older than the latest job started (a job's time limit)
    waiting_s: float  # or waiting this long (the visibility timeout)


def find_lost(store: JobStore, queue: str, policy: ReaperPolicy, now: float) -> list[str]:
    """The ids of the queue's never-started jobs whose message must have been lost."""
    client = store.client
    mark = client.get(started_mark_key(queue))
    cutoff = now - policy.waiting_s
    if mark is not None:
        cutoff = max(cutoff, float(mark) - policy.behind_mark_s)
    members: list[bytes] = client.zrangebyscore(  # type: ignore[assignment]  # bytes: the client does not decode
        unstarted_key(queue), "-inf", f"({cutoff}", start=0, num=SWEEP_BATCH
    )
    return [member.decode() for member in members]


def sweep(store: JobStore, celery: Celery, queue: str, policy: ReaperPolicy) -> int:
    """Republish the queue's lost jobs; returns how many were published again."""
    now = time.time()
    republished = 0
    for job_id in find_lost(store, queue, policy, now):
        job = store.get(job_id)
        if job is None or job.status is not JobStatus.QUEUED:  # expired, or started meanwhile
            store.client.zrem(unstarted_key(queue), job_id)
            continue
        payload = {"job_id": job.id, "question": job.question, "image_url": job.image_url}
        celery.send_task(TASK_VQA, args=[payload], task_id=job.id, queue=queue)
        # Its wait starts again: it is not published a third time unless this message is lost too.
        store.client.zadd(unstarted_key(queue), {job_id: now})
        store.client.hincrby(stats_key(), "republished", 1)
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
