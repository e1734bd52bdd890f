"""A job's states and priorities: the vocabulary the API, the workers and the Redis scripts share. Imports nothing."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"  # canceled while queued: never run
    EXPIRED = "expired"  # still queued at its deadline: never run


ENDED_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.EXPIRED})


class JobPriority(StrEnum):
    """How soon a job runs relative to the other jobs of its queue."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


# kombu's Redis transport keeps one list per priority step and BRPOPs step 0's list first: a LOWER number runs
# SOONER (the reverse of AMQP). 0, 3 and 6 are steps of kombu's own PRIORITY_STEPS, so each level has a list of its
# own and a level is first in, first out (worker/reaper.py relies on that).
BROKER_PRIORITY = {JobPriority.HIGH: 0, JobPriority.NORMAL: 3, JobPriority.LOW: 6}


class JobTask(StrEnum):
    """What a job asks of its image; each task has a queue of its own, served by workers with a model for it."""

    VQA = "vqa"  # answer `question` (BlipForQuestionAnswering)
    CAPTION = "caption"  # caption the image, continuing the prompt if any (BlipForConditionalGeneration)
