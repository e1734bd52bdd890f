"""Download and decode images with bounds on time, bytes and pixels. Imports no torch: the API shares it."""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass

import requests
from PIL import Image, ImageOps

from worker.errors import ImageFetchError, ImageFetchTimeoutError, ImageInvalidError, ImageTooLargeError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
CHUNK_BYTES = 64 * 1024  # one streamed read
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one image download and decode."""

    max_bytes: int
    max_pixels: int
    connect_timeout_s: float
    total_timeout_s: float


def new_session() -> requests.Session:
    """A requests session for image downloads: few redirects, no proxies taken from the environment."""
    session = requests.Session()
    session.max_redirects = MAX_REDIRECTS
    session.trust_env = False
    session.headers["User-Agent"] = "blipq-worker"
    return session


def fetch_image_bytes(session: requests.Session, url: str, limits: FetchLimits) -> bytes:
    """Download `url` within a total deadline and a byte cap, streaming; raises ImageFetchError and kin."""
    deadline = time.monotonic() + limits.total_timeout_s
    try:
        with session.get(url, stream=True, timeout=(limits.connect_timeout_s, limits.total_timeout_s)) as response:
            if response.status_code >= 400:
                raise ImageFetchError(f"the image host answered HTTP {response.status_code} for {url}")
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limits.max_bytes:
                raise ImageTooLargeError(f"the image is {declared} bytes; the limit is {limits.max_bytes}")
            body = bytearray()
            for chunk in response.iter_content(CHUNK_BYTES):
                body += chunk
                if len(body) > limits.max_bytes:
                    raise ImageTooLargeError(f"the image is over the limit of {limits.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ImageFetchTimeoutError(f"the download took over {limits.total_timeout_s:g} s")
            return bytes(body)
    except requests.Timeout:
        raise ImageFetchTimeoutError(f"the image host did not answer within {limits.total_timeout_s:g} s") from None
    except requests.TooManyRedirects:
        raise ImageFetchError(f"more than {MAX_REDIRECTS} redirects for {url}") from None
    except requests.RequestException as exc:
        raise ImageFetchError(f"could not download {url}: {type(exc).__name__}") from None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open image bytes lazily (header only) and check the format and pixel count; raises ImageInvalidError."""
    if not data:
        raise ImageInvalidError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageTooLargeError("the image has too many pixels") from None
    except (OSError, ValueError, SyntaxError):
        raise ImageInvalidError(f"not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})") from None
    if image.width * image.height > max_pixels:
        raise ImageTooLargeError(f"the image is {image.width}x{image.height}; the limit is {max_pixels} pixels")
    return image


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode image bytes fully into an RGB image with its EXIF orientation applied."""
    image = open_image(data, max_pixels)
    try:
        image.load()  # a truncated file fails here, not later in the model
        image = ImageOps.exif_transpose(image) or image
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ImageInvalidError("the image could not be decoded (truncated or corrupt)") from None
