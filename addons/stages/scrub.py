"""Stage 8, scrub: no vendor secret reaches the agent or a flow file.

A vendor answer can carry a secret: the real credential echoed back (an error page, a
debug header), or a new key minted by a key-creation endpoint. Before a response leaves
the gateway (and before mitmproxy's ``-w`` writer sees it), its headers and body are
searched for every configured credential value and for the vendor's key patterns
(:data:`PATTERNS`, :data:`SECRET_FIELDS`); each match is replaced by
``[scrubbed by spendgate]``. The flow gets ``X-Spendgate-Scrubbed: N`` and the ledger row's
note says so.

- Encoded bodies are decoded first (bounded, ``spendgate_inflate_limit``); a body that
  cannot be decoded within the bound cannot be checked, so it is **withheld**: the agent
  gets 502 ``response_withheld`` (the call is still counted, at its estimate).
- Streamed responses (SSE, ``stream_large_bodies``) are scrubbed chunk by chunk; the stream
  is cut at line ends, so a key split across two chunks is still found. A compressed stream
  is decoded on the fly and sent on decoded.
- Key-minting endpoints (:data:`KEY_MINTING`) are refused (``endpoint_not_allowed``) unless
  the policy allows that endpoint by a rule naming it without wildcards.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zlib
from collections.abc import Callable, Iterator

import brotli
from mitmproxy import http

from .. import bodies
from ..call import Call, error_body, fail_closed, get_call, keyed_call, refuse
from ..policy import Rule, UnsafePath, path_segments
from ..runtime import Runtime

log = logging.getLogger("spendgate")

MARK = b"[scrubbed by spendgate]"
HOLD = 512  # bytes: longer than any vendor key, the most a stream holds back without a line end

# What a vendor's secret looks like inside a response (anchored on a word boundary).
PATTERNS: dict[str, str] = {
    "stripe": r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,}",
    "openai": r"\bsk-(?!ant-)[A-Za-z0-9_-]{20,}",
    "anthropic": r"\bsk-ant-[A-Za-z0-9_-]{20,}",
    "resend": r"\bre_[A-Za-z0-9_]{16,}",
    "shopify": r"\bshp(?:at|ca|pa|ss)_[A-Za-z0-9]{16,}",
}
# JSON fields whose string values are secrets, for vendors whose keys have no telling prefix.
SECRET_FIELDS: dict[str, tuple[str, ...]] = {
    "twilio": ("secret",),  # POST /Keys.json answers with the new key's secret
    "postmark": ("ApiTokens",),  # GET/POST /servers list the server tokens
}
# For each of PATTERNS: strings one of which every match contains. A streamed chunk holding none of
# them, nor any credential value, cannot match: the regex is not run (tests/test_stream_scrub.py
# checks every pattern against generated matches).
PATTERN_LITERALS: dict[str, tuple[bytes, ...]] = {
    "stripe": (b"k_live_", b"k_test_"),
    "openai": (b"sk-",),
    "anthropic": (b"sk-ant-",),
    "resend": (b"re_",),
    "shopify": (b"shp",),
}
# Endpoints that mint credentials: refused unless the policy names them exactly.
KEY_MINTING: dict[str, tuple[str, ...]] = {
    "openai": ("POST /v1/organization/admin_api_keys", "POST /v1/organization/projects/*/service_accounts"),
    "anthropic": ("POST /v1/organizations/api_keys",),
    "twilio": ("POST /2010-04-01/Accounts/*/Keys.json", "POST /v1/Keys"),
    "resend": ("POST /api-keys",),
    "postmark": ("POST /servers",),
    "shopify": ("POST /admin/api/*/storefront_access_tokens.json",),
    "stripe": ("POST /v1/ephemeral_keys",),
}
_MINTING = {v: [Rule.parse(r) for r in rules] for v, rules in KEY_MINTING.items()}


def secret_pattern(vendor: str, credentials: dict[str, dict[str, str]]) -> re.Pattern[bytes]:
    """One pattern for everything secret in a response of ``vendor``: every configured
    credential value (of any vendor), the vendor's key shape, its secret JSON fields."""
    alts = [re.escape(v.encode()) for creds in credentials.values() for f, v in creds.items()
            if f != "account_sid" and len(v) >= 8]
    if vendor in PATTERNS:
        alts.append(PATTERNS[vendor].encode())
    for name in SECRET_FIELDS.get(vendor, ()):
        alts.append(b'(?<="' + re.escape(name.encode()) + rb'":)\s*(?:"[^"]*"|\[[^\]]*\])')
    return re.compile(b"|".join(alts) or b"(?!)")


def secret_literals(vendor: str, credentials: dict[str, dict[str, str]]) -> tuple[bytes, ...] | None:
    """Strings one of which is in any text ``secret_pattern(vendor, credentials)`` matches in (the
    credential values, each pattern's literals, each secret field's name); None if unknown."""
    out = [v.encode() for creds in credentials.values() for f, v in creds.items()
           if f != "account_sid" and len(v) >= 8]
    if vendor in PATTERNS:
        if vendor not in PATTERN_LITERALS:
            return None
        out += PATTERN_LITERALS[vendor]
    out += [b'"' + name.encode() + b'":' for name in SECRET_FIELDS.get(vendor, ())]
    return tuple(out)


def scrub(data: bytes, pattern: re.Pattern[bytes]) -> tuple[bytes, int]:
    return pattern.subn(lambda m: b'"' + MARK + b'"' if m.group(0).lstrip()[:1] in (b'"', b"[") else MARK, data)


class StreamScrubber:
    """A ``response.stream`` callable: decodes (if needed), scrubs, cuts at line ends."""

    def __init__(self, pattern: re.Pattern[bytes], encoding: str | None,
                 inner: Callable[[bytes], bytes] | None, call: Call | None,
                 literals: tuple[bytes, ...] | None = None) -> None:
        self.pattern, self.inner, self.call = pattern, inner, call
        self.literals = literals  # see secret_literals: none in the buffer, no match possible
        self.buffer = b""
        self.count = 0
        enc = (encoding or "").strip().lower()
        self.decoder: Callable[[bytes], Iterator[bytes]] | None = None
        if enc in ("gzip", "x-gzip", "deflate"):
            d = zlib.decompressobj(47 if enc != "deflate" else 15)

            def inflate(chunk: bytes) -> Iterator[bytes]:
                data = chunk
                while True:
                    out = d.decompress(data, bodies.CHUNK)
                    if out:
                        yield out
                    data = d.unconsumed_tail
                    if not data:
                        return

            self.decoder = inflate
        elif enc == "br":
            b = brotli.Decompressor()

            def unbrotli(chunk: bytes) -> Iterator[bytes]:
                out = b.process(chunk, output_buffer_limit=bodies.CHUNK)
                yield out
                while not b.can_accept_more_data():
                    yield b.process(b"", output_buffer_limit=bodies.CHUNK)

            self.decoder = unbrotli

    def __call__(self, chunk: bytes) -> Iterator[bytes]:
        final = chunk == b""
        if self.inner is not None:
            chunk = self.inner(chunk)  # now: the meter sees the vendor's bytes as they came
        return self._pieces(chunk, final)

    def _pieces(self, chunk: bytes, final: bool) -> Iterator[bytes]:
        pieces: Iterator[bytes] | list[bytes] = self.decoder(chunk) if self.decoder and chunk else [chunk]
        for piece in pieces:
            self.buffer += piece
            yield from self._flush(final=False)
        if final:
            yield from self._flush(final=True)

    def _flush(self, final: bool) -> Iterator[bytes]:
        buf = self.buffer
        if final:
            cut = len(buf)
        else:
            nl = buf.rfind(b"\n") + 1
            cut = nl if nl > len(buf) - HOLD else max(nl, len(buf) - HOLD)
        if self._may_match(buf):
            for m in self.pattern.finditer(buf):
                if m.start() < cut < m.end():
                    cut = m.start()
                    break
            if cut <= 0:
                return
            out, n = scrub(buf[:cut], self.pattern)
            self.count += n
        elif cut <= 0:
            return
        else:  # (the usual chunk: two regex scans saved, ~15 µs for an SSE event)
            out = buf[:cut]
        self.buffer = buf[cut:]
        if out:
            yield out

    def _may_match(self, buf: bytes) -> bool:
        if self.literals is None:
            return True
        for text in self.literals:  # noqa: SIM110 (a loop: no generator per chunk)
            if buf.find(text) >= 0:  # (not `in`: bytes.__contains__ builds a TypeError first)
                return True
        return False


def _note(call: Call, count: int) -> None:
    """Say in the ledger row (its note) and the log that secrets were scrubbed."""
    note = f"{count} secret(s) scrubbed from the response"
    log.warning("spendgate: %s: %s (%s)", call.vendor, note, call.key_id)
    call.message = note if not call.message else f"{call.message}; {note}"
    if call.cost is not None:
        call.cost = dataclasses.replace(call.cost, note=f"{call.cost.note}; {note}".lstrip("; ")[:500])


class Scrub:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._counts: dict[int, int] = {}  # id(call) → secrets scrubbed from its headers so far

    def error(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is not None:
            self._counts.pop(id(call), None)

    def _pattern(self, call: Call) -> re.Pattern[bytes]:
        return self._secrets(call)[0]

    def _secrets(self, call: Call) -> tuple[re.Pattern[bytes], tuple[bytes, ...] | None]:
        state = self.runtime.state
        assert state is not None
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] is not state:
            cache = self._cache = (state, {})
        if call.vendor not in cache[1]:
            cache[1][call.vendor] = (secret_pattern(call.vendor or "", state.credentials),
                                     secret_literals(call.vendor or "", state.credentials))
        return cache[1][call.vendor]

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        call = keyed_call(flow)
        if call is None or call.vendor not in _MINTING:
            return
        method = flow.request.method.upper()
        try:
            segments = path_segments(flow.request.path.split("?", 1)[0])
        except UnsafePath:
            return  # (report-only mode forwards an ambiguous path; authorize recorded it)
        minting = next((r for r in _MINTING[call.vendor] if r.matches(method, segments)), None)
        if minting is None:
            return
        policy = self.runtime.policy(call.policy or "")
        rules = policy.vendors.get(call.vendor) if policy else None
        named = rules is not None and any(
            "*" not in r.text.split(None, 1)[1] and r.matches(method, segments) for r in rules.allow)
        if not named:
            call.mode = "enforce"
            refuse(flow, "endpoint_not_allowed",
                   f"{method} {flow.request.path.split('?', 1)[0]} mints credentials ({minting.text!r}); "
                   "a policy must allow it by name")

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        resp = flow.response
        if call is None or call.key is None or resp is None or call.decision == "deny":
            return
        pattern = self._pattern(call)
        self._headers(resp, pattern, call)
        if resp.stream:
            encoding = resp.headers.get("content-encoding")
            if encoding and encoding.strip().lower() not in ("gzip", "x-gzip", "deflate", "br"):
                resp.stream = False  # (zstd and others: buffered, decoded bounded, like any body)
                return
            inner = resp.stream if callable(resp.stream) else None
            if encoding:
                del resp.headers["content-encoding"]
            # A scrubbed (or decoded) stream changes length: no Content-Length; HTTP/1.1 gets chunks.
            if "content-length" in resp.headers:
                del resp.headers["content-length"]
                if flow.request.http_version == "HTTP/1.1" and "transfer-encoding" not in resp.headers:
                    resp.headers["transfer-encoding"] = "chunked"
            resp.stream = StreamScrubber(pattern, encoding, inner, call, self._secrets(call)[1])

    def _headers(self, resp: http.Response, pattern: re.Pattern[bytes], call: Call) -> None:
        count, fields = 0, []
        for name, value in resp.headers.fields:
            value, n = pattern.subn(MARK, value)
            count += n
            fields.append((name, value))
        if count:
            resp.headers.fields = tuple(fields)
            resp.headers["X-Spendgate-Scrubbed"] = str(count)
            self._counts[id(call)] = self._counts.get(id(call), 0) + count

    def response(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        resp = flow.response
        if call is None or call.key is None or resp is None:
            return
        count = self._counts.pop(id(call), 0)
        if call.decision != "deny":
            if isinstance(resp.stream, StreamScrubber):
                count += resp.stream.count
            elif not resp.stream:
                count += self._body(flow, call)
        if count:
            _note(call, count)  # after the meter: the ledger row's note says so

    def _body(self, flow: http.HTTPFlow, call: Call) -> int:
        resp = flow.response
        assert resp is not None
        try:
            body = bodies.content(resp, self.runtime.inflate_limit)
        except bodies.Undecodable:
            body = resp.raw_content or b""  # corrupt: no client decodes it either; its bytes are checked
        except bodies.TooLarge as e:
            log.warning("spendgate: %s response withheld: %s", call.vendor, e)
            call.reason, call.message = "response_withheld", f"the vendor's answer could not be checked: {e}"
            flow.response = http.Response.make(502, json_error(call, str(e)), {
                "Content-Type": "application/json", "X-Spendgate-Reason": "response_withheld"})
            return 0
        out, n = scrub(body, self._pattern(call))
        if n:
            if "content-encoding" in resp.headers:
                del resp.headers["content-encoding"]
            resp.content = out  # (a corrupt encoded body is sent on scrubbed, without its encoding)
            resp.headers["X-Spendgate-Scrubbed"] = str(int(resp.headers.get("X-Spendgate-Scrubbed", "0")) + n)
        return n


def json_error(call: Call, detail: str) -> bytes:
    return error_body("response_withheld", f"the vendor's answer could not be checked ({detail}); "
                      "it was withheld. The call was sent and is counted at its estimate", call)
