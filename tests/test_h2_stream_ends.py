"""An empty HTTP/2 DATA frame in the middle of a streamed answer is not its end.

The gateway's stream callable (scrub, then meter) holds back the tail of what it has read, so a
secret cut across two pieces is still found; mitmproxy calls it with ``b""`` at the end of the
message, and also for an empty DATA frame mid-stream. Here a real HTTP/2 upstream (h2 over TLS,
ALPN) streams an SSE answer that echoes the real OpenAI key split around an empty frame; the
agent speaks HTTP/2 too, so mitmproxy talks HTTP/2 upstream. Without ``streamends`` the first
half is flushed at the empty frame and the key reaches the agent in two pieces.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from harness import POLICY, REAL_CREDENTIALS, Gateway, start_gateway
from mitmproxy import certs as mitm_certs
from test_failures import h2_request  # an HTTP/2 client through the gateway's CONNECT (h2 library)

from fakes import FakeVendors

SECRET = REAL_CREDENTIALS["OPENAI_API_KEY"]
HALF = len(SECRET) // 2
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def sse_pieces() -> list[bytes]:
    """The answer's DATA frames, in order; b"" is an empty frame (not the end of the stream)."""
    head = {"id": "chatcmpl-h2", "object": "chat.completion.chunk", "model": "gpt-4o-mini"}
    text = _event({**head, "choices": [{"index": 0, "delta": {"content": "your key is " + SECRET}}]})
    cut = text.index(SECRET.encode()) + HALF
    return [text[:cut], b"", text[cut:], b"",
            _event({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": USAGE}),
            b"", b"data: [DONE]\n\n"]


class H2Upstream:
    """An HTTP/2-only TLS server answering every request with :func:`sse_pieces`."""

    def __init__(self, certs_dir: Path) -> None:
        # a leaf for 127.0.0.1 signed by the test session's CA, which the gateway is told to trust upstream
        store = mitm_certs.CertStore.from_store(certs_dir, "mitmproxy", 2048)
        entry = store.get_cert("127.0.0.1", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        key = entry.privatekey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        pem = certs_dir / f"h2-upstream-{os.getpid()}.pem"
        pem.write_bytes(entry.cert.to_pem() + key)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(pem)
        self.ctx.set_alpn_protocols(["h2"])
        self.port = 0
        self.requests = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()

    def start(self) -> H2Upstream:
        threading.Thread(target=self._run, daemon=True, name="h2-upstream").start()
        assert self._ready.wait(5)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ctx)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.StreamEnded):
                        self.requests += 1
                        await self._answer(conn, writer, ev.stream_id)
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _answer(conn: h2.connection.H2Connection, writer: asyncio.StreamWriter, sid: int) -> None:
        conn.send_headers(sid, [(":status", "200"), ("content-type", "text/event-stream")])
        for piece in sse_pieces():
            conn.send_data(sid, piece)  # an empty piece is an empty DATA frame without END_STREAM
            writer.write(conn.data_to_send())
            await writer.drain()
            await asyncio.sleep(0.05)  # each frame on its own, so mitmproxy sees them one by one
        conn.end_stream(sid)
        writer.write(conn.data_to_send())
        await writer.drain()


@pytest.fixture(scope="module")
def h2_gateway(tmp_path_factory: pytest.TempPathFactory, fakes: FakeVendors,
               certs: Path) -> Iterator[tuple[Gateway, H2Upstream]]:
    upstream = H2Upstream(certs).start()
    policy = POLICY.format(up=fakes.url).replace(
        f'openai:    {{secret: env:OPENAI_API_KEY, upstream: "{fakes.url}"}}',
        f'openai:    {{secret: env:OPENAI_API_KEY, upstream: "https://127.0.0.1:{upstream.port}"}}')
    assert f"127.0.0.1:{upstream.port}" in policy
    gw = start_gateway(tmp_path_factory.mktemp("h2-ends"), fakes, certs, policy=policy,
                       extra=("--set", f"ssl_verify_upstream_trusted_ca={certs / 'mitmproxy-ca-cert.pem'}"))
    yield gw, upstream
    gw.stop()
    upstream.stop()


def test_an_empty_http2_frame_mid_stream_does_not_flush_half_a_secret(
        h2_gateway: tuple[Gateway, H2Upstream]) -> None:
    gw, upstream = h2_gateway
    _, token = gw.issue("llm")
    request = json.dumps({"model": "gpt-4o-mini", "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, _, body = h2_request(gw, [
        (":method", "POST"), (":scheme", "https"), (":authority", "api.openai.com"),
        (":path", "/v1/chat/completions"), ("authorization", f"Bearer {token}"),
        ("content-type", "application/json")], request, host="api.openai.com")
    assert status == 200 and upstream.requests == 1, (status, body)
    assert SECRET.encode() not in body and SECRET[HALF:].encode() not in body, body
    assert b"your key is [scrubbed by spendgate]" in body and body.endswith(b"data: [DONE]\n\n"), body
    row = gw.calls(1)[-1]
    assert row["cost_status"] == "parsed" and "secret(s) scrubbed" in (row["note"] or ""), row
    assert row["cost_usd"] not in (None, "", "0"), row
    log = gw.log.read_text()
    assert SECRET not in log and "Traceback" not in log
