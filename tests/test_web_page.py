"""The web page at `/`, in a real headless Chromium against the running service: a real Redis, a real worker serving
the shipped demo model, and the API over real HTTP.

Given the page, an uploaded image gets the model's answer, a URL that cannot be fetched shows the failure's code, a
refused submission shows the API's error, and the recent jobs list the two jobs, also after a reload. The run leaves
a screenshot of the page in tests/artifacts/web-page.png.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest
import redis
import requests

from api.app import create_app
from api.auth import ApiKey, hash_api_key, new_api_key
from api.settings import ApiSettings
from api.up import RedisProcess, stop_process
from tests.conftest import JOB_TIMEOUT_S, ROOT, ImageServer, WorkerProcess, serve_app, start_worker
from worker.settings import DEMO_MODEL_DIR

ARTIFACTS = ROOT / "tests" / "artifacts"  # gitignored
SCREENSHOT = ARTIFACTS / "web-page.png"
FAILURE_SCREENSHOT = ARTIFACTS / "web-page-failure.png"
KEY = new_api_key()
EXAMPLE_IMAGE = DEMO_MODEL_DIR.parent / "examples" / "red-circle.png"
FINAL_STATES = ("succeeded", "failed", "refused")  # as the page shows them; "refused": the API made no job
WINDOW = "1000,1300"  # tall enough for the form, a result and the recent jobs in one screenshot


def missing(reason: str) -> NoReturn:
    """A browser the test needs is not here: skip on a developer's machine, fail in CI (which must install it)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(f"{reason}: apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium driven by Selenium, with the system's chromedriver (Selenium downloads nothing)."""
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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for script errors
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(chromedriver)))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def web_worker(redis_server: RedisProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker with the shipped demo model: it gives real answers, so the screenshot shows one."""
    worker = start_worker(redis_server.url, DEMO_MODEL_DIR, "web", tmp_path_factory.mktemp("logs") / "web.log")
    yield worker
    stop_process(worker.process)


@pytest.fixture(scope="module")
def service(redis_server: RedisProcess, web_worker: WorkerProcess) -> Iterator[str]:
    """The API, open (no API keys), enqueueing on the web worker's queue."""
    yield from serve_app(ApiSettings(redis_url=redis_server.url, queue=web_worker.queue))


@pytest.fixture(scope="module")
def keyed_service(redis_server: RedisProcess, web_worker: WorkerProcess) -> Iterator[str]:
    """The API with one API key configured, KEY."""
    keys = (ApiKey("web-page", hash_api_key(KEY)),)
    yield from serve_app(ApiSettings(redis_url=redis_server.url, queue=web_worker.queue, api_keys=keys))


def ask(browser: Any, question: str, *, image_file: str = "", image_url: str = "") -> dict[str, Any]:
    """Fill in the form, submit it, and wait for the page to show the outcome; returns what the page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    shown_before = browser.find_element(By.ID, "job-id").text
    if image_file:
        browser.find_element(By.ID, "image").send_keys(image_file)
    if image_url:
        browser.find_element(By.ID, "image-url").clear()
        browser.find_element(By.ID, "image-url").send_keys(image_url)
    browser.find_element(By.ID, "question").clear()
    browser.find_element(By.ID, "question").send_keys(question)
    browser.find_element(By.ID, "submit").click()

    def outcome(driver: Any) -> dict[str, Any] | None:
        if not driver.find_element(By.ID, "submit").is_enabled():
            return None  # the submission is in flight (the button is off from the click until the API answered)
        status = driver.find_element(By.ID, "status").get_attribute("data-status")
        job_id = driver.find_element(By.ID, "job-id").text
        if status not in FINAL_STATES or (job_id == shown_before and status != "refused"):
            return None
        return {
            "job_id": job_id,
            "status": status,
            "answer": driver.find_element(By.ID, "answer").text,
            "error_code": driver.find_element(By.ID, "error-code").text,
            "error_message": driver.find_element(By.ID, "error-message").text,
            "timeline": [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#timeline li")],
        }

    shown: dict[str, Any] = WebDriverWait(browser, JOB_TIMEOUT_S, poll_frequency=0.1).until(outcome)
    return shown


def recent_jobs(browser: Any) -> list[dict[str, str]]:
    """The recent jobs the page lists, newest first."""
    from selenium.webdriver.common.by import By

    return [
        {
            "job_id": item.get_attribute("data-job-id"),
            "status": item.find_element(By.CLASS_NAME, "badge").text,
            "question": item.find_element(By.TAG_NAME, "q").text,
            "outcome": item.find_element(By.CLASS_NAME, "outcome").text,
        }
        for item in browser.find_elements(By.CSS_SELECTOR, "#recent li")
    ]


def test_the_page_answers_an_upload_shows_failures_and_keeps_recent_jobs(
    browser: Any, service: str, image_server: ImageServer, redis_client: redis.Redis
) -> None:
    browser.get(f"{service}/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    assert recent_jobs(browser) == []

    # An uploaded image: the model's answer, after the statuses the job went through.
    answered = ask(browser, "what color is the shape?", image_file=str(EXAMPLE_IMAGE))
    assert answered["status"] == "succeeded", answered
    assert answered["answer"] == "red"
    assert answered["timeline"][0].startswith("queued") and answered["timeline"][-1].startswith("succeeded")
    stored = requests.get(f"{service}/v1/jobs/{answered['job_id']}", timeout=10).json()
    assert stored["answer"] == answered["answer"] and stored["status"] == "succeeded"

    # A URL the worker cannot fetch (the image server answers 404): the job fails, and its code is shown.
    missing_url = image_server.url("/web-page/missing.png")
    failed = ask(browser, "what is in the picture?", image_url=missing_url)
    assert failed["status"] == "failed", failed
    assert failed["error_code"] == "image_fetch_failed" and failed["error_message"]
    assert failed["answer"] == ""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(FAILURE_SCREENSHOT))

    # A submission the API refuses: no job, the API's error code and message.
    refused = ask(browser, "what is in the picture?", image_url="ftp://example.com/photo.jpg")
    assert refused["status"] == "refused"
    assert refused["error_code"] == "image_url_invalid" and refused["error_message"]

    # The recent jobs: the two jobs, newest first, and so again after a reload (they are in localStorage).
    expected = [
        {
            "job_id": failed["job_id"],
            "status": "failed",
            "question": "what is in the picture?",
            "outcome": "image_fetch_failed",
        },
        {"job_id": answered["job_id"], "status": "succeeded", "question": "what color is the shape?", "outcome": "red"},
    ]
    assert recent_jobs(browser) == expected
    browser.refresh()
    assert recent_jobs(browser) == expected

    ask(browser, "what color is the shape?", image_file=str(EXAMPLE_IMAGE))  # the screenshot shows an answer
    assert browser.save_screenshot(str(SCREENSHOT))
    print(f"screenshots of the page: {SCREENSHOT}, {FAILURE_SCREENSHOT}")
    assert script_errors(browser) == []


def script_errors(browser: Any) -> list[str]:
    """Errors in the page's console (a script error, a blocked resource), less the API's own error statuses."""
    entries = browser.get_log("browser")
    return [e["message"] for e in entries if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def test_with_api_keys_the_page_loads_without_one_and_sends_the_key_typed_in_it(
    browser: Any, keyed_service: str, redis_client: redis.Redis
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{keyed_service}/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()

    refused = ask(browser, "what color is the shape?", image_file=str(EXAMPLE_IMAGE))
    assert refused["status"] == "refused" and refused["error_code"] == "api_key_missing"
    key_field = browser.find_element(By.ID, "api-key")
    assert key_field.is_displayed(), "the API key field is opened for the user to fill in"

    key_field.send_keys(KEY)
    answered = ask(browser, "what color is the shape?", image_file=str(EXAMPLE_IMAGE))
    assert answered["status"] == "succeeded" and answered["answer"] == "red"

    browser.refresh()  # the key is kept in this browser
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY
    assert [job["job_id"] for job in recent_jobs(browser)] == [answered["job_id"]]


def test_the_page_is_public_and_loads_nothing_from_elsewhere(redis_server: RedisProcess) -> None:
    keys = (ApiKey("web-page", hash_api_key(KEY)),)
    client = create_app(ApiSettings(redis_url=redis_server.url, api_keys=keys)).test_client()

    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    for asset in re.findall(r'(?:src|href)="(/page/[^"]+)"', html):
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert response.mimetype in ("text/javascript", "application/javascript", "text/css"), asset
    assert len(re.findall(r'(?:src|href)="/page/', html)) == 2, "one script and one style sheet"
    assert "<script>" not in html and "style=" not in html, "nothing inline: the policy below forbids it"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy

    assert client.get("/page/../page.py").status_code == 404
    assert client.get("/v1/stats").status_code == 401, "the page is public, the API is not"
