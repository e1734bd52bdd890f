"""Decoding threads against decoder processes, beside the worker's own Python: what worker/decoders.py is measured by.

    python -m benchmarks.decode_pool [--photos 60] [--python-ms 0 --python-ms 10] [--repeats 3]

The camera JPEGs of benchmarks/photos.py decoded to BLIP-base's 384 px input (contract.images.decode_for_model,
fast mode) on as many workers as this process may use cores, (1) by as many threads of this process, (2) by as many
of the worker's decoder processes (worker.decoders.DecoderPool: the bytes down a socket, the pixels back as raw
bytes), and the same on one. While they decode, one thread of this process spends --python-ms of CPU in pure Python
per image decoded, holding the GIL as a worker's fetching, scripts and model calls do: a decoding thread that returns
from Pillow's C code then waits for it. Prints images/s, each way's speed-up from one to all cores, and the share of
the cores' capacity it reached (ideal: every core busy decoding, the Python beside); medians of --repeats runs, the
ways taking turns.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from benchmarks.photos import describe, photo_set
from contract.images import decode_for_model
from worker.decoders import DecoderPool
from worker.stages import StageClock

SIZE = (384, 384)
BICUBIC = 3
MAX_PIXELS = 40_000_000

Submit = Callable[[bytes], "Future[object]"]  # one image handed to a way of decoding


def python_for(cpu_s: float) -> None:
    """Spend `cpu_s` of this thread's CPU in pure Python (the GIL held, but at the interpreter's switch interval)."""
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


def run(submit: Submit, images: Sequence[bytes], python_ms: float) -> float:
    """images/s: every image submitted at once, the Python of each done in this thread as it comes back."""
    done: queue.SimpleQueue[object] = queue.SimpleQueue()
    started = time.perf_counter()
    for image in images:
        submit(image).add_done_callback(lambda future: done.put(future.result()))
    for _ in images:
        done.get()
        python_for(python_ms / 1000)
    return len(images) / (time.perf_counter() - started)


def ways(cores: int) -> dict[str, tuple[Submit, Callable[[], object]]]:
    """Each way of decoding, by name and worker count: a call (on its own pool) and how to close that pool."""
    found: dict[str, tuple[Submit, Callable[[], object]]] = {}
    for count in sorted({1, cores}):
        threads = ThreadPoolExecutor(count)
        decoders = DecoderPool(count, StageClock()).start()
        found[f"threads x{count}"] = (
            lambda data, pool=threads: pool.submit(decode_for_model, data, SIZE, BICUBIC, MAX_PIXELS),
            threads.shutdown,
        )
        # The decoder pool blocks its caller: as the worker's fetch threads do, one thread per image calls it.
        callers = ThreadPoolExecutor(4 * count)
        found[f"processes x{count}"] = (
            lambda data, pool=decoders, callers=callers: callers.submit(pool.decode, data, SIZE, BICUBIC, MAX_PIXELS),
            lambda pool=decoders, callers=callers: (callers.shutdown(), pool.close()),
        )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=60, help="camera JPEGs (default 60)")
    parser.add_argument("--python-ms", type=float, action="append", help="Python per image (default 0 and 10)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each way (default 3)")
    parser.add_argument("--smoke", action="store_true", help="4 photos of the smoke mix (0.3 MP), one run of each")
    args = parser.parse_args(argv)
    if args.smoke:
        args.photos, args.repeats = 4, 1
    photos = photo_set("smoke" if args.smoke else "camera", args.photos)
    images = [path.read_bytes() for path in photos]
    cores = len(os.sched_getaffinity(0))
    started = time.process_time()
    for image in images:
        decode_for_model(image, SIZE, BICUBIC, MAX_PIXELS)
    decode_ms = 1000 * (time.process_time() - started) / len(images)
    print(f"camera JPEGs: {describe(photos)}; {decode_ms:.1f} ms of CPU each to 384 px; {cores} cores", flush=True)
    pools = ways(cores)
    try:
        for submit, _ in pools.values():  # decoders started, imports done
            run(submit, images[:4], 0)
        for python_ms in args.python_ms or [0.0, 10.0]:
            rates: dict[str, list[float]] = {name: [] for name in pools}
            for _ in range(args.repeats):
                for name, (submit, _) in pools.items():
                    rates[name].append(run(submit, images, python_ms))
            # With every core busy: decoding on all, the Python (one thread) beside it on the same cores.
            ideal = cores / ((decode_ms + python_ms) / 1000)
            print(f"\n{python_ms:g} ms of Python per image beside the decoding (ideal on {cores} cores: {ideal:.1f}/s)")
            medians = {name: statistics.median(values) for name, values in rates.items()}
            for name, median in medians.items():
                runs = ", ".join(f"{rate:.1f}" for rate in rates[name])
                print(f"  {name:<14} {median:6.1f} images/s ({runs}), {median / ideal:.0%} of the ideal")
            for way in ("threads", "processes"):
                one, many = medians[f"{way} x1"], medians[f"{way} x{cores}"]
                print(f"  {way}: {cores} / 1 = {many / one:.2f}x")
    finally:
        for _, close in pools.values():
            close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
