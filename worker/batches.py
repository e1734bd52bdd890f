"""Batches: many questions about many images submitted at once, shared by the API and the workers.

Imports neither Flask nor torch. Each item of a batch is a job of its own (worker/jobs.py), with the batch's id and
its index; the batch is a Redis hash (`blipq:batch:<id>`) plus the list of its job ids in item order, both expiring
with the jobs. The script that ends a job counts the batch's ended items on its hash (worker/transitions.py), and the
item that ends the last queues the batch's webhook. Items travel to the workers in chunks (worker/broker.py's
TASK_VQA_CHUNK): each chunk lists images, each with its (job id, question) pairs, so a worker fetches an image once
for all its questions and answers the chunk's questions with one `answer_questions` call. An image uploaded with
the batch is stored once (worker.jobs.batch_upload_key) and named by its key in the chunk instead of a URL; no
item's end deletes it (it is shared), so it expires with the batch after the TTL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from worker.jobs import (
    Job,
    JobStore,
    batch_jobs_key,
    batch_key,
    deadlines_key,
    job_key,
    unstarted_key,
    webhook_delivery,
)
from worker.states import JobPriority, JobStatus, JobTask
from worker.transitions import CANCEL_DONE, CANCEL_REQUESTED

MAX_BATCH_ANSWERS = 10_000  # answers one batch request may ask for
READ_PAGE = 500  # job records read per pipeline when a batch is summed up or its results streamed


@dataclass(frozen=True)
class Batch:
    """A batch's record as stored in Redis."""

    id: str
    count: int
    created_at: str
    owner: str = ""  # the name of the API key that made the batch; never shown to clients
    priority: JobPriority = JobPriority.NORMAL
    webhook: str = ""  # the URL told the batch's summary when its last item ends
    webhook_items: bool = False  # whether each item's job carries the webhook too
    webhook_status: str = ""
    webhook_attempts: int = 0
    webhook_error_code: str = ""
    webhook_error_message: str = ""
    task: JobTask = JobTask.VQA  # every item's: a batch goes to one queue

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> Batch:
        """Rebuild a batch from its Redis hash."""
        return cls(
            id=fields["id"],
            count=int(fields["count"]),
            created_at=fields["created_at"],
            owner=fields.get("owner", ""),
            priority=JobPriority(fields.get("priority") or JobPriority.NORMAL),
            webhook=fields.get("webhook", ""),
            webhook_items=fields.get("webhook_items") == "1",
            webhook_status=fields.get("webhook_status", ""),
            webhook_attempts=int(fields.get("webhook_attempts") or 0),
            webhook_error_code=fields.get("webhook_error_code", ""),
            webhook_error_message=fields.get("webhook_error_message", ""),
            task=JobTask(fields.get("task") or JobTask.VQA),
        )

    def to_redis(self) -> dict[str, str]:
        """The batch's fields as written when it is made (the `ended` counter starts at 0)."""
        return {
            "id": self.id,
            "count": str(self.count),
            "created_at": self.created_at,
            "owner": self.owner,
            "priority": str(self.priority),
            "webhook": self.webhook,
            "webhook_items": "1" if self.webhook_items else "",
            "task": str(self.task),
            "ended": "0",
        }

    def webhook_delivery(self) -> dict[str, Any] | None:
        """Where the batch's webhook delivery stands; None until the last item ended (or with no webhook)."""
        return webhook_delivery(
            self.webhook_status, self.webhook_attempts, self.webhook_error_code, self.webhook_error_message
        )


@dataclass(frozen=True)
class CancelCounts:
    """What a batch cancel did to its items."""

    canceled: int
    cancel_requested: int
    already_ended: int


def plan_chunks(jobs: list[Job], max_answers: int) -> list[list[dict[str, Any]]]:
    """Group a batch's jobs into chunks of at most `max_answers`, each a list of images with their (id, text)s.

    A text is a job's question, or a caption job's prompt.

    Questions about one image stay together in a chunk (an image with more questions than a chunk holds is split
    over as few chunks as it takes), so that a worker fetches the image once for all of them.
    """
    by_image: dict[tuple[str, str], list[list[str]]] = {}
    for job in jobs:
        by_image.setdefault((job.image_url, job.upload_key), []).append([job.id, job.question])
    chunks: list[list[dict[str, Any]]] = [[]]
    room = max_answers
    for (image_url, upload), pairs in by_image.items():
        source = {"upload": upload} if upload else {"image_url": image_url}
        first = 0
        while first < len(pairs):
            if room == 0:
                chunks.append([])
                room = max_answers
            taken = pairs[first : first + room]
            chunks[-1].append({**source, "items": taken})
            room -= len(taken)
            first += len(taken)
    return chunks


class BatchStore:
    """Reads and writes batch records, and their items' jobs, in Redis (a pipeline per step, not a trip per item)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.client = store.client

    def create(self, batch: Batch, jobs: list[Job], queue: str, uploads: dict[str, bytes] | None = None) -> None:
        """Write the batch and its jobs in one transaction, all expiring after the TTL, the jobs never started.

        `uploads` maps each uploaded image's key (batch_upload_key) to its bytes: stored once for all its jobs.
        """
        ttl_s = self.store.ttl_s
        enqueued = time.time()  # one score for every item: the reaper must not take a later chunk for a lost one
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(batch_key(batch.id), mapping=batch.to_redis())  # type: ignore[arg-type]
            pipe.expire(batch_key(batch.id), ttl_s)
            pipe.rpush(batch_jobs_key(batch.id), *(job.id for job in jobs))
            pipe.expire(batch_jobs_key(batch.id), ttl_s)
            for job in jobs:
                self.store.add_to_pipeline(pipe, job, queue)
            pipe.zadd(unstarted_key(queue, batch.priority), {job.id: enqueued for job in jobs})
            for key, data in (uploads or {}).items():
                pipe.set(key, data, ex=ttl_s)
            pipe.execute()

    def delete(self, batch: Batch, jobs: list[Job], queue: str) -> None:
        """Remove a batch and its jobs (used when its chunks could not be enqueued)."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(batch_key(batch.id), batch_jobs_key(batch.id), *(job_key(job.id) for job in jobs))
            uploads = {job.upload_key for job in jobs if job.upload_key}
            if uploads:
                pipe.delete(*uploads)
            pipe.zrem(unstarted_key(queue, batch.priority), *(job.id for job in jobs))
            pipe.zrem(deadlines_key(queue), *(job.id for job in jobs))
            pipe.execute()

    def get(self, batch_id: str) -> Batch | None:
        """The batch with this id, or None if it was never made or has expired."""
        raw: dict[bytes, bytes] = self.client.hgetall(batch_key(batch_id))  # type: ignore[assignment]
        return Batch.from_redis({k.decode(): v.decode() for k, v in raw.items()}) if raw else None

    def job_ids(self, batch_id: str, start: int = 0, stop: int = -1) -> list[str]:
        """The batch's job ids from item `start` to item `stop` (included; -1: the last)."""
        members: list[bytes] = self.client.lrange(batch_jobs_key(batch_id), start, stop)  # type: ignore[assignment]
        return [member.decode() for member in members]

    def jobs(self, batch_id: str, start: int = 0, stop: int = -1) -> Iterator[tuple[str, Job | None]]:
        """The batch's (job id, job) from item `start` to `stop` (included), a page per pipeline; None: expired."""
        first = start
        while stop < 0 or first <= stop:
            last = first + READ_PAGE - 1 if stop < 0 else min(stop, first + READ_PAGE - 1)
            job_ids = self.job_ids(batch_id, first, last)
            if not job_ids:
                return
            yield from zip(job_ids, self._read(job_ids), strict=True)
            if len(job_ids) < last - first + 1:
                return
            first = last + 1

    def summary(self, batch: Batch) -> dict[str, Any]:
        """The batch as the API shows it: counts of its items by status, progress, and its webhook's delivery."""
        counts = dict.fromkeys((str(status) for status in JobStatus), 0)
        for status in self._statuses(batch.id):
            if status in counts:  # None: the item expired (its batch is about to)
                counts[status] += 1
        ended = sum(counts[str(status)] for status in JobStatus if status not in (JobStatus.QUEUED, JobStatus.RUNNING))
        return {
            "id": batch.id,
            "count": batch.count,
            "counts": counts,
            "ended": ended,
            "progress": ended / batch.count if batch.count else 1.0,
            "created_at": batch.created_at,
            "task": str(batch.task),
            "priority": str(batch.priority),
            "webhook": batch.webhook or None,
            "webhook_delivery": batch.webhook_delivery(),
        }

    def cancel(self, batch: Batch, queue: str) -> CancelCounts:
        """Cancel every item still queued (a running one gets `cancel_requested`): the job cancel script per item."""
        canceled = requested = ended = 0
        page: list[Job] = []
        for _, job in self.jobs(batch.id):
            if job is None:
                ended += 1
            elif job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
                page.append(job)
            else:
                ended += 1
        for first in range(0, len(page), READ_PAGE):
            for outcome in self.store.cancel_many(page[first : first + READ_PAGE], queue):
                if outcome == CANCEL_DONE:
                    canceled += 1
                elif outcome == CANCEL_REQUESTED:
                    requested += 1
                else:
                    ended += 1
        return CancelCounts(canceled, requested, ended)

    def _statuses(self, batch_id: str) -> Iterator[str | None]:
        """Each item's status, in item order, read a page per pipeline (one field, not the whole record)."""
        first = 0
        while job_ids := self.job_ids(batch_id, first, first + READ_PAGE - 1):
            with self.client.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(job_key(job_id), "status")
                statuses: list[bytes | None] = pipe.execute()
            yield from (status.decode() if status is not None else None for status in statuses)
            first += READ_PAGE

    def _read(self, job_ids: list[str]) -> list[Job | None]:
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(job_key(job_id))
            raws: list[dict[bytes, bytes]] = pipe.execute()
        return [Job.from_redis({k.decode(): v.decode() for k, v in raw.items()}) if raw else None for raw in raws]
