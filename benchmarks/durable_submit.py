"""What durable acceptance costs per submission: the same API answering 202 with and without a replica's WAIT.

    python -m benchmarks.durable_submit [--jobs 1000] [--rounds 3] [--smoke]

Starts a Redis primary and one replica (its own, on free ports) and two instances of the real API app in this
process, identical but for BLIPQ_MIN_REPLICAS_ACK (0 and 1); submits the same JSON job (an image URL and a question,
on a queue no worker reads) to each in turn, one submission each, through Flask's test client (the API's own work
and its Redis round trips, without an HTTP server's). Both run with BLIPQ_WAIT_FOR_WORKERS=on, so that a queue with
no worker accepts jobs: a worker would take them off the queue and spend the same two cores. The WAIT may take up to
REPLICA_ACK_TIMEOUT_MS, well past the service's default, so that a replica slowed by a busy machine shows as time,
not as a refused submission. Prints the median time per submission of each, and the ratio. About half a minute on a
2-core machine; `--smoke`, 20 submissions each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from api.admission import queue_names
from api.app import create_app
from api.settings import ApiSettings
from blipq.up_redis import replica_in_sync, start_redis

QUEUE = "durable-bench"
REPLICA_ACK_TIMEOUT_MS = 10_000
BODY = {"image_url": "https://example.com/cat.jpg", "question": "what is in the picture?"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000, help="submissions to each instance per round (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the queue emptied after each (default 3)")
    parser.add_argument("--smoke", action="store_true", help="20 submissions to each instance, one round")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.rounds = 20, 1

    data = Path(tempfile.mkdtemp(prefix="blipq-durable-"))
    primary = start_redis(data / "primary")
    replica = start_redis(data / "replica", replica_of=primary.port)
    try:
        while not replica_in_sync(replica):
            time.sleep(0.05)
        clients = {
            replicas: create_app(
                ApiSettings(
                    redis_url=primary.url,
                    queue=QUEUE,
                    min_replicas_ack=replicas,
                    replica_ack_timeout_ms=REPLICA_ACK_TIMEOUT_MS,
                    max_queue_depth=0,
                    wait_for_workers=True,
                )
            ).test_client()
            for replicas in (0, 1)
        }
        timings: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(args.rounds):
            for _ in range(args.jobs):
                for replicas, client in clients.items():  # one of each in turn: a busy moment weighs on both
                    started = time.perf_counter()
                    response = client.post("/v1/jobs", json=BODY)
                    timings[replicas].append(time.perf_counter() - started)
                    if response.status_code != 202:
                        raise RuntimeError(f"a submission was answered {response.status_code}: {response.get_json()}")
            # The queue is nobody's: empty it between rounds, so that its depth does not grow across the run.
            store = clients[0].application.extensions["blipq"].store
            store.client.delete(*queue_names(QUEUE))
        plain, durable = (statistics.median(timings[n]) * 1000 for n in (0, 1))
        print(f"submissions: {args.jobs} x {args.rounds} rounds per instance, JSON with an image URL")
        print(f"BLIPQ_MIN_REPLICAS_ACK=0   median {plain:.3f} ms per submission")
        print(f"BLIPQ_MIN_REPLICAS_ACK=1   median {durable:.3f} ms per submission (replica on the same machine)")
        print(f"cost of WAIT               {durable - plain:+.3f} ms, ratio {durable / plain:.2f}")
    finally:
        replica.stop()
        primary.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
