"""How far the end estimates are from the ends: the real service (its own Redis, the API under gunicorn, workers with
the demo model) under a mixed workload of single jobs and batches of three sizes at two priorities, arriving faster
than the fleet drains them for a while (so that lines form), then drained.

A run opens with a burst of the largest batches worth `--backlog-s` seconds of the fleet's work, sent from several
threads at once: a client uploading one request at a time does not outpace even one worker, and without a line the
ends are mostly each answer's fixed latency (upload, broker hop, decode), which no queue-based estimate counts.

For each submission: the 202's estimate (`ends_in_s`), and the end it had (a job's `finished_at`; a batch's, seen by a
watcher that reads the outstanding batches every WATCH_S). Also, once the fleet has run a minute (its workers' rates
measured over a full minute), one read of every submission not yet ended, against the time it still took. The
figure is the relative error |estimated - actual| / actual: median and 90th percentile, for jobs and for batches.

    python -m benchmarks.estimates [--backlog-s 30] [--submit-s 100]   # about 3 minutes on 2 cores
    python -m benchmarks.estimates --smoke    # seconds: the same, tiny
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

import requests

from benchmarks.fleet import Fleet, percentile, wait_until_serving

BATCH_SHAPES = ((2, 2), (4, 4), (6, 8))  # images x questions: 4, 16 and 48 answers
BATCH_SHARE = 0.25  # of the submissions
HIGH_SHARE = 0.25  # of the submissions, at priority high (the others normal)
OVERLOAD = 1.4  # the arrivals' answers per second, over the fleet's measured rate
WATCH_S = 0.1  # between two reads of the outstanding batches
MINUTE_S = 60.0  # the fleet has run this long before the second read


@dataclass
class Submission:
    kind: str  # "job" or "batch"
    id: str
    answers: int
    priority: str
    sent: float  # epoch seconds, when the 202 came
    estimate_s: float | None  # the 202's ends_in_s
    ended: float | None = None
    later: list[tuple[float, float]] = field(default_factory=list)  # (when read, ends_in_s) of the read after a minute


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def png_images(count: int) -> list[tuple[bytes, str]]:
    """`count` easy-VQA test images as PNG bytes, each with a question about it."""
    from easy_vqa import get_test_image_paths, get_test_questions
    from PIL import Image

    questions, _, image_ids = get_test_questions()
    paths = get_test_image_paths()
    images = []
    for question, image_id in list(zip(questions, image_ids, strict=True))[:count]:
        buffer = io.BytesIO()
        Image.open(paths[image_id]).convert("RGB").save(buffer, format="PNG")
        images.append((buffer.getvalue(), question))
    return images


def submit(base: str, kind: str, priority: str, images: list[tuple[bytes, str]], shape: tuple[int, int]) -> Submission:
    if kind == "job":
        image, question = images[0]
        form = {"question": question, "priority": priority}
        response = requests.post(f"{base}/v1/jobs", data=form, files={"image": ("q.png", image)}, timeout=30)
        answers = 1
    else:
        count, asked = shape
        questions = [question for _, question in images[:asked]]
        files = [("images", (f"{n}.png", image)) for n, (image, _) in enumerate(images[:count])]
        form = {"questions": json.dumps(questions), "priority": priority}
        response = requests.post(f"{base}/v1/batches", data=form, files=files, timeout=30)
        answers = count * len(questions)
    response.raise_for_status()
    body = response.json()
    estimate = body["estimate"]
    return Submission(kind, body["id"], answers, priority, time.time(), estimate and estimate["ends_in_s"])


def read_estimate(base: str, submission: Submission) -> float | None:
    path = "jobs" if submission.kind == "job" else "batches"
    estimate = requests.get(f"{base}/v1/{path}/{submission.id}", timeout=30).json()["estimate"]
    return None if estimate is None else estimate["ends_in_s"]


def fleet_rate(base: str, images: list[tuple[bytes, str]]) -> float:
    """The fleet's answers per second as the estimates read it, once a worker published a measured rate."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        warm = submit(base, "batch", "normal", images, (4, 4))
        rate = requests.get(f"{base}/v1/batches/{warm.id}", timeout=30).json()["estimate"]
        while requests.get(f"{base}/v1/batches/{warm.id}", timeout=30).json()["estimate"] is not None:
            time.sleep(0.2)
        if rate is not None and rate["answers_per_s"]:
            return float(rate["answers_per_s"])
    raise RuntimeError("no worker published a rate")


class Watcher(threading.Thread):
    """Records when each batch ended (a batch shows no end time of its own)."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base, self.batches, self.lock, self.done = base, list[Submission](), threading.Lock(), threading.Event()

    def run(self) -> None:
        while not self.done.wait(WATCH_S):
            with self.lock:
                open_batches = [batch for batch in self.batches if batch.ended is None]
            for batch in open_batches:
                if requests.get(f"{self.base}/v1/batches/{batch.id}", timeout=30).json()["estimate"] is None:
                    batch.ended = time.time()


BURST_THREADS = 4  # the burst's submitting threads


def burst(base: str, images: list[tuple[bytes, str]], answers: float) -> list[Submission]:
    """Batches of the largest shape, `answers` of them in all, sent from BURST_THREADS threads at once."""
    shape = BATCH_SHAPES[-1]
    count = max(1, round(answers / (shape[0] * shape[1])))
    with ThreadPoolExecutor(BURST_THREADS) as pool:
        return list(pool.map(lambda _: submit(base, "batch", "normal", images, shape), range(count)))


def run(workers: int, submit_s: float, minute_s: float, seed: int, backlog_s: float) -> list[Submission]:
    fleet = Fleet(workers, time_limit_s=120, env={"BLIPQ_ANNOUNCE_INTERVAL_S": "1"})
    try:
        images = png_images(8)
        wait_until_serving(fleet, (images[0][0], images[0][1], ""))
        rate = fleet_rate(fleet.base, images)
        started = time.time()  # the fleet's minute counts from its first answers (the warm-up's)
        print(f"fleet: {workers} workers, measured {rate:.1f} answers/s; arrivals at {OVERLOAD:g}x for {submit_s:g} s")
        randomness = random.Random(seed)
        mean_answers = (1 - BATCH_SHARE) + BATCH_SHARE * statistics.mean(a * b for a, b in BATCH_SHAPES)
        gap_s = mean_answers / (OVERLOAD * rate)
        watcher = Watcher(fleet.base)
        watcher.start()
        submissions = burst(fleet.base, images, backlog_s * rate)
        with watcher.lock:
            watcher.batches.extend(submissions)
        print(f"burst: {len(submissions)} batches, {sum(s.answers for s in submissions)} answers")
        read_later = False
        next_at = time.time()
        while time.time() < started + submit_s or not read_later:
            if not read_later and time.time() >= started + minute_s:
                for submission in submissions:
                    if submission.ended is None and (estimate := read_estimate(fleet.base, submission)) is not None:
                        submission.later.append((time.time(), estimate))
                read_later = True
            if time.time() >= started + submit_s:
                time.sleep(0.05)
                continue
            kind = "batch" if randomness.random() < BATCH_SHARE else "job"
            priority = "high" if randomness.random() < HIGH_SHARE else "normal"
            shape = randomness.choice(BATCH_SHAPES)
            randomness.shuffle(images)
            submission = submit(fleet.base, kind, priority, images, shape)
            submissions.append(submission)
            if kind == "batch":
                with watcher.lock:
                    watcher.batches.append(submission)
            next_at += randomness.expovariate(1 / gap_s)
            time.sleep(max(0.0, next_at - time.time()))
        deadline = time.monotonic() + 600
        for submission in submissions:
            if submission.kind == "job":
                while (job := requests.get(f"{fleet.base}/v1/jobs/{submission.id}", timeout=30).json())[
                    "finished_at"
                ] is None:
                    assert time.monotonic() < deadline, "the jobs did not end"
                    time.sleep(0.2)
                submission.ended = epoch(job["finished_at"])
            while submission.ended is None:
                assert time.monotonic() < deadline, "the batches did not end"
                time.sleep(0.2)
        watcher.done.set()
        return submissions
    finally:
        fleet.stop()


def errors(pairs: list[tuple[float, float]]) -> str:
    """Median and p90 of |estimated - actual| / actual over (estimated, actual) pairs."""
    relative = [abs(estimated - actual) / max(actual, 0.05) for estimated, actual in pairs]
    if not relative:
        return "none"
    return f"n={len(relative):3d}  median {statistics.median(relative):.2f}  p90 {percentile(relative, 0.9):.2f}"


def report(submissions: list[Submission], minute_s: float) -> None:
    first = min(submission.sent for submission in submissions)
    for kind, label in (("job", "jobs"), ("batch", "batches")):
        mine = [s for s in submissions if s.kind == kind and s.ended is not None]
        accepted = [(s.estimate_s, s.ended - s.sent) for s in mine if s.estimate_s is not None]  # type: ignore[operator]
        warm = [
            (s.estimate_s, s.ended - s.sent)  # type: ignore[operator]
            for s in mine
            if s.estimate_s is not None and s.sent - first >= minute_s
        ]
        later = [(estimate, s.ended - when) for s in mine for when, estimate in s.later]  # type: ignore[operator]
        print(f"{label:7s} the 202's estimate:                      {errors(accepted)}")
        print(f"{label:7s} the 202's, once the fleet ran a minute:   {errors(warm)}")
        print(f"{label:7s} a read once the fleet ran a minute:       {errors(later)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a run of seconds")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--submit-s", type=float, default=100.0, help="how long submissions arrive")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--backlog-s", type=float, default=30.0, help="the opening burst, in seconds of the fleet's work"
    )
    args = parser.parse_args()
    submit_s, minute_s, backlog_s = (4.0, 2.0, 1.0) if args.smoke else (args.submit_s, MINUTE_S, args.backlog_s)
    submissions = run(args.workers, submit_s, minute_s, args.seed, backlog_s)
    report(submissions, minute_s)
    print(f"submissions: {len(submissions)}, answers: {sum(s.answers for s in submissions)}")


if __name__ == "__main__":
    main()
