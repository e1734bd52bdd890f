"""`python -m worker [celery worker options]`: one worker process per GPU, pinned with CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import signal
import sys

from contract.errors import SettingsError
from worker.settings import WorkerSettings

# The pool (threads) and its size come from the app's configuration (worker/app.py): one model per worker.
DEFAULT_ARGS = ["--loglevel=INFO", "--without-mingle"]


def main(argv: list[str] | None = None) -> None:
    """Start a Celery worker on the configured queue, its model loaded before it takes a message."""
    # SIGTERM (a deploy, `docker stop`, Kubernetes) is Celery's warm shutdown: the worker finishes the jobs it holds,
    # within BLIPQ_SHUTDOWN_GRACE_S (worker.app.ShutdownGrace).
    from worker.app import create_worker_app

    try:
        settings = WorkerSettings.from_env()
    except SettingsError as exc:
        sys.exit(f"blipq worker: {exc}")
    app = create_worker_app(settings)
    # Until Celery installs its own handlers (after the model loaded), a SIGTERM stops the worker cleanly: it holds
    # no message yet.
    signal.signal(signal.SIGTERM, stop_before_ready)
    extra = sys.argv[1:] if argv is None else argv
    # --quiet: no start-up banner, which Celery prints as text past the logging (every line stays JSON).
    quiet = ["--quiet"] if settings.log_format == "json" else []
    app.worker_main([*quiet, "worker", *DEFAULT_ARGS, f"--queues={settings.queue}", *extra])


def stop_before_ready(signum: int, _frame: object) -> None:
    raise SystemExit(0)


if __name__ == "__main__":
    main()
