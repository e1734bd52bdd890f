"""Every Redis key blipq spells, in one place: the `blipq:` prefixes and the functions that build keys from ids.

A job, a batch and the fleet's records are keys under `blipq:`, and so are the queues' sets the reaper watches; the
broker's lists are kombu's (`broker_list_key`). Five prefixes are spelled by the Lua preludes too (their scripts make
keys from ids they read): contract/scripts/lib/*.lua, which tests/unit/test_scripts.py holds to these.
"""

from __future__ import annotations

import hashlib

from kombu.transport.redis import Channel

from contract.states import BROKER_PRIORITY, JobPriority

KEY_PREFIX = "blipq:"
BATCH_KEY_PREFIX = f"{KEY_PREFIX}batch:"  # a batch's hash
WAITING_ANSWERS_KEY = f"{KEY_PREFIX}waiting-answers"  # answers waiting per queue level (lib/queue.lua)
ARRIVED_FIELD_PREFIX = "arrived:"  # the waiting-answers hash's fields of answers ever queued per level (lib/queue.lua)
RELEASED_FIELD_PREFIX = "released:"  # its fields of answers released to the workers, not started, per level (same)
ENDED_KEY_PREFIX = f"{KEY_PREFIX}ended:"  # a job's end, pushed for the API's long polls (lib/job.lua)
UPLOADS_LEFT_PREFIX = f"{KEY_PREFIX}batch-left:"  # lib/batch.lua
CANCELS_PREFIX = f"{KEY_PREFIX}batch-cancels:"  # lib/batch.lua
ITEM_WEBHOOK_PREFIX = f"{KEY_PREFIX}item-webhook:"  # the hash of a batch item's webhook delivery (lib/batch.lua)
ANSWER_PREFIX = f"{KEY_PREFIX}answer:"  # an entry of the worker's answer cache
ANSWER_INDEX_KEY = f"{KEY_PREFIX}answer-index"  # every entry, scored by when it was written: the bound drops the oldest
REAPER_LOCK_PREFIX = f"{KEY_PREFIX}reaper-lock:"  # one reaper per queue at a time
RATE_LIMIT_KEY_PREFIX = f"{KEY_PREFIX}ratelimit"  # the API's rate limit counters
ANONYMOUS_SHARE = "-"  # the line of the requests made without an API key (no key's name can be "-": api/auth.py)
LINE_KEY_PREFIX = f"{KEY_PREFIX}line:"
# Added to the score of a member of a never-started set held in its API key's line (lib/fair.lua): above every epoch
# time for centuries, so that the reaper, which reads scores below release times, never meets one.
HELD_SCORE = 10_000_000_000  # an API key's line of held work at a queue level (contract/fair_share.py)


# A job's keys.


def job_key(job_id: str) -> str:
    """The Redis hash that holds a job's record."""
    return f"{KEY_PREFIX}job:{job_id}"


def upload_key(job_id: str) -> str:
    """The Redis string that holds a job's uploaded image until the job ends."""
    return f"{KEY_PREFIX}upload:{job_id}"


def ended_key(job_id: str) -> str:
    """The list that a job's end is pushed on (by its end script), for reads that wait for it (a batch's: the channel
    its items' ends are published on)."""
    return f"{ENDED_KEY_PREFIX}{job_id}"


def idempotency_key(owner: str, key: str) -> str:
    """The Redis string that ties an Idempotency-Key of an API key owner to its job (hashed: keys are arbitrary)."""
    digest = hashlib.sha256(f"{owner}\0{key}".encode()).hexdigest()
    return f"{KEY_PREFIX}idempotency:{digest}"


def stats_key() -> str:
    """The Redis hash of the fleet's counters (executions, reruns, duplicates...): see jobs.STATS_FIELDS."""
    return f"{KEY_PREFIX}stats"


def webhook_outbox_key() -> str:
    """The sorted set of webhook deliveries to make, job ids scored by when the next attempt is due (epoch seconds)."""
    return f"{KEY_PREFIX}webhooks:due"


# A queue's keys.


def unstarted_key(queue: str, priority: JobPriority = JobPriority.NORMAL) -> str:
    """The sorted set of a queue level's jobs (and chunks) that no worker has started yet, scored by enqueue time
    (epoch seconds); a job whose worker died while running it joins it again when the reaper publishes it again.

    The normal level keeps the name the whole queue had before priorities, so jobs queued across an upgrade stay
    watched by the reaper.
    """
    suffix = "" if priority is JobPriority.NORMAL else f":{priority}"
    return f"{KEY_PREFIX}unstarted:{queue}{suffix}"


def started_mark_key(queue: str, priority: JobPriority = JobPriority.NORMAL) -> str:
    """The latest enqueue time (epoch seconds) of a job of this queue level that a worker started: every message of
    the level enqueued well before it has left the level's list (first in, first out; worker/reaper.py)."""
    suffix = "" if priority is JobPriority.NORMAL else f":{priority}"
    return f"{KEY_PREFIX}started-mark:{queue}{suffix}"


def waiting_answers_key() -> str:
    """The hash of how many answers wait in each queue level (field: its never-started set, `unstarted_key`).

    Moved with the set's members: +1 per job and +count per batch when they are stored, less each job or chunk as it
    leaves the set (started, canceled, expired). The admission check reads it: the queue's bound counts answers.
    """
    return WAITING_ANSWERS_KEY


def arrived_answers_field(queue: str, priority: JobPriority = JobPriority.NORMAL) -> str:
    """The field of `waiting_answers_key` that counts the answers that ever joined a queue level at its tail, only
    ever increased (beside the level's waiting count: one read gets both). A job or batch accepted records the count
    it brought it to (its `ticket`), and the answers that joined its level since are the count now less its ticket
    (api/estimates.py)."""
    return ARRIVED_FIELD_PREFIX + unstarted_key(queue, priority)


def share_name(owner: str) -> str:
    """The name of a job's or batch's line: its API key's, or ANONYMOUS_SHARE for one made without a key."""
    return owner or ANONYMOUS_SHARE


def line_prefix(queue: str, priority: JobPriority = JobPriority.NORMAL) -> str:
    """What an API key's name follows in the key of its line at a queue level (`line_key`): release.lua makes the
    lines' keys from the names in the level's ring."""
    return f"{LINE_KEY_PREFIX}{queue}{_level_suffix(priority)}:"


def line_key(queue: str, priority: JobPriority, share: str) -> str:
    """The list of an API key's jobs and chunks (their members) accepted at a queue level and not yet released to the
    workers, first in, first out (contract/fair_share.py)."""
    return line_prefix(queue, priority) + share


def ring_key(queue: str, priority: JobPriority = JobPriority.NORMAL) -> str:
    """The list of the API keys that hold work at a queue level, in their round-robin order: the head's turn is on."""
    return f"{KEY_PREFIX}key-ring:{queue}{_level_suffix(priority)}"


def shares_key(queue: str, priority: JobPriority = JobPriority.NORMAL) -> str:
    """The hash of a queue level's fair-share counts, per API key: `arrived:<key>` (answers ever accepted into its
    line), `taken:<key>` (answers ever released from it, or dropped from it as withdrawn, canceled or expired),
    `deficit:<key>` (answers it may still release this turn; present while the key is in the ring), `weight:<key>`;
    and `turn`, the key whose turn it is (contract/fair_share.py)."""
    return f"{KEY_PREFIX}shares:{queue}{_level_suffix(priority)}"


def _level_suffix(priority: JobPriority) -> str:
    return "" if priority is JobPriority.NORMAL else f":{priority}"


def running_key(queue: str) -> str:
    """The sorted set of the queue's running jobs, scored by when the reaper should look at them next."""
    return f"{KEY_PREFIX}running:{queue}"


def deadlines_key(queue: str) -> str:
    """The sorted set of a queue's queued jobs that have a deadline, scored by it (epoch seconds)."""
    return f"{KEY_PREFIX}deadlines:{queue}"


def broker_list_key(queue: str, priority: JobPriority) -> str:
    """The Redis list where kombu keeps the waiting messages of a queue level (one list per priority step)."""
    step = BROKER_PRIORITY[priority]
    return f"{queue}{Channel.sep}{step}" if step else queue


def held_key(queue: str, worker: str) -> str:
    """The set of the messages (task ids) a worker of `queue` received and has not finished yet, started or not: the
    reaper publishes them again when the worker dies (worker/reaper.py)."""
    return f"{KEY_PREFIX}held:{queue}:{worker}"


def holders_key(queue: str) -> str:
    """The set of the workers of `queue` that have a set of messages held (worker/reaper.py)."""
    return f"{KEY_PREFIX}holders:{queue}"


def missing_key(queue: str) -> str:
    """The hash of the queue's waiting jobs and chunks that the reaper's last look found nowhere a live worker would
    take them (member -> when first found so, epoch seconds): lost if the next look, a grace later, agrees."""
    return f"{KEY_PREFIX}missing:{queue}"


def queue_outcomes_key(queue: str) -> str:
    """The hash of how the queue's runs ended, by `<status>:<code>` (contract/fleet.py)."""
    return f"{KEY_PREFIX}stats:outcomes:{queue}"


# A worker's keys (contract/fleet.py).


def worker_key(worker_id: str) -> str:
    """The hash of a live worker's record."""
    return f"{KEY_PREFIX}worker:{worker_id}"


def workers_key(queue: str) -> str:
    """The sorted set of the ids of a queue's workers, scored by their last refresh (epoch seconds)."""
    return f"{KEY_PREFIX}workers:{queue}"


def kept_rate_key(queue: str) -> str:
    """The string of the last answers per busy second a worker of `queue` measured (it expires a day after): the
    drain-time metric's rate while no worker runs."""
    return f"{KEY_PREFIX}rate:{queue}"


# A batch's keys (contract/batches.py).


def batch_key(batch_id: str) -> str:
    """The Redis hash that holds a batch's record."""
    return f"{BATCH_KEY_PREFIX}{batch_id}"


def items_key(batch_id: str) -> str:
    """The list of a batch's items, in item order: `[image number, text]` each, `[image number, text, task]` for an
    item of another task than the batch's."""
    return f"{KEY_PREFIX}batch-items:{batch_id}"


def images_key(batch_id: str) -> str:
    """The hash of a batch's distinct images by number: {"image_url"}, or {"image_name", "upload"} for an upload."""
    return f"{KEY_PREFIX}batch-images:{batch_id}"


def batch_outcomes_key(batch_id: str) -> str:
    """The hash of a batch's item outcomes by index, once the model took them."""
    return f"{KEY_PREFIX}batch-out:{batch_id}"


def uploads_left_key(batch_id: str) -> str:
    """The hash of each uploaded image's items not yet ended (its key: a count); the image goes when it reaches 0."""
    return f"{UPLOADS_LEFT_PREFIX}{batch_id}"


def chunks_key(batch_id: str) -> str:
    """The hash of a batch's chunks not yet ended (number -> payload), their attempts and workers."""
    return f"{KEY_PREFIX}batch-chunks:{batch_id}"


def cancels_key(batch_id: str) -> str:
    """The set of a batch's items (their indices) whose own cancel was asked."""
    return f"{CANCELS_PREFIX}{batch_id}"


def batch_upload_key(batch_id: str, number: int) -> str:
    """The Redis string that holds image `number` uploaded with a batch, shared by all its questions; deleted when the
    last of them ended (contract/scripts/lib/batch.lua), or with the batch after the TTL."""
    return f"{KEY_PREFIX}batch-upload:{batch_id}:{number}"


def item_webhook_key(item_id: str) -> str:
    """The hash of a batch item's own webhook delivery (`<batch id>.<index>`)."""
    return f"{ITEM_WEBHOOK_PREFIX}{item_id}"


def batch_keys(batch_id: str) -> list[str]:
    """Every key of a batch but its uploads, its hash first."""
    keys = [batch_key(batch_id), items_key(batch_id), images_key(batch_id), batch_outcomes_key(batch_id)]
    return [*keys, chunks_key(batch_id), uploads_left_key(batch_id), cancels_key(batch_id)]
