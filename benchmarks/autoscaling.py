"""Autoscaling policies compared on bursty traces: a discrete-event model of KEDA's control loop over a GPU fleet.

    python -m benchmarks.autoscaling [--hours 6] [--start-up-s 120] [--seed 1] [--smoke]

Two policies scale the same fleet, through the same HPA arithmetic (replicas = ceil(metric / target), up at once,
down only to the highest count asked for in the last `--stabilization-s`, never below 1 or above `--max-workers`):
- **count**: the metric is the answers the fleet has in hand, queued and running (the trigger deploy/k8s/keda.yaml
  had before it scaled on drain time, whose target was 4 per worker);
- **drain**: the metric is the seconds one worker needs for the backlog: its images at the seconds per image the fleet
  measured over the last minute (fetch, decode, resize: the worker's stage counters), plus its answers at the
  seconds per answer (the model and the bookkeeping); its target is the drain time wanted less the time a new worker
  takes to start (`--target-drain-s` - `--start-up-s`): a worker asked for now helps only once it has loaded.
A worker that is still loading its model is never scaled away.

The work is a mix of job classes whose cost per answer differs by 50x, measured on this machine with one demo worker
(docs/performance.md): a camera photo with one question (10.8 answers/s per worker), a photo with ten (97 answers/s)
and a small picture with ten (552 answers/s). Each trace is seeded: single photo jobs all
day (a Poisson stream whose rate swings over the day), and tagging batches of each class at random times. The queue is
one FIFO served as a fluid: between two events each ready worker does one second of work per second.

For each trace it prints the p95 wait (arrival to answer, over answers) and the worker-hours (loading included) of:
the count policy at the manifests' target, the drain policy, and the count policy at the target that spends the same
worker-hours as the drain policy (found by bisection), which is the fair comparison. `--smoke`: one short trace.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

# What one demo worker spends, in seconds, measured on this machine (`tagging --photos 100` and the easy-VQA tagging
# run, docs/performance.md): per answer (the model and the bookkeeping), and per image before its first answer (the
# fetch, decode and resize), for a camera photo and for a small picture. They give the answers/s per worker of each
# job class: a photo with one question 10.8, a photo with ten 97.2, a small picture with ten 552.7.
ANSWER_S = 0.00114
IMAGE_S = {"photo": 0.0914, "small": 0.0067}
CLASSES = {"photo x1": ("photo", 1), "photo x10": ("photo", 10), "small x10": ("small", 10)}
COUNT_TARGET = 4  # answers in hand per worker: deploy/k8s/keda.yaml's former threshold
POLL_S = 15  # KEDA's pollingInterval in deploy/k8s/keda.yaml
RATE_WINDOW_S = 60  # the window over which the fleet measures its seconds per image and per answer
SLICES = 20  # a group of answers is counted as this many equal parts for the percentile


@dataclass
class Group:
    """Images with their questions that arrived together (one job, or one batch), served in order."""

    arrived: float
    images: int
    questions: int  # per image
    image_s: float
    started: float | None = None
    work_left: float = 0.0

    def __post_init__(self) -> None:
        self.work_left = self.images * self.cost_per_image()

    @property
    def answers(self) -> int:
        return self.images * self.questions

    def cost_per_image(self) -> float:
        return self.image_s + self.questions * ANSWER_S

    def left(self) -> tuple[float, float]:
        """The images and answers not yet done (a fluid: fractions of an image count)."""
        images = self.work_left / self.cost_per_image()
        return images, images * self.questions


@dataclass(frozen=True)
class Policy:
    kind: str  # "count" or "drain"
    target: float


@dataclass
class Outcome:
    waits: list[tuple[float, float]] = field(default_factory=list)  # (wait s, answers)
    worker_seconds: float = 0.0
    peak_workers: int = 0

    def p95_wait(self) -> float:
        total = sum(weight for _, weight in self.waits)
        seen = 0.0
        for wait, weight in sorted(self.waits):
            seen += weight
            if seen >= 0.95 * total:
                return wait
        return 0.0


def trace(hours: float, seed: int) -> list[Group]:
    """Single photo jobs all day (their rate swinging between 0.2 and 1.8 per second), and tagging batches."""
    rng = random.Random(seed)
    end, groups, now = hours * 3600, [], 0.0
    while now < end:
        rate = 1.0 + 0.8 * math.sin(2 * math.pi * now / (3 * 3600))
        now += rng.expovariate(rate)
        groups.append(Group(now, 1, 1, IMAGE_S["photo"]))
    answers = {"photo x1": 3_000, "photo x10": 20_000, "small x10": 60_000}
    now = 0.0
    while (now := now + rng.expovariate(1 / 1200)) < end:  # a batch every 20 minutes on average
        name = rng.choice(list(answers))
        picture, questions = CLASSES[name]
        images = int(answers[name] * rng.uniform(0.5, 1.5)) // questions
        groups.append(Group(now, images, questions, IMAGE_S[picture]))
    return sorted(groups, key=lambda group: group.arrived)


class Fleet:
    """The workers, the queue and the control loop of one simulated run."""

    def __init__(self, policy: Policy, start_up_s: float, max_workers: int, stabilization_s: float) -> None:
        self.policy, self.start_up_s, self.max_workers = policy, start_up_s, max_workers
        self.stabilization_s = stabilization_s
        self.queue: deque[Group] = deque()
        self.ready, self.loading = 1, list[float]()  # loading: when each loading worker is ready (a heap)
        self.asked: deque[tuple[float, int]] = deque()  # (time, replicas asked) in the stabilization window
        self.done: deque[tuple[float, float, float, float]] = deque()  # (time, images, answers, image seconds)
        # What the fleet measured: seconds per image before its answers, and per answer (until it measures: photos)
        self.image_s, self.answer_s = IMAGE_S["photo"], ANSWER_S
        self.outcome = Outcome()

    def serve(self, now: float, until: float) -> None:
        """Serve the queue as a fluid from `now` to `until`: each ready worker does one second of work per second."""
        capacity, t = self.ready * (until - now), now
        images = answers = image_seconds = 0.0
        while self.queue and capacity > 1e-12 and self.ready:
            head = self.queue[0]
            head.started = t if head.started is None else head.started
            used = min(capacity, head.work_left)
            head.work_left -= used
            capacity -= used
            t += used / self.ready
            part = used / head.cost_per_image()
            images, answers, image_seconds = (
                images + part,
                answers + part * head.questions,
                image_seconds + part * head.image_s,
            )
            if head.work_left <= 1e-9:
                self.queue.popleft()
                for slice_ in range(SLICES):  # its answers end evenly between its start and its end
                    ended = head.started + (t - head.started) * (slice_ + 1) / SLICES
                    self.outcome.waits.append((ended - head.arrived, head.answers / SLICES))
        self.done.append((until, images, answers, image_seconds))
        self.outcome.worker_seconds += (self.ready + len(self.loading)) * (until - now)

    def start_loaded_workers(self, now: float) -> None:
        while self.loading and self.loading[0] <= now:
            heapq.heappop(self.loading)
            self.ready += 1

    def backlog_metric(self, now: float) -> float:
        """What the policy scales on: the answers in hand, or the seconds of one worker's work they take."""
        lefts = [group.left() for group in self.queue]
        images, answers = sum(left[0] for left in lefts), sum(left[1] for left in lefts)
        if self.policy.kind == "count":
            return answers
        while self.done and self.done[0][0] < now - RATE_WINDOW_S:
            self.done.popleft()
        done_images, image_seconds = (sum(d[i] for d in self.done) for i in (1, 3))
        if done_images > 1:
            self.image_s = image_seconds / done_images
        return images * self.image_s + answers * self.answer_s

    def scale(self, now: float) -> None:
        """One look of the autoscaler: replicas = ceil(metric / target), up at once, down only to the most asked for
        in the stabilization window; a loading worker is never scaled away."""
        wanted = min(self.max_workers, max(1, math.ceil(self.backlog_metric(now) / self.policy.target)))
        self.asked.append((now, wanted))
        while self.asked[0][0] < now - self.stabilization_s:
            self.asked.popleft()
        current = self.ready + len(self.loading)
        if wanted > current:
            for _ in range(wanted - current):
                heapq.heappush(self.loading, now + self.start_up_s)
        else:
            keep = max(count for _, count in self.asked)
            self.ready = max(min(self.ready, keep - len(self.loading)), 0)
        self.outcome.peak_workers = max(self.outcome.peak_workers, self.ready + len(self.loading))


def simulate(
    groups: list[Group], policy: Policy, start_up_s: float, max_workers: int, stabilization_s: float
) -> Outcome:
    """Run the control loop over the trace, event to event (arrivals, the autoscaler's looks, workers loaded)."""
    fleet = Fleet(policy, start_up_s, max_workers, stabilization_s)
    pending = deque(Group(g.arrived, g.images, g.questions, g.image_s) for g in groups)
    now, next_look, end = 0.0, 0.0, groups[-1].arrived if groups else 0.0
    while pending or fleet.queue or now < end:
        until = min([next_look, *fleet.loading[:1], *(pending[0].arrived for _ in range(bool(pending)))])
        fleet.serve(now, until)
        now = until
        while pending and pending[0].arrived <= now:
            fleet.queue.append(pending.popleft())
        fleet.start_loaded_workers(now)
        if now >= next_look:
            next_look = now + POLL_S
            fleet.scale(now)
    return fleet.outcome


def matched_count_target(
    groups: list[Group], worker_seconds: float, start_up_s: float, max_workers: int, stabilization_s: float
) -> tuple[float, Outcome]:
    """The count target whose worker-seconds are those given (at most), by bisection on a log scale."""
    low, high = 1.0, 1e6
    best = (high, simulate(groups, Policy("count", high), start_up_s, max_workers, stabilization_s))
    for _ in range(25):
        middle = math.sqrt(low * high)
        run = simulate(groups, Policy("count", middle), start_up_s, max_workers, stabilization_s)
        if run.worker_seconds <= worker_seconds:
            high, best = middle, (middle, run)
        else:
            low = middle
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=6.0)
    parser.add_argument("--traces", type=int, default=5, help="seeded traces, each its own seed")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start-up-s", type=float, default=120.0, help="a new worker's start, model load included")
    parser.add_argument("--target-drain-s", type=float, default=300.0)
    parser.add_argument("--max-workers", type=int, default=8)
    parser.add_argument("--stabilization-s", type=float, default=300.0, help="the HPA's scale-down window")
    parser.add_argument("--smoke", action="store_true", help="one 1-hour trace")
    args = parser.parse_args()
    if args.smoke:
        args.hours, args.traces = 1.0, 1
    if args.target_drain_s <= args.start_up_s:
        parser.error("--target-drain-s must be longer than --start-up-s: a new worker helps only once it has loaded")
    drain = Policy("drain", args.target_drain_s - args.start_up_s)
    count = Policy("count", COUNT_TARGET)
    print(
        f"{args.traces} traces of {args.hours:g} h; a worker starts in {args.start_up_s:g} s; at most "
        f"{args.max_workers} workers; drain target {args.target_drain_s:g} s; count target {COUNT_TARGET} answers"
    )
    print(f"{'trace':>5} | {'policy':<36} | {'p95 wait s':>10} | {'worker-hours':>12} | {'peak':>4}")
    wins = 0
    for index in range(args.traces):
        groups = trace(args.hours, args.seed + index)
        runs = {
            "count at 4 (the manifests)": simulate(
                groups, count, args.start_up_s, args.max_workers, args.stabilization_s
            )
        }
        runs["drain"] = simulate(groups, drain, args.start_up_s, args.max_workers, args.stabilization_s)
        target, matched = matched_count_target(
            groups, runs["drain"].worker_seconds, args.start_up_s, args.max_workers, args.stabilization_s
        )
        runs[f"count at {target:,.0f} (same worker-hours)"] = matched
        for name, run in runs.items():
            hours = run.worker_seconds / 3600
            print(f"{index + 1:>5} | {name:<36} | {run.p95_wait():>10.1f} | {hours:>12.2f} | {run.peak_workers:>4}")
        wins += runs["drain"].p95_wait() <= matched.p95_wait()
    print(f"drain beats count at the same worker-hours on p95 wait: {wins} of {args.traces} traces")


if __name__ == "__main__":
    main()
