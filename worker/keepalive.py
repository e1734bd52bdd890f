"""Idle connections of the image fetcher's pools: how long they are kept, how many, and the thread that closes them.

urllib3 keeps a pool's connections open for as long as the pool lives; a kept connection that idles costs a socket on
both ends, and the longer it idles the likelier the host closes it first. Here each connection put back in its pool
is stamped, and one thread per pool manager closes those idle `idle_s`, sleeping until the next one is due, and
stopping when none is left (the next connection kept starts it again).
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from typing import Any, Protocol

# Idle connections close after this. Below the 5 s of Apache's KeepAliveTimeout, Node's keepAliveTimeout and lighttpd,
# with room for a round trip, so the host seldom closes first (when it does, the request is sent once more); and a
# batch's images, fetched back to back, find their connection open. Gunicorn's 2 s matches it: there the retry helps.
KEEPALIVE_S = 2.0
KEPT_HOSTS = 16  # hosts (pools) whose idle connections are kept, the least recently used dropped first
KEPT_PER_HOST = 8  # idle connections kept per host (the fetch threads' default); more at once are closed after use
CLOSE_SLACK_S = 0.001  # the closer wakes this long after a connection is due, so that it is due when looked at


class IdleConnection(Protocol):
    """What the closer needs of a connection: when it went idle, whether it is open, and a way to close it."""

    idle_since: float  # time.monotonic() when it was put back in its pool

    @property
    def is_closed(self) -> bool: ...

    def close(self) -> None: ...


class IdleQueue(queue.LifoQueue[Any]):
    """A pool's queue of connections (None: a free slot) that can hand over those idle since before a time."""

    def take_idle(self, cutoff: float) -> tuple[list[IdleConnection], float | None]:
        """Take out the open connections idle since before `cutoff`, leaving their slots free; and when the longest
        idle of the others went idle (None: no other is open)."""
        expired: list[IdleConnection] = []
        oldest: float | None = None
        with self.mutex:
            for index, conn in enumerate(self.queue):
                if conn is None or conn.is_closed:
                    continue
                if conn.idle_since <= cutoff:
                    expired.append(conn)
                    self.queue[index] = None
                else:
                    oldest = conn.idle_since if oldest is None else min(oldest, conn.idle_since)
        return expired, oldest


class IdleConnections:
    """Closes the kept connections of one pool manager once idle `idle_s`, from a thread that runs while any is kept."""

    def __init__(self, idle_s: float) -> None:
        self.idle_s = idle_s
        self._queues: weakref.WeakSet[IdleQueue] = weakref.WeakSet()  # a pool dropped closes its own connections
        self._lock = threading.Lock()
        self._kept = 0  # counts kept(): the closer stops only if none came while it looked
        self._closer: threading.Thread | None = None

    def kept(self, idle_queue: IdleQueue) -> None:
        """Note that `idle_queue` has just been given an idle connection."""
        with self._lock:
            self._queues.add(idle_queue)
            self._kept += 1
            if self._closer is None:
                self._closer = threading.Thread(target=self._close_idle, name="blipq-keepalive", daemon=True)
                self._closer.start()

    def _close_idle(self) -> None:
        while True:
            with self._lock:
                queues, kept = list(self._queues), self._kept
            now = time.monotonic()
            oldest: float | None = None
            for idle_queue in queues:
                expired, queue_oldest = idle_queue.take_idle(now - self.idle_s)
                for conn in expired:
                    conn.close()
                if queue_oldest is not None:
                    oldest = queue_oldest if oldest is None else min(oldest, queue_oldest)
            if oldest is None:
                with self._lock:
                    if kept == self._kept:  # nothing idle, and nothing kept since: the next kept() starts a closer
                        self._closer = None
                        return
                continue
            time.sleep(max(oldest + self.idle_s - time.monotonic(), 0.0) + CLOSE_SLACK_S)
