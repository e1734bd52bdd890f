"""Reading a batch: its summary, at once or as soon as it changed (a long poll), and its results as JSON Lines, every
item's or those of one status.

A read with `?wait=S` answers when the batch's count of ended items differs from `after` (the count the caller last
saw; without it, the count at the read's start), or after S seconds. The scripts that end items publish on the
batch's `ended` channel (contract/scripts/lib/batch.lua `wake`), which the read subscribes to before its first look,
so that no end between the look and the wait is missed; an `after` behind the count answers at once, so that no end
between two polls is lost either.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

from flask import request

from api.auth import api_key_name
from api.context import context
from api.errors import NotFoundError, ValidationError
from api.request_body import JOB_ID_PATTERN
from contract.batch_store import BatchStore
from contract.batches import READ_PAGE, Batch
from contract.keys import ended_key
from contract.states import JobStatus

RESULT_FIELDS = (
    "task",
    "image_url",
    "image_name",
    "question",
    "prompt",
    "status",
    "answer",
    "error",
)  # of an item's view, on its results line
DEADLINE_SLACK_S = 0.05  # a wait that reaches a batch's deadline looks again just past it, to expire it


def owned_batch(batches: BatchStore, batch_id: str) -> Batch:
    """The batch, refused as one never made when it is another API key's (or expired, or never was)."""
    batch = batches.get(batch_id) if JOB_ID_PATTERN.match(batch_id) else None
    if batch is None or batch.owner != api_key_name():
        raise NotFoundError("batch_not_found", "no batch has this id (it may have expired)")
    return batch


def current_batch(batches: BatchStore, batch_id: str) -> Batch:
    """The batch as it is now: closed `expired` first when it is open past its deadline."""
    return batches.expire_if_overdue(owned_batch(batches, batch_id), time.time())


def read_batch(batches: BatchStore, batch_id: str, wait_s: float, after: int | None) -> Batch:
    """The batch; with `wait_s`, once its ended count differs from `after` (or from the count at the first look),
    once every item ended, or after `wait_s`, whichever comes first."""
    if not wait_s:
        return current_batch(batches, batch_id)
    waited_until = time.monotonic() + wait_s
    with context().waiter.pubsub(ignore_subscribe_messages=True) as ends:
        ends.subscribe(ended_key(batch_id))
        while True:
            batch = current_batch(batches, batch_id)
            if after is None:
                after = batch.ended
            left = waited_until - time.monotonic()
            if batch.ended != after or batch.ended >= batch.count or left <= 0:
                return batch
            if batch.deadline_at and not batch.closed:  # its deadline closes it: a change to answer then
                left = min(left, max(float(batch.deadline_at) - time.time(), 0.0) + DEADLINE_SLACK_S)
            ends.get_message(timeout=left)


def query_after() -> int | None:
    """The request's `?after=N`: the ended count the caller last saw (a whole number >= 0), or None."""
    raw = request.args.get("after")
    if raw is None:
        return None
    if not raw.isdigit():
        raise ValidationError("after_invalid", "after: a whole number >= 0 (the batch's `ended` last seen) is expected")
    return int(raw)


def query_int(name: str, default: int) -> int:
    """A whole number >= 0 of the query string (`offset`, `limit`), or `default` when it is not there."""
    raw = request.args.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ValidationError("pagination_invalid", f"{name}: a whole number >= 0 is expected")
    return int(raw)


def query_status() -> JobStatus | None:
    """The request's `?status=`: only the results of items of this status, or None for every item's."""
    raw = request.args.get("status")
    if raw is None:
        return None
    try:
        return JobStatus(raw)
    except ValueError:
        names = ", ".join(str(status) for status in JobStatus)
        raise ValidationError("status_invalid", f"status: one of {names} is expected") from None


def result_lines(
    batches: BatchStore, batch: Batch, start: int, stop: int, status: JobStatus | None = None
) -> Iterator[str]:
    """Items `start` to `stop` (included) as JSON Lines, in item order; with `status`, only those of that status.
    Read a page of READ_PAGE items at a time (two reads a page, whatever the filter keeps)."""
    for first in range(start, stop + 1, READ_PAGE):
        for job in batches.results(batch, first, min(stop, first + READ_PAGE - 1)):
            if status is not None and job.status != status:
                continue
            public = job.to_public()
            line = {"index": job.index, "job_id": job.id, **{name: public[name] for name in RESULT_FIELDS}}
            yield json.dumps(line, separators=(",", ":")) + "\n"
