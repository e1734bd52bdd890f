"""Webhooks: when a job ends, POST its public JSON, signed, to the URL it named; reliably, through the image guard.

The outbox lives in Redis. The script that ends a job (contract/transitions.py) puts its id in the sorted set
`blipq:webhooks:due`, scored by when the next attempt is due, and sets its `webhook_status` to `pending`: an ended job
cannot miss its webhook, whichever process ended it and whatever happens to that process next. Each worker's main
process runs a few sender threads. A sender claims a due delivery by pushing its score a lease into the future (and
counting the attempt), so one sender makes one attempt at a time; when a sender dies mid-attempt, the lease runs out
and another sender tries again. An attempt that fails on a timeout, a connection error, a 5xx or a 429 is tried again
after a back-off that doubles each time, up to `max_attempts`; any other answer (a 4xx, a redirect) or an address that
the guard refuses fails the delivery at once. Delivery is at least once: a receiver that answered too slowly may be
told again, and should ignore a job id it has already handled.

Signature (Stripe's scheme): `Blipq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">` with
BLIPQ_WEBHOOK_SECRET as the key. The receiver recomputes it over the raw body and refuses an old `t` (a replay).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import requests
from urllib3.exceptions import HTTPError as TransportError
from urllib3.exceptions import TimeoutError as TransportTimeoutError

from contract.batch_scripts import ITEM_OUTBOX_PREFIX
from contract.batch_store import BatchStore
from contract.batches import split_item_id
from contract.errors import ImageFetchError, UrlNotAllowedError
from contract.job_store import JobStore
from contract.keys import batch_key, item_webhook_key, job_key, webhook_outbox_key
from contract.lua import ScriptKeys, register
from contract.transitions import BATCH_OUTBOX_PREFIX
from worker.fetch import failure_cause, new_session
from worker.guarded_http import GuardedAdapter
from worker.netguard import NetworkPolicy, check_url

log = logging.getLogger("blipq.webhooks")

SIGNATURE_HEADER = "Blipq-Signature"
USER_AGENT = "blipq-webhook"
POLL_S = 0.5  # how often an idle sender looks for due deliveries
CLAIM_BATCH = 20  # due deliveries looked at per look
LEASE_MARGIN_S = 30.0  # a claim outlives the longest attempt (connect + answer timeouts) by this much
JITTER = 0.25  # back-offs are stretched by up to this fraction, so that failed deliveries do not retry in step
ERROR_PAUSE_S = 5.0  # how long a sender waits after Redis failed it (a restart): not a warning every POLL_S


@dataclass(frozen=True)
class DeliveryKeys(ScriptKeys):
    """webhook_claim.lua's and webhook_record.lua's KEYS (worker/scripts/)."""

    outbox: str
    record: str


@dataclass(frozen=True)
class WebhookPolicy:
    """How deliveries are signed and retried."""

    secret: str
    max_attempts: int = 6
    timeout_s: float = 10.0
    backoff_s: float = 20.0

    @property
    def lease_s(self) -> float:
        """How long a claim keeps other senders off a delivery: longer than any one attempt."""
        return 2 * self.timeout_s + LEASE_MARGIN_S

    def retry_delay_s(self, attempt: int) -> float:
        """The wait after failed attempt number `attempt` (1, 2, ...): the back-off, doubled each time, jittered."""
        return self.backoff_s * 2 ** (attempt - 1) * random.uniform(1.0, 1.0 + JITTER)


@dataclass(frozen=True)
class Attempt:
    """What one POST gave: delivered, or a failure with its code, and whether it is worth trying again."""

    delivered: bool
    retry: bool = False
    code: str = ""
    message: str = ""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The Blipq-Signature header value for `body` sent at `timestamp` (unix seconds)."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def post_json(session: requests.Session, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
    """POST a JSON `body` to `url` through a guarded session, following no redirect; returns the HTTP status.

    The answer's body is never read. Raises UrlNotAllowedError where the guard refuses the URL or its address,
    requests' and urllib3's errors otherwise.
    """
    check_url(url)
    if not isinstance(session.get_adapter(url), GuardedAdapter):
        raise TypeError("post_json needs a session from worker.fetch.new_session(): others reach any address")
    all_headers = {"Content-Type": "application/json", "Accept": "*/*", "User-Agent": USER_AGENT, **headers}
    with session.post(
        url, data=body, headers=all_headers, timeout=(timeout_s, timeout_s), allow_redirects=False, stream=True
    ) as response:
        return response.status_code


def attempt_delivery(
    session: requests.Session, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
) -> Attempt:
    """POST once and say how it went; only timeouts, connection errors, 5xx and 429 are worth another try."""
    try:
        status = post_json(session, url, body, headers, timeout_s)
    except UrlNotAllowedError as exc:
        return Attempt(False, retry=False, code=exc.code, message=_webhook_wording(exc.message))
    except ImageFetchError as exc:  # the URL does not parse
        return Attempt(False, retry=False, code="webhook_invalid", message=_webhook_wording(exc.message))
    except (requests.Timeout, TransportTimeoutError, TimeoutError):
        return Attempt(False, retry=True, code="webhook_timeout", message=f"no answer within {timeout_s:g} s")
    except (requests.RequestException, TransportError, OSError) as exc:
        cause = _webhook_wording(failure_cause(exc, urlsplit(url).hostname or url))
        return Attempt(False, retry=True, code="webhook_unreachable", message=cause[:300])
    if 200 <= status < 300:
        return Attempt(True)
    retry = status == 429 or status >= 500
    return Attempt(False, retry=retry, code="webhook_rejected", message=f"the receiver answered HTTP {status}")


def _webhook_wording(message: str) -> str:
    """The guard's words (a refusal, a failure's cause), which speak of images, told of a webhook."""
    message = re.sub(r"\bimage (URL|host)\b", r"webhook \1", message)
    return message.replace("images are fetched from", "webhooks go to")


class Outbox:
    """The deliveries to make, in Redis: which are due, who tries which, how each went."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._claim = register(client, "webhook_claim", "worker")
        self._record = register(client, "webhook_record", "worker")

    def due(self, now: float, limit: int = CLAIM_BATCH) -> list[str]:
        """Ids of jobs whose delivery is due (some may be claimed by another sender by the time one asks)."""
        members: list[bytes] = self.client.zrangebyscore(  # type: ignore[assignment]
            webhook_outbox_key(), "-inf", now, start=0, num=limit
        )
        return [member.decode() for member in members]

    def claim(self, job_id: str, now: float, lease_s: float) -> int:
        """Claim a due delivery for `lease_s`; see worker/scripts/webhook_claim.lua for the return value."""
        keys = DeliveryKeys(outbox=webhook_outbox_key(), record=delivery_record_key(job_id))
        return int(self._claim(keys=keys.keys(), args=[job_id, now, now + lease_s]))

    def record(self, job_id: str, status: str, due: float = 0.0, code: str = "", message: str = "") -> None:
        """Record an attempt's outcome: `pending` again at `due`, `delivered` or `failed`."""
        keys = DeliveryKeys(outbox=webhook_outbox_key(), record=delivery_record_key(job_id))
        self._record(keys=keys.keys(), args=[job_id, status, due, code, message])


def delivery_record_key(member: str) -> str:
    """The hash that keeps the state of an outbox member's delivery: a batch's (`batch:<id>`), a batch item's own
    (`item:<batch id>.<index>`), else the job's."""
    if member.startswith(BATCH_OUTBOX_PREFIX):
        return batch_key(member.removeprefix(BATCH_OUTBOX_PREFIX))
    if member.startswith(ITEM_OUTBOX_PREFIX):
        return item_webhook_key(member.removeprefix(ITEM_OUTBOX_PREFIX))
    return job_key(member)


def delivery_content(store: JobStore, member: str) -> tuple[str, dict[str, Any]] | None:
    """The URL and body of an outbox member's delivery: a job's public JSON, or a batch's summary; None when gone."""
    if member.startswith(BATCH_OUTBOX_PREFIX):
        batch = BatchStore(store).get(member.removeprefix(BATCH_OUTBOX_PREFIX))
        if batch is None or not batch.webhook:
            return None
        summary = batch.summary()
        del summary["webhook_delivery"]
        return batch.webhook, summary
    if member.startswith(ITEM_OUTBOX_PREFIX):
        batch_id, index = split_item_id(member.removeprefix(ITEM_OUTBOX_PREFIX)) or ("", -1)
        batches = BatchStore(store)
        batch = batches.get(batch_id)
        item = batches.item(batch, index) if batch is not None else None
        if item is None or not item.webhook:
            return None
        return item.webhook, item.to_webhook_body()
    job = store.get(member)
    if job is None or not job.webhook:
        return None
    return job.webhook, job.to_webhook_body()


def deliver(
    store: JobStore, outbox: Outbox, session: requests.Session, policy: WebhookPolicy, job_id: str, attempt: int
) -> None:
    """Make attempt number `attempt` of a claimed delivery (a job's, or a batch's `batch:<id>`) and record it."""
    content = delivery_content(store, job_id)
    if content is None:  # expired meanwhile: nothing to tell
        outbox.record(job_id, "failed")
        return
    url, public = content
    body = json.dumps(public, separators=(",", ":")).encode()
    headers = {SIGNATURE_HEADER: sign(policy.secret, int(time.time()), body)}
    outcome = attempt_delivery(session, url, body, headers, policy.timeout_s)
    if outcome.delivered:
        outbox.record(job_id, "delivered")
        log.info("webhook of job %s delivered (attempt %d)", job_id, attempt)
    elif outcome.retry and attempt < policy.max_attempts:
        delay_s = policy.retry_delay_s(attempt)
        outbox.record(job_id, "pending", time.time() + delay_s, outcome.code, outcome.message)
        log.info("webhook of job %s: attempt %d failed (%s); again in %.1f s", job_id, attempt, outcome.code, delay_s)
    else:
        outbox.record(job_id, "failed", code=outcome.code, message=outcome.message)
        log.warning(
            "webhook of job %s failed after %d attempt(s): %s %s", job_id, attempt, outcome.code, outcome.message
        )


class WebhookSender(threading.Thread):
    """Delivers due webhooks, one at a time; a worker runs a few, and any number of them share the outbox."""

    def __init__(self, store: JobStore, policy: WebhookPolicy, network_policy: NetworkPolicy, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.store, self.policy = store, policy
        self.outbox = Outbox(store.client)
        # The image guard: a webhook reaches no private address either. No connection is kept: a receiver hears from a
        # sender seldom (deliveries spread over senders and back-offs), and a POST that meets a kept connection's close
        # is not sent twice by the transport (not idempotent): it would fail its attempt, and wait a back-off.
        self.session = new_session(network_policy, keepalive_s=0)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            pause_s = POLL_S
            try:
                sent = self.send_due()
            except (redis.RedisError, OSError) as exc:  # Redis away: the outbox is there when it is back
                log.warning("webhook sender: %s", exc)
                sent, pause_s = 0, ERROR_PAUSE_S
            except Exception:  # never let the thread die
                log.exception("webhook sender failed")
                sent, pause_s = 0, ERROR_PAUSE_S
            if not sent:
                self.stopping.wait(pause_s)

    def send_due(self) -> int:
        """Claim and make the attempts that are due now; returns how many were made."""
        job_ids = self.outbox.due(time.time())
        random.shuffle(job_ids)  # senders looking at once mostly claim different deliveries
        sent = 0
        for job_id in job_ids:
            attempt = self.outbox.claim(job_id, time.time(), self.policy.lease_s)
            if attempt > 0:
                deliver(self.store, self.outbox, self.session, self.policy, job_id, attempt)
                sent += 1
        return sent
