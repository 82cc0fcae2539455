"""Fetching a request's media URL for a server that must not become anyone's proxy.

A URL is fetched only over http(s), from an address that is public (no loopback, private,
link-local, metadata or other special address) unless the server allows private ones. The name is
resolved once and the connection goes to the checked address, so a second DNS answer cannot swap
in another; every redirect hop is checked the same way and may not change the scheme. The body is
capped in bytes and the whole fetch in seconds (a URL that drips one byte at a time is cut off at
the deadline). Every failure reads the same ("could not fetch"), so that the answer tells nothing
about which ports are open or which pages exist.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

from mlx_gemma4u.errors import InputError

REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool = False  # loopback, private and link-local addresses too (--allow-private-urls)
    max_bytes: int = 20 << 20
    seconds: float = 20.0  # for the whole fetch, redirects included
    max_redirects: int = 3


class _Refused(Exception):
    """Why a fetch stopped; the client hears only the neutral sentence."""


class TooLarge(_Refused):
    """The body is over the byte cap."""


class NotPublic(_Refused):
    """The address is not a public one."""


def fetch(url: str, kind: str, policy: FetchPolicy) -> bytes:
    """The body of `url` under `policy`, or an InputError that says only that it could not be fetched."""
    deadline = time.monotonic() + policy.seconds
    scheme = urllib.parse.urlsplit(url).scheme
    try:
        for _ in range(policy.max_redirects + 1):
            status, body, location = _get(url, policy, deadline)
            if status not in REDIRECTS:
                return body
            url = urllib.parse.urljoin(url, location or "")
            if urllib.parse.urlsplit(url).scheme != scheme:
                raise _Refused("a redirect changes the scheme")
        raise _Refused("too many redirects")
    except TooLarge:
        raise InputError(
            f"The {kind} at the URL is larger than this server's limit of {policy.max_bytes / 1e6:g} MB."
        ) from None
    except NotPublic:
        raise InputError(
            f"The {kind} URL points to a loopback, private or link-local address, which this server does not fetch."
        ) from None
    except (_Refused, OSError, http.client.HTTPException, ValueError, UnicodeError):
        raise InputError(f"Could not fetch the {kind} URL.") from None


def _get(url: str, policy: FetchPolicy, deadline: float) -> tuple[int, bytes, str | None]:
    """One GET -> (status, body of a 200, Location of a redirect), connected to the checked address."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Refused("not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    connection = _Pinned(
        parts.hostname, port, _address(parts.hostname, port, policy), parts.scheme == "https", timeout=_left(deadline)
    )
    # The deadline holds even while a read is blocked: the socket is shut at that moment.
    alarm = threading.Timer(_left(deadline), connection.shut)
    alarm.daemon = True
    alarm.start()
    try:
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection.request("GET", path, headers={"User-Agent": "mlx-gemma4u", "Accept-Encoding": "identity"})
        response = connection.getresponse()
        if response.status in REDIRECTS:
            return response.status, b"", response.getheader("Location")
        if response.status != 200:
            raise _Refused(f"status {response.status}")
        return 200, _read(response, policy.max_bytes, deadline), None
    finally:
        alarm.cancel()
        connection.close()


def _address(host: str, port: int, policy: FetchPolicy) -> str:
    """The one address `host` resolves to that the fetch will connect to, checked against the policy."""
    address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
    if not policy.allow_private and not is_public(address):
        raise NotPublic(address)
    return address


def is_public(address: str) -> bool:
    """Whether `address` is a global unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _read(response: http.client.HTTPResponse, limit: int, deadline: float) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(declared)
    chunks, total = [], 0
    while chunk := response.read1(1 << 16):
        total += len(chunk)
        if total > limit:
            raise TooLarge(total)
        if time.monotonic() > deadline:
            raise _Refused("the deadline passed")
        chunks.append(chunk)
    if time.monotonic() > deadline or (declared and declared.isdigit() and total != int(declared)):
        raise _Refused("cut short")
    return b"".join(chunks)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _Refused("the deadline passed")
    return left


class _Pinned(http.client.HTTPConnection):
    """An HTTP(S) connection to a fixed address, speaking to (and for TLS, verifying) the host name."""

    def __init__(self, host: str, port: int, address: str, tls: bool, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address, self.tls = address, tls

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host) if self.tls else sock

    def shut(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
