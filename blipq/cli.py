"""The `blipq` command: `up` (everything on one machine), `api` and `worker` (one part each, for production),
`api-key new NAME` (a key for a client), `ask IMAGE QUESTION` (a question to a running service), `caption IMAGE`
(a caption from it) and `tag PATH_OR_URL... -q QUESTION -o OUT.jsonl` (every question about every image, as batches,
into JSON Lines; `--caption` instead of questions: a caption of every image)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from api.auth import NAME_PATTERN, hash_api_key, new_api_key
from api.settings import ApiSettings
from blipq.settings import ClientSettings
from contract.errors import SettingsError
from worker.settings import WorkerSettings

CLIENT_COMMANDS = ("ask", "caption", "tag")  # the commands that use a running service (blipq.client)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the chosen part."""
    parser = argparse.ArgumentParser(prog="blipq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="Redis, the API and workers on this machine, until Ctrl-C")
    up.add_argument("--host", default="127.0.0.1", help="address the API listens on (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8000, help="port the API listens on (default 8000)")
    up.add_argument("--workers", type=int, default=1, help="VQA worker processes, one per GPU (default 1)")
    up.add_argument("--caption-workers", type=int, default=1, help="captioning worker processes (default 1; 0: none)")
    up.add_argument("--data-dir", type=Path, default=Path(".blipq"), help="where Redis keeps its append-only file")

    api = commands.add_parser("api", help="the HTTP API under gunicorn")
    api.add_argument("--bind", default="127.0.0.1:8000", help="host:port (default 127.0.0.1:8000)")
    api.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default 2)")
    # A long poll (GET /v1/jobs/<id>?wait=) holds its thread while it waits: threads are cheap, waiting clients many.
    api.add_argument("--threads", type=int, default=32, help="threads per gunicorn worker (default 32)")

    commands.add_parser("worker", help="one Celery worker with the model resident; other options go to celery")

    api_key = commands.add_parser("api-key", help="API keys for clients")
    api_key_actions = api_key.add_subparsers(dest="action", required=True)
    new_key = api_key_actions.add_parser("new", help="print a new random key, and the line that configures it")
    new_key.add_argument("name", help="who the key is for: it owns the jobs made with the key (A-Z a-z 0-9 _ . -)")

    add_client_parsers(commands)

    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "worker":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in CLIENT_COMMANDS:
        sys.exit(run_client_command(parser, args))
    if args.command == "api-key":
        if not NAME_PATTERN.match(args.name):
            parser.error(f"{args.name!r}: a key's name is 1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit")
        print_new_api_key(args.name)
        return
    try:
        if args.command in ("up", "api"):
            ApiSettings.from_env()
        if args.command in ("up", "worker"):
            WorkerSettings.from_env()
    except SettingsError as exc:
        sys.exit(f"blipq {args.command}: {exc}")

    if args.command == "up":
        from blipq.up import run_up

        os.environ.setdefault("BLIPQ_LOG_FORMAT", "text")  # `up` is for a person at a terminal
        if min(args.workers, args.caption_workers) < 0 or args.workers + args.caption_workers < 1:
            sys.exit("blipq up: --workers and --caption-workers are 0 or more, and at least one worker runs")
        sys.exit(run_up(args.host, args.port, args.workers, args.data_dir, args.caption_workers))
    if args.command == "api":
        # prometheus_client's multiprocess mode: each gunicorn worker process keeps its counters in files here, and
        # /metrics adds them up. Read when prometheus_client is imported, so set before gunicorn starts.
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="blipq-metrics-")
        gunicorn = ["--config", "python:api.gunicorn_conf", "--bind", args.bind]
        gunicorn += ["--workers", str(args.workers), "--threads", str(args.threads)]
        os.execv(sys.executable, [sys.executable, "-m", "gunicorn", *gunicorn, "api.wsgi:app"])
    os.execv(sys.executable, [sys.executable, "-m", "worker", *rest])


def add_client_parsers(commands: Any) -> None:
    """The options of `ask`, `caption` and `tag`, the commands that use a running service."""
    client = ClientSettings.from_env()
    ask = commands.add_parser("ask", help="ask a running service one question about one image; print the answer")
    ask.add_argument("image", help="a local image file, or an http(s) URL the workers fetch")
    ask.add_argument("question")
    ask.add_argument("--url", default=client.url, help="the API ($BLIPQ_URL)")
    ask.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer (default 300)")

    caption = commands.add_parser("caption", help="ask a running service for a caption of one image; print it")
    caption.add_argument("image", help="a local image file, or an http(s) URL the workers fetch")
    caption.add_argument("--prompt", default="", help="the caption starts with this text (default: none)")
    caption.add_argument("--url", default=client.url, help="the API ($BLIPQ_URL)")
    caption.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the caption (default 300)")

    tag = commands.add_parser(
        "tag", help="every question about every image (or a caption of each), as batches, into a JSON Lines file"
    )
    tag.add_argument("images", nargs="*", metavar="PATH_OR_URL", help="image files, directories of them, http(s) URLs")
    tag.add_argument(
        "--urls", type=Path, metavar="FILE", help="a file of image URLs, one per line (# starts a comment)"
    )
    tag.add_argument("-q", "--question", dest="questions", action="append", metavar="QUESTION", help="repeat for more")
    tag.add_argument("--caption", action="store_true", help="caption every image once (besides any questions)")
    tag.add_argument("--prompt", help="with --caption: every caption starts with this text (default: none)")
    tag.add_argument(
        "-o", "--out", type=Path, required=True, metavar="OUT.jsonl", help="JSON Lines output; re-run with it to resume"
    )
    tag.add_argument("--url", default=client.url, help="the API ($BLIPQ_URL)")
    tag.add_argument(
        "--per-request", type=int, default=1_000, metavar="N", help="answers per batch request (default 1,000)"
    )
    tag.add_argument(
        "--in-flight",
        type=int,
        default=4,
        metavar="N",
        help="batch requests on the service at once (default 4)",
    )
    tag.add_argument(
        "--shrink",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=(
            "upload each file as the pixels the model would see, made on this machine's cores: the same answers, "
            "fewer bytes (default: on; docs/cli.md says why)"
        ),
    )


def run_client_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run `ask`, `caption` or `tag` against a running service; their exit status."""
    if args.command == "ask":
        return run_ask(args.url, args.image, args.question, args.timeout)
    if args.command == "caption":
        return run_ask(args.url, args.image, None, args.timeout, args.prompt)
    from blipq.tag import run_tag

    if not (args.questions or args.caption):
        parser.error("tag: give questions (-q QUESTION, repeated), --caption, or both")
    if args.prompt is not None and not args.caption:
        parser.error("tag: --prompt goes with --caption (a question is asked with -q)")
    texts = args.questions or []
    return run_tag(
        args.url,
        args.images,
        args.urls,
        texts,
        args.out,
        args.per_request,
        args.caption,
        args.prompt or "",
        args.in_flight,
        args.shrink,
    )


def run_ask(url: str, image: str, question: str | None, timeout_s: float, prompt: str = "") -> int:
    """Print the answer, or with no question the caption (exit 0), or the job's or the request's error (exit 1)."""
    from blipq.client import BlipqClient, BlipqClientError

    client = BlipqClient(url, api_key=ClientSettings.from_env().api_key)
    command = "ask" if question is not None else "caption"
    try:
        if question is not None:
            print(client.ask(image, question, timeout_s=timeout_s))
        else:
            print(client.caption(image, prompt, timeout_s=timeout_s))
        return 0
    except BlipqClientError as exc:
        print(f"blipq {command}: {exc.code}: {exc.message}", file=sys.stderr)
    except (OSError, TimeoutError) as exc:  # an unreadable file, a read that timed out, no answer in time
        print(f"blipq {command}: {exc}", file=sys.stderr)
    return 1


def print_new_api_key(name: str) -> None:
    """Print a fresh key (the only time it is shown) and the `name:sha256hex` line that configures it."""
    key = new_api_key()
    print(f"API key for {name} (shown only now; the service keeps only its hash):")
    print(f"  {key}")
    print("Add this line to the file named by BLIPQ_API_KEYS_FILE (or to BLIPQ_API_KEY_HASHES, comma-separated):")
    print(f"  {name}:{hash_api_key(key)}")


if __name__ == "__main__":
    main()
