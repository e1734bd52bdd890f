"""Typed settings for the API process, read from BLIPQ_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from worker.settings import (
    DEFAULT_JOB_TTL_S,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_QUEUE,
    DEFAULT_REDIS_URL,
    env_int,
    env_redis_url,
    env_str,
)

FORM_OVERHEAD_BYTES = 64 * 1024  # room for the multipart boundaries and text fields beside one image


@dataclass(frozen=True)
class ApiSettings:
    """Everything the API process needs."""

    redis_url: str = DEFAULT_REDIS_URL
    queue: str = DEFAULT_QUEUE
    job_ttl_s: int = DEFAULT_JOB_TTL_S
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_question_chars: int = 500

    @property
    def max_body_bytes(self) -> int:
        """The largest request body accepted: one image plus the form around it."""
        return self.max_image_bytes + FORM_OVERHEAD_BYTES

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApiSettings:
        """Build settings from the environment; raises SettingsError naming the variable at fault."""
        env = os.environ if env is None else env
        return cls(
            redis_url=env_redis_url(env),
            queue=env_str(env, "BLIPQ_QUEUE", DEFAULT_QUEUE),
            job_ttl_s=env_int(env, "BLIPQ_JOB_TTL_S", DEFAULT_JOB_TTL_S, minimum=60),
            max_image_bytes=env_int(env, "BLIPQ_MAX_IMAGE_BYTES", DEFAULT_MAX_IMAGE_BYTES, minimum=1024),
            max_question_chars=env_int(env, "BLIPQ_MAX_QUESTION_CHARS", 500, minimum=1),
        )
