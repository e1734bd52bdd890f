"""Errors a job can end with, each with a stable machine-readable code."""

from __future__ import annotations


class BlipqError(Exception):
    """Root of the errors blipq raises; `code` is stable, the message is for humans."""

    code = "internal_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class SettingsError(BlipqError):
    """Raised when a BLIPQ_* environment variable has a value that cannot be used."""

    code = "bad_setting"


class ImageFetchError(BlipqError):
    """Raised when an image URL cannot be downloaded (refused, unreachable, HTTP error)."""

    code = "image_fetch_failed"


class UrlNotAllowedError(BlipqError):
    """Raised when an image URL or one of its redirects leads where the worker must not connect (never retried)."""

    code = "url_not_allowed"


class ImageFetchTimeoutError(ImageFetchError):
    """Raised when an image download does not finish within its deadline."""

    code = "image_fetch_timeout"


class ImageTooLargeError(BlipqError):
    """Raised when an image has more bytes or pixels than the configured limits allow."""

    code = "image_too_large"


class ImageInvalidError(BlipqError):
    """Raised when bytes are not a decodable image of an allowed format (or are truncated)."""

    code = "image_invalid"


class UploadMissingError(BlipqError):
    """Raised when a job's uploaded image is no longer in Redis (expired before the job ran)."""

    code = "upload_missing"


class ModelOutOfMemoryError(BlipqError):
    """Raised when the model runs out of device memory on a job's image and text alone (a batch is split first)."""

    code = "oom"


class WrongTaskError(BlipqError):
    """Raised when a job asks for a task (vqa, caption) that the worker's model does not do: it was misrouted."""

    code = "wrong_task"


class JobTimeoutError(BlipqError):
    """Raised when a job has not ended within its time limit (BLIPQ_JOB_TIME_LIMIT_S less a margin)."""

    code = "timeout"
