"""The real credential exists only in the bytes sent upstream (HTTP/1 and HTTP/2)."""

from __future__ import annotations

from mitmproxy import connection, http, options
from mitmproxy.net.http import http1
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import RequestHeaders, _http2

from spendgate import wire

REAL = "Bearer sk_live_51realREALreal"


def request_with_placeholder(version: str = "HTTP/1.1") -> tuple[http.Request, str]:
    wire.install()
    ref, placeholder = wire.register("key_abc", {"Authorization": REAL})
    req = http.Request.make("POST", "https://api.stripe.com/v1/charges", b"amount=1",
                            {"Authorization": placeholder, "Content-Type": "x"})
    req.http_version = version
    return req, ref


def test_placeholder_names_the_key_and_hides_the_secret() -> None:
    req, ref = request_with_placeholder()
    assert req.headers["Authorization"].startswith("spendgate:key_abc:")
    assert "sk_live" not in str(req.headers) and "sk_live" not in repr(req.get_state())
    wire.forget(ref)


def test_http1_head_carries_the_real_key_the_flow_does_not() -> None:
    req, ref = request_with_placeholder()
    head = http1.assemble_request_head(req)
    assert f"Authorization: {REAL}".encode() in head
    assert req.headers["Authorization"].startswith("spendgate:")  # the flow is untouched
    wire.forget(ref)
    assert b"sk_live" not in http1.assemble_request_head(req), "a forgotten ref is never swapped"


def test_http2_headers_carry_the_real_key() -> None:
    req, ref = request_with_placeholder("HTTP/2.0")
    opts = options.Options()
    opts.add_option("normalize_outbound_headers", bool, True, "")  # a proxyserver option
    ctx = Context(connection.Client(peername=("127.0.0.1", 1), sockname=("127.0.0.1", 2),
                                    timestamp_start=0), opts)
    gen = _http2.format_h2_request_headers(ctx, RequestHeaders(1, req, end_stream=False))
    try:
        while True:
            next(gen)
    except StopIteration as done:
        headers = done.value
    assert (b"authorization", REAL.encode()) in [(k.lower(), v) for k, v in headers]
    assert req.headers["Authorization"].startswith("spendgate:")
    wire.forget(ref)


def test_unrelated_requests_pass_through_unchanged() -> None:
    wire.install()
    req = http.Request.make("GET", "https://example.com/", b"", {"Authorization": "Bearer mine"})
    assert wire.with_credentials(req) is req
