"""Where the image fetcher may connect: public addresses on ports 80 and 443, checked on the socket actually opened.

Why hand-written: `advocate`, the requests wrapper made for this job, last shipped in 2020 (1.0.0) and requires
urllib3<2, netifaces and pyOpenSSL; it cannot run beside requests 2.32 and urllib3 2. No other maintained library
does it on requests. The guard needs little code: a urllib3 connection class whose socket creation resolves the host
once, refuses the name if ANY answer is refused, and connects to the very addresses it checked, so a DNS answer that
changes between check and connect (rebinding) never reaches a socket, and every spelling of an address (2130706433,
0177.0.0.1, 0x7f.0.0.1, 127.1, ::ffff:7f00:1) is judged as the number the resolver makes of it. Only the socket's
peer changes: the URL's host still gives the Host header, TLS SNI and the certificate check.

Keep-alive: a connection is kept for the next request only in the pool of the scheme, host and port it was opened
for (urllib3's pools, thread-safe), and its socket stays connected to the address checked when it was opened; every
new connection resolves and checks again, so a name whose answer turns private is refused at the next connection.
The pools are bounded (hosts, idle connections per host), and idle connections close after a keep-alive timeout, from
a thread that runs while any is idle. A request that meets the host's close of a kept connection (the host's idle
timeout raced ours) is sent once more on a new connection, within what was left of its read timeout. Redirects are
requests like any other: each hop is checked, and a hop to another host connects (and checks) afresh.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from requests.adapters import DEFAULT_POOLBLOCK, HTTPAdapter
from urllib3 import PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.response import BaseHTTPResponse, HTTPResponse
from urllib3.util import Timeout, parse_url

from contract.errors import ImageFetchError, UrlNotAllowedError
from worker.keepalive import KEEPALIVE_S, KEPT_HOSTS, KEPT_PER_HOST, IdleConnections, IdleQueue
from worker.timers import TIMERS

if TYPE_CHECKING:
    from urllib3._base_connection import BaseHTTPConnection

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AddressInfo = tuple[Any, Any, int, str, tuple[Any, ...]]  # one getaddrinfo() answer
Resolver = Callable[[str, int, int, int], Sequence[AddressInfo]]  # (host, port, family, type), like getaddrinfo

SCHEMES = ("http", "https")
DEFAULT_PORTS = (80, 443)  # always allowed; BLIPQ_FETCH_ALLOW_PORTS adds others
PUBLIC_ONLY = "images are fetched from public addresses only"

# Errors that, on a kept connection and before any byte of an answer, mean the host closed it meanwhile.
STALE_CONNECTION_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # safe to send twice (RFC 9110): no other is sent again

CARRIER_GRADE_NAT = ipaddress.ip_network("100.64.0.0/10")  # not is_private, not is_global either
NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 address
NAT64_LOCAL_USE = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215: the embedding is the operator's choice
TEREDO = ipaddress.ip_network("2001::/32")  # the client address is obfuscated: refused whole
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d

# What makes an address refused, first match wins. ipaddress's properties alone miss some ranges (224/4 and ff00::/8
# count as is_global; older Pythons call 64:ff9b:1::/48 global), hence the explicit networks.
REFUSED_KINDS: tuple[tuple[str, Callable[[IPAddress], bool]], ...] = (
    ("an unspecified address", lambda address: address.is_unspecified),
    ("a loopback address", lambda address: address.is_loopback),
    ("a link-local address", lambda address: address.is_link_local),  # 169.254.169.254: cloud metadata
    ("a multicast address", lambda address: address.is_multicast),
    ("a carrier-grade NAT address", lambda address: address in CARRIER_GRADE_NAT),
    ("a local-use NAT64 address", lambda address: address in NAT64_LOCAL_USE),
    ("a Teredo address", lambda address: address in TEREDO),
    ("an IPv4-compatible address (deprecated)", lambda address: address in IPV4_COMPATIBLE),
    ("a reserved address", lambda address: address.is_reserved),
    ("a private address", lambda address: address.is_private),
    ("a site-local address", lambda address: isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
    ("an address that is not publicly routable", lambda address: not address.is_global),
)


@dataclass(frozen=True)
class NetworkPolicy:
    """Where the fetcher may connect besides public addresses on ports 80 and 443."""

    allow_networks: tuple[IPNetwork, ...] = ()  # fetched although private (tests, on-premise image stores)
    allow_ports: tuple[range, ...] = ()  # besides 80 and 443

    def port_allowed(self, port: int) -> bool:
        """Whether a URL may use this TCP port."""
        return port in DEFAULT_PORTS or any(port in ports for ports in self.allow_ports)

    def refusal_reason(self, address: IPAddress) -> str | None:
        """Why the fetcher must not connect to `address` ("a private address", ...), or None when it may.

        An allowed network also allows its IPv4-mapped form (the same socket destination), not its NAT64 or 6to4
        forms: those reach the IPv4 address through a gateway elsewhere, so they must embed a public address.
        """
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        forms = [address] if mapped is None else [address, mapped]
        if any(form in network for form in forms for network in self.allow_networks):
            return None
        return public_refusal_reason(address)


def public_refusal_reason(address: IPAddress) -> str | None:
    """Why `address` is not a public address ("a loopback address", ...), or None when it is."""
    if isinstance(address, ipaddress.IPv6Address) and not (address.is_loopback or address.is_unspecified):
        embedded = embedded_ipv4(address)
        if embedded is not None:  # the packets go to the IPv4 address: judge that one
            form, ipv4 = embedded
            reason = public_refusal_reason(ipv4)
            return None if reason is None else f"{form} of {ipv4}, {reason}"
    return next((kind for kind, applies in REFUSED_KINDS if applies(address)), None)


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), with the name of the form."""
    if address.ipv4_mapped is not None:
        return "the IPv4-mapped form", address.ipv4_mapped
    if address in NAT64_WELL_KNOWN:
        return "the NAT64 form", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return "the 6to4 form", address.sixtofour
    return None


def check_url(url: str) -> None:
    """Refuse a URL that is not http(s) or that carries credentials; its address is checked when connecting."""
    try:
        parts = urlsplit(url)
        auth = parse_url(url).auth
    except (ValueError, LocationParseError):
        raise ImageFetchError(f"the image URL {url!r} does not parse") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise UrlNotAllowedError(f"the image URL's scheme is {scheme or 'missing'}; only http and https are fetched")
    if auth is not None or parts.username is not None or parts.password is not None:
        raise UrlNotAllowedError("the image URL carries credentials (user:password@), which the worker never sends")


class AddressGuard:
    """Resolves a host once, refuses it if any answer is refused, and connects only to the addresses it checked."""

    def __init__(self, policy: NetworkPolicy, resolver: Resolver = socket.getaddrinfo) -> None:
        self.policy = policy
        self.resolver = resolver

    def resolve(self, host: str, port: int, timeout: float | None = None) -> list[AddressInfo]:
        """Resolve `host` within `timeout` and check the port and every answer.

        Raises UrlNotAllowedError, socket.gaierror, or TimeoutError when the resolver is slower than `timeout`.
        """
        if not self.policy.port_allowed(port):
            raise UrlNotAllowedError(f"the image URL's port {port} is not allowed (80, 443 and configured ones are)")
        answers = self._lookup(host, port, timeout)
        for answer in answers:
            address = _address_of(answer)
            reason = self.policy.refusal_reason(address) if address is not None else "an address that cannot be checked"
            if reason is not None:
                said = f"is {reason}" if host == str(address) else f"resolves to {address}, {reason}"
                raise UrlNotAllowedError(f"the image host {host} {said}; {PUBLIC_ONLY}")
        return answers

    def _lookup(self, host: str, port: int, timeout: float | None) -> list[AddressInfo]:
        # getaddrinfo() takes no timeout and a slow DNS server can hold it for many seconds: it runs in a daemon
        # thread that is left behind (until the system resolver gives up) when it takes longer than the budget.
        outcome: list[list[AddressInfo] | BaseException] = []

        def lookup() -> None:
            try:
                outcome.append(list(self.resolver(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)))
            except BaseException as exc:  # handed to the caller's thread, raised there
                outcome.append(exc)

        thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
        thread.start()
        thread.join(timeout)
        if not outcome:
            raise TimeoutError(f"resolving {host} took over {timeout} s")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def connect(
        self, host: str, port: int, timeout: float | None, socket_options: Sequence[tuple[int, int, Any]] | None
    ) -> socket.socket:
        """A TCP socket connected to one of the checked addresses of `host`, tried in the resolver's order.

        `timeout` bounds the lookup and the connection attempts together.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        error: OSError = OSError(f"{host} resolves to no address")
        for family, kind, proto, _, sockaddr in self.resolve(host.strip("[]"), port, timeout):
            sock = socket.socket(family, kind, proto)
            try:
                for option in socket_options or ():
                    sock.setsockopt(*option)
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"connecting to {host} took over {timeout} s")
                    sock.settimeout(left)
                sock.connect(sockaddr)  # the very address checked above: no second lookup
                return sock
            except OSError as exc:
                sock.close()
                error = exc
        raise error


def _address_of(answer: AddressInfo) -> IPAddress | None:
    try:
        return ipaddress.ip_address(answer[4][0])
    except (ValueError, IndexError, TypeError):
        return None


@contextmanager
def _cut_off_after(seconds: object, current_socket: Callable[[], socket.socket | None]) -> Iterator[None]:
    """Shut the socket down when the block runs longer than `seconds` in all: a socket timeout bounds one read only,
    so a server that drips one byte at a time would otherwise hold the connection for as long as it likes."""
    if not isinstance(seconds, int | float):
        yield
        return
    fired = threading.Event()

    def cut() -> None:
        fired.set()
        sock = current_socket()
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    cutoff = TIMERS.call_later(seconds, cut)
    try:
        yield
    except Exception as exc:
        if fired.is_set():  # urllib3 turns a TimeoutError here into its own timeout errors
            raise TimeoutError(f"the image host took over {seconds:g} s") from exc
        raise
    finally:
        cutoff.cancel()


class GuardedHTTPConnection(HTTPConnection):
    """An HTTP connection whose socket goes only to an address the guard checked, with headers due in one budget."""

    def __init__(self, *args: Any, address_guard: AddressGuard, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.address_guard = address_guard
        self.idle_since = 0.0  # when it was last put back in its pool (time.monotonic)

    def _new_conn(self) -> socket.socket:
        # urllib3's own _new_conn with create_connection() replaced by the guard; the same errors come out.
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        try:
            sock = self.address_guard.connect(self._dns_host, self.port, timeout, self.socket_options)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out ({self.timeout} s)") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc
        sys.audit("http.client.connect", self, self.host, self.port)
        return sock

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        """Read the status line and headers within the read timeout in all, not per read."""
        with _cut_off_after(self.timeout, lambda: self.sock):
            return super().getresponse()


class GuardedHTTPSConnection(GuardedHTTPConnection, HTTPSConnection):
    """The HTTPS kind: SNI and the certificate check still use the URL's host; the handshake has one budget too."""

    def connect(self) -> None:
        with _cut_off_after(self.timeout, lambda: self.sock):
            super().connect()


class GuardedHTTPConnectionPool(HTTPConnectionPool):
    """A pool of guarded HTTP connections for one scheme, host and port: it keeps at most its size of them idle, each
    for `keepalive_s` (0: none), and sends a request once more when a kept connection turns out closed by the host."""

    ConnectionCls = GuardedHTTPConnection
    QueueCls = IdleQueue
    keepalive_s = 0.0  # set by the pool manager, with idle_connections
    idle_connections: IdleConnections | None = None

    def _get_conn(self, timeout: float | None = None) -> BaseHTTPConnection:
        try:
            conn = super()._get_conn(timeout)
        except ClosedPoolError:  # dropped by the manager (too many hosts) after this request picked it
            return self._new_conn()  # closed, not kept, when put back
        if not conn.is_closed and time.monotonic() - getattr(conn, "idle_since", 0.0) >= self.keepalive_s:
            conn.close()  # idle too long: reconnect (and check) rather than race the host's own timeout
        return conn

    def _put_conn(self, conn: BaseHTTPConnection | None) -> None:
        # urllib3's, less its warning on a full pool: more requests at once than the pool keeps is the normal case.
        keep = isinstance(conn, GuardedHTTPConnection) and not conn.is_closed and self.keepalive_s > 0
        if isinstance(conn, GuardedHTTPConnection) and keep:
            conn.idle_since = time.monotonic()
        elif conn is not None:
            conn.close()
        pool = self.pool
        if pool is not None:
            try:
                pool.put(conn, block=False)
            except queue.Full:
                pass
            else:
                if keep and isinstance(pool, IdleQueue) and self.idle_connections is not None:
                    self.idle_connections.kept(pool)
                return
        if conn is not None:  # the pool is full, or was closed: the connection is not kept
            conn.close()

    def _make_request(
        self, conn: BaseHTTPConnection, method: str, url: str, *args: Any, **kwargs: Any
    ) -> BaseHTTPResponse:
        reused = not conn.is_closed  # a kept connection, open since another request
        started = time.monotonic()
        try:
            return super()._make_request(conn, method, url, *args, **kwargs)
        except STALE_CONNECTION_ERRORS:
            if not (reused and method in IDEMPOTENT_METHODS and kwargs.get("body") is None and not args):
                raise
        # The host closed the kept connection as the request went out: once more on a new connection (resolved and
        # checked again), within what was left of the read timeout. Nothing else is sent twice.
        conn.close()
        kwargs["timeout"] = self._timeout_left(kwargs.get("timeout"), time.monotonic() - started, url)
        return super()._make_request(conn, method, url, *args, **kwargs)

    def _timeout_left(self, timeout: object, spent_s: float, url: str) -> object:
        if not isinstance(timeout, Timeout) or not isinstance(timeout.read_timeout, int | float):
            return timeout
        left = timeout.read_timeout - spent_s
        if left <= 0:
            raise ReadTimeoutError(self, url, f"Read timed out. (read timeout={timeout.read_timeout})")
        connect = timeout.connect_timeout
        return Timeout(connect=min(connect, left) if isinstance(connect, int | float) else left, read=left)


class GuardedHTTPSConnectionPool(GuardedHTTPConnectionPool, HTTPSConnectionPool):
    """The HTTPS kind."""

    ConnectionCls = GuardedHTTPSConnection


class GuardedPoolManager(PoolManager):
    """A urllib3 pool manager whose pools make guarded connections only, and keep idle ones `keepalive_s` at most."""

    def __init__(self, address_guard: AddressGuard, keepalive_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.address_guard = address_guard
        self.keepalive_s = keepalive_s
        self.idle_connections = IdleConnections(keepalive_s)
        self.pool_classes_by_scheme = {"http": GuardedHTTPConnectionPool, "https": GuardedHTTPSConnectionPool}

    def _new_pool(
        self, scheme: str, host: str, port: int, request_context: dict[str, Any] | None = None
    ) -> HTTPConnectionPool:
        # Added here, after the pool key is made from the context: PoolKey has no field for the guard.
        context = dict(self.connection_pool_kw if request_context is None else request_context)
        context["address_guard"] = self.address_guard
        pool = super()._new_pool(scheme, host, port, context)
        if isinstance(pool, GuardedHTTPConnectionPool):
            pool.keepalive_s, pool.idle_connections = self.keepalive_s, self.idle_connections
        return pool


class GuardedAdapter(HTTPAdapter):
    """A requests transport that connects only where its guard allows, never through a proxy, retrying only a request
    that met the host's close of a kept connection; it keeps idle connections to `max_hosts` hosts, `per_host` each."""

    def __init__(
        self,
        address_guard: AddressGuard,
        keepalive_s: float = KEEPALIVE_S,
        max_hosts: int = KEPT_HOSTS,
        per_host: int = KEPT_PER_HOST,
    ) -> None:
        self.address_guard = address_guard  # before super().__init__, which builds the pool manager
        self.keepalive_s = keepalive_s
        super().__init__(pool_connections=max_hosts, pool_maxsize=per_host, max_retries=0)

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = DEFAULT_POOLBLOCK, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager = GuardedPoolManager(
            self.address_guard, self.keepalive_s, num_pools=connections, maxsize=maxsize, block=block, **pool_kwargs
        )

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        raise UrlNotAllowedError("image downloads never go through a proxy")
