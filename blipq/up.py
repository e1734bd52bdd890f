"""`blipq up`: the whole service on one machine — its own Redis, the API, N workers — until Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import requests

from api.settings import ApiSettings
from blipq.cores import divide_cores
from blipq.settings import UpSettings
from blipq.up_checks import UpCheckError, check_port_free, lock_data_dir
from blipq.up_redis import READY_TIMEOUT_S, STOP_GRACE_S, RedisProcess, start_redis, stop_process
from worker.settings import WorkerSettings, usable_cores

LOCAL_SHUTDOWN_GRACE_S = 10.0  # on Ctrl-C, for a worker to finish the jobs it holds before it exits
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)  # between restarts of a worker that keeps dying


@dataclass
class WorkerSlot:
    """One worker process that `up` keeps alive."""

    index: int
    process: subprocess.Popen[bytes]
    task: str = "vqa"
    restarts: int = 0
    restart_at: float = 0.0


class Stack:
    """The processes of a local service, started and stopped in order."""

    def __init__(self, host: str, port: int, workers: int, data_dir: Path, caption_workers: int = 1) -> None:
        self.host, self.port, self.data_dir = host, port, data_dir
        # The workers of each task, VQA first: worker i takes metrics port BLIPQ_METRICS_PORT + i.
        self.tasks = ["vqa"] * workers + ["caption"] * caption_workers
        self.redis: RedisProcess | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.slots: list[WorkerSlot] = []
        self.env = dict(os.environ)
        # /readyz wants a worker for each task served: a task started with no worker is not served.
        self.env.setdefault("BLIPQ_TASKS", ",".join(dict.fromkeys(self.tasks)))
        self.env.setdefault("BLIPQ_SHUTDOWN_GRACE_S", str(LOCAL_SHUTDOWN_GRACE_S))
        self.worker_grace_s = WorkerSettings.from_env(self.env).shutdown_grace_s + STOP_GRACE_S
        api = ApiSettings.from_env(self.env)
        self.own_redis = "redis_url" not in api.model_fields_set  # no BLIPQ_REDIS_URL: `up` starts a Redis of its own
        # The captioning workers' model and queue: `blipq up`'s own setting, and the API's caption queue.
        self.caption_model = UpSettings.from_env(self.env).caption_model
        self.caption_queue = api.caption_queue
        # The cores this process may use, divided between the workers (blipq/cores.py): together they ask for no more.
        self.cores = sorted(os.sched_getaffinity(0))[: usable_cores()]
        self.shares = divide_cores(self.cores, len(self.tasks))

    def start(self) -> None:
        """Start Redis (unless BLIPQ_REDIS_URL is set), the API and the workers; wait for the API."""
        if self.own_redis:
            self.redis = start_redis(self.data_dir / "redis", avoid=frozenset({self.port}))
            self.env["BLIPQ_REDIS_URL"] = self.redis.url
            print(f"blipq: redis on {self.redis.url} (append-only file in {self.redis.data_dir})", flush=True)
        bind = f"{self.host}:{self.port}"
        self.api = self._spawn([sys.executable, "-m", "gunicorn", "--bind", bind, *GUNICORN_LOCAL, "api.wsgi:app"])
        self.slots = [WorkerSlot(i, self._spawn_worker(i, task), task) for i, task in enumerate(self.tasks)]
        print(f"blipq: {len(self.cores)} cores divided between the workers:", flush=True)
        for index, (task, share) in enumerate(zip(self.tasks, self.shares, strict=True)):
            print(f"blipq:   {task} worker {index} on {share.describe(self.env)}", flush=True)
        self._wait_for_api()

    def supervise(self) -> int:
        """Restart workers that die; return when the API or Redis dies."""
        while True:
            time.sleep(0.5)
            if self.api is not None and self.api.poll() is not None:
                print(f"blipq: the API exited with {self.api.returncode}; stopping", file=sys.stderr)
                return 1
            if self.redis is not None and self.redis.process.poll() is not None:
                print("blipq: redis exited; stopping", file=sys.stderr)
                return 1
            for slot in self.slots:
                self._revive(slot)

    def stop(self) -> None:
        """Workers first (they finish their job), then the API, then Redis."""
        # A second Ctrl-C must not abandon the processes that are not stopped yet.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for slot in self.slots:
            if slot.process.poll() is None:
                slot.process.terminate()
        for slot in self.slots:
            stop_process(slot.process, self.worker_grace_s)
        if self.api is not None:
            stop_process(self.api)
        if self.redis is not None:
            self.redis.stop()

    def _revive(self, slot: WorkerSlot) -> None:
        if slot.process.poll() is None:
            return
        now = time.monotonic()
        if not slot.restart_at:
            delay = RESTART_BACKOFF_S[min(slot.restarts, len(RESTART_BACKOFF_S) - 1)]
            code = slot.process.returncode
            print(f"blipq: {slot.task} worker {slot.index} exited with {code}; restarting in {delay:g} s")
            slot.restart_at = now + delay
        elif now >= slot.restart_at:
            slot.process = self._spawn_worker(slot.index, slot.task)
            slot.restarts += 1
            slot.restart_at = 0.0

    def _spawn_worker(self, index: int, task: str) -> subprocess.Popen[bytes]:
        share = self.shares[index]
        extra = {**worker_metrics_env(self.env, index, self.host), "BLIPQ_TASK": task, **share.env(self.env)}
        if task == "caption":  # BLIPQ_MODEL and BLIPQ_QUEUE, when set, are the VQA workers'; "": the task's default
            extra["BLIPQ_MODEL"] = self.caption_model
            extra["BLIPQ_QUEUE"] = self.caption_queue
        args = [sys.executable, "-m", "worker", f"--hostname={task}{index}@%h"]
        return self._spawn(args, extra, cores=share.cores)

    def _spawn(
        self, args: list[str], extra_env: dict[str, str] | None = None, cores: tuple[int, ...] | None = None
    ) -> subprocess.Popen[bytes]:
        # Pinned before it runs, between fork and exec, so that every thread and process it starts inherits its cores
        # (preexec_fn is safe here: `up` runs no thread of its own).
        pin = (lambda: os.sched_setaffinity(0, cores)) if cores else None
        env = {**self.env, **(extra_env or {})}
        # Own session: Ctrl-C reaches `up` only, which then stops everything in order.
        return subprocess.Popen(args, env=env, start_new_session=True, preexec_fn=pin)  # noqa: PLW1509

    def _wait_for_api(self) -> None:
        url = f"http://{self.host}:{self.port}/healthz"
        if not self._answers_ok(url, stop_when=lambda: self.api is not None and self.api.poll() is not None):
            raise RuntimeError(f"the API did not answer on {url}")

    def wait_until_ready(self) -> bool:
        """Wait (up to READY_TIMEOUT_S) until /readyz says every task has a worker with its model loaded."""
        return self._answers_ok(f"http://{self.host}:{self.port}/readyz")

    @staticmethod
    def _answers_ok(url: str, stop_when: Callable[[], bool] = lambda: False) -> bool:
        """Whether `url` answers 2xx within READY_TIMEOUT_S (asked every 0.2 s, until `stop_when()`)."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and not stop_when():
            try:
                if requests.get(url, timeout=5).ok:
                    return True
            except requests.RequestException:  # not listening yet, or still importing the app
                pass
            time.sleep(0.2)
        return False


def worker_metrics_env(env: dict[str, str], index: int, host: str) -> dict[str, str]:
    """Worker `index`'s metrics endpoint: BLIPQ_METRICS_PORT (9808) + index, on the API's address; 0 stays off."""
    base = WorkerSettings.from_env(env).metrics_port
    return {"BLIPQ_METRICS_PORT": str(base + index if base else 0), "BLIPQ_METRICS_ADDR": host}


# A single API process with threads is plenty on one machine: the API only validates and enqueues.
GUNICORN_LOCAL = ["--workers", "1", "--threads", "32", "--access-logfile", "-"]  # long polls hold threads


def run_up(host: str, port: int, workers: int, data_dir: Path, caption_workers: int = 1) -> int:
    """Run the whole service until Ctrl-C (or SIGTERM); returns the exit status.

    Nothing starts unless the data directory is this process's own (held for its life) and the API's port is free.
    """
    try:
        lock = lock_data_dir(data_dir, host, port)
        check_port_free(host, port)
    except UpCheckError as exc:
        print(f"blipq: {exc}", file=sys.stderr)
        return 1
    with lock:
        return _run_stack(host, port, workers, data_dir, caption_workers)


def _run_stack(host: str, port: int, workers: int, data_dir: Path, caption_workers: int) -> int:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # Both installed explicitly: a shell that starts `up` in the background hands it SIGINT ignored.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    stack = Stack(host, port, workers, data_dir, caption_workers)
    try:
        stack.start()
        if not stack.wait_until_ready():  # a job for a task with no worker yet would be refused
            print(f"blipq: some workers are still loading their models: see http://{host}:{port}/readyz", flush=True)
        print(try_it_banner(host, port), flush=True)
        return stack.supervise()
    except KeyboardInterrupt:
        print("\nblipq: stopping", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"blipq: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


def try_it_banner(host: str, port: int) -> str:
    """The lines `up` prints once the API answers."""
    base = f"http://{host}:{port}"
    example = Path(__file__).resolve().parent.parent / "demo_model" / "examples" / "red-circle.png"
    return "\n".join(
        [
            f"blipq: the API is up on {base} (Ctrl-C stops everything)",
            "Try it:",
            f"  curl -s -F image=@{example} -F 'question=what color is the shape?' {base}/v1/jobs",
            f"  curl -s -F image=@{example} -F task=caption {base}/v1/jobs",
            f"  curl -s '{base}/v1/jobs/<id>?wait=10'",
            f"  or open {base}/ in a browser",
        ]
    )
