"""The worker's decoder processes: images decoded for the model on every core the worker may use, beside one model.

A worker is one process with one resident model; its threads fetch images and run the model, and would decode them
too, but every return from Pillow's C code (it releases the GIL to decode, convert and resize) waits for the GIL
while the worker's Python runs (fetching, scripts, the model's `generate`). With 10 ms of such Python per image,
two decoding threads reached 74 % of two cores and two decoding processes 90 % (docs/performance.md): images are
decoded here, in BLIPQ_DECODE_PROCESSES processes (default: one per core the worker may use; 0: in the calling
thread).

Each process decodes one image at a time, for one calling thread at a time: the image's bytes go down its socket, and
the model's input comes back as raw uint8 bytes (never pickled), read straight into the array the model gets, with
the CPU its decode and resize took, for
`blipq_worker_stage_cpu_seconds_total` (worker/stages.py). A bad image fails with its own error (ImageInvalidError,
ImageTooLargeError), raised in the calling thread; an image whose decoder dies under it (a crash, the OOM killer)
fails `image_invalid` alone, and the process is replaced. Each is `python -m worker.decoders` (a fresh interpreter:
the worker's threads and torch are not forked), ignores Ctrl-C (the worker, which the terminal signals too, decides
when to stop), and ends when the worker closes its socket, or when the worker dies: its next read finds it closed.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contract.errors import BlipqError, ImageInvalidError
from contract.images import picture_for_model, resized_for_model
from worker.stages import STAGE_CLOCK, StageClock

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

log = logging.getLogger("blipq.worker")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # where `worker` is imported from
STOP_GRACE_S = 5.0  # for a decoder to end once its socket is closed, before it is killed
# Pictures of at most this many pixels (a header read tells) are decoded in the calling thread: they decode in a
# millisecond or two, less than a decoder's round trip and the model calls it splits (single jobs of 64-px pictures
# cost the worker 10.0 ms of CPU each through the decoders, 8.1 ms in its threads).
IN_THREAD_PIXELS = 512 * 512
DECODER_DIED = "the image's decoder process ended while it decoded the image"


@dataclass(frozen=True)
class DecodeRequest:
    """How to decode one image (its bytes follow the request down the socket)."""

    size: tuple[int, int]
    resample: int
    max_pixels: int
    exact: bool


@dataclass
class Decoder:
    """One decoder process and the worker's end of its socket pair."""

    process: subprocess.Popen[bytes]
    connection: Connection


class DecoderPool:
    """`processes` decoder processes; `decode` hands an image to an idle one and waits for its pixels."""

    def __init__(self, processes: int, clock: StageClock = STAGE_CLOCK) -> None:
        self.processes, self.clock = processes, clock
        self._idle: queue.SimpleQueue[Decoder] = queue.SimpleQueue()
        self._all: list[Decoder] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> DecoderPool:
        """Start the processes (they import Pillow while the worker goes on)."""
        for _ in range(self.processes):
            self._idle.put(self._spawn())
        return self

    def pids(self) -> list[int]:
        """The decoder processes' ids, now."""
        with self._lock:
            return [decoder.process.pid for decoder in self._all]

    def decode(
        self, data: bytes, size: tuple[int, int], resample: int, max_pixels: int, exact: bool = False
    ) -> npt.NDArray[np.uint8]:
        """contract.images.decode_for_model in a decoder process: uint8 (height, width, 3) pixels. Raises
        ImageInvalidError (also when the decoder died under this image) or ImageTooLargeError."""
        import numpy as np

        pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
        request = DecodeRequest(size, resample, max_pixels, exact)
        decoder = self._idle.get()
        try:
            if decoder.process.poll() is not None:  # it died idle (the OOM killer, say): not this image's doing
                decoder = self._replace(decoder)
            _, decode_s, resize_s, error = self._ask(decoder, request, data, pixels)
        except (EOFError, OSError):
            decoder = self._replace(decoder)
            raise ImageInvalidError(DECODER_DIED) from None
        finally:
            self._idle.put(decoder)
        self.clock.add("decode", decode_s, elsewhere=True)
        self.clock.add("resize", resize_s, elsewhere=True)
        if error is not None:
            raise error
        return pixels

    def _ask(
        self, decoder: Decoder, request: DecodeRequest, data: bytes, pixels: npt.NDArray[np.uint8]
    ) -> tuple[str, float, float, BaseException | None]:
        """Send a request and its bytes, and wait for the answer: ("ok", decode s, resize s, None), the pixels read
        into `pixels`, or ("error", decode s, resize s, the exception to raise)."""
        decoder.connection.send(request)
        decoder.connection.send_bytes(data)
        outcome, decode_s, resize_s = decoder.connection.recv()
        if outcome != "ok":
            return outcome, decode_s, resize_s, decoder.connection.recv()
        decoder.connection.recv_bytes_into(pixels.data.cast("B"))  # straight into the array: no copy
        return outcome, decode_s, resize_s, None

    def close(self) -> None:
        """Close every socket (each decoder then ends), and wait for them; kill those still there after a grace."""
        with self._lock:
            self._closed, decoders = True, list(self._all)
        for decoder in decoders:
            decoder.connection.close()
        deadline = time.monotonic() + STOP_GRACE_S
        for decoder in decoders:
            try:
                decoder.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                decoder.process.kill()
                decoder.process.wait()

    def _spawn(self) -> Decoder:
        """Start `python -m worker.decoders FD`, FD its end of a socket pair (no fork of the worker's threads and
        torch; nothing of the worker's __main__ re-run, as multiprocessing's spawn would)."""
        worker_end, decoder_end = socket.socketpair()
        # The package's own directory first, wherever the worker was started from.
        path = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.decoders", str(decoder_end.fileno())],
            pass_fds=[decoder_end.fileno()],
            env={**os.environ, "PYTHONPATH": path},
            stdin=subprocess.DEVNULL,
        )
        decoder_end.close()  # the decoder's end lives in the decoder alone: its death closes the pair
        decoder = Decoder(process, Connection(worker_end.detach()))
        with self._lock:
            self._all.append(decoder)
        return decoder

    def _replace(self, dead: Decoder) -> Decoder:
        """A new decoder in place of one that died (or of one whose socket broke: it is killed)."""
        dead.connection.close()
        dead.process.kill()
        log.warning("a decoder process ended (exit code %s); another is started", dead.process.wait())
        with self._lock:
            self._all.remove(dead)
            closed = self._closed
        return dead if closed else self._spawn()


def serve(connection: Connection) -> None:
    """A decoder process: answer requests until the worker closes its end."""
    while True:
        try:
            request: DecodeRequest = connection.recv()
            data = connection.recv_bytes()
        except (EOFError, OSError):
            return
        outcome, decode_s, resize_s, detail = decode_request(request, data)
        connection.send((outcome, decode_s, resize_s))
        if outcome == "ok":
            connection.send_bytes(detail)
        else:
            connection.send(detail)


def decode_request(request: DecodeRequest, data: bytes) -> tuple[str, float, float, Any]:
    """("ok", decode CPU s, resize CPU s, the pixels' bytes) or ("error", ..., the exception the worker raises)."""
    started = time.thread_time()
    try:
        picture = picture_for_model(data, request.size, request.max_pixels, request.exact)
    except BlipqError as exc:
        return "error", time.thread_time() - started, 0.0, exc
    except Exception as exc:  # a bug: the image fails internal_error in the worker, the decoder goes on
        return "error", time.thread_time() - started, 0.0, RuntimeError(f"the decoder failed: {type(exc).__name__}")
    decoded = time.thread_time()
    try:
        pixels = resized_for_model(picture, request.size, request.resample)
    except BlipqError as exc:
        return "error", decoded - started, time.thread_time() - decoded, exc
    return "ok", decoded - started, time.thread_time() - decoded, pixels.data.cast("B")


def main(argv: list[str]) -> None:
    """`python -m worker.decoders FD`: serve the worker at the other end of the socket FD."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the worker decides
    serve(Connection(int(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
