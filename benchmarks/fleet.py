"""The service's processes for the benchmarks: its own Redis, the API under gunicorn, N workers, each restartable.

Also the easy-VQA questions and images the benchmarks send, with what the demo model answers to each in this process;
a batch sent and read back as fast as the service ends it; `blipq tag` run as a user runs it; and the bare Celery
no-op baseline. The image host for images sent as URLs is benchmarks/image_server.py.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from benchmarks.processes import ChildRun, run_child
from blipq.up_redis import SentinelGroup, free_port, start_redis, start_sentinel_group, stop_process
from contract.redis_target import RedisTarget

REPO = Path(__file__).resolve().parent.parent

REDIS_DOWN_S = 2.0  # how long Redis stays away when it restarts
TAG_TIMEOUT_S = 1800  # one `blipq tag` run, at most
BATCH_POLL_S = 0.1  # between two reads of a batch's summary: the client's back-off (up to 2 s) would blur a rate


@dataclass
class Worker:
    """One worker process of the run (`python -m worker`, or the fleet's worker module), in its own process group."""

    index: int
    process: subprocess.Popen[bytes]


def load_items(count: int) -> list[tuple[bytes, str, str]]:
    """`count` easy-VQA test questions with their images as PNG bytes, and what the model answers in-process."""
    from easy_vqa import get_test_image_paths, get_test_questions
    from PIL import Image

    from contract.images import decode_image
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

    def __init__(
        self,
        workers: int,
        time_limit_s: int,
        env: Mapping[str, str] | None = None,
        sentinel: bool = False,
        worker_module: str = "worker",
    ) -> None:
        """Start Redis, the API and `workers` workers; `env` overrides BLIPQ_* variables for all of them.

        With `sentinel`, Redis is a primary, two replicas and three sentinels, which every process goes through.
        `worker_module` is what each worker runs, `python -m worker_module` (benchmarks/standin_device.py: the
        worker on a stand-in device).
        """
        self.worker_module = worker_module
        self.data_dir = Path(tempfile.mkdtemp(prefix="blipq-chaos-"))
        self.group: SentinelGroup | None = None
        redis_env: dict[str, str] = {}
        if sentinel:
            self.group = start_sentinel_group(self.data_dir / "redis", replicas=2)
            self.redis = self.group.servers[0]
            redis_env = {"BLIPQ_REDIS_SENTINELS": self.group.sentinel_addresses, "BLIPQ_REDIS_MASTER": "blipq"}
        else:
            self.redis = start_redis(self.data_dir / "redis")
        self.port = free_port(frozenset({self.redis.port}))
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "BLIPQ_REDIS_URL": self.redis.url,
            **redis_env,
            "BLIPQ_TORCH_THREADS": "1",
            "BLIPQ_JOB_TIME_LIMIT_S": str(time_limit_s),
            "BLIPQ_SHUTDOWN_GRACE_S": "5",
            # Benchmarks compare the service with the model: an answer from the cache would be neither. A run that
            # measures the cache turns it on.
            "BLIPQ_ANSWER_CACHE": "off",
            **(env or {}),
        }
        self.log = (self.data_dir / "service.log").open("wb")
        bind = f"127.0.0.1:{self.port}"
        self.api = self._spawn([sys.executable, "-m", "gunicorn", "--bind", bind, "--threads", "32", "api.wsgi:app"])
        self.workers = [Worker(i, self._spawn_worker(i)) for i in range(workers)]

    def restart_worker(self, worker: Worker, sig: int) -> None:
        """Send `sig` to the worker's whole process group (if anything is left of it: a worker may have exited by
        itself), wait for it to exit, start a new one."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, sig)
        worker.process.wait()
        worker.process = self._spawn_worker(worker.index)

    def restart_redis(self) -> None:
        self.redis.stop()
        time.sleep(REDIS_DOWN_S)
        self.redis = start_redis(self.redis.data_dir, port=self.redis.port)

    @property
    def target(self) -> RedisTarget:
        """Where the service's Redis is, as its processes find it."""
        if self.group is None:
            return RedisTarget(self.redis.url)
        sentinels = tuple(("127.0.0.1", port) for port in self.group.sentinel_ports)
        return RedisTarget(self.redis.url, sentinels, self.group.master)

    def fail_over(self) -> float:
        """SIGKILL the primary; once the sentinels name another, start the old one again as its replica. Returns
        the seconds until the sentinels named the new primary."""
        assert self.group is not None, "a failover needs Sentinel"
        old = self.redis
        os.kill(old.process.pid, 9)
        old.process.wait()
        killed = time.monotonic()
        while (port := self.group.primary_port()) in (None, old.port):
            time.sleep(0.05)
        assert port is not None
        named_after_s = time.monotonic() - killed
        [self.redis] = [server for server in self.group.servers if server.port == port]
        self.group.servers.remove(old)
        self.group.servers.append(start_redis(old.data_dir, port=old.port, replica_of=port))
        return named_after_s

    def stop(self) -> None:
        for worker in self.workers:
            stop_process(worker.process)
        stop_process(self.api)
        if self.group is not None:
            self.group.stop()
        else:
            self.redis.stop()

    def _spawn_worker(self, index: int) -> subprocess.Popen[bytes]:
        return self._spawn([sys.executable, "-m", self.worker_module, f"--hostname=w{index}.{time.time():.0f}@%h"])

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv, env=self.env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )


def run_clients(clients: int, count: int, call: Callable[[int], None]) -> tuple[float, list[float]]:
    """`count` calls of `call(i)` spread over `clients` threads: (wall seconds, each call's latency)."""
    latencies: list[float] = []
    lock = threading.Lock()
    next_index = iter(range(count))

    def client() -> None:
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            started = time.perf_counter()
            call(index)
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


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


def easy_vqa_image_paths(count: int) -> list[Path]:
    """The first `count` easy-VQA test images, PNG files on disk."""
    from easy_vqa import get_test_image_paths

    paths = get_test_image_paths()
    return [Path(paths[index]) for index in range(count)]


def run_batch(
    base: str, images: Sequence[str | Path], questions: Sequence[str], timeout_s: float = 600
) -> tuple[float, list[dict[str, Any]]]:
    """Submit every question about every image as one batch, wait for it, read its results back.

    Returns the wall seconds from the submission to the last result line read, and the result lines in item order
    (image by image). The summary is read every BATCH_POLL_S, not with the client's back-off.
    """
    from blipq.client import BlipqClient

    client = BlipqClient(base, timeout_s=120)
    started = time.perf_counter()
    batch_id, count = client.submit_batch(images, questions)
    deadline = time.monotonic() + timeout_s
    while client.batch(batch_id)["ended"] < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} did not end within {timeout_s:g} s")
        time.sleep(BATCH_POLL_S)
    results = list(client.results(batch_id))
    return time.perf_counter() - started, results


def run_tag(
    base: str,
    sources: Sequence[str],
    texts: Sequence[str],
    out: Path,
    urls: Path | None = None,
    caption: bool = False,
    options: Sequence[str] = (),
    checkout: Path = REPO,
) -> ChildRun:
    """Run `blipq tag` as a user would (`-q` for each of `texts`, `--caption` with `caption`, then `options`), the
    code of `checkout` (this one unless told), until it exits; its wall seconds and CPU; raises unless it exited 0.
    Its output (the progress bar) goes to OUT with suffix .log."""
    argv = [sys.executable, "-m", "blipq.cli", "tag", *sources]
    argv += ["--urls", str(urls)] if urls else []
    argv += ["--caption"] if caption else []
    argv += [arg for text in texts for arg in ("-q", text)]
    argv += [*options, "-o", str(out), "--url", base]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    run = run_child(argv, out.with_suffix(".log"), checkout, TAG_TIMEOUT_S, env)
    if run.returncode != 0:
        raise RuntimeError(f"blipq tag exited {run.returncode}: {out.with_suffix('.log').read_text()[-2000:]}")
    return run


def noop_celery_rate(fleet: Fleet, tasks: int, clients: int) -> float:
    """Tasks/s of a bare Celery no-op round trip (`delay` + `get` per task from `clients` threads, blipq's Celery
    configuration, one prefork worker process) on the fleet's Redis."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchmarks.noop_celery", "worker", "--pool=prefork",
         "--concurrency=1", "--without-mingle", "--without-gossip", "-Q", "noop", "--loglevel=WARNING"],
        env={**fleet.env, "BENCH_REDIS_URL": fleet.redis.url}, cwd=REPO, stdout=fleet.log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        os.environ["BENCH_REDIS_URL"] = fleet.redis.url  # read when the no-op app is built, at import
        from benchmarks.noop_celery import noop

        noop.delay().get(timeout=120)  # the no-op worker is up
        seconds, _ = run_clients(clients, tasks, lambda index: noop.delay().get(timeout=60))
    finally:
        stop_process(worker)
    return tasks / seconds
