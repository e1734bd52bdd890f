"""The batcher: many submissions per model call, bounded by max size and max wait; out-of-memory splits the batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from worker.batching import Batcher, Output
from worker.errors import ModelOutOfMemoryError


class Model:
    """A model call that records its batches: answers `<text>@<pixel value>`, and can run out of memory."""

    def __init__(self, delay_s: float = 0.0, memory: int = 10**9, poison: str = "") -> None:
        self.delay_s, self.memory, self.poison = delay_s, memory, poison
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, pixels: list[torch.Tensor], rows: list[int], texts: list[str]) -> list[str]:
        time.sleep(self.delay_s)
        if len(texts) > self.memory or self.poison in texts:
            raise torch.OutOfMemoryError("CUDA out of memory (a test's)")
        with self.lock:
            self.batches.append(list(texts))
        return [f"{text}@{int(pixels[row][0])}" for row, text in zip(rows, texts, strict=True)]


@pytest.fixture
def started() -> Iterator[list[Batcher]]:
    batchers: list[Batcher] = []
    yield batchers
    for batcher in batchers:
        batcher.stop()


def start(started: list[Batcher], model: Model, max_size: int = 8, max_wait_s: float = 0.2) -> Batcher:
    batcher = Batcher(model, max_size, max_wait_s).start()
    started.append(batcher)
    return batcher


def pixel(value: int) -> torch.Tensor:
    return torch.tensor([value])


def outputs(futures: list, timeout_s: float = 10.0) -> list[str]:  # type: ignore[type-arg]
    results: list[Output] = [future.result(timeout=timeout_s) for future in futures]
    return [result.text for result in results]


def test_submissions_within_the_wait_share_one_call_and_keep_their_order(started: list[Batcher]) -> None:
    model = Model()
    batcher = start(started, model, max_size=8, max_wait_s=0.3)

    with batcher.expect(3) as expected:  # as a task thread announces, loads and submits its images
        first = batcher.submit(pixel(1), ["a", "b"], expected=expected)
        second = batcher.submit(pixel(2), ["c"], expected=expected)
        third = batcher.submit(pixel(3), ["d", "e"], expected=expected)

    assert outputs(first) == ["a@1", "b@1"]
    assert (outputs(second), outputs(third)) == (["c@2"], ["d@3", "e@3"])
    assert model.batches == [["a", "b", "c", "d", "e"]]
    calls = {future.result().call for future in first + second + third}
    assert len(calls) == 1


def test_a_batch_never_holds_more_than_max_size_texts(started: list[Batcher]) -> None:
    model = Model(delay_s=0.05)
    batcher = start(started, model, max_size=4, max_wait_s=0.2)

    futures = [future for value in range(5) for future in batcher.submit(pixel(value), ["x", "y", "z"])]
    futures += batcher.submit(pixel(9), [f"q{i}" for i in range(10)])  # more texts than a batch: several entries

    assert outputs(futures)[-10:] == [f"q{i}@9" for i in range(10)]
    assert all(len(batch) <= 4 for batch in model.batches)
    assert sum(len(batch) for batch in model.batches) == 25


def test_a_lone_submission_waits_no_longer_than_max_wait(started: list[Batcher]) -> None:
    batcher = start(started, Model(), max_size=64, max_wait_s=0.05)

    began = time.monotonic()
    [future] = batcher.submit(pixel(1), ["alone"])

    assert outputs([future]) == ["alone@1"]
    assert time.monotonic() - began < 1.0


def test_an_idle_batcher_answers_a_lone_submission_without_waiting(started: list[Batcher]) -> None:
    batcher = start(started, Model(), max_size=64, max_wait_s=60.0)  # a wait the test would never outlast

    [future] = batcher.submit(pixel(1), ["alone"])  # no task thread is loading images: nothing is on its way

    assert outputs([future], timeout_s=30.0) == ["alone@1"]


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
    loading.wait()
    first = batcher.submit(pixel(1), ["first"])  # the batch gathers while another thread loads an image...
    loaded.set()
    thread.join()

    assert outputs(first + late, timeout_s=30.0) == ["first@1", "late@2"]
    assert model.batches == [["first", "late"]], "...and that image joins it"


def test_what_arrives_while_the_model_runs_forms_the_next_batch(started: list[Batcher]) -> None:
    model = Model(delay_s=0.3)
    batcher = start(started, model, max_size=16, max_wait_s=0.0)

    first = batcher.submit(pixel(1), ["first"])
    time.sleep(0.1)  # the model is busy with `first`
    later = [batcher.submit(pixel(value), [f"t{value}"])[0] for value in range(6)]

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
    model = Model(delay_s=0.3)
    batcher = start(started, model, max_size=8, max_wait_s=0.0)

    busy = batcher.submit(pixel(1), ["busy"])
    time.sleep(0.1)
    [abandoned] = batcher.submit(pixel(2), ["abandoned"])
    assert abandoned.cancel()  # its job timed out while it waited
    kept = batcher.submit(pixel(3), ["kept"])

    assert outputs(busy + kept) == ["busy@1", "kept@3"]
    assert ["abandoned"] not in model.batches and all("abandoned" not in batch for batch in model.batches)
