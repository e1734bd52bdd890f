"""The store that moves batches in Redis (`BatchStore`): a few round trips per batch or per chunk, none per item.

A batch's record, items and chunks, and what its keys hold, are contract/batches.py; the scripts that move its items
take what contract/batch_scripts.py says.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

from contract.batch_scripts import (
    AcceptBatchKeys,
    CancelItemKeys,
    EndChunkKeys,
    ItemKeys,
    StartChunkArgs,
    StartChunkKeys,
    WithdrawBatchKeys,
)
from contract.batches import (
    DEADLINE_MEMBER_PREFIX,
    Batch,
    CancelCounts,
    Item,
    item_id,
    item_job,
    parse_chunk_member,
)
from contract.job_store import JobStore
from contract.jobs import PENDING_FIELD, Job
from contract.keys import (
    batch_key,
    batch_keys,
    batch_outcomes_key,
    cancels_key,
    chunks_key,
    deadlines_key,
    ended_key,
    images_key,
    item_webhook_key,
    items_key,
    line_key,
    queue_outcomes_key,
    ring_key,
    running_key,
    share_name,
    shares_key,
    started_mark_key,
    stats_key,
    unstarted_key,
    uploads_left_key,
    webhook_outbox_key,
)
from contract.lua import register
from contract.states import JobPriority


class BatchStore:
    """Reads and writes batches in Redis: a few round trips per batch or per chunk, none per item."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.client = store.client
        self._start = register(self.client, "chunk_start")
        self._run = register(self.client, "items_run")
        self._end = register(self.client, "chunk_end")
        self._close = register(self.client, "batch_close")
        self._cancel_item = register(self.client, "item_cancel")
        self._delete = register(self.client, "batch_delete_ended")
        self._accept = register(self.client, "batch_accept")
        self._withdraw = register(self.client, "batch_withdraw")

    def create(
        self,
        batch: Batch,
        images: list[dict[str, str]],
        items: list[Item],
        chunks: list[dict[str, Any]],
        uploads: dict[str, bytes] | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> None:
        """Write the batch `pending`, with its images, items and chunks, in one transaction, all expiring after the TTL.

        A pending batch runs nothing until `accept` (after its chunks were published), as a pending job (JobStore).

        `images` are `{"image_url": ...}` or `{"image_name": ..., "upload": key}`; `chunks` the messages to send
        (payloads with their `number` and `member`); `uploads` maps each uploaded image's key to its bytes;
        `idempotency` (key, claim) ties an Idempotency-Key to the batch for as long as it lives.
        """
        ttl_s = self.store.ttl_s
        bid = batch.id
        keys = [batch_key(bid), items_key(bid), images_key(bid), chunks_key(bid)]
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(batch_key(bid), mapping={**batch.to_redis(), PENDING_FIELD: "1"})  # type: ignore[dict-item]
            pipe.rpush(items_key(bid), *(item.stored(batch.task) for item in items))
            pipe.hset(images_key(bid), mapping={str(n): json.dumps(image) for n, image in enumerate(images)})
            pipe.hset(chunks_key(bid), mapping={str(c["number"]): json.dumps(c) for c in chunks})
            for key in keys:
                pipe.expire(key, ttl_s)
            if batch.deadline_at:  # the reaper of each of its queues closes it
                for queue in batch.queues():
                    pipe.zadd(deadlines_key(queue), {DEADLINE_MEMBER_PREFIX + bid: float(batch.deadline_at)})
            for key, data in (uploads or {}).items():
                pipe.set(key, data, ex=ttl_s)
            if idempotency is not None:
                pipe.set(idempotency[0], idempotency[1], ex=ttl_s)
            if uploads:
                left: dict[str, int] = {}
                for item in items:
                    key = images[item.image].get("upload", "")
                    left[key] = left.get(key, 0) + 1
                pipe.hset(uploads_left_key(bid), mapping=left)  # type: ignore[arg-type]
                pipe.expire(uploads_left_key(bid), ttl_s)
            pipe.execute()

    def accept(
        self,
        batch: Batch,
        chunks: list[dict[str, Any]],
        replicas: int = 0,
        timeout_ms: int = 0,
        weight: float = 1.0,
    ) -> int | None:
        """Accept a pending batch's chunks into its API key's lines, as JobStore.accept does a job (same return
        value)."""
        groups = chunk_groups(batch, chunks)
        share, level = share_name(batch.owner), batch.priority
        keys = AcceptBatchKeys(
            batch=batch_key(batch.id),
            queues=tuple(
                key
                for queue in groups
                for key in (
                    unstarted_key(queue, level),
                    ring_key(queue, level),
                    shares_key(queue, level),
                    line_key(queue, level, share),
                )
            ),
        )
        args: list[str | int | float] = [time.time(), share, weight, *chunk_group_args(groups)]
        return self.store.accept_and_wait(self._accept, keys.keys(), args, replicas, timeout_ms)

    def withdraw(
        self, batch: Batch, chunks: list[dict[str, Any]], uploads: list[str], replicas: int = 0, timeout_ms: int = 0
    ) -> int | None:
        """Delete a batch whose submission failed, unless a worker started one of its chunks (then None: it runs);
        with `replicas` > 0, WAIT as JobStore.withdraw does (same return value)."""
        bid = batch.id
        groups = chunk_groups(batch, chunks)
        keys = WithdrawBatchKeys(
            batch=batch_key(bid),
            chunks=chunks_key(bid),
            queues=tuple(
                key for queue in groups for key in (unstarted_key(queue, batch.priority), deadlines_key(queue))
            ),
            doomed=(*batch_keys(bid), *uploads),
        )
        args = [DEADLINE_MEMBER_PREFIX + bid, len(groups), *chunk_group_args(groups)]
        return self.store.accept_and_wait(self._withdraw, keys.keys(), args, replicas, timeout_ms)

    def delete_ended(self, batch: Batch) -> bool:
        """Delete a batch whose items all ended, with its results; False (nothing deleted) when one has not ended."""
        return int(self._delete(keys=batch_keys(batch.id))) == 1

    def get(self, batch_id: str) -> Batch | None:
        """The batch with this id, or None if it was never made or has expired."""
        raw: dict[bytes, bytes] = self.client.hgetall(batch_key(batch_id))  # type: ignore[assignment]
        if not raw or raw.get(PENDING_FIELD.encode()) == b"1":  # a submission still under way is not a batch yet
            return None
        return Batch.from_redis({k.decode(): v.decode() for k, v in raw.items()})

    def expire_if_overdue(self, batch: Batch, now: float) -> Batch:
        """Close the batch `expired` if it is open past its deadline; the batch as it then is."""
        if not batch.overdue(now):
            return batch
        self._close_call(batch.id, "expired")
        return self.get(batch.id) or batch

    def cancel(self, batch: Batch) -> CancelCounts:
        """Cancel the batch: its items not yet in a model call end `canceled` and never run; running ones run on."""
        outcome = self._close_call(batch.id, "canceled")
        if outcome[0] < 0:  # gone, or closed already: nothing was canceled now
            return CancelCounts(0, 0, batch.count)
        canceled, running, ended = outcome
        return CancelCounts(canceled, running, ended)

    def cancel_item(self, batch: Batch, index: int) -> int:
        """Cancel one item: a CANCEL_* code of contract/transitions.py."""
        item = self.item(batch, index)
        queue = batch.queue_for(item.task) if item else batch.queue
        keys = CancelItemKeys(**asdict(self._item_keys(batch.id)), outcomes=queue_outcomes_key(queue))
        return int(self._cancel_item(keys=keys.keys(), args=[time.time(), index, item.upload_key if item else ""]))

    def item(self, batch: Batch, index: int) -> Job | None:
        """A batch item shown as a job, or None when there is no such item."""
        if not 0 <= index < batch.count:
            return None
        with self.client.pipeline(transaction=False) as pipe:
            pipe.lindex(items_key(batch.id), index)
            pipe.hget(batch_outcomes_key(batch.id), str(index))
            pipe.hgetall(item_webhook_key(item_id(batch.id, index)))
            pipe.sismember(cancels_key(batch.id), str(index))
            raw_item, raw_outcome, webhook, cancel_asked = pipe.execute()
        if raw_item is None:
            return None
        entry = Item.read(raw_item, batch.task)
        image = self._images(batch.id, {entry.image})[entry.image]
        delivery = {k.decode(): v.decode() for k, v in webhook.items()}
        return item_job(batch, index, entry, image, raw_outcome, delivery, bool(cancel_asked))

    def results(self, batch: Batch, start: int, stop: int) -> list[Job]:
        """Items `start` to `stop` (included) shown as jobs, in item order, in a few round trips."""
        indices = [str(index) for index in range(start, stop + 1)]
        with self.client.pipeline(transaction=False) as pipe:
            pipe.lrange(items_key(batch.id), start, stop)
            pipe.hmget(batch_outcomes_key(batch.id), indices)
            pipe.smismember(cancels_key(batch.id), indices)
            raw_items, raw_outcomes, cancels_asked = pipe.execute()
        entries = [Item.read(raw, batch.task) for raw in raw_items]
        images = self._images(batch.id, {entry.image for entry in entries})
        return [
            item_job(batch, start + offset, entry, images[entry.image], outcome, {}, bool(asked))
            for offset, (entry, outcome, asked) in enumerate(zip(entries, raw_outcomes, cancels_asked, strict=False))
        ]

    def start_chunk(self, payload: dict[str, Any], queue: str, worker: str, max_attempts: int, model: str) -> int:
        """Record that a worker received a chunk: its attempt number, or a START_* code (transitions.py)."""
        bid, number, member = str(payload["batch_id"]), int(payload["number"]), str(payload["member"])
        priority = JobPriority(payload.get("priority") or JobPriority.NORMAL)
        answers = parse_chunk_member(member)[2]
        message = f"the chunk was started {max_attempts} times and its worker died each time; it is not tried again"
        keys = StartChunkKeys(
            batch=batch_key(bid),
            chunks=chunks_key(bid),
            unstarted=unstarted_key(queue, priority),
            mark=started_mark_key(queue, priority),
            running=running_key(queue),
            stats=stats_key(),
            out=batch_outcomes_key(bid),
            items=items_key(bid),
            outbox=webhook_outbox_key(),
            ended=ended_key(bid),
            outcomes=queue_outcomes_key(queue),
        )
        task = str(payload.get("task") or "")
        args = StartChunkArgs(member, number, time.time(), worker, max_attempts, message, answers, model, task)
        return int(self._start(keys=keys.keys(), args=args.args()))

    def run_items(self, groups: list[tuple[str, list[int]]]) -> list[set[int]]:
        """Mark these items of each batch running, all in one round trip; for each batch, the indices to answer."""
        with self.client.pipeline(transaction=False) as pipe:
            for batch_id, indices in groups:
                self._run(keys=self._item_keys(batch_id).keys(), args=[time.time(), *indices], client=pipe)
            replies = pipe.execute()
        return [{int(index) for index in reply} for reply in replies]

    def end_chunk(self, payload: dict[str, Any], queue: str, outcomes: list[list[str]], done: bool = True) -> int:
        """End a chunk's items with their outcomes ([index, status, code, value JSON] each), in one call; an uploaded
        image whose last item ends goes with it."""
        upload_of = {str(i): str(image.get("upload", "")) for image in payload["images"] for i, _ in image["items"]}
        bid, number, member = str(payload["batch_id"]), int(payload["number"]), str(payload["member"])
        keys = EndChunkKeys(
            batch=batch_key(bid),
            out=batch_outcomes_key(bid),
            chunks=chunks_key(bid),
            running=running_key(queue),
            outbox=webhook_outbox_key(),
            ended=ended_key(bid),
            outcomes=queue_outcomes_key(queue),
        )
        args: list[str | int | float] = [time.time(), number, member, "1" if done else "0"]
        for outcome in outcomes:
            args += [*outcome, upload_of.get(outcome[0], "")]
        return int(self._end(keys=keys.keys(), args=args))

    def chunk_payload(self, batch_id: str, number: int) -> dict[str, Any] | None:
        """A chunk not yet ended, as its message carries it (None once it ended, or with its batch)."""
        raw = self.client.hget(chunks_key(batch_id), str(number))
        return json.loads(raw) if isinstance(raw, bytes) else None

    def chunk_worker(self, batch_id: str, number: int) -> str | None:
        """The worker that last started the chunk, or None."""
        raw = self.client.hget(chunks_key(batch_id), f"{number}:w")
        return raw.decode() if isinstance(raw, bytes) else None

    def _close_call(self, batch_id: str, why: str) -> list[int]:
        reply = self._close(keys=self._item_keys(batch_id).keys(), args=[time.time(), why])
        return [int(value) for value in reply]

    @staticmethod
    def _item_keys(batch_id: str) -> ItemKeys:
        return ItemKeys(
            batch=batch_key(batch_id),
            out=batch_outcomes_key(batch_id),
            items=items_key(batch_id),
            outbox=webhook_outbox_key(),
            ended=ended_key(batch_id),
        )

    def _images(self, batch_id: str, numbers: set[int]) -> dict[int, dict[str, str]]:
        ordered = sorted(numbers)
        if not ordered:
            return {}
        raws = self.client.hmget(images_key(batch_id), [str(number) for number in ordered])
        return {number: json.loads(raw) if raw else {} for number, raw in zip(ordered, raws, strict=True)}


def chunk_groups(batch: Batch, chunks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """A batch's chunks by the queue of their task, its task's queue first."""
    groups: dict[str, list[dict[str, Any]]] = {queue: [] for queue in batch.queues()}
    for chunk in chunks:
        groups[batch.queue_for(str(chunk.get("task") or batch.task))].append(chunk)
    return {queue: group for queue, group in groups.items() if group}


def chunk_group_args(groups: dict[str, list[dict[str, Any]]]) -> list[str | int]:
    """chunk_groups as batch_accept.lua and batch_withdraw.lua take them: for each queue, its chunks' answers, how
    many chunks, their members."""
    args: list[str | int] = []
    for group in groups.values():
        members = [str(chunk["member"]) for chunk in group]
        args += [sum(parse_chunk_member(member)[2] for member in members), len(members), *members]
    return args
