"""http(s) image URLs, fetched only when the server allows remote media (`--allow-remote-media`), behind an SSRF
guard: the host is resolved once and every address it resolves to must be public (no loopback, private, link-local
or cloud-metadata range, no multicast or reserved space), the connection goes to that checked address (so a second
DNS answer cannot swap it), redirects are followed by hand and each hop checked again, and the body is bounded in
bytes and the whole fetch in time. Hosts named in `allowed_media_domains` (`--allowed-media-domains`) are the only
ones fetched when that list is given, and they may resolve anywhere: the operator vouches for them.

Every failure after the scheme check gives one and the same message, so a client cannot map the network behind the
server (open vs closed ports, internal names, status codes)."""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse

from gmaivl_rt.errors import InputError

MAX_REDIRECTS = 3
_CHUNK = 64 * 1024


class _Refused(Exception):
    """Any reason a remote fetch is refused or failed; the client only ever sees `fetch_failure`."""


def fetch_failure(role: str, max_bytes: int, timeout_s: float) -> InputError:
    return InputError(f"{role}: the image URL could not be fetched (remote images must be public http(s) URLs that "
                      f"answer 200 within {timeout_s:g} s with at most {max_bytes} bytes)")


def is_public_address(address: str) -> bool:
    """An IP address a server may fetch from on a client's behalf: globally routable unicast, not loopback, private
    (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16 with the cloud metadata service, fe80::/10),
    shared (100.64/10), multicast or reserved; IPv4-mapped IPv6 addresses are judged by their IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_private
                                 or ip.is_reserved or ip.is_unspecified)


def _target(url: str, allowed_domains) -> tuple[urllib.parse.SplitResult, str, int, list[str]]:
    """url -> (its parts, host, port, the checked addresses to connect to, in resolver order)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.username or parts.password or not parts.hostname:
        raise _Refused("scheme, credentials or host")
    host = parts.hostname.lower()
    if not host.isascii():
        raise _Refused("non-ASCII host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise _Refused("port") from None
    trusted = allowed_domains is not None
    if trusted and host not in allowed_domains:
        raise _Refused("host not in the allowed media domains")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise _Refused("resolution") from None
    addresses = [info[4][0] for info in infos]
    if not addresses or not (trusted or all(is_public_address(a) for a in addresses)):
        raise _Refused("address")
    return parts, host, port, list(dict.fromkeys(addresses))


def _connect(addresses: list[str], port: int, timeout: float) -> socket.socket:
    """A TCP connection to the first of the checked `addresses` that answers."""
    error = OSError("no address")
    for address in addresses:
        try:
            return socket.create_connection((address, port), timeout)
        except OSError as e:
            error = e
    raise error


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to already checked addresses, with the URL's host in the Host header."""

    def __init__(self, host, port, addresses, timeout):
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses

    def connect(self):
        self.sock = _connect(self.addresses, self.port, self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to already checked addresses; the certificate is checked against the URL's host name (SNI too)."""

    def __init__(self, host, port, addresses, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.addresses = addresses

    def connect(self):
        self.sock = self._context.wrap_socket(_connect(self.addresses, self.port, self.timeout),
                                              server_hostname=self.host)


def _get(url: str, allowed_domains, max_bytes: int, deadline: float) -> tuple[int, str | None, bytes]:
    """One GET: (status, Location header, body of at most max_bytes + 1 bytes)."""
    parts, host, port, addresses = _target(url, allowed_domains)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise _Refused("time")
    kind = _PinnedHTTPS if parts.scheme == "https" else _PinnedHTTP
    connection = kind(host, port, addresses, timeout=remaining)
    try:
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        connection.request("GET", path, headers={"Accept": "image/*, application/dicom, application/octet-stream",
                                                 "User-Agent": "gmaivl-rt"})
        sock = connection.sock  # the response reads from it even after the connection lets go of it
        response = connection.getresponse()
        if response.status in (301, 302, 303, 307, 308):
            return response.status, response.getheader("Location"), b""
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise _Refused("size")
        body = bytearray()
        while len(body) <= max_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Refused("time")
            sock.settimeout(remaining)  # a body that trickles in cannot outlast the deadline
            piece = response.read1(_CHUNK)  # what has arrived, not a full chunk
            if not piece:
                break
            body += piece
        return response.status, None, bytes(body)
    finally:
        connection.close()


def fetch_remote_image(url: str, *, role: str, max_bytes: int, timeout_s: float,
                       allowed_domains=None) -> bytes:
    """GET an http(s) image URL behind the guard (module doc): its bytes, or InputError `fetch_failure`.
    allowed_domains: host names (lower case) that alone may be fetched, from anywhere; None: any public host."""
    allowed = None if allowed_domains is None else {d.lower().rstrip(".") for d in allowed_domains}
    deadline = time.monotonic() + timeout_s
    try:
        for _ in range(MAX_REDIRECTS + 1):
            status, location, body = _get(url, allowed, max_bytes, deadline)
            if location is None:
                if status != 200 or not body or len(body) > max_bytes:
                    raise _Refused("status or size")
                return body
            url = urllib.parse.urljoin(url, location)
        raise _Refused("too many redirects")
    except (_Refused, OSError, http.client.HTTPException, ValueError, UnicodeError):
        raise fetch_failure(role, max_bytes, timeout_s) from None
