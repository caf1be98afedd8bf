"""One canonical request: the path every check reads is the path the vendor receives.

The identify stage computes :func:`canonical_target` once and writes it back into the
flow, so rules (``authorize``), estimators and cost parsers (``budget``, ``meter``),
the loop breaker, the ledger and the vendor all see the same bytes. Forwarding the
canonical form (not the agent's spelling) is deliberate: a vendor that read
``//v1/payment_intents`` or ``/v1/%70ayment_intents`` differently from us cannot
make a check look at one endpoint while the vendor acts on another.

Canonical form (RFC 3986 6.2.2, plus the gateway's own refusals):

- percent-escapes of unreserved characters (``A-Z a-z 0-9 - . _ ~``) are decoded,
  every other escape is kept with upper-case hex digits;
- empty segments (``//``, a trailing ``/``) are dropped: ``/v1//x/`` is ``/v1/x``;
- refused as ambiguous: dot segments (``.``, ``..``, also encoded), an encoded ``/``
  or ``\\``, a backslash, a NUL, a malformed escape (``%zz``), a ``#fragment`` anywhere
  in the target, a target that is not origin-form (``*``, ``x/y``).

The query string is kept as sent (estimators parse it with ``parse_qs``, which decodes).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%(?:([0-9A-Fa-f]{2})|.{0,2})", re.DOTALL)


class Ambiguous(ValueError):
    """A request target that could mean different things to the gateway and to the vendor."""


def _normalise_escapes(segment: str) -> str:
    def one(m: re.Match[str]) -> str:
        hexdigits = m.group(1)
        if hexdigits is None:
            raise Ambiguous(f"malformed percent-escape {m.group(0)!r}")
        byte = int(hexdigits, 16)
        return chr(byte) if byte in UNRESERVED else "%" + hexdigits.upper()

    return _ESCAPE.sub(one, segment) if "%" in segment else segment


def canonical_path(path: str) -> str:
    """The canonical form of a path (no query). Raises :class:`Ambiguous`."""
    if not path.startswith("/"):
        raise Ambiguous(f"request target {path[:80]!r} is not an absolute path")
    if "#" in path:
        raise Ambiguous("a #fragment in a request target")
    segments = []
    for raw in path.split("/"):
        if raw == "":
            continue
        seg = _normalise_escapes(raw)
        decoded = unquote(seg, errors="surrogateescape")
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded or "\x00" in decoded:
            raise Ambiguous(f"ambiguous path segment {raw[:80]!r}")
        segments.append(seg)
    return "/" + "/".join(segments)


def canonical_target(target: str) -> str:
    """``path?query`` with the path in canonical form; the query as sent. Raises :class:`Ambiguous`."""
    path, sep, query = target.partition("?")
    if "#" in query:
        raise Ambiguous("a #fragment in a request target")
    return canonical_path(path) + sep + query


_HOST = re.compile(r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.?)+(?::[0-9]{1,5})?$|^\[[0-9a-f:.]+\](?::[0-9]{1,5})?$")


def well_formed_host(value: str) -> bool:
    """A Host header that is ``name[:port]`` or ``[ipv6][:port]`` and nothing else: no userinfo
    (``api.stripe.com:443@evil.example``), no spaces, commas or a second host."""
    return bool(_HOST.match(value.lower())) and len(value) <= 300


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def escape(text: str) -> str:
    """``text`` with control characters (a terminal's escape sequences, CR, LF) as ``\\xNN``,
    for log lines and messages."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)
