"""Gunicorn's settings for `blipq api` (`gunicorn -c python:api.gunicorn_conf`): logs and multiprocess metrics.

- Logs: every line, gunicorn's and the app's, goes to stderr in BLIPQ_LOG_FORMAT (json by default); gunicorn's
  access log is off, as the app logs each request itself (contract/logs.py).
- Metrics: `blipq api` points PROMETHEUS_MULTIPROC_DIR at a directory where each gunicorn worker process keeps its
  counters, so that /metrics adds them up (api/metrics.py). Stale files of an earlier run are removed at start, and
  a process that exits is marked dead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prometheus_client import multiprocess

from api.metrics import MULTIPROCESS_DIR_VARIABLE
from contract.logs import gunicorn_logging
from contract.settings import SharedSettings

logconfig_dict = gunicorn_logging(SharedSettings.from_env().log_format)


def on_starting(server: Any) -> None:
    """Before the worker processes start: remove the counters of a previous run."""
    directory = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
    if directory:
        for stale in Path(directory).glob("*.db"):
            stale.unlink()


def child_exit(server: Any, worker: Any) -> None:
    """A worker process exited: its live gauges no longer count (its counters still do)."""
    if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        multiprocess.mark_process_dead(worker.pid)
