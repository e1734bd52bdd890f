"""The web page as a live console, in a real headless Chromium against the running service (a real Redis, the demo
model's worker, the API over real HTTP, real image servers): a job and a batch are followed by long polls, which the
API answers the moment they change, never read on a timer; a batch of local files is uploaded from the page; a batch
lists its failed items (image, question, error), pushed while it runs; the job and batch views word the API's end
estimates. The fixtures are tests/conftest.py's (the browser, the workers, the API), shared with test_web_page.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import redis

from tests.support.browser import (
    ARTIFACTS,
    BATCH_QUESTIONS,
    ESTIMATE_WORDS,
    EXAMPLE_IMAGE,
    Fleet,
    batch_shown,
    open_page,
    script_errors,
    show_view,
    submit_batch,
    wait_until,
)
from tests.support.images import truncated_png
from tests.support.long_poll import blocked_in_blmove
from tests.support.service import HeldImage, ImageServer

CONSOLE_SCREENSHOT = ARTIFACTS / "web-console-failed-items.png"

# The page's reads of the API, as the browser's resource timing lists them (each once its answer is read).
READS = """
return performance.getEntriesByType("resource").map((entry) => entry.name).filter((name) => name.includes("/v1/"));
"""
HASH = "return location.hash"
READ_FAILED_ITEMS = """
return [...document.querySelectorAll("#batch-failed li")].map((item) => ({
  index: Number(item.dataset.index),
  ref: item.querySelector(".image-ref").textContent,
  question: item.querySelector(".question").textContent,
  code: item.querySelector(".item-error .code").textContent,
  message: item.querySelector(".item-error .message").textContent,
  thumbnail: item.querySelector("img") ? item.querySelector("img").getAttribute("src") : null,
}));
"""


def start_page(browser: Any, url: str) -> None:
    """The page afresh, keeping the timing of every read it makes (Chromium keeps 250 by default)."""
    open_page(browser, url)
    browser.execute_script("performance.setResourceTimingBufferSize(100000)")


def reads_of(browser: Any, path: str) -> list[str]:
    """The page's reads of `path` (with their query strings; not those of its subpaths), in the order they ended."""
    reads: list[str] = browser.execute_script(READS)
    return [read for read in reads if re.search(re.escape(path) + r"(\?|$)", read)]


def failed_items(browser: Any) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = browser.execute_script(READ_FAILED_ITEMS)
    return listed


def test_the_job_view_shows_a_jobs_end_pushed_by_a_long_poll_and_its_estimate_before(
    browser: Any, service: str, fleet: Fleet, held_image: HeldImage
) -> None:
    from selenium.webdriver.common.by import By

    fleet.ready()
    start_page(browser, service)
    waiting_reads = redis.Redis.from_url(fleet.redis_url)
    blocked_before = blocked_in_blmove(waiting_reads)
    browser.find_element(By.ID, "image-url").send_keys(held_image.url)  # its worker waits for the image
    browser.find_element(By.ID, "question").send_keys("what color is the shape?")
    browser.find_element(By.ID, "submit").click()

    # The page's read of the job waits in Redis for its end (a read on a timer would answer at once): one long poll.
    wait_until(browser, lambda _: blocked_in_blmove(waiting_reads) > blocked_before, timeout=30)
    job_id = browser.find_element(By.ID, "job-id").text
    assert browser.find_element(By.ID, "status").get_attribute("data-status") in ("queued", "running")
    # Meanwhile the job view words the 202's end estimate.
    assert browser.find_element(By.ID, "job-estimate").is_displayed()
    assert re.fullmatch(ESTIMATE_WORDS, browser.find_element(By.ID, "job-estimate-text").text)

    held_image.release.set()
    wait_until(browser, lambda driver: driver.find_element(By.ID, "status").get_attribute("data-status") == "succeeded")
    assert browser.find_element(By.ID, "answer").text.strip()
    assert not browser.find_element(By.ID, "job-estimate").is_displayed(), "an ended job has no estimate"
    # The one read that ended is the long poll the job's end answered: none before it, none on a timer.
    assert reads_of(browser, f"/v1/jobs/{job_id}") == [f"{service}/v1/jobs/{job_id}?wait=20"]
    assert script_errors(browser) == []


def test_a_batch_of_local_files_is_uploaded_followed_by_long_polls_and_lists_its_failed_items(
    browser: Any, service: str, fleet: Fleet, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    # The broken file's header is an image's (the API takes it), its pixels are cut: its items fail in the worker.
    broken = tmp_path / "broken.png"
    broken.write_bytes(truncated_png())
    questions = ["what color is the shape?", "is there a circle?"]
    fleet.ready()
    start_page(browser, service)
    show_view(browser, "batches")
    browser.find_element(By.ID, "batch-files").send_keys(f"{EXAMPLE_IMAGE}\n{broken}")
    browser.find_element(By.ID, "batch-questions").send_keys("\n".join(questions))
    browser.find_element(By.ID, "batch-submit").click()
    batch_id = wait_until(
        browser, lambda driver: re.fullmatch(r"#batch=(.+)", driver.execute_script("return location.hash"))
    )[1]

    end = wait_until(browser, lambda driver: (s := batch_shown(driver))["text"] == "4 of 4 ended (100%)" and s)
    assert (end["counts"]["succeeded"], end["counts"]["failed"]) == (2, 2), end
    assert end["eta"] == "done: every item ended"

    # Items go image by image: the broken file's are 2 and 3, each shown with the page's own copy of the file.
    listed = wait_until(browser, lambda driver: len(items := failed_items(driver)) == 2 and items)
    assert [(item["index"], item["ref"], item["question"], item["code"]) for item in listed] == [
        (2, "broken.png", questions[0], "image_invalid"),
        (3, "broken.png", questions[1], "image_invalid"),
    ]
    assert all(item["message"] and item["thumbnail"].startswith("blob:") for item in listed), listed
    assert not browser.find_element(By.ID, "batch-failed-none").is_displayed()

    # The upload's results: the files' names, the model's answers for the good one.
    results = browser.execute_script(
        "const r = await fetch(arguments[0]); return await r.text();", f"/v1/batches/{batch_id}/results"
    )
    lines = [line for line in results.splitlines() if line]
    assert [re.search(r'"image_name":"([^"]+)"', line)[1] for line in lines] == ["red-circle.png"] * 2 + [
        "broken.png"
    ] * 2  # type: ignore[index]
    assert '"answer":"red"' in lines[0]

    # The batch was read once, then by long polls from the ended count it showed; its failures from the results.
    reads = reads_of(browser, f"/v1/batches/{batch_id}")
    assert reads[0] == f"{service}/v1/batches/{batch_id}", reads
    assert all(
        re.fullmatch(re.escape(f"{service}/v1/batches/{batch_id}?wait=20&after=") + r"\d", read) for read in reads[1:]
    ), reads
    assert reads_of(browser, f"/v1/batches/{batch_id}/results")[0].endswith("/results?status=failed")
    assert script_errors(browser) == []


def test_a_running_batch_lists_a_failed_url_with_its_question_and_code_and_words_its_estimate(
    browser: Any, service: str, fleet: Fleet, image_server: ImageServer, held_image: HeldImage
) -> None:

    fleet.ready()
    start_page(browser, service)
    broken = image_server.url("/web-console/missing.png")  # the server answers 404
    # A chunk per image (its questions): the broken image's items fail while the held one's still run.
    batch_id = submit_batch(browser, [held_image.url, broken], list(BATCH_QUESTIONS))

    listed = wait_until(browser, lambda driver: len(items := failed_items(driver)) == 3 and items)
    assert [(item["index"], item["ref"], item["question"], item["code"]) for item in listed] == [
        (3 + n, broken, question, "image_fetch_failed") for n, question in enumerate(BATCH_QUESTIONS)
    ]
    assert all(item["thumbnail"] is None for item in listed), "a remote image is named, never loaded"
    running = batch_shown(browser)
    assert running["text"] == "3 of 6 ended (50%)" and re.fullmatch(ESTIMATE_WORDS, running["eta"]), running
    assert running["errors"] == ["image_fetch_failed 3"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script('document.getElementById("batch-progress").scrollIntoView()')
    assert browser.save_screenshot(str(CONSOLE_SCREENSHOT))

    held_image.release.set()
    end = wait_until(browser, lambda driver: (s := batch_shown(driver))["text"] == "6 of 6 ended (100%)" and s)
    assert end["eta"] == "done: every item ended" and len(failed_items(browser)) == 3

    # Another view closes the batch's: its follow stops; back in the batches view, an ended batch is not read again.
    reads = len(reads_of(browser, f"/v1/batches/{batch_id}"))
    show_view(browser, "ask")
    show_view(browser, "batches")
    assert len(reads_of(browser, f"/v1/batches/{batch_id}")) == reads
    assert script_errors(browser) == []
