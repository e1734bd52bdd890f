"""The web page at `/`, in a real headless Chromium against the running service: a real Redis, a worker serving the
shipped demo model, a captioning worker, and the API over real HTTP.

Given the page: an uploaded image gets the model's answer, a URL that cannot be fetched shows the failure's code, a
refused submission shows the API's error, and the recent jobs are kept across a reload; in caption mode the page
sends `task=caption` and shows the caption; a batch started from the page is followed to its end, its progress bar
stopping where the test holds its images, and its results are downloaded; the fleet panel shows each task's workers
and the answers per second it measured; with API keys on, everything goes with the key typed in the page, and another
key's batch is not found. Screenshots go to tests/artifacts/. The fixtures are tests/conftest.py's; the console's live
parts (long polls, uploads, failed items, estimates) are tests/deploy/test_web_console.py's.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from api.app import create_app
from api.auth import ApiKey, hash_api_key, new_api_key
from api.settings import ApiSettings
from blipq.up_redis import RedisProcess, stop_process
from contract.fleet import fleet_client, live_workers
from tests.support.browser import (
    ARTIFACTS,
    BATCH_QUESTIONS,
    ESTIMATE_WORDS,
    EXAMPLE_IMAGE,
    EXAMPLES,
    Fleet,
    ask,
    batch_shown,
    download_results,
    open_page,
    page_settings,
    recent_jobs,
    script_errors,
    show_view,
    submit_batch,
    wait_until,
)
from tests.support.service import (
    JOB_TIMEOUT_S,
    HeldImage,
    ImageServer,
    QuietHandler,
    WorkerProcess,
    http_server,
    serve_app,
    start_worker,
    wait_for_worker_record,
)
from worker.settings import DEMO_CAPTION_MODEL_DIR

SCREENSHOT = ARTIFACTS / "web-page.png"
FAILURE_SCREENSHOT = ARTIFACTS / "web-page-failure.png"
CAPTION_SCREENSHOT = ARTIFACTS / "web-page-caption.png"
BATCH_SCREENSHOT = ARTIFACTS / "web-page-batch.png"
FLEET_SCREENSHOT = ARTIFACTS / "web-page-fleet.png"
KEY = new_api_key()
OTHER_KEY = new_api_key()

# The batch: every question about every image. The API cuts it into chunks of one image each (its questions), so
# that holding an image holds exactly its own items.
BATCH_IMAGES = 24
# The last images, held until the test saw the bar stop part-way: fewer than the worker's 8 fetch threads, so that
# their held downloads never take every thread from the other images'.
BATCH_HELD = 4
BATCH_COLORS = ("red", "blue", "green")  # image n is EXAMPLE_SHAPES[n % 3]
EXAMPLE_SHAPES = ("red-circle.png", "blue-triangle.png", "green-rectangle.png")


@pytest.fixture(scope="module")
def keyed_service(fleet: Fleet) -> Iterator[str]:
    """The API with two API keys configured, KEY and OTHER_KEY."""
    keys = (ApiKey("web-page", hash_api_key(KEY)), ApiKey("other", hash_api_key(OTHER_KEY)))
    yield from serve_app(page_settings(fleet, api_keys=keys))


@dataclass
class HeldImages:
    """An HTTP server of the batch's images, /batch/<n>.png, each answered only once its gate is open: images
    before BATCH_IMAGES - BATCH_HELD wait for `first`, the others for `rest`."""

    port: int
    first: threading.Event
    rest: threading.Event

    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.port}/batch/{number}.png" for number in range(BATCH_IMAGES)]


@pytest.fixture
def held_images() -> Iterator[HeldImages]:
    bodies = [(EXAMPLES / name).read_bytes() for name in EXAMPLE_SHAPES]
    first, rest = threading.Event(), threading.Event()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            match = re.fullmatch(r"/batch/(\d+)\.png", self.path)
            if not match or int(match[1]) >= BATCH_IMAGES:
                self.answer(404, "text/plain", b"not found")
                return
            number = int(match[1])
            gate = first if number < BATCH_IMAGES - BATCH_HELD else rest
            if not gate.wait(JOB_TIMEOUT_S):  # never opened: the test failed; the worker's fetch times out
                return
            self.answer(200, "image/png", bodies[number % len(bodies)])

    with http_server(Handler) as port:
        try:
            yield HeldImages(port, first, rest)
        finally:
            first.set()  # a failed test leaves no request waiting
            rest.set()


def test_the_page_answers_an_upload_shows_failures_and_keeps_recent_jobs(
    browser: Any, service: str, fleet: Fleet, image_server: ImageServer
) -> None:
    fleet.ready()
    open_page(browser, service)
    assert recent_jobs(browser) == []

    # An uploaded image: the model's answer, after the statuses the job went through.
    answered = ask(browser, "what color is the shape?", image_file=str(EXAMPLE_IMAGE))
    assert answered["status"] == "succeeded", answered
    assert answered["answer"] == "red"
    assert answered["task"] == "question" and answered["answer_label"] == "Answer"
    assert answered["timeline"][0].startswith("queued") and answered["timeline"][-1].startswith("succeeded")
    stored = requests.get(f"{service}/v1/jobs/{answered['job_id']}", timeout=10).json()
    assert stored["answer"] == answered["answer"] and stored["status"] == "succeeded" and stored["task"] == "vqa"

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


def test_the_page_captions_an_image_and_lists_both_kinds_of_jobs(browser: Any, service: str, fleet: Fleet) -> None:
    from selenium.webdriver.common.by import By

    fleet.ready()
    open_page(browser, service)
    question = ask(browser, "what color is the shape?", image_file=str(EXAMPLE_IMAGE))
    assert question["status"] == "succeeded" and question["answer"] == "red", question

    # The task switch: for captions, the question gives way to an optional prompt.
    browser.find_element(By.ID, "task-caption").click()
    assert not browser.find_element(By.ID, "question").is_displayed()
    prompt_field = browser.find_element(By.ID, "prompt")
    assert prompt_field.is_displayed() and prompt_field.get_attribute("placeholder") == "a picture of"
    assert browser.find_element(By.ID, "submit").text == "Caption"

    # A caption without a prompt (the tiny captioner's words are arbitrary: some text), then one with a prompt.
    free = ask(browser, "", task="caption", image_file=str(EXAMPLE_IMAGE))
    assert free["status"] == "succeeded", free
    assert free["task"] == "caption" and free["answer_label"] == "Caption" and free["answer"].strip()
    stored = requests.get(f"{service}/v1/jobs/{free['job_id']}", timeout=10).json()
    assert (stored["task"], stored["question"], stored["prompt"]) == ("caption", None, None)
    assert " ".join(stored["answer"].split()) == free["answer"]  # as the browser renders it

    prompted = ask(browser, "a picture of", task="caption", image_file=str(EXAMPLE_IMAGE))
    assert prompted["status"] == "succeeded" and prompted["answer"].strip(), prompted
    stored = requests.get(f"{service}/v1/jobs/{prompted['job_id']}", timeout=10).json()
    assert (stored["task"], stored["prompt"]) == ("caption", "a picture of")
    assert browser.save_screenshot(str(CAPTION_SCREENSHOT))

    # The recent jobs hold both kinds, each with its task, and keep them across a reload.
    listed = [
        (
            item.get_attribute("data-task"),
            item.find_element(By.CLASS_NAME, "task").text,
            item.get_attribute("data-job-id"),
        )
        for item in browser.find_elements(By.CSS_SELECTOR, "#recent li")
    ]
    assert listed == [
        ("caption", "caption", prompted["job_id"]),
        ("caption", "caption", free["job_id"]),
        ("vqa", "question", question["job_id"]),
    ]
    assert [job["outcome"] for job in recent_jobs(browser)] == [prompted["answer"], free["answer"], "red"]
    assert [job["question"] for job in recent_jobs(browser)] == ["a picture of", "", "what color is the shape?"]
    browser.refresh()
    assert [job["job_id"] for job in recent_jobs(browser)] == [prompted["job_id"], free["job_id"], question["job_id"]]
    assert script_errors(browser) == []


@pytest.fixture(scope="module")
def demo_caption_service(
    redis_server: RedisProcess, web_worker: WorkerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The API with the shipped demo captioner behind captions, where that checkpoint is in the checkout."""
    if not (DEMO_CAPTION_MODEL_DIR / "config.json").is_file():
        pytest.skip(f"no demo captioner at {DEMO_CAPTION_MODEL_DIR}")
    log_path = tmp_path_factory.mktemp("logs") / "web-caption.log"
    worker = start_worker(redis_server.url, DEMO_CAPTION_MODEL_DIR, "web-caption", log_path, BLIPQ_TASK="caption")
    try:
        for each in (web_worker, worker):
            wait_for_worker_record(redis_server.url, each.queue, 1, each)
        yield from serve_app(
            ApiSettings(redis_url=redis_server.url, queue=web_worker.queue, caption_queue=worker.queue)
        )
    finally:
        stop_process(worker.process)


def test_the_demo_captioner_captions_the_red_circle_on_the_page(browser: Any, demo_caption_service: str) -> None:
    open_page(browser, demo_caption_service)
    captioned = ask(browser, "", task="caption", image_file=str(EXAMPLE_IMAGE))
    assert captioned["status"] == "succeeded" and captioned["task"] == "caption", captioned
    assert "red" in captioned["answer"] and "circle" in captioned["answer"], captioned


READ_FLEET_CARD = """
const card = document.querySelector(`#fleet-tasks [data-task="${arguments[0]}"]`);
if (!card) return null;
const text = (name) => (card.querySelector("." + name) || {textContent: ""}).textContent.trim();
const chart = card.querySelector(".chart");
return {
  count: text("workers-count"), queue: text("queue"), waiting: text("waiting"), outcomes: text("outcomes"),
  rate: text("rate"),
  peak: Number((chart && chart.dataset.peak) || 0),
  samples: Number((chart && chart.dataset.samples) || 0),
  rows: [...card.querySelectorAll(".workers tbody tr")].map((row) => [
    row.dataset.workerId,
    row.querySelector(".model").textContent.trim(),
    row.querySelector(".device").textContent.trim(),
  ]),
};
"""


def check_fleet_panel(browser: Any, fleet: Fleet) -> None:
    """The fleet panel shows each task's live workers as Redis lists them, and the answers per second it measured
    while the page was open (a batch ran meanwhile)."""
    show_view(browser, "fleet")
    records = fleet_client(fleet.redis_url)
    for task, worker in (("vqa", fleet.vqa), ("caption", fleet.caption)):
        expected = live_workers(records, worker.queue)
        card = wait_until(browser, lambda driver, task=task: driver.execute_script(READ_FLEET_CARD, task))
        assert (card["count"], card["queue"]) == ("1 worker", worker.queue), card
        assert card["rows"] == [[record.id, record.model, f"{record.device} · {record.dtype}"] for record in expected]

    # A poll after the batch's items ended saw the total grow: a rate above 0 on the chart; and, once the queue has
    # drained (an earlier test's work on the session's worker may still be ending), nothing waiting.
    def drained(driver: Any) -> dict[str, Any] | None:
        card: dict[str, Any] = driver.execute_script(READ_FLEET_CARD, "vqa")
        return card if card["peak"] > 0 and card["waiting"] == "0 answers waiting" else None

    vqa = wait_until(browser, drained)
    assert "blip-vqa-easy" in vqa["rows"][0][1] and vqa["samples"] >= 1
    assert re.search(r"succeeded \d+", vqa["outcomes"])
    assert re.fullmatch(r"Answers ended per second: [\d.]+ now, [\d.]+ at most in the last 5 minutes", vqa["rate"])
    assert browser.save_screenshot(str(FLEET_SCREENSHOT))


def test_the_batch_page_follows_a_running_batch_and_the_fleet_panel_shows_the_workers(
    browser: Any, service: str, fleet: Fleet, held_images: HeldImages, downloads: Path
) -> None:
    from selenium.webdriver.common.by import By

    fleet.ready()
    open_page(browser, service)
    count = BATCH_IMAGES * len(BATCH_QUESTIONS)
    held = BATCH_HELD * len(BATCH_QUESTIONS)
    # The fleet panel has read the answers ended so far before the batch: the batch's are a change it measures.
    wait_until(browser, lambda driver: driver.find_elements(By.CSS_SELECTOR, '#fleet-tasks [data-task="vqa"]'))

    batch_id = submit_batch(browser, held_images.urls(), list(BATCH_QUESTIONS))

    # Every image held: the bar at 0%, every item queued or running.
    def at_start(driver: Any) -> dict[str, Any] | None:
        shown = batch_shown(driver)
        started = shown["counts"]["queued"] + shown["counts"]["running"] == count
        return shown if started and shown["text"] == f"0 of {count} ended (0%)" else None

    start = wait_until(browser, at_start)
    assert start["progress"] == 0 and start["error"] is None and start["outcome"] == ""
    assert re.fullmatch(ESTIMATE_WORDS, start["eta"]), start

    # The first images let go: their items end, the last images' wait; the bar stops part-way.
    held_images.first.set()
    part = wait_until(browser, lambda driver: (s := batch_shown(driver))["text"].startswith(f"{count - held} of") and s)
    assert 0 < part["progress"] < 1 and part["progress"] == pytest.approx((count - held) / count)
    assert part["text"] == f"{count - held} of {count} ended ({(count - held) * 100 // count}%)"
    assert part["counts"]["succeeded"] == count - held, part
    assert part["counts"]["queued"] + part["counts"]["running"] == held, part
    assert re.fullmatch(r"\d+(\.\d)? items/s", part["rate"]), part
    assert re.fullmatch(ESTIMATE_WORDS, part["eta"]), part
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(BATCH_SCREENSHOT))

    # The rest let go: every item succeeded.
    held_images.rest.set()
    end = wait_until(
        browser, lambda driver: (s := batch_shown(driver))["text"] == f"{count} of {count} ended (100%)" and s
    )
    assert end["progress"] == 1 and end["eta"] == "done: every item ended"
    assert end["outcome"] == f"Every item ended: {count} succeeded."
    assert end["counts"] == {"queued": 0, "running": 0, "succeeded": count, "failed": 0, "canceled": 0, "expired": 0}
    assert end["errors"] == [] and browser.find_element(By.ID, "batch-errors-none").is_displayed()

    # The results link: the JSON Lines of every item, in item order, with the model's answers.
    lines = download_results(browser, downloads, batch_id, count)
    assert [line["index"] for line in lines] == list(range(count))
    assert {line["status"] for line in lines} == {"succeeded"}
    assert all(line["answer"] for line in lines)
    for line in lines:
        number = line["index"] // len(BATCH_QUESTIONS)
        assert (
            line["image_url"] == held_images.urls()[number] and line["question"] == BATCH_QUESTIONS[line["index"] % 3]
        )
        if line["question"] == "what color is the shape?":
            assert line["answer"] == BATCH_COLORS[number % 3], line

    # The fleet panel, open since before the batch, measured its answers.
    check_fleet_panel(browser, fleet)

    # The batch is remembered by this browser; its link opens it, and its URL again after a reload.
    show_view(browser, "batches")
    remembered = browser.find_element(By.CSS_SELECTOR, f'#recent-batches li[data-batch-id="{batch_id}"]')
    assert f"{count} of {count} ended" in remembered.text
    remembered.find_element(By.TAG_NAME, "a").click()
    assert browser.execute_script("return location.hash") == f"#batch={batch_id}"
    browser.refresh()
    reopened = wait_until(browser, lambda driver: (s := batch_shown(driver))["shown"] and s)
    assert reopened["id"] == batch_id and reopened["progress"] == 1 and reopened["eta"] == "done: every item ended"

    print(f"screenshots of the page: {BATCH_SCREENSHOT}, {FLEET_SCREENSHOT}")
    assert script_errors(browser) == []


def test_with_api_keys_the_page_loads_without_one_and_sends_the_key_typed_in_it(
    browser: Any, keyed_service: str, fleet: Fleet, image_server: ImageServer, downloads: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    fleet.ready()
    open_page(browser, keyed_service)

    # Without a key: the fleet panel says so; a job is refused, and the key field opens.
    show_view(browser, "fleet")
    wait_until(browser, lambda driver: driver.find_element(By.ID, "fleet-error-code").text == "api_key_missing")
    show_view(browser, "ask")
    refused = ask(browser, "what color is the shape?", image_file=str(EXAMPLE_IMAGE))
    assert refused["status"] == "refused" and refused["error_code"] == "api_key_missing"
    key_field = browser.find_element(By.ID, "api-key")
    assert key_field.is_displayed(), "the API key field is opened for the user to fill in"

    key_field.send_keys(KEY)
    answered = ask(browser, "what color is the shape?", image_file=str(EXAMPLE_IMAGE))
    assert answered["status"] == "succeeded" and answered["answer"] == "red"

    # With the key: the fleet panel, and a batch followed to its end and its results downloaded.
    show_view(browser, "fleet")
    wait_until(
        browser,
        lambda driver: driver.find_elements(By.CSS_SELECTOR, '#fleet-tasks [data-task="caption"] .workers tbody tr'),
    )
    assert not browser.find_element(By.ID, "fleet-error").is_displayed()
    image_server.routes["/web-page/red-circle.png"] = (200, "image/png", EXAMPLE_IMAGE.read_bytes())
    image_url = image_server.url("/web-page/red-circle.png")
    batch_id = submit_batch(browser, [image_url, image_url], ["what color is the shape?"])
    wait_until(browser, lambda driver: batch_shown(driver)["text"] == "2 of 2 ended (100%)")
    lines = download_results(browser, downloads, batch_id, 2)
    assert [(line["status"], line["answer"]) for line in lines] == [("succeeded", "red"), ("succeeded", "red")]
    assert requests.get(f"{keyed_service}/v1/batches/{batch_id}/results", timeout=10).status_code == 401

    browser.refresh()  # the key is kept in this browser
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == KEY
    assert [job["job_id"] for job in recent_jobs(browser)] == [answered["job_id"]]

    # Another key: the batch is another key's, so it is not found (the API does not say whose it is).
    browser.find_element(By.CSS_SELECTOR, "#key-box summary").click()
    key_field = browser.find_element(By.ID, "api-key")
    key_field.clear()
    key_field.send_keys(OTHER_KEY, Keys.TAB)  # the key is taken when the field loses focus
    browser.get(f"{keyed_service}/#batch={batch_id}")
    other = wait_until(browser, lambda driver: (s := batch_shown(driver))["error"] and s)
    assert other["error"] == "batch_not_found" and other["errorMessage"].startswith("not found"), other
    assert not other["shown"] and not browser.find_element(By.ID, "batch-results").is_displayed()
    assert script_errors(browser) == []


def test_the_fleet_panel_shows_each_keys_share_of_the_workers(
    browser: Any, keyed_service: str, fleet: Fleet, held_image: HeldImage
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # Given: the worker's hands full with one key's work on a held image, and both keys holding more behind it, in
    # their lines at the normal level
    fleet.ready()
    questions = ["what color is the shape?"]
    mine = {"images": [held_image.url] * 300, "questions": questions}
    others = {"images": [held_image.url] * 100, "questions": questions}
    batches = [
        requests.post(f"{keyed_service}/v1/batches", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        for body, key in ((mine, KEY), (others, OTHER_KEY))
    ]
    assert [batch.status_code for batch in batches] == [202, 202], [batch.text for batch in batches]
    assert held_image.requested.wait(JOB_TIMEOUT_S)

    # When: the fleet panel is opened with the first key
    open_page(browser, keyed_service)
    browser.find_element(By.CSS_SELECTOR, "#key-box summary").click()
    browser.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
    show_view(browser, "fleet")

    # Then: the task's card lists both keys with half the workers each; only this page's key is named
    rows_path = '#fleet-tasks [data-task="vqa"] .shares tbody tr'
    rows = wait_until(
        browser, lambda driver: len(found := driver.find_elements(By.CSS_SELECTOR, rows_path)) == 2 and found
    )
    shown = {
        row.get_attribute("data-yours"): [cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows
    }
    assert shown["true"][:2] == ["normal", "web-page (yours)"] and shown["true"][4] == "50 %", shown
    assert shown["false"][:2] == ["normal", "another key"] and shown["false"][4] == "50 %", shown
    assert re.fullmatch(r"\d+ answers", shown["false"][2]), shown

    # ...and once the image comes, both batches end and the table empties
    held_image.release.set()
    for batch, key in zip(batches, (KEY, OTHER_KEY), strict=True):
        wait_for_ended(f"{keyed_service}/v1/batches/{batch.json()['id']}", key)
    wait_until(
        browser, lambda driver: not driver.find_element(By.CSS_SELECTOR, '[data-task="vqa"] .shares').is_displayed()
    )
    assert script_errors(browser) == []


def wait_for_ended(url: str, key: str) -> None:
    """Long-poll a batch until every item ended."""
    headers = {"Authorization": f"Bearer {key}"}
    params: dict[str, int] = {"wait": 20}
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        counts = requests.get(url, params=params, headers=headers, timeout=30).json()["counts"]
        if counts["queued"] + counts["running"] == 0:
            return
        params["after"] = sum(counts[status] for status in ("succeeded", "failed", "canceled", "expired"))
    raise AssertionError(f"{url} did not end within {JOB_TIMEOUT_S} s")


def test_the_page_is_public_and_loads_nothing_from_elsewhere(redis_server: RedisProcess) -> None:
    keys = (ApiKey("web-page", hash_api_key(KEY)),)
    client = create_app(ApiSettings(redis_url=redis_server.url, api_keys=keys)).test_client()

    page = client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="(/page/[^"]+)"', html)
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert response.mimetype in ("text/javascript", "application/javascript", "text/css"), asset
    scripts = [asset for asset in assets if asset.endswith(".js")]
    assert scripts[-1] == "/page/page.js" and len(assets) == len(scripts) + 1, "the scripts, page.js last; one sheet"
    assert "<script>" not in html and "style=" not in html, "nothing inline: the policy below forbids it"
    policy = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy

    assert client.get("/page/../page.py").status_code == 404
    assert client.get("/v1/stats").status_code == 401, "the page is public, the API is not"
    assert client.get("/v1/models").status_code == 401, "so is the fleet the page shows"
    for asset in scripts:
        script = client.get(asset).get_data(as_text=True)
        assert "innerHTML" not in script and "insertAdjacentHTML" not in script, f"{asset}: text is set as text only"
