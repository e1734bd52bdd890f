"""Batches: many questions about many images submitted at once, shared by the API and the workers.

Imports neither Flask nor torch. A batch is a few Redis keys (named in contract/keys.py), whatever its size (all expire
together, `job_ttl_s` after submission):
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
from dataclasses import dataclass
from typing import Any, NamedTuple

from contract.jobs import Job, webhook_delivery
from contract.states import ENDED_STATUSES, JobPriority, JobStatus, JobTask
from contract.transitions import CANCELED_MESSAGE, DEADLINE_MESSAGE

MAX_BATCH_ANSWERS = 10_000  # answers one batch request may ask for
READ_PAGE = 500  # items read per round trip when a batch's results stream
CHUNK_MEMBER_PREFIX = "chunk:"  # a chunk in the never-started and running sets, beside job ids (which have no ':')
DEADLINE_MEMBER_PREFIX = "batch:"  # a batch in its queues' deadlines sets, beside job ids
CAPTION_MODEL_FIELD = f"model:{JobTask.CAPTION}"  # the batch hash's field of a vqa batch's captioning model
STATUS_COUNTS = tuple(str(status) for status in JobStatus)
LINE_TICKET_FIELD_PREFIX = "line_ticket:"  # its ticket in its API key's line there (batch_accept.lua)
TICKET_FIELD_PREFIX = "ticket:"  # the batch hash's field of its ticket in a never-started set (batch_accept.lua)


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
    # Each never-started set its chunks joined (keys.unstarted_key), with the batch's ticket there (Job.ticket).
    tickets: tuple[tuple[str, int], ...] = ()
    # Likewise its ticket in its API key's line at each (Job.line_ticket), by never-started set.
    line_tickets: tuple[tuple[str, int], ...] = ()

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
            tickets=tuple(
                (name.removeprefix(TICKET_FIELD_PREFIX), int(value))
                for name, value in fields.items()
                if name.startswith(TICKET_FIELD_PREFIX)
            ),
            line_tickets=tuple(
                (name.removeprefix(LINE_TICKET_FIELD_PREFIX), int(value))
                for name, value in fields.items()
                if name.startswith(LINE_TICKET_FIELD_PREFIX)
            ),
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

    @property
    def ended(self) -> int:
        """How many of its items ended: what a read that waits for the batch's progress compares."""
        counts = dict(self.counts)
        return sum(counts.get(str(status), 0) for status in ENDED_STATUSES)

    def summary(self) -> dict[str, Any]:
        """The batch as the API shows it: counts of its items by status, failures by code, progress, its webhook."""
        counts = dict(self.counts)
        by_status = {name: counts.get(name, 0) for name in STATUS_COUNTS}
        ended = self.ended
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


def outcome_value(status: str, answer: str = "", code: str = "", message: str = "") -> list[str]:
    """An item's outcome as chunk_end.lua takes it: status, error code, and the JSON kept for the item."""
    if status == JobStatus.SUCCEEDED:
        value = [status, answer]
    elif status == JobStatus.FAILED:
        value = [status, code, message]
    else:
        value = [status]
    return [status, code, json.dumps(value, separators=(",", ":"))]


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
