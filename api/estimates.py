"""End estimates: when a job, or a batch's last item, should end, at the rate the fleet drains its queue.

Strict priority (high, normal, low), first in first out within a level. A job or batch accepted takes a ticket in its
level's line (contract/scripts/lib/queue.lua `join_queue`): the level's count of answers ever arrived, its own
included. At a read, the answers that arrived at its level since are that count now less its ticket, so the answers
still waiting at its level that start no later than its own last answer are the level's waiting answers less those
that came after it. Its answers to go are those, its own not ended, and every answer waiting at the levels above
(arrived since or not), over the fleet's rate: the live workers' answers per busy second (contract/fleet.py
`measured_rate`, the mean of those measured, else the queue's kept rate) times their number. The busy rate, not
`answers_per_s`: a job behind a backlog is drained by workers that have work in hand, and a queue idle in the last
minute says nothing of how fast it drains.

Left out: the answers in the workers' hands (messages started, whose answers left the waiting count), which an
estimate at the same level or below then counts too low by up to a message per worker slot; a later arrival
canceled or expired while waiting (the line behind looks shorter than it was: the estimate is low by those); a job
published again by the reaper keeps its first ticket.

Cost: one read per estimate (the level counts and the line's, fields of one hash); the fleet's rate is read at
most once a `RATE_CHECK_S` per queue and API process (two round trips), as admission reads the live workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from contract.batches import Batch
from contract.fleet import kept_rate, live_workers, measured_rate
from contract.jobs import Job, utc_iso
from contract.keys import arrived_answers_field, unstarted_key, waiting_answers_key
from contract.states import ENDED_STATUSES, JobPriority, JobStatus

RATE_CHECK_S = 1.0  # how long one look at a queue's workers answers for, per API process
NO_WORKER = "no_worker"  # no live worker serves the queue
NO_RATE = "no_rate"  # workers are live, and none of the queue's has measured a rate (in a day)
LEVELS = tuple(JobPriority)  # high, normal, low: the order workers take them in

# (the app's fleet client, queue) -> (when looked, live workers, answers/s of one worker; 0): per app, as one process
# may hold apps of several services (tests do), whose queues may share a name.
_rates: dict[tuple[int, str], tuple[float, int, float]] = {}


@dataclass(frozen=True)
class Place:
    """Where a job or batch stands in one queue: its level, its ticket there, its own answers not ended, and whether
    some of them wait (none: every one is in a worker's hands, and nothing waiting is ahead of them)."""

    queue: str
    priority: JobPriority
    ticket: int
    own: int
    waiting: bool


def fleet_rate(client: redis.Redis, queue: str) -> tuple[int, float]:
    """The live workers of `queue` and the answers per second they drain together (0.0: none live, or none measured);
    looked at once a RATE_CHECK_S per process. `client` must decode responses."""
    now = time.monotonic()
    key = (id(client), queue)
    looked = _rates.get(key)
    if looked is None or now - looked[0] > RATE_CHECK_S:
        records = live_workers(client, queue)
        measured = any(record.busy_answers_per_s > 0 for record in records)
        one = measured_rate(records, kept_rate(client, queue) if records and not measured else 0.0)
        looked = _rates[key] = (now, len(records), one)
    return looked[1], looked[1] * looked[2]


def job_places(job: Job, queue: str) -> list[Place]:
    """A single job's place in its queue; none once it ended."""
    if job.status in ENDED_STATUSES:
        return []
    return [Place(queue, job.priority, job.ticket, 1, job.status is JobStatus.QUEUED)]


def batch_places(batch: Batch) -> list[Place]:
    """A batch's places, one per queue its items go to; none once every item ended.

    Its items' counts are the batch's, not each queue's: a batch that captions its images too counts its answers not
    ended in its task's queue, and only its waiting captions (those its ticket stands for) in the captioning queue.
    """
    summary = batch.summary()
    left = batch.count - summary["ended"]
    if left <= 0:
        return []
    waiting = summary["counts"][str(JobStatus.QUEUED)] > 0
    tickets = dict(batch.tickets)
    places = []
    for queue in batch.queues():
        own = left if queue == batch.queue else 0
        places.append(Place(queue, batch.priority, tickets.get(unstarted_key(queue, batch.priority), 0), own, waiting))
    return places


def estimate(
    client: redis.Redis, fleet_client: redis.Redis, places: list[Place], now: float | None = None
) -> dict[str, Any] | None:
    """The end estimate of a job or batch at `places` (None: it ended), as responses show it: the queue that ends
    last's. `client` reads the line counts (any client); `fleet_client` the workers' records (decoding responses)."""
    if not places:
        return None
    now = time.time() if now is None else now
    fields = []
    for place in places:
        fields += [unstarted_key(place.queue, level) for level in LEVELS]
        fields.append(arrived_answers_field(place.queue, place.priority))
    counts = [int(count or 0) for count in client.hmget(waiting_answers_key(), fields)]
    shown: dict[str, Any] | None = None
    width = len(LEVELS) + 1
    for number, place in enumerate(places):
        levels, arrived = counts[number * width : number * width + len(LEVELS)], counts[number * width + len(LEVELS)]
        ahead = answers_ahead(place, [max(0, count) for count in levels], arrived)
        workers, per_s = fleet_rate(fleet_client, place.queue)
        one = _shown(ahead, place.own, workers, per_s, now)
        if shown is None or _later(one, shown):
            shown = one
    return shown


def answers_ahead(place: Place, waiting: list[int], arrived: int) -> int:
    """The answers that start before the last of `place`'s own: `waiting` per level (LEVELS' order), `arrived` its
    level's count of answers ever arrived."""
    if not place.waiting:
        return 0
    level = LEVELS.index(place.priority)
    came_after = max(0, arrived - place.ticket) if place.ticket else 0
    through = sum(waiting[:level]) + max(0, waiting[level] - came_after)  # its own waiting answers included
    return max(0, through - place.own)


def _shown(ahead: int, own: int, workers: int, per_s: float, now: float) -> dict[str, Any]:
    if per_s <= 0:
        reason = NO_WORKER if workers == 0 else NO_RATE
        return {"ends_in_s": None, "ends_at": None, "answers_ahead": ahead, "answers_per_s": None, "reason": reason}
    ends_in_s = round((ahead + own) / per_s, 2)
    return {
        "ends_in_s": ends_in_s,
        "ends_at": utc_iso(now + ends_in_s),
        "answers_ahead": ahead,
        "answers_per_s": round(per_s, 3),
        "reason": None,
    }


def _later(one: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether estimate `one` ends after `other` (an estimate without a rate is the latest: it cannot be told)."""
    if one["ends_in_s"] is None or other["ends_in_s"] is None:
        return one["ends_in_s"] is None and other["ends_in_s"] is not None
    return bool(one["ends_in_s"] > other["ends_in_s"])
