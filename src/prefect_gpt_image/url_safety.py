"""Which image URLs may be fetched.

Image URLs come from the API's answers, so they are untrusted input: only http(s),
and never an address inside this network (loopback, private, link-local such as
cloud metadata services), unless the API itself is configured at such an address,
as the emulator and in-house proxies are.
"""

from __future__ import annotations

import ipaddress
import socket
from functools import lru_cache
from urllib.parse import urlsplit

from prefect_gpt_image.errors import UnsafeImageURLError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_internal(address: IPAddress) -> bool:
    return not address.is_global or address.is_multicast


@lru_cache(maxsize=64)
def is_local_endpoint(url: str) -> bool:
    """Whether the configured API lives at an internal address (an emulator, a proxy)."""
    host = urlsplit(url).hostname or ""
    try:
        return any(is_internal(address) for address in _resolve(host))
    except OSError:
        return False


def check_image_url(url: str, *, allow_internal: bool) -> None:
    """Refuse a URL that is not http(s), or that resolves to an internal address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeImageURLError(f"The API pointed at {url[:200]!r}, which is not an http(s) URL.")
    if allow_internal:
        return
    try:
        addresses = _resolve(parts.hostname)
    except OSError:
        return  # unresolvable: the download fails with its own, clearer error
    if internal := [str(a) for a in addresses if is_internal(a)]:
        raise UnsafeImageURLError(
            f"The API pointed at {parts.hostname}, an internal address ({', '.join(internal)}); "
            "refusing to fetch from it."
        )


def _resolve(host: str) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        return [ipaddress.ip_address(info[4][0]) for info in infos]
