"""The prefetch bound: a worker takes messages from the queue only while it holds fewer answers than it will give soon.

Celery bounds what a worker reserves in messages (its prefetch); a message is a single job (one answer) or a chunk of
a batch (up to BLIPQ_BATCH_CHUNK_SIZE answers), so a bound in messages is no bound in work. Here the worker counts the
answers of every message it received and has not finished, and the broker channel consumes only while that count is
under BLIPQ_WORKER_INTAKE (about two model batches). The message taken last may be a whole chunk, so a worker holds
up to the intake plus one chunk less one answers. The rest stays on the queue: a high-priority job waits for about
one model batch, a batch cancel stops whatever is still queued, other workers take their share, and a worker that
dies leaves little to bring back.

The hook is the one Celery's own `worker_disable_prefetch` uses for Redis: the channel's `can_consume`, asked before
each fetch. The consumer's event loop asks it again at least every INTAKE_POLL_S, so that room made by a message that
ended is used at once rather than at the loop's next one-second wake-up.
"""

from __future__ import annotations

import logging
import threading
from types import MethodType
from typing import Any

from celery import Celery, bootsteps
from celery.signals import task_postrun, task_received, task_revoked

from contract.broker import TASK_VQA, TASK_VQA_CHUNK

log = logging.getLogger("blipq.worker")

INTAKE_POLL_S = 0.005  # the longest the consumer sleeps before it looks again for room to take a message


def message_answers(task_name: str, args: Any) -> int:
    """How many answers a message asks for: 1 for a job, the number of items for a chunk of a batch."""
    if task_name != TASK_VQA_CHUNK:
        return 1
    payload = args[0] if isinstance(args, (list, tuple)) and args and isinstance(args[0], dict) else {}
    return max(1, sum(len(image.get("items", ())) for image in payload.get("images", ())))


class Intake:
    """The answers a worker holds (messages received, not yet finished), and whether it may take more."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._by_task: dict[str, int] = {}
        self._lock = threading.Lock()

    def has_room(self) -> bool:
        return self.held < self.limit

    def take(self, task_id: str, answers: int) -> None:
        with self._lock:
            if task_id not in self._by_task:
                self._by_task[task_id] = answers
                self.held += answers

    def give_back(self, task_id: str) -> None:
        with self._lock:
            self.held -= self._by_task.pop(task_id, 0)

    def connect(self, app: Celery) -> None:
        """Count messages as the consumer receives them and as their tasks end; bound the channel's consumption."""
        intake = self

        def received(request: Any = None, **_: Any) -> None:
            if request is not None and request.name in (TASK_VQA, TASK_VQA_CHUNK):
                intake.take(request.id, message_answers(request.name, request.args))

        def ended(task_id: str = "", request: Any = None, **_: Any) -> None:
            intake.give_back(task_id or getattr(request, "id", ""))

        task_received.connect(received, weak=False)
        task_postrun.connect(ended, weak=False)
        task_revoked.connect(ended, weak=False)

        class BoundIntake(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
            """Wraps the task channel's `can_consume` once the task consumer exists."""

            requires = ("celery.worker.consumer.tasks:Tasks",)

            def start(self, c: Any) -> None:
                channel_qos = c.task_consumer.channel.qos
                consume_by_prefetch = channel_qos.can_consume

                def can_consume(qos: Any) -> bool:
                    return intake.has_room() and consume_by_prefetch()

                channel_qos.can_consume = MethodType(can_consume, channel_qos)
                if c.hub is not None:
                    c.hub.call_repeatedly(INTAKE_POLL_S, _look_again)
                log.info("intake: at most about %d answers held", intake.limit)

        app.steps["consumer"].add(BoundIntake)


def _look_again() -> None:
    """A timer that wakes the consumer's loop: it asks `can_consume` again as it goes round."""
