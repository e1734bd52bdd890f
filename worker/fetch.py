"""Download an image URL within a total deadline and a byte cap, through the address guard; refuse non-images early.

Where the worker may connect is worker.netguard's business; this module bounds what one download may cost: time
(one deadline for the whole download, redirects included, enforced between reads and on every socket read), bytes
(the declared length, then the bytes actually read), and what the body may be (an image Content-Type or none, and
the first bytes of an allowed image format). A failed download's message names its cause (`failure_cause`). One
session (`new_session`) serves all of a worker's threads; the connections it keeps are worker.guarded_http's business.
"""

from __future__ import annotations

import http.client
import http.cookiejar
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from urllib3.exceptions import HTTPError as TransportError
from urllib3.exceptions import TimeoutError as TransportTimeoutError

from contract.errors import ImageFetchError, ImageFetchTimeoutError, ImageInvalidError, ImageTooLargeError
from contract.images import ALLOWED_FORMATS, SNIFF_BYTES, sniff_image_format
from worker.guarded_http import GuardedAdapter
from worker.keepalive import KEEPALIVE_S, KEPT_HOSTS, KEPT_PER_HOST
from worker.netguard import AddressGuard, NetworkPolicy, Resolver, check_url

CHUNK_BYTES = 64 * 1024  # the most one read returns
MAX_REDIRECTS = 3
OCTET_STREAM_TYPES = ("application/octet-stream", "binary/octet-stream")  # what object stores often say of images

# Why a download failed, in words: the first kind found among the wrapped errors wins ({detail}: the error's own).
CAUSES: tuple[tuple[type[BaseException], str], ...] = (
    (socket.gaierror, "the image host {host} does not resolve ({detail})"),
    (ssl.SSLCertVerificationError, "the image host {host}'s TLS certificate was refused ({detail})"),
    (ssl.SSLError, "TLS with the image host {host} failed ({detail})"),
    (ConnectionRefusedError, "the image host {host} refused the connection"),
    (http.client.IncompleteRead, "the image host {host} closed the connection before the end of the image"),
    (http.client.RemoteDisconnected, "the image host {host} closed the connection without answering"),  # a reset too
    (ConnectionResetError, "the image host {host} reset the connection"),
    (http.client.HTTPException, "the image host {host} answered something that is not HTTP ({kind})"),
    (OSError, "the image host {host} could not be reached ({detail})"),
)


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one image download and decode."""

    max_bytes: int
    max_pixels: int
    connect_timeout_s: float
    total_timeout_s: float


def new_session(
    policy: NetworkPolicy | None = None,
    resolver: Resolver = socket.getaddrinfo,
    *,
    keepalive_s: float = KEEPALIVE_S,
    max_hosts: int = KEPT_HOSTS,
    per_host: int = KEPT_PER_HOST,
) -> requests.Session:
    """A requests session for image downloads that connects only where `policy` allows, never through a proxy.

    Without a policy only public addresses on ports 80 and 443 are reachable. `resolver` (getaddrinfo's signature)
    lets tests decide what names resolve to. Idle connections are kept `keepalive_s` (0: none), to `max_hosts` hosts,
    `per_host` each. One session may serve any number of threads: it keeps no cookie.
    """
    session = requests.Session()
    session.trust_env = False  # no proxies, .netrc or CA bundles from the environment
    # Shared by all of a worker's threads and jobs: a cookie one image host set would go with another job's request.
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = GuardedAdapter(AddressGuard(policy or NetworkPolicy(), resolver), keepalive_s, max_hosts, per_host)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update({"User-Agent": "blipq-worker", "Accept": "image/*", "Accept-Encoding": "identity"})
    if keepalive_s <= 0:
        session.headers["Connection"] = "close"  # the pools keep no connection: tell the host as much
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
        host = urlsplit(target).hostname or target
        raise ImageFetchError(f"could not download {url}: {failure_cause(exc, host)}") from None
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


def failure_cause(exc: BaseException, host: str) -> str:
    """What went wrong with a request to `host`, in words ("the image host h refused the connection"), read from the
    socket's, the resolver's or TLS's error that the transport's errors wrap."""
    chain = list(_causes(exc))
    for kind, wording in CAUSES:
        error = next((error for error in reversed(chain) if isinstance(error, kind)), None)  # the innermost
        if error is not None:
            return wording.format(host=host, detail=_detail(error), kind=type(error).__name__)
    return f"the request to the image host {host} failed ({_detail(chain[-1])})"


def _detail(error: BaseException) -> str:
    """The error's own words: a certificate's verify message, TLS's reason, the system's strerror, else its text."""
    for attribute in ("verify_message", "reason", "strerror"):
        words = getattr(error, attribute, None)
        if isinstance(words, str) and words:
            return words
    return str(error)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and what it wraps (causes, contexts, urllib3's `reason`, exceptions among the arguments), outside in."""
    pending, seen = [exc], set()
    while pending:
        error = pending.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        inner = [error.__cause__, error.__context__, getattr(error, "reason", None), *error.args]
        pending += [item for item in inner if isinstance(item, BaseException)]
