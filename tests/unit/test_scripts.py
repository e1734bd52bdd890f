"""The Redis scripts: every `.lua` file loads in a real Redis, every script the code registers comes from one, the
constants the scripts share with Python agree, and each script does what its header says in a direct call.
"""

from __future__ import annotations

import ast
import json
import re
import time
from pathlib import Path

import pytest
import redis

from contract import lua
from contract.batch_scripts import CANCELED_RERUN, ITEM_OUTBOX_PREFIX, RUNNING, SKIPPED, UNPACK_MAX
from contract.batch_store import BatchStore
from contract.batches import CHUNK_MEMBER_PREFIX, Batch, Item, chunk_member, outcome_value, plan_chunks
from contract.fair_share import release_members
from contract.job_store import JobStore
from contract.jobs import Job, new_job_id, utc_now
from contract.keys import (
    ANONYMOUS_SHARE,
    ANSWER_INDEX_KEY,
    ARRIVED_FIELD_PREFIX,
    BATCH_KEY_PREFIX,
    CANCELS_PREFIX,
    ENDED_KEY_PREFIX,
    HELD_SCORE,
    ITEM_WEBHOOK_PREFIX,
    RELEASED_FIELD_PREFIX,
    UPLOADS_LEFT_PREFIX,
    WAITING_ANSWERS_KEY,
    batch_keys,
    batch_outcomes_key,
    batch_upload_key,
    cancels_key,
    chunks_key,
    deadlines_key,
    job_key,
    line_key,
    running_key,
    started_mark_key,
    stats_key,
    unstarted_key,
    waiting_answers_key,
    webhook_outbox_key,
)
from contract.states import ENDED_STATUSES, JobPriority, JobStatus, JobTask
from contract.transitions import (
    BATCH_OUTBOX_PREFIX,
    CANCEL_DONE,
    CANCEL_REQUESTED,
    ENDED_KEY_TTL_S,
    START_ENDED,
    START_PENDING,
)
from tests.support.environment import ROOT
from worker.cache import AnswerCache, CacheSettings
from worker.webhooks import Outbox

QUEUE = "scripts"
PACKAGES = ("api", "blipq", "contract", "worker")
SCRIPT_FOLDERS = {"contract": ROOT / "contract" / "scripts", "worker": ROOT / "worker" / "scripts"}


def script_names(package: str) -> list[str]:
    """The scripts of a package (its preludes, under lib/, are not scripts of their own)."""
    return sorted(path.stem for path in SCRIPT_FOLDERS[package].glob("*.lua"))


def registered_names() -> set[tuple[str, str]]:
    """(package, name) of every `register(client, "name"[, "package"])` call in the packages' code."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "id", getattr(node.func, "attr", "")) == "register"
                ):
                    names = [arg.value for arg in node.args if isinstance(arg, ast.Constant)]
                    if names:
                        found.add((names[1] if len(names) > 1 else "contract", names[0]))
    return found


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    redis_client.delete(unstarted_key(QUEUE), running_key(QUEUE), deadlines_key(QUEUE), ANSWER_INDEX_KEY)
    return JobStore(redis_client, 600)


def test_every_lua_file_loads_in_redis(redis_client: redis.Redis) -> None:
    files = [*SCRIPT_FOLDERS["contract"].rglob("*.lua"), *SCRIPT_FOLDERS["worker"].rglob("*.lua")]
    assert len(files) >= 24
    for path in files:  # each file alone compiles (a prelude defines its steps)
        sha = redis_client.script_load(path.read_text())
        assert redis_client.script_exists(sha) == [True], path
    for package in SCRIPT_FOLDERS:  # and each script with its preludes
        for name in script_names(package):
            assert redis_client.script_load(lua.source(name, package)), name


def test_every_script_the_code_registers_comes_from_a_file_and_each_file_is_registered() -> None:
    files = {(package, name) for package in SCRIPT_FOLDERS for name in script_names(package)}
    assert registered_names() == files
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "redis.call(" not in text, f"Lua in a Python string: {path}"
            if path != ROOT / "contract" / "lua.py":
                assert "register_script(" not in text, f"a script not read from its file: {path}"


def test_each_script_header_documents_the_keys_and_arguments_its_locals_bind() -> None:
    for folder in SCRIPT_FOLDERS.values():
        for path in folder.glob("*.lua"):
            text = path.read_text()
            bound = set(re.findall(r"\b(KEYS|ARGV)\[(\d+)\]", text.split("\n\n", 1)[1]))
            documented = set(re.findall(r"^-- (KEYS|ARGV)\[(\d+)", text, re.MULTILINE))
            assert bound <= documented, (path.name, bound - documented)


def prelude_constants() -> dict[str, str]:
    constants = {}
    for path in (SCRIPT_FOLDERS["contract"] / "lib").glob("*.lua"):
        for name, value in re.findall(r"^local ([A-Z_]+) = (.+?)(?:  --.*)?$", path.read_text(), re.MULTILINE):
            constants[name] = value
    return constants


def test_the_constants_the_scripts_spell_agree_with_python() -> None:
    constants = prelude_constants()
    quoted = {
        "WAITING": WAITING_ANSWERS_KEY,
        "ARRIVED_PREFIX": ARRIVED_FIELD_PREFIX,
        "RELEASED_PREFIX": RELEASED_FIELD_PREFIX,
        "ENDED_KEY_PREFIX": ENDED_KEY_PREFIX,
        "RUNNING": RUNNING,
        "SKIPPED": SKIPPED,
        "UPLOADS_LEFT_PREFIX": UPLOADS_LEFT_PREFIX,
        "BATCH_OUTBOX_PREFIX": BATCH_OUTBOX_PREFIX,
        "ITEM_OUTBOX_PREFIX": ITEM_OUTBOX_PREFIX,
        "ITEM_WEBHOOK_PREFIX": ITEM_WEBHOOK_PREFIX,
        "CANCELS_PREFIX": CANCELS_PREFIX,
        "CANCELED_RERUN": CANCELED_RERUN,
        "CHUNK_PREFIX": CHUNK_MEMBER_PREFIX,
        "BATCH_PREFIX": BATCH_KEY_PREFIX,
    }
    assert {name: constants[name] for name in quoted} == {name: f"'{value}'" for name, value in quoted.items()}
    assert (constants["ENDED_KEY_TTL"], constants["UNPACK_MAX"]) == (str(ENDED_KEY_TTL_S), str(UNPACK_MAX))
    assert int(constants["HELD_SCORE"]) == HELD_SCORE
    assert set(re.findall(r"(\w+) = true", constants["ENDED"])) == {str(status) for status in ENDED_STATUSES}


# Each script, called once for what it is for.


def new_job(store: JobStore, deadline_at: str = "", webhook: str = "") -> Job:
    job = Job(new_job_id(), JobStatus.QUEUED, "q?", utc_now(), deadline_at=deadline_at, webhook=webhook)
    store.create(job, QUEUE, b"image")
    return job


def waiting(client: redis.Redis) -> int:
    return int(client.hget(waiting_answers_key(), unstarted_key(QUEUE)) or 0)


def test_job_accept(store: JobStore) -> None:
    job = new_job(store)
    before = waiting(store.client)
    assert store.get(job.id) is None, "pending: not a job yet"
    assert store.accept(job, QUEUE) == 0
    assert (store.client.zscore(unstarted_key(QUEUE), job.id) or 0) >= HELD_SCORE, "held in its key's line"
    assert job.id.encode() in store.client.lrange(line_key(QUEUE, JobPriority.NORMAL, ANONYMOUS_SHARE), 0, -1)
    assert store.client.hget(job_key(job.id), "line_ticket") is not None
    assert waiting(store.client) == before + 1
    assert store.accept(job, QUEUE) is None, "accepted once"


def test_requeue(store: JobStore) -> None:
    before = waiting(store.client)
    store.requeue("some-job", QUEUE, JobPriority.NORMAL, 3, 123.0)
    store.requeue("some-job", QUEUE, JobPriority.NORMAL, 3, 456.0)
    assert store.client.zscore(unstarted_key(QUEUE), "some-job") == 456.0
    assert waiting(store.client) == before + 3, "a member still waiting keeps its place in the count"


def test_job_withdraw(store: JobStore) -> None:
    job = new_job(store)
    store.accept(job, QUEUE)
    before = waiting(store.client)
    assert store.withdraw(job, QUEUE) == 0
    assert not store.client.exists(job_key(job.id))
    assert waiting(store.client) == before - 1


def test_job_start(store: JobStore) -> None:
    queue = f"start-{new_job_id()}"  # a queue of its own: its one job is the one released
    job = Job(new_job_id(), JobStatus.QUEUED, "q?", utc_now())
    store.create(job, queue, b"image")
    assert store.begin_run(job.id, queue, "tiny", "w1", 3) == START_PENDING
    store.accept(job, queue)
    assert store.client.get(started_mark_key(queue)) is None
    assert release_members(store.client, queue, time.time()) == [(JobPriority.NORMAL, job.id)]
    assert store.begin_run(job.id, queue, "tiny", "w1", 3) == 1
    started = store.get(job.id)
    assert started is not None and (started.status, started.model) == ("running", "tiny")
    assert store.client.hget(job_key(job.id), "worker") == b"w1"
    assert store.client.zscore(unstarted_key(queue), job.id) is None
    assert store.client.zscore(running_key(queue), job.id) is not None
    assert store.client.get(started_mark_key(queue)) is not None


def test_job_finish(store: JobStore) -> None:
    job = new_job(store, webhook="https://hooks.example.com/")
    store.accept(job, QUEUE)
    store.begin_run(job.id, QUEUE, "tiny", "w1", 3)
    duplicates = int(store.client.hget(stats_key(), "duplicate_executions") or 0)
    assert store.mark_succeeded(job.id, "yes") == 1
    assert store.mark_failed(job.id, "internal_error", "late") == 0, "an answer once written never changes"
    ended = store.get(job.id)
    assert ended is not None and (ended.status, ended.answer, ended.webhook_status) == ("succeeded", "yes", "pending")
    assert store.client.zscore(webhook_outbox_key(), job.id) is not None
    assert store.client.zscore(running_key(QUEUE), job.id) is None
    assert store.load_upload(job.id) is None
    assert store.client.lrange(ENDED_KEY_PREFIX + job.id, 0, -1) == [b"1"]
    assert int(store.client.hget(stats_key(), "duplicate_executions") or 0) == duplicates + 1
    assert store.begin_run(job.id, QUEUE, "tiny", "w2", 3) == START_ENDED


def test_job_cancel(store: JobStore) -> None:
    queued, running = new_job(store), new_job(store)
    for job in (queued, running):
        store.accept(job, QUEUE)
    store.begin_run(running.id, QUEUE, "tiny", "w1", 3)
    assert store.cancel_many([queued, running], QUEUE) == [CANCEL_DONE, CANCEL_REQUESTED]
    canceled, asked = store.get(queued.id), store.get(running.id)
    assert canceled is not None and (canceled.status, canceled.error_code) == ("canceled", "canceled")
    assert asked is not None and (asked.status, asked.cancel_requested) == ("running", True)


def test_job_expire(store: JobStore) -> None:
    job = new_job(store, deadline_at=str(time.time() - 1))
    store.accept(job, QUEUE)
    assert store.client.zscore(deadlines_key(QUEUE), job.id) is not None
    assert store.expire_if_overdue(job, QUEUE) is True
    expired = store.get(job.id)
    assert expired is not None and (expired.status, expired.error_code) == ("expired", "deadline_exceeded")
    assert store.client.zscore(deadlines_key(QUEUE), job.id) is None
    assert store.expire_if_overdue(job, QUEUE) is False


def test_idempotency_claim_replace_and_release(store: JobStore) -> None:
    key = "blipq:idempotency:scripts-test"
    assert store.claim_idempotency_key(key, "first", 60) is None
    assert store.claim_idempotency_key(key, "second", 60) == "first"
    store.replace_idempotency_claim(key, "second", "third")
    assert store.client.get(key) == b"first", "only the claim it holds is replaced"
    store.replace_idempotency_claim(key, "first", "withdrawn")
    assert store.client.get(key) == b"withdrawn" and store.client.ttl(key) > 0
    store.release_idempotency_key(key, "first")
    assert store.client.exists(key) == 1, "only the claim it holds is released"
    store.release_idempotency_key(key, "withdrawn")
    assert store.client.exists(key) == 0


def new_batch(
    store: JobStore, questions: int = 2, webhook_items: bool = False, uploads: bool = False
) -> tuple[Batch, list[dict[str, object]]]:
    """A batch of one image and `questions` questions, stored `pending` as the API stores it, in one chunk."""
    batch_id = new_job_id()
    items = [Item(0, f"q{n}?", JobTask.VQA) for n in range(questions)]
    upload = batch_upload_key(batch_id, 0)
    images = [{"image_name": "a.png", "upload": upload}] if uploads else [{"image_url": "https://example.com/a.png"}]
    batch = Batch(
        batch_id,
        len(items),
        utc_now(),
        queue=QUEUE,
        webhook="https://hooks.example.com/" if webhook_items else "",
        webhook_items=webhook_items,
    )
    chunks: list[dict[str, object]] = []
    for number, (task, chunk) in enumerate(plan_chunks(items, 100)):
        answers = sum(len(entry["items"]) for entry in chunk)
        for entry in chunk:
            source = images[entry.pop("image")]
            entry.update({"upload": source["upload"]} if "upload" in source else {"image_url": source["image_url"]})
        member = chunk_member(batch_id, number, answers)
        chunks.append({"batch_id": batch_id, "number": number, "member": member, "task": str(task), "images": chunk})
    BatchStore(store).create(batch, images, items, chunks, {upload: b"image"} if uploads else None)
    return batch, chunks


def test_batch_accept(store: JobStore) -> None:
    batch, chunks = new_batch(store)
    before = waiting(store.client)
    batches = BatchStore(store)
    assert batches.get(batch.id) is None, "pending: not a batch yet"
    assert batches.accept(batch, chunks) == 0
    assert (store.client.zscore(unstarted_key(QUEUE), chunks[0]["member"]) or 0) >= HELD_SCORE
    line = store.client.lrange(line_key(QUEUE, JobPriority.NORMAL, ANONYMOUS_SHARE), 0, -1)
    assert str(chunks[0]["member"]).encode() in line
    assert waiting(store.client) == before + 2
    assert batches.accept(batch, chunks) is None


def test_batch_withdraw(store: JobStore) -> None:
    batch, chunks = new_batch(store, uploads=True)
    batches = BatchStore(store)
    batches.accept(batch, chunks)
    before = waiting(store.client)
    upload = str(chunks[0]["images"][0]["upload"])  # type: ignore[index]
    assert batches.withdraw(batch, chunks, [upload]) == 0
    assert store.client.exists(*batch_keys(batch.id), upload) == 0
    assert store.client.zscore(unstarted_key(QUEUE), chunks[0]["member"]) is None
    assert waiting(store.client) == before - 2


def test_chunk_start_items_run_and_chunk_end(store: JobStore) -> None:
    batch, chunks = new_batch(store, webhook_items=True, uploads=True)
    batches = BatchStore(store)
    batches.accept(batch, chunks)
    [payload] = chunks
    assert batches.start_chunk(payload, QUEUE, "w1", 3, "tiny") == 1
    assert store.client.zscore(running_key(QUEUE), payload["member"]) is not None
    assert store.client.hget(chunks_key(batch.id), "0:w") == b"w1"

    assert batches.run_items([(batch.id, [0, 1])]) == [{0, 1}]
    assert store.client.hget(batch_outcomes_key(batch.id), "0") == RUNNING.encode()

    outcomes = [["0", *outcome_value("succeeded", answer="yes")], ["1", SKIPPED, "", ""]]
    assert batches.end_chunk(payload, QUEUE, outcomes, done=False) == 1, "a skipped running item stays as it is"
    assert batches.end_chunk(payload, QUEUE, [["1", *outcome_value("succeeded", answer="no")]]) == 1
    ended = batches.get(batch.id)
    assert ended is not None and dict(ended.counts)["succeeded"] == 2
    assert store.client.exists(chunks_key(batch.id)) == 0, "the chunk is done"
    assert store.client.zscore(running_key(QUEUE), payload["member"]) is None
    assert store.load_upload("", str(payload["images"][0]["upload"])) is None, "its last item ended"  # type: ignore[index]
    assert store.client.zscore(webhook_outbox_key(), f"{ITEM_OUTBOX_PREFIX}{batch.id}.0") is not None
    assert store.client.zscore(webhook_outbox_key(), f"{BATCH_OUTBOX_PREFIX}{batch.id}") is not None


def test_chunk_start_gives_up_after_its_attempts(store: JobStore) -> None:
    batch, chunks = new_batch(store)
    batches = BatchStore(store)
    batches.accept(batch, chunks)
    assert batches.start_chunk(chunks[0], QUEUE, "w1", 1, "tiny") == 1
    assert batches.start_chunk(chunks[0], QUEUE, "w2", 1, "tiny") == -2
    lost = [json.loads(outcome) for outcome in store.client.hvals(batch_outcomes_key(batch.id))]
    assert [outcome[:2] for outcome in lost] == [["failed", "worker_lost"]] * 2


def test_item_cancel(store: JobStore) -> None:
    batch, chunks = new_batch(store)
    batches = BatchStore(store)
    batches.accept(batch, chunks)
    assert batches.cancel_item(batch, 1) == CANCEL_DONE
    item = batches.item(batch, 1)
    assert item is not None and (item.status, item.cancel_requested) == ("canceled", True)
    assert store.client.sismember(cancels_key(batch.id), "1")


def test_batch_close_and_delete_ended(store: JobStore) -> None:
    batch, chunks = new_batch(store)
    batches = BatchStore(store)
    batches.accept(batch, chunks)
    assert batches.delete_ended(batch) is False, "an item has not ended"
    counts = batches.cancel(batch)
    assert (counts.canceled, counts.cancel_requested, counts.already_ended) == (2, 0, 0)
    closed = batches.get(batch.id)
    assert closed is not None and closed.closed == "canceled" and dict(closed.counts)["canceled"] == 2
    assert batches.cancel(batch).canceled == 0, "closed once"
    assert batches.delete_ended(batch) is True
    assert store.client.exists(*batch_keys(batch.id)) == 0


def test_webhook_claim_and_record(store: JobStore) -> None:
    job = new_job(store, webhook="https://hooks.example.com/")
    store.accept(job, QUEUE)
    store.mark_succeeded(job.id, "yes")
    outbox, now = Outbox(store.client), time.time()
    assert outbox.claim(job.id, now, 30.0) == 1
    assert outbox.claim(job.id, now, 30.0) == 0, "held by its lease"
    outbox.record(job.id, "pending", due=now, code="webhook_timeout", message="slow")
    assert outbox.claim(job.id, now, 30.0) == 2
    outbox.record(job.id, "delivered")
    assert store.client.zscore(webhook_outbox_key(), job.id) is None
    assert store.client.hget(job_key(job.id), "webhook_status") == b"delivered"
    assert outbox.claim(job.id, now, 30.0) == 0
    outbox.record("gone", "failed")  # a record that is gone leaves the outbox
    assert store.client.zscore(webhook_outbox_key(), "gone") is None


def test_answer_cache_store(store: JobStore) -> None:
    cache = AnswerCache(store.client, CacheSettings(ttl_s=60, max_entries=2), "scripts-test")
    keys = cache.keys(b"image", ["a?", "b?", "c?"])
    for key, answer in zip(keys, ["one", "two", "three"], strict=True):  # one at a time: the first is the oldest
        cache.store({key: answer})
    assert cache.lookup(keys) == [None, "two", "three"], "the oldest entry went past the bound"
    assert store.client.zcard(ANSWER_INDEX_KEY) == 2
    assert 0 < store.client.ttl(keys[2]) <= 60
    store.client.delete(*keys[1:])


def test_a_script_names_its_preludes_and_the_loader_prepends_them() -> None:
    start = lua.source("job_start")
    assert start.index("local function take_from_queue") < start.index("local function end_job")
    assert start.index("local function end_job") < start.index("local job_key, stats_key")
    assert "local function" not in lua.source("idempotency_claim")
    assert Path(lua.__file__).parent.joinpath("scripts", "lib", "job.lua").is_file()
