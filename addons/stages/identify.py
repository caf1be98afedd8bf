"""Identify: which vendor, which vault key, and is the key good.

The vendor comes from the tunnel (the CONNECT target, which mitmproxy puts in
``flow.request.host`` inside it), never from the agent-controlled Host header;
a Host header or TLS SNI that disagrees with the tunnel is refused.
"""

from __future__ import annotations

import base64
import binascii
import re

from mitmproxy import http

from ..call import Call, fail_closed, refuse
from ..runtime import Runtime
from ..store import TOKEN_PREFIX
from ..vendors import REGISTRY, vendor_for_host
from ..vendors.base import Vendor

VAULT_HEADER = "x-vault-key"
_TOKEN = re.compile(r"^vk_[A-Za-z0-9_-]{32,}$")
_TOKEN_ANYWHERE = re.compile(rb"vk_[A-Za-z0-9_-]{32,}")
_TOKEN_IN_HEADER = re.compile(r"vk_[A-Za-z0-9_-]{16,}")


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")  # as mitmproxy's Headers decodes values


def credential_slots(headers: http.Headers, vendor: Vendor) -> list[tuple[str, str]]:
    """Every (slot, value) where an agent may have put a key: X-Vault-Key, the vendor's
    headers, Authorization (Bearer, or Basic user and password)."""
    names = tuple(dict.fromkeys((VAULT_HEADER, *vendor.key_headers, "authorization")))
    found: dict[str, list[str]] = {}
    for raw_name, raw_value in headers.fields:  # one pass: Headers.get_all rescans per name
        name = raw_name.decode("latin-1").lower()
        if name in names:
            found.setdefault(name, []).append(_text(raw_value).strip())
    slots: list[tuple[str, str]] = []
    for name in names:
        for value in found.get(name, ()):
            if name != "authorization":
                slots.append((name, value))
                continue
            scheme, _, rest = value.partition(" ")
            if scheme.lower() == "bearer":
                slots.append(("authorization", rest.strip()))
            elif scheme.lower() == "basic":
                try:
                    user, _, password = base64.b64decode(rest.strip(), validate=True).decode().partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    slots.append(("authorization", value))
                    continue
                slots += [("authorization:user", user), ("authorization:password", password)]
            else:
                slots.append(("authorization", value))
    return [(slot, v) for slot, v in slots if v]


REDACTED = "spendgate:redacted"
_REDACTED_B = REDACTED.encode()
_TOKEN_IN_HEADER_B = re.compile(_TOKEN_IN_HEADER.pattern.encode())


def redact(headers: http.Headers, vendor: Vendor) -> None:
    """Take every key the agent sent out of the flow as soon as it has been read, so a
    vault key (or a real key an agent should not hold) never shows in mitmweb, saved
    flows or logs, whatever the decision. The swap stage puts the placeholder in.

    A key header keeps one field, at its first place, holding ``spendgate:redacted``
    (what ``headers[name] = ...`` does); a vault key anywhere else is masked."""
    slots = {n.encode() for n in (VAULT_HEADER, "authorization", *vendor.key_headers)}
    out: list[tuple[bytes, bytes]] = []
    seen: set[bytes] = set()
    changed = False
    for name, value in headers.fields:
        lname = name.lower()
        if lname in slots:
            changed = True
            if lname not in seen:
                seen.add(lname)
                out.append((name, _REDACTED_B))
        elif _TOKEN_IN_HEADER_B.search(value):
            changed = True
            out.append((name, _TOKEN_IN_HEADER_B.sub(b"vk_[redacted]", value)))
        else:
            out.append((name, value))
    if changed:
        headers.fields = tuple(out)


_UNSAFE_IN_VALUE = re.compile(rb"\r\n[ \t]+|[\r\n\x00]")


def unfold(headers: http.Headers) -> None:
    """Replace CR, LF and NUL inside header values, and obs-fold continuations, with a space
    (RFC 9110 5.5, RFC 9112 5.2). mitmproxy 12 forwards them as received, so a vendor that reads a
    bare CR or a folded line as a line break would see headers the gateway never checked."""
    if any(_UNSAFE_IN_VALUE.search(value) for _, value in headers.fields):
        headers.fields = tuple((name, _UNSAFE_IN_VALUE.sub(b" ", value)) for name, value in headers.fields)


def looks_real(value: str) -> str | None:
    """The vendor whose real-key pattern ``value`` matches, if any."""
    return next((v.name for v in REGISTRY.values() if v.real_key.match(value)), None)


def _host_only(authority: str) -> str:
    host = authority.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Identify:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # flow id → the key slots read at requestheaders (memory only, until the request hook)
        self._slots: dict[str, list[tuple[str, str]]] = {}

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Read the keys and take them out of the flow as soon as the headers are in: mitmweb
        lists a flow at requestheaders (its body may still be uploading), and its HTTP API and
        websocket would show the vault key (or a real key an agent sent) until the request hook."""
        vendor = vendor_for_host(flow.request.host)
        if flow.response or vendor is None:
            return
        unfold(flow.request.headers)  # read and forward the same headers
        self._slots[flow.id] = credential_slots(flow.request.headers, vendor)
        redact(flow.request.headers, vendor)

    def error(self, flow: http.HTTPFlow) -> None:
        self._slots.pop(flow.id, None)  # e.g. the agent hung up while uploading

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        slots = self._slots.pop(flow.id, None)
        if flow.response:
            return
        vendor = vendor_for_host(flow.request.host)
        if vendor is None:
            return  # egress allowed it; not ours to meter
        call = Call(vendor=vendor.name, host=flow.request.host)
        flow.metadata["spendgate"] = call
        host = flow.request.host.lower()
        unfold(flow.request.headers)  # read and forward the same headers (again: a hook may have added some)
        # Read the keys (unless requestheaders did), then take them out of the flow before any decision.
        if slots is None:
            slots = credential_slots(flow.request.headers, vendor)
        else:
            slots += [s for s in credential_slots(flow.request.headers, vendor) if s[1] != REDACTED]
        redact(flow.request.headers, vendor)

        if flow.request.scheme != "https" or not flow.client_conn.tls_established:
            refuse(flow, "insecure_scheme",
                   f"{host} must be called over https (CONNECT through the proxy), not plain http")
            return
        header_host = flow.request.host_header
        if header_host is not None and _host_only(header_host) != host:
            refuse(flow, "host_mismatch", f"Host header {header_host!r} does not match the tunnel to {host}")
            return
        sni = flow.client_conn.sni
        if sni and sni.lower() != host:
            refuse(flow, "host_mismatch", f"TLS SNI {sni!r} does not match the tunnel to {host}")
            return

        for slot, value in slots:
            if not value.startswith(TOKEN_PREFIX) and (owner := looks_real(value)):
                refuse(flow, "raw_credential",
                       f"the request carries what looks like a real {owner} key in {slot}; "
                       "agents must use a spendgate vault key")
                return
        tokens = {v for _, v in slots if v.startswith(TOKEN_PREFIX)}
        if not tokens:
            refuse(flow, "missing_vault_key",
                   f"no vault key: send it in X-Vault-Key or where the {vendor.name} SDK puts its key")
            return
        if len(tokens) > 1:
            refuse(flow, "ambiguous_vault_key", "the request carries more than one vault key")
            return
        token = tokens.pop()
        body = flow.request.get_content(strict=False) or b""
        # (surrogateescape: a raw non-UTF-8 byte in the path is read back as that byte, not a crash)
        if _TOKEN_ANYWHERE.search(flow.request.path.encode(errors="surrogateescape")) or \
                _TOKEN_ANYWHERE.search(body):
            flow.request.path = _TOKEN_IN_HEADER.sub("vk_[redacted]", flow.request.path)
            flow.request.content = _TOKEN_ANYWHERE.sub(b"vk_[redacted]", body)
            refuse(flow, "vault_key_leak", "a vault key appears in the URL or body; it would reach the vendor")
            return
        store = self.runtime.store
        assert store is not None
        key = store.key_by_token(token) if _TOKEN.match(token) else None
        if key is None:
            refuse(flow, "unknown_key", "this vault key is not known to the gateway")
            return
        call.key, call.policy = key, key.policy
        state = key.state()
        if state != "active":
            refuse(flow, state, f"vault key {key.id} is {state}")
