"""The Redis scripts that move a job from state to state: the keys and arguments they take, and what they return.

Every change of a job's state is one of these scripts (contract/scripts/job_*.lua), run atomically by Redis: a job that
ended never changes again, two runs of one job publish one answer, and a job that names a webhook gets its delivery
queued by the very script that ends it (worker/webhooks.py sends it). `contract.job_store.JobStore` registers and calls
them (contract/lua.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from contract.lua import ScriptArgs, ScriptKeys

DEADLINE_MESSAGE = "the job was still queued at its deadline; it was not run"
CANCELED_MESSAGE = "the job was canceled before it started; it was not run"
CANCELED_RERUN_MESSAGE = "the job was canceled while it ran and its worker died; it is not run again"
BATCH_OUTBOX_PREFIX = "batch:"  # an outbox member for a batch's webhook, beside the job ids (which have no ':')
ENDED_KEY_TTL_S = 120  # how long a job's end stays on its `ended` list (keys.ended_key): any waiting read sees it


@dataclass(frozen=True)
class AcceptKeys(ScriptKeys):
    """job_accept.lua's KEYS."""

    job: str
    unstarted: str
    ring: str
    shares: str
    line: str


@dataclass(frozen=True)
class WithdrawKeys(ScriptKeys):
    """job_withdraw.lua's KEYS."""

    job: str
    upload: str
    unstarted: str
    deadlines: str


@dataclass(frozen=True)
class StartKeys(ScriptKeys):
    """job_start.lua's KEYS."""

    job: str
    stats: str
    unstarted: str
    mark: str
    upload: str
    outbox: str
    deadlines: str
    running: str


@dataclass(frozen=True)
class StartArgs(ScriptArgs):
    """job_start.lua's ARGV."""

    max_attempts: int
    started_at: str
    model: str
    worker: str
    gave_up_message: str
    job_id: str
    now: float
    deadline_message: str = DEADLINE_MESSAGE
    canceled_rerun_message: str = CANCELED_RERUN_MESSAGE


@dataclass(frozen=True)
class FinishKeys(ScriptKeys):
    """job_finish.lua's KEYS."""

    job: str
    stats: str
    upload: str
    outbox: str


@dataclass(frozen=True)
class QueuedJobKeys(ScriptKeys):
    """job_cancel.lua's and job_expire.lua's KEYS."""

    job: str
    upload: str
    outbox: str
    unstarted: str
    deadlines: str


START_ENDED = 0  # the job had already ended: its answer stands, the model is not run again
START_MISSING = -1  # the job expired (or was never issued)
START_GAVE_UP = -2  # the job started too many times without ending (it kills its worker): failed `worker_lost`
START_CANCELED = -3  # the job was canceled: it is not run
START_EXPIRED = -4  # the job was still queued at its deadline: it is (now) `expired`, not run
START_PENDING = -5  # the job's submission is not accepted yet (the API is still publishing it): ask again shortly
CANCEL_MISSING = -1  # no such job (expired)
CANCEL_ENDED = 0  # the job had ended (or just expired at its deadline): nothing to cancel
CANCEL_DONE = 1  # the job was queued: it is now `canceled` and will never run
CANCEL_REQUESTED = 2  # the job is running: it runs to its end, with `cancel_requested` set
