"""The batcher: many submissions per model call, bounded by max size and max wait; out-of-memory splits the batch."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from contract.errors import ModelOutOfMemoryError
from worker.batching import Batcher, Output


class Model:
    """A model call that records its batches: answers `<text>@<pixel value>`, and can run out of memory.

    With `hold`, each call signals `entered` and blocks until the test sets `released`: while it does, whatever is
    submitted is surely pending, not yet gathered.
    """

    def __init__(self, memory: int = 10**9, poison: str = "", hold: bool = False) -> None:
        self.memory, self.poison = memory, poison
        self.batches: list[list[str]] = []
        self.started: list[float] = []  # time.monotonic() at the start of each call
        self.lock = threading.Lock()
        self.entered, self.released = threading.Event(), threading.Event()
        if not hold:
            self.released.set()

    def __call__(self, pixels: list[torch.Tensor], rows: list[int], texts: list[str]) -> list[str]:
        with self.lock:
            self.started.append(time.monotonic())
        self.entered.set()
        assert self.released.wait(30), "the test never released the model"
        if len(texts) > self.memory or self.poison in texts:
            raise torch.OutOfMemoryError("CUDA out of memory (a test's)")
        with self.lock:
            self.batches.append(list(texts))
        return [f"{text}@{int(pixels[row][0])}" for row, text in zip(rows, texts, strict=True)]


class WatchedQueue(queue.SimpleQueue):  # type: ignore[type-arg]
    """The batcher's queue of pending entries, which sets `gathering` when the model thread waits for more entries
    to join its batch (a get with a timeout: a batch has begun and images are on their way)."""

    def __init__(self) -> None:
        super().__init__()
        self.gathering = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None) -> object:
        if timeout is not None:
            self.gathering.set()
        return super().get(block, timeout)


@pytest.fixture
def started() -> Iterator[list[Batcher]]:
    batchers: list[Batcher] = []
    yield batchers
    for batcher in batchers:
        batcher.stop()


def start(started: list[Batcher], model: Model, max_size: int = 8, max_wait_s: float = 0.2) -> Batcher:
    batcher = Batcher(model, max_size, max_wait_s)
    batcher.pending = WatchedQueue()  # before the model thread first waits on it
    started.append(batcher.start())
    return batcher


def gathering(batcher: Batcher) -> threading.Event:
    """Set once the model thread holds a batch and waits for more entries to join it."""
    assert isinstance(batcher.pending, WatchedQueue)
    return batcher.pending.gathering


def pixel(value: int) -> torch.Tensor:
    return torch.tensor([value])


def outputs(futures: list, timeout_s: float = 10.0) -> list[str]:  # type: ignore[type-arg]
    results: list[Output] = [future.result(timeout=timeout_s) for future in futures]
    return [result.text for result in results]


def test_submissions_within_the_wait_share_one_call_and_keep_their_order(started: list[Batcher]) -> None:
    model = Model()
    # A wait the test never outlasts, ended by the batch filling up: the outcome owes nothing to the clock.
    batcher = start(started, model, max_size=5, max_wait_s=60.0)

    with batcher.expect(4) as expected:  # a task thread announces four images; the fourth is never submitted
        first = batcher.submit(pixel(1), ["a", "b"], expected=expected)
        assert gathering(batcher).wait(10), "the model thread took `first` and waits for the images on their way"
        second = batcher.submit(pixel(2), ["c"], expected=expected)
        third = batcher.submit(pixel(3), ["d", "e"], expected=expected)

        assert outputs(first) == ["a@1", "b@1"]
    assert (outputs(second), outputs(third)) == (["c@2"], ["d@3", "e@3"])
    assert model.batches == [["a", "b", "c", "d", "e"]]
    calls = {future.result().call for future in first + second + third}
    assert len(calls) == 1


def test_a_batch_never_holds_more_than_max_size_texts(started: list[Batcher]) -> None:
    model = Model(hold=True)
    batcher = start(started, model, max_size=4, max_wait_s=60.0)
    [held] = batcher.submit(pixel(0), ["held"])
    assert model.entered.wait(10)

    # All of these are pending together when the model is free again: only the size limit splits them.
    futures = [future for value in range(1, 4) for future in batcher.submit(pixel(value), [f"{value}x", f"{value}y"])]
    futures += batcher.submit(pixel(4), ["4x"])
    futures += batcher.submit(pixel(9), [f"q{i}" for i in range(10)])  # more texts than a batch: several entries
    model.released.set()

    assert outputs([held, *futures])[-10:] == [f"q{i}@9" for i in range(10)]
    assert model.batches == [
        ["held"],
        ["1x", "1y", "2x", "2y"],
        ["3x", "3y", "4x"],  # the 10 texts' first entry (4 texts) does not fit beside them: it waits for the next
        ["q0", "q1", "q2", "q3"],
        ["q4", "q5", "q6", "q7"],
        ["q8", "q9"],
    ]


def test_a_gathering_batch_stops_waiting_for_a_loading_image_at_max_wait(started: list[Batcher]) -> None:
    model = Model()
    batcher = start(started, model, max_size=64, max_wait_s=1.0)

    with batcher.expect(1):  # an image that stays loading until the test ends: only the deadline ends the wait
        began = time.monotonic()
        [future] = batcher.submit(pixel(1), ["alone"])

        assert outputs([future], timeout_s=30.0) == ["alone@1"]
        assert gathering(batcher).is_set(), "the batch waited for the loading image"
    assert model.started[0] - began >= 1.0, "the model ran before the wait was over"


def test_an_idle_batcher_answers_a_lone_submission_without_waiting(started: list[Batcher]) -> None:
    batcher = start(started, Model(), max_size=64, max_wait_s=60.0)  # a wait the test would never outlast

    [future] = batcher.submit(pixel(1), ["alone"])  # no task thread is loading images: nothing is on its way

    assert outputs([future], timeout_s=30.0) == ["alone@1"]
    assert not gathering(batcher).is_set()


def test_a_gathering_batch_waits_for_the_images_being_loaded(started: list[Batcher]) -> None:
    model = Model()
    batcher = start(started, model, max_size=8, max_wait_s=60.0)
    loading, loaded = threading.Event(), threading.Event()
    late: list = []  # type: ignore[type-arg]

    def task_thread() -> None:
        with batcher.expect(1) as expected:
            loading.set()
            loaded.wait()
            late.extend(batcher.submit(pixel(2), ["late"], expected=expected))

    thread = threading.Thread(target=task_thread)
    thread.start()
    assert loading.wait(10)
    first = batcher.submit(pixel(1), ["first"])  # the batch gathers while another thread loads an image...
    assert gathering(batcher).wait(10), "the model thread took `first` and waits for the loading image"
    loaded.set()
    thread.join()

    assert outputs(first + late, timeout_s=30.0) == ["first@1", "late@2"]
    assert model.batches == [["first", "late"]], "...and that image joins it"


def test_what_arrives_while_the_model_runs_forms_the_next_batch(started: list[Batcher]) -> None:
    model = Model(hold=True)
    batcher = start(started, model, max_size=16, max_wait_s=0.0)

    first = batcher.submit(pixel(1), ["first"])
    assert model.entered.wait(10)  # the model is busy with `first`...
    later = [batcher.submit(pixel(value), [f"t{value}"])[0] for value in range(6)]
    model.released.set()

    assert outputs(first + later) == ["first@1"] + [f"t{value}@{value}" for value in range(6)]
    assert model.batches == [["first"], [f"t{value}" for value in range(6)]]


def test_out_of_memory_splits_the_batch_and_fails_only_the_text_that_fails_alone(started: list[Batcher]) -> None:
    model = Model(memory=3, poison="huge")
    batcher = start(started, model, max_size=8, max_wait_s=0.3)

    texts = ["a", "b", "c", "huge", "d", "e", "f", "g"]
    futures = batcher.submit(pixel(1), texts)

    for text, future in zip(texts, futures, strict=True):
        if text == "huge":
            with pytest.raises(ModelOutOfMemoryError) as failure:
                future.result(timeout=10)
            assert failure.value.code == "oom"
        else:
            assert future.result(timeout=10).text == f"{text}@1"
    assert all(len(batch) <= 3 for batch in model.batches)


def test_a_model_error_fails_its_batch_and_the_batcher_goes_on(started: list[Batcher]) -> None:
    def broken_then_fine(pixels: list[torch.Tensor], rows: list[int], texts: list[str]) -> list[str]:
        if "boom" in texts:
            raise ValueError("a model error")
        return texts

    batcher = start(started, broken_then_fine, max_size=8, max_wait_s=0.0)  # type: ignore[arg-type]

    [failed] = batcher.submit(pixel(1), ["boom"])
    with pytest.raises(ValueError, match="a model error"):
        failed.result(timeout=10)
    assert outputs(batcher.submit(pixel(1), ["fine"])) == ["fine"]


def test_a_text_whose_job_gave_up_is_not_answered(started: list[Batcher]) -> None:
    model = Model(hold=True)
    batcher = start(started, model, max_size=8, max_wait_s=0.0)

    busy = batcher.submit(pixel(1), ["busy"])
    assert model.entered.wait(10)  # the model is busy: what comes next waits, pending
    [abandoned] = batcher.submit(pixel(2), ["abandoned"])
    assert abandoned.cancel()  # its job timed out while it waited
    kept = batcher.submit(pixel(3), ["kept"])
    model.released.set()

    assert outputs(busy + kept) == ["busy@1", "kept@3"]
    assert model.batches == [["busy"], ["kept"]], "the next batch took both, and answered only `kept`"
