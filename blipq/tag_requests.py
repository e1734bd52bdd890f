"""The requests of `blipq tag`: the images read, with what is still to ask of each, grouped into batch requests.

What is asked of an image is its questions, then (`--caption`) its caption: one request asks both, as one batch whose
questions go to the vqa workers and captions to the captioning workers, each image sent once. An image whose pairs are
all settled in OUT is not asked again; one with some settled is asked the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from blipq.client import CAPTION, VQA, is_image_url

MAX_FILES_PER_UPLOAD = 64  # images in one multipart request: a failed request re-sends little
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # about this many image bytes per multipart request (one larger file goes alone)
QUESTION_KEY, PROMPT_KEY = "question", "prompt"  # what a text is in OUT's lines (blipq/tag_lines.py TEXT_KEYS)

Asked = tuple[str, str]  # (QUESTION_KEY, a question) or (PROMPT_KEY, a caption's prompt, "" for none)


@dataclass
class Request:
    """One batch request: its images, what is asked of each (questions, then a caption's prompt), and once submitted
    its id and the items seen ended. Its items are image by image, each image's in `asked`'s order.

    A request `refused` here (one file, checked before it was sent) is never sent: its lines say why.
    """

    images: list[str]
    asked: list[Asked]
    batch_id: str = ""
    shown: int = 0
    refused: dict[str, str] | None = None

    @property
    def questions(self) -> list[str]:
        return [text for key, text in self.asked if key == QUESTION_KEY]

    @property
    def prompt(self) -> str | None:
        """The caption's prompt ("" for none), or None when no caption is asked."""
        return next((text for key, text in self.asked if key == PROMPT_KEY), None)

    @property
    def tasks(self) -> list[str]:
        """The tasks its items are answered by."""
        return [VQA] * bool(self.questions) + [CAPTION] * (self.prompt is not None)


def file_bytes(image: str) -> int:
    """What a local file adds to its upload: its size."""
    return Path(image).stat().st_size


def plan_requests(
    images: Iterable[tuple[str, tuple[Asked, ...]]],
    per_request: int,
    screen: Callable[[str], dict[str, str] | None] = lambda image: None,
    upload_bytes: Callable[[str], int] = file_bytes,
) -> Iterator[Request]:
    """Group images, in the order read, with what is still to ask of each, into tagging-shape requests (images x
    asked) of at most `per_request` answers, and uploads of at most MAX_FILES_PER_UPLOAD files and about
    MAX_UPLOAD_BYTES (`upload_bytes` says what a file will add: less than its size when it is shrunk first).

    Consecutive images that need the same asked go together; URLs and local files never share a request. An image
    that `screen` refuses goes alone, as a request refused with its error, never sent.
    """
    run: list[str] = []
    run_key: tuple[bool, tuple[Asked, ...]] | None = None
    size = 0
    for image, asked in images:
        if not asked:
            continue
        refused = screen(image)
        if refused is not None:
            yield Request([image], list(asked), refused=refused)
            continue
        is_url = is_image_url(image)
        for first in range(0, len(asked), per_request):
            part = asked[first : first + per_request]
            image_size = 0 if is_url else upload_bytes(image)
            most = (
                max(1, per_request // len(part))
                if is_url
                else min(max(1, per_request // len(part)), MAX_FILES_PER_UPLOAD)
            )
            if run and ((is_url, part) != run_key or len(run) == most or size + image_size > MAX_UPLOAD_BYTES):
                assert run_key is not None
                yield Request(run, list(run_key[1]))
                run, size = [], 0
            run_key = (is_url, part)
            run.append(image)
            size += image_size
    if run and run_key is not None:
        yield Request(run, list(run_key[1]))
