"""Fair share between API keys within a priority level: release.lua hands held work to the workers in deficit round
robin, by answers, with weights; each test has a queue of its own, and starts what is released with the real start
script, as a worker would, to make room in the window.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter

import pytest
import redis

from api.admission import key_waiting_answers
from api.auth import ApiKey, hash_api_key, new_api_key
from blipq.up_redis import RedisProcess
from contract.fair_share import QUANTUM, RELEASE_AHEAD_PER_WORKER, key_shares, release_members
from contract.job_store import JobStore
from contract.jobs import Job, new_job_id, utc_now
from contract.keys import ANONYMOUS_SHARE, RELEASED_FIELD_PREFIX, unstarted_key, waiting_answers_key, workers_key
from contract.states import JobPriority, JobStatus
from contract.transitions import CANCEL_DONE
from tests.support.service import api_client

JOB = {"question": "what is it?", "image_url": "https://images.example.com/dog.png"}
ALICE, BOB = new_api_key(), new_api_key()
KEYS = (ApiKey("alice", hash_api_key(ALICE)), ApiKey("bob", hash_api_key(BOB)))


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, 600)


@pytest.fixture
def queue() -> str:
    return f"fair-{secrets.token_hex(4)}"


def submit(store: JobStore, queue: str, owner: str, count: int, weight: float = 1.0) -> list[str]:
    """Store and accept `count` single jobs of API key `owner`, as the API does; their ids."""
    ids = []
    for _ in range(count):
        job = Job(new_job_id(), JobStatus.QUEUED, "q?", utc_now(), owner=owner)
        store.create(job, queue, b"image")
        assert store.accept(job, queue, weight=weight) == 0
        ids.append(job.id)
    return ids


def drain(store: JobStore, queue: str, limit: int = 100_000) -> list[str]:
    """Release and start everything held, as one worker would: the members in the order they were released."""
    order: list[str] = []
    while len(order) < limit:
        released = release_members(store.client, queue, time.time())
        if not released:
            return order
        assert sum(1 for _ in released) <= RELEASE_AHEAD_PER_WORKER, "never more than the window"
        for priority, member in released:
            assert store.begin_run(member, queue, "tiny", "w1", 3, priority) == 1
            order.append(member)
    return order


def owners(order: list[str], by_id: dict[str, str]) -> list[str]:
    return [by_id[member] for member in order]


def test_two_keys_share_the_workers_whatever_their_backlogs(store: JobStore, queue: str) -> None:
    # Given: key a's backlog of 600 jobs, accepted before key b's 60
    by_id = dict.fromkeys(submit(store, queue, "a", 600), "a") | dict.fromkeys(submit(store, queue, "b", 60), "b")

    # When: the workers take them
    order = owners(drain(store, queue), by_id)

    # Then: every job ran once; b, new to the ring, had the first turn, and its last was released by about twice its
    # own count (a quantum of a's between its turns)
    assert Counter(order) == {"a": 600, "b": 60}
    last_b = max(index for index, owner in enumerate(order) if owner == "b")
    assert last_b < 2 * 60 + QUANTUM
    assert order[: 2 * QUANTUM] == ["b"] * QUANTUM + ["a"] * QUANTUM


@pytest.mark.parametrize("keys", [3, 10])
def test_each_of_k_keys_gets_about_a_kth(store: JobStore, queue: str, keys: int) -> None:
    by_id: dict[str, str] = {}
    for number in range(keys):
        by_id |= dict.fromkeys(submit(store, queue, f"key{number}", 2 * QUANTUM + 10 * (keys - number)), f"key{number}")

    order = owners(drain(store, queue), by_id)

    # While every key has work, each gets one quantum per round: after r rounds, within a quantum of r quanta each.
    rounds = 2
    counts = Counter(order[: rounds * keys * QUANTUM])
    assert set(counts) == {f"key{number}" for number in range(keys)}
    assert all(abs(count - rounds * QUANTUM) <= QUANTUM for count in counts.values()), counts


def test_weights_share_the_workers_in_proportion(store: JobStore, queue: str) -> None:
    by_id = dict.fromkeys(submit(store, queue, "light", 400, weight=1.0), "light")
    by_id |= dict.fromkeys(submit(store, queue, "heavy", 400, weight=3.0), "heavy")

    order = owners(drain(store, queue), by_id)

    counts = Counter(order[: 8 * QUANTUM])  # two rounds: 1 + 3 quanta each
    assert counts == {"light": 2 * QUANTUM, "heavy": 6 * QUANTUM}


def test_requests_without_a_key_are_one_key(store: JobStore, queue: str) -> None:
    by_id = dict.fromkeys(submit(store, queue, "", 200), ANONYMOUS_SHARE)
    by_id |= dict.fromkeys(submit(store, queue, "a", 200), "a")

    order = owners(drain(store, queue), by_id)

    assert Counter(order[: 4 * QUANTUM]) == {ANONYMOUS_SHARE: 2 * QUANTUM, "a": 2 * QUANTUM}


def test_a_key_that_arrives_with_little_has_the_next_turn(store: JobStore, queue: str) -> None:
    # Given: key a's backlog, and what the workers already took of it (a window's worth released and started)
    submit(store, queue, "a", 500)
    taken = drain(store, queue, limit=RELEASE_AHEAD_PER_WORKER)

    # When: key b submits 10 jobs
    late = set(submit(store, queue, "b", 10))

    # Then: b, new to the ring, has the next turn (as a new flow in FQ-CoDel): its jobs are the next released
    order = drain(store, queue)
    assert len(taken) == RELEASE_AHEAD_PER_WORKER
    assert set(order[: len(late)]) == late


def test_held_jobs_canceled_are_dropped_free_of_their_keys_share(store: JobStore, queue: str) -> None:
    a_ids = submit(store, queue, "a", 100)
    b_ids = submit(store, queue, "b", 40)
    canceled = a_ids[:60]
    jobs = [store.get(job_id) for job_id in canceled]
    assert store.cancel_many([job for job in jobs if job is not None], queue) == [CANCEL_DONE] * 60
    assert key_waiting_answers(store.client, [queue], "a") == 100, "canceled, still in its line until dropped"

    order = drain(store, queue)

    assert set(order) == set(a_ids[60:]) | set(b_ids), "no canceled job was released"
    assert [job for job in order if job in a_ids][:QUANTUM] == a_ids[60 : 60 + QUANTUM]
    assert order[QUANTUM : 2 * QUANTUM] == a_ids[60 : 60 + QUANTUM], "the canceled ones cost a's turn nothing"
    assert key_waiting_answers(store.client, [queue], "a") == 0
    assert key_shares(store.client, queue, JobPriority.NORMAL) == []
    assert int(store.client.hget(waiting_answers_key(), unstarted_key(queue)) or 0) == 0


def test_the_key_shares_list_each_keys_held_answers_and_weight(store: JobStore, queue: str) -> None:
    submit(store, queue, "a", 3, weight=2.0)
    submit(store, queue, "b", 5)

    shares = {share.name: (share.held, share.weight) for share in key_shares(store.client, queue, JobPriority.NORMAL)}

    assert shares == {"a": (3, 2.0), "b": (5, 1.0)}


def test_one_key_may_hold_only_its_share_of_the_queue_bound(redis_server: RedisProcess, queue: str) -> None:
    # Given: a bound of 400 waiting answers, of which one key may hold half; no worker takes them. Alice's first batch
    # fills the window the workers are given (released: not counted as held), her second holds her whole share
    api = api_client(redis_server.url, queue, api_keys=KEYS, max_queue_depth=400, key_queue_share=0.5)
    first = batch(RELEASE_AHEAD_PER_WORKER)
    assert api.post("/v1/batches", json=first, headers=as_key(ALICE)).status_code == 202
    assert api.post("/v1/batches", json=batch(200), headers=as_key(ALICE)).status_code == 202

    # When: alice submits one more job, and bob one
    refused = api.post("/v1/jobs", json=JOB, headers=as_key(ALICE))
    other = api.post("/v1/jobs", json=JOB, headers=as_key(BOB))

    # Then: alice's is refused 429 key_queue_full, with Retry-After; bob's is taken
    assert refused.status_code == 429, refused.get_json()
    assert refused.get_json()["error"]["code"] == "key_queue_full"
    assert "200" in refused.get_json()["error"]["message"]
    assert int(refused.headers["Retry-After"]) > 0
    assert other.status_code == 202, other.get_json()


def batch(answers: int) -> dict[str, object]:
    return {"images": [f"https://images.example.com/{number}.png" for number in range(answers)], "questions": ["q?"]}


def as_key(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_the_end_estimate_counts_what_fair_share_puts_ahead(redis_server: RedisProcess, queue: str) -> None:
    # Given: alice's 300 jobs, of which the first window's worth is released to the (absent) workers, the rest held
    api = api_client(redis_server.url, queue, api_keys=KEYS, max_queue_depth=0)
    assert api.post("/v1/batches", json=batch(300), headers=as_key(ALICE)).status_code == 202

    # When: bob submits 10 jobs behind her backlog
    bobs = [api.post("/v1/jobs", json=JOB, headers=as_key(BOB)).get_json() for _ in range(10)]

    # Then: ahead of bob's last are the released answers, his 9 others, and as many of alice's (her share), not her
    # whole backlog
    assert bobs[-1]["estimate"]["answers_ahead"] == RELEASE_AHEAD_PER_WORKER + 9 + 10
    assert bobs[0]["estimate"]["answers_ahead"] == RELEASE_AHEAD_PER_WORKER + 1


def test_the_window_count_follows_releases_starts_and_cancels_and_a_sweep_recounts_it(
    store: JobStore, queue: str
) -> None:
    field = RELEASED_FIELD_PREFIX + unstarted_key(queue)

    def counted() -> int:
        return int(store.client.hget(waiting_answers_key(), field) or 0)

    ids = submit(store, queue, "a", 100)
    released = [member for _, member in release_members(store.client, queue, time.time())]
    assert (len(released), counted()) == (RELEASE_AHEAD_PER_WORKER, RELEASE_AHEAD_PER_WORKER)
    for member in released[:10]:  # started by a worker
        assert store.begin_run(member, queue, "tiny", "w1", 3) == 1
    jobs = [store.get(member) for member in released[10:15]]
    assert store.cancel_many([job for job in jobs if job is not None], queue) == [CANCEL_DONE] * 5
    assert counted() == RELEASE_AHEAD_PER_WORKER - 15
    window = RELEASE_AHEAD_PER_WORKER
    assert release_members(store.client, queue, time.time()) == [
        (JobPriority.NORMAL, job) for job in ids[window : window + 15]
    ]

    # A count gone wrong (a path that missed it) keeps the window shut only until the reaper's sweep recounts it
    store.client.hset(waiting_answers_key(), field, 10_000)
    assert release_members(store.client, queue, time.time()) == []
    assert release_members(store.client, queue, time.time(), recount=True) == []
    assert counted() == RELEASE_AHEAD_PER_WORKER


def test_a_canceled_batchs_held_chunks_are_dropped_unreleased_and_free_of_its_keys_share(
    redis_server: RedisProcess, redis_client: redis.Redis, queue: str
) -> None:
    # Given: alice's batch of 200 answers (64 released to the absent workers, the rest held) and bob's 64, held
    api = api_client(redis_server.url, queue, api_keys=KEYS)
    alices = api.post("/v1/batches", json=batch(200), headers=as_key(ALICE)).get_json()["id"]
    bobs = api.post("/v1/batches", json=batch(64), headers=as_key(BOB)).get_json()["id"]

    # When: alice cancels hers, and ten workers come (room for everything held)
    assert api.post(f"/v1/batches/{alices}/cancel", headers=as_key(ALICE)).status_code == 200
    redis_client.zadd(workers_key(queue), {f"worker-{number}": time.time() for number in range(10)})
    released = release_members(redis_client, queue, time.time())

    # Then: only bob's chunks are released; alice's held ones left her line and the answers waiting, unreleased
    assert [member.split(":")[1] for _, member in released] == [bobs, bobs]
    assert key_shares(redis_client, queue, JobPriority.NORMAL) == []
    waiting = int(redis_client.hget(waiting_answers_key(), unstarted_key(queue)) or 0)
    assert waiting == RELEASE_AHEAD_PER_WORKER + 64, "alice's released chunks (skipped when started) and bob's"
