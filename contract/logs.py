"""Logs as one JSON object per line (python-json-logger), for the workers (Celery) and the API (gunicorn).

Every line has `time`, `level`, `logger`, `pid` and `message`, plus the fields a call passes in `extra=` (`job_id`,
`error_code`, `duration_s`...). Lines written while a worker runs a task carry its `job_id` (the task id is the job
id) and its `batch_id` when the task has one, whatever logged them; Celery's own "Task ... received/succeeded" lines
get `job_id` and `duration_s` from their arguments. Imports neither Flask nor torch: the API uses it too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from celery import current_task
from celery.signals import after_setup_logger, after_setup_task_logger
from celery.utils.log import get_multiprocessing_logger
from pythonjsonlogger.json import JsonFormatter

JSON_FIELDS = "%(levelname)s %(name)s %(process)d %(message)s"
RENAMED_FIELDS = {"levelname": "level", "name": "logger", "process": "pid"}
TEXT_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"


class BlipqJsonFormatter(JsonFormatter):
    """python-json-logger's formatter with our field names, a UTC `time`, and the job a worker is running."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Takes (and ignores) the arguments of logging.Formatter: Celery and dictConfig may pass them.
        super().__init__(JSON_FIELDS, rename_fields=RENAMED_FIELDS, timestamp="time")

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        """Add the standard fields, then the running task's job (and batch), and what Celery's own lines know."""
        super().add_fields(log_data, record, message_dict)
        if record.name.startswith("celery."):
            # Celery attaches a task's arguments as `data`: questions, and image URLs that may carry signed tokens.
            # Its text lines leave them out; so do these.
            log_data.pop("data", None)
            # Its "Task %(name)s[%(id)s] succeeded in %(runtime)ss" lines pass their values as a mapping.
            values = record.args if isinstance(record.args, Mapping) else {}
            if "id" in values:
                log_data.setdefault("job_id", values["id"])
            if "runtime" in values:
                log_data.setdefault("duration_s", values["runtime"])
        if current_task:  # inside a task (never in the API, nor in a worker's main process)
            _add_task_context(log_data, current_task.request)


def _add_task_context(log_data: dict[str, Any], request: Any) -> None:
    if request.id:
        log_data.setdefault("job_id", request.id)
    payload = request.args[0] if request.args else None
    if isinstance(payload, dict) and payload.get("batch_id"):
        log_data.setdefault("batch_id", payload["batch_id"])


def gunicorn_logging(log_format: str) -> dict[str, Any]:
    """A logging.config.dictConfig for gunicorn (its `logconfig_dict`): gunicorn's lines and the app's, to stderr.

    Gunicorn's access log is silenced: the app logs one line per request itself, with the route, the status, the
    time taken and the job id (api/metrics.py), which gunicorn does not know.
    """
    formatter: dict[str, Any] = (
        {"()": BlipqJsonFormatter} if log_format == "json" else {"format": TEXT_FORMAT, "class": "logging.Formatter"}
    )
    handler = {"class": "logging.StreamHandler", "formatter": "blipq", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"blipq": formatter},
        "handlers": {"stderr": handler},
        "root": {"level": "INFO", "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["stderr"], "propagate": False},
            "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
        },
    }


def use_json_logs_in_celery() -> None:
    """Make a Celery worker write JSON lines: its handlers keep their streams and levels, with our formatter.

    Celery still sets up its logging (and still sends what tasks print to the log); only the formatters change.
    """
    after_setup_logger.connect(_format_as_json, weak=False)
    after_setup_task_logger.connect(_format_as_json, weak=False)


def _format_as_json(logger: logging.Logger | None = None, **_: Any) -> None:
    for each in (logger, get_multiprocessing_logger()):
        for handler in each.handlers if each is not None else ():
            handler.setFormatter(BlipqJsonFormatter())
