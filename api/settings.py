"""The settings of the API process, read from BLIPQ_* variables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

from limits import parse_many
from pydantic import ValidationInfo, field_validator
from pydantic_settings import NoDecode

from api.auth import ApiKey, parse_api_keys
from contract.errors import SettingsError
from contract.keys import ANONYMOUS_SHARE, share_name
from contract.settings import (
    DEFAULT_CAPTION_QUEUE,
    DEFAULT_QUEUE,
    OnOff,
    SharedSettings,
    comma_separated,
    derived,
    setting,
)
from contract.states import JobTask

FORM_OVERHEAD_BYTES = 64 * 1024  # room for the multipart boundaries and text fields beside one image
# A JSON body (a job, a batch): 10,000 batch items of long URLs and questions fit; images are uploaded as multipart.
MAX_JSON_BODY_BYTES = 16 * 1024 * 1024
# Answers waiting in a queue (single jobs and batch items not yet taken by a worker) beyond which submissions are
# refused (503 queue_full): about a minute of work for a few GPU workers, and a bound on what Redis holds for them.
DEFAULT_MAX_QUEUE_DEPTH = 100_000
DEFAULT_MAX_BATCH_UPLOAD_BYTES = 256 * 1024 * 1024  # a multipart batch's whole body: its images and its fields
MAX_KEY_WEIGHT = 1000.0
RATE_LIMIT_RULE = "a rate limit such as 120/minute, or several: 10/second;300/hour"


class ApiSettings(SharedSettings):
    """Everything the API process needs."""

    # Replicas that must hold a job (Redis WAIT) before it is answered 202; 0: answered once the primary holds it.
    min_replicas_ack: int = setting(
        0, "Redis replicas that must hold a job before it is answered 202 (0: the primary alone)", ge=0
    )
    replica_ack_timeout_ms: int = setting(
        500, "How long to wait for those replicas; then the job is withdrawn and answered 503", ge=1
    )
    queue: str = setting(DEFAULT_QUEUE, "The queue of vqa jobs (the default task)")
    caption_queue: str = setting(
        DEFAULT_CAPTION_QUEUE, "The queue of caption jobs, served by captioning workers", rule="not BLIPQ_QUEUE"
    )
    max_question_chars: int = setting(500, "The longest question or caption prompt", ge=1)
    api_keys_file: str = setting(
        "",
        "A file of API keys, one `name:sha256hex` line each (`blipq api-key new NAME` prints one), `#` comments",
        rule="a readable file holding at least one key",
    )
    # Validated after api_keys_file, whose keys it adds to its own.
    api_keys: Annotated[tuple[ApiKey, ...], NoDecode] = setting(
        (),
        "API keys besides the file's; no key at all: the API is open (as `blipq up` runs it)",
        variable="BLIPQ_API_KEY_HASHES",
        rule="name:sha256hex entries, comma-separated; each name once",
        validate_default=True,
    )
    rate_limit: str = setting("", "Job submissions per key (or client address); unset: no limit", rule=RATE_LIMIT_RULE)
    poll_rate_limit: str = setting(
        "", "Reads of jobs per key (or client address), a budget of their own; unset: no limit", rule=RATE_LIMIT_RULE
    )
    max_queue_depth: int = setting(
        DEFAULT_MAX_QUEUE_DEPTH, "Answers waiting in a queue beyond which submissions are refused (0: unbounded)", ge=0
    )
    key_queue_share: float = setting(
        0.5,
        "The share of BLIPQ_MAX_QUEUE_DEPTH one API key may hold waiting in its lines, at every level together; beyond "
        "it its submissions are refused (key_queue_full). Without API keys, the queue bound alone applies",
        gt=0,
        le=1,
    )
    key_weights: Annotated[dict[str, float], NoDecode] = setting(
        {},
        "Weights of API keys in the fair share of the workers within a priority level (a key not named weighs 1; "
        f"`{ANONYMOUS_SHARE}` names the requests made without a key)",
        rule="name=weight entries, comma-separated; each weight a number above 0 and at most 1000",
        shown_default="none: every key weighs 1",
    )
    wait_for_workers: OnOff = setting(
        False, "Jobs for a task no live worker serves wait for one (a fleet that scales from zero); off: no_worker"
    )
    tasks: Annotated[tuple[JobTask, ...], NoDecode] = setting(
        tuple(JobTask),
        "The tasks this deployment serves: /readyz wants a worker for each",
        rule="tasks (vqa, caption), comma-separated",
    )
    batch_chunk_size: int = setting(
        32, "Answers per chunk of a batch: one message, whose texts share a worker's model calls", ge=1
    )
    max_batch_upload_bytes: int = setting(
        DEFAULT_MAX_BATCH_UPLOAD_BYTES, "The largest body of a batch with uploaded images", ge=1024
    )
    webhooks_enabled: bool = derived(
        None, "BLIPQ_WEBHOOK_SECRET is set (workers sign with it): jobs may name a webhook"
    )

    def queue_for(self, task: JobTask) -> str:
        """The queue of a job of this task: only workers with a model for that task read it."""
        return self.caption_queue if task is JobTask.CAPTION else self.queue

    @property
    def max_body_bytes(self) -> int:
        """The largest body of a single job's form: one image plus the fields around it."""
        return self.max_image_bytes + FORM_OVERHEAD_BYTES

    @field_validator("caption_queue")
    @classmethod
    def differs_from_queue(cls, caption_queue: str, info: ValidationInfo) -> str:
        """Refuse the vqa queue: a vqa worker would take caption jobs, and answer them as questions."""
        if caption_queue == info.data.get("queue"):
            raise ValueError("must differ from BLIPQ_QUEUE")
        return caption_queue

    @field_validator("api_keys", mode="before")
    @classmethod
    def parse_key_hashes(cls, value: Any) -> Any:
        """Read `name:sha256hex` entries, comma-separated."""
        return parse_api_keys(value.split(","), "BLIPQ_API_KEY_HASHES") if isinstance(value, str) else value

    @field_validator("api_keys")
    @classmethod
    def add_file_keys(cls, keys: tuple[ApiKey, ...], info: ValidationInfo) -> tuple[ApiKey, ...]:
        """Add the keys of BLIPQ_API_KEYS_FILE; a name may appear only once in all."""
        path = info.data.get("api_keys_file")
        if path:
            keys += read_api_keys_file(path)
        names = [key.name for key in keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise SettingsError(
                f"BLIPQ_API_KEYS_FILE / BLIPQ_API_KEY_HASHES: the name {duplicates[0]!r} is there twice"
            )
        return keys

    @field_validator("rate_limit", "poll_rate_limit")
    @classmethod
    def check_rate_limit(cls, value: str) -> str:
        """Accept what the `limits` library parses, each limit allowing at least 1 request."""
        if not value:
            return value
        try:
            items = parse_many(value)
        except ValueError:
            raise ValueError(f"is not {RATE_LIMIT_RULE}") from None
        if any(item.amount < 1 for item in items):
            raise ValueError("must allow at least 1 request in each limit")
        return value

    @field_validator("tasks", mode="before")
    @classmethod
    def parse_tasks(cls, value: Any) -> Any:
        """Read task names, comma-separated; none: every task."""
        if not isinstance(value, str):
            return value
        known = tuple(task.value for task in JobTask)
        names = comma_separated(value)
        for name in names:
            if name not in known:
                raise ValueError(f"has {name!r}, which is not a task ({', '.join(known)})")
        return tuple(JobTask(name) for name in dict.fromkeys(names)) or tuple(JobTask)

    @field_validator("key_weights", mode="before")
    @classmethod
    def parse_key_weights(cls, value: Any) -> Any:
        """Read `name=weight` entries, comma-separated."""
        if not isinstance(value, str):
            return value
        weights: dict[str, float] = {}
        for entry in comma_separated(value):
            name, equals, raw = (part.strip() for part in entry.partition("="))
            try:
                weight = float(raw) if equals and name else math.nan
            except ValueError:
                weight = math.nan
            if not 0 < weight <= MAX_KEY_WEIGHT:  # NaN fails too
                raise ValueError(f"has {entry!r}, which is not name=weight with a weight above 0 and at most 1000")
            weights[name] = weight
        return weights

    def weight_of(self, owner: str) -> float:
        """The fair-share weight of the API key that made a job or batch (`owner`, "" without a key)."""
        return self.key_weights.get(share_name(owner), 1.0)

    @field_validator("webhooks_enabled", mode="before")
    @classmethod
    def webhooks_when_signed(cls, value: Any, info: ValidationInfo) -> Any:
        """Unset: whether there is a key to sign webhooks with."""
        return bool(info.data.get("webhook_secret")) if value is None else value


def read_api_keys_file(path: str) -> tuple[ApiKey, ...]:
    """The keys of a BLIPQ_API_KEYS_FILE; one that cannot be read, or holds none, is a SettingsError."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise SettingsError(f"BLIPQ_API_KEYS_FILE={path!r} cannot be read: {exc.strerror}") from None
    keys = parse_api_keys(lines, f"BLIPQ_API_KEYS_FILE={path!r}")
    if not keys:  # a file named but empty must not leave the API open
        raise SettingsError(f"BLIPQ_API_KEYS_FILE={path!r} holds no key: add one (`blipq api-key new NAME`)")
    return keys
