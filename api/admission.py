"""Admission control: rate limits per client (Flask-Limiter, counted in Redis) and back-pressure on the queue depth.

Rate limits count per API key name when keys are on, else per client address, in a moving window (a client may never
exceed the limit over any span of that length, unlike fixed windows that allow twice the limit across a boundary).
Job submissions (POST) and reads of jobs (GET) have separate budgets, so polling never eats into submitting.
Counters live in Redis under `blipq:ratelimit:`, shared by every API process. A limit that cannot be counted (its
storage fails) refuses the request 503 rather than letting it through: a limiter that let requests through on
errors would turn limits off, unseen, whenever its storage is misconfigured while the job store works.
"""

from __future__ import annotations

import logging
import math
import time

import redis
from flask import Blueprint, Flask, Response, request
from flask_limiter import Limiter, RequestLimit
from kombu.transport.redis import PRIORITY_STEPS, Channel
from limits.errors import StorageError

from api.auth import api_key_name, is_public_request
from api.errors import (
    STORE_RETRY_AFTER_S,
    KeyQueueFullError,
    QueueFullError,
    RateLimitedError,
    ServiceUnavailableError,
    ValidationError,
    error_response,
)
from api.settings import ApiSettings
from contract.errors import http_status
from contract.fleet import has_live_worker
from contract.keys import RATE_LIMIT_KEY_PREFIX, share_name, shares_key, unstarted_key, waiting_answers_key
from contract.states import JobPriority, JobTask

log = logging.getLogger("blipq.api")

REDIS_TIMEOUT_S = 5  # a rate limit check on a dead Redis fails this fast (and refuses the request 503)
QUEUE_FULL_RETRY_AFTER_S = 10  # what a refused client is told to wait: long enough for the workers to drain some


def install_rate_limits(app: Flask, settings: ApiSettings, *blueprints: Blueprint) -> None:
    """Limit the routes of `blueprints` per client: POSTs to `settings.rate_limit`, GETs to `settings.poll_rate_limit`.

    Call it after install_api_keys: Flask runs before-request hooks in order, and the limiter's key is the name of
    the key that authentication found (a request refused with 401 counts against nothing).
    """
    if not (settings.rate_limit or settings.poll_rate_limit):
        return
    limiter = Limiter(
        key_func=_client_identity,
        app=app,
        storage_uri=settings.redis.limits_uri,
        storage_options={
            **settings.redis.limits_options,
            "key_prefix": RATE_LIMIT_KEY_PREFIX,
            "socket_connect_timeout": REDIS_TIMEOUT_S,
            "socket_timeout": REDIS_TIMEOUT_S,
            "wrap_exceptions": True,  # its errors as StorageError: told apart from the job store's below
        },
        strategy="moving-window",
        # A limit that cannot be counted refuses the request (StorageError, answered 503 below), never lets it
        # through: with Redis away the job store would answer 503 anyway, so letting requests through only ever
        # mattered when the limiter alone fails, a misconfiguration that would then turn every limit off unseen.
        swallow_errors=False,
        on_breach=_rate_limited_response,
    )
    app.register_error_handler(StorageError, _limits_unavailable_response)
    for limit, method in ((settings.rate_limit, "POST"), (settings.poll_rate_limit, "GET")):
        if limit:
            for bp in blueprints:
                limiter.limit(limit, methods=[method], exempt_when=is_public_request)(bp)


def queue_names(queue: str) -> list[str]:
    """The Redis lists that hold `queue`'s waiting messages: kombu keeps one per priority step.

    Priority 0 (our `high`) goes to the list named `queue`, others to `queue` + "\\x06\\x16" + step (3: normal, 6: low).
    """
    return [f"{queue}{Channel.sep}{step}" if step else queue for step in PRIORITY_STEPS]


def queue_depth(client: redis.Redis, queue: str) -> int:
    """How many messages wait in `queue` (jobs and batch chunks never started: held in their API keys' lines, or
    released to the workers), every priority together: one round trip (messages being run not counted)."""
    with client.pipeline(transaction=False) as pipe:
        for priority in JobPriority:
            pipe.zcard(unstarted_key(queue, priority))
        return sum(int(count) for count in pipe.execute())


def waiting_answers(client: redis.Redis, queue: str) -> int:
    """How many answers wait in `queue` (single jobs and batch items not yet taken by a worker), every priority level
    together: one read of the counts the job and batch scripts keep (contract.keys.waiting_answers_key)."""
    fields = [unstarted_key(queue, priority) for priority in JobPriority]
    counts = client.hmget(waiting_answers_key(), fields)
    return sum(max(0, int(count)) for count in counts if count is not None)


def check_queue_room(client: redis.Redis, queue: str, max_depth: int, answers: int = 1) -> None:
    """Refuse a submission of `answers` (QueueFullError) when they would take `queue` past `max_depth` waiting answers;
    0 means unbounded. A batch larger than the bound itself is refused as too large: it would never fit.

    A bound, not an exact cap: submissions checked at the same instant may each pass it, by the API's thread count.
    """
    if not max_depth:
        return
    try:
        depth = waiting_answers(client, queue)
    except redis.RedisError as exc:
        log.warning("cannot read the queue depth: %s", exc)
        raise ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later") from None
    if answers > max_depth:
        message = f"the batch asks for {answers} answers; the queue holds at most {max_depth}: split it"
        raise ValidationError("batch_too_large", message)
    if depth + answers > max_depth:
        message = f"the queue holds {depth} answers to give; {answers} more would pass its limit of {max_depth}"
        raise QueueFullError(f"{message}; retry later", QUEUE_FULL_RETRY_AFTER_S)


def key_waiting_answers(client: redis.Redis, queues: list[str], owner: str) -> int:
    """How many answers an API key (`owner`, "" without a key) holds in the lines of `queues`, every level together:
    one round trip (contract/fair_share.py; those released and not yet started are left out: a window's worth)."""
    share = share_name(owner)
    with client.pipeline(transaction=False) as pipe:
        for queue in queues:
            for priority in JobPriority:
                pipe.hmget(shares_key(queue, priority), [f"arrived:{share}", f"taken:{share}"])
        counts = pipe.execute()
    return sum(max(0, int(arrived or 0) - int(taken or 0)) for arrived, taken in counts)


def check_key_room(client: redis.Redis, queues: list[str], owner: str, settings: ApiSettings, answers: int = 1) -> None:
    """Refuse a submission of `answers` (429 key_queue_full) that would take its API key past its share of the queue
    bound (BLIPQ_KEY_QUEUE_SHARE of BLIPQ_MAX_QUEUE_DEPTH), so that one key cannot fill the whole bound. Without API
    keys every request is the same one key, which the queue bound alone limits; 0: unbounded.
    """
    if not settings.max_queue_depth or not settings.api_keys:
        return
    bound = max(1, int(settings.max_queue_depth * settings.key_queue_share))
    try:
        held = key_waiting_answers(client, queues, owner)
    except redis.RedisError as exc:
        log.warning("cannot read an API key's waiting answers: %s", exc)
        raise ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later") from None
    if held + answers > bound:
        message = (
            f"this API key holds {held} answers waiting; {answers} more would pass its share of the queue, {bound} "
            "answers; retry later"
        )
        raise KeyQueueFullError(message, QUEUE_FULL_RETRY_AFTER_S)


LIVE_WORKER_CHECK_S = 1.0  # how long one look at a queue's workers answers for: a look per submission would cost more
_live_workers: dict[str, tuple[float, bool]] = {}  # queue -> (when looked, some worker live), per API process


def check_workers(client: redis.Redis, queue: str, task: JobTask, wait_for_workers: bool) -> None:
    """Refuse a submission (503 no_worker) for a queue that no live worker serves, unless jobs may wait for workers
    (BLIPQ_WAIT_FOR_WORKERS: a fleet that scales from zero); a job with no worker would sit queued for good."""
    if wait_for_workers:
        return
    now = time.monotonic()
    looked = _live_workers.get(queue)
    if looked is None or now - looked[0] > LIVE_WORKER_CHECK_S:
        try:
            looked = _live_workers[queue] = (now, has_live_worker(client, queue))
        except redis.RedisError as exc:
            log.warning("cannot look for live workers: %s", exc)
            raise ServiceUnavailableError("broker_unavailable", "the job queue is unavailable; retry later") from None
    if not looked[1]:
        message = (
            f"no worker serves {task} jobs right now (queue {queue!r}): start one, or set BLIPQ_WAIT_FOR_WORKERS=on "
            "to let jobs wait for one"
        )
        raise ServiceUnavailableError("no_worker", message)


def _client_identity() -> str:
    name = api_key_name()
    return f"key:{name}" if name else f"address:{request.remote_addr or 'unknown'}"


def _limits_unavailable_response(exc: StorageError) -> Response:
    """The 503 of a request whose rate limit could not be counted: the limiter's Redis failed it."""
    log.error("rate limits cannot be counted, the request is refused: %r", exc.storage_error)
    message = "the rate limits cannot be checked (their Redis storage fails); retry later"
    status = http_status("store_unavailable")
    return error_response(status, "store_unavailable", message, {"Retry-After": str(STORE_RETRY_AFTER_S)})


def _rate_limited_response(limit: RequestLimit) -> Response:
    """Flask-Limiter's 429, in our error shape with Retry-After (it raises it with this response attached)."""
    retry_after_s = max(1, math.ceil(limit.window.reset_time - time.time()))
    error = RateLimitedError(f"over the limit of {limit.limit}; retry in {retry_after_s} s", retry_after_s)
    return error_response(error.status, error.code, error.message, error.headers)
