"""What the processes of a benchmark run spend and where they run: CPU seconds, peak memory, CPU pinning.

psutil (installed with the dev tools) reads each process and its children; a child the benchmark waits for is timed
with wait4(2), whose rusage is that child's alone (RUSAGE_CHILDREN would mix in every child reaped before).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil


def tree(pid: int) -> list[psutil.Process]:
    """The process `pid` and its live descendants (a gunicorn master's workers, Celery's children)."""
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process `pid` and its descendants have spent: the live ones', and what the
    root's reaped children spent. For this process, its own threads alone (its children are other processes)."""
    if pid == os.getpid():
        return time.process_time()
    total = 0.0
    try:
        members = tree(pid)
        times = members[0].cpu_times()
        total += times.children_user + times.children_system
        for member in members:
            times = member.cpu_times()
            total += times.user + times.system
    except psutil.NoSuchProcess:  # a child gone meanwhile: its time is in the root's children_* once reaped
        pass
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of the process `pid` and its descendants."""
    total = 0
    for member in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):  # gone meanwhile
            total += member.memory_info().rss
    return total


class PeakSampler:
    """Calls `read` every `interval_s` in a thread from start to stop (a process's memory, Redis's): the peak, the
    last value and how many were read."""

    def __init__(self, read: Callable[[], int], interval_s: float) -> None:
        self.read, self.interval_s = read, interval_s
        self.peak = self.last = read()
        self.samples = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.last = self.read()
            self.peak = max(self.peak, self.last)
            self.samples += 1

    def stop(self) -> int:
        """Stop sampling; the peak."""
        self._stop.set()
        self._thread.join()
        return self.peak


def pin(pids: Iterable[int], cpus: Sequence[int]) -> None:
    """Pin every thread of each process (and its descendants) to `cpus`; the threads they start later inherit it.

    sched_setaffinity(2) applies to one thread: a process's other threads keep their mask unless each is pinned.
    """
    for pid in pids:
        for member in tree(pid):
            for task in Path(f"/proc/{member.pid}/task").glob("[0-9]*"):
                with contextlib.suppress(ProcessLookupError, PermissionError):  # a thread that ended meanwhile
                    os.sched_setaffinity(int(task.name), cpus)


@dataclass(frozen=True)
class ChildRun:
    """A child process run to its end: its exit status, wall seconds and the CPU seconds it spent."""

    returncode: int
    seconds: float
    cpu_s: float


def run_child(
    argv: Sequence[str], log: Path, cwd: Path, timeout_s: float, env: Mapping[str, str] | None = None
) -> ChildRun:
    """Run `argv` to its end (in `env`, else this process's), its output into `log`; the wall seconds from its start
    to its exit and its own CPU."""
    with log.open("wb") as stream:
        started = time.perf_counter()
        process = subprocess.Popen(argv, cwd=cwd, stdout=stream, stderr=subprocess.STDOUT, env=env)
        timer = threading.Timer(timeout_s, process.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return ChildRun(process.returncode, seconds, usage.ru_utime + usage.ru_stime)
