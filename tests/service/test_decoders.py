"""The worker's decoder processes: the model's input as decode_for_model makes it, a bad image failing alone with its
code, a decoder that dies failing only the image it held, and none left behind when the worker stops."""

from __future__ import annotations

import fcntl
import io
import os
import signal
import struct
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from PIL import Image

from blipq.up_redis import RedisProcess, free_port, stop_process
from contract.errors import ImageInvalidError, ImageTooLargeError
from contract.images import decode_for_model
from tests.support import hostile
from tests.support.images import encode, shape_png
from tests.support.service import api_client, start_worker, wait_for_job, wait_for_worker_record
from worker.decoders import DECODER_DIED, DecoderPool
from worker.stages import StageClock

SIZE = (384, 384)
BICUBIC = int(Image.Resampling.BICUBIC)
MAX_PIXELS = 40_000_000
EXIT_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def pool() -> Iterator[DecoderPool]:
    decoders = DecoderPool(1, StageClock()).start()
    yield decoders
    decoders.close()


def photo(width: int = 1600, height: int = 1200) -> bytes:
    """A JPEG of noise, so that it costs what a photo costs to decode."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90)


def test_a_decoder_gives_the_pixels_decode_for_model_gives_and_counts_their_cpu(pool: DecoderPool) -> None:
    image = photo()

    pixels = pool.decode(image, SIZE, BICUBIC, MAX_PIXELS)

    assert pixels.shape == (384, 384, 3) and pixels.flags.writeable
    assert np.array_equal(pixels, decode_for_model(image, SIZE, BICUBIC, MAX_PIXELS))
    spent = pool.clock.spent()
    assert spent["decode"] > 0 and spent["resize"] > 0


@pytest.mark.parametrize(
    ("data", "error"),
    [
        pytest.param(hostile.png_claiming(100_000, 100_000), ImageTooLargeError, id="png-100000x100000"),
        pytest.param(hostile.png_zero_bomb(10_000, 10_000), ImageTooLargeError, id="png-bomb"),
        pytest.param(hostile.png_with_text_bomb(), ImageInvalidError, id="text-bomb"),
        pytest.param(hostile.truncated(hostile.noisy("JPEG"), 0.5), ImageInvalidError, id="truncated-jpeg"),
        pytest.param(hostile.truncated(hostile.noisy("HEIF"), 0.5), ImageInvalidError, id="truncated-heic"),
        pytest.param(hostile.SVG_IMAGE, ImageInvalidError, id="svg"),
        pytest.param(b"", ImageInvalidError, id="empty"),
    ],
)
def test_a_bad_image_fails_with_its_code_and_the_decoder_goes_on(
    pool: DecoderPool, data: bytes, error: type[Exception]
) -> None:
    pids = pool.pids()
    with pytest.raises(error) as raised:
        pool.decode(data, SIZE, BICUBIC, MAX_PIXELS)
    assert raised.type is error  # the worker's own error, with its code and message, not a wrapper
    assert pool.decode(shape_png("red"), SIZE, BICUBIC, MAX_PIXELS).shape == (384, 384, 3)
    assert pool.pids() == pids


def unread_bytes(pool: DecoderPool) -> int:
    """Bytes sent to the (only) decoder that it has not read yet."""
    [decoder] = pool._all
    count = fcntl.ioctl(decoder.connection.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", count)[0])


def test_a_decoder_that_dies_under_an_image_fails_that_image_alone_and_is_replaced() -> None:
    pool = DecoderPool(1, StageClock()).start()
    try:
        assert pool.decode(shape_png("red"), SIZE, BICUBIC, MAX_PIXELS).shape == (384, 384, 3)
        [first] = pool.pids()
        # Given: the decoder stopped, and an image on its way to it
        os.kill(first, signal.SIGSTOP)
        outcome: list[BaseException | None] = []

        def decode() -> None:
            try:
                pool.decode(photo(), SIZE, BICUBIC, MAX_PIXELS)
                outcome.append(None)
            except Exception as exc:
                outcome.append(exc)

        thread = threading.Thread(target=decode)
        thread.start()
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while unread_bytes(pool) == 0:  # the image is in the decoder's socket
            assert time.monotonic() < deadline
            time.sleep(0.01)

        # When: the decoder is killed (a crash, the OOM killer)
        os.kill(first, signal.SIGKILL)
        thread.join(EXIT_TIMEOUT_S)

        # Then: that image fails image_invalid, saying why; another decoder answers the next image
        [error] = outcome
        assert isinstance(error, ImageInvalidError) and error.message == DECODER_DIED
        assert pool.decode(shape_png("blue"), SIZE, BICUBIC, MAX_PIXELS).shape == (384, 384, 3)
        assert pool.pids() != [first]
    finally:
        pool.close()


def decoder_pids(worker_pid: int) -> list[int]:
    children = Path(f"/proc/{worker_pid}/task/{worker_pid}/children").read_text().split()
    return [int(pid) for pid in children if b"worker.decoders" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def gone(pids: list[int]) -> bool:
    """None of the processes runs (an exited one not yet reaped by its new parent counts as gone)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            return False
    return True


@pytest.mark.parametrize("stop", ["SIGTERM", "Ctrl-C", "SIGKILL"])
def test_a_worker_decodes_in_its_decoders_and_leaves_none_behind_when_stopped(
    redis_server: RedisProcess, redis_client: redis.Redis, tiny_model_dir: Path, tmp_path: Path, stop: str
) -> None:
    # Given: a worker with two decoder processes
    queue, port = f"decoders-{stop.lower()}", free_port()
    worker = start_worker(
        redis_server.url,
        tiny_model_dir,
        queue,
        tmp_path / "worker.log",
        BLIPQ_DECODE_PROCESSES="2",
        BLIPQ_METRICS_PORT=str(port),
        BLIPQ_METRICS_ADDR="127.0.0.1",
    )
    try:
        wait_for_worker_record(redis_server.url, queue, 1, worker)
        decoders = decoder_pids(worker.process.pid)
        assert len(decoders) == 2, worker.log_tail()

        # When: it answers a job about a photo
        client = api_client(redis_server.url, queue)
        sent = client.post("/v1/jobs", data={"question": "what is it?", "image": (io.BytesIO(photo()), "p.jpg")})
        assert wait_for_job(client, sent.get_json()["id"], worker)["status"] == "succeeded"

        # Then: its decoders' CPU is counted as decode and resize on its /metrics
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        spent = {
            line.split('"')[1]: float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("blipq_worker_stage_cpu_seconds_total{")
        }
        assert spent["decode"] > 0 and spent["resize"] > 0 and spent["bookkeeping"] > 0, spent

        # When: it is stopped
        if stop == "Ctrl-C":  # a terminal signals its whole foreground process group: the decoders too
            for pid in [worker.process.pid, *decoders]:
                os.kill(pid, signal.SIGINT)
        else:
            worker.process.send_signal(getattr(signal, stop))
        worker.process.wait(EXIT_TIMEOUT_S)

        # Then: no decoder is left (killed outright, the worker leaves them an end of file, and they end)
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        while not gone(decoders):
            assert time.monotonic() < deadline, f"decoders {decoders} outlived the worker ({stop})"
            time.sleep(0.05)
    finally:
        stop_process(worker.process)
