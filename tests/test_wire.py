"""The real credential exists only in the bytes sent upstream (HTTP/1 and HTTP/2): the patched
functions, the start-up proof through mitmproxy's own client layers, HTTP/3 kept off, and an
HTTP/2 vendor end to end."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import threading
import types
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import POLICY, REAL_CREDENTIALS, start_gateway
from mitmproxy import connection, http, options
from mitmproxy.net.http import http1
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers.http import RequestHeaders, _http1, _http2, _http3
from mitmproxy.test import taddons

from fakes import FakeVendors
from spendgate import wire
from spendgate.runtime import Runtime

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


# --------------------------------------------------------------------------- the start-up proof


def test_self_test_passes_through_mitmproxys_own_client_layers() -> None:
    wire.install()
    wire.self_test()  # raises unless Http1Client and Http2Client put the real value on the wire
    ref, placeholder = wire.register("key_abc", {"Authorization": REAL})
    for version, send in (("HTTP/1.1", wire._send_h1), ("HTTP/2.0", wire._send_h2)):
        req = http.Request.make("POST", "https://api.openai.com/v1/x", b"",
                                {"Host": "api.openai.com", "Authorization": placeholder})
        req.http_version = version
        assert send(req)["authorization"] == REAL, version
    wire.forget(ref)


@pytest.fixture
def uninstalled(monkeypatch: pytest.MonkeyPatch) -> None:
    """install() as at a fresh start; every mitmproxy function it wraps is restored afterwards."""
    wire.install()
    monkeypatch.setattr(wire, "_installed", False)
    for module, name in ((http1, "assemble_request_head"), (_http2, "format_h2_request_headers"),
                         (_http3, "format_h2_request_headers")):
        wrapped = getattr(module, name)
        monkeypatch.setattr(module, name, getattr(wrapped, "__wrapped__", wrapped))


@pytest.mark.parametrize("lost, version", [("_wrap_h1", "HTTP/1.1"), ("_wrap_h2", "HTTP/2.0")])
def test_install_refuses_when_the_wrap_is_not_on_the_wire(uninstalled: None, monkeypatch: pytest.MonkeyPatch,
                                                          lost: str, version: str) -> None:
    originals = (http1.assemble_request_head, _http2.format_h2_request_headers)
    monkeypatch.setattr(wire, lost, lambda orig: orig)  # the wrap has no effect
    with pytest.raises(RuntimeError, match=f"{version} client did not put the real credential"):
        wire.install()
    assert not wire._installed
    assert (http1.assemble_request_head, _http2.format_h2_request_headers) == originals  # undone


def test_install_refuses_when_mitmproxy_calls_the_serialiser_by_another_name(
    uninstalled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # e.g. a mitmproxy release whose HTTP/1 client imports the function instead of the module
    stale = types.SimpleNamespace(**vars(http1))
    monkeypatch.setattr(_http1, "http1", stale)
    with pytest.raises(RuntimeError, match="HTTP/1.1 client did not put the real credential"):
        wire.install()


def test_the_runtime_keeps_http3_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in REAL_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "policy.yaml").write_text(POLICY.format(up="http://127.0.0.1:9"))
    runtime = Runtime()
    with taddons.context(runtime) as tctx:
        tctx.configure(runtime, spendgate_config=str(tmp_path / "policy.yaml"),
                       spendgate_db=str(tmp_path / "ledger.db"))
        assert tctx.options.http3 is False  # mitmproxy's default is True
        tctx.configure(runtime, http3=True)  # --set http3=true, or mitmweb's options editor
        assert tctx.options.http3 is False
    if runtime.store is not None:
        runtime.store.close()


# --------------------------------------------------------------------------- an HTTP/2 upstream, end to end


class H2Upstream:
    """A local vendor speaking HTTP/2 over TLS (ALPN h2 only): records each request's headers
    and answers an OpenAI chat completion."""

    BODY = json.dumps({
        "id": "chatcmpl-h2", "object": "chat.completion", "created": 1767225600, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
    }).encode()  # fmt: skip

    def __init__(self, cert: Path, key: Path) -> None:
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.tls.set_alpn_protocols(["h2"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.seen: list[tuple[str | None, dict[str, str]]] = []  # (ALPN, request headers)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(raw,), daemon=True).start()

    def _handle(self, raw: socket.socket) -> None:
        try:
            conn = self.tls.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        alpn = conn.selected_alpn_protocol()
        if alpn != "h2":
            self.seen.append((alpn, {}))
            conn.close()
            return
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        h2c.initiate_connection()
        conn.sendall(h2c.data_to_send())
        with conn:
            while data := conn.recv(65536):
                for event in h2c.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self.seen.append((alpn, {str(k): str(v) for k, v in event.headers or []}))
                    elif isinstance(event, h2.events.DataReceived):
                        h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if isinstance(event, h2.events.StreamEnded):
                        h2c.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/json"),
                                                           ("content-length", str(len(self.BODY)))])
                        h2c.send_data(event.stream_id, self.BODY, end_stream=True)
                conn.sendall(h2c.data_to_send())

    def close(self) -> None:
        self.sock.close()


def make_tls_files(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spendgate h2 test vendor")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_pem, key_pem = directory / "vendor.pem", directory / "vendor-key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert_pem, key_pem


def test_an_http2_vendor_receives_the_real_key_and_nothing_else_does(
    tmp_path: Path, fakes: FakeVendors, certs: Path
) -> None:
    cert, key = make_tls_files(tmp_path)
    vendor = H2Upstream(cert, key)
    policy = POLICY.format(up=fakes.url).replace(
        f'openai:    {{secret: env:OPENAI_API_KEY, upstream: "{fakes.url}"}}',
        f'openai:    {{secret: env:OPENAI_API_KEY, upstream: "https://127.0.0.1:{vendor.port}"}}',
    )
    assert f"127.0.0.1:{vendor.port}" in policy
    gw = start_gateway(tmp_path / "gw", fakes, certs, policy=policy,
                       extra=("--set", f"ssl_verify_upstream_trusted_ca={cert}"))  # fmt: skip
    try:
        _, token = gw.issue("llm")
        # The agent (httpx offering http/1.1 then h2) speaks HTTP/1.1 to mitmproxy, which speaks HTTP/2 to
        # the vendor. (An HTTP/2 agent's path through the formatter is in the tests above and the self-test.)
        with gw.client(http2=True) as c:
            r = c.post("https://api.openai.com/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "chatcmpl-h2"
        ((alpn, headers),) = vendor.seen
        assert (alpn, headers[":path"]) == ("h2", "/v1/chat/completions")  # gateway ⇄ vendor: HTTP/2
        assert headers["authorization"] == f"Bearer {REAL_CREDENTIALS['OPENAI_API_KEY']}"
        assert not any("spendgate:" in v or token in v for v in headers.values())
        row = gw.last_call(0)
        assert (row["decision"], row["vendor"], row["status"], row["cost_status"]) == ("allow", "openai", 200, "parsed")
        gw.stop()
        everywhere = gw.log.read_text() + gw.flows.read_bytes().decode("utf-8", "replace") + json.dumps(gw.calls())
        assert REAL_CREDENTIALS["OPENAI_API_KEY"] not in everywhere
        assert "HTTP/3 (QUIC) is off" in gw.log.read_text()
    finally:
        gw.stop()
        vendor.close()
