"""Batches: many questions about many images submitted at once, shared by the API and the workers.

Imports neither Flask nor torch. A batch is a few Redis keys, whatever its size (all expire together, `job_ttl_s`
after submission):
- `blipq:batch:<id>`, a hash: the batch's fields and its items' counts by status (kept by
contract/batch_scripts.py);
- `blipq:batch-items:<id>`, a list: each item's image number and text (a question, or a caption's prompt), and its
  task when it is not the batch's (the captions of a vqa batch that captions its images too);
- `blipq:batch-images:<id>`, a hash: each distinct image, a URL or an uploaded file's name (the upload itself is
  `keys.batch_upload_key`, stored once for all its questions, and deleted as soon as the last of them ended:
  `blipq:batch-left:<id>` counts them);
- `blipq:batch-out:<id>`, a hash: each item's outcome once the model took it (running, then answered or failed);
- `blipq:batch-chunks:<id>`, a hash: each chunk not yet ended, as its message carries it (for the reaper);
- `blipq:batch-cancels:<id>`, a set: the items whose own cancel was asked (they show `cancel_requested`).
Items travel to the workers in chunks (broker.TASK_VQA_CHUNK): each chunk lists images, each with its
(item index, text) pairs, so a worker fetches an image once for all its questions. A chunk holds items of one task and
goes to that task's queue: a vqa batch that also captions its images (`caption_queue`) sends its captions in chunks
of their own to the captioning workers, which read the same uploads. A chunk starts in one script call
(when a worker receives it), its items become running in one call per model batch, and end in one call.

An item's id is `<batch id>.<index>`: `GET /v1/jobs/<item id>` shows it as a job (without timestamps of its own).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from contract.batch_scripts import (
    AcceptBatchKeys,
    CancelItemKeys,
    EndChunkKeys,
    ItemKeys,
    StartChunkArgs,
    StartChunkKeys,
    WithdrawBatchKeys,
)
from contract.jobs import PENDING_FIELD, Job, JobStore, webhook_delivery
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
    queue_outcomes_key,
    running_key,
    started_mark_key,
    stats_key,
    unstarted_key,
    uploads_left_key,
    webhook_outbox_key,
)
from contract.lua import register
from contract.states import ENDED_STATUSES, JobPriority, JobStatus, JobTask
from contract.transitions import CANCELED_MESSAGE, DEADLINE_MESSAGE

MAX_BATCH_ANSWERS = 10_000  # answers one batch request may ask for
READ_PAGE = 500  # items read per round trip when a batch's results stream
CHUNK_MEMBER_PREFIX = "chunk:"  # a chunk in the never-started and running sets, beside job ids (which have no ':')
DEADLINE_MEMBER_PREFIX = "batch:"  # a batch in its queues' deadlines sets, beside job ids
CAPTION_MODEL_FIELD = f"model:{JobTask.CAPTION}"  # the batch hash's field of a vqa batch's captioning model
STATUS_COUNTS = tuple(str(status) for status in JobStatus)


def chunk_member(batch_id: str, number: int, answers: int) -> str:
    """A chunk's name in its queue's never-started and running sets; it says how many answers it holds."""
    return f"{CHUNK_MEMBER_PREFIX}{batch_id}:{number}:{answers}"


def parse_chunk_member(member: str) -> tuple[str, int, int]:
    """(batch id, chunk number, answers) of a chunk_member name."""
    batch_id, number, answers = member.removeprefix(CHUNK_MEMBER_PREFIX).split(":")
    return batch_id, int(number), int(answers)


def item_id(batch_id: str, index: int) -> str:
    """A batch item's id, as its results line and `GET /v1/jobs/<id>` name it."""
    return f"{batch_id}.{index}"


def split_item_id(job_id: str) -> tuple[str, int] | None:
    """(batch id, index) of a batch item's id, or None for a single job's id."""
    batch_id, dot, index = job_id.rpartition(".")
    return (batch_id, int(index)) if dot and index.isdigit() else None


@dataclass(frozen=True)
class Batch:
    """A batch's record as stored in Redis, with its items' counts by status."""

    id: str
    count: int
    created_at: str
    owner: str = ""  # the name of the API key that made the batch; never shown to clients
    priority: JobPriority = JobPriority.NORMAL
    webhook: str = ""  # the URL told the batch's summary when its last item ends
    webhook_items: bool = False  # whether each item's end is told to the webhook too
    webhook_status: str = ""
    webhook_attempts: int = 0
    webhook_error_code: str = ""
    webhook_error_message: str = ""
    task: JobTask = JobTask.VQA  # every item's, but the captions of a vqa batch that captions its images too
    queue: str = ""  # the queue of its task's workers
    caption_queue: str = ""  # the captioning workers' queue, for a vqa batch that captions its images too; else ""
    deadline_at: str = ""  # epoch seconds: items not yet answered then end `expired`; "" for none
    closed: str = ""  # "" while open; "canceled" or "expired": no item that had not reached the model will run
    model: str = ""
    caption_model: str = ""  # the model of a vqa batch's captions
    counts: tuple[tuple[str, int], ...] = ()  # items by status, then failures by error code ("err:<code>")

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> Batch:
        """Rebuild a batch from its Redis hash."""
        counts = [(name, int(fields.get(name) or 0)) for name in STATUS_COUNTS]
        counts += sorted((name, int(value)) for name, value in fields.items() if name.startswith("err:"))
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
            queue=fields.get("queue", ""),
            caption_queue=fields.get("caption_queue", ""),
            deadline_at=fields.get("deadline_at", ""),
            closed=fields.get("closed", ""),
            model=fields.get("model", ""),
            caption_model=fields.get(CAPTION_MODEL_FIELD, ""),
            counts=tuple(counts),
        )

    def to_redis(self) -> dict[str, str]:
        """The batch's fields as written when it is made: every item queued."""
        return {
            "id": self.id,
            "count": str(self.count),
            "created_at": self.created_at,
            "owner": self.owner,
            "priority": str(self.priority),
            "webhook": self.webhook,
            "webhook_items": "1" if self.webhook_items else "",
            "task": str(self.task),
            "queue": self.queue,
            **({"caption_queue": self.caption_queue} if self.caption_queue else {}),
            "deadline_at": self.deadline_at,
            **{name: "0" for name in STATUS_COUNTS},
            "queued": str(self.count),
            "ended": "0",
        }

    @property
    def captions_too(self) -> bool:
        """Whether it is a vqa batch that captions its images too."""
        return self.task is JobTask.VQA and bool(self.caption_queue)

    def queue_for(self, task: JobTask | str) -> str:
        """The queue of its items of `task`."""
        return self.caption_queue if self.captions_too and task == JobTask.CAPTION else self.queue

    def queues(self) -> list[str]:
        """The queues its items go to: its task's, and the captioning workers' when it captions its images too."""
        return list(dict.fromkeys([self.queue, *([self.caption_queue] if self.captions_too else [])]))

    def model_for(self, task: JobTask) -> str:
        """The model that answers its items of `task` ("" until one started)."""
        return self.caption_model if self.captions_too and task is JobTask.CAPTION else self.model

    def overdue(self, now: float) -> bool:
        """Whether the batch is open past its deadline (it closes `expired` as soon as anyone looks)."""
        return not self.closed and bool(self.deadline_at) and now >= float(self.deadline_at)

    def summary(self) -> dict[str, Any]:
        """The batch as the API shows it: counts of its items by status, failures by code, progress, its webhook."""
        counts = dict(self.counts)
        by_status = {name: counts.get(name, 0) for name in STATUS_COUNTS}
        ended = sum(by_status[str(status)] for status in ENDED_STATUSES)
        return {
            "id": self.id,
            "count": self.count,
            "counts": by_status,
            "errors": {name.removeprefix("err:"): value for name, value in counts.items() if name.startswith("err:")},
            "ended": ended,
            "progress": ended / self.count if self.count else 1.0,
            "created_at": self.created_at,
            "task": str(self.task),
            "caption": self.captions_too,
            "priority": str(self.priority),
            "webhook": self.webhook or None,
            "webhook_delivery": webhook_delivery(
                self.webhook_status, self.webhook_attempts, self.webhook_error_code, self.webhook_error_message
            ),
        }


@dataclass(frozen=True)
class CancelCounts:
    """What a batch cancel did to its items."""

    canceled: int
    cancel_requested: int
    already_ended: int


class Item(NamedTuple):
    """A batch item as its batch is made: its image's number, its text (a question, or a caption's prompt), its task."""

    image: int
    text: str
    task: JobTask

    def stored(self, batch_task: JobTask) -> str:
        """The item as the item list holds it: its task only when it is not the batch's."""
        entry = [self.image, self.text] if self.task is batch_task else [self.image, self.text, str(self.task)]
        return json.dumps(entry, separators=(",", ":"))

    @classmethod
    def read(cls, raw: bytes | str, batch_task: JobTask) -> Item:
        """An item as the item list holds it."""
        entry = json.loads(raw)
        return cls(int(entry[0]), str(entry[1]), JobTask(entry[2]) if len(entry) > 2 else batch_task)


def plan_chunks(items: list[Item], max_answers: int) -> list[tuple[JobTask, list[dict[str, Any]]]]:
    """Group a batch's items, in item order, into chunks of one task and at most `max_answers` each: (task, chunk).

    Each chunk is a list of images, `{"image": number, "items": [[index, text], ...]}`. Questions about one image stay
    together in a chunk (an image with more questions than a chunk holds is split over as few chunks as it takes),
    so that a worker fetches the image once for all of them.
    """
    by_task: dict[JobTask, dict[int, list[list[Any]]]] = {}
    for index, item in enumerate(items):
        by_task.setdefault(item.task, {}).setdefault(item.image, []).append([index, item.text])
    chunks: list[tuple[JobTask, list[dict[str, Any]]]] = []
    for task, by_image in by_task.items():
        task_chunks: list[list[dict[str, Any]]] = [[]]
        room = max_answers
        for image, pairs in by_image.items():
            first = 0
            while first < len(pairs):
                if room == 0:
                    task_chunks.append([])
                    room = max_answers
                taken = pairs[first : first + room]
                task_chunks[-1].append({"image": image, "items": taken})
                room -= len(taken)
                first += len(taken)
        chunks += [(task, chunk) for chunk in task_chunks]
    return chunks


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

    def accept(self, batch: Batch, chunks: list[dict[str, Any]], replicas: int = 0, timeout_ms: int = 0) -> int | None:
        """Accept a pending batch whose chunks are published, as JobStore.accept does a job (same return value)."""
        groups = chunk_groups(batch, chunks)
        keys = AcceptBatchKeys(
            batch=batch_key(batch.id), unstarted=tuple(unstarted_key(queue, batch.priority) for queue in groups)
        )
        args: list[str | int | float] = [time.time(), *chunk_group_args(groups)]
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


def outcome_value(status: str, answer: str = "", code: str = "", message: str = "") -> list[str]:
    """An item's outcome as chunk_end.lua takes it: status, error code, and the JSON kept for the item."""
    if status == JobStatus.SUCCEEDED:
        value = [status, answer]
    elif status == JobStatus.FAILED:
        value = [status, code, message]
    else:
        value = [status]
    return [status, code, json.dumps(value, separators=(",", ":"))]


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


def item_job(
    batch: Batch,
    index: int,
    entry: Item,
    image: dict[str, str],
    raw_outcome: bytes | None,
    delivery: dict[str, str],
    cancel_asked: bool = False,
) -> Job:
    """A batch item as a job: its status from its outcome, or from its batch when it never reached the model;
    `cancel_asked` when its own cancel was asked (as its batch's is, when the batch was canceled)."""
    outcome = json.loads(raw_outcome) if raw_outcome else []
    answer = code = message = ""
    if outcome:
        status = JobStatus(outcome[0])
        if status is JobStatus.SUCCEEDED:
            answer = outcome[1]
        elif status is JobStatus.FAILED:
            code, message = outcome[1], outcome[2]
    elif batch.closed == JobStatus.CANCELED:
        status = JobStatus.CANCELED
    elif batch.closed == JobStatus.EXPIRED:
        status = JobStatus.EXPIRED
    else:
        status = JobStatus.QUEUED
    if status is JobStatus.CANCELED:  # before it ran, or (the outcome says so) after its worker died running it
        code, message = "canceled", outcome[1] if len(outcome) > 1 else CANCELED_MESSAGE
    elif status is JobStatus.EXPIRED:
        code, message = "deadline_exceeded", DEADLINE_MESSAGE
    return Job(
        id=item_id(batch.id, index),
        status=status,
        question=entry.text,
        created_at=batch.created_at,
        image_url=image.get("image_url", ""),
        answer=answer,
        error_code=code,
        error_message=message,
        model=batch.model_for(entry.task) if status is not JobStatus.QUEUED else "",
        owner=batch.owner,
        priority=batch.priority,
        deadline_at=batch.deadline_at,
        cancel_requested=cancel_asked or batch.closed == JobStatus.CANCELED,
        webhook=batch.webhook if batch.webhook_items else "",
        webhook_status=delivery.get("webhook_status", ""),
        webhook_attempts=int(delivery.get("webhook_attempts") or 0),
        webhook_error_code=delivery.get("webhook_error_code", ""),
        webhook_error_message=delivery.get("webhook_error_message", ""),
        batch_id=batch.id,
        index=index,
        upload_key=image.get("upload", ""),
        image_name=image.get("image_name", ""),
        task=entry.task,
    )
