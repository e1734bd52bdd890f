"""Keeping a submission's promise: an Idempotency-Key claimed once, and a stored submission published and accepted
(the 202) or withdrawn (the 503), so that it runs exactly when the client was told it would.

Shared by the job routes (api/views.py) and the batch routes (api/batches.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import redis
from kombu.exceptions import OperationalError

from api.errors import ApiError, ConflictError, ServiceUnavailableError
from api.services import services
from worker.contract.jobs import JobStore

log = logging.getLogger("blipq.api")
T = TypeVar("T")

IDEMPOTENCY_PENDING_S = 60  # a key claimed by a request that died before storing its job is free again after this
IDEMPOTENCY_WAIT_S = 5.0  # how long a duplicate arriving with the first waits for the first one's job to be stored
IDEMPOTENCY_POLL_S = 0.05


def broker_unavailable() -> ServiceUnavailableError:
    """The 503 of a submission that Redis could not take."""
    return ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later")


def earlier_submission(store: JobStore, key: str, claim: str, lookup: Callable[[str], T | None]) -> T | None:
    """What an earlier request with this Idempotency-Key made (`lookup` finds it by id: a job, a batch), or None once
    this request holds the key.

    A request that finds the key claimed but its job not stored yet (the two arrived together) waits for it.
    """
    fingerprint = claim.partition(":")[0]
    waited_until = time.monotonic() + IDEMPOTENCY_WAIT_S
    while True:
        try:
            held = store.claim_idempotency_key(key, claim, IDEMPOTENCY_PENDING_S)
            held_fingerprint, _, job_id = (held or "").partition(":")
            job = lookup(job_id) if held is not None and held_fingerprint == fingerprint else None
        except redis.RedisError as exc:
            log.warning("cannot claim an idempotency key: %s", exc)
            raise broker_unavailable() from None
        if held is None or job is not None:
            return job
        if held_fingerprint != fingerprint:
            message = "this Idempotency-Key was used for another request; a new job needs a new key"
            raise ConflictError("idempotency_conflict", message)
        if time.monotonic() >= waited_until:
            message = "a request with this Idempotency-Key is still being stored; retry in a moment"
            raise ConflictError("idempotency_key_in_use", message)
        time.sleep(IDEMPOTENCY_POLL_S)


@contextmanager
def released_on_refusal(store: JobStore, claim: tuple[str, str] | None) -> Iterator[None]:
    """Free the request's Idempotency-Key claim when an admission check refuses it: its retry must be made anew, not
    told that the key is in use."""
    try:
        yield
    except ApiError:
        release_claim(store, claim)
        raise


def release_claim(store: JobStore, claim: tuple[str, str] | None) -> None:
    """Free an Idempotency-Key whose submission was not stored or was withdrawn: a retry makes it anew."""
    if claim is None:
        return
    try:
        store.release_idempotency_key(*claim)
    except redis.RedisError:  # Redis is away: the claim expires by itself
        log.warning("could not release an idempotency key")


def enqueue(
    what: str,
    publish: Callable[[], None],
    accept: Callable[[int, int], int | None],
    withdraw: Callable[[], bool],
    release: Callable[[], None],
) -> None:
    """Publish a submission stored `pending` and accept it; returns once it is promised to run (the 202), else raises
    503 with the submission withdrawn, so that it never runs.

    The order is what keeps the promise both ways. A pending submission is run by no worker and seen by no reaper,
    so one whose message could not be published is withdrawn and never runs. Acceptance comes after the publish, on
    the connection that stored it: with BLIPQ_MIN_REPLICAS_ACK replicas, Redis WAIT then covers the record, the
    message and the acceptance together, and a submission that too few replicas hold is withdrawn (503) unless a
    worker started it already (it then runs: 202). Should Redis fail between the acceptance and its reply, the
    submission is withdrawn if Redis still answers; if not, it may run: a client that retries with its
    Idempotency-Key then gets that same job, not a second one.
    """
    settings = services().settings
    try:
        publish()
        replicas = accept(settings.min_replicas_ack, settings.replica_ack_timeout_ms)
    except (OperationalError, redis.RedisError) as exc:
        log.warning("cannot enqueue %s: %s", what, exc)
        _withdraw_or_accept(what, withdraw, accept, release)
        raise broker_unavailable() from None
    if replicas is None:  # not pending any more: it expired meanwhile (a TTL shorter than this request)
        release()
        raise broker_unavailable()
    if replicas < settings.min_replicas_ack:
        log.warning("%s: %d of %d replicas acknowledged it in time", what, replicas, settings.min_replicas_ack)
        if _withdraw_or_accept(what, withdraw, accept, release):
            message = f"the job could not be copied to {settings.min_replicas_ack} Redis replicas in time; retry later"
            raise ServiceUnavailableError("replicas_unavailable", message)


def _withdraw_or_accept(
    what: str, withdraw: Callable[[], bool], accept: Callable[[int, int], int | None], release: Callable[[], None]
) -> bool:
    """Withdraw a submission that cannot be promised; True when it is withdrawn (or cannot run: Redis is away), False
    when a worker had started it (it is then accepted, without waiting for replicas, and runs)."""
    try:
        if withdraw():
            release()
            return True
        accept(0, 0)  # a batch with a chunk started: the chunks never published go out through the reaper
    except (OperationalError, redis.RedisError) as exc:
        log.warning("cannot withdraw %s: %s", what, exc)
        return True
    log.warning("%s was started by a worker before it could be withdrawn: it runs", what)
    return False
