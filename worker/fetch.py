"""Download an image URL within a total deadline and a byte cap, through the address guard; refuse non-images early.

Where the worker may connect is worker.netguard's business; this module bounds what one download may cost: time
(one deadline for the whole download, redirects included, enforced between reads and on every socket read), bytes
(the declared length, then the bytes actually read), and what the body may be (an image Content-Type or none, and
the first bytes of an allowed image format).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import requests
from urllib3.exceptions import HTTPError as TransportError
from urllib3.exceptions import TimeoutError as TransportTimeoutError

from worker.contract.errors import ImageFetchError, ImageFetchTimeoutError, ImageInvalidError, ImageTooLargeError
from worker.contract.images import ALLOWED_FORMATS, SNIFF_BYTES, sniff_image_format
from worker.netguard import AddressGuard, GuardedAdapter, NetworkPolicy, Resolver, check_url

CHUNK_BYTES = 64 * 1024  # the most one read returns
MAX_REDIRECTS = 3
OCTET_STREAM_TYPES = ("application/octet-stream", "binary/octet-stream")  # what object stores often say of images


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one image download and decode."""

    max_bytes: int
    max_pixels: int
    connect_timeout_s: float
    total_timeout_s: float


def new_session(policy: NetworkPolicy | None = None, resolver: Resolver = socket.getaddrinfo) -> requests.Session:
    """A requests session for image downloads that connects only where `policy` allows, never through a proxy.

    Without a policy only public addresses on ports 80 and 443 are reachable. `resolver` (getaddrinfo's signature)
    lets tests decide what names resolve to.
    """
    session = requests.Session()
    session.trust_env = False  # no proxies, .netrc or CA bundles from the environment
    adapter = GuardedAdapter(AddressGuard(policy or NetworkPolicy(), resolver))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # The guarded pools keep no connection open (see GuardedHTTPConnectionPool); this tells the host as much.
    session.headers.update(
        {"User-Agent": "blipq-worker", "Accept": "image/*", "Accept-Encoding": "identity", "Connection": "close"}
    )
    return session


def fetch_image_bytes(session: requests.Session, url: str, limits: FetchLimits) -> bytes:
    """Download `url` within the limits, following at most MAX_REDIRECTS redirects, each checked like the URL.

    Raises UrlNotAllowedError (where the URL or a redirect leads), ImageFetchTimeoutError, ImageTooLargeError,
    ImageInvalidError (the body is not an image) or ImageFetchError (anything else).
    """
    deadline = time.monotonic() + limits.total_timeout_s
    target = url
    try:
        for _ in range(MAX_REDIRECTS + 1):
            check_url(target)
            if not isinstance(session.get_adapter(target), GuardedAdapter):
                raise TypeError("fetch_image_bytes needs a session from new_session(): others reach any address")
            timeout = (min(limits.connect_timeout_s, _remaining(deadline, limits)), _remaining(deadline, limits))
            with session.get(target, stream=True, allow_redirects=False, timeout=timeout) as response:
                if not response.is_redirect:
                    return _read_image(response, limits, deadline)
                target = urljoin(response.url, session.get_redirect_target(response) or "")
    except (requests.Timeout, TransportTimeoutError):
        raise ImageFetchTimeoutError(f"the download took over {limits.total_timeout_s:g} s") from None
    except (requests.RequestException, TransportError) as exc:
        raise ImageFetchError(f"could not download {url}: {type(exc).__name__}") from None
    raise ImageFetchError(f"more than {MAX_REDIRECTS} redirects for {url}")


def _remaining(deadline: float, limits: FetchLimits) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ImageFetchTimeoutError(f"the download took over {limits.total_timeout_s:g} s")
    return remaining


def _read_image(response: requests.Response, limits: FetchLimits, deadline: float) -> bytes:
    """Check the status and headers, then read the body in chunks within the byte cap and the deadline."""
    if response.status_code >= 300:
        raise ImageFetchError(f"the image host answered HTTP {response.status_code} for {response.url}")
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if media_type and not media_type.startswith("image/") and media_type not in OCTET_STREAM_TYPES:
        raise ImageInvalidError(f"the image URL served {media_type}, not an image")
    declared = response.headers.get("Content-Length", "").strip()
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise ImageTooLargeError(f"the image is {declared} bytes; the limit is {limits.max_bytes}")
    body = bytearray()
    sniffed = False
    while chunk := _read_some(response.raw, deadline, limits):
        body += chunk
        if len(body) > limits.max_bytes:
            raise ImageTooLargeError(f"the image is over the limit of {limits.max_bytes} bytes")
        if not sniffed and len(body) >= SNIFF_BYTES:
            _check_signature(body)
            sniffed = True
    if body and not sniffed:
        _check_signature(body)
    return bytes(body)


def _read_some(raw: Any, deadline: float, limits: FetchLimits) -> bytes:
    """One read of whatever has arrived (read1: not a wait for a full chunk), its socket timeout cut to what is left."""
    remaining = _remaining(deadline, limits)
    connection = raw.connection
    if connection is not None and connection.sock is not None:
        connection.sock.settimeout(remaining)
    data: bytes = raw.read1(CHUNK_BYTES, decode_content=True)  # decoding, if the host compressed anyway, is bounded
    return data


def _check_signature(body: bytearray) -> None:
    if sniff_image_format(bytes(body[:SNIFF_BYTES])) is None:
        raise ImageInvalidError(f"the image URL served a body that is not a {', '.join(ALLOWED_FORMATS)} image")
