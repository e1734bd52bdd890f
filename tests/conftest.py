"""The suite's fixtures: a Redis server, Celery workers, an HTTP server of images, checkpoints on disk, and the web
page's browser, workers and API. The helpers
they and the tests share live in tests/support/."""

from __future__ import annotations

import secrets
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api.admission import queue_names
from api.settings import ApiSettings
from blipq.up_redis import RedisProcess, start_redis, stop_process
from tests.support.browser import WINDOW, Fleet, missing, page_settings
from tests.support.service import (
    JOB_TIMEOUT_S,
    HeldImage,
    ImageServer,
    QuietHandler,
    WorkerProcess,
    api_client,
    http_server,
    serve_app,
    start_worker,
    wait_for_worker_record,
)
from tests.support.stored import stored_keys
from tests.support.tiny_model import build_tiny_caption_model, build_tiny_vqa_model
from worker.settings import DEMO_MODEL_DIR


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    """A real redis-server of the tests' own on a free port (never the machine's standard one), for the session."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisProcess) -> Iterator[redis.Redis]:
    """A client of the session's Redis, with every blipq record removed before the test.

    Only the records of submissions are removed: Celery's own keys (its queue bindings), and the records the running
    workers keep about themselves (which /readyz reads), must survive for the session's workers.
    """
    client = redis.Redis.from_url(redis_server.url)
    keys = stored_keys(client)
    if keys:
        client.delete(*keys)
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight BLIP VQA checkpoint, saved with save_pretrained like a real one."""
    return build_tiny_vqa_model(tmp_path_factory.mktemp("tiny-vqa"))


@pytest.fixture(scope="session")
def tiny_caption_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight BLIP captioning checkpoint (BlipForConditionalGeneration), saved like a real one."""
    return build_tiny_caption_model(tmp_path_factory.mktemp("tiny-caption"))


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    """Serve test images (and broken ones) over HTTP on a free port."""
    routes: dict[str, tuple[int, str, bytes]] = {}
    requests: Counter[str] = Counter()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            requests[self.path] += 1
            self.answer(*routes.get(self.path, (404, "text/plain", b"not found")))

    with http_server(Handler) as port:
        yield ImageServer(port, routes, requests)


@pytest.fixture(scope="session")
def tiny_worker(
    redis_server: RedisProcess, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker serving the tiny checkpoint on queue `tiny`."""
    log_path = tmp_path_factory.mktemp("logs") / "tiny-worker.log"
    worker = start_worker(redis_server.url, tiny_model_dir, "tiny", log_path)
    yield worker
    stop_process(worker.process)


@pytest.fixture(scope="session")
def tiny_caption_worker(
    redis_server: RedisProcess, tiny_caption_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker serving the tiny captioning checkpoint on queue `tiny-caption` (beside `tiny_worker`'s VQA)."""
    log_path = tmp_path_factory.mktemp("logs") / "tiny-caption-worker.log"
    worker = start_worker(redis_server.url, tiny_caption_model_dir, "tiny-caption", log_path)
    yield worker
    stop_process(worker.process)


@pytest.fixture
def caption_service_url(
    redis_server: RedisProcess,
    tiny_worker: WorkerProcess,
    tiny_caption_worker: WorkerProcess,
    redis_client: redis.Redis,
) -> Iterator[str]:
    """The API over HTTP with both queues: the tiny VQA worker's, and the tiny captioning worker's for captions."""
    settings = ApiSettings(redis_url=redis_server.url, queue=tiny_worker.queue, caption_queue=tiny_caption_worker.queue)
    for worker in (tiny_worker, tiny_caption_worker):  # a task with no live worker yet is refused
        wait_for_worker_record(redis_server.url, worker.queue, 1, worker)
    yield from serve_app(settings)


@pytest.fixture
def tiny_api(redis_server: RedisProcess, tiny_worker: WorkerProcess, redis_client: redis.Redis) -> FlaskClient:
    """The API, enqueueing on the tiny worker's queue."""
    return api_client(redis_server.url, tiny_worker.queue)


@pytest.fixture
def held_image() -> Iterator[HeldImage]:
    """An image URL whose response waits until the test sets `release`."""
    held = HeldImage("red")
    try:
        yield held
    finally:
        held.close()


@pytest.fixture
def idle_queue(redis_client: redis.Redis) -> Iterator[str]:
    """A queue that no worker reads: what is enqueued stays there to be counted."""
    name = f"idle-{secrets.token_hex(4)}"
    yield name
    redis_client.delete(*queue_names(name))


@pytest.fixture
def idle_api(redis_server: RedisProcess, idle_queue: str) -> FlaskClient:
    """The API in front of the idle queue, with a short job TTL (the bound of a deadline)."""
    return api_client(redis_server.url, idle_queue, job_ttl_s=600)


@pytest.fixture(scope="session")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the browser saves downloads (a batch's results)."""
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="session")
def browser(downloads: Path) -> Iterator[Any]:
    """The web page tests' headless Chromium, driven by Selenium, with the system's chromedriver (Selenium downloads
    nothing)."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        missing("no chromium or chromedriver on the PATH")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WINDOW}"):
        options.add_argument(argument)  # --no-sandbox: CI runs as root, where Chromium's sandbox cannot start
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for script errors
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(chromedriver)))
    yield driver
    driver.quit()


@pytest.fixture(scope="session")
def web_worker(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker with the shipped demo model: it gives real answers, so the screenshot shows one.

    Its downloads may take as long as a job may: the batch test holds images until it has seen the page.
    """
    log_path = tmp_path_factory.mktemp("logs") / "web.log"
    worker = start_worker(redis_server.url, DEMO_MODEL_DIR, "web", log_path, BLIPQ_FETCH_TIMEOUT_S=str(JOB_TIMEOUT_S))
    yield worker
    stop_process(worker.process)


@pytest.fixture(scope="session")
def fleet(redis_server: RedisProcess, web_worker: WorkerProcess, tiny_caption_worker: WorkerProcess) -> Fleet:
    """The web page's workers: the demo model's for questions, the tiny captioner's for captions."""
    return Fleet(redis_server.url, web_worker, tiny_caption_worker)


@pytest.fixture(scope="module")
def service(fleet: Fleet) -> Iterator[str]:
    """The API, open (no API keys)."""
    yield from serve_app(page_settings(fleet))
