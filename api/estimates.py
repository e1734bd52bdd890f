"""End estimates: when a job, or a batch's last item, should end, at the rate the fleet drains its queue.

The scheduling policy: strict priority (high, normal, low), and within a level, fair share between API keys (deficit
round robin by answers, contract/fair_share.py), each key's own line first in, first out. A job or batch accepted
takes two tickets: its key's count of answers ever arrived in its line (lib/fair.lua `join_line`), and its level's
(lib/queue.lua `join_queue`). At a read, its key's answers still in line up to its own last are its line ticket less
the answers its key has released since it began (`taken`): `own`. While they drain, every other key at the level
holding work releases its weight's share of as many, up to what it holds: min(held, own x its weight / this key's).
The answers ahead are those, the answers released and not yet started at its level, and every answer waiting at the
levels above. It ends in (ahead / rate) + max(own / rate, latency): its own not ended take their share of the rate,
and at least an answer's fixed latency, however short the line: the live workers' single-job run, its 10th
percentile over the last minute (fetch, decode, the model call it waits for, not the wait behind other work:
contract/fleet.py `job_run_s`). The rate is the live workers' answers per busy second (contract/fleet.py
`measured_rate`, the mean of those measured, else the queue's kept rate) times their number. The busy rate, not
`answers_per_s`: a job behind a backlog is drained by workers that have work in hand, and a queue idle in the last
minute says nothing of how fast it drains.

A record from before fair share (no line ticket) is read as before it: first in, first out within its level, the
answers that arrived at its level since its ticket being behind it.

Left out: the answers in the workers' hands (messages started, whose answers left the waiting count), which an
estimate at the same level or below then counts too low by up to a message per worker slot; a key that joins the
level later takes its share too (the estimate is low by it); a job published again by the reaper keeps its tickets;
the rate is one for the whole queue, single jobs and batch items alike (a line of single jobs drains slower per
answer than one of chunks).

Cost: one round trip per estimate (the level counts, and the fair-share hash of each place's level); the fleet's rate
is read at most once a `RATE_CHECK_S` per queue and API process (two round trips), as admission reads the live
workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis

from contract.batches import Batch
from contract.fair_share import held_shares, share_counts
from contract.fleet import kept_rate, live_workers, measured_rate
from contract.jobs import Job, utc_iso
from contract.keys import (
    ANONYMOUS_SHARE,
    arrived_answers_field,
    share_name,
    shares_key,
    unstarted_key,
    waiting_answers_key,
)
from contract.states import ENDED_STATUSES, JobPriority, JobStatus

RATE_CHECK_S = 1.0  # how long one look at a queue's workers answers for, per API process
NO_WORKER = "no_worker"  # no live worker serves the queue
NO_RATE = "no_rate"  # workers are live, and none of the queue's has measured a rate (in a day)
LEVELS = tuple(JobPriority)  # high, normal, low: the order workers take them in

# (the app's fleet client, queue) -> (when looked, live workers, answers/s of one worker; 0): per app, as one process
# may hold apps of several services (tests do), whose queues may share a name.
_fleets: dict[tuple[int, str], tuple[float, Fleet]] = {}


@dataclass(frozen=True)
class Fleet:
    """A queue's live workers as an estimate reads them: how many, the answers per second they drain together (0.0:
    none live, or none measured), and an answer's fixed latency (the workers' single-job run, 0.0 unknown)."""

    workers: int
    answers_per_s: float
    latency_s: float


@dataclass(frozen=True)
class Place:
    """Where a job or batch stands in one queue: its level, its tickets there (its level's, its key's line's), its own
    answers not ended, whether some of them wait (none: every one is in a worker's hands, and nothing waiting is ahead
    of them), and its API key's line."""

    queue: str
    priority: JobPriority
    ticket: int
    own: int
    waiting: bool
    line_ticket: int = 0
    share: str = ANONYMOUS_SHARE


def fleet_rate(client: redis.Redis, queue: str) -> Fleet:
    """The live workers of `queue` as an estimate reads them; looked at once a RATE_CHECK_S per process. `client` must
    decode responses."""
    now = time.monotonic()
    key = (id(client), queue)
    looked = _fleets.get(key)
    if looked is None or now - looked[0] > RATE_CHECK_S:
        records = live_workers(client, queue)
        measured = any(record.busy_answers_per_s > 0 for record in records)
        one = measured_rate(records, kept_rate(client, queue) if records and not measured else 0.0)
        runs = [record.job_run_s for record in records if record.job_run_s > 0]
        fleet = Fleet(len(records), len(records) * one, sum(runs) / len(runs) if runs else 0.0)
        looked = _fleets[key] = (now, fleet)
    return looked[1]


def job_places(job: Job, queue: str) -> list[Place]:
    """A single job's place in its queue; none once it ended."""
    if job.status in ENDED_STATUSES:
        return []
    waiting = job.status is JobStatus.QUEUED
    return [Place(queue, job.priority, job.ticket, 1, waiting, job.line_ticket, share_name(job.owner))]


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
    tickets, line_tickets, share = dict(batch.tickets), dict(batch.line_tickets), share_name(batch.owner)
    places = []
    for queue in batch.queues():
        own = left if queue == batch.queue else 0
        level = unstarted_key(queue, batch.priority)
        ticket, line_ticket = tickets.get(level, 0), line_tickets.get(level, 0)
        places.append(Place(queue, batch.priority, ticket, own, waiting, line_ticket, share))
    return places


def estimate(
    client: redis.Redis, fleet_client: redis.Redis, places: list[Place], now: float | None = None
) -> dict[str, Any] | None:
    """The end estimate of a job or batch at `places` (None: it ended), as responses show it: the queue that ends
    last's. `client` reads the line counts (any client); `fleet_client` the workers' records (decoding responses)."""
    if not places:
        return None
    now = time.time() if now is None else now
    with client.pipeline(transaction=False) as pipe:
        for place in places:
            fields = [unstarted_key(place.queue, level) for level in LEVELS]
            pipe.hmget(waiting_answers_key(), [*fields, arrived_answers_field(place.queue, place.priority)])
            pipe.hgetall(shares_key(place.queue, place.priority))
        replies = pipe.execute()
    shown: dict[str, Any] | None = None
    for number, place in enumerate(places):
        counts = [int(count or 0) for count in replies[2 * number]]
        levels, arrived = [max(0, count) for count in counts[: len(LEVELS)]], counts[len(LEVELS)]
        ahead = answers_ahead(place, levels, arrived, share_counts(replies[2 * number + 1]))
        one = _shown(ahead, place.own, fleet_rate(fleet_client, place.queue), now)
        if shown is None or _later(one, shown):
            shown = one
    return shown


def answers_ahead(place: Place, waiting: list[int], arrived: int, shares: dict[str, dict[str, float]]) -> int:
    """The answers that start before the last of `place`'s own: `waiting` per level (LEVELS' order), `arrived` its
    level's count of answers ever arrived, `shares` its level's fair-share counts (contract.fair_share.share_counts).
    """
    if not place.waiting:
        return 0
    level = LEVELS.index(place.priority)
    above = sum(waiting[:level])
    came_after = max(0, arrived - place.ticket) if place.ticket else 0
    in_arrival_order = max(0, waiting[level] - came_after)  # its level's waiting answers that arrived with it or before
    if not place.line_ticket:  # a record from before fair share: first in, first out within its level
        return max(0, above + in_arrival_order - place.own)
    held = {share.name: share for share in held_shares(shares)}
    mine = shares.get(place.share, {})
    own_line = max(0, place.line_ticket - int(mine.get("taken", 0)))  # its key's answers in line, through its own
    weight = mine.get("weight", 1.0)
    others = sum(
        min(share.held, own_line * share.weight / weight) for name, share in held.items() if name != place.share
    )
    released = max(0, waiting[level] - sum(share.held for share in held.values()))  # released, not yet started
    if not own_line:  # its own are released too: those released after it (which arrived after it) are behind it
        released = min(released, in_arrival_order)
    return max(0, round(above + released + own_line + others) - place.own)


def _shown(ahead: int, own: int, fleet: Fleet, now: float) -> dict[str, Any]:
    per_s = fleet.answers_per_s
    if per_s <= 0:
        reason = NO_WORKER if fleet.workers == 0 else NO_RATE
        return {"ends_in_s": None, "ends_at": None, "answers_ahead": ahead, "answers_per_s": None, "reason": reason}
    # Its own answers take their share of the rate, and at least an answer's fixed latency: the last of them is
    # fetched, decoded and waits for its model call however fast the fleet drains.
    ends_in_s = round(ahead / per_s + max(own / per_s, fleet.latency_s), 2)
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
