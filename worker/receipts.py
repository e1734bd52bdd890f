"""A worker's set of messages held, which the reaper (worker/reaper.py) reads: a message in the held set of a worker
whose record has expired is published again, started or not, so a worker that dies holding a message loses nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import redis

from contract.keys import held_key, holders_key

log = logging.getLogger("blipq.reaper")

HELD_TTL_S = 24 * 3600  # a worker's set of messages held outlives any message it names (a job's time limit)


class Receipts:
    """Keeps a worker's set of messages held: each message it receives goes in (one round trip, in the consumer
    thread, before a pool thread starts it: Celery's `task_received`), and out once its task returned
    (`task_postrun`), whether it ran, was skipped, or gave up waiting for its job's acceptance."""

    def __init__(self, client: redis.Redis, queue: str, worker: str) -> None:
        self.client, self.queue, self.worker = client, queue, worker

    def received(self, request: Any, **_: Any) -> None:
        key = held_key(self.queue, self.worker)
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.sadd(key, request.id)
                pipe.expire(key, HELD_TTL_S)
                pipe.sadd(holders_key(self.queue), self.worker)
                pipe.execute()
        except (redis.RedisError, OSError) as exc:  # the message looks lost: at worst it is published needlessly
            log.warning("cannot record message %s as held: %s", request.id, exc)

    def finished(self, task_id: str = "", **_: Any) -> None:
        try:
            self.client.srem(held_key(self.queue, self.worker), task_id)
        except (redis.RedisError, OSError) as exc:  # a job not started waits for this worker's end to run again
            log.warning("cannot record message %s as no longer held: %s", task_id, exc)
