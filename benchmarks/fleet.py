"""The service's processes for the benchmarks: its own Redis, the API under gunicorn, N workers, each restartable.

Also the easy-VQA questions the benchmarks send, with what the demo model answers to each in this process.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from api.up import free_port, start_redis, stop_process  # noqa: E402

REDIS_DOWN_S = 2.0  # how long Redis stays away when it restarts


@dataclass
class Worker:
    """One `python -m worker` process of the run, in its own process group."""

    index: int
    process: subprocess.Popen[bytes]

    def pool_pid(self) -> int:
        pid = self.process.pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if children:
                return int(children[0])
            time.sleep(0.1)
        raise RuntimeError(f"worker {pid} has no pool process")


def load_items(count: int) -> list[tuple[bytes, str, str]]:
    """`count` easy-VQA test questions with their images as PNG bytes, and what the model answers in-process."""
    from easy_vqa import get_test_image_paths, get_test_questions
    from PIL import Image

    from worker.images import decode_image
    from worker.inference import answer_questions, load_model
    from worker.settings import DEMO_MODEL_DIR

    questions, _, image_ids = get_test_questions()
    paths = get_test_image_paths()
    loaded = load_model(str(DEMO_MODEL_DIR), device="cpu", dtype="float32")
    items = []
    for question, image_id in list(zip(questions, image_ids, strict=True))[:count]:
        buffer = io.BytesIO()
        Image.open(paths[image_id]).convert("RGB").save(buffer, format="PNG")
        image = buffer.getvalue()
        reference = answer_questions(loaded, [decode_image(image, 10**6)], [question])[0]
        items.append((image, question, reference))
    return items


class Fleet:
    """The service's processes: Redis, the API and the workers, each started again after a blow, as a supervisor
    would."""

    def __init__(self, workers: int, time_limit_s: int) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="blipq-chaos-"))
        self.redis = start_redis(self.data_dir / "redis")
        self.port = free_port(frozenset({self.redis.port}))
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "BLIPQ_REDIS_URL": self.redis.url,
            "BLIPQ_TORCH_THREADS": "1",
            "BLIPQ_JOB_TIME_LIMIT_S": str(time_limit_s),
            "BLIPQ_SHUTDOWN_GRACE_S": "5",
        }
        self.log = (self.data_dir / "service.log").open("wb")
        bind = f"127.0.0.1:{self.port}"
        self.api = self._spawn([sys.executable, "-m", "gunicorn", "--bind", bind, "--threads", "8", "api.wsgi:app"])
        self.workers = [Worker(i, self._spawn_worker(i)) for i in range(workers)]

    def kill_pool_process(self, worker: Worker) -> None:
        os.kill(worker.pool_pid(), signal.SIGKILL)

    def restart_worker(self, worker: Worker, sig: int) -> None:
        """Send `sig` to the worker's whole process group, wait for it to exit, start a new one."""
        os.killpg(worker.process.pid, sig)
        worker.process.wait()
        worker.process = self._spawn_worker(worker.index)

    def restart_redis(self) -> None:
        self.redis.stop()
        time.sleep(REDIS_DOWN_S)
        self.redis = start_redis(self.redis.data_dir, port=self.redis.port)

    def stop(self) -> None:
        for worker in self.workers:
            stop_process(worker.process)
        stop_process(self.api)
        self.redis.stop()

    def _spawn_worker(self, index: int) -> subprocess.Popen[bytes]:
        return self._spawn([sys.executable, "-m", "worker", f"--hostname=w{index}.{time.time():.0f}@%h"])

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv, env=self.env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_until_serving(fleet: Fleet, item: tuple[bytes, str, str]) -> None:
    """Wait for the API and for a worker to answer one job (its model loaded)."""
    base = fleet.base
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in [fleet.api, *(w.process for w in fleet.workers)]):
            raise RuntimeError(f"a process of the service exited; see {fleet.data_dir / 'service.log'}")
        try:
            response = requests.post(
                f"{base}/v1/jobs", data={"question": item[1]}, files={"image": ("q.png", item[0])}, timeout=5
            )
            job_id = response.json()["id"]
            while time.monotonic() < deadline:
                job = requests.get(f"{base}/v1/jobs/{job_id}", timeout=5).json()
                if job["status"] in ("succeeded", "failed"):
                    return
                time.sleep(0.2)
        except (requests.RequestException, ValueError, KeyError):
            time.sleep(0.5)
    raise RuntimeError("the service did not answer a first job")
