"""`python -m tests.support.worker_forks`: starts real workers by forking a process that has imported them already.

A worker spends about 5 s of CPU importing torch, transformers and Celery before it loads its model; a test that kills
workers dozens of times, starting one after each kill, would spend minutes of a 2-core machine on imports. This
process imports the worker's modules once and then, for each line it reads on stdin, forks a child that runs
`python -m worker` (worker.__main__.main) as that command would: a process of its own with its own pid (its worker
identity), settings read from its environment, its own Celery app, Redis connections and model load, none of which
exists before the fork. It answers each line with the child's pid. Children are reaped by the kernel (SIGCHLD
ignored), so a killed one leaves no zombie.

A line is JSON: {"env": {variable: value}, "argv": [worker options], "log": path of the child's stdout and stderr}.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent.parent


def serve() -> None:
    """Import the worker, then fork a worker per line of stdin, answering with its pid."""
    import celery.apps.worker  # what `celery worker` imports when it starts: paid once, here
    import celery.concurrency.thread  # noqa: F401
    import kombu.transport.redis  # noqa: F401
    import transformers  # noqa: F401

    import worker.app
    import worker.inference  # noqa: F401
    from worker.__main__ import main

    threads = len(os.listdir(f"/proc/{os.getpid()}/task"))
    assert threads == 1, f"{threads} threads: a child forked now could inherit a lock another one holds"
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _run_child(main, request)
        print(pid, flush=True)


def _run_child(main: object, request: dict[str, object]) -> None:
    """In the child: the request's environment and log, then the worker's main; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        log = os.open(str(request["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.environ.clear()
        os.environ.update(request["env"])  # type: ignore[arg-type]
        argv = [str(arg) for arg in request["argv"]]  # type: ignore[attr-defined]
        sys.argv = [sys.argv[0], *argv]
        main(argv)  # type: ignore[operator]
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass
class ForkedWorker:
    """A worker process forked by a WorkerForks."""

    pid: int
    log_path: Path

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` and wait until the process is gone."""
        os.kill(self.pid, sig)
        while self.alive():
            time.sleep(0.005)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class WorkerForks:
    """The forking process, started by a test; `spawn` starts a worker."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.worker_forks"],
            # OpenBLAS (numpy's) starts a thread of its own when loaded: a process with threads must not fork.
            env={**env, "OPENBLAS_NUM_THREADS": "1"},
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._stdin: IO[str] = self.process.stdin  # type: ignore[assignment]
        self._stdout: IO[str] = self.process.stdout  # type: ignore[assignment]
        assert self._stdout.readline().strip() == "ready", "the forking process did not start"
        self.children: list[ForkedWorker] = []

    def spawn(self, env: dict[str, str], argv: list[str], log_path: Path) -> ForkedWorker:
        """Fork a worker with this environment and these options, logging to `log_path`."""
        self._stdin.write(json.dumps({"env": env, "argv": argv, "log": str(log_path)}) + "\n")
        self._stdin.flush()
        child = ForkedWorker(int(self._stdout.readline()), log_path)
        self.children.append(child)
        return child

    def stop(self) -> None:
        """Kill every child still alive, then the forking process."""
        for child in self.children:
            if child.alive():
                child.kill()
        self._stdin.close()
        self.process.wait(10)


if __name__ == "__main__":
    serve()
