"""Driving the web page at `/` in a headless Chromium (Selenium): what its tests share. The fixtures (the browser, the
workers, the API) are in tests/conftest.py.

Selenium is imported inside the helpers: without it, the browser fixture skips (or fails in CI) with a message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

from api.settings import ApiSettings
from tests.support.environment import ROOT
from tests.support.service import JOB_TIMEOUT_S, WorkerProcess, wait_for_worker_record
from worker.settings import DEMO_MODEL_DIR

ARTIFACTS = ROOT / "tests" / "artifacts"  # gitignored: the tests' screenshots
EXAMPLES = DEMO_MODEL_DIR.parent / "examples"
EXAMPLE_IMAGE = EXAMPLES / "red-circle.png"
FINAL_STATES = ("succeeded", "failed", "refused")  # as the page shows them; "refused": the API made no job
WINDOW = "1000,1300"  # tall enough for the form, a result and the recent jobs in one screenshot
# A batch's questions: the API cuts a batch into chunks of one image each (its questions), so that holding an image
# holds exactly its own items.
BATCH_QUESTIONS = ("what color is the shape?", "what shape is in the image?", "is there a circle?")
# An end estimate as the page words it: when it ends and the answers ahead, or why the API cannot tell.
ESTIMATE_WORDS = (
    r"ends (in under a second|in about \d+ (s|min \d+ s)), \d+ answers? ahead"
    r"|no estimate: (no worker serves this task|the workers have not measured their rate yet)"
)

T = TypeVar("T")


def missing(reason: str) -> NoReturn:
    """A browser the test needs is not here: skip on a developer's machine, fail in CI (which must install it)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI installs it: see .ci/run)")
    pytest.skip(f"{reason}: apt-get install chromium chromium-driver")


@dataclass
class Fleet:
    """The workers behind the page's API: the demo model's for questions, a tiny captioner's for captions."""

    redis_url: str
    vqa: WorkerProcess
    caption: WorkerProcess

    def ready(self) -> None:
        """Wait until both workers are announced: the API refuses jobs for a task with no live worker (no_worker).

        Another test may have cleared Redis; a worker announces itself again within its announce interval.
        """
        for worker in (self.vqa, self.caption):
            wait_for_worker_record(self.redis_url, worker.queue, 1, worker)


def page_settings(fleet: Fleet, **overrides: Any) -> ApiSettings:
    """The API's settings: questions to the demo worker, captions to the tiny captioner, a batch chunk per image."""
    return ApiSettings(
        redis_url=fleet.redis_url,
        queue=fleet.vqa.queue,
        caption_queue=fleet.caption.queue,
        batch_chunk_size=len(BATCH_QUESTIONS),
        **overrides,
    )


def wait_until(browser: Any, condition: Callable[[Any], T], timeout: float = JOB_TIMEOUT_S) -> T:
    """Poll `condition` (falsy: not yet) until it holds; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    value: T = WebDriverWait(browser, timeout, poll_frequency=0.1).until(condition)
    return value


def open_page(browser: Any, url: str) -> None:
    """Load the page afresh: nothing kept in this browser from an earlier test."""
    browser.get(f"{url}/")
    browser.execute_script("localStorage.clear()")
    browser.get(f"{url}/")


def show_view(browser: Any, name: str) -> None:
    """Follow the page's navigation link to one of its views."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, f"nav-{name}").click()
    assert browser.find_element(By.ID, f"view-{name}").is_displayed()


def ask(browser: Any, text: str, *, task: str = "vqa", image_file: str = "", image_url: str = "") -> dict[str, Any]:
    """Fill in the form (a question, or for `caption` a prompt), submit it, and wait for the page to show the
    outcome; returns what the page shows."""
    from selenium.webdriver.common.by import By

    shown_before = browser.find_element(By.ID, "job-id").text
    browser.find_element(By.ID, f"task-{task}").click()
    if image_file:
        browser.find_element(By.ID, "image").send_keys(image_file)
    if image_url:
        browser.find_element(By.ID, "image-url").clear()
        browser.find_element(By.ID, "image-url").send_keys(image_url)
    text_field = browser.find_element(By.ID, "prompt" if task == "caption" else "question")
    text_field.clear()
    text_field.send_keys(text)
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
            "task": driver.find_element(By.ID, "job-task").text,
            "answer_label": driver.find_element(By.ID, "answer-label").text,
            "answer": driver.find_element(By.ID, "answer").text,
            "error_code": driver.find_element(By.ID, "error-code").text,
            "error_message": driver.find_element(By.ID, "error-message").text,
            "timeline": [item.text for item in driver.find_elements(By.CSS_SELECTOR, "#timeline li")],
        }

    return wait_until(browser, outcome)


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


def script_errors(browser: Any) -> list[str]:
    """Errors in the page's console (a script error, a blocked resource), less the API's own error statuses."""
    entries = browser.get_log("browser")
    return [e["message"] for e in entries if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


BATCH_SNAPSHOT = """
const $ = (id) => document.getElementById(id);
return {
  id: $("batch-id").textContent,
  shown: !$("batch").hidden && !$("batch-body").hidden,
  progress: $("batch-progress").value,
  text: $("batch-progress-text").textContent,
  counts: Object.fromEntries([...$("batch-counts").children].map((cell) => [cell.dataset.status, cell.textContent])),
  errors: [...$("batch-errors").children].map((item) => item.textContent),
  rate: $("batch-rate").textContent,
  eta: $("batch-eta").textContent,
  outcome: $("batch-outcome").textContent,
  error: $("batch-error").hidden ? null : $("batch-error-code").textContent,
  errorMessage: $("batch-error-message").textContent,
};
"""


def batch_shown(browser: Any) -> dict[str, Any]:
    """What the batch panel shows, read at once (counts as the numbers shown)."""
    shown: dict[str, Any] = browser.execute_script(BATCH_SNAPSHOT)
    shown["counts"] = {status: int(count or 0) for status, count in shown["counts"].items()}
    return shown


def submit_batch(browser: Any, images: list[str], questions: list[str]) -> str:
    """Start a batch from the page's form; returns its id, once the page shows it."""
    from selenium.webdriver.common.by import By

    show_view(browser, "batches")
    browser.find_element(By.ID, "batch-images").send_keys("\n".join(images))
    browser.find_element(By.ID, "batch-questions").send_keys("\n".join(questions))
    browser.find_element(By.ID, "batch-submit").click()
    batch_id: str = wait_until(
        browser, lambda driver: re.fullmatch(r"#batch=(.+)", driver.execute_script("return location.hash"))
    )[1]
    wait_until(browser, lambda driver: batch_shown(driver)["shown"] and batch_shown(driver)["id"] == batch_id)
    return batch_id


def download_results(browser: Any, downloads: Path, batch_id: str, count: int) -> list[dict[str, Any]]:
    """Follow the page's results link; returns the lines of the file the browser saved."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "batch-results").click()
    saved = downloads / f"batch-{batch_id}.jsonl"

    def complete(_: Any) -> bool:  # Chromium writes to a .crdownload file, renamed once complete
        return saved.is_file() and not list(downloads.glob("*.crdownload"))

    wait_until(browser, complete, timeout=30)
    note = browser.find_element(By.ID, "batch-results-note").text
    assert note == f"{count} lines saved as batch-{batch_id}.jsonl", note
    return [json.loads(line) for line in saved.read_text().splitlines()]


# The fleet panel redraws every poll: a card is read in one script, so no element goes stale between two reads.
