"""Put the real credential on the wire, and nowhere else.

The swap stage never writes a real credential into ``flow.request``: it writes a
placeholder, ``spendgate:<key id>:<ref>``, and registers the real header values
under ``ref`` here. When mitmproxy serialises the request head for the upstream
connection (HTTP/1 or HTTP/2), the placeholder is replaced in a private copy of
the head. So the credential is never in the flow: not in mitmweb (UI, its HTTP API,
flows saved from it), not in ``-w`` files, not in logs, at no point in time.

This wraps two mitmproxy functions (the HTTP/1 head assembler and the HTTP/2
header formatter). If a future mitmproxy moves them, :func:`install` raises and the
gateway does not start; and a placeholder that is not swapped reaches the vendor
as an invalid key, so a miss fails closed rather than open.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import secrets
from collections.abc import Callable
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import http1
from mitmproxy.proxy.layers.http import _http2

PREFIX = "spendgate:"
_PREFIX_B = PREFIX.encode()

# ref → {lower-case header name: real value}. Removed when the flow ends.
_pending: dict[str, dict[bytes, bytes]] = {}
_installed = False


def register(key_id: str, headers: dict[str, str]) -> tuple[str, str]:
    """Register real header values; returns (ref, placeholder to put in the flow)."""
    ref = secrets.token_hex(8)
    _pending[ref] = {k.lower().encode(): v.encode() for k, v in headers.items()}
    return ref, f"{PREFIX}{key_id}:{ref}"


def forget(ref: str | None) -> None:
    if ref:
        _pending.pop(ref, None)


def pending_count() -> int:
    return len(_pending)


def _real_fields(fields: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[bytes, bytes], ...] | None:
    out = None
    for i, (name, value) in enumerate(fields):
        if value.startswith(_PREFIX_B):
            ref = value.rsplit(b":", 1)[-1].decode(errors="replace")
            real = _pending.get(ref, {}).get(name.lower())
            if real is not None:
                if out is None:
                    out = list(fields)
                out[i] = (name, real)
    return tuple(out) if out is not None else None


def with_credentials(request: http.Request) -> http.Request:
    """A shallow copy of ``request`` whose head carries the real credential (or itself)."""
    fields = _real_fields(request.headers.fields)
    if fields is None:
        return request
    copy = http.Request.__new__(http.Request)
    copy.__dict__.update(request.__dict__)
    # copy.copy, not dataclasses.replace: replace re-runs mitmproxy's per-field type checks (~40 µs)
    copy.data = copy_module.copy(request.data)
    copy.data.headers = http.Headers(fields)
    return copy


def _wrap_h1(orig: Callable[[http.Request], bytes]) -> Callable[[http.Request], bytes]:
    def assemble_request_head(request: http.Request) -> bytes:
        return orig(with_credentials(request))

    assemble_request_head.__wrapped__ = orig  # type: ignore[attr-defined]
    return assemble_request_head


def _wrap_h2(orig: Callable[..., Any]) -> Callable[..., Any]:
    def format_h2_request_headers(context: Any, event: Any) -> Any:
        request = with_credentials(event.request)
        if request is not event.request:
            event = dataclasses.replace(event, request=request)
        return orig(context, event)

    format_h2_request_headers.__wrapped__ = orig  # type: ignore[attr-defined]
    return format_h2_request_headers


def install() -> None:
    """Wrap mitmproxy's request-head serialisers (idempotent)."""
    global _installed
    if _installed:
        return
    if not callable(getattr(http1, "assemble_request_head", None)) or not callable(
        getattr(_http2, "format_h2_request_headers", None)
    ):
        raise RuntimeError(
            "this mitmproxy version has no http1.assemble_request_head / "
            "_http2.format_h2_request_headers; spendgate cannot inject credentials safely"
        )
    http1.assemble_request_head = _wrap_h1(http1.assemble_request_head)
    _http2.format_h2_request_headers = _wrap_h2(_http2.format_h2_request_headers)
    _installed = True
