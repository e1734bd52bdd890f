"""The `blipq` command: `up` (everything on one machine), `api` and `worker` (one part each, for production)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from api.settings import ApiSettings
from worker.errors import SettingsError
from worker.settings import WorkerSettings


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen part."""
    parser = argparse.ArgumentParser(prog="blipq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="Redis, the API and workers on this machine, until Ctrl-C")
    up.add_argument("--host", default="127.0.0.1", help="address the API listens on (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="port the API listens on (default 8000)")
    up.add_argument("--workers", type=int, default=1, help="worker processes, one per GPU (default 1)")
    up.add_argument("--data-dir", type=Path, default=Path(".blipq"), help="where Redis keeps its append-only file")

    api = commands.add_parser("api", help="the HTTP API under gunicorn")
    api.add_argument("--bind", default="127.0.0.1:8000", help="host:port (default 127.0.0.1:8000)")
    api.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    api.add_argument("--threads", type=int, default=8, help="threads per gunicorn worker (default 8)")

    commands.add_parser("worker", help="one Celery worker with the model resident; other options go to celery")

    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "worker":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command in ("up", "api"):
            ApiSettings.from_env()
        if args.command in ("up", "worker"):
            WorkerSettings.from_env()
    except SettingsError as exc:
        sys.exit(f"blipq {args.command}: {exc}")

    if args.command == "up":
        from api.up import run_up

        sys.exit(run_up(args.host, args.port, args.workers, args.data_dir))
    if args.command == "api":
        gunicorn = ["--bind", args.bind, "--workers", str(args.workers), "--threads", str(args.threads)]
        os.execv(sys.executable, [sys.executable, "-m", "gunicorn", *gunicorn, "api.wsgi:app"])
    os.execv(sys.executable, [sys.executable, "-m", "worker", *rest])


if __name__ == "__main__":
    main()
