"""How `blipq up` divides the cores between its workers: disjoint shares that cover them, never more than there are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import worker.settings
from blipq.cores import CoreShare, divide_cores, ranges
from worker.settings import WorkerSettings, usable_cores


@pytest.mark.parametrize(
    ("cores", "workers", "shares"),
    [
        (range(16), 2, [tuple(range(8)), tuple(range(8, 16))]),
        (range(5), 2, [(0, 1, 2), (3, 4)]),
        ([2, 3, 6, 7], 3, [(2, 3), (6,), (7,)]),
        (range(2), 2, [(0,), (1,)]),
        (range(2), 3, [(0,), (1,), (0,)]),  # fewer cores than workers: one core each, in turn
        (range(1), 1, [(0,)]),
    ],
)
def test_each_worker_gets_its_own_run_of_the_cores_and_as_many_threads_and_decoders(
    cores: range | list[int], workers: int, shares: list[tuple[int, ...]]
) -> None:
    divided = divide_cores(list(cores), workers)

    assert [share.cores for share in divided] == shares
    assert all(share.torch_threads == share.decode_processes == len(share.cores) for share in divided)
    assert sum(share.torch_threads for share in divided) <= max(len(cores), workers)


def test_settings_in_the_environment_are_every_workers() -> None:
    share = CoreShare((0, 1, 2, 3), 4, 4)

    assert share.env({}) == {"BLIPQ_TORCH_THREADS": "4", "BLIPQ_DECODE_PROCESSES": "4"}
    assert share.env({"BLIPQ_DECODE_PROCESSES": "0"}) == {"BLIPQ_TORCH_THREADS": "4", "BLIPQ_DECODE_PROCESSES": "0"}
    assert share.describe({}) == "cores 0-3 (BLIPQ_TORCH_THREADS=4, BLIPQ_DECODE_PROCESSES=4)"


def test_cores_are_written_as_linux_writes_a_cpu_list() -> None:
    assert ranges([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"


@pytest.mark.parametrize(("cpu_max", "limit"), [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1)])
def test_a_containers_cpu_limit_bounds_the_cores_a_worker_uses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cpu_max: str, limit: int | None
) -> None:
    # Given: the cgroup file a container's CPU limit is written in (cgroup v2's cpu.max: quota and period, in us)
    (tmp_path / "cpu.max").write_text(cpu_max)
    monkeypatch.setattr(worker.settings, "CGROUP_CPU_MAX", tmp_path / "cpu.max")
    affinity = len(os.sched_getaffinity(0))

    # Then: the cores it may use are its affinity's, within the limit rounded up
    assert usable_cores() == (affinity if limit is None else min(affinity, limit))
    assert WorkerSettings().decode_processes == usable_cores()
