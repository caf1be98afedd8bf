"""Identify: which vendor, which vault key, and is the key good.

The vendor comes from the tunnel (the CONNECT target, which mitmproxy puts in
``flow.request.host`` inside it), never from the agent-controlled Host header;
a Host header or TLS SNI that disagrees with the tunnel is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Awaitable
from urllib.parse import unquote_to_bytes

from mitmproxy import http

from ..bodies import TooLarge, Undecodable, decode_in_place
from ..call import Call, fail_closed, refuse
from ..canonical import Ambiguous, canonical_target, escape, well_formed_host
from ..runtime import Runtime
from ..store import TOKEN_PREFIX, KeyRecord, WouldBlock
from ..vendors import BUILT_IN, REGISTRY, vendor_for_host
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
MASK = "vk_[redacted]"  # where a vault key was in a URL, a body or another header
MASK_B = MASK.encode()
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
            out.append((name, _TOKEN_IN_HEADER_B.sub(MASK_B, value)))
        elif b"%" in value and _leaks(value):  # percent-encoded (vk%5F…)
            changed = True
            out.append((name, _mask(value)))
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


_JSON_ASCII_ESCAPE = re.compile(rb"\\u00([2-7][0-9a-fA-F])")


def _unescaped(data: bytes) -> bytes:
    """``data`` with percent-escapes (up to three layers) and JSON ``\\u00XX`` escapes of ASCII
    decoded: where a vault key hides from a plain search (``vk%5F…``, ``vk\\u005f…``)."""
    for _ in range(3):
        if b"%" not in data:
            break
        data = unquote_to_bytes(data)
    if b"\\u00" in data:
        data = _JSON_ASCII_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), data)
    return data


def _leaks(data: bytes) -> bool:
    """Does ``data`` carry a vault key, plain or escaped?"""
    if _TOKEN_ANYWHERE.search(data):
        return True
    return (b"%" in data or b"\\u00" in data) and bool(_TOKEN_ANYWHERE.search(_unescaped(data)))


def _mask(data: bytes) -> bytes:
    """``data`` with every vault key masked (escaped forms are unescaped first)."""
    if not _TOKEN_ANYWHERE.search(data):
        data = _unescaped(data)
    return _TOKEN_ANYWHERE.sub(MASK_B, data)


def _mask_target(target: str) -> str:
    return _mask(target.encode(errors="surrogateescape")).decode(errors="surrogateescape")


def _drop_unchecked_body(flow: http.HTTPFlow) -> None:
    """A refused request's body is never decoded: an encoded one is dropped from the flow (it
    could hide a vault key, and inflating it is work an unchecked agent must not get), a plain one
    is kept with any vault key masked."""
    req = flow.request
    raw = req.raw_content or b""
    if "content-encoding" in req.headers and raw:
        req.raw_content = b""
        req.headers["X-Spendgate-Body"] = f"dropped: {len(raw)} encoded bytes, not checked"
    elif raw and _leaks(raw):
        req.raw_content = _mask(raw)


def looks_real(value: str) -> str | None:
    """The vendor whose real-key pattern ``value`` matches, if any."""
    return next((v.name for v in REGISTRY.values() if v.real_key.match(value)), None)


def _host_only(authority: str) -> str:
    host = authority.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def scrub_vault_keys_in(headers: http.Headers) -> None:
    masked = tuple((k, _mask(v) if _leaks(v) or _TOKEN_IN_HEADER_B.search(v) else v) for k, v in headers.fields)
    if masked != headers.fields:
        headers.fields = masked


def scrub_vault_keys(request: http.Request) -> None:
    """Mask every vault key (plain or escaped) in a request's headers, target and trailers: for
    requests no stage will check (a non-vendor host, or one mitmproxy rejected)."""
    for headers in (request.headers, request.trailers):
        if headers is not None:
            scrub_vault_keys_in(headers)
    if _leaks(request.data.path):
        request.data.path = _mask(request.data.path)


class Identify:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # flow id → the key slots read at requestheaders (memory only, until the request hook)
        self._slots: dict[str, list[tuple[str, str]]] = {}

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Read the keys and take them out of the flow as soon as the headers are in: mitmweb
        lists a flow at requestheaders (its body may still be uploading), and a request that never
        reaches the ``request`` hook (mitmproxy rejected its body or framing, the agent went away)
        is still saved and shown without them."""
        if flow.response:
            return
        vendor = vendor_for_host(flow.request.host)
        if vendor is None:
            if flow.request.method != "CONNECT":
                scrub_vault_keys(flow.request)  # a vault key goes to no other host either
            return
        unfold(flow.request.headers)  # read and forward the same headers
        self._slots[flow.id] = credential_slots(flow.request.headers, vendor)
        redact(flow.request.headers, vendor)

    def error(self, flow: http.HTTPFlow) -> None:
        self._slots.pop(flow.id, None)  # e.g. the agent hung up while uploading
        scrub_vault_keys(flow.request)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        slots = self._slots.pop(flow.id, None)
        if flow.response:
            return
        vendor = vendor_for_host(flow.request.host)
        if vendor is None:
            scrub_vault_keys(flow.request)
            return  # egress allowed it; not ours to meter
        call = Call(vendor=vendor.name, host=flow.request.host)
        flow.metadata["spendgate"] = call
        checked = self.identify(flow, call, vendor, slots)
        if not isinstance(checked, bool):
            return self.identify_later(flow, checked)
        if not checked and flow.response is not None:
            _drop_unchecked_body(flow)
        return None

    @fail_closed
    async def identify_later(self, flow: http.HTTPFlow, checked: Awaitable[bool]) -> None:
        ok = False
        try:
            ok = await checked
        finally:
            if not ok:  # refused, or about to be (fail_closed: the ledger did not answer in time)
                _drop_unchecked_body(flow)

    def identify(self, flow: http.HTTPFlow, call: Call, vendor: Vendor,
                 slots: list[tuple[str, str]] | None = None) -> bool | Awaitable[bool]:
        """Check the request; True once its body was decoded and checked. An awaitable of that
        when the key lookup must wait on the database (it then runs on the runtime's pool,
        bounded by ``STORE_WAIT``, never on the event loop)."""
        host = flow.request.host.lower()
        unfold(flow.request.headers)  # read and forward the same headers (again: a hook may have added some)
        # Read the keys (unless requestheaders did), then take them out of the flow before any decision.
        if slots is None:
            slots = credential_slots(flow.request.headers, vendor)
        else:
            slots += [s for s in credential_slots(flow.request.headers, vendor) if s[1] != REDACTED]
        # trailers (HTTP/2, chunked) are not read for keys: a key there is masked, never used
        redact(flow.request.headers, vendor)
        if flow.request.trailers is not None:
            scrub_vault_keys_in(flow.request.trailers)

        if flow.request.scheme != "https" or not flow.client_conn.tls_established:
            refuse(flow, "insecure_scheme",
                   f"{host} must be called over https (CONNECT through the proxy), not plain http")
            return False
        hosts = [v for k, v in flow.request.headers.fields if k.lower() == b"host"]
        header_host = flow.request.host_header
        if len(hosts) > 1 or (header_host is not None and not well_formed_host(header_host)):
            refuse(flow, "host_mismatch", f"malformed Host header {escape(header_host or '')!r}")
            return False
        if header_host is not None and _host_only(header_host) != host:
            refuse(flow, "host_mismatch", f"Host header {header_host!r} does not match the tunnel to {host}")
            return False
        sni = flow.client_conn.sni
        if sni and sni.lower() != host:
            refuse(flow, "host_mismatch", f"TLS SNI {sni!r} does not match the tunnel to {host}")
            return False

        for slot, value in slots:
            if not value.startswith(TOKEN_PREFIX) and (owner := looks_real(value)):
                refuse(flow, "raw_credential",
                       f"the request carries what looks like a real {owner} key in {slot}; "
                       "agents must use a spendgate vault key")
                return False
        tokens = {v for _, v in slots if v.startswith(TOKEN_PREFIX)}
        if not tokens:
            refuse(flow, "missing_vault_key",
                   f"no vault key: send it in X-Vault-Key or where the {vendor.name} SDK puts its key")
            return False
        if len(tokens) > 1:
            refuse(flow, "ambiguous_vault_key", "the request carries more than one vault key")
            return False
        token = tokens.pop()
        # A vault key in the request target, even percent-encoded (vk%5F…), would reach the vendor.
        target = flow.request.path
        if _leaks(target.encode(errors="surrogateescape")):
            flow.request.path = _mask_target(target)
            refuse(flow, "vault_key_leak", "a vault key appears in the URL; it would reach the vendor")
            return False
        # The key is looked up before any body is inflated: an unknown agent gets no decoding work.
        store = self.runtime.store
        assert store is not None
        if not _TOKEN.match(token):
            return self.with_key(flow, call, vendor, None, target)
        try:
            key = store.key_by_token(token, wait=False)  # a cache hit (PostgreSQL), a WAL read (SQLite)
        except WouldBlock:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no event loop (in-process tests, replay): wait here
                return self.with_key(flow, call, vendor, store.key_by_token(token), target)
            return self.with_key_later(flow, call, vendor, token, target)
        return self.with_key(flow, call, vendor, key, target)

    async def with_key_later(self, flow: http.HTTPFlow, call: Call, vendor: Vendor, token: str,
                             target: str) -> bool:
        """A key the event loop could not read without waiting (a cache miss, a lock): read on
        the pool; past ``STORE_WAIT`` the call is refused 503 ``store_unavailable``."""
        store = self.runtime.store
        assert store is not None
        key = await self.runtime.offload(store.key_by_token, token)
        return self.with_key(flow, call, vendor, key, target)

    def with_key(self, flow: http.HTTPFlow, call: Call, vendor: Vendor, key: KeyRecord | None,
                 target: str) -> bool:
        """The checks once the key is known (None: no such key)."""
        host = flow.request.host.lower()
        if key is None:
            refuse(flow, "unknown_key", "this vault key is not known to the gateway")
            return False
        call.key, call.policy = key, key.policy
        state = key.state()
        if state != "active":
            refuse(flow, state, f"vault key {key.id} is {state}")
            return False
        loaded = self.runtime.state
        conf = loaded.config.vendors.get(vendor.name) if loaded is not None else None
        # A built-in vendor that is only "*.domain" (Shopify) has one tenant per host: its credential
        # needs credential_hosts. (A declared vendor's hosts are the operator's own choice.)
        tenant_hosts = vendor.name in BUILT_IN and all(h.startswith("*.") for h in vendor.hosts)
        if conf is not None and (conf.credential_hosts or tenant_hosts) and host.rstrip(".") not in conf.credential_hosts:
            refuse(flow, "vendor_not_allowed",
                   f"the {vendor.name} credential is for {', '.join(conf.credential_hosts) or 'no host yet'}, not {host} "
                   f"(vendors.{vendor.name}.credential_hosts)")
            return False
        # An upgrade (WebSocket, h2c, an HTTP/2 extended CONNECT) opens a session whose cost no
        # estimate sees and no response settles: refused until sessions are metered.
        upgrade = flow.request.headers.get("upgrade") or (
            "upgrade" in flow.request.headers.get("connection", "").lower() and "upgrade")
        if upgrade or flow.request.method.upper() == "CONNECT":
            refuse(flow, "unpriceable", f"a {escape(upgrade or 'CONNECT')} session to {vendor.name} cannot be "
                   "priced before it runs (no hold would bound it); it is refused")
            return False
        # One canonical request for every check and for the vendor (see canonical.py).
        try:
            canonical = canonical_target(target)
        except Ambiguous as e:
            config = self.runtime.state.config if self.runtime.state else None
            if config is not None and config.policy_mode(key.policy) == "report":
                canonical = target  # report-only: authorize records would_deny; forwarded as sent
            else:
                refuse(flow, "endpoint_not_allowed",
                       f"{flow.request.method} {escape(target.split('?', 1)[0])}: {e}")
                return False
        if canonical != target:
            flow.request.path = canonical
        try:
            decode_in_place(flow.request, self.runtime.inflate_limit)
        except TooLarge as e:
            refuse(flow, "body_too_large", f"request body: {e}")
            return False
        except Undecodable as e:
            refuse(flow, "malformed_request", f"request body: {e}")
            return False
        body = flow.request.raw_content or b""
        if _leaks(body):
            flow.request.content = _mask(body)
            refuse(flow, "vault_key_leak", "a vault key appears in the body; it would reach the vendor")
        return True
