"""Single jobs: 16 clients each doing submit-then-poll against the real service, side by side with its baselines.

    python -m benchmarks.single_jobs [--jobs 600] [--clients 16] [--smoke]

In one run on one machine: (1) the service (its own Redis, the API under gunicorn, one worker with the shipped demo
model) answering easy-VQA questions sent as uploads by `--clients` threads that each submit and wait (the Python
client's `ask`: long polls, `GET /v1/jobs/<id>?wait=`); (2) a bare Celery round trip (`delay` + `get` of a no-op
task with blipq's own Celery configuration, same Redis, one prefork worker process, the same number of threads); (3)
the same questions answered in this process by the inference core, one at a time. Prints jobs/s, the ratio service /
bare Celery (goal >= 1), and the latency the service adds over a direct call at p50 and p99. `--smoke`: 4 jobs, 2
clients.
"""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks.fleet import (
    Fleet,
    load_items,
    noop_celery_rate,
    percentile,
    run_clients,
    wait_until_serving,
)
from blipq.client import BlipqClient


def direct_latencies(items: list[tuple[bytes, str, str]]) -> list[float]:
    """Each question answered in this process by the inference core (decode + generate), one at a time."""
    import torch

    from contract.images import decode_image
    from worker.inference import answer_questions, load_model
    from worker.settings import DEMO_MODEL_DIR

    torch.set_num_threads(1)  # as the worker (BLIPQ_TORCH_THREADS=1)
    loaded = load_model(str(DEMO_MODEL_DIR), device="cpu", dtype="float32")
    latencies = []
    for image, question, _ in items:
        started = time.perf_counter()
        answer_questions(loaded, [decode_image(image, 10**6)], [question])
        latencies.append(time.perf_counter() - started)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="4 jobs from 2 clients: the path end to end in seconds")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.clients = 4, 2

    items = load_items(args.jobs)
    direct = direct_latencies(items)
    fleet = Fleet(1, time_limit_s=300)
    try:
        wait_until_serving(fleet, items[0])
        client = BlipqClient(fleet.base)

        def ask(index: int) -> None:
            image, question, expected = items[index]
            assert client.ask(image, question, timeout_s=120) == expected

        service_s, service_latencies = run_clients(args.clients, args.jobs, ask)
        celery_rate = noop_celery_rate(fleet, args.jobs, args.clients)
    finally:
        fleet.stop()

    service_rate = args.jobs / service_s
    print(f"{args.jobs} jobs, {args.clients} clients, demo model, one worker (BLIPQ_TORCH_THREADS=1), this machine")
    print(f"service (upload, submit-then-poll)  {service_rate:7.1f} jobs/s")
    print(f"bare Celery round trip (no-op)      {celery_rate:7.1f} tasks/s")
    print(f"ratio service / bare Celery         {service_rate / celery_rate:7.2f}   (goal >= 1)")
    for name, fraction in (("p50", 0.5), ("p99", 0.99)):
        service_p, direct_p = percentile(service_latencies, fraction), percentile(direct, fraction)
        print(
            f"{name} latency: service {service_p * 1000:6.1f} ms, direct in-process {direct_p * 1000:6.1f} ms,"
            f" added {1000 * (service_p - direct_p):6.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
