"""What `blipq up` checks before it starts anything: that its data directory is its own (an OS file lock, held for
its whole life) and that nothing listens on its port yet.

A second `blipq up` on the same port would otherwise report the first one's API as its own, and one on another
port would start a second Redis on the first one's append-only file. fcntl.flock is the lock: the kernel releases it
when the process ends, however it ends, so a lock file left by a killed `up` never blocks the next one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO

LOCK_FILE = "up.lock"  # in the data directory: the pid and the API address of the `up` that holds it


class UpCheckError(RuntimeError):
    """Raised when `blipq up` cannot start: its data directory is held by another `up`, or its port is in use."""


def lock_data_dir(data_dir: Path, host: str, port: int) -> IO[str]:
    """Hold `data_dir` for this process (until the returned file is closed, or the process ends), recording this
    process's pid and API address in its lock file; UpCheckError when another process holds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    lock = path.open("a+")  # not truncated before the lock is held: the holder's record must stay readable
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = _holder(lock.read())
        lock.close()
        raise UpCheckError(
            f"another `blipq up` ({holder}) is using the data directory {data_dir}: stop it first, "
            "or give this one another --data-dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"pid": os.getpid(), "host": host, "port": port}) + "\n")
    lock.flush()
    return lock


def check_port_free(host: str, port: int) -> None:
    """UpCheckError when something already listens on `host`:`port` (or the address cannot be used)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        # As gunicorn binds: an address still in TIME_WAIT from a previous run is free, a listening one is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UpCheckError(
                    f"port {port} on {host} is in use (another `blipq up`, or another program): stop it, "
                    "or choose another port with --port"
                ) from None
            raise UpCheckError(f"the API cannot listen on {host}:{port}: {exc.strerror}") from None


def _holder(record: str) -> str:
    """The lock holder's pid and API address, as its lock file records them."""
    try:
        fields = json.loads(record)
        return f"pid {int(fields['pid'])}, its API on port {int(fields['port'])} of {fields['host']}"
    except (ValueError, KeyError, TypeError):
        return "still starting"
