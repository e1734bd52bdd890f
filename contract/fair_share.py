"""Fair share between API keys within a priority level: deficit round robin over the keys' lines of held work.

A queue level is first in, first out for its broker list; fairness cannot live there (a key's backlog of thousands
would be ahead of everyone). So an accepted job or chunk is not published at once: it is held in its API key's line
at its level (job_accept.lua, batch_accept.lua; lib/fair.lua), and `release` hands members to the workers a few at a
time, as they take work. release.lua tops each level up to a window of answers released and not yet started
(`RELEASE_AHEAD_PER_WORKER` for each worker of the queue), taking members from the lines in deficit round robin: the
key at the head of the ring gets `QUANTUM` x its weight answers per turn, and a key that held nothing joins the ring
at its front (its turn comes next, as a new flow's does in FQ-CoDel: a key with little to ask waits for no other
key's turn). With k keys holding work at a level, each gets about its weight's share of the answers, whatever its
backlog; requests without keys are one key
(contract.keys.share_name). Priorities still come first: each level has its own lines and ring, and workers take
the higher levels' messages first (kombu's lists, one per priority step).

Who releases. The API, after each acceptance (so an idle fleet starts at once); each worker, after each message it
starts (its room in the window is made by that start); and the reaper, at each sweep (work accepted by an API that
died before it released, or left behind by a worker that died). A member is released in the script that scores it
with its release time in the never-started set, then published by the caller, stamped with that same time: a caller
that dies in between leaves a released member with no message, which the reaper finds missing and publishes, as it
does any message lost on its way (worker/reaper.py). Held members are scored `HELD_SCORE` + their acceptance time,
above every release time, and the reaper never looks above the release times.

The promises hold as before: a held member is in Redis from the 202 on (its line, its never-started set, both written
by the acceptance that the replicas acknowledge); a cancel, a deadline or a withdrawal takes it off the never-started
set, and release.lua drops a member that is no longer there, free of its key's share; the queue bound counts held
answers as waiting answers, and each key may hold at most its share of that bound (api/admission.py).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import redis
from celery import Celery
from redis.commands.core import Script

from contract.job_store import JobStore
from contract.keys import line_prefix, ring_key, shares_key, unstarted_key, workers_key
from contract.lua import register
from contract.messages import leave_waiting, look_up, task_id_of
from contract.states import JobPriority

log = logging.getLogger("blipq.fair_share")

QUANTUM = 32  # answers a key of weight 1 releases per turn: a chunk of the default size, about a model batch
# Answers released and not started, per worker of the queue: one model batch. Work the workers already hold waits
# ahead of a key that comes with little, so the window is as small as keeps them busy: each start releases the next,
# and a worker takes a model batch's worth while its intake (BLIPQ_WORKER_INTAKE, two model batches) has room.
# benchmarks/fair_share.py measured 64 against 32 here: the same answers/s, 32 fewer answers ahead of a newcomer.
RELEASE_AHEAD_PER_WORKER = 32
LEVELS = tuple(JobPriority)  # high, normal, low: the order workers take them in
_scripts: weakref.WeakKeyDictionary[redis.Redis, Script] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class KeyShare:
    """An API key's work held at a queue level: its answers waiting in its line, and its weight."""

    name: str
    held: int
    weight: float


def release(store: JobStore, celery: Celery, queue: str, now: float | None = None, recount: bool = False) -> int:
    """Release what the queue's window has room for, in fair order, and publish it; returns how many messages.

    A member whose job or chunk ended meanwhile is taken off its never-started set instead of being published. With
    `recount` (the reaper's sweep), the answers released and not started are counted again from the set first.
    """
    now = time.time() if now is None else now
    published = 0
    for priority, member in release_members(store.client, queue, now, recount):
        message = look_up(store, celery, queue, task_id_of(member))
        if message is None:  # it ended between its acceptance and now (a batch closed, say)
            leave_waiting(store, queue, priority, member)
            continue
        message.publish(now)
        published += 1
    return published


def release_members(
    client: redis.Redis, queue: str, now: float, recount: bool = False
) -> list[tuple[JobPriority, str]]:
    """Run release.lua for `queue` at `now`: the members it released, with their levels, to publish stamped `now`."""
    levels = [
        key
        for level in LEVELS
        for key in (unstarted_key(queue, level), ring_key(queue, level), shares_key(queue, level))
    ]
    released = _release_script(client)(
        keys=[workers_key(queue), *levels],
        args=[
            repr(now),
            RELEASE_AHEAD_PER_WORKER,
            QUANTUM,
            int(recount),
            *(line_prefix(queue, level) for level in LEVELS),
        ],
    )
    return [(LEVELS[int(released[index]) - 1], _text(released[index + 1])) for index in range(0, len(released), 2)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def release_quietly(store: JobStore, celery: Celery, queue: str) -> int:
    """`release`, for a caller whose own work is done: a failure is logged, and what it left held is released by the
    next start or the reaper's next sweep."""
    try:
        return release(store, celery, queue)
    except Exception as exc:  # Redis away or a publish failed: the work stays held, not lost
        log.warning("cannot release held work of queue %s now: %s", queue, exc)
        return 0


def key_shares(client: redis.Redis, queue: str, priority: JobPriority) -> list[KeyShare]:
    """The API keys that hold work at a queue level, with their answers held and weights (one read)."""
    return held_shares(share_counts(client.hgetall(shares_key(queue, priority))))


def share_counts(fields: Mapping[bytes | str, bytes | str]) -> dict[str, dict[str, float]]:
    """A level's fair-share hash (contract.keys.shares_key) by key: {name: {"arrived", "taken", "weight", ...}}."""
    counts: dict[str, dict[str, float]] = {}
    for raw_field, raw_value in fields.items():
        kind, _, name = _text(raw_field).partition(":")
        if name:
            counts.setdefault(name, {})[kind] = float(raw_value)
    return counts


def held_shares(counts: dict[str, dict[str, float]]) -> list[KeyShare]:
    """The keys of `share_counts` that hold answers in their lines, by name."""
    shares = []
    for name, count in sorted(counts.items()):
        held = int(count.get("arrived", 0) - count.get("taken", 0))
        if held > 0:
            shares.append(KeyShare(name, held, count.get("weight", 1.0)))
    return shares


def _release_script(client: redis.Redis) -> Script:
    """release.lua, registered once per client."""
    script = _scripts.get(client)
    if script is None:
        script = _scripts[client] = register(client, "release")
    return script
