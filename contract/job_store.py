"""The store that moves jobs in Redis (`JobStore`): create, accept, withdraw, start, end, cancel, and the uploads.

Each change of a job's state is a Lua script (contract/transitions.py says what each takes), run atomically by Redis.
The job's record is contract/jobs.py, its keys contract/keys.py.
"""

from __future__ import annotations

import math
import time
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from contract.jobs import PENDING_FIELD, STATS_FIELDS, Job, utc_now
from contract.keys import (
    deadlines_key,
    job_key,
    line_key,
    ring_key,
    running_key,
    share_name,
    shares_key,
    started_mark_key,
    stats_key,
    unstarted_key,
    upload_key,
    webhook_outbox_key,
)
from contract.lua import register
from contract.redis_target import RedisTarget, as_target
from contract.states import JobPriority, JobStatus
from contract.transitions import (
    CANCELED_MESSAGE,
    DEADLINE_MESSAGE,
    AcceptKeys,
    FinishKeys,
    QueuedJobKeys,
    StartArgs,
    StartKeys,
    WithdrawKeys,
)

OUTAGE_BACKOFF_CAP_S = 1.0  # the longest wait between two tries of a worker's Redis command while Redis is away
API_RETRIES = 1  # the API tries a failed Redis command once more (a stale pooled connection), then answers 503


class JobStore:
    """Reads and writes job records (and uploaded images) in Redis.

    The client must not decode responses: uploads are bytes, and the record's fields are decoded here.
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self._start = register(client, "job_start")
        self._finish_script = register(client, "job_finish")
        self._cancel = register(client, "job_cancel")
        self._expire = register(client, "job_expire")
        self._claim_key = register(client, "idempotency_claim")
        self._release_key = register(client, "idempotency_release")
        self._replace_key = register(client, "idempotency_replace")
        self._accept = register(client, "job_accept")
        self._withdraw = register(client, "job_withdraw")
        self._requeue = register(client, "requeue")

    @classmethod
    def connect(cls, where: RedisTarget | str, ttl_s: int, timeout_s: float = 5.0, outage_s: float = 0.0) -> JobStore:
        """A store on its own connection pool, with timeouts so a dead Redis fails fast instead of hanging.

        `outage_s` > 0 retries commands that fail for want of a connection for about that long: a worker that
        finishes a job while Redis restarts records the answer once Redis is back rather than losing it. The API
        keeps the default (a few quick retries) so that it answers 503 at once while Redis is away.
        """
        if outage_s > 0:
            retries = max(1, math.ceil(outage_s / OUTAGE_BACKOFF_CAP_S))
            retry = Retry(ExponentialBackoff(cap=OUTAGE_BACKOFF_CAP_S, base=0.05), retries)
        else:
            retry = Retry(NoBackoff(), API_RETRIES)
        client = as_target(where).client(
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            health_check_interval=30,
            retry=retry,
        )
        return cls(client, ttl_s)

    def create(
        self, job: Job, queue: str, upload: bytes | None = None, idempotency: tuple[str, str] | None = None
    ) -> None:
        """Write a new job record `pending` (and its uploaded image) atomically, both expiring after the TTL.

        A pending job is not run, nor seen by the reaper, until `accept` (after its message was published): a
        submission that fails is never run. `idempotency` (key, claim) ties an Idempotency-Key to the job for as long
        as the job lives.
        """
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job.id), mapping={**job.to_redis(), PENDING_FIELD: "1"})  # type: ignore[dict-item]
            pipe.expire(job_key(job.id), self.ttl_s)
            if job.deadline_at:
                pipe.zadd(deadlines_key(queue), {job.id: float(job.deadline_at)})
            if upload is not None:
                pipe.set(upload_key(job.id), upload, ex=self.ttl_s)
            if idempotency is not None:
                pipe.set(idempotency[0], idempotency[1], ex=self.ttl_s)
            pipe.execute()

    def accept(self, job: Job, queue: str, replicas: int = 0, timeout_ms: int = 0, weight: float = 1.0) -> int | None:
        """Accept a pending job into its API key's line (job_accept.lua), `weight` that key's; None when it was not
        pending any more. contract/fair_share.py `release` then gives it to the workers.

        With `replicas` > 0, Redis WAITs (on the same connection, so after the job's record and this acceptance) until
        that many replicas acknowledged them, or `timeout_ms`: returns how many did (else 0).
        """
        share = share_name(job.owner)
        keys = AcceptKeys(
            job=job_key(job.id),
            unstarted=unstarted_key(queue, job.priority),
            ring=ring_key(queue, job.priority),
            shares=shares_key(queue, job.priority),
            line=line_key(queue, job.priority, share),
        )
        args = [job.id, time.time(), share, weight]
        return self.accept_and_wait(self._accept, keys.keys(), args, replicas, timeout_ms)

    def accept_and_wait(
        self, script: Script, keys: list[str], args: list[Any], replicas: int, timeout_ms: int
    ) -> int | None:
        """Run an acceptance or withdrawal script (a job's or a batch's) and, with `replicas` > 0, WAIT in the same
        pipeline: how many replicas acknowledged (0 without WAIT), or None when the script answered 0 (an
        acceptance: nothing was pending; a withdrawal: a worker had started the submission)."""
        with self.client.pipeline(transaction=False) as pipe:
            script(keys=keys, args=args, client=pipe)
            if replicas > 0:
                pipe.execute_command("WAIT", replicas, timeout_ms)
            replies = pipe.execute()
        if not replies[0]:
            return None
        return int(replies[1]) if replicas > 0 else 0

    def withdraw(self, job: Job, queue: str, replicas: int = 0, timeout_ms: int = 0) -> int | None:
        """Delete a job whose submission failed, unless a worker started it already (then None: it runs); with
        `replicas` > 0, WAIT as `accept` does: how many replicas hold the withdrawal (else 0)."""
        keys = WithdrawKeys(
            job=job_key(job.id),
            upload=upload_key(job.id),
            unstarted=unstarted_key(queue, job.priority),
            deadlines=deadlines_key(queue),
        )
        return self.accept_and_wait(self._withdraw, keys.keys(), [job.id], replicas, timeout_ms)

    def get(self, job_id: str) -> Job | None:
        """The job with this id, or None if it was never issued or has expired."""
        raw: dict[bytes, bytes] = self.client.hgetall(job_key(job_id))  # type: ignore[assignment]
        if not raw or raw.get(PENDING_FIELD.encode()) == b"1":  # a submission still under way is not a job yet
            return None
        return Job.from_redis({k.decode(): v.decode() for k, v in raw.items()})

    def begin_run(
        self,
        job_id: str,
        queue: str,
        model: str,
        worker: str,
        max_attempts: int,
        priority: JobPriority = JobPriority.NORMAL,
    ) -> int:
        """Record that a worker starts a run of the job; see job_start.lua for the return value."""
        return self.begin_runs([job_id], queue, model, worker, max_attempts, priority)[0]

    def begin_runs(
        self,
        job_ids: list[str],
        queue: str,
        model: str,
        worker: str,
        max_attempts: int,
        priority: JobPriority = JobPriority.NORMAL,
    ) -> list[int]:
        """Begin a run of each of `job_ids` as `begin_run` does, in one round trip (a chunk's jobs start together)."""
        message = f"the job was started {max_attempts} times and its worker died each time; it is not tried again"
        with self.client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                args = StartArgs(max_attempts, utc_now(), model, worker, message, job_id, time.time())
                keys = StartKeys(
                    job=job_key(job_id),
                    stats=stats_key(),
                    unstarted=unstarted_key(queue, priority),
                    mark=started_mark_key(queue, priority),
                    upload=upload_key(job_id),
                    outbox=webhook_outbox_key(),
                    deadlines=deadlines_key(queue),
                    running=running_key(queue),
                )
                self._start(keys=keys.keys(), args=args.args(), client=pipe)
            return [int(attempt) for attempt in pipe.execute()]

    def requeue(self, member: str, queue: str, priority: JobPriority, answers: int, enqueued_at: float) -> None:
        """Start again the wait of a job or chunk (`member`) whose message is published again (requeue.lua)."""
        self._requeue(keys=[unstarted_key(queue, priority)], args=[member, enqueued_at, answers])

    def cancel(self, job: Job, queue: str) -> int:
        """Cancel the job: see job_cancel.lua; returns one of the CANCEL_* codes."""
        keys, args = self._queued_job_keys(job, queue)
        return int(self._cancel(keys=keys, args=[*args, CANCELED_MESSAGE]))

    def cancel_many(self, jobs: list[Job], queue: str) -> list[int]:
        """Cancel each of `jobs` as `cancel` does, in one pipeline; the CANCEL_* code of each."""
        with self.client.pipeline(transaction=False) as pipe:
            for job in jobs:
                keys, args = self._queued_job_keys(job, queue)
                self._cancel(keys=keys, args=[*args, CANCELED_MESSAGE], client=pipe)
            return [int(outcome) for outcome in pipe.execute()]

    def expire_if_overdue(self, job: Job, queue: str) -> bool:
        """End the job `expired` if it is still queued past its deadline; whether it did."""
        keys, args = self._queued_job_keys(job, queue)
        return int(self._expire(keys=keys, args=args)) == 1

    def overdue_job_ids(self, queue: str, now: float, limit: int) -> list[str]:
        """Up to `limit` ids of the queue's jobs whose deadline has passed while they were queued."""
        members: list[bytes] = self.client.zrangebyscore(  # type: ignore[assignment]
            deadlines_key(queue), "-inf", now, start=0, num=limit
        )
        return [member.decode() for member in members]

    def mark_succeeded(self, job_id: str, answer: str) -> int:
        """Record the job's answer, unless it already has one."""
        return self._finish(job_id, status=JobStatus.SUCCEEDED, answer=answer)

    def mark_failed(self, job_id: str, code: str, message: str) -> int:
        """Record why the job failed, unless it already ended."""
        return self._finish(job_id, status=JobStatus.FAILED, error_code=code, error_message=message)

    def load_upload(self, job_id: str, key: str = "") -> bytes | None:
        """The job's uploaded image bytes (at `key` for a batch's upload), or None if there are none (any more)."""
        data = self.client.get(key or upload_key(job_id))
        return data if isinstance(data, bytes) else None

    def load_uploads(self, keys: list[str]) -> list[bytes | None]:
        """The uploaded images at `keys` (a batch's), in one read; None for one no longer stored."""
        values: list[bytes | None] = self.client.mget(keys)  # type: ignore[assignment]
        return values

    def claim_idempotency_key(self, key: str, claim: str, pending_s: int) -> str | None:
        """Claim `key` for `claim` for `pending_s` (until the job is stored); None when claimed, else what holds it."""
        held = self._claim_key(keys=[key], args=[claim, pending_s])
        return held.decode() if isinstance(held, bytes) else None

    def release_idempotency_key(self, key: str, claim: str) -> None:
        """Free `key` if it still holds `claim` (its job could not be stored or enqueued)."""
        self._release_key(keys=[key], args=[claim])

    def replace_idempotency_claim(self, key: str, claim: str, replacement: str) -> None:
        """Make `key` hold `replacement` instead of `claim` (if it still holds it), for the rest of its TTL."""
        self._replace_key(keys=[key], args=[claim, replacement])

    def stats(self) -> dict[str, int]:
        """The fleet's counters since Redis started keeping them (see STATS_FIELDS)."""
        raw: dict[bytes, bytes] = self.client.hgetall(stats_key())  # type: ignore[assignment]
        counts = {name.decode(): int(value) for name, value in raw.items()}
        return {name: counts.get(name, 0) for name in STATS_FIELDS}

    def _finish(self, job_id: str, **fields: str) -> int:
        args: list[str | float] = [time.time(), "finished_at", utc_now()]
        for name, value in fields.items():
            args += [name, str(value)]
        keys = FinishKeys(
            job=job_key(job_id), stats=stats_key(), upload=upload_key(job_id), outbox=webhook_outbox_key()
        )
        return int(self._finish_script(keys=keys.keys(), args=args))

    @staticmethod
    def _queued_job_keys(job: Job, queue: str) -> tuple[list[str], list[str | float]]:
        keys = QueuedJobKeys(
            job=job_key(job.id),
            upload=upload_key(job.id),
            outbox=webhook_outbox_key(),
            unstarted=unstarted_key(queue, job.priority),
            deadlines=deadlines_key(queue),
        )
        return keys.keys(), [time.time(), utc_now(), job.id, DEADLINE_MESSAGE]
