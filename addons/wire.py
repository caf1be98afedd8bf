"""Put the real credential on the wire, and nowhere else.

The swap stage never writes a real credential into ``flow.request``: it writes a
placeholder, ``spendgate:<key id>:<ref>``, and registers the real header values
under ``ref`` here. When mitmproxy serialises the request head for the upstream
connection (HTTP/1 or HTTP/2), the placeholder is replaced in a private copy of
the head. So the credential is never in the flow: not in mitmweb (UI, its HTTP API,
flows saved from it), not in ``-w`` files, not in logs, at no point in time.

This wraps two mitmproxy functions (the HTTP/1 head assembler and the HTTP/2
header formatter; mitmproxy is pinned to the major version this is tested with). At
start-up :func:`install` proves the wrap is on the path mitmproxy really uses: it sends
a request with a placeholder through mitmproxy's own HTTP/1 and HTTP/2 client layers
(``Http1Client``, ``Http2Client``) and decodes the bytes they produce; unless the real
value comes out and the placeholder does not, it raises and the gateway does not start.
A placeholder that is not swapped reaches the vendor as an invalid key, so a miss fails
closed rather than open.

HTTP/3 upstreams are not covered by this proof: the runtime keeps mitmproxy's ``http3``
option off (QUIC is never offered or accepted). The HTTP/3 layer's own reference to the
HTTP/2 formatter is wrapped too, as a second line.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import re
import secrets
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import h2.config
import h2.connection
import h2.events
from mitmproxy import connection, http, options
from mitmproxy.addonmanager import Loader
from mitmproxy.addons import proxyserver
from mitmproxy.net.http import http1
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import RequestHeaders, _http2, _http3
from mitmproxy.proxy.layers.http._http1 import Http1Client
from mitmproxy.proxy.layers.http._http2 import Http2Client

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


def add_query(ref: str, param: str, value: str) -> None:
    """Register the real value of query parameter ``param`` for ``ref``: a request target whose
    ``param=`` holds the placeholder gets it on the wire (e.g. Gemini's ``?key=``)."""
    _pending.setdefault(ref, {})[b"?" + param.encode()] = quote(value, safe="").encode()


def move_to_query(ref: str, header: str, param: str) -> bool:
    """Send the real value registered for ``header`` as query parameter ``param`` instead
    (the caller moves the placeholder from the header to the URL). False if none is registered."""
    real = _pending.get(ref, {}).get(header.lower().encode())
    if real is None:
        return False
    add_query(ref, param, real.decode())
    return True


_QUERY_PLACEHOLDER = re.compile(rb"([?&])([^=&#]+)=" + re.escape(_PREFIX_B) + rb"[^&#:]*:([0-9a-f]+)(?=[&#]|$)")


def _real_path(path: bytes) -> bytes | None:
    """The request target with every registered query placeholder replaced (None: no change)."""
    if _PREFIX_B not in path:
        return None

    def real(m: re.Match[bytes]) -> bytes:
        value = _pending.get(m.group(3).decode(), {}).get(b"?" + m.group(2))
        return m.group(0) if value is None else m.group(1) + m.group(2) + b"=" + value

    out = _QUERY_PLACEHOLDER.sub(real, path)
    return out if out != path else None


def with_credentials(request: http.Request) -> http.Request:
    """A shallow copy of ``request`` whose head carries the real credential (or itself)."""
    fields = _real_fields(request.headers.fields)
    path = _real_path(request.data.path)
    if fields is None and path is None:
        return request
    copy = http.Request.__new__(http.Request)
    copy.__dict__.update(request.__dict__)
    # copy.copy, not dataclasses.replace: replace re-runs mitmproxy's per-field type checks (~40 µs)
    copy.data = copy_module.copy(request.data)
    if fields is not None:
        copy.data.headers = http.Headers(fields)
    if path is not None:
        copy.data.path = path
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
    """Wrap mitmproxy's request-head serialisers and prove the wrap is used (idempotent).

    Raises RuntimeError (the gateway then does not start) if this mitmproxy has no such
    functions or if its client layers do not put the real value on the wire."""
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
    saved = (http1.assemble_request_head, _http2.format_h2_request_headers,
             getattr(_http3, "format_h2_request_headers", None))  # fmt: skip
    http1.assemble_request_head = _wrap_h1(saved[0])
    _http2.format_h2_request_headers = _wrap_h2(saved[1])
    if saved[2] is not None:
        _http3.format_h2_request_headers = _wrap_h2(saved[2])
    try:
        self_test()
    except Exception:
        http1.assemble_request_head, _http2.format_h2_request_headers = saved[0], saved[1]
        if saved[2] is not None:
            _http3.format_h2_request_headers = saved[2]
        raise
    _installed = True


# --------------------------------------------------------------------------- the start-up proof

_SELF_TEST_HEADER = "Authorization"


def self_test() -> None:
    """Send a request whose credential header is a placeholder through mitmproxy's real
    HTTP/1 and HTTP/2 client layers; raise RuntimeError unless the bytes they would put on
    the wire carry the registered real value and never the placeholder."""
    real = f"Bearer spendgate-self-test-{secrets.token_hex(8)}"
    ref, placeholder = register("self_test", {_SELF_TEST_HEADER: real})
    try:
        for version, send in (("HTTP/1.1", _send_h1), ("HTTP/2.0", _send_h2)):
            request = http.Request.make("POST", "https://self-test.invalid/v1/x", b"",
                                        {"Host": "self-test.invalid", _SELF_TEST_HEADER: placeholder})  # fmt: skip
            request.http_version = version
            try:
                sent = send(request)
            except Exception as e:  # mitmproxy's layers changed shape: no proof, no start
                raise RuntimeError(f"spendgate: the credential swap self-test could not send {version}: {e!r}") from e
            got = sent.get(_SELF_TEST_HEADER.lower())
            if got != real or placeholder in repr(sent):
                raise RuntimeError(
                    f"spendgate: mitmproxy's {version} client did not put the real credential on the "
                    "wire (its request serialiser moved); refusing to start rather than send placeholders"
                )
    finally:
        forget(ref)


def _options() -> options.Options:
    """mitmproxy's defaults, with the proxy server's own options (header normalisation etc.)."""
    opts = options.Options()
    proxyserver.Proxyserver().load(Loader(SimpleNamespace(options=opts)))
    return opts


def _context() -> Context:
    opts = _options()
    client = connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2), timestamp_start=0)
    ctx = Context(client, opts)
    ctx.server = connection.Server(address=("self-test.invalid", 443))
    return ctx


def _sent_bytes(cmds: Any) -> bytes:
    return b"".join(c.data for c in cmds if isinstance(c, commands.SendData))


def _send_h1(request: http.Request) -> dict[str, str]:
    layer = Http1Client(_context())
    raw = _sent_bytes(layer.handle_event(RequestHeaders(1, request, end_stream=True)))
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
    return {k.strip().lower().decode(): v.strip().decode() for k, _, v in (h.partition(b":") for h in head)}


def _send_h2(request: http.Request) -> dict[str, str]:
    layer = Http2Client(_context())
    raw = _sent_bytes(layer.handle_event(events.Start()))
    raw += _sent_bytes(layer.handle_event(RequestHeaders(1, request, end_stream=True)))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    server.initiate_connection()
    for event in server.receive_data(raw):
        if isinstance(event, h2.events.RequestReceived):
            return {str(k): str(v) for k, v in event.headers or []}
    raise RuntimeError("no HTTP/2 request headers were sent")
