"""The worker's Celery consumer: Celery's own, save that losing the broker never ends the worker.

When the broker connection drops after it was up (Redis restarts, a Sentinel failover), Celery 5.7's consumer first
collects the connection (which lets go of its transport) and then closes it. With kombu 5.7's Redis transport the
close then restores the channel's unacknowledged messages through a connection pool it must build anew, from the
transport it no longer has: an AttributeError, which Celery does not count as a connection error. The consumer
stops ("Unrecoverable error") and the worker exits, holding its messages until the reaper or another worker takes
them back. The close is only a clean-up of a connection being thrown away (its messages are restored by the next
connection, and by the reaper: worker/reaper.py), so here it may fail without ending the worker.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger("blipq.worker")


class Consumer(CeleryConsumer):  # type: ignore[misc]  # Celery ships no types
    """Celery's consumer, whose clean-up of a lost broker connection cannot stop it (see the module)."""

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection = self.connection
        if connection is not None:
            connection.close = connection.release = _tolerant(connection.close)
        super().on_connection_error_after_connected(exc)


def _tolerant(close: Any) -> Any:
    def close_lost_connection() -> None:
        try:
            close()
        except AttributeError as exc:  # kombu closing a channel whose transport the collect let go of
            log.warning("a lost broker connection did not close cleanly (%s); reconnecting", exc)

    return close_lost_connection
