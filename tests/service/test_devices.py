"""Where a worker runs its model: it says so in one line at start, and refuses a device this machine does not have."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blipq.up_redis import RedisProcess, stop_process
from contract.errors import SettingsError
from tests.support.service import JOB_TIMEOUT_S, WorkerProcess, start_worker, wait_for_worker_record
from worker.inference import resolve_device


def missing_cuda_device() -> str:
    """A CUDA device this machine does not have: any, without CUDA; else the one past the last."""
    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def test_a_worker_says_its_model_device_and_dtype_in_one_line(
    redis_server: RedisProcess, tiny_worker: WorkerProcess, tiny_model_dir: Path
) -> None:
    wait_for_worker_record(redis_server.url, tiny_worker.queue, 1, tiny_worker)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # BLIPQ_DEVICE=auto
    dtype = "torch.float16" if torch.cuda.is_available() else "torch.float32"

    lines = [line for line in tiny_worker.log_path.read_text().splitlines() if "loaded on" in line]

    assert len(lines) == 1, lines
    assert f"model {tiny_model_dir} (vqa) loaded on {device} as {dtype}" in lines[0], lines[0]


@pytest.mark.parametrize("device", [missing_cuda_device(), "cuda:7"])
def test_a_device_this_machine_lacks_is_refused_naming_the_setting(device: str) -> None:
    with pytest.raises(SettingsError, match=rf"^BLIPQ_DEVICE={device}, but "):
        resolve_device(device)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_worker_on_a_cuda_device_this_machine_lacks_exits_at_start_with_the_reason(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    device = missing_cuda_device()
    worker = start_worker(redis_server.url, tiny_model_dir, "no-gpu", tmp_path / "w.log", BLIPQ_DEVICE=device)

    try:
        status = worker.process.wait(JOB_TIMEOUT_S)
    finally:
        stop_process(worker.process)  # one that did not exit (it would fail its jobs instead) goes now

    log = worker.log_path.read_text()
    assert status == 1, log
    assert f"blipq worker: BLIPQ_DEVICE={device}, but " in log, log
    assert "Traceback" not in log, log
