"""A worker's measured rate (worker/rate.py): answers per second over the last minute, and per busy second."""

from __future__ import annotations

import pytest

from contract.fleet import UNMEASURED_RATE, WorkerRecord, per_worker_rate
from worker.rate import WINDOW_S, RateMeter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_answers_per_second_and_per_busy_second_over_the_last_minute() -> None:
    clock = Clock()
    meter = RateMeter(clock=clock)
    assert meter.rates() == (0.0, 0.0)
    clock.now += 20  # idle
    meter.begin()
    clock.now += 10
    meter.end(20)  # 20 answers in 10 busy seconds
    clock.now += 30  # idle: 60 s since the meter started
    per_s, busy_per_s = meter.rates()
    assert per_s == pytest.approx(20 / 60) and busy_per_s == pytest.approx(2.0)
    clock.now += WINDOW_S  # a minute later the answers have left the window
    assert meter.rates() == (0.0, 0.0)


def test_overlapping_jobs_are_busy_once_and_a_job_in_hand_counts_as_busy() -> None:
    clock = Clock()
    meter = RateMeter(clock=clock)
    meter.begin()
    meter.begin()
    clock.now += 5
    meter.end(1)
    clock.now += 5
    meter.end(3)  # 4 answers over 10 busy seconds, not 15
    meter.begin()
    clock.now += 10  # still in hand: busy, no answer yet
    assert meter.rates()[1] == pytest.approx(4 / 20)
    meter.end(0)  # it raised: no answer, still busy time
    assert meter.rates() == (pytest.approx(4 / 20), pytest.approx(4 / 20))


def test_a_single_jobs_run_is_the_tenth_percentile_of_those_that_ended_over_the_last_minute() -> None:
    clock = Clock()
    meter = RateMeter(clock=clock)
    assert meter.job_run_s() == 0.0
    for seconds in (0.1, 0.3, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 0.15):
        meter.begin()
        clock.now += seconds
        meter.end(1, job_run_s=seconds)
    meter.begin()
    meter.end(32)  # a chunk: no single job's run
    meter.begin()
    meter.end(0, job_run_s=5.0)  # a job that did not end (skipped, or raised): not a run
    assert meter.job_run_s() == pytest.approx(0.15)  # 12 runs: the second fastest
    clock.now += WINDOW_S + 1  # a minute later they have left the window
    assert meter.job_run_s() == 0.0


def record(busy_answers_per_s: float) -> WorkerRecord:
    return WorkerRecord(
        id="h:1", host="h", pid=1, queue="q", model="m", device="cpu", dtype="float32", loaded_at="", load_seconds=0.0,
        metrics_port=0, busy_answers_per_s=busy_answers_per_s,
    )  # fmt: skip


def test_one_workers_rate_is_the_mean_measured_else_the_kept_one_else_the_assumed_one() -> None:
    assert per_worker_rate([record(2.0), record(4.0), record(0.0)], kept=9.0) == 3.0
    assert per_worker_rate([record(0.0)], kept=9.0) == 9.0
    assert per_worker_rate([], kept=9.0) == 9.0
    assert per_worker_rate([], kept=0.0) == UNMEASURED_RATE


def test_a_record_of_an_older_worker_reads_without_rates() -> None:
    fields = record(2.5).to_redis()
    assert WorkerRecord.from_redis(fields).busy_answers_per_s == 2.5
    del fields["answers_per_s"], fields["busy_answers_per_s"]
    old = WorkerRecord.from_redis(fields)
    assert (old.answers_per_s, old.busy_answers_per_s) == (0.0, 0.0)
