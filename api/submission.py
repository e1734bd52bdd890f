"""Keeping a submission's promise: an Idempotency-Key claimed once, and a stored submission published and accepted
(the 202) or withdrawn (the 503), so that it runs exactly when the client was told it would.

A job (api/views.py) and a batch (api/batches.py) are each a `Submission`, and submit() takes either in the same
way: the key claimed, or the earlier request's job or batch replayed; admission (api/admission.py); stored `pending`;
accepted into its API key's lines or withdrawn; then released to the workers as far as they have room
(contract/fair_share.py).

An Idempotency-Key holds its claim, `<request fingerprint>:<job or batch id>`, for as long as the job lives. When the
submission is withdrawn, the claim is first marked `<claim>:withdrawn`, then the job deleted, then both are waited
for on the replicas as an acceptance is: Redis replicates one stream, so a replica that holds the withdrawal holds
the mark, and one that missed the mark still holds the job. A retry with the key finds the job if it is there (a
failover to a replica that missed the withdrawal brought it back: the retry is answered as a replay), and takes the
key over if the claim is marked and the job is gone.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

import redis
from kombu.exceptions import OperationalError

from api.context import context
from api.errors import ApiError, ConflictError, ServiceUnavailableError
from contract.job_store import JobStore

log = logging.getLogger("blipq.api")
T = TypeVar("T")
R_co = TypeVar("R_co", covariant=True)

IDEMPOTENCY_PENDING_S = 60  # a key claimed by a request that died before storing its job is free again after this
IDEMPOTENCY_WAIT_S = 5.0  # how long a duplicate arriving with the first waits for the first one's job to be stored
IDEMPOTENCY_POLL_S = 0.05
WITHDRAWN_MARK = ":withdrawn"  # ends the claim of a withdrawn submission: a retry that finds no job makes it anew


class Submission(Protocol[R_co]):
    """A job or a batch on its way in, built from a valid request; `R_co` is its record (a Job, a Batch)."""

    @property
    def what(self) -> str:
        """It, as the log names it: `job <id>`, `batch <id>`."""
        ...

    @property
    def record(self) -> R_co:
        """Its record, as the 202 answers it."""
        ...

    def claim(self, idempotency: str) -> tuple[str, str]:
        """The Idempotency-Key's Redis key, and this request's claim on it: `<request fingerprint>:<id>`."""
        ...

    def find(self, record_id: str) -> R_co | None:
        """The record of that id (an earlier request's), or None."""
        ...

    def admit(self) -> None:
        """Admission control (api/admission.py): raises an ApiError when the service cannot take it now."""
        ...

    def create(self, claim: tuple[str, str] | None) -> None:
        """Store it `pending` (and the claim's id with it); raises a RedisError when Redis cannot."""
        ...

    def accept(self, replicas: int, timeout_ms: int) -> int | None:
        """Mark it accepted, into its API key's lines, waiting for `replicas` replicas: how many held it, or None when
        it is not pending."""
        ...

    def release(self) -> None:
        """Release what the workers have room for now, its own work or others' (contract/fair_share.py); never
        raises: what it cannot release now, a worker's next start or the reaper releases."""
        ...

    def withdraw(self, replicas: int, timeout_ms: int) -> int | None:
        """Delete it, waiting for `replicas` replicas: how many held that, or None when a worker had started it."""
        ...


def submit(submission: Submission[T], idempotency: str | None) -> tuple[T, bool]:
    """Take a submission in: returns its record once it is promised to run (the 202), or, with an Idempotency-Key an
    earlier request used, that request's record; and whether it is that replay. Raises the API error that refuses
    it otherwise (admission's, or 503 with nothing stored or everything withdrawn)."""
    store = context().store
    claim = None
    if idempotency is not None:
        claim = submission.claim(idempotency)
        earlier = _earlier_submission(store, *claim, submission.find)
        if earlier is not None:  # a replay is answered as the first request was, whatever the queue is like now
            return earlier, True
    with _released_on_refusal(store, claim):
        submission.admit()
    try:
        submission.create(claim)
    except redis.RedisError as exc:
        log.warning("cannot store %s: %s", submission.what, exc)
        _release_claim(store, claim)
        raise _broker_unavailable() from None
    _enqueue(submission, claim)
    return submission.record, False


def accepted_headers(location: str, replayed: bool) -> dict[str, str]:
    """The headers of a 202: where the job or batch is read, and whether the answer is a replay."""
    return {"Location": location, **({"Idempotent-Replayed": "true"} if replayed else {})}


def _broker_unavailable() -> ServiceUnavailableError:
    """The 503 of a submission that Redis could not take."""
    return ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later")


def _earlier_submission(store: JobStore, key: str, claim: str, lookup: Callable[[str], T | None]) -> T | None:
    """What an earlier request with this Idempotency-Key made (`lookup` finds it by id: a job, a batch), or None once
    this request holds the key.

    A request that finds the key claimed but its job not stored yet (the two arrived together) waits for it; one that
    finds the claim of a withdrawn submission whose job is gone takes the key over.
    """
    fingerprint = claim.partition(":")[0]
    waited_until = time.monotonic() + IDEMPOTENCY_WAIT_S
    while True:
        try:
            held = store.claim_idempotency_key(key, claim, IDEMPOTENCY_PENDING_S)
            if held is None:
                return None
            held_fingerprint, _, held_id = held.partition(":")
            withdrawn = held_id.endswith(WITHDRAWN_MARK)
            job = lookup(held_id.removesuffix(WITHDRAWN_MARK))
            if job is None and withdrawn:
                store.release_idempotency_key(key, held)  # then claimed anew, unless another retry was first
                continue
        except redis.RedisError as exc:
            log.warning("cannot claim an idempotency key: %s", exc)
            raise _broker_unavailable() from None
        if held_fingerprint != fingerprint:
            message = "this Idempotency-Key was used for another request; a new job needs a new key"
            raise ConflictError("idempotency_conflict", message)
        if job is not None:
            return job
        if time.monotonic() >= waited_until:
            message = "a request with this Idempotency-Key is still being stored; retry in a moment"
            raise ConflictError("idempotency_key_in_use", message)
        time.sleep(IDEMPOTENCY_POLL_S)


@contextmanager
def _released_on_refusal(store: JobStore, claim: tuple[str, str] | None) -> Iterator[None]:
    """Free the request's Idempotency-Key claim when an admission check refuses it: its retry must be made anew, not
    told that the key is in use."""
    try:
        yield
    except ApiError:
        _release_claim(store, claim)
        raise


def _release_claim(store: JobStore, claim: tuple[str, str] | None) -> None:
    """Free an Idempotency-Key whose submission was not stored or was withdrawn: a retry makes it anew."""
    if claim is None:
        return
    try:
        store.release_idempotency_key(*claim)
    except redis.RedisError:  # Redis is away: the claim expires by itself
        log.warning("could not release an idempotency key")


def _enqueue(submission: Submission[object], claim: tuple[str, str] | None) -> None:
    """Accept a submission stored `pending`, then release it; returns once it is promised to run (the 202), else
    raises 503 with the submission withdrawn, so that it never runs.

    The order is what keeps the promise both ways. A pending submission is run by no worker and seen by no reaper.
    Its acceptance puts it in its API key's lines, on the connection that stored it: with BLIPQ_MIN_REPLICAS_ACK
    replicas, Redis WAIT then covers the record and the acceptance together, and a submission that too few replicas
    hold is withdrawn (503). Nothing of it is published before that: its messages are sent when the fair share
    releases it (contract/fair_share.py), here at once if the workers have room, else as they take work. The
    withdrawal is waited for as the acceptance is: a failover to a replica that holds the acceptance and not the
    withdrawal would run the job, so when too few replicas hold the withdrawal either, the Idempotency-Key stays
    claimed (module docstring): a retry with it gets that job, should it come back. Should Redis fail between the
    acceptance and its reply, the submission is withdrawn if Redis still answers; if not, it may run: a client that
    retries with its Idempotency-Key then gets that same job.
    """
    settings, what = context().settings, submission.what
    try:
        replicas = submission.accept(settings.min_replicas_ack, settings.replica_ack_timeout_ms)
    except (OperationalError, redis.RedisError) as exc:
        log.warning("cannot enqueue %s: %s", what, exc)
        _withdraw_or_accept(submission, claim)
        raise _broker_unavailable() from None
    if replicas is None:  # not pending any more: it expired meanwhile (a TTL shorter than this request)
        _release_claim(context().store, claim)
        raise _broker_unavailable()
    if replicas < settings.min_replicas_ack:
        log.warning("%s: %d of %d replicas acknowledged it in time", what, replicas, settings.min_replicas_ack)
        outcome = _withdraw_or_accept(submission, claim)
        if outcome is not Withdrawal.STARTED:
            message = f"the job could not be copied to {settings.min_replicas_ack} Redis replicas in time; retry later"
            if outcome is Withdrawal.UNCONFIRMED:
                message += " (with the same Idempotency-Key: should a Redis failover bring the job back, it is found)"
            raise ServiceUnavailableError("replicas_unavailable", message)
    submission.release()


class Withdrawal(enum.Enum):
    """How the withdrawal of a submission that could not be promised went."""

    DONE = "done"  # withdrawn, and (with BLIPQ_MIN_REPLICAS_ACK) held by enough replicas: it never runs
    UNCONFIRMED = "unconfirmed"  # withdrawn on the primary only as far as the API knows (or Redis went away)
    STARTED = "started"  # a worker had started it: it is accepted, and runs


def _withdraw_or_accept(submission: Submission[object], claim: tuple[str, str] | None) -> Withdrawal:
    """Withdraw a submission that cannot be promised, waiting for the replicas as its acceptance did; a submission a
    worker had started is accepted instead (without waiting for replicas), and runs."""
    settings, store, what = context().settings, context().store, submission.what
    marked = None if claim is None else (claim[0], claim[1] + WITHDRAWN_MARK)
    try:
        if claim is not None:  # first: a replica that holds the withdrawal holds the mark
            store.replace_idempotency_claim(claim[0], claim[1], claim[1] + WITHDRAWN_MARK)
        replicas = submission.withdraw(settings.min_replicas_ack, settings.replica_ack_timeout_ms)
        if replicas is None:
            submission.accept(0, 0)  # a batch with a chunk started (another process released it): the rest follow
            log.warning("%s was started by a worker before it could be withdrawn: it runs", what)
            return Withdrawal.STARTED
    except (OperationalError, redis.RedisError) as exc:
        log.warning("cannot withdraw %s: %s", what, exc)
        return Withdrawal.UNCONFIRMED
    if replicas < settings.min_replicas_ack:
        log.warning(
            "%s: %d of %d replicas acknowledged its withdrawal in time; its Idempotency-Key stays claimed",
            what,
            replicas,
            settings.min_replicas_ack,
        )
        return Withdrawal.UNCONFIRMED
    _release_claim(store, marked)
    return Withdrawal.DONE
