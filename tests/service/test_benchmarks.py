"""Every benchmark still runs: its smoke run (`--smoke`, its own smallest sizes) goes end to end and prints its figures.

Benchmarks are not tests, and nothing here judges a figure: a benchmark that no test runs stops working unnoticed (a
renamed setting, an API answer it did not expect), so each one runs here the way a user runs it,
`python -m benchmarks.NAME --smoke`, as a subprocess, and must exit 0 having printed its last figures. The benchmarks
are found by listing the package: a new module is a benchmark, and needs a smoke run and a line in FIGURES, unless it
is one of HELPERS.
"""

from __future__ import annotations

import os
import pkgutil
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.environment import ROOT

BENCHMARKS_DIR = ROOT / "benchmarks"
# Modules of the package that measure nothing themselves, each with what it is instead.
HELPERS = {
    "blip_base": "builds the BLIP-base checkpoint that batching and gpu measure (their smoke runs, its narrow one)",
    "fleet": "the service's processes for a run: Redis, the API, the workers",
    "gpu_decode": "gpu.py's third part (the CPU path against nvJPEG): it needs CUDA, and gpu's smoke run is on the CPU",
    "gpu_wheels": "downloads wheels for a GPU host without network (needs the network)",
    "image_server": "the local image host of the runs that send URLs",
    "kill_loop": "chaos.py's kill loop (its smoke run is chaos's)",
    "noop_celery": "the bare Celery no-op task, a baseline the benchmarks start",
    "photo_runs": "the photo figures the throughput benchmarks print, and the service they run on",
    "photos": "writes the camera-like pictures the photo benchmarks send",
    "processes": "the CPU, memory and pinning of a run's processes",
    "standin_device": "the worker on a stand-in device, which horizontal runs (its smoke run is horizontal's)",
    "upload_runs": "tag_cli.py's run 7 (uploads, --shrink against --no-shrink; its smoke run is tag_cli's)",
}
# A line each benchmark prints once it has its figures (its last ones): the run got there, whatever their values.
FIGURES = {
    "autoscaling": r"drain beats count at the same worker-hours on p95 wait: \d+ of 1 traces",
    "batching": r"rounds: \d+\.\d\d",
    "chaos": r"stranded by the kills\s+\d+ jobs and chunks",
    "decode_pool": r"processes: \d+ / 1 = \d+\.\d\dx",
    "decoding": r"8 JPEGs fast to 384 px .* 1 thread / 2 threads \d+\.\d\dx",
    "durable_submit": r"cost of WAIT\s+[+-]\d+\.\d+ ms, ratio \d+\.\d\d",
    "feed": r"feed limit \d+\.\d images/s",
    "estimates": r"submissions: \d+, answers: \d+",
    "fair_share": r"fair share goal held in \d+ of 4 mixes",
    "fetch": r"\| camera\.jpg .* \| 8 \| \d+\.\d+ / \d+\.\d+ \| \d+\.\d\d \|",
    "fidelity": r"blip-caption-easy, unprompted captions: \d+ answers; fast agrees \d+",
    "gpu": r"service \d+\.\d answers/s, bare loop \d+\.\d answers/s: ratio \d+\.\d\d",
    "horizontal": r"GPU workers one Redis feeds at 2,200 answers/s each: \d+\.\d",
    "image_sizes": r"largest JPEG bytes per pixel: \d\.\d{3}",
    "machinery": r"6 photos 2x10 upload +2 +20 +\d+\.\d\d",
    "photo_intake": r"worker RSS before \d+ MB .* peak \d+ MB",
    "preprocessing": r"largest difference in pixel values: \d",
    "single_jobs": r"p99 latency: service +\d+\.\d ms",
    "soak": r"NOT ENDED\s+\d+",
    "tag_cli": r"6 blipq tag --urls FILE, 2x10 +2 +20 +\d+\.\d\d",
    "tagging": r"6 photos 2x1 url +2 +2 +\d+\.\d\d",
}
SMOKE_TIMEOUT_S = 240  # one smoke run; each takes seconds to a minute on a busy 2-core machine
STOP_GRACE_S = 60  # after a timeout's SIGINT, for the benchmark's own clean-up (its `finally` stops its service)


def benchmark_modules() -> list[str]:
    """The package's modules, less its helpers: the benchmarks."""
    return sorted(module.name for module in pkgutil.iter_modules([str(BENCHMARKS_DIR)]) if module.name not in HELPERS)


def test_every_helper_listed_is_a_module_of_the_package() -> None:
    modules = {module.name for module in pkgutil.iter_modules([str(BENCHMARKS_DIR)])}
    assert set(HELPERS) <= modules, f"no such module in benchmarks/: {sorted(set(HELPERS) - modules)}"


def test_every_benchmark_says_what_its_smoke_run_prints() -> None:
    missing = sorted(set(benchmark_modules()) - set(FIGURES))
    assert not missing, f"benchmarks with no smoke run here (give each --smoke and a line in FIGURES): {missing}"
    unknown = sorted(set(FIGURES) - set(benchmark_modules()))
    assert not unknown, f"FIGURES names modules that are no benchmark: {unknown}"


@pytest.fixture(scope="module")
def bench_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """XDG_CACHE_HOME of the smoke runs: the photos and checkpoints they write are written once, and not into the
    user's ~/.cache."""
    return tmp_path_factory.mktemp("bench-cache")


class SmokeRun:
    """A benchmark's smoke run: one test class per benchmark (made below), because `make test`'s pytest-xdist
    (--dist loadscope) hands a class at a time to a process, so that the runs are shared between the processes."""

    name: str

    def test_smoke_run_prints_its_figures(self, bench_cache: Path) -> None:
        smoke_run(self.name, bench_cache)


for _name in benchmark_modules():
    globals()[f"TestSmokeRun_{_name}"] = type(f"TestSmokeRun_{_name}", (SmokeRun,), {"name": _name})


def smoke_run(name: str, bench_cache: Path) -> None:
    command = [sys.executable, "-m", f"benchmarks.{name}", "--smoke"]
    output, returncode = run(command, {**os.environ, "XDG_CACHE_HOME": str(bench_cache)})
    shown = f"`{' '.join(command[1:])}` exited {returncode}; the end of its output:\n{output[-4000:]}"
    assert returncode == 0, shown
    assert name in FIGURES, f"benchmarks/{name}.py: give it a line in FIGURES"
    assert re.search(FIGURES[name], output), f"no figures ({FIGURES[name]!r}) in its output. {shown}"


def run(command: list[str], env: dict[str, str]) -> tuple[str, int]:
    """Run a benchmark in the repository's root until it exits: its stdout and stderr together, its exit status. Past
    SMOKE_TIMEOUT_S it gets SIGINT (Ctrl-C: its `finally` stops the service it started), then SIGKILL."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=SMOKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
        try:
            output, _ = process.communicate(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        pytest.fail(f"`{' '.join(command[1:])}` ran past {SMOKE_TIMEOUT_S} s; the end of its output:\n{output[-4000:]}")
    return output, process.returncode
