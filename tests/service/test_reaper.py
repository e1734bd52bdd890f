"""A job whose Celery message was lost (a worker killed inside BRPOP, an API killed before it published) still runs.

A message counts as lost when it is in no place a live worker will take it from: it has left its level's list (the
list is empty, its job was accepted before the message at the list's head was published, or a job enqueued later has
started) and no live worker holds it, at two looks a grace apart. Each priority level of a queue is first in, first
out on its own; the reaper judges each level by its own list and mark.
"""

from __future__ import annotations

import io
import json
import socket
import time
from pathlib import Path

import redis

from blipq.up_redis import RedisProcess, stop_process
from contract.broker import create_celery, publish_job
from contract.job_store import JobStore
from contract.jobs import Job, new_job_id, utc_now
from contract.keys import (
    broker_list_key,
    held_key,
    holders_key,
    running_key,
    started_mark_key,
    unstarted_key,
    waiting_answers_key,
    worker_key,
)
from contract.states import JobPriority, JobStatus
from tests.support.images import shape_png
from tests.support.service import api_client, start_worker, wait_for_job, wait_for_worker_record
from worker.reaper import CLOCK_SKEW_S, MARK_SKEW_S, SWEEP_BATCH, ReaperPolicy, confirm_lost, find_missing, sweep

QUICK_RECOVERY = {"BLIPQ_ANNOUNCE_INTERVAL_S": "0.5", "BLIPQ_REAPER_INTERVAL_S": "0.5"}
BACKLOG = 20_000  # a deep queue: a sweep must not read it


def stored_job(store: JobStore, queue: str, enqueued_at: float, priority: JobPriority = JobPriority.NORMAL) -> str:
    """A job stored and accepted as the API does it, enqueued at `enqueued_at`, whose message was never published."""
    job = Job(
        id=new_job_id(),
        status=JobStatus.QUEUED,
        question="what color is the shape?",
        created_at=utc_now(),
        priority=priority,
    )
    store.create(job, queue, shape_png("green"))
    store.accept(job, queue)
    store.client.zadd(unstarted_key(queue, priority), {job.id: enqueued_at})
    return job.id


def live_worker(client: redis.Redis, queue: str, worker: str, holds: list[str]) -> None:
    """A worker whose record has not expired, holding these messages (received, not started)."""
    client.hset(worker_key(worker), "id", worker)
    client.expire(worker_key(worker), 60)
    if holds:
        client.sadd(held_key(queue, worker), *holds)
        client.sadd(holders_key(queue), worker)


def test_a_job_is_missing_once_its_list_is_empty_and_no_live_worker_holds_it(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, 600)
    held, lost = stored_job(store, "q", 100), stored_job(store, "q", 100)
    live_worker(redis_client, "q", "w:1", [held])
    # While a message waits in the list (one that says nothing of when it was published), no job has surely left it.
    redis_client.lpush(broker_list_key("q", JobPriority.NORMAL), "a message")
    assert find_missing(store, "q") == []
    # The list empty: every never-started job has left it; the one a live worker holds is not missing.
    redis_client.delete(broker_list_key("q", JobPriority.NORMAL))
    assert find_missing(store, "q") == [(JobPriority.NORMAL, lost)]
    # Its holder's record expired: that one counts too (the reaper publishes a dead worker's held set first).
    redis_client.delete(worker_key("w:1"))
    assert sorted(find_missing(store, "q")) == sorted([(JobPriority.NORMAL, held), (JobPriority.NORMAL, lost)])


def test_a_job_enqueued_well_before_a_started_one_of_its_level_has_left_the_list(redis_client: redis.Redis) -> None:
    # Given: a level whose list still has messages, and a job enqueued at 200 that has started.
    store = JobStore(redis_client, 600)
    redis_client.lpush(broker_list_key("q", JobPriority.LOW), "a message")
    redis_client.set(started_mark_key("q", JobPriority.LOW), 200)
    behind = stored_job(store, "q", 200 - MARK_SKEW_S - 0.5, JobPriority.LOW)
    stored_job(store, "q", 200 - MARK_SKEW_S + 0.5, JobPriority.LOW)  # may still be in the list: accepted just after

    # Then: only the job well behind the mark is missing.
    assert find_missing(store, "q") == [(JobPriority.LOW, behind)]


def test_a_job_accepted_before_the_message_at_the_head_of_its_list_was_published_has_left_it(
    redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    # Given: a level whose next message was published at 200, and no job of the level started yet.
    store = JobStore(redis_client, 600)
    head = Job(id=new_job_id(), status=JobStatus.QUEUED, question="what color?", created_at=utc_now())
    publish_job(create_celery(redis_server.url, "q"), head, "q", published_at=200)
    taken = stored_job(store, "q", 200 - CLOCK_SKEW_S - 0.1)
    stored_job(store, "q", 200 - CLOCK_SKEW_S + 0.1)  # may be behind it in the list: clocks differ a little

    # Then: only the job accepted before that message was published has left the list.
    assert find_missing(store, "q") == [(JobPriority.NORMAL, taken)]


def test_a_level_is_judged_by_its_own_list_and_mark_so_a_high_job_overtaking_low_ones_loses_none(
    redis_client: redis.Redis,
) -> None:
    # Given: a low job waiting in its list, and a high job enqueued much later that started before it (it overtook).
    store = JobStore(redis_client, 600)
    stored_job(store, "q", 100, JobPriority.LOW)
    redis_client.lpush(broker_list_key("q", JobPriority.LOW), "its message")
    redis_client.lpush(broker_list_key("q", JobPriority.HIGH), "a later high message")
    redis_client.set(started_mark_key("q", JobPriority.HIGH), 400)

    # Then: the low job is not missing, but a high job left behind the high mark is.
    lost_high = stored_job(store, "q", 100, JobPriority.HIGH)
    assert find_missing(store, "q") == [(JobPriority.HIGH, lost_high)]


def test_a_missing_job_is_lost_only_when_a_look_a_grace_later_agrees(redis_client: redis.Redis) -> None:
    missing = [(JobPriority.NORMAL, "a"), (JobPriority.NORMAL, "b")]
    # First look: both noted, none lost yet.
    assert confirm_lost(redis_client, "q", missing, grace_s=2, now=100) == []
    # Within the grace: still none. "b" is found meanwhile (held, or started): forgotten.
    assert confirm_lost(redis_client, "q", missing[:1], grace_s=2, now=101) == []
    # A grace after the first look, "a" is lost; "b", missing again, starts a grace of its own.
    assert confirm_lost(redis_client, "q", missing, grace_s=2, now=102) == [(JobPriority.NORMAL, "a")]
    assert confirm_lost(redis_client, "q", missing[1:], grace_s=2, now=103) == []
    assert confirm_lost(redis_client, "q", missing[1:], grace_s=2, now=104) == [(JobPriority.NORMAL, "b")]


def test_a_sweep_reads_the_front_of_a_deep_queue_not_the_queue(redis_client: redis.Redis) -> None:
    # Given: a deep backlog still in its list (enqueued after the mark), and more lost jobs than a sweep takes.
    store = JobStore(redis_client, 600)
    level = unstarted_key("q", JobPriority.NORMAL)
    redis_client.zadd(level, {f"waiting-{n}": 1000 + n for n in range(BACKLOG)})
    redis_client.lpush(broker_list_key("q", JobPriority.NORMAL), *(f"message {n}" for n in range(BACKLOG)))
    redis_client.zadd(level, {f"lost-{n}": 10 + n / 1000 for n in range(SWEEP_BATCH * 2)})
    redis_client.set(started_mark_key("q", JobPriority.NORMAL), 500)
    redis_client.config_resetstat()

    missing = find_missing(store, "q")

    # Then: a batch of the lost, oldest first, and the list was never read.
    assert [member for _, member in missing] == [f"lost-{n}" for n in range(SWEEP_BATCH)]
    commands = redis_client.info("commandstats")
    assert "cmdstat_lrange" not in commands, sorted(commands)


def test_a_job_whose_worker_died_while_running_it_is_watched_again_until_a_worker_starts_it(
    redis_server: RedisProcess, redis_client: redis.Redis
) -> None:
    # Given: a job started by a worker whose record is gone (killed), on a queue no worker reads.
    store = JobStore(redis_client, 600)
    job_id = stored_job(store, "orphans", time.time())
    assert store.begin_run(job_id, "orphans", "model", "gone:1", max_attempts=3) == 1
    redis_client.zadd(running_key("orphans"), {job_id: 0})
    celery = create_celery(redis_server.url, "orphans")
    listed = broker_list_key("orphans", JobPriority.NORMAL)

    # When: the reaper sweeps, it publishes the job again, and the job waits in its never-started set again.
    assert sweep(store, celery, "orphans", ReaperPolicy(grace_s=0)) == 1
    assert redis_client.llen(listed) == 1
    assert redis_client.zscore(unstarted_key("orphans"), job_id) is not None
    assert int(redis_client.hget(waiting_answers_key(), unstarted_key("orphans")) or 0) == 1
    # Then: should that message be lost too (a worker killed inside BRPOP), it is published once more.
    redis_client.delete(listed)
    assert sweep(store, celery, "orphans", ReaperPolicy(grace_s=0)) == 1
    assert redis_client.llen(listed) == 1
    # Once a live worker started it, nothing is published again.
    live_worker(redis_client, "orphans", "live:1", [])
    assert store.begin_run(job_id, "orphans", "model", "live:1", max_attempts=3) == 2
    redis_client.delete(listed)
    assert sweep(store, celery, "orphans", ReaperPolicy(grace_s=0)) == 0
    assert int(redis_client.hget(waiting_answers_key(), unstarted_key("orphans")) or 0) == 0


def test_messages_a_worker_took_and_never_recorded_run_again_within_seconds(
    redis_server: RedisProcess, redis_client: redis.Redis, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given: a worker with a quick reaper, and two accepted jobs whose messages a worker took from the queue and
    # then died with: one right after its BRPOP, one after kombu recorded it as unacknowledged (the field reports).
    queue = "taken"
    worker = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "w.log", **QUICK_RECOVERY)
    store = JobStore(redis_client, 600)
    client = api_client(redis_server.url, queue)
    try:
        wait_for_worker_record(redis_server.url, queue, 1, worker)
        # (Their messages are published where no worker reads, and taken from there as a worker's BRPOP would.)
        celery = create_celery(redis_server.url, queue + "-nobody")
        job_ids = [stored_job(store, queue, time.time()) for _ in range(2)]
        for job_id in job_ids:
            job = store.get(job_id)
            assert job is not None
            publish_job(celery, job, queue + "-nobody")
        taken = [redis_client.rpop(broker_list_key(queue + "-nobody", JobPriority.NORMAL)) for _ in job_ids]
        assert all(taken)
        message = json.loads(taken[1])  # type: ignore[arg-type]
        redis_client.hset("unacked", "a-dead-workers-tag", json.dumps([message, "", queue]))
        redis_client.zadd("unacked_index", {"a-dead-workers-tag": time.time()})
        republished_before = store.stats()["republished"]

        # Then: the reaper publishes both again within two looks, and each is answered once.
        for job_id in job_ids:
            assert wait_for_job(client, job_id, worker)["status"] == "succeeded"
        assert store.stats()["republished"] - republished_before == 2
        assert f"job {job_ids[0]} had lost its message; published again" in worker.log_tail(200)
        assert store.stats()["duplicate_executions"] == 0
    finally:
        redis_client.hdel("unacked", "a-dead-workers-tag")
        redis_client.zrem("unacked_index", "a-dead-workers-tag")
        stop_process(worker.process)


def test_a_job_accepted_after_its_worker_gave_up_waiting_for_it_runs(
    redis_server: RedisProcess, redis_client: redis.Redis, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given: a job whose message reached a worker before its API accepted it, and a worker that gave up waiting.
    queue = "late-accept"
    worker = start_worker(redis_server.url, tiny_model_dir, queue, tmp_path / "w.log", **QUICK_RECOVERY)
    store = JobStore(redis_client, 600)
    try:
        wait_for_worker_record(redis_server.url, queue, 1, worker)
        job = Job(id=new_job_id(), status=JobStatus.QUEUED, question="what color?", created_at=utc_now())
        store.create(job, queue, shape_png("red"))
        publish_job(create_celery(redis_server.url, queue), job, queue)
        deadline = time.monotonic() + 60
        while f"job {job.id} was not accepted within" not in worker.log_tail(200):
            assert time.monotonic() < deadline, worker.log_tail()
            time.sleep(0.05)

        # When: the API accepts it at last (a stalled API), its message gone
        assert store.accept(job, queue) == 0

        # Then: the reaper's sweep releases it from its key's line (contract/fair_share.py: nothing else releases it,
        # the API that accepted it being gone), and it runs once.
        assert wait_for_job(api_client(redis_server.url, queue), job.id, worker)["status"] == "succeeded"
        assert store.stats()["republished"] == 0
        assert not redis_client.sismember(held_key(queue, f"{socket.gethostname()}:{worker.process.pid}"), job.id)
    finally:
        stop_process(worker.process)


def test_a_job_whose_message_was_lost_is_published_again_and_answered_once(
    redis_server: RedisProcess, redis_client: redis.Redis, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given: a low-priority job stored a while ago whose message never reached the queue, and a worker with a quick
    # reaper.
    store = JobStore(redis_client, 600)
    lost = stored_job(store, "reaper", enqueued_at=time.time() - 100, priority=JobPriority.LOW)
    worker = start_worker(redis_server.url, tiny_model_dir, "reaper", tmp_path / "w.log", **QUICK_RECOVERY)
    client = api_client(redis_server.url, "reaper")
    try:
        # When: a later job of its level is submitted and answered...
        form = {"question": "what color?", "priority": "low", "image": (io.BytesIO(shape_png("red")), "r.png")}
        later = client.post("/v1/jobs", data=form)
        assert later.status_code == 202
        assert wait_for_job(client, later.get_json()["id"], worker)["status"] == "succeeded"
        # Then: the reaper publishes the lost job again, and it is answered.
        job = wait_for_job(client, lost, worker)
        assert job["status"] == "succeeded", job
        assert store.stats()["republished"] == 1
        assert redis_client.zscore(unstarted_key("reaper", JobPriority.LOW), lost) is None
    finally:
        stop_process(worker.process)
