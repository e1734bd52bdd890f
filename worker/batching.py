"""Dynamic batching: one thread owns the model and answers whatever is pending, many jobs per `generate`.

Task threads (Celery's thread pool, one per message the worker holds) fetch and decode their images in parallel and
submit each image with its texts; the model thread takes the first pending image, gathers more until the batch holds
`max_size` texts or `max_wait_s` has passed since that first one arrived (waiting only while some thread is still
loading images: an idle worker answers a lone job at once), and answers them in one call. While the model runs, the
next batch gathers, so under load a batch forms at once and is full.

On a CUDA out-of-memory error the batch is split in halves and each half tried again; a text that fails alone fails
with ModelOutOfMemoryError (code `oom`), the others are answered.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from contract.errors import ModelOutOfMemoryError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("blipq.worker")

# The model's call: pixels (one per distinct image), rows (texts[i] is about pixels[rows[i]]), texts -> outputs.
ModelCall = Callable[["list[torch.Tensor]", list[int], list[str]], list[str]]

EXIT_MODEL_HUNG = 70  # the exit status of a worker whose model call ran past the hard time limit


class Output(NamedTuple):
    """What the model gave for one text, and how long the model call that gave it took (shared by its batch)."""

    text: str
    model_s: float
    call: int  # which model call of this worker gave it


# Asked just before a model call, for the entries of a batch's items: which of them may still run (a batch canceled
# or past its deadline runs none; an item is marked running here). gates[i] is (batch id, item indices) of entry i.
Admit = Callable[[list[tuple[str, list[int]]]], list[set[int]]]


@dataclass
class Pending:
    """One image with the texts asked about it, waiting for the model; one future per text.

    `gate` is (batch id, item index of each text) for a batch's items, which the admit call is asked about; None for
    single jobs (marked running when their worker took them).
    """

    pixels: torch.Tensor
    texts: list[str]
    futures: list[Future[Output]]
    gate: tuple[str, list[int]] | None = None
    arrived: float = field(default_factory=time.monotonic)


class Batcher:
    """Answers submitted images and texts in batches of at most `max_size` texts, from one thread."""

    def __init__(
        self,
        call: ModelCall,
        max_size: int,
        max_wait_s: float,
        hard_limit_s: float = 0.0,
        name: str = "blipq-model",
        admit: Admit | None = None,
    ) -> None:
        self.call, self.max_size, self.max_wait_s, self.hard_limit_s = call, max_size, max_wait_s, hard_limit_s
        self.admit = admit
        self.loading = 0  # task threads loading images to submit (loading_images)
        self._loading_lock = threading.Lock()
        self.pending: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self.carried: Pending | None = None  # taken from the queue but left for the next batch (it did not fit)
        self.busy_since = 0.0  # when the running model call started; 0 when idle
        self.calls = 0
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.watchdog = threading.Thread(target=self._watch, name=f"{name}-watchdog", daemon=True)
        self.stopping = threading.Event()

    def start(self) -> Batcher:
        self.thread.start()
        if self.hard_limit_s:
            self.watchdog.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking batches and wait (up to `timeout_s`) for the running model call: a process must not exit
        while a thread is inside torch (its C++ thread pool aborts the process)."""
        self.stopping.set()
        self.pending.put(None)
        if self.thread.is_alive():
            self.thread.join(timeout_s)

    def expect(self, images: int) -> Expected:
        """Images a task thread is loading and will submit (a context): a gathering batch waits for them, up to
        max_wait_s, and only for them."""
        return Expected(self, images)

    def _expect(self, images: int) -> None:
        with self._loading_lock:
            self.loading += images

    def submit(
        self,
        pixels: torch.Tensor,
        texts: list[str],
        gate: tuple[str, list[int]] | None = None,
        expected: Expected | None = None,
    ) -> list[Future[Output]]:
        """Queue one image and its texts; the futures resolve to the outputs, in the order of `texts`.

        With a `gate` (batch id, item indices), a text its batch no longer runs is not answered: its future is
        canceled. With `expected`, the image is one of those it announced: no batch waits for it any more.
        """
        if expected is not None:
            expected.settle()  # before the image is queued: the batch that takes it must not wait for it as well
        futures: list[Future[Output]] = [Future() for _ in texts]
        for start in range(0, len(texts), self.max_size):  # more texts than a batch holds: several entries
            end = start + self.max_size
            part = (gate[0], gate[1][start:end]) if gate is not None else None
            self.pending.put(Pending(pixels, texts[start:end], futures[start:end], part))
        return futures

    def _run(self) -> None:
        while not self.stopping.is_set():
            batch = self._gather()
            if batch:
                self._answer(batch)

    def _gather(self) -> list[Pending]:
        """Block for a first entry, then take more until the batch is full or the first one waited max_wait_s."""
        first = self.carried or self.pending.get()
        self.carried = None
        if first is None:
            return []
        batch, size = [first], len(first.texts)
        deadline = first.arrived + self.max_wait_s
        while size < self.max_size:
            # Wait only for images being loaded now: with none, nothing is on its way, and the model would idle.
            remaining = deadline - time.monotonic() if self.loading else 0.0
            try:  # past the deadline, what is already pending still joins: no wait, but no reason to leave it
                entry = self.pending.get(timeout=remaining) if remaining > 0 else self.pending.get_nowait()
            except queue.Empty:
                break
            if entry is None:
                self.pending.put(None)  # stopping: answer this batch first
                break
            if size + len(entry.texts) > self.max_size:
                self.carried = entry
                break
            batch.append(entry)
            size += len(entry.texts)
        return batch

    def _answer(self, batch: list[Pending]) -> None:
        self._admit(batch)
        items = [  # a text whose job gave up waiting (its future canceled) is not answered
            (index, text, future)
            for index, entry in enumerate(batch)
            for text, future in zip(entry.texts, entry.futures, strict=True)
            if future.set_running_or_notify_cancel()
        ]
        if items:
            self._answer_items([entry.pixels for entry in batch], items)

    def _admit(self, batch: list[Pending]) -> None:
        """Cancel the futures of the batch items that may no longer run (one round trip for the whole model call)."""
        by_batch: dict[str, list[Pending]] = {}
        for entry in batch:
            if entry.gate is not None:
                by_batch.setdefault(entry.gate[0], []).append(entry)
        if self.admit is None or not by_batch:
            return
        gates = [
            (batch_id, [i for e in entries if e.gate for i in e.gate[1]]) for batch_id, entries in by_batch.items()
        ]
        try:
            admitted = self.admit(gates)  # one question per batch of the call, all in one round trip
        except Exception:  # Redis away: answer them all; the end script still records each outcome once
            log.exception("could not mark the items of %d batches running; answered all the same", len(gates))
            return
        for entries, allowed in zip(by_batch.values(), admitted, strict=True):
            for entry in entries:
                assert entry.gate is not None
                for index, future in zip(entry.gate[1], entry.futures, strict=True):
                    if index not in allowed:
                        future.cancel()

    def _answer_items(self, pixels: list[torch.Tensor], items: list[tuple[int, str, Future[Output]]]) -> None:
        """Answer `items` (pixel index, text, future); on out-of-memory, halve and retry down to one text."""
        import torch

        used = sorted({index for index, _, _ in items})
        position = {index: number for number, index in enumerate(used)}
        self.busy_since = started = time.monotonic()
        self.calls += 1
        try:
            outputs = self.call([pixels[i] for i in used], [position[i] for i, _, _ in items], [t for _, t, _ in items])
        except torch.OutOfMemoryError:
            self.busy_since = 0.0
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(items) == 1:
                log.error("out of memory on a batch of one text: that job fails `oom`")
                message = "the model ran out of memory on this image and text alone"
                items[0][2].set_exception(ModelOutOfMemoryError(message))
                return
            half = len(items) // 2
            log.warning("out of memory on a batch of %d texts: split in two and tried again", len(items))
            self._answer_items(pixels, items[:half])
            self._answer_items(pixels, items[half:])
            return
        except Exception as exc:  # a model error: every text of the batch fails with it, the thread goes on
            log.exception("the model failed on a batch of %d texts", len(items))
            for _, _, future in items:
                future.set_exception(exc)
            return
        finally:
            self.busy_since = 0.0
        model_s = time.monotonic() - started
        for (_, _, future), output in zip(items, outputs, strict=True):
            future.set_result(Output(output, model_s, self.calls))

    def _watch(self) -> None:
        """End the worker when one model call runs past the hard limit (a hung device): its jobs go to others."""
        while not self.stopping.wait(1.0):
            started = self.busy_since
            if started and time.monotonic() - started > self.hard_limit_s:
                log.critical("a model call has run for over %.0f s: the worker exits", self.hard_limit_s)
                logging.shutdown()
                os._exit(EXIT_MODEL_HUNG)


class Expected:
    """Images a task thread announced it would submit (Batcher.expect); each settles once, submitted or given up."""

    def __init__(self, batcher: Batcher, images: int) -> None:
        self.batcher, self.left = batcher, images

    def __enter__(self) -> Expected:
        self.batcher._expect(self.left)
        return self

    def __exit__(self, *_: object) -> None:
        self.batcher._expect(-self.left)  # those never submitted (failed, cached, timed out): no batch waits for them
        self.left = 0

    def settle(self) -> None:
        """One of the images will not be waited for any more: it is being submitted, or it failed."""
        if self.left > 0:
            self.left -= 1
            self.batcher._expect(-1)
