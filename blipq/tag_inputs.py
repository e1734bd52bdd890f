"""The inputs of `blipq tag`: the images named, found in directories and read from `--urls`, and the check of each
local file before it is sent.

A file is checked against the service's own limits (`limits` of GET /v1/models) with the service's own header check
(contract.images.open_image, which reads the header alone): a file the service would refuse is not sent, and
its lines say why, with the code the service would give.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blipq.client import OTHER_SCHEME, BlipqClientError, check_image_source, is_image_url
from contract.errors import ImageInvalidError, ImageTooLargeError
from contract.images import open_image

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
UNLIMITED_PIXELS = 1 << 62  # a service that does not publish its limits: the header check tells the format alone


class TagInputError(Exception):
    """Raised when an input is neither an http(s) URL nor an existing file or directory."""


@dataclass(frozen=True)
class FileLimits:
    """The service's limits that a local file is checked against before it is sent (GET /v1/models `limits`)."""

    max_image_bytes: int
    max_image_pixels: int

    @classmethod
    def published(cls, models: dict[str, Any]) -> FileLimits | None:
        """The limits a service publishes, or None (a service that does not: its refusals alone tell)."""
        limits = models.get("limits")
        try:
            return cls(int(limits["max_image_bytes"]), int(limits["max_image_pixels"]))  # type: ignore[index]
        except (TypeError, KeyError, ValueError):
            return None


def check_inputs(inputs: Iterable[str], urls_file: Path | None) -> None:
    """Refuse at once an input that is neither a URL nor a file or directory, and a run with no input at all."""
    for name in inputs:
        if is_image_url(name) or Path(name).is_file() or Path(name).is_dir():
            continue
        scheme = OTHER_SCHEME.match(name)
        if scheme:
            raise TagInputError(
                f"{name!r}: only http(s) URLs, files and directories are accepted, not {scheme[1]}: URLs"
            )
        raise TagInputError(f"{name!r} is not an http(s) URL, a file or a directory")
    if urls_file is not None and not urls_file.is_file():
        raise TagInputError(f"{str(urls_file)!r} (--urls) is not a file")
    if next(iter_images(inputs, urls_file), None) is None:
        raise TagInputError("no image: name URLs, files or directories, or a file of URLs with --urls")


def iter_images(inputs: Iterable[str], urls_file: Path | None) -> Iterator[str]:
    """The images to tag, each once, as they are read: URLs and files as named, directories' image files, and
    `urls_file`'s lines (one at a time). Repeats are recognised by a hash of the name, not kept whole."""
    seen: set[int] = set()

    def named() -> Iterator[str]:
        for name in inputs:
            if not is_image_url(name) and Path(name).is_dir():
                found = (path for path in Path(name).rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
                yield from (str(path) for path in sorted(found) if path.is_file())
            else:
                yield name
        if urls_file is not None:
            with urls_file.open(encoding="utf-8") as lines:
                for line in lines:
                    if url := line.split("#", 1)[0].strip():
                        yield url

    for image in named():
        if hash(image) not in seen:
            seen.add(hash(image))
            yield image


def check_file(image: str, limits: FileLimits | None) -> dict[str, str] | None:
    """Why the service would refuse a local file, found here before it is sent (`{"code", "message"}`), or None.

    An http(s) URL is the workers' to fetch: it passes. Another URL (ftp://, s3://...) is refused, as the service
    would; a file is read and its header checked as the service checks an upload (contract.images.open_image).
    """
    if is_image_url(image):
        return None
    try:
        check_image_source(image)
        check_header(read_file(image, limits), limits)
    except ImageTooLargeError as exc:
        return {"code": exc.code, "message": exc.message}
    except ImageInvalidError as exc:
        return {"code": exc.code, "message": exc.message}
    except BlipqClientError as exc:
        return {"code": exc.code, "message": exc.message}
    except OSError as exc:
        return unreadable(exc)
    return None


def read_file(image: str, limits: FileLimits | None) -> bytes:
    """A local file's bytes; ImageTooLargeError when it is over the service's BLIPQ_MAX_IMAGE_BYTES."""
    if limits is not None and (size := Path(image).stat().st_size) > limits.max_image_bytes:
        limit = limits.max_image_bytes
        raise ImageTooLargeError(f"the file is {size} bytes; the service takes at most {limit} (BLIPQ_MAX_IMAGE_BYTES)")
    return Path(image).read_bytes()


def check_header(data: bytes, limits: FileLimits | None) -> None:
    """Check an image's format and pixels from its header, as the service does an upload's."""
    try:
        open_image(data, UNLIMITED_PIXELS if limits is None else limits.max_image_pixels)
    except ImageTooLargeError as exc:
        raise ImageTooLargeError(f"{exc.message} (the service's BLIPQ_MAX_IMAGE_PIXELS)") from None


def unreadable(exc: OSError) -> dict[str, str]:
    """The error of a local file that cannot be read: transient, it is tried again on a re-run."""
    return {"code": "file_unreadable", "message": f"cannot read the file: {exc.strerror or exc}"}
