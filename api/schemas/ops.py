"""What the operations routes answer: liveness, readiness, the models served and the limits of a submission, the
fleet's counters, and the metrics."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, RootModel, create_model

from contract.fleet import WorkerRecord
from contract.jobs import STATS_FIELDS
from contract.states import JobPriority, JobTask


class MetricsText(RootModel[str]):
    """Prometheus's text format."""


# One field per counter of the job store, so that a new counter is documented as soon as it is kept.
Stats = create_model(
    "Stats",
    __doc__="The fleet's reliability counters, since Redis started keeping them.",
    **{name: (int, Field(ge=0)) for name in STATS_FIELDS},  # type: ignore[call-overload]
)


class Health(BaseModel):
    """The API process is alive."""

    status: Literal["ok"]


class TaskWorkers(BaseModel):
    """A task's queue, and the workers serving it with their model loaded."""

    queue: str
    workers: list[WorkerRecord]


class Readiness(BaseModel):
    """Whether jobs submitted now will run: Redis answers, and each task the deployment serves (BLIPQ_TASKS) has a
    worker with its model loaded."""

    status: Literal["ready", "not_ready"]
    redis: Literal["ok", "unreachable"]
    tasks: dict[JobTask, TaskWorkers] = Field(description="Each task the deployment serves (empty when Redis is away).")
    missing: list[str] = Field(description="What keeps the service from being ready: `redis`, or `worker:<task>`.")


class ImageSize(BaseModel):
    """The size, in pixels, that a model's processor resizes every image to."""

    width: int = Field(ge=1)
    height: int = Field(ge=1)


class KeyShareEntry(BaseModel):
    """An API key that holds work at a priority level of a queue, and its share of the workers there."""

    priority: JobPriority
    key: str | None = Field(
        description="The key's name when it is the caller's own (`-` for requests without a key); null for another's."
    )
    yours: bool = Field(description="Whether it is the key that made this request.")
    waiting: int = Field(ge=0, description="Its answers held in its line, not yet released to the workers.")
    weight: float = Field(gt=0, description="Its weight (BLIPQ_KEY_WEIGHTS).")
    share: float = Field(
        ge=0, le=1, description="The share of the workers it gets at that level while the keys listed hold work."
    )


class ModelEntry(BaseModel):
    """A task the API takes jobs for, and what serves it."""

    task: JobTask
    queue: str
    models: list[str] = Field(description="The models its live workers serve (a model id or a directory).")
    image_size: ImageSize | None = Field(
        description=(
            "The model input size its live workers publish (the largest, should they differ): a picture shrunk to it "
            "before upload is answered as the original would be, for fewer bytes. null when no live worker says."
        )
    )
    decode: str | None = Field(
        description="How its live workers decode images, when they publish it and all the same way; else null."
    )
    resample: str | None = Field(
        description=(
            "The PIL filter its live workers' processors resize with (`bicubic`), when they publish it and all the "
            "same one; else null."
        )
    )
    workers: list[WorkerRecord]
    waiting: int = Field(ge=0, description="Answers waiting in its queue (single jobs and batch items not started).")
    outcomes: dict[str, int] = Field(description="Runs of its jobs by how they ended, since Redis started counting.")
    shares: list[KeyShareEntry] = Field(
        description=(
            "The API keys holding work in its queue, by priority level, highest first: their shares of the workers "
            "(fair share within a level; a higher level's work goes first)."
        )
    )


class UploadLimits(BaseModel):
    """What the API accepts of a submission (its settings), so that a client can check its files before it sends."""

    max_image_bytes: int = Field(ge=1, description="BLIPQ_MAX_IMAGE_BYTES: the largest image, uploaded or by URL.")
    max_image_pixels: int = Field(ge=1, description="BLIPQ_MAX_IMAGE_PIXELS: the most pixels an image may have.")
    max_batch_upload_bytes: int = Field(ge=1, description="BLIPQ_MAX_BATCH_UPLOAD_BYTES: a batch upload's body.")
    max_question_chars: int = Field(ge=1, description="BLIPQ_MAX_QUESTION_CHARS: the longest question or prompt.")


class Models(BaseModel):
    """The tasks the API takes jobs for, and the limits of what it takes."""

    limits: UploadLimits
    models: list[ModelEntry]
