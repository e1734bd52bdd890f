"""A worker-only machine: the project's wheel holds all a worker needs, and a worker installed from it, run outside the
repository, joins a running stack (a real Redis and API) and answers its jobs.

The venv is fresh and holds the wheel; the shared venv's dependencies (torch, transformers, Celery...) are reused
through a .pth line, so nothing is downloaded. That line adds the shared site-packages as a path only: the .pth files
in it (the shared venv's editable install of this repository) are not run, so every package comes from the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from api.settings import ApiSettings
from blipq.up_redis import RedisProcess, stop_process
from tests.support.environment import ROOT
from tests.support.service import FINAL_STATES, JOB_TIMEOUT_S, serve_app
from worker.settings import DEMO_MODEL_DIR

QUEUE = "wheel"
EXAMPLE = DEMO_MODEL_DIR.parent / "examples" / "red-circle.png"


def git_files(*folders: str) -> list[str]:
    listed = subprocess.run(["git", "ls-files", *folders], cwd=ROOT, capture_output=True, text=True, check=True)
    return listed.stdout.split()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built (with the shared venv's setuptools, offline) from a copy of its sources."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in [
        "pyproject.toml",
        "README.md",
        *git_files("api", "blipq", "contract", "worker"),
    ]:  # a build writes beside its sources
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(out), "."]
    subprocess.run(build, cwd=source, check=True, capture_output=True)
    [built] = out.glob("blipq-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed, reusing the shared venv's dependencies; its bin directory."""
    venv = tmp_path_factory.mktemp("worker-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet", str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    purelib = [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    site = subprocess.run(purelib, capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "shared-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv / "bin"


def outside_env(**extra: str) -> dict[str, str]:
    """The environment of a process that must not see this repository: no PYTHONPATH."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("BLIPQ_")}, **extra}


def test_the_wheel_holds_every_file_of_the_packages(wheel: Path) -> None:
    in_wheel = set(zipfile.ZipFile(wheel).namelist())

    missing = [name for name in git_files("api", "blipq", "contract", "worker") if name not in in_wheel]

    assert not missing, missing
    assert "api/static/page/index.html" in in_wheel, "the API's web page"


WHERE_PACKAGES_ARE = (
    "import api, blipq, contract, worker; print(api.__file__, blipq.__file__, contract.__file__, worker.__file__)"
)


def test_a_worker_installed_from_the_wheel_joins_a_running_stack_and_answers(
    installed: Path, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # Given: the wheel's code, as the installed worker imports it (not the repository's)
    where = subprocess.run(
        [
            installed / "python",
            "-c",
            WHERE_PACKAGES_ARE,
        ],
        env=outside_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT) not in where and str(installed.parent) in where, where

    # When: `blipq worker` from that venv is started, outside the repository, on the stack's Redis
    log_path = tmp_path / "worker.log"
    env = outside_env(
        BLIPQ_REDIS_URL=redis_server.url,
        BLIPQ_MODEL=str(DEMO_MODEL_DIR),
        BLIPQ_QUEUE=QUEUE,
        BLIPQ_METRICS_PORT="0",
        BLIPQ_TORCH_THREADS="1",
    )
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [installed / "blipq", "worker", f"--hostname={QUEUE}@%h"], env=env, cwd=tmp_path, stdout=log, stderr=log
        )
    try:
        api: Iterator[str] = serve_app(ApiSettings(redis_url=redis_server.url, queue=QUEUE))
        base = next(api)
        try:
            # Then: it joins (the API lists its model) and answers a job
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while not (entry := models(base))["workers"]:
                assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            assert entry["models"] == [str(DEMO_MODEL_DIR)], entry
            submitted = requests.post(
                f"{base}/v1/jobs",
                files={"image": ("red-circle.png", EXAMPLE.read_bytes(), "image/png")},
                data={"question": "what color is the shape?"},
                timeout=10,
            )
            assert submitted.status_code == 202, submitted.text
            job = ended(base, submitted.json()["id"])
            assert (job["status"], job["answer"]) == ("succeeded", "red"), (job, log_path.read_text()[-2000:])
        finally:
            next(api, None)
    finally:
        stop_process(worker)


def models(base: str) -> dict[str, object]:
    """The API's entry for the VQA task of GET /v1/models."""
    listed: list[dict[str, object]] = requests.get(f"{base}/v1/models", timeout=5).json()["models"]
    return next(entry for entry in listed if entry["task"] == "vqa")


def ended(base: str, job_id: str) -> dict[str, object]:
    """The job once it ended (each read waits up to 20 s for it)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job: dict[str, object] = requests.get(f"{base}/v1/jobs/{job_id}?wait=20", timeout=30).json()
        if job["status"] in FINAL_STATES or time.monotonic() > deadline:
            return job
