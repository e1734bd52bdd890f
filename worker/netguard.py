"""Where the image fetcher may connect: public addresses on ports 80 and 443, checked on the socket actually opened.

The guard resolves a host once, refuses the name if ANY answer is refused, and connects to the very addresses it
checked, so a DNS answer that changes between check and connect (rebinding) never reaches a socket, and every spelling
of an address (2130706433, 0177.0.0.1, 0x7f.0.0.1, 127.1, ::ffff:7f00:1) is judged as the number the resolver makes
of it. The HTTP connections that open their sockets through it are worker/guarded_http.py.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from contract.errors import ImageFetchError, UrlNotAllowedError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AddressInfo = tuple[Any, Any, int, str, tuple[Any, ...]]  # one getaddrinfo() answer
Resolver = Callable[[str, int, int, int], Sequence[AddressInfo]]  # (host, port, family, type), like getaddrinfo

SCHEMES = ("http", "https")
DEFAULT_PORTS = (80, 443)  # always allowed; BLIPQ_FETCH_ALLOW_PORTS adds others
PUBLIC_ONLY = "images are fetched from public addresses only"

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
