"""The job record shared by the API and the workers: its fields, how it is stored and shown, and its ids and times.

Imports neither Flask nor torch. A job is a Redis hash that the API creates and that moves through
queued -> running -> succeeded | failed, or ends without running: canceled (a cancel while it was queued) or expired
(still queued at its deadline). Every change of state is a Lua script (contract/transitions.py), which the store
(contract/job_store.py) calls. A job expires `job_ttl_s` after submission. Its keys are in contract/keys.py, its
states in contract/states.py, its Celery app and message in contract/broker.py.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from contract.states import JobPriority, JobStatus, JobTask

JOB_ID_BYTES = 16  # 128 random bits: ids are unguessable
PENDING_FIELD = "pending"  # "1" on a job or batch record stored by a submission not yet accepted (transitions.py)
STATS_FIELDS = ("executions", "reruns", "duplicate_deliveries", "duplicate_executions", "worker_lost", "republished")


def webhook_delivery(status: str, attempts: int, error_code: str, error_message: str) -> dict[str, Any] | None:
    """Where a job's or a batch's webhook delivery stands, as clients see it; None before it is due (or with none)."""
    if not status:
        return None
    error = {"code": error_code, "message": error_message} if error_code else None
    return {"status": status, "attempts": attempts, "error": error}


def new_job_id() -> str:
    """A random, URL-safe, unguessable job id."""
    return secrets.token_urlsafe(JOB_ID_BYTES)


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string, the format of every timestamp in a job."""
    return utc_iso(time.time())


def utc_iso(epoch_s: float) -> str:
    """A time in epoch seconds as an ISO 8601 UTC string with milliseconds."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Job:
    """A job's record as stored in Redis and shown to clients."""

    id: str
    status: JobStatus
    question: str  # a vqa job's question, or a caption job's prompt ("": an unconditional caption)
    created_at: str
    image_url: str = ""
    answer: str = ""
    error_code: str = ""
    error_message: str = ""
    model: str = ""
    started_at: str = ""
    finished_at: str = ""
    owner: str = ""  # the name of the API key that made the job ("" when keys are off); never shown to clients
    priority: JobPriority = JobPriority.NORMAL
    deadline_at: str = ""  # epoch seconds: still queued then, the job ends `expired`; "" for none
    cancel_requested: bool = False
    webhook: str = ""  # the URL told when the job ends; "" for none
    webhook_status: str = ""  # "" until the job ends, then pending -> delivered | failed
    webhook_attempts: int = 0
    webhook_error_code: str = ""  # the last attempt's failure
    webhook_error_message: str = ""
    batch_id: str = ""  # the batch the job is an item of; "" for a job submitted alone
    index: int = 0  # its place among the batch's items
    upload_key: str = ""  # where a batch item's uploaded image is (keys.batch_upload_key); never shown to clients
    image_name: str = ""  # the file name of a batch item's uploaded image
    task: JobTask = JobTask.VQA
    # Its level's count of answers ever queued once it joined (keys.arrived_answers_field), written when it is accepted:
    # where it stands in line, for its end estimate; 0: none (not accepted yet, a batch item, an older record).
    ticket: int = 0
    # Its API key's count of answers ever arrived in its line at that level once it joined (lib/fair.lua join_line):
    # where it stands in its key's line, for its end estimate under fair share; 0: none, as for `ticket`.
    line_ticket: int = 0

    @classmethod
    def from_redis(cls, fields: dict[str, str]) -> Job:
        """Rebuild a job from its Redis hash."""
        known: dict[str, Any] = {name: value for name, value in fields.items() if name in cls.__dataclass_fields__}
        known["status"] = JobStatus(fields["status"])
        known["priority"] = JobPriority(fields.get("priority") or JobPriority.NORMAL)
        known["task"] = JobTask(fields.get("task") or JobTask.VQA)  # a record from before tasks asked a question
        known["cancel_requested"] = fields.get("cancel_requested") == "1"
        known["webhook_attempts"] = int(fields.get("webhook_attempts") or 0)
        known["index"] = int(fields.get("index") or 0)
        known["ticket"] = int(fields.get("ticket") or 0)
        known["line_ticket"] = int(fields.get("line_ticket") or 0)
        return cls(**known)

    def to_redis(self) -> dict[str, str]:
        """The job as flat string fields for a Redis hash (a flag is "1" or "")."""
        return {
            name: ("1" if value else "") if isinstance(value, bool) else str(value)
            for name, value in asdict(self).items()
        }

    def to_public(self) -> dict[str, Any]:
        """The job as the API shows it: empty fields become null, the error becomes {code, message}.

        A vqa job shows its `question` (`prompt` null); a caption job its `prompt` (`question` null).
        """
        error = {"code": self.error_code, "message": self.error_message} if self.error_code else None
        captioning = self.task is JobTask.CAPTION
        return {
            "id": self.id,
            "status": str(self.status),
            "task": str(self.task),
            "question": None if captioning else self.question,
            "prompt": (self.question or None) if captioning else None,
            "image_url": self.image_url or None,
            "image_name": self.image_name or None,
            "answer": self.answer if self.status is JobStatus.SUCCEEDED else None,
            "error": error,
            "model": self.model or None,
            "created_at": self.created_at,
            "started_at": self.started_at or None,
            "finished_at": self.finished_at or None,
            "priority": str(self.priority),
            "deadline_at": utc_iso(float(self.deadline_at)) if self.deadline_at else None,
            "cancel_requested": self.cancel_requested,
            "webhook": self.webhook or None,
            "webhook_delivery": self._webhook_delivery(),
            "batch_id": self.batch_id or None,
            "estimate": None,  # when it should end: the API's reads fill it in (api/estimates.py)
        }

    def to_webhook_body(self) -> dict[str, Any]:
        """What a webhook receives: the public job as a read of it shows it once it ended (its end estimate null),
        less the state of the delivery itself."""
        body = self.to_public()
        del body["webhook_delivery"]
        return body

    def overdue(self, now: float) -> bool:
        """Whether the job is queued past its deadline (it ends `expired` as soon as anyone looks)."""
        return self.status is JobStatus.QUEUED and bool(self.deadline_at) and now >= float(self.deadline_at)

    def _webhook_delivery(self) -> dict[str, Any] | None:
        return webhook_delivery(
            self.webhook_status, self.webhook_attempts, self.webhook_error_code, self.webhook_error_message
        )
