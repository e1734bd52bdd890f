"""The worker's releases of held work (contract/fair_share.py), off its task threads.

Each message a worker starts makes room in its queue's window of released work, and the next held work should go out
at once, in fair order. The start only asks: a thread of its own releases what the room allows in one script call and
publishes it, however many starts asked meanwhile. So a task thread goes on with its fetch and its model call without
waiting for a release, and a burst of starts costs one release, not one each.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("blipq.worker")


class Releaser(threading.Thread):
    """Calls `release` whenever it was asked (`soon`) since its last call; stops at `stop`."""

    def __init__(self, release: Callable[[], object]) -> None:
        super().__init__(name="blipq-releaser", daemon=True)
        self.release = release
        self.asked = threading.Event()
        self.stopping = threading.Event()

    def soon(self) -> None:
        """Ask for a release: the thread makes one as soon as it is free."""
        self.asked.set()

    def run(self) -> None:
        while True:
            self.asked.wait()
            if self.stopping.is_set():
                return
            self.asked.clear()
            try:
                self.release()
            except Exception:  # never let the thread die: the next start, or the reaper, releases the rest
                log.exception("releasing held work failed")

    def stop(self) -> None:
        """End the thread after the release under way, if any."""
        self.stopping.set()
        self.asked.set()
