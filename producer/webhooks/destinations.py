"""Where webhooks may go: public addresses only, unless the operator allows a network (SSRF guard).

An endpoint URL is configuration, but whoever can change it (or the DNS of its host) could otherwise
point the gateway at Redis, a cloud metadata service or an admin port inside the network. So every
address an endpoint resolves to must be globally routable: private, loopback, link-local, shared
(CGNAT), multicast, reserved and unspecified ranges are refused unless they fall inside one of the
operator's allowed networks (`--webhook-allowed-networks 10.1.2.0/24`). The check runs at config load
for a literal IP, and at every delivery on the host's resolved addresses; the request then goes to the
address that was checked (see producer/webhooks/sender.py), so a second DNS answer cannot swap it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Sequence
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SCHEMES = ("http", "https")
_HOST_NAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


class RefusedDestination(Exception):
    """A webhook URL or address that must not be contacted; the message says why (and how to allow it)."""


class Unresolvable(Exception):
    """A host name with no address right now: a failed attempt like any other, retried on schedule."""


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """`"127.0.0.0/8, 10.1.2.3"` -> networks (a bare address is a network of one)."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"webhook_allowed_networks: {part!r} is not an IP network (CIDR)") from None
    return tuple(networks)


def _category(address: IPAddress) -> str | None:
    """Why an address is not a public destination, or None when it is one."""
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    if not address.is_global:
        return "not globally routable"  # shared 100.64/10 and the like
    return None


def refusal(address: IPAddress, allowed: Sequence[IPNetwork] = ()) -> str | None:
    """Why `address` is refused as a webhook destination (its range), or None when it may be contacted."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 to the kernel
    if any(address.version == net.version and address in net for net in allowed):
        return None
    return _category(address)


def _refused(subject: str, category: str) -> str:
    return f"{subject} is {category} (allow it with --webhook-allowed-networks)"


def literal_address(host: str) -> IPAddress | None:
    """The IP a URL's host names literally (`[::1]` included), None for a host name."""
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def check_url(url: str, allowed: Sequence[IPNetwork] = ()) -> SplitResult:
    """Config-time check of an endpoint URL: http(s), a host, a port, and no refused literal IP (ValueError)."""
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError("the URL holds whitespace or control characters")
    parsed = urlsplit(url)
    if parsed.scheme not in SCHEMES:
        raise ValueError(f"the scheme must be http or https, got {parsed.scheme!r}")
    host = parsed.hostname
    if not host:
        raise ValueError("the URL names no host")
    try:
        parsed.port  # noqa: B018 - raises on a port that is not a number or out of range
    except ValueError as exc:
        raise ValueError(f"bad port ({exc})") from None
    address = literal_address(host)
    if address is None:
        try:
            ascii_host = host.encode("idna").decode()
        except UnicodeError:
            raise ValueError(f"{host!r} is not a valid host name") from None
        if not _HOST_NAME.match(ascii_host):
            raise ValueError(f"{host!r} is not a valid host name")
    category = refusal(address, allowed) if address is not None else None
    if category is not None:
        raise ValueError(f"refused destination: {_refused(str(address), category)}")
    return parsed


async def resolve(host: str, port: int, allowed: Sequence[IPNetwork] = ()) -> str:
    """The address to connect to for `host`: every address it resolves to must be allowed, else
    RefusedDestination (a name with one private answer among public ones is refused whole)."""
    address = literal_address(host)
    if address is not None:
        found = [address]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Unresolvable(f"{host} does not resolve ({exc})") from None
        found = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not found:
            raise Unresolvable(f"{host} resolves to no address")
    for candidate in found:
        category = refusal(candidate, allowed)
        if category is not None:
            subject = str(candidate) if address is not None else f"{host} resolves to {candidate}, which"
            raise RefusedDestination(_refused(subject, category))
    return str(found[0])
