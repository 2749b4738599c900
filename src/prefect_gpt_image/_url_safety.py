"""Which image URLs may be fetched, and the address each one is fetched from.

Image URLs come from the API's answers, so they are untrusted input. Only http(s) is
fetched, and only from public addresses, with two exceptions among internal ones
(loopback, private, link-local, shared, reserved): the API's own host and port when the
API itself is at an internal address (an emulator, an in-house proxy), and any internal
address when the client is built with `allow_internal_images=True`. Cloud metadata
services (IPv4 and IPv6 link-local, AWS's fd00:ec2::254) are never fetched from,
whatever the API's address or the client's options. An IPv6 address that carries an
IPv4 one (IPv4-mapped, IPv4-compatible, NAT64, 6to4) is judged by the IPv4 address inside.

A host name is looked up once: the download connects to the address that was checked
(`PinnedURL`), so a name that answers a public address to the check and an internal one
to the connection (DNS rebinding) cannot lead a download inside. A name that cannot be
looked up is never fetched (`pin_image_url` lets the lookup's `OSError` through, for the
caller to retry).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import httpx

from prefect_gpt_image.errors import InvalidResponseError, UnsafeImageURLError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CLOUD_METADATA_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fd00:ec2::254/128"),
)
"""Never fetched from: IPv4 link-local (169.254.169.254 is the metadata service of AWS,
Google Cloud, Azure and Oracle Cloud), IPv6 link-local, and AWS's IPv6 metadata address."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
"""Local-use NAT64 (RFC 8215): where the IPv4 address sits depends on the site's prefix
length, so it is judged internal as a whole."""
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SHOWN_URL_CHARS = 200


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (IPv4-mapped ::ffff:a.b.c.d, IPv4-compatible
    ::a.b.c.d, NAT64 64:ff9b::a.b.c.d, 6to4 2002:aabb:ccdd::), or None."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def is_internal(address: IPAddress) -> bool:
    """Whether `address` is inside a network rather than on the internet, judged by the
    IPv4 address it carries, if it carries one."""
    inner = embedded_ipv4(address)
    if inner is not None:
        return is_internal(inner)
    if address in _NAT64_LOCAL:
        return True
    return not address.is_global or address.is_multicast


def is_cloud_metadata(address: IPAddress) -> bool:
    """Whether `address` is, or carries, an address of `CLOUD_METADATA_NETWORKS`."""
    target = embedded_ipv4(address) or address
    return any(
        target in network
        for network in CLOUD_METADATA_NETWORKS
        if network.version == target.version
    )


@dataclass(frozen=True)
class ImageHostPolicy:
    """Which internal addresses images may be fetched from; public addresses always may,
    cloud metadata addresses never may."""

    allow_internal: bool = False
    """Any internal address: the explicit opt-in (`allow_internal_images=True`)."""
    api_host: str | None = None
    """The API's host name, lowercased; its port is `api_port`."""
    api_port: int | None = None
    api_addresses: frozenset[IPAddress] = frozenset()
    """The internal addresses the API's host name resolved to."""

    @classmethod
    def for_api(cls, endpoint_url: str, *, allow_internal: bool | None = None) -> ImageHostPolicy:
        """The policy of a client of the API at `endpoint_url`: with `allow_internal` None,
        the API's own host and port and no other internal address; True, any internal
        address; False, none."""
        if allow_internal is not None:
            return cls(allow_internal=allow_internal)
        try:
            url = httpx.URL(endpoint_url)
            host = url.raw_host.decode("ascii").lower()
            port = url.port or _DEFAULT_PORTS.get(url.scheme)
        except (httpx.InvalidURL, UnicodeError):
            return cls()
        return cls(api_host=host, api_port=port, api_addresses=_api_addresses(host))

    def allows(self, address: IPAddress, host: str, port: int) -> bool:
        """Whether `address`, which `host` resolved to, may be fetched from at `port`."""
        if is_cloud_metadata(address):
            return False
        if self.allow_internal or not is_internal(address):
            return True
        return port == self.api_port and (host == self.api_host or address in self.api_addresses)


@lru_cache(maxsize=64)
def _api_addresses(host: str) -> frozenset[IPAddress]:
    try:
        return frozenset(address for address in _resolve(host, None) if is_internal(address))
    except (OSError, ValueError):
        return frozenset()


@dataclass(frozen=True)
class PinnedURL:
    """An image URL that passed the check, and the address it must be fetched from."""

    url: str
    """The URL as the API gave it."""
    scheme: str
    host: str
    """The host name in ASCII (IDNA), as the Host header, TLS's server name (SNI) and the
    certificate's check must name it."""
    port: int
    address: IPAddress
    """The checked address: the only one to connect to."""
    host_header: str

    @property
    def connect_url(self) -> str:
        """`url` with its host replaced by `address`, so that nothing looks the name up again."""
        return str(httpx.URL(self.url).copy_with(host=str(self.address)))

    def join(self, location: str) -> str:
        """Where a redirect from this URL to `location` leads, relative to the host name."""
        try:
            return str(httpx.URL(self.url).join(location))
        except (httpx.InvalidURL, ValueError, UnicodeError):
            raise InvalidResponseError(
                f"The image host redirected to a location that is not a URL "
                f"({len(location)} characters)."
            ) from None


def pin_image_url(url: str, policy: ImageHostPolicy) -> PinnedURL:
    """Check `url` against `policy` and pin the address to fetch it from.

    Raises UnsafeImageURLError for a URL that is not http(s), or whose host resolves to an
    address the policy refuses (any one of them); InvalidResponseError for a URL or host
    name that cannot be read; and the lookup's OSError when the name does not resolve.
    """
    shown = _shown(url)
    try:
        scheme = urlsplit(url).scheme
        parsed = httpx.URL(url) if scheme in _DEFAULT_PORTS else None
        host = parsed.raw_host.decode("ascii").lower() if parsed is not None else ""
        port = parsed.port if parsed is not None else None
    except (httpx.InvalidURL, ValueError, UnicodeError) as exc:
        raise InvalidResponseError(
            f"The API pointed at an image URL that cannot be read ({type(exc).__name__}): {shown}"
        ) from None
    if parsed is None or not host:
        raise UnsafeImageURLError(f"The API pointed at {shown}, which is not an http(s) URL.")
    port = port or _DEFAULT_PORTS[scheme]
    try:
        addresses = _resolve(host, port)
    except ValueError as exc:  # UnicodeError from IDNA: a label over 63 characters, or empty
        raise InvalidResponseError(
            f"The API pointed at an image host whose name cannot be looked up "
            f"({type(exc).__name__}: {exc}): {shown}"
        ) from None
    if refused := [address for address in addresses if not policy.allows(address, host, port)]:
        listed = ", ".join(
            f"{address}, cloud metadata" if is_cloud_metadata(address) else str(address)
            for address in refused
        )
        raise UnsafeImageURLError(
            f"The API pointed at {_shown(host)}, an internal address ({listed}); "
            "refusing to fetch from it."
        )
    return PinnedURL(
        url=url,
        scheme=scheme,
        host=host,
        port=port,
        address=addresses[0],
        host_header=parsed.netloc.decode("ascii"),
    )


def check_image_url(url: str, *, allow_internal: bool) -> PinnedURL:
    """`pin_image_url` with every internal address allowed (cloud metadata excepted), or
    none."""
    return pin_image_url(url, ImageHostPolicy(allow_internal=allow_internal))


def _resolve(host: str, port: int | None) -> list[IPAddress]:
    """The addresses `host` names, in the resolver's order: an address literal itself, or
    a name's lookup, once."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, f"no address for {host}")
    return addresses


def _shown(text: str) -> str:
    """`text` quoted, and cut to a length an error message can carry."""
    if len(text) > _SHOWN_URL_CHARS:
        return repr(text[:_SHOWN_URL_CHARS]) + "..."
    return repr(text)
