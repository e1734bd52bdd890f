"""The Redis scripts that move a batch's items, a chunk at a time, and keep the batch's counts as they go: the keys
they take and the values they share with Python.

A batch's items are not jobs of their own: an item is an entry of the batch's item list (its image number and text)
and, once it reached the model, a field of the batch's outcome hash (`["running"]`, then its outcome). An item with
no outcome is queued, unless its batch is closed (canceled or past its deadline): then it ended so, without running.
A cancel of one item is as a job's (contract/transitions.py): it is recorded in the batch's set of items whose
cancel was asked; a queued item ends `canceled` at once, a running one runs to its end, and one whose chunk is
delivered again (its worker died) is not run again but ends `canceled`.
The batch's hash keeps the counts by status (`queued`, `running`, `succeeded`, ...), which these scripts move in the
same call as the items: a summary is one read, whatever the batch's size. Each call that ends items publishes on the
batch's `ended` channel (contract.keys.ended_key of the batch's id), which wakes the API's reads waiting for an
item.

The scripts are contract/scripts/chunk_*.lua, items_run.lua, item_cancel.lua and batch_*.lua, with their shared
steps in contract/scripts/lib/batch.lua. Each runs a handful of Redis commands per chunk (variadic HMGET/HSET over the
chunk's items), not per item. `contract.batch_store.BatchStore` registers (contract/lua.py) and calls them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from contract.lua import ScriptArgs, ScriptKeys
from contract.transitions import CANCELED_RERUN_MESSAGE

RUNNING = '["running"]'  # an item's outcome field while the model answers it (its worker may die meanwhile)
ITEM_OUTBOX_PREFIX = "item:"  # an outbox member for a batch item's own webhook (`item:<batch id>.<index>`)
SKIPPED = "skipped"  # what a worker reports for an item the model did not answer (items_run.lua did not let it run)

# The outcome of a running item whose cancel was asked and whose worker died: it is not run again.
CANCELED_RERUN = json.dumps(["canceled", CANCELED_RERUN_MESSAGE], separators=(",", ":"))
UNPACK_MAX = 1000  # arguments a script passes to one command at most (Lua's unpack stops near 8,000)


@dataclass(frozen=True)
class StartChunkKeys(ScriptKeys):
    """chunk_start.lua's KEYS."""

    batch: str
    chunks: str
    unstarted: str
    mark: str
    running: str
    stats: str
    out: str
    items: str
    outbox: str
    ended: str
    outcomes: str


@dataclass(frozen=True)
class StartChunkArgs(ScriptArgs):
    """chunk_start.lua's ARGV."""

    member: str
    number: int
    now: float
    worker: str
    max_attempts: int
    gave_up_message: str
    answers: int
    model: str
    task: str


@dataclass(frozen=True)
class ItemKeys(ScriptKeys):
    """items_run.lua's and batch_close.lua's KEYS."""

    batch: str
    out: str
    items: str
    outbox: str
    ended: str


@dataclass(frozen=True)
class CancelItemKeys(ItemKeys):
    """item_cancel.lua's KEYS: ItemKeys', then the queue's counts of outcomes."""

    outcomes: str


@dataclass(frozen=True)
class EndChunkKeys(ScriptKeys):
    """chunk_end.lua's KEYS."""

    batch: str
    out: str
    chunks: str
    running: str
    outbox: str
    ended: str
    outcomes: str


@dataclass(frozen=True)
class AcceptBatchKeys(ScriptKeys):
    """batch_accept.lua's KEYS."""

    batch: str
    queues: tuple[str, ...]  # for each queue: its level's never-started set, ring, fair-share counts, the key's line


@dataclass(frozen=True)
class WithdrawBatchKeys(ScriptKeys):
    """batch_withdraw.lua's KEYS."""

    batch: str
    chunks: str
    queues: tuple[str, ...]  # for each queue, its never-started set and its deadlines set
    doomed: tuple[str, ...]  # the keys to delete: the batch's, and its uploads
