"""How `blipq up` divides this machine's cores between the workers it starts, so that together they never ask for more.

Each worker gets its own run of the cores `up` may use (its CPU affinity, within its container's CPU limit), the first
workers one more when they do not divide evenly, and is pinned to them (sched_setaffinity): its threads, its torch
threads and its decoder processes (worker/decoders.py, which inherit the pinning) run there and nowhere else. It gets as
many torch threads (BLIPQ_TORCH_THREADS) and decoder processes (BLIPQ_DECODE_PROCESSES) as it has cores: a worker's
model and its decoders mostly take turns (the model waits for a batch's images, the decoders for the next images), and
where they overlap they share the worker's own cores, never another's. With fewer cores than workers, the workers take
one core each, in turn. A BLIPQ_TORCH_THREADS or BLIPQ_DECODE_PROCESSES set in `up`'s environment is every worker's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CoreShare:
    """The cores one worker runs on, and the torch threads and decoder processes it is given."""

    cores: tuple[int, ...]
    torch_threads: int
    decode_processes: int

    def env(self, env: Mapping[str, str]) -> dict[str, str]:
        """The worker's BLIPQ_TORCH_THREADS and BLIPQ_DECODE_PROCESSES: its share's, unless `env` sets them."""
        share = {"BLIPQ_TORCH_THREADS": str(self.torch_threads), "BLIPQ_DECODE_PROCESSES": str(self.decode_processes)}
        return {name: env.get(name, value) for name, value in share.items()}

    def describe(self, env: Mapping[str, str]) -> str:
        """`cores 0-3 (BLIPQ_TORCH_THREADS=4, BLIPQ_DECODE_PROCESSES=4)`, as the worker is given them."""
        cores = f"core {self.cores[0]}" if len(self.cores) == 1 else f"cores {ranges(self.cores)}"
        return f"{cores} ({', '.join(f'{name}={value}' for name, value in self.env(env).items())})"


def divide_cores(cores: Sequence[int], workers: int) -> list[CoreShare]:
    """Each of `workers` workers' share of `cores` (see the module)."""
    ordered = sorted(cores)
    if workers > len(ordered):
        return [CoreShare((ordered[n % len(ordered)],), 1, 1) for n in range(workers)]
    base, extra = divmod(len(ordered), workers)
    shares, start = [], 0
    for n in range(workers):
        count = base + (n < extra)
        shares.append(CoreShare(tuple(ordered[start : start + count]), count, count))
        start += count
    return shares


def ranges(cores: Sequence[int]) -> str:
    """Cores as Linux writes a CPU list: `0-3,8`."""
    runs: list[list[int]] = []
    for core in sorted(cores):
        if runs and core == runs[-1][-1] + 1:
            runs[-1].append(core)
        else:
            runs.append([core])
    return ",".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
