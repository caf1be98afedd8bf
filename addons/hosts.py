"""Host names and host patterns: the one wildcard rule for vendor hosts and ``egress:`` lists.

Pure (no mitmproxy, no spendgate imports), so ``vendors.base`` and ``policy`` both use it.

A pattern is a host name (``api.example.com``), a wildcard (``*.example.com``: any name
*under* ``example.com``, not ``example.com`` itself), an IP address or a CIDR
(``10.0.0.0/8``; host bits may be set, ``10.1.2.3/8`` is ``10.0.0.0/8``). Names compare
case-insensitively and without a trailing dot. ``egress:`` lists are parsed into
:class:`HostPattern` values once, when the policy file loads; an entry that is none of these
(``10.0.0.0/33``, ``example.com:443``, ``https://x``, ``*foo.com``) is a load error.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAME = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,62})(?:\.[a-z0-9_](?:[a-z0-9_-]{0,62}))*$")


def normalize(host: str) -> str:
    return host.lower().rstrip(".")


def wildcard_matches(host: str, pattern: str) -> bool:
    """``host`` against a name or ``*.domain`` (both already normalized)."""
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".domain"
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def ip_of(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclass(frozen=True)
class HostPattern:
    text: str  # as written in the policy
    name: str | None  # a normalized name or *.domain; None for an IP/CIDR
    network: IPNetwork | None

    @classmethod
    def parse(cls, value: Any) -> HostPattern:
        if isinstance(value, HostPattern):
            return value
        if not isinstance(value, str) or not value.strip():
            raise ValueError("expected a host name, *.domain, an IP address or a CIDR")
        text = value.strip()
        if "/" in text or ip_of(text) is not None:
            try:
                return cls(value, None, ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address or CIDR (e.g. 10.0.0.0/8)") from None
        name = normalize(text)
        bare = name[2:] if name.startswith("*.") else name
        if not _NAME.match(bare):
            raise ValueError(f"{value!r} is not a host name, *.domain, IP address or CIDR "
                             "(no scheme, port or path)")
        return cls(value, name, None)

    def matches(self, host: str, ip: IPAddress | None) -> bool:
        """``host`` normalized, ``ip`` its address if it is one."""
        if self.network is not None:
            return ip is not None and ip in self.network
        assert self.name is not None
        return wildcard_matches(host, self.name)


def host_matches(host: str, patterns: Iterable[HostPattern]) -> bool:
    """``host`` (a name or an IP) against parsed patterns."""
    host = normalize(host)
    ip = ip_of(host)
    return any(p.matches(host, ip) for p in patterns)


_EMBEDS_IPV4 = tuple(ipaddress.ip_network(n) for n in (
    "::/96",             # IPv4-compatible ::a.b.c.d (deprecated, still routed by some stacks)
    "::ffff:0:0/96",     # IPv4-mapped
    "::ffff:0:0:0/96",   # IPv4-translated (RFC 2765)
    "64:ff9b::/96",      # NAT64 well-known prefix (RFC 6052): a DNS64 gateway reaches the IPv4 address
))


def is_internal(ip: str) -> bool:
    """Loopback, link-local (the cloud metadata service), private and other non-public ranges,
    also when an IPv6 address carries an internal IPv4 address (mapped, compatible, translated,
    NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``): ``[::7f00:1]`` is 127.0.0.1."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        if not addr.is_global:
            return True
        if addr.sixtofour is not None:
            return not addr.sixtofour.is_global
        if any(addr in net for net in _EMBEDS_IPV4):
            return not ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF).is_global
    return not addr.is_global
