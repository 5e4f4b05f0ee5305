"""One webhook try to a receiver that may be hostile, for the watchdogs' senders and the API's
`/test` alike.

A receiver is somebody else's server: it may answer a byte every few seconds, never answer,
answer with a body that inflates to gigabytes, or have its name resolve to a public address when
checked and to a private one a moment later (DNS rebinding). So a try:
- resolves the host once, on a small thread pool of its own (no database connection is held),
  refuses the try when any address is loopback, private, link-local, multicast or such an address
  translated into IPv6 (NAT64, 6to4, IPv4-mapped), unless WEBHOOK_ALLOW_PRIVATE;
- connects to exactly the address it checked, with the URL's host name (encoded once, IDNA 2008)
  for TLS (SNI and certificate) and in the `Host` header;
- streams the reply, reads at most REPLY_BYTES of it and never decompresses it (a 2xx's body is
  not read at all);
- runs under one deadline, WEBHOOK_TIMEOUT, from the lookup to the reply, not a timeout per read.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import certifi
import httpx

from .domain.errors import InvalidRequest

MAX_URL_LENGTH = 2048
REPLY_BYTES = 4096  # of a reply that is not a 2xx, what is kept to show as its error
# Lookups that a slow resolver holds keep their thread after their try's deadline; the pool
# bounds them, and lookups beyond it wait within their own deadline. One owner (a project) holds
# at most LOOKUPS_PER_OWNER of its threads at once, so names of one project that never resolve
# cannot leave every other project's lookups waiting.
RESOLVER_THREADS = 64
LOOKUPS_PER_OWNER = 4
_RESOLVER = ThreadPoolExecutor(max_workers=RESOLVER_THREADS, thread_name_prefix="webhook-resolver")
_lookups_held: Counter[str] = Counter()
_lookups_lock = threading.Lock()

_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # an IPv4 address in the last 32 bits (RFC 6052)
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")  # translated by local choice: anything (RFC 8215)
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated, still routed to IPv4 by some stacks


class Refused(Exception):
    """The URL's host resolves to an address the server must not reach (or to none)."""


@dataclass(frozen=True)
class Reply:
    status_code: int
    body: bytes  # at most REPLY_BYTES, as sent (never decompressed); empty for a 2xx

    @property
    def delivered(self) -> bool:
        return 200 <= self.status_code < 300

    def describe(self) -> str:
        """The status and the start of the body, printable."""
        text = printable(self.body[:200].decode("utf-8", "replace"))
        return f"HTTP {self.status_code}" + (f": {text}" if text else "")


def printable(text: str) -> str:
    """`text` with its control characters escaped: what a receiver sends may be anything, and is
    stored (PostgreSQL text holds no NUL) and shown on operators' terminals."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def parse_url(url: str, allow_http: bool) -> httpx.URL:
    """The URL, parsed as it will be sent, or InvalidRequest naming `url`: at most MAX_URL_LENGTH
    characters, no spaces or control characters, https (http too when allowed), a host, a port
    in range, no credentials."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidRequest(f"url must be at most {MAX_URL_LENGTH} characters.", param="url", code="invalid_url")
    if any(char.isspace() for char in url):  # httpx would send them percent-encoded, even in the host
        raise InvalidRequest("url must not contain spaces.", param="url", code="invalid_url")
    try:
        parsed = httpx.URL(url)  # refuses control characters, and encodes the host (IDNA 2008)
        if not 0 < (parsed.port or 443) < 65536:
            raise ValueError(f"port {parsed.port} is out of range")
    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
        raise InvalidRequest(f"url is not a valid URL ({exc}).", param="url", code="invalid_url") from None
    if parsed.scheme not in (("https", "http") if allow_http else ("https",)) or not parsed.host:
        raise InvalidRequest("url must be an https:// URL with a host.", param="url", code="invalid_url")
    if parsed.userinfo:
        raise InvalidRequest("url must not contain a user name or password.", param="url", code="invalid_url")
    return parsed


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally reachable unicast address, judged by the IPv4 address it carries when it is a
    translated one."""
    if ip.version == 6:
        if ip in _LOCAL_NAT64:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and (ip in _NAT64 or ip in _IPV4_COMPATIBLE):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
    return ip.is_global and not ip.is_multicast


async def resolve(url: httpx.URL, allow_private: bool, owner: str) -> list[str]:
    """The addresses to connect to for `url`, each checked: Refused when the host resolves to
    nothing or, unless allowed, to any address that is not public."""
    host, port = url.raw_host.decode("ascii"), url.port or (443 if url.scheme == "https" else 80)
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        addresses = [str(literal)]
    except ValueError:
        try:
            infos = await _lookup(host, port, owner)
        except (OSError, UnicodeError):
            raise Refused(f"{host} does not resolve") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not allow_private and any(not is_public(ipaddress.ip_address(a.split("%")[0])) for a in addresses):
        raise Refused("the URL's host resolves to a loopback, link-local or private address; "
                      "set WEBHOOK_ALLOW_PRIVATE=true to allow it")
    if not addresses:
        raise Refused(f"{host} does not resolve")
    return addresses


async def _lookup(host: str, port: int, owner: str) -> list:
    """getaddrinfo on the resolver's threads, counted against `owner` until its thread is free
    again (which may be long after the caller's deadline)."""
    with _lookups_lock:
        if _lookups_held[owner] >= LOOKUPS_PER_OWNER:
            raise Refused(f"{host} does not resolve: earlier lookups of this project's hosts are still unanswered")
        _lookups_held[owner] += 1
    lookup = _RESOLVER.submit(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    lookup.add_done_callback(lambda _: _release_lookup(owner))
    return await asyncio.wrap_future(lookup)


def _release_lookup(owner: str) -> None:
    with _lookups_lock:
        _lookups_held[owner] -= 1
        if not _lookups_held[owner]:
            del _lookups_held[owner]


async def check_url(url: str, allow_private: bool, timeout: float, owner: str) -> str:
    """`url` when it is valid and its host resolves to addresses it may be sent to (within
    `timeout`), else InvalidRequest naming `url`. Holds no database connection: a slow resolver
    must not drain the pool."""
    parsed = parse_url(url, allow_http=allow_private)
    try:
        async with asyncio.timeout(timeout):
            await resolve(parsed, allow_private, owner)
    except Refused as refused:
        raise InvalidRequest(f"url cannot be used: {refused}.", param="url", code="invalid_url") from None
    except TimeoutError:
        raise InvalidRequest(f"url cannot be used: its host did not resolve within {timeout:g} s.", param="url",
                             code="invalid_url") from None
    return url


async def post(url: str, body: bytes, headers: dict[str, str], *, timeout: float, allow_private: bool,
               owner: str) -> Reply:
    """One try for `owner` (the endpoint's project): the receiver's Reply, or an exception (Refused,
    TimeoutError when the deadline passed, httpx's errors, InvalidRequest for a URL that cannot be
    sent)."""
    deadline = time.monotonic() + timeout
    async with asyncio.timeout(timeout):
        parsed = parse_url(url, allow_http=allow_private)
        addresses = await resolve(parsed, allow_private, owner)
        for address in addresses[:-1]:
            try:
                return await _post_to(address, parsed, body, headers, deadline)
            except httpx.ConnectError:
                continue  # the next checked address, within the same deadline
        return await _post_to(addresses[-1], parsed, body, headers, deadline)


async def _post_to(address: str, url: httpx.URL, body: bytes, headers: dict[str, str], deadline: float) -> Reply:
    host = url.raw_host.decode("ascii")
    host_header = host if url.port is None else f"{host}:{url.port}"
    # A client per try: connections are never shared, so none made for one name carries another's.
    async with httpx.AsyncClient(verify=_tls_context(), trust_env=False, follow_redirects=False,
                                 timeout=max(deadline - time.monotonic(), 0.001)) as client:
        request = client.build_request("POST", url.copy_with(host=address), content=body,
                                       headers={**headers, "host": host_header, "accept-encoding": "identity"},
                                       extensions={"sni_hostname": host})
        response = await client.send(request, stream=True)
        try:
            if 200 <= response.status_code < 300:
                return Reply(response.status_code, b"")
            return Reply(response.status_code, await _start_of(response, deadline))
        finally:
            await response.aclose()  # closes the connection; whatever is left unread stays unread


async def _start_of(response: httpx.Response, deadline: float) -> bytes:
    """Up to REPLY_BYTES of the body, as received; what arrived before the deadline if it is slow."""
    received = bytearray()
    try:
        async with asyncio.timeout(max(deadline - time.monotonic() - 0.05, 0)):
            async for chunk in response.aiter_raw():
                received += chunk[:REPLY_BYTES - len(received)]
                if len(received) >= REPLY_BYTES:
                    break
    except (TimeoutError, httpx.HTTPError):
        pass  # the status already says the try failed; the body only illustrates it
    return bytes(received)


@lru_cache(maxsize=1)
def _tls_context() -> ssl.SSLContext:
    """Certificates are checked against certifi's authorities, or SSL_CERT_FILE's when set."""
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or certifi.where())


def describe_failure(exc: BaseException, timeout: float) -> str:
    """A try's failure in a line, for the delivery's record (operators read it; a tenant's /test
    gets none of it)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s (WEBHOOK_TIMEOUT, from the lookup to the reply)"
    if isinstance(exc, (Refused, InvalidRequest)):
        return printable(f"Refused: {exc}")
    return printable(f"{type(exc).__name__}: {exc or 'no detail'}")
