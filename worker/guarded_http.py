"""HTTP connections for requests and urllib3 whose sockets go only where the address guard (worker/netguard.py) allows.

Why hand-written: `advocate`, the requests wrapper made for this job, last shipped in 2020 (1.0.0) and requires
urllib3<2, netifaces and pyOpenSSL; it cannot run beside requests 2.32 and urllib3 2. No other maintained library
does it on requests. The guard needs little code: a urllib3 connection class whose socket creation goes through the
guard (worker/netguard.py: one lookup, every answer checked, a connection to the very addresses checked). Only the
socket's peer changes: the URL's host still gives the Host header, TLS SNI and the certificate check.

Keep-alive: a connection is kept for the next request only in the pool of the scheme, host and port it was opened
for (urllib3's pools, thread-safe), and its socket stays connected to the address checked when it was opened; every
new connection resolves and checks again, so a name whose answer turns private is refused at the next connection.
The pools are bounded (hosts, idle connections per host), and idle connections close after a keep-alive timeout, from
a thread that runs while any is idle. A request that meets the host's close of a kept connection (the host's idle
timeout raced ours) is sent once more on a new connection, within what was left of its read timeout. Redirects are
requests like any other: each hop is checked, and a hop to another host connects (and checks) afresh.
"""

from __future__ import annotations

import queue
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any

from requests.adapters import DEFAULT_POOLBLOCK, HTTPAdapter
from urllib3 import PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ClosedPoolError,
    ConnectTimeoutError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.response import BaseHTTPResponse, HTTPResponse
from urllib3.util import Timeout

from contract.errors import UrlNotAllowedError
from worker.keepalive import KEEPALIVE_S, KEPT_HOSTS, KEPT_PER_HOST, IdleConnections, IdleQueue
from worker.netguard import AddressGuard
from worker.timers import TIMERS

if TYPE_CHECKING:
    from urllib3._base_connection import BaseHTTPConnection

# Errors that, on a kept connection and before any byte of an answer, mean the host closed it meanwhile.
STALE_CONNECTION_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError)
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # safe to send twice (RFC 9110): no other is sent again


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
