"""Image URLs reach public addresses only, checked where the socket is opened; a hostile host costs one deadline.

Real servers on loopback play both parts: `origin` on 127.0.0.1 is allowed by the tests' policy, and canaries on
127.0.0.2 and [::1], on the same port, count every connection they accept. A refused case asserts its code AND that
no canary saw a connection. Addresses outside loopback are never connected to, not even by a broken guard: their
cases go through AddressGuard.resolve and NetworkPolicy, which decide without a socket.
"""

from __future__ import annotations

import gzip
import ipaddress
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from contract.errors import BlipqError
from tests.support.hostile import HTML_PAGE
from tests.support.images import shape_png
from tests.support.service import WorkerProcess, wait_for_job
from worker.fetch import FetchLimits, fetch_image_bytes, new_session
from worker.netguard import AddressGuard, AddressInfo, NetworkPolicy, Resolver

PNG = shape_png("teal")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOCAL = NetworkPolicy(allow_networks=(ipaddress.ip_network("127.0.0.1/32"),), allow_ports=(range(1024, 65536),))
LIMITS = FetchLimits(max_bytes=100_000, max_pixels=1_000_000, connect_timeout_s=1.0, total_timeout_s=1.5)
DRIP_INTERVAL_S = 0.3
DEADLINE_SLACK_S = 0.75  # a hostile host may cost its deadline plus this, no more
HOLD_S = 1.2  # most of LIMITS.total_timeout_s: what is left is less than the slack
LONG_KEEPALIVE_S = 60.0  # no connection idles this long in a test: what closes, closes for another reason

Route = Callable[["Handler"], None]


@dataclass(frozen=True)
class Exchange:
    """A request as the server saw it: on which connection (the client's address and port), and what it said."""

    peer: tuple[Any, ...]
    path: str
    headers: dict[str, str]


class RecordingServer(ThreadingHTTPServer):
    """A real HTTP server in a thread that counts the connections it accepts and closes, and records each request."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, host: str, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.routes: dict[str, Route] = {}
        self.fallback: Route = serve(b"not found", "text/plain", status=404)
        self.keep_alive = False  # False: the server closes each connection after one request, without saying so
        self.connections = 0
        self.closes = 0  # connections whose server end was closed, when either side ended them
        self.closed_peers: list[tuple[Any, ...]] = []  # the client's end of each, in the order they closed
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self.exchanges: list[Exchange] = []
        self.changed = threading.Condition()  # notified at each connection, request and close
        self.stopping = threading.Event()
        super().__init__((host, port), Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str) -> str:
        host = str(self.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}{path}"

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.changed:
            self.connections += 1  # every accepted connection, before a byte of it is read
            self.changed.notify_all()
        return True

    def shutdown_request(self, request: Any) -> None:
        peer: tuple[Any, ...] = ()
        with suppress(OSError):
            peer = request.getpeername()
        super().shutdown_request(request)
        with self.changed:
            self.closes += 1
            self.closed_peers.append(peer)
            self.changed.notify_all()

    def record(self, handler: Handler) -> None:
        with self.changed:
            self.requests.append((handler.path, handler.headers.get("Host", "")))
            self.exchanges.append(Exchange(handler.client_address, handler.path, dict(handler.headers)))
            self.changed.notify_all()

    def wait_until(self, condition: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        """Whether `condition` (on the counts above) held within `timeout_s`, waking at each change."""
        with self.changed:
            return self.changed.wait_for(condition, timeout_s)

    def hosts_by_connection(self) -> dict[tuple[Any, ...], set[str]]:
        """The Host headers each connection carried."""
        hosts: dict[tuple[Any, ...], set[str]] = {}
        for exchange in self.exchanges:
            hosts.setdefault(exchange.peer, set()).add(exchange.headers.get("Host", ""))
        return hosts

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


class Handler(BaseHTTPRequestHandler):
    server: RecordingServer
    protocol_version = "HTTP/1.1"
    earlier_requests = 0  # requests this connection carried before the current one

    def do_GET(self) -> None:
        self.server.record(self)
        self.server.routes.get(self.path, self.server.fallback)(self)
        self.earlier_requests += 1
        if not self.server.keep_alive:
            self.close_connection = True  # one request per connection: so each fetch is counted, and a short body ends

    def log_message(self, *args: Any) -> None:
        pass


def serve(body: bytes, content_type: str | None = "image/png", status: int = 200, length: int | None = None) -> Route:
    """Answer `body`, declaring `length` bytes (the true length unless told to lie)."""

    def route(handler: Handler) -> None:
        handler.send_response(status)
        if content_type:
            handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body) if length is None else length))
        handler.end_headers()
        with suppress(OSError):
            handler.wfile.write(body)

    return route


def redirect(location: str) -> Route:
    def route(handler: Handler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    return route


def drip_body(handler: Handler) -> None:
    """Headers at once, then the body one byte every DRIP_INTERVAL_S."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    _drip(handler, PNG_SIGNATURE + b"\0" * 992)


def drip_then_stall(handler: Handler) -> None:
    """Headers at once, a few bytes of body one every DRIP_INTERVAL_S, then nothing (the connection stays open)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Content-Length", "1000")
    handler.end_headers()
    _drip(handler, PNG_SIGNATURE[:4])
    silent(handler)


def drip_headers(handler: Handler) -> None:
    """The status line and headers themselves, one byte every DRIP_INTERVAL_S."""
    _drip(handler, b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"a" * 100 + b"\r\n\r\n")


def _drip(handler: Handler, data: bytes) -> None:
    for byte in data:
        if handler.server.stopping.wait(DRIP_INTERVAL_S):
            return
        try:
            handler.wfile.write(bytes([byte]))
        except OSError:  # the client gave up: what the test wants
            return


def silent(handler: Handler) -> None:
    """Read the request, then never answer (until the test ends)."""
    handler.server.stopping.wait(30)


def hang_up(handler: Handler) -> None:
    """Read the request, then close the connection without a byte of answer."""
    handler.close_connection = True


def reset(handler: Handler) -> None:
    """Read the request, then reset the connection (closed at once, with SO_LINGER 0: the client reads ECONNRESET)."""
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    handler.connection.close()  # takes effect as the handler lets go of its files, before the server's FIN
    handler.close_connection = True


def hold_then_hang_up(handler: Handler) -> None:
    """Hold the request for HOLD_S, then close without answering: the host's close as late as it can come."""
    handler.server.stopping.wait(HOLD_S)
    hang_up(handler)


def first_on_a_connection(route: Route, later: Route = hang_up) -> Route:
    """`route` for a connection's first request, `later` for the next: a host whose keep-alive timeout closes a kept
    connection just as a request arrives on it."""

    def answer(handler: Handler) -> None:
        (later if handler.earlier_requests else route)(handler)

    return answer


def serve_closing(body: bytes) -> Route:
    """Answer `body` with `Connection: close`, and close."""

    def route(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.wfile.write(body)
        handler.close_connection = True

    return route


def set_cookie(handler: Handler) -> None:
    """Answer PNG, and set a cookie for the host."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    handler.send_header("Set-Cookie", f"session=secret; Path=/; Domain={handler.headers['Host'].split(':')[0]}")
    handler.send_header("Content-Length", str(len(PNG)))
    handler.end_headers()
    handler.wfile.write(PNG)


def endless(content_type: str = "image/png", chunked: bool = False, head: bytes = PNG_SIGNATURE) -> Route:
    """`head` (an image's first bytes), then zeros without end (bounded at 256 MiB), with no Content-Length."""

    def route(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Transfer-Encoding" if chunked else "Connection", "chunked" if chunked else "close")
        handler.end_headers()
        block = head + b"\0" * (64 * 1024 - len(head))
        with suppress(OSError):
            for _ in range(4096):
                if handler.server.stopping.is_set():
                    return
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)

    return route


@dataclass
class Servers:
    origin: RecordingServer  # 127.0.0.1: the tests' policy allows it
    canary: RecordingServer  # 127.0.0.2, same port: loopback, refused
    canary6: RecordingServer  # [::1], same port: loopback, refused

    def untouched(self) -> bool:
        return self.canary.connections == 0 and self.canary6.connections == 0


@pytest.fixture
def servers() -> Iterator[Servers]:
    """An origin and two canaries on one port; the canaries serve a valid image, so a leak would succeed."""
    for _ in range(10):  # the port that is free on 127.0.0.1 may be taken on 127.0.0.2 or ::1: try another
        started: list[RecordingServer] = []
        try:
            started.append(RecordingServer("127.0.0.1"))
            started += [RecordingServer(host, started[0].port) for host in ("127.0.0.2", "::1")]
        except OSError:
            for server in started:
                server.stop()
            continue
        group = Servers(*started)
        group.origin.routes["/ok.png"] = serve(PNG)
        group.canary.fallback = group.canary6.fallback = serve(PNG)
        yield group
        for server in started:
            server.stop()
        return
    raise RuntimeError("no port free on 127.0.0.1, 127.0.0.2 and ::1 at once")


def resolver_of(names: dict[str, Sequence[str]]) -> Resolver:
    """A resolver that answers `names` with their addresses and every other host as the system does."""

    def resolve(host: str, port: int, family: int = 0, kind: int = 0) -> list[AddressInfo]:
        answers: list[AddressInfo] = []
        for address in names.get(host, [host]):
            answers += socket.getaddrinfo(address, port, family, kind)
        return answers

    return resolve


def fetch(url: str, policy: NetworkPolicy = LOCAL, resolver: Resolver = socket.getaddrinfo) -> bytes:
    return fetch_image_bytes(new_session(policy, resolver), url, LIMITS)


def refusal(url: str, policy: NetworkPolicy = LOCAL, resolver: Resolver = socket.getaddrinfo) -> BlipqError:
    with pytest.raises(BlipqError) as raised:
        fetch(url, policy, resolver)
    return raised.value


def test_the_canaries_answer_whoever_is_allowed_to_reach_them(servers: Servers) -> None:
    everything_local = NetworkPolicy(
        allow_networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
        allow_ports=(range(1024, 65536),),
    )
    assert fetch(servers.canary.url("/x.png"), everything_local) == PNG
    assert fetch(servers.canary6.url("/x.png"), everything_local) == PNG
    assert (servers.canary.connections, servers.canary6.connections) == (1, 1)


def test_an_allowed_network_is_fetched_with_the_url_host_in_the_host_header(servers: Servers) -> None:
    assert fetch(servers.origin.url("/ok.png")) == PNG
    assert servers.origin.requests == [("/ok.png", f"127.0.0.1:{servers.origin.port}")]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.2",
        "2130706434",  # decimal
        "0177.0.0.02",  # octal
        "0x7f.0.0.2",  # hex
        "0x7f000002",
        "127.2",  # short form
        "[::ffff:127.0.0.2]",  # IPv4-mapped
        "[::ffff:7f00:2]",
        "[::1]",
        "[0:0:0:0:0:0:0:1]",
    ],
)
def test_every_spelling_of_a_loopback_address_is_refused_before_connecting(servers: Servers, host: str) -> None:
    error = refusal(f"http://{host}:{servers.origin.port}/x.png")

    assert error.code == "url_not_allowed"
    assert "loopback" in error.message
    assert servers.untouched()


@pytest.mark.parametrize("host", ["0.0.0.0", "0", "[::]"])
def test_the_unspecified_address_is_refused_although_it_would_reach_this_machine(servers: Servers, host: str) -> None:
    error = refusal(f"http://{host}:{servers.origin.port}/ok.png")  # Linux delivers 0.0.0.0 to 127.0.0.1

    assert error.code == "url_not_allowed"
    assert "unspecified" in error.message
    assert servers.origin.connections == 0


def test_https_to_a_refused_address_is_refused_before_any_handshake(servers: Servers) -> None:
    assert refusal(f"https://127.0.0.2:{servers.origin.port}/x.png").code == "url_not_allowed"
    assert servers.untouched()


@pytest.mark.parametrize(
    ("answers", "reason"),
    [
        (["127.0.0.2"], "loopback"),
        (["::1"], "loopback"),
        (["::ffff:127.0.0.2"], "IPv4-mapped form of 127.0.0.2, a loopback"),
        (["127.0.0.1", "127.0.0.2"], "127.0.0.2, a loopback"),  # one refused answer refuses the name
    ],
)
def test_a_name_that_resolves_to_a_refused_address_is_refused(
    servers: Servers, answers: list[str], reason: str
) -> None:
    resolver = resolver_of({"evil.test": answers})

    error = refusal(f"http://evil.test:{servers.origin.port}/x.png", resolver=resolver)

    assert error.code == "url_not_allowed"
    assert reason in error.message
    assert "evil.test" in error.message
    assert servers.untouched()
    assert servers.origin.connections == 0


def test_a_rebinding_name_is_connected_to_the_very_address_that_was_checked(servers: Servers) -> None:
    # Given: a name whose first answer is allowed and whose every later answer is the canary, and one session.
    calls: list[str] = []

    def rebinding(host: str, port: int, family: int, kind: int) -> list[AddressInfo]:
        calls.append(host)
        return socket.getaddrinfo("127.0.0.1" if len(calls) == 1 else "127.0.0.2", port, family, kind)

    session = new_session(LOCAL, rebinding)
    url = f"http://rebind.test:{servers.origin.port}/ok.png"

    # When: the name is fetched twice with the same session, as a worker does from job to job.
    body = fetch_image_bytes(session, url, LIMITS)
    with pytest.raises(BlipqError) as second:
        fetch_image_bytes(session, url, LIMITS)

    # Then: the first went where its one lookup pointed, with the name in the Host header; the server closed that
    # connection, so the second made a new one, which looked the name up again and was refused.
    assert body == PNG
    assert servers.origin.requests == [("/ok.png", f"rebind.test:{servers.origin.port}")]
    assert calls == ["rebind.test", "rebind.test"]
    assert second.value.code == "url_not_allowed"
    assert servers.untouched()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.0.0.5", "a private address"),
        ("172.16.3.4", "a private address"),
        ("192.168.1.1", "a private address"),
        ("169.254.169.254", "a link-local address"),  # cloud metadata
        ("100.64.0.1", "a carrier-grade NAT address"),
        ("224.0.0.1", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("255.255.255.255", "a reserved address"),
        ("0.1.2.3", "a private address"),  # "this network"
        ("fc00::1", "a private address"),
        ("fd12:3456::1", "a private address"),
        ("fe80::1", "a link-local address"),
        ("fec0::1", "a site-local address"),
        ("ff02::1", "a multicast address"),
        ("ff0e::1", "a multicast address"),
        ("::ffff:10.0.0.1", "the IPv4-mapped form of 10.0.0.1, a private address"),
        ("::ffff:169.254.169.254", "the IPv4-mapped form of 169.254.169.254, a link-local address"),
        ("64:ff9b::a9fe:a9fe", "the NAT64 form of 169.254.169.254, a link-local address"),
        ("64:ff9b::7f00:1", "the NAT64 form of 127.0.0.1, a loopback address"),
        ("64:ff9b:1::a00:1", "a local-use NAT64 address"),
        ("2002:7f00:1::1", "the 6to4 form of 127.0.0.1, a loopback address"),
        ("2002:a9fe:a9fe::1", "the 6to4 form of 169.254.169.254, a link-local address"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "a Teredo address"),
        ("::7f00:1", "an IPv4-compatible address (deprecated)"),
        ("2001:db8::1", "a private address"),  # documentation
    ],
)
def test_every_refused_range_is_refused_with_its_name(address: str, reason: str) -> None:
    assert LOCAL.refusal_reason(ipaddress.ip_address(address)) == reason
    # The same verdict where connections are made, for a name that resolves there (decided without a socket).
    guard = AddressGuard(LOCAL, resolver_of({"inside.test": [address]}))
    with pytest.raises(BlipqError, match=f"inside.test resolves to .*{re.escape(reason)}") as raised:
        guard.resolve("inside.test", 80)
    assert raised.value.code == "url_not_allowed"


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
)
def test_public_addresses_in_any_form_are_allowed(address: str) -> None:
    assert NetworkPolicy().refusal_reason(ipaddress.ip_address(address)) is None


def test_allowed_networks_open_exactly_themselves_in_either_form() -> None:
    policy = NetworkPolicy(allow_networks=(ipaddress.ip_network("10.20.0.0/16"),))
    assert policy.refusal_reason(ipaddress.ip_address("10.20.1.2")) is None
    assert policy.refusal_reason(ipaddress.ip_address("::ffff:10.20.1.2")) is None
    assert (
        policy.refusal_reason(ipaddress.ip_address("64:ff9b::a14:102"))
        == "the NAT64 form of 10.20.1.2, a private address"
    )
    assert policy.refusal_reason(ipaddress.ip_address("10.21.0.1")) == "a private address"
    assert policy.refusal_reason(ipaddress.ip_address("127.0.0.1")) == "a loopback address"


def test_a_redirect_to_a_refused_address_is_refused_before_connecting(servers: Servers) -> None:
    servers.origin.routes["/hop"] = redirect(servers.canary.url("/x.png"))
    servers.origin.routes["/hop6"] = redirect(f"http://[::ffff:7f00:2]:{servers.origin.port}/x.png")

    for path in ("/hop", "/hop6"):
        error = refusal(servers.origin.url(path))
        assert error.code == "url_not_allowed"
        assert "loopback" in error.message
    assert servers.untouched()


def test_a_redirect_to_a_name_that_resolves_to_a_refused_address_is_refused(servers: Servers) -> None:
    servers.origin.routes["/hop"] = redirect(f"http://evil.test:{servers.origin.port}/x.png")
    resolver = resolver_of({"evil.test": ["127.0.0.2"]})

    assert refusal(servers.origin.url("/hop"), resolver=resolver).code == "url_not_allowed"
    assert servers.untouched()


@pytest.mark.parametrize(
    "location",
    [
        "file:///etc/passwd",
        "ftp://127.0.0.1/x.png",
        "gopher://127.0.0.1:70/_x",
        "http://user:secret@127.0.0.1:{port}/ok.png",
        "http://127.0.0.1:22/ok.png",
    ],
)
def test_a_redirect_is_held_to_the_same_rules_as_the_url(servers: Servers, location: str) -> None:
    servers.origin.routes["/hop"] = redirect(location.format(port=servers.origin.port))

    assert refusal(servers.origin.url("/hop")).code == "url_not_allowed"
    assert [path for path, _ in servers.origin.requests] == ["/hop"]


def test_three_redirects_are_followed_and_a_fourth_is_refused(servers: Servers) -> None:
    for hop in range(4):
        servers.origin.routes[f"/hop{hop}"] = redirect(f"/hop{hop + 1}")  # relative, resolved against the hop's URL
    servers.origin.routes["/hop4"] = serve(PNG)

    assert fetch(servers.origin.url("/hop1")) == PNG
    error = refusal(servers.origin.url("/hop0"))
    assert error.code == "image_fetch_failed"
    assert "more than 3 redirects" in error.message


@pytest.mark.parametrize(
    "url",
    [
        "http://user:secret@127.0.0.1:{port}/ok.png",
        "http://user@127.0.0.1:{port}/ok.png",
        "http://:secret@127.0.0.1:{port}/ok.png",
        "ftp://127.0.0.1:{port}/ok.png",
        "file:///etc/passwd",
        "//127.0.0.1:{port}/ok.png",
    ],
)
def test_credentials_and_other_schemes_are_refused_without_a_connection(servers: Servers, url: str) -> None:
    assert refusal(url.format(port=servers.origin.port)).code == "url_not_allowed"
    assert servers.origin.connections == 0


def test_a_port_other_than_80_and_443_needs_to_be_allowed(servers: Servers) -> None:
    networks_only = NetworkPolicy(allow_networks=LOCAL.allow_networks)
    that_port = NetworkPolicy(allow_networks=LOCAL.allow_networks, allow_ports=(range(servers.origin.port, 65536),))

    error = refusal(servers.origin.url("/ok.png"), networks_only)
    assert error.code == "url_not_allowed"
    assert f"port {servers.origin.port}" in error.message
    assert servers.origin.connections == 0
    assert fetch(servers.origin.url("/ok.png"), that_port) == PNG


def test_a_session_that_is_not_guarded_is_refused(servers: Servers) -> None:
    import requests

    with pytest.raises(TypeError, match="new_session"):
        fetch_image_bytes(requests.Session(), servers.canary.url("/x.png"), LIMITS)
    assert servers.untouched()


def assert_costs_one_deadline(url: str, policy: NetworkPolicy = LOCAL) -> None:
    started = time.monotonic()
    error = refusal(url, policy)
    elapsed = time.monotonic() - started
    assert error.code == "image_fetch_timeout", error.message
    assert LIMITS.total_timeout_s - 0.1 <= elapsed <= LIMITS.total_timeout_s + DEADLINE_SLACK_S


def test_a_body_that_drips_is_cut_at_the_total_deadline(servers: Servers) -> None:
    servers.origin.routes["/drip.png"] = drip_body
    assert_costs_one_deadline(servers.origin.url("/drip.png"))


def test_a_body_that_stalls_near_the_deadline_is_cut_at_it(servers: Servers) -> None:
    # The last read starts 1.2 s in: its socket timeout must be what is left (0.3 s), not the whole 1.5 s again.
    servers.origin.routes["/stall.png"] = drip_then_stall
    assert_costs_one_deadline(servers.origin.url("/stall.png"))


def test_headers_that_drip_are_cut_at_the_total_deadline(servers: Servers) -> None:
    servers.origin.routes["/drip.png"] = drip_headers
    assert_costs_one_deadline(servers.origin.url("/drip.png"))


def test_a_server_that_never_answers_costs_one_deadline(servers: Servers) -> None:
    servers.origin.routes["/silent.png"] = silent
    assert_costs_one_deadline(servers.origin.url("/silent.png"))


def test_a_name_whose_lookup_hangs_costs_the_connect_timeout(servers: Servers) -> None:
    released = threading.Event()

    def hanging(host: str, port: int, family: int, kind: int) -> list[AddressInfo]:
        released.wait(10)  # a DNS server that does not answer
        return socket.getaddrinfo("127.0.0.1", port, family, kind)

    started = time.monotonic()
    try:
        error = refusal(f"http://slow-dns.test:{servers.origin.port}/ok.png", resolver=hanging)
    finally:
        released.set()
    assert error.code == "image_fetch_timeout", error.message
    assert time.monotonic() - started <= LIMITS.connect_timeout_s + DEADLINE_SLACK_S
    assert servers.origin.connections == 0


def test_a_tls_server_that_never_shakes_hands_costs_at_most_one_deadline() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # the kernel accepts; nobody ever answers
        started = time.monotonic()
        error = refusal(f"https://127.0.0.1:{listener.getsockname()[1]}/x.png")
    assert error.code == "image_fetch_timeout", error.message
    assert time.monotonic() - started <= LIMITS.total_timeout_s + DEADLINE_SLACK_S


@pytest.mark.parametrize("chunked", [False, True])
def test_an_endless_body_is_cut_at_the_byte_cap(servers: Servers, chunked: bool) -> None:
    servers.origin.routes["/endless.png"] = endless(chunked=chunked)

    error = refusal(servers.origin.url("/endless.png"))

    assert error.code == "image_too_large"
    assert str(LIMITS.max_bytes) in error.message


def test_a_declared_length_over_the_cap_is_refused_before_reading(servers: Servers) -> None:
    servers.origin.routes["/claims-big.png"] = serve(PNG, length=LIMITS.max_bytes + 1)  # but sends a small image

    error = refusal(servers.origin.url("/claims-big.png"))

    assert error.code == "image_too_large"
    assert str(LIMITS.max_bytes + 1) in error.message


def test_a_body_longer_than_its_declared_length_is_read_only_to_that_length(servers: Servers) -> None:
    servers.origin.routes["/lies.png"] = serve(PNG + b"\0" * (2 * LIMITS.max_bytes), length=len(PNG))
    assert fetch(servers.origin.url("/lies.png")) == PNG


def test_a_body_shorter_than_its_declared_length_fails(servers: Servers) -> None:
    servers.origin.routes["/short.png"] = serve(PNG, length=len(PNG) + 100)
    assert refusal(servers.origin.url("/short.png")).code == "image_fetch_failed"


def test_a_compressed_body_is_capped_after_decompression(servers: Servers) -> None:
    bomb = gzip.compress(PNG_SIGNATURE + b"\0" * (64 * 1024 * 1024), compresslevel=9)  # 64 MiB in about 64 kB

    def gzip_bomb(handler: Handler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Encoding", "gzip")  # although the request asked for identity
        handler.send_header("Content-Length", str(len(bomb)))
        handler.end_headers()
        with suppress(OSError):
            handler.wfile.write(bomb)

    servers.origin.routes["/bomb.png"] = gzip_bomb
    started = time.monotonic()

    assert refusal(servers.origin.url("/bomb.png")).code == "image_too_large"
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/json", "text/plain"])
def test_a_body_declared_as_not_an_image_is_refused_before_it_is_read(servers: Servers, content_type: str) -> None:
    servers.origin.routes["/page"] = endless(content_type)  # endless: only refusing at the headers ends it fast

    error = refusal(servers.origin.url("/page"))

    assert error.code == "image_invalid"
    assert content_type.split(";", maxsplit=1)[0] in error.message


def test_a_body_that_does_not_start_like_an_image_is_refused_after_its_first_bytes(servers: Servers) -> None:
    servers.origin.routes["/page.png"] = endless("image/png", head=HTML_PAGE)  # endless: the cap would end it too

    error = refusal(servers.origin.url("/page.png"))

    assert error.code == "image_invalid"
    assert "not a JPEG, PNG" in error.message


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "binary/octet-stream", "image/x-png"])
def test_an_image_under_a_vague_content_type_is_fetched(servers: Servers, content_type: str | None) -> None:
    servers.origin.routes["/blob"] = serve(PNG, content_type)
    assert fetch(servers.origin.url("/blob")) == PNG


@pytest.fixture
def tls_origin(tmp_path: Path) -> Iterator[tuple[RecordingServer, Path, list[str]]]:
    """An HTTPS origin on 127.0.0.1 whose certificate names images.test only; yields it, its CA, the SNI seen."""
    (tmp_path / "ca.pem").write_text(TEST_CA)
    (tmp_path / "server.pem").write_text(TEST_SERVER_CERT + TEST_SERVER_KEY)
    sni_seen: list[str] = []

    def record_sni(sock: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        sni_seen.append(str(name))

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "server.pem")
    context.sni_callback = record_sni
    server = RecordingServer("127.0.0.1", tls=context)
    server.routes["/ok.png"] = serve(PNG)
    yield server, tmp_path / "ca.pem", sni_seen
    server.stop()


def test_https_keeps_sni_host_and_certificate_checks_on_the_name(
    tls_origin: tuple[RecordingServer, Path, list[str]],
) -> None:
    server, ca_file, sni_seen = tls_origin
    session = new_session(LOCAL, resolver_of({"images.test": ["127.0.0.1"]}))
    session.verify = str(ca_file)

    body = fetch_image_bytes(session, f"https://images.test:{server.port}/ok.png", LIMITS)

    assert body == PNG
    assert sni_seen == ["images.test"]
    assert server.requests == [("/ok.png", f"images.test:{server.port}")]
    # The certificate is still checked against the URL's host: by address, it does not match.
    with pytest.raises(BlipqError) as raised:
        fetch_image_bytes(session, f"https://127.0.0.1:{server.port}/ok.png", LIMITS)
    assert raised.value.code == "image_fetch_failed"


def test_a_job_for_a_refused_address_fails_and_the_worker_goes_on(
    tiny_api: FlaskClient, tiny_worker: WorkerProcess, servers: Servers
) -> None:
    # Given: a real worker; the tests' conftest lets it reach 127.0.0.1 only.
    refused = tiny_api.post("/v1/jobs", json={"image_url": servers.canary.url("/x.png"), "question": "what is it?"})
    allowed = tiny_api.post("/v1/jobs", json={"image_url": servers.origin.url("/ok.png"), "question": "what is it?"})

    refused_job = wait_for_job(tiny_api, refused.get_json()["id"], tiny_worker)
    allowed_job = wait_for_job(tiny_api, allowed.get_json()["id"], tiny_worker)

    assert refused_job["status"] == "failed"
    assert refused_job["error"]["code"] == "url_not_allowed"
    assert "127.0.0.2 is a loopback address" in refused_job["error"]["message"]
    assert servers.untouched()
    assert allowed_job["status"] == "succeeded", allowed_job
    assert tiny_worker.process.poll() is None


def in_threads(count: int, call: Callable[[], Any]) -> list[Any]:
    """`call` from `count` threads at once; what each returned (or raised)."""
    outcomes: list[Any] = [None] * count

    def run(index: int) -> None:
        try:
            outcomes[index] = call()
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return outcomes


def gate(parties: int) -> Route:
    """Answers PNG once `parties` requests wait at once (so each came on a connection of its own), 503 if they never
    do."""
    barrier = threading.Barrier(parties)

    def route(handler: Handler) -> None:
        try:
            barrier.wait(5)
        except threading.BrokenBarrierError:
            serve(b"", status=503)(handler)
            return
        serve(PNG)(handler)

    return route


def test_a_kept_connection_serves_the_next_images_without_a_lookup(servers: Servers) -> None:
    servers.origin.keep_alive = True
    calls: list[str] = []

    def counting(host: str, port: int, family: int, kind: int) -> list[AddressInfo]:
        calls.append(host)
        return socket.getaddrinfo("127.0.0.1", port, family, kind)

    session = new_session(LOCAL, counting)
    url = f"http://images.test:{servers.origin.port}/ok.png"

    bodies = [fetch_image_bytes(session, url, LIMITS) for _ in range(3)]

    assert bodies == [PNG] * 3
    assert calls == ["images.test"]
    assert servers.origin.connections == 1
    assert len(servers.origin.exchanges) == 3
    assert all("close" not in exchange.headers.get("Connection", "") for exchange in servers.origin.exchanges)


def test_without_keepalive_every_image_has_a_new_checked_connection(servers: Servers) -> None:
    servers.origin.keep_alive = True  # the server would keep them: the session says it will not
    session = new_session(LOCAL, keepalive_s=0)

    bodies = [fetch_image_bytes(session, servers.origin.url("/ok.png"), LIMITS) for _ in range(2)]

    assert bodies == [PNG] * 2
    assert servers.origin.wait_until(lambda: servers.origin.closes == 2)
    assert servers.origin.connections == 2
    assert [exchange.headers["Connection"] for exchange in servers.origin.exchanges] == ["close", "close"]


def test_a_name_that_turns_private_is_refused_at_its_next_new_connection(servers: Servers) -> None:
    # Given: a name whose first answer is allowed and whose every later answer is the canary, on a keep-alive origin.
    servers.origin.keep_alive = True
    servers.origin.routes["/last.png"] = serve_closing(PNG)
    calls: list[str] = []

    def turning(host: str, port: int, family: int, kind: int) -> list[AddressInfo]:
        calls.append(host)
        return socket.getaddrinfo("127.0.0.1" if len(calls) == 1 else "127.0.0.2", port, family, kind)

    session = new_session(LOCAL, turning)
    base = f"http://turning.test:{servers.origin.port}"

    # When: the first image opens (and checks) a connection; the next two reuse it, although the name would now
    # resolve to a loopback address; the origin closes it after the third; a fourth needs a new connection.
    first = fetch_image_bytes(session, f"{base}/ok.png", LIMITS)
    reused = [fetch_image_bytes(session, f"{base}/{path}", LIMITS) for path in ("ok.png", "last.png")]
    with pytest.raises(BlipqError) as refused:
        fetch_image_bytes(session, f"{base}/ok.png", LIMITS)

    # Then: the reuses went to the address checked when the connection was made, without a lookup (allowed: that
    # connection's address was checked); the new connection looked the name up again and was refused.
    assert [first, *reused] == [PNG] * 3
    assert servers.origin.connections == 1
    assert len(servers.origin.hosts_by_connection()) == 1
    assert calls == ["turning.test", "turning.test"]
    assert refused.value.code == "url_not_allowed"
    assert "127.0.0.2, a loopback address" in refused.value.message
    assert servers.untouched()


def test_two_names_for_one_address_and_port_never_share_a_connection(servers: Servers) -> None:
    servers.origin.keep_alive = True
    session = new_session(LOCAL, resolver_of({"a.test": ["127.0.0.1"], "b.test": ["127.0.0.1"]}))
    port = servers.origin.port

    for host in ("a.test", "b.test", "a.test", "b.test"):
        assert fetch_image_bytes(session, f"http://{host}:{port}/ok.png", LIMITS) == PNG

    assert servers.origin.connections == 2
    hosts = sorted(servers.origin.hosts_by_connection().values(), key=sorted)
    assert hosts == [{f"a.test:{port}"}, {f"b.test:{port}"}]
    assert len(servers.origin.exchanges) == 4


def test_idle_connections_kept_per_host_are_bounded(servers: Servers) -> None:
    # Given: a session that keeps 2 idle connections per host, and 3 images fetched at once from one host.
    servers.origin.keep_alive = True
    servers.origin.routes["/three.png"] = gate(3)
    servers.origin.routes["/two.png"] = gate(2)
    session = new_session(LOCAL, keepalive_s=LONG_KEEPALIVE_S, per_host=2)

    at_once = in_threads(3, lambda: fetch_image_bytes(session, servers.origin.url("/three.png"), LIMITS))

    # Then: 3 connections were open; the one that found the pool full was closed, the other 2 are kept.
    assert at_once == [PNG] * 3
    assert servers.origin.wait_until(lambda: servers.origin.closes >= 1)
    assert (servers.origin.connections, servers.origin.closes) == (3, 1)
    # And: 2 images at once take the 2 kept connections, and open none.
    assert in_threads(2, lambda: fetch_image_bytes(session, servers.origin.url("/two.png"), LIMITS)) == [PNG] * 2
    assert (servers.origin.connections, servers.origin.closes) == (3, 1)


def test_hosts_with_kept_connections_are_bounded(servers: Servers) -> None:
    # Given: a session that keeps connections to 2 hosts, and 3 names of the origin.
    servers.origin.keep_alive = True
    names = {name: ["127.0.0.1"] for name in ("a.test", "b.test", "c.test")}
    session = new_session(LOCAL, resolver_of(names), keepalive_s=LONG_KEEPALIVE_S, max_hosts=2)
    port = servers.origin.port

    def fetch_from(host: str) -> bytes:
        return fetch_image_bytes(session, f"http://{host}:{port}/ok.png", LIMITS)

    # When: a, b, then c: c's pool pushes out the least recently used, a's, whose connection closes.
    assert [fetch_from(host) for host in ("a.test", "b.test", "c.test")] == [PNG] * 3
    assert servers.origin.wait_until(lambda: servers.origin.closes == 1)

    # Then: b's connection is still kept; a opens a new one, and pushes out c's, the least recently used now.
    assert fetch_from("b.test") == PNG
    assert servers.origin.connections == 3
    assert fetch_from("a.test") == PNG
    assert servers.origin.connections == 4
    assert servers.origin.wait_until(lambda: servers.origin.closes == 2)
    hosts = servers.origin.hosts_by_connection()
    assert [hosts[peer] for peer in servers.origin.closed_peers] == [{f"a.test:{port}"}, {f"c.test:{port}"}]


def test_a_request_to_a_pool_dropped_meanwhile_still_connects_and_keeps_nothing(servers: Servers) -> None:
    # Given: a host's pool that more hosts pushed out of the session after a request picked it, before it asked it
    # for a connection.
    servers.origin.keep_alive = True
    session = new_session(LOCAL, keepalive_s=LONG_KEEPALIVE_S)
    url = servers.origin.url("/ok.png")
    pool = session.get_adapter(url).poolmanager.connection_from_url(url)  # type: ignore[attr-defined]
    pool.close()

    # When: the request goes on with it.
    response = pool.urlopen("GET", "/ok.png", retries=False)

    # Then: it is answered on a connection of its own, which is closed after, not kept.
    assert response.data == PNG
    assert servers.origin.wait_until(lambda: servers.origin.closes == 1)
    assert servers.origin.connections == 1


def test_an_idle_connection_is_closed_after_the_keepalive(servers: Servers) -> None:
    servers.origin.keep_alive = True
    keepalive_s = 0.2
    session = new_session(LOCAL, keepalive_s=keepalive_s)
    started = time.monotonic()

    assert fetch_image_bytes(session, servers.origin.url("/ok.png"), LIMITS) == PNG

    assert servers.origin.wait_until(lambda: servers.origin.closes == 1)
    assert time.monotonic() - started >= keepalive_s  # not before: it was idle, not refused
    # And: the next image opens a new connection.
    assert fetch_image_bytes(session, servers.origin.url("/ok.png"), LIMITS) == PNG
    assert servers.origin.connections == 2


def test_a_connection_the_host_closed_while_idle_is_replaced_transparently(servers: Servers) -> None:
    # Given: an origin that closes each connection after its answer, without saying so: the session keeps it.
    session = new_session(LOCAL, keepalive_s=LONG_KEEPALIVE_S)
    assert fetch_image_bytes(session, servers.origin.url("/ok.png"), LIMITS) == PNG
    assert servers.origin.wait_until(lambda: servers.origin.closes == 1)

    # When / then: the next image goes out on a new connection, and succeeds.
    assert fetch_image_bytes(session, servers.origin.url("/ok.png"), LIMITS) == PNG
    assert servers.origin.connections == 2


def test_a_request_that_meets_the_hosts_close_of_a_kept_connection_is_sent_once_more(servers: Servers) -> None:
    # Given: a keep-alive origin that closes a kept connection as the next request arrives on it (its idle timeout
    # firing just then), without answering.
    servers.origin.keep_alive = True
    servers.origin.routes["/ok.png"] = first_on_a_connection(serve(PNG), later=hang_up)
    session = new_session(LOCAL, keepalive_s=LONG_KEEPALIVE_S)
    url = servers.origin.url("/ok.png")

    # When: two images, the second on the kept connection.
    bodies = [fetch_image_bytes(session, url, LIMITS) for _ in range(2)]

    # Then: the second was sent again on a new connection, and succeeded.
    assert bodies == [PNG] * 2
    peers = [exchange.peer for exchange in servers.origin.exchanges]
    assert len(peers) == 3
    assert peers[0] == peers[1] != peers[2]
    assert servers.origin.connections == 2


def test_a_request_is_sent_again_once_only_and_only_after_a_kept_connection(servers: Servers) -> None:
    servers.origin.keep_alive = True
    servers.origin.routes["/hang-up.png"] = hang_up

    # A new connection that the host closes without answering: not sent again.
    error = refusal(servers.origin.url("/hang-up.png"))
    assert error.code == "image_fetch_failed"
    assert "the image host 127.0.0.1 closed the connection without answering" in error.message
    assert servers.origin.connections == 1

    # A kept connection, then a new one, that the host both close without answering: sent twice, not a third time.
    session = new_session(LOCAL, keepalive_s=LONG_KEEPALIVE_S)
    assert fetch_image_bytes(session, servers.origin.url("/ok.png"), LIMITS) == PNG
    with pytest.raises(BlipqError) as raised:
        fetch_image_bytes(session, servers.origin.url("/hang-up.png"), LIMITS)
    assert raised.value.code == "image_fetch_failed"
    assert [exchange.path for exchange in servers.origin.exchanges] == [
        "/hang-up.png",
        "/ok.png",
        *["/hang-up.png"] * 2,
    ]
    assert servers.origin.connections == 3


def test_a_request_sent_again_has_only_what_is_left_of_the_deadline(servers: Servers) -> None:
    # Given: a kept connection, whose host holds the next request most of the deadline and then closes it; and a new
    # connection that never answers.
    servers.origin.keep_alive = True
    servers.origin.routes["/held.png"] = first_on_a_connection(silent, later=hold_then_hang_up)
    session = new_session(LOCAL, keepalive_s=LONG_KEEPALIVE_S)
    assert fetch_image_bytes(session, servers.origin.url("/ok.png"), LIMITS) == PNG

    # When: the held image is fetched on the kept connection.
    started = time.monotonic()
    with pytest.raises(BlipqError) as raised:
        fetch_image_bytes(session, servers.origin.url("/held.png"), LIMITS)

    # Then: it was sent again on a new connection, and the whole download still cost one deadline.
    assert raised.value.code == "image_fetch_timeout", raised.value.message
    assert time.monotonic() - started <= LIMITS.total_timeout_s + DEADLINE_SLACK_S
    assert servers.origin.connections == 2


def test_redirects_to_refused_addresses_are_refused_on_a_kept_alive_session(servers: Servers) -> None:
    # Given: a keep-alive origin, whose connection the session keeps, and that redirects to refused addresses.
    servers.origin.keep_alive = True
    servers.origin.routes["/hop"] = redirect(servers.canary.url("/x.png"))
    servers.origin.routes["/hop-by-name"] = redirect(f"http://evil.test:{servers.origin.port}/x.png")
    session = new_session(LOCAL, resolver_of({"evil.test": ["127.0.0.2"]}), keepalive_s=LONG_KEEPALIVE_S)
    assert fetch_image_bytes(session, servers.origin.url("/ok.png"), LIMITS) == PNG

    # When / then: each redirect, the first on the kept connection, is refused before connecting where it leads.
    for path in ("/hop", "/hop-by-name"):
        with pytest.raises(BlipqError) as raised:
            fetch_image_bytes(session, servers.origin.url(path), LIMITS)
        assert raised.value.code == "url_not_allowed"
        assert "loopback" in raised.value.message
    assert servers.untouched()
    peers = [exchange.peer for exchange in servers.origin.exchanges]
    assert peers[0] == peers[1]  # /ok.png, then /hop on the connection kept


def test_the_session_keeps_no_cookie(servers: Servers) -> None:
    servers.origin.keep_alive = True
    servers.origin.routes["/cookie.png"] = set_cookie
    session = new_session(LOCAL)

    assert fetch_image_bytes(session, servers.origin.url("/cookie.png"), LIMITS) == PNG
    assert fetch_image_bytes(session, servers.origin.url("/ok.png"), LIMITS) == PNG

    assert [exchange.path for exchange in servers.origin.exchanges] == ["/cookie.png", "/ok.png"]
    assert "Cookie" not in servers.origin.exchanges[1].headers
    assert len(session.cookies) == 0


def test_a_workers_threads_share_one_session_and_its_connections(servers: Servers) -> None:
    from worker.runtime import WorkerRuntime
    from worker.settings import WorkerSettings

    servers.origin.keep_alive = True
    settings = WorkerSettings(fetch_allow_networks=LOCAL.allow_networks, fetch_allow_ports=LOCAL.allow_ports)
    runtime = WorkerRuntime(settings)
    url = servers.origin.url("/ok.png")

    sessions = [in_threads(1, lambda: runtime.session)[0] for _ in range(2)]
    bodies = [in_threads(1, lambda: fetch_image_bytes(runtime.session, url, LIMITS))[0] for _ in range(2)]

    assert sessions[0] is sessions[1] is runtime.session
    assert bodies == [PNG] * 2
    assert servers.origin.connections == 1  # the second thread took the connection the first one kept


@pytest.mark.parametrize(
    ("route", "cause"),
    [
        (hang_up, "the image host 127.0.0.1 closed the connection without answering"),
        (reset, "the image host 127.0.0.1 reset the connection"),
        (
            serve(PNG, length=len(PNG) + 100),
            "the image host 127.0.0.1 closed the connection before the end of the image",
        ),
    ],
)
def test_a_failed_download_says_why(servers: Servers, route: Route, cause: str) -> None:
    servers.origin.routes["/x.png"] = route

    error = refusal(servers.origin.url("/x.png"))

    assert error.code == "image_fetch_failed"
    assert error.message == f"could not download {servers.origin.url('/x.png')}: {cause}"


def test_a_host_that_does_not_resolve_or_refuses_says_so() -> None:
    def nowhere(host: str, port: int, family: int, kind: int) -> list[AddressInfo]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    unresolved = refusal("http://example.invalid/x.png", resolver=nowhere)
    with socket.socket() as closed:  # a port that nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    refused = refusal(f"http://127.0.0.1:{port}/x.png")

    assert unresolved.code == refused.code == "image_fetch_failed"
    assert unresolved.message.endswith(": the image host example.invalid does not resolve (Name or service not known)")
    assert refused.message.endswith(": the image host 127.0.0.1 refused the connection")


def test_a_tls_failure_says_what_failed(servers: Servers, tls_origin: tuple[RecordingServer, Path, list[str]]) -> None:
    server, ca_file, _ = tls_origin
    session = new_session(LOCAL)
    session.verify = str(ca_file)

    with pytest.raises(BlipqError) as wrong_name:
        fetch_image_bytes(session, f"https://127.0.0.1:{server.port}/ok.png", LIMITS)
    with pytest.raises(BlipqError) as not_tls:
        fetch_image_bytes(session, f"https://127.0.0.1:{servers.origin.port}/ok.png", LIMITS)

    assert (
        "127.0.0.1's TLS certificate was refused (IP address mismatch, certificate is not valid"
        in wrong_name.value.message
    )
    assert "TLS with the image host 127.0.0.1 failed (WRONG_VERSION_NUMBER)" in not_tls.value.message


# A throwaway test CA and a certificate for images.test that it signed (EC P-256, valid 2025-2125), made with
# `openssl req`/`openssl ca`. Nothing but these tests trusts them.
TEST_CA = """-----BEGIN CERTIFICATE-----
MIIBYjCCAQmgAwIBAgIBATAKBggqhkjOPQQDAjAYMRYwFAYDVQQDDA1ibGlwcSB0
ZXN0IENBMCAXDTI1MDEwMTAwMDAwMFoYDzIxMjUwMTAxMDAwMDAwWjAYMRYwFAYD
VQQDDA1ibGlwcSB0ZXN0IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEiO7E
pkrZw5oIsNGoeMFPXKMD7ezQA758U9lJxcYMzhzyOyHSOnnFwDF6p7bH9fmELpHB
FqmEPLWrE7UTch1gM6NCMEAwDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMC
AQYwHQYDVR0OBBYEFMUV9Vt6C8pGmJTkpW8pALynHLIbMAoGCCqGSM49BAMCA0cA
MEQCIALv+q/8ThUzjjIRaeaFYwv8VVwkBE9HWmx64wnRFPy1AiAzLfnDh87NuUxM
q3QR4nOYyvGyBDQbX8o1vnqVpVqZkg==
-----END CERTIFICATE-----
"""
TEST_SERVER_CERT = """-----BEGIN CERTIFICATE-----
MIIBrjCCAVSgAwIBAgIBAjAKBggqhkjOPQQDAjAYMRYwFAYDVQQDDA1ibGlwcSB0
ZXN0IENBMCAXDTI1MDEwMTAwMDAwMFoYDzIxMjUwMTAxMDAwMDAwWjAWMRQwEgYD
VQQDDAtpbWFnZXMudGVzdDBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABAkaQho2
nxrwRcL4sYF0oSA133HjzsSwcJD9xaWVp4dm8xCJVlq+HmAaG7MpeE1tp3gFrSi8
jJY6L0o70nMdGqujgY4wgYswDAYDVR0TAQH/BAIwADAOBgNVHQ8BAf8EBAMCB4Aw
EwYDVR0lBAwwCgYIKwYBBQUHAwEwFgYDVR0RBA8wDYILaW1hZ2VzLnRlc3QwHQYD
VR0OBBYEFPLrgbf7EuTEPy4SoqaLdQMkWgHeMB8GA1UdIwQYMBaAFMUV9Vt6C8pG
mJTkpW8pALynHLIbMAoGCCqGSM49BAMCA0gAMEUCIQDyqINN0IkK4eIwqPamMJl8
1Fbs2Nt2IFag0VEqKq2T3gIgO09G9lX1yeZcWmeMnQB2PbWTDA4IAT28fk7w5pPf
wy8=
-----END CERTIFICATE-----
"""
TEST_SERVER_KEY = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgvSK2xtuDhxruumXX
x5kVwiFw2VJ4KIIPsrSKm5VABNqhRANCAAQJGkIaNp8a8EXC+LGBdKEgNd9x487E
sHCQ/cWllaeHZvMQiVZavh5gGhuzKXhNbad4Ba0ovIyWOi9KO9JzHRqr
-----END PRIVATE KEY-----
"""
