"""A job whose Celery message was lost (a worker killed inside BRPOP, an API killed before it published) still runs.

Each priority level of a queue is first in, first out on its own; the reaper judges each level by its own mark.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import redis

from api.up import RedisProcess, stop_process
from tests.conftest import api_client, start_worker, wait_for_job
from tests.fixtures.images import shape_png
from worker.contract.jobs import Job, JobStore, broker_list_key, new_job_id, started_mark_key, unstarted_key, utc_now
from worker.contract.states import JobPriority, JobStatus
from worker.reaper import ReaperPolicy, find_lost

POLICY = ReaperPolicy(behind_mark_s=50, waiting_s=1000)


def stored_job(store: JobStore, queue: str, enqueued_at: float, priority: JobPriority = JobPriority.NORMAL) -> str:
    """A job stored as the API stores it, enqueued at `enqueued_at`, whose message was never published."""
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


def test_a_job_far_behind_the_latest_started_one_or_waiting_too_long_is_lost(redis_client: redis.Redis) -> None:
    store = JobStore(redis_client, 600)
    long_behind = stored_job(store, "q", enqueued_at=100)
    recent = stored_job(store, "q", enqueued_at=180)
    redis_client.set(started_mark_key("q"), 200)  # a job enqueued at 200 has started

    assert find_lost(store, "q", POLICY, now=300) == [long_behind]
    # With no job started at all, only the wait counts.
    redis_client.delete(started_mark_key("q"))
    assert find_lost(store, "q", POLICY, now=300) == []
    assert find_lost(store, "q", POLICY, now=1200) == [long_behind, recent]


def test_a_level_is_judged_by_its_own_mark_so_a_high_job_overtaking_low_ones_loses_none(
    redis_client: redis.Redis,
) -> None:
    # Given: a low job waiting, and a high job enqueued much later that started before it (it overtook it).
    store = JobStore(redis_client, 600)
    waiting_low = stored_job(store, "q", enqueued_at=100, priority=JobPriority.LOW)
    redis_client.set(started_mark_key("q", JobPriority.HIGH), 400)

    # Then: the low job is not lost, but a high job left behind the high mark is.
    lost_high = stored_job(store, "q", enqueued_at=100, priority=JobPriority.HIGH)
    assert find_lost(store, "q", POLICY, now=450, priority=JobPriority.LOW) == []
    assert find_lost(store, "q", POLICY, now=450, priority=JobPriority.HIGH) == [lost_high]
    # A later low job started: now the first one is behind its own level's mark.
    redis_client.set(started_mark_key("q", JobPriority.LOW), 200)
    assert find_lost(store, "q", POLICY, now=450, priority=JobPriority.LOW) == [waiting_low]


def test_a_long_wait_counts_as_a_loss_only_when_the_levels_list_is_empty(redis_client: redis.Redis) -> None:
    # Given: a low job that has waited longer than the visibility timeout, behind messages still in its list.
    store = JobStore(redis_client, 600)
    waiting = stored_job(store, "q", enqueued_at=100, priority=JobPriority.LOW)
    redis_client.lpush(broker_list_key("q", JobPriority.LOW), "a message ahead of it")

    # Then: it is waiting, not lost (higher levels or a deep backlog hold it up); with the list empty, it is lost.
    assert find_lost(store, "q", POLICY, now=5000, priority=JobPriority.LOW) == []
    redis_client.delete(broker_list_key("q", JobPriority.LOW))
    assert find_lost(store, "q", POLICY, now=5000, priority=JobPriority.LOW) == [waiting]


def test_a_job_whose_message_was_lost_is_published_again_and_answered_once(
    redis_server: RedisProcess, redis_client: redis.Redis, tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Given: a low-priority job stored a while ago whose message never reached the queue, and a worker with a quick
    # reaper.
    store = JobStore(redis_client, 600)
    lost = stored_job(store, "reaper", enqueued_at=time.time() - 100, priority=JobPriority.LOW)
    # (A job counts as lost once it is more than the job time limit behind the latest job of its level started.)
    quick = {"BLIPQ_REAPER_INTERVAL_S": "0.5", "BLIPQ_JOB_TIME_LIMIT_S": "15"}
    worker = start_worker(redis_server.url, tiny_model_dir, "reaper", tmp_path / "w.log", **quick)
    client = api_client(redis_server.url, "reaper")
    try:
        # When: a later job of its level is submitted and started (the level has moved past the lost one)...
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
