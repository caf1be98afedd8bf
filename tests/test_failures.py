"""Failures and bad input, end to end (real mitmdump, loopback only, bounded in time).

A hostile upstream (a tiny asyncio server, below) stands in for Stripe: it refuses,
resets mid-response, stays silent, answers with malformed, compressed or huge bodies,
as told by the request header ``X-Mode``. Every test checks what the client saw *and*
what the ledger holds (row, budget counters, holds), and that nothing was retried.

The documented decisions under test (README, "Failure behaviour"):

- upstream unreachable (nothing sent): 502, row ``upstream_unreachable``, hold released;
- request sent, response lost (reset, closed, silent past ``tcp_timeout``): the call is
  counted at its estimate, ``cost_status=unknown``, flagged; never retried;
- a body that cannot be priced: passed through untouched, cost unknown, flagged;
- requests to vendors are never streamed before the checks ran (``stream_large_bodies``
  applies to responses); a streamed response is recorded with cost unknown;
- a ``kill -9`` under load loses no row of a response that reached the client; holds in flight
  (a kill mid-stream too) become rows at their estimate when the next gateway opens the ledger;
- no ledger wait on the event loop: another process holding the ledger's lock delays only the
  calls that need it (a hold, an approval, an admin write; on PostgreSQL a key not cached), which
  are refused 503 ``store_unavailable`` after ``STORE_WAIT`` while a CONNECT is answered at once;
- a full disk holds money answers until recorded and logs once per state; a read-only ledger at
  start-up is one clean line.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import gzip
import json
import os
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import brotli
import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from harness import REAL_CREDENTIALS, Gateway, start_gateway

from fakes import FakeVendors
from spendgate.store.sqlite import SQLiteStore

STRIPE = "https://api.stripe.com"
PI = {"id": "pi_hostile", "object": "payment_intent", "amount": 2000, "amount_received": 2000,
      "currency": "usd", "status": "succeeded"}
PI_BODY = json.dumps(PI).encode()
NANOS = 10**9
ESTIMATE = 20 * NANOS  # every POST below asks for amount=2000 usd


# --------------------------------------------------------------------------- the hostile upstream


def _raw_body(mode: str) -> tuple[bytes, list[tuple[str, str]]]:
    """(body, extra headers) for the modes that answer with one complete response."""
    def pi(**change: object) -> bytes:
        return json.dumps({**PI, **change}).encode()

    bodies: dict[str, tuple[bytes, list[tuple[str, str]]]] = {
        "ok": (PI_BODY, []),
        "truncated": (PI_BODY[: len(PI_BODY) // 2], []),
        "wrong-types": (pi(amount_received="2000", currency=5), []),
        "huge-number": (pi(amount_received=10**40), []),
        "huge-float": (pi(amount_received=1e308), []),
        "negative": (pi(amount_received=-2000), []),
        "no-status": (json.dumps({k: v for k, v in PI.items() if k != "status"}).encode(), []),
        "not-json": (b"<html><body>Bad gateway</body></html>", [("Content-Type", "text/html")]),
        "empty": (b"", []),
        "array": (b"[1, 2, 3]", []),
        "nan": (PI_BODY.replace(b"2000,", b"NaN,", 2), []),
        "deep": (b"[" * 100_000 + b"]" * 100_000, []),
        "bad-utf8": (PI_BODY.replace(b"pi_hostile", b"pi_\xff\xfe"), []),
        "gzip": (gzip.compress(PI_BODY, mtime=0), [("Content-Encoding", "gzip")]),
        "deflate": (zlib.compress(PI_BODY), [("Content-Encoding", "deflate")]),
        "br": (brotli.compress(PI_BODY), [("Content-Encoding", "br")]),
        "identity": (PI_BODY, [("Content-Encoding", "identity")]),
        "bogus-gzip": (b"\x00\x01 not gzip " + PI_BODY, [("Content-Encoding", "gzip")]),
        "bogus-br": (b"\x00\x01 not brotli " + PI_BODY, [("Content-Encoding", "br")]),
        "truncated-gzip": (gzip.compress(PI_BODY, mtime=0)[:20], [("Content-Encoding", "gzip")]),
    }
    return bodies[mode]


class Hostile:
    """A one-request-per-connection HTTP/1.1 server that misbehaves on demand (``X-Mode``)."""

    def __init__(self) -> None:
        self.seen: list[dict] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Hostile:
        threading.Thread(target=self._run, daemon=True, name="hostile-upstream").start()
        assert self._ready.wait(5)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)

    def requests(self, marker: str) -> list[dict]:
        return [r for r in self.seen if r["marker"] == marker]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> int:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            total = 0
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readline()
                    return total
                total += len(await reader.readexactly(size))
                await reader.readline()
        n, total = int(headers.get("content-length") or 0), 0
        while total < n:
            chunk = await reader.read(min(1 << 20, n - total))
            if not chunk:
                break
            total += len(chunk)
        return total

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            raw: list[tuple[str, str]] = []
            for line in lines[1:]:
                if line[:1] in (" ", "\t"):  # an obs-fold continuation line, as a strict reader sees it
                    raw.append(("<obs-fold>", line))
                elif ":" in line:
                    name, value = line.split(":", 1)
                    raw.append((name.strip(), value.strip(" \t")))
            headers = {k.lower(): v for k, v in raw}
            body_len = await self._read_body(reader, headers)
            mode = headers.get("x-mode", "ok")
            self.seen.append({"line": lines[0], "headers": raw, "body_len": body_len, "mode": mode,
                              "marker": headers.get("x-marker", "")})
            await self._answer(mode, headers.get("x-marker") or "hostile", writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(self, mode: str, marker: str, writer: asyncio.StreamWriter) -> None:
        def rst() -> None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        head = f"HTTP/1.1 200 OK\r\nConnection: close\r\nRequest-Id: req_{marker}\r\n"
        if mode == "close":  # FIN, no answer
            return
        if mode == "rst":  # RST, no answer
            rst()
            return
        if mode == "reset":  # headers and part of the body, then RST
            writer.write((head + "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n").encode()
                         + PI_BODY[:20])
            await writer.drain()
            await asyncio.sleep(0.05)
            rst()
            return
        if mode == "sse-stall":  # an Anthropic stream that starts, then stalls (the agent sees the first event)
            event = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":"message",'
                     b'"role":"assistant","model":"claude-3-5-haiku-20241022","content":[],'
                     b'"usage":{"input_tokens":10,"output_tokens":1}}}\n\n')
            writer.write((head + "Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
                         + b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(60)
            return
        if mode.startswith("slow"):  # silent for N seconds, then a good answer
            await asyncio.sleep(float(mode[4:]))
            mode = "ok"
        if mode.startswith("big"):  # N bytes of not-JSON
            size = int(mode[3:])
            writer.write((head + f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n")
                         .encode())
            block = b"x" * (1 << 16)
            for start in range(0, size, len(block)):
                writer.write(block[: min(len(block), size - start)])
                await writer.drain()
            return
        if mode in ("chunked", "gzip-chunked"):
            body = gzip.compress(PI_BODY, mtime=0) if mode == "gzip-chunked" else PI_BODY
            enc = "Content-Encoding: gzip\r\n" if mode == "gzip-chunked" else ""
            parts = [body[:7], body[7:30], body[30:]]
            writer.write((head + f"Content-Type: application/json\r\n{enc}Transfer-Encoding: chunked\r\n\r\n")
                         .encode() + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n")
            await writer.drain()
            return
        body, extra = _raw_body(mode)
        hdrs = {"Content-Type": "application/json", **dict(extra)}
        writer.write((head + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
                      + f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        await writer.drain()


# --------------------------------------------------------------------------- fixtures and helpers


TCP_TIMEOUT = 2  # seconds; mitmproxy's inactivity timeout, the only bound on a silent upstream


def failure_policy(hostile: str, refused: str, fakes: str) -> str:
    return f"""\
version: 1
vendors:
  stripe: {{secret: env:STRIPE_SECRET_KEY, upstream: "{hostile}"}}
  resend: {{secret: env:RESEND_API_KEY, upstream: "{refused}"}}
  openai: {{secret: env:OPENAI_API_KEY, upstream: "{fakes}"}}
  anthropic: {{secret: env:ANTHROPIC_API_KEY, upstream: "{hostile}"}}
policies:
  pay:
    vendors:
      stripe:
        allow: ["POST /v1/payment_intents", "GET /v1/payment_intents/*", "POST /v1/payment_intents/*/confirm"]
        max_request_usd: 200
      resend: {{allow: ["POST /emails"], default_estimate_usd: 1}}
      openai: {{allow: ["POST /v1/chat/completions"]}}
      anthropic: {{allow: ["POST /v1/messages"]}}
    budget: {{key_usd: 100000}}
    loop: {{repeats: 100000, window: 1s}}
    circuit: off  # each failure is checked on its own here; tests/test_circuit.py checks the breaker
"""


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    server = Hostile().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def refused_url() -> Iterator[str]:
    """A port that refuses connections: bound, never listening (so no one else can take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def fgw(tmp_path_factory: pytest.TempPathFactory, fakes: FakeVendors, certs: Path, hostile: Hostile,
        refused_url: str) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("failures"), fakes, certs,
                       policy=failure_policy(hostile.url, refused_url, fakes.url),
                       extra=("--set", f"tcp_timeout={TCP_TIMEOUT}"))
    yield gw
    try:
        log = read_log(gw)
    finally:
        gw.stop()
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]


def issue(gw: Gateway, policy: str = "pay") -> tuple[str, str]:
    """A fresh vault key, issued in-process (the CLI's start-up would cost ~0.4 s per key)."""
    store = SQLiteStore(gw.db)
    try:
        rec, token = store.issue_key(policy, 3600)
    finally:
        store.close()
    return rec.id, token


_marker = iter(range(10**9))


def post(gw: Gateway, token: str, mode: str, *, client: httpx.Client | None = None,
         **kw: object) -> tuple[str, httpx.Response]:
    """POST a $20 payment intent with a unique marker (so the loop breaker and the rows stay apart)."""
    marker = f"m{next(_marker)}"
    headers = {"X-Vault-Key": token, "X-Mode": mode, "X-Marker": marker, **kw.pop("headers", {})}  # type: ignore[dict-item]
    data = {"amount": "2000", "currency": "usd", "description": marker}
    if client is not None:
        return marker, client.post(STRIPE + "/v1/payment_intents", headers=headers, data=data, **kw)
    with gw.client() as c:
        return marker, c.post(STRIPE + "/v1/payment_intents", headers=headers, data=data, **kw)


def usage(gw: Gateway, key_id: str, settled: bool = True) -> tuple[int, int, int]:
    """(used, reserved, open holds) for the key's budget scope, once the write-behind queue is done."""
    deadline = time.monotonic() + 5
    while True:
        with contextlib.closing(sqlite3.connect(gw.db)) as conn:
            row = conn.execute("SELECT used_nanos, reserved_nanos FROM counters WHERE scope = ?",
                               (f"key:{key_id}",)).fetchone() or (0, 0)
            holds = conn.execute("SELECT count(*) FROM reservations WHERE scopes LIKE ?",
                                 (f'%"key:{key_id}"%',)).fetchone()[0]
        if not settled or (row[1] == 0 and holds == 0) or time.monotonic() > deadline:
            return row[0], row[1], holds
        time.sleep(0.02)


def row_for(gw: Gateway, key_id: str, n: int = 1) -> list[dict]:
    """The key's ledger rows, waiting until there are ``n``."""
    deadline = time.monotonic() + 5
    while True:
        rows = [r for r in gw.calls() if r["key_id"] == key_id]
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def read_log(gw: Gateway) -> str:
    """The gateway's log (raw bytes an agent sent may be in it, not always UTF-8)."""
    return gw.log.read_bytes().decode("utf-8", "replace")


def log_count(gw: Gateway, needle: str) -> int:
    return read_log(gw).count(needle)


# --------------------------------------------------------------------------- upstream failures


def test_upstream_refused_is_502_recorded_and_the_hold_released(fgw: Gateway) -> None:
    key_id, token = issue(fgw)
    attempts = log_count(fgw, "error establishing server connection")
    with fgw.client() as c:
        r = c.post("https://api.resend.com/emails", headers={"X-Vault-Key": token},
                   json={"from": "a@example.com", "to": ["b@example.com"], "subject": "s", "html": "x"})
    assert r.status_code == 502
    [row] = row_for(fgw, key_id)
    assert (row["status"], row["decision"], row["reason"]) == (502, "allow", "upstream_unreachable")
    assert (row["cost_status"], row["cost_usd"], row["flagged"]) == ("zero", "0", 0)
    assert Decimal(row["estimated_usd"]) > 0, "the call held money before it was sent"
    assert usage(fgw, key_id) == (0, 0, 0), "nothing was sent: the hold is released, nothing counted"
    time.sleep(0.3)
    assert log_count(fgw, "error establishing server connection") == attempts + 1, "never retried"


@pytest.mark.parametrize("mode", ["reset", "close", "rst"])
def test_response_lost_after_sending_is_502_and_counted_at_the_estimate(fgw: Gateway, hostile: Hostile,
                                                                        mode: str) -> None:
    key_id, token = issue(fgw)
    marker, r = post(fgw, token, mode)
    assert r.status_code == 502, r.text
    assert "x-spendgate-cost-usd" not in r.headers
    assert len(hostile.requests(marker)) == 1, "the vendor saw the request exactly once: never retried"
    [row] = row_for(fgw, key_id)
    assert (row["status"], row["decision"], row["reason"]) == (502, "allow", "upstream_unreachable")
    assert (row["cost_status"], row["cost_usd"], row["flagged"]) == ("unknown", None, 1)
    assert row["estimated_usd"] == "20"
    assert usage(fgw, key_id) == (ESTIMATE, 0, 0), "the vendor may have acted: counted at the estimate"
    time.sleep(0.3)
    assert len(hostile.requests(marker)) == 1


def test_silent_upstream_is_cut_after_tcp_timeout_and_counted_at_the_estimate(fgw: Gateway,
                                                                             hostile: Hostile) -> None:
    """mitmproxy 12 has no per-request upstream read timeout; ``tcp_timeout`` (inactivity of the
    agent's connection, default 600 s) is the bound. When it fires, mitmproxy closes the agent's
    connection without an HTTP answer; the ledger says upstream_timeout / 504."""
    key_id, token = issue(fgw)
    started = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        post(fgw, token, f"slow{TCP_TIMEOUT + 4}")
    elapsed = time.monotonic() - started
    assert TCP_TIMEOUT - 0.5 < elapsed < TCP_TIMEOUT + 3, elapsed  # cut by the gateway, not the vendor
    [row] = row_for(fgw, key_id)
    assert (row["status"], row["decision"], row["reason"]) == (504, "allow", "upstream_timeout")
    assert (row["cost_status"], row["cost_usd"], row["flagged"]) == ("unknown", None, 1)
    assert usage(fgw, key_id) == (ESTIMATE, 0, 0)
    assert len([r for r in hostile.seen if r["mode"].startswith("slow")]) == 1, "never retried"
    print(f"\nsilent vendor: the agent's connection closed {elapsed:.2f} s after the request "
          f"(tcp_timeout={TCP_TIMEOUT}); 504 upstream_timeout row, $20 counted at the estimate")


def test_agent_giving_up_first_is_recorded_and_counted_at_the_estimate(fgw: Gateway, hostile: Hostile) -> None:
    """The agent's own timeout is shorter than the vendor's delay: the request was sent, so the
    call is counted at its estimate, flagged; the row says the upstream failed (502), not 504,
    since the gateway's own timeout did not fire."""
    key_id, token = issue(fgw)
    with pytest.raises(httpx.ReadTimeout):
        post(fgw, token, f"slow{TCP_TIMEOUT + 2}", timeout=httpx.Timeout(5, read=0.5))
    [row] = row_for(fgw, key_id)
    assert (row["status"], row["decision"], row["reason"]) == (502, "allow", "upstream_unreachable")
    assert (row["cost_status"], row["flagged"]) == ("unknown", 1)
    assert usage(fgw, key_id) == (ESTIMATE, 0, 0)


def test_a_slow_upstream_within_the_timeout_is_fine(fgw: Gateway) -> None:
    key_id, token = issue(fgw)
    _, r = post(fgw, token, f"slow{TCP_TIMEOUT / 2}")
    assert r.status_code == 200 and r.headers["x-spendgate-cost-usd"] == "20.00"
    [row] = row_for(fgw, key_id)
    assert (row["cost_status"], row["cost_usd"]) == ("parsed", "20.00")
    assert usage(fgw, key_id) == (ESTIMATE, 0, 0)


# --------------------------------------------------------------------------- a policy edit that crashes the loader


def test_policy_edit_that_breaks_the_loader_keeps_the_old_policy_and_reloading_alive(
        fgw: Gateway, tmp_path: Path) -> None:
    """An edit the loader cannot turn into a ConfigError (here a credential file:... that is not
    text) must leave the last good policy in force and the reload watcher running."""
    _, token = issue(fgw)
    good = fgw.config.read_text()
    binary = tmp_path / "stripe-secret"
    binary.write_bytes(b"\xff\xfe\x00 not a key")
    try:
        before = read_log(fgw)
        fgw.config.write_text(good.replace("secret: env:STRIPE_SECRET_KEY", f"secret: file:{binary}"))
        st = fgw.config.stat()
        os.utime(fgw.config, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        deadline = time.monotonic() + 5
        while "keeping the last good policy" not in read_log(fgw)[len(before):]:
            assert time.monotonic() < deadline, "the bad edit went unnoticed (the reload watcher died?)"
            time.sleep(0.05)
        _, r = post(fgw, token, "ok")
        assert r.status_code == 200, "the last good policy stays in force"
        fgw.write_policy(good.replace('"GET /v1/payment_intents/*", ', ""))
        with fgw.client() as c:
            r = c.get(STRIPE + "/v1/payment_intents/pi_1", headers={"X-Vault-Key": token})
        assert (r.status_code, r.headers.get("x-spendgate-reason")) == (403, "endpoint_not_allowed"), \
            "a later good edit is applied: the watcher is alive"
    finally:
        fgw.write_policy(good)


# --------------------------------------------------------------------------- malformed vendor bodies


@pytest.mark.parametrize("mode", ["truncated", "wrong-types", "huge-number", "huge-float", "negative",
                                  "no-status", "not-json", "empty", "array", "nan", "deep", "bad-utf8",
                                  "bogus-gzip", "bogus-br", "truncated-gzip"])
def test_unpriceable_body_is_unknown_flagged_and_passed_through_untouched(fgw: Gateway, mode: str) -> None:
    key_id, token = issue(fgw)
    sent, _ = _raw_body(mode)
    with fgw.client() as c:
        marker = f"m{next(_marker)}"
        with c.stream("POST", STRIPE + "/v1/payment_intents",
                      headers={"X-Vault-Key": token, "X-Mode": mode, "X-Marker": marker},
                      data={"amount": "2000", "currency": "usd", "description": marker}) as r:
            raw = b"".join(r.iter_raw())
    assert r.status_code == 200
    assert raw == sent, "the vendor's bytes reach the agent unchanged"
    assert "x-spendgate-cost-usd" not in r.headers
    [row] = row_for(fgw, key_id)
    assert (row["status"], row["decision"], row["reason"]) == (200, "allow", None)
    assert (row["cost_status"], row["cost_usd"], row["flagged"]) == ("unknown", None, 1), row["note"]
    assert usage(fgw, key_id) == (ESTIMATE, 0, 0), "an unknown cost is counted at the estimate, never $0"


@pytest.mark.parametrize("mode", ["ok", "gzip", "deflate", "br", "identity", "chunked", "gzip-chunked"])
def test_compressed_and_chunked_bodies_are_priced(fgw: Gateway, mode: str) -> None:
    key_id, token = issue(fgw)
    marker, r = post(fgw, token, mode)
    assert r.status_code == 200
    assert r.json() == PI, "the agent gets the vendor's answer (its client decodes it)"
    encoding = {"gzip": "gzip", "deflate": "deflate", "br": "br", "identity": "identity", "gzip-chunked": "gzip"}
    assert r.headers.get("content-encoding") == encoding.get(mode), "passed through as the vendor sent it"
    assert r.headers["x-spendgate-cost-usd"] == "20.00"
    [row] = row_for(fgw, key_id)
    assert (row["cost_status"], row["cost_usd"], row["flagged"]) == ("parsed", "20.00", 0), row["note"]
    assert row["request_id"] == f"req_{marker}"
    assert usage(fgw, key_id) == (ESTIMATE, 0, 0)


def test_fake_vendor_malformed_llm_body_is_unknown(fgw: Gateway) -> None:
    key_id, token = issue(fgw)
    with fgw.client() as c:
        r = c.post("https://api.openai.com/v1/chat/completions",
                   headers={"Authorization": f"Bearer {token}", "X-Fake-Body": "malformed"},
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()
    [row] = row_for(fgw, key_id)
    assert (row["cost_status"], row["flagged"]) == ("unknown", 1)


# --------------------------------------------------------------------------- HTTP/2 via ALPN


def tls_through(gw: Gateway, host: str = "api.stripe.com", sni: str | None = None,
                alpn: list[str] | None = None) -> ssl.SSLSocket:
    """A TLS connection to ``host`` through the gateway's CONNECT, trusting only its CA."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, "the gateway closed the CONNECT"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=gw.ca)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(s, server_hostname=sni or host)


def raw_exchange(gw: Gateway, request: bytes, **kw: object) -> tuple[int, bytes]:
    """Send raw request bytes over TLS through the gateway; (status, whole answer)."""
    with tls_through(gw, **kw) as tls:  # type: ignore[arg-type]
        tls.sendall(request)
        out = b""
        with contextlib.suppress(TimeoutError, ssl.SSLError, ConnectionError):
            while chunk := tls.recv(65536):
                out += chunk
    status = int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1 ") else 0
    return status, out


def h2_request(gw: Gateway, headers: list[tuple[str, str]], body: bytes,
               host: str = "api.stripe.com") -> tuple[int, dict[str, str], bytes]:
    with tls_through(gw, host, alpn=["h2", "http/1.1"]) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [*headers, ("content-length", str(len(body)))], end_stream=not body)
        if body:
            conn.send_data(sid, body, end_stream=True)
        tls.sendall(conn.data_to_send())
        status, resp_headers, data, ended = 0, {}, b"", False
        while not ended:
            chunk = tls.recv(65536)
            if not chunk:
                break
            for ev in conn.receive_data(chunk):
                if isinstance(ev, h2.events.ResponseReceived):
                    resp_headers = dict(ev.headers)  # type: ignore[arg-type]
                    status = int(resp_headers[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    data += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                    ended = True
            tls.sendall(conn.data_to_send())
        return status, resp_headers, data


def test_http2_from_the_agent_is_checked_swapped_priced_and_recorded(fgw: Gateway, hostile: Hostile) -> None:
    key_id, token = issue(fgw)
    body = b"amount=2000&currency=usd&description=h2"
    status, headers, data = h2_request(fgw, [
        (":method", "POST"), (":scheme", "https"), (":authority", "api.stripe.com"),
        (":path", "/v1/payment_intents"), ("authorization", f"Bearer {token}"), ("x-marker", "h2"),
        ("content-type", "application/x-www-form-urlencoded")], body)
    assert status == 200 and json.loads(data) == PI
    assert headers["x-spendgate-cost-usd"] == "20.00"
    [seen] = hostile.requests("h2")
    assert dict((k.lower(), v) for k, v in seen["headers"])["authorization"] == \
        f"Bearer {REAL_CREDENTIALS['STRIPE_SECRET_KEY']}"
    assert "vk_" not in json.dumps(seen)
    [row] = row_for(fgw, key_id)
    assert (row["status"], row["decision"], row["cost_status"], row["cost_usd"]) == (200, "allow", "parsed", "20.00")


def test_http2_refusals_and_authority_mismatch(fgw: Gateway, hostile: Hostile) -> None:
    _, token = issue(fgw)
    _, other = issue(fgw)
    n = len(fgw.calls())
    base = [(":method", "POST"), (":scheme", "https"), (":path", "/v1/payment_intents")]
    status, headers, _ = h2_request(fgw, [*base, (":authority", "api.stripe.com"), ("x-marker", "h2-two"),
                                          ("authorization", f"Bearer {token}"), ("x-vault-key", other)], b"a=1")
    assert (status, headers.get("x-spendgate-reason")) == (401, "ambiguous_vault_key")
    status, headers, _ = h2_request(fgw, [*base, (":authority", "api.openai.com"), ("x-marker", "h2-auth"),
                                          ("authorization", f"Bearer {token}")], b"a=1")
    assert (status, headers.get("x-spendgate-reason")) == (403, "host_mismatch")
    assert hostile.requests("h2-two") == [] and hostile.requests("h2-auth") == []
    rows = fgw.calls(at_least=n + 2)[n:]
    assert [(r["reason"], r["status"]) for r in rows] == [("ambiguous_vault_key", 401), ("host_mismatch", 403)]


def test_httpx_http2_client_works_through_the_gateway(fgw: Gateway) -> None:
    """httpx offers ALPN ["http/1.1", "h2"] and mitmproxy (lazy) honours the client's first
    choice, so this is HTTP/1.1 on the wire; it must work all the same."""
    key_id, token = issue(fgw)
    with httpx.Client(proxy=fgw.proxy, verify=ssl.create_default_context(cafile=fgw.ca), http2=True) as c:
        _, r = post(fgw, token, "ok", client=c)
    assert r.status_code == 200 and r.headers["x-spendgate-cost-usd"] == "20.00"
    assert row_for(fgw, key_id)[0]["cost_status"] == "parsed"


# --------------------------------------------------------------------------- hostile headers


def test_two_different_vault_keys_are_refused(fgw: Gateway, hostile: Hostile) -> None:
    key_id, token = issue(fgw)
    _, other = issue(fgw)
    n = len(fgw.calls())
    cases = [
        [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {other}")],
        [("Authorization", f"Bearer {token}"), ("X-Vault-Key", other)],
        [("X-Vault-Key", token), ("X-Vault-Key", other)],
        [("Authorization", "Basic " + base64.b64encode(f"{token}:{other}".encode()).decode())],
    ]
    for i, headers in enumerate(cases):
        marker = f"two-keys-{i}"
        with fgw.client() as c:
            r = c.post(STRIPE + "/v1/payment_intents", headers=[*headers, ("X-Marker", marker)],
                       data={"amount": "2000", "currency": "usd"})
        assert (r.status_code, r.headers.get("x-spendgate-reason")) == (401, "ambiguous_vault_key"), headers
        assert r.json()["error"]["code"] == "ambiguous_vault_key"
        assert hostile.requests(marker) == []
    rows = fgw.calls(at_least=n + len(cases))[n:]
    assert [(r["reason"], r["status"], r["decision"]) for r in rows] == \
        [("ambiguous_vault_key", 401, "deny")] * len(cases)
    assert row_for(fgw, key_id, 0) == [], "no key is charged for an ambiguous request"


def test_the_same_vault_key_twice_is_one_key(fgw: Gateway, hostile: Hostile) -> None:
    key_id, token = issue(fgw)
    for i, headers in enumerate([
        [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")],
        [("Authorization", f"Bearer {token}"), ("X-Vault-Key", token)],
        [("Authorization", "Basic " + base64.b64encode(f"{token}:".encode()).decode()), ("X-Vault-Key", token)],
    ]):
        marker = f"same-key-{i}"
        with fgw.client() as c:
            r = c.post(STRIPE + "/v1/payment_intents", headers=[*headers, ("X-Marker", marker)],
                       data={"amount": "2000", "currency": "usd", "description": marker})
        assert r.status_code == 200, r.text
        [seen] = hostile.requests(marker)
        auth = [v for k, v in seen["headers"] if k.lower() == "authorization"]
        assert auth == [f"Bearer {REAL_CREDENTIALS['STRIPE_SECRET_KEY']}"], "one Authorization, the real key"
        assert "vk_" not in json.dumps(seen)
    assert len(row_for(fgw, key_id, 3)) == 3


def test_sni_and_host_mismatches_are_refused_at_the_socket_level(fgw: Gateway, hostile: Hostile) -> None:
    _, token = issue(fgw)
    n = len(fgw.calls())

    def req(host_lines: str, marker: str) -> bytes:
        return (f"POST /v1/payment_intents HTTP/1.1\r\n{host_lines}X-Vault-Key: {token}\r\nX-Marker: {marker}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 24\r\n"
                "Connection: close\r\n\r\namount=2000&currency=usd").encode()

    status, out = raw_exchange(fgw, req("Host: api.stripe.com\r\n", "sni"), sni="api.openai.com")
    assert status == 403 and b"host_mismatch" in out
    status, out = raw_exchange(fgw, req("Host: api.stripe.com\r\nHost: evil.example\r\n", "two-hosts"))
    assert status in (400, 403), out[:300]
    status, out = raw_exchange(fgw, req("Host: evil.example\r\n", "host"))
    assert status == 403 and b"host_mismatch" in out
    assert hostile.requests("sni") == hostile.requests("two-hosts") == hostile.requests("host") == []
    reasons = [r["reason"] for r in fgw.calls(at_least=n + 2)[n:]]
    assert reasons.count("host_mismatch") >= 2, reasons


@pytest.mark.parametrize("value", ["a\r\nX-Injected: 1", "a\nX-Injected: 1", "a\rX-Injected: 1", "a\x00b"])
def test_crlf_in_header_values_is_rejected_by_the_client_library(fgw: Gateway, value: str) -> None:
    _, token = issue(fgw)
    with fgw.client() as c, pytest.raises((httpx.LocalProtocolError, ValueError)):
        c.post(STRIPE + "/v1/payment_intents", headers={"X-Vault-Key": token, "X-Note": value})


SMUGGLED = "Authorization: Bearer sk_live_51Hsmuggled"


@pytest.mark.parametrize(("name", "head"), [
    ("bare-cr", f"X-Note: a\r{SMUGGLED}\r\n"),
    ("bare-lf", f"X-Note: a\n{SMUGGLED}\r\n"),
    ("obs-fold", f"X-Note: a\r\n {SMUGGLED}\r\n"),
    ("obs-fold-tab", "X-Note: a\r\n\tX-Vault-Key: vk_" + "s" * 43 + "\r\n"),
    ("nul", f"X-Note: a\x00{SMUGGLED}\r\n"),
    ("space-before-colon", "Authorization : Bearer sk_live_51Hsmuggled\r\n"),
    ("cl-and-te", "Transfer-Encoding: chunked\r\n"),
    ("two-cl", "Content-Length: 5\r\n"),
    ("key-then-real-key", f"{SMUGGLED}\r\n"),
])
def test_crlf_and_smuggling_on_the_wire(fgw: Gateway, hostile: Hostile, name: str, head: str) -> None:
    """Whatever framing tricks the agent's request carries, the vendor reads exactly the headers the
    gateway checked: no CR, LF or NUL inside a value, no obs-fold continuation line, one
    Authorization (the real key), no vault key. CR/LF/NUL and obs-fold are replaced by a space
    (RFC 9110 5.5, RFC 9112 5.2); a bare LF ends a line (mitmproxy), so what follows is a header
    the gateway checks like any other."""
    _, token = issue(fgw)
    marker = f"crlf-{name}"
    request = (f"POST /v1/payment_intents HTTP/1.1\r\nHost: api.stripe.com\r\nX-Vault-Key: {token}\r\n"
               f"X-Marker: {marker}\r\n{head}"
               "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 24\r\n"
               "Connection: close\r\n\r\namount=2000&currency=usd").encode()
    status, out = raw_exchange(fgw, request)
    assert status in (200, 400, 401, 403), out[:300]  # refused or handled, never a crash
    for seen in hostile.requests(marker):
        assert all("\r" not in v and "\n" not in v and "\x00" not in v for _, v in seen["headers"]), seen
        assert "<obs-fold>" not in [k for k, _ in seen["headers"]], seen
        auth = [v for k, v in seen["headers"] if k.lower() == "authorization"]
        assert auth == [f"Bearer {REAL_CREDENTIALS['STRIPE_SECRET_KEY']}"], seen
        assert token not in json.dumps(seen) and "vk_" + "s" * 43 not in json.dumps(seen), seen
    if name in ("bare-lf", "key-then-real-key"):
        assert (status, hostile.requests(marker)) == (403, []), "a real key in Authorization is refused"
    # and the gateway keeps serving
    with fgw.client() as c:
        ok = c.get(STRIPE + "/v1/payment_intents/pi_after", headers={"X-Vault-Key": token})
    assert ok.status_code == 200


@pytest.mark.parametrize(("name", "header"), [
    ("utf8-note", ("X-Note", "héllo ☃".encode())),
    ("latin1-note", ("X-Note", "café".encode("latin-1"))),
    ("invalid-utf8-note", ("X-Note", b"\xff\xfe\x80")),
    ("utf8-in-key", ("X-Vault-Key", "vk_é".encode() + b"a" * 40)),
    ("latin1-in-bearer", ("Authorization", b"Bearer \xe9vk_" + b"a" * 40)),
    ("non-ascii-name", ("X-Nöte".encode(), b"1")),
])
def test_non_ascii_headers_are_handled_or_refused_never_a_crash(fgw: Gateway, hostile: Hostile, name: str,
                                                                header: tuple) -> None:
    _, token = issue(fgw)
    marker = f"nonascii-{name}"
    hname = header[0] if isinstance(header[0], bytes) else header[0].encode()
    base = b"" if hname.lower() in (b"x-vault-key", b"authorization") else f"X-Vault-Key: {token}\r\n".encode()
    request = (b"POST /v1/payment_intents HTTP/1.1\r\nHost: api.stripe.com\r\n" + base
               + hname + b": " + header[1] + b"\r\nX-Marker: " + marker.encode()
               + b"\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 24\r\n"
               b"Connection: close\r\n\r\namount=2000&currency=usd")
    status, out = raw_exchange(fgw, request)
    assert status in (200, 400, 401, 403), out[:300]
    if hname.lower() in (b"x-vault-key", b"authorization"):
        assert status in (400, 401), "a mangled key is never accepted"
        assert hostile.requests(marker) == []
    with fgw.client() as c:
        ok = c.get(STRIPE + "/v1/payment_intents/pi_after", headers={"X-Vault-Key": token})
    assert ok.status_code == 200


def test_non_ascii_and_raw_bytes_in_the_path(fgw: Gateway, hostile: Hostile) -> None:
    """Raw non-UTF-8 bytes in the path reach every stage (the key-leak scan, the loop breaker's
    fingerprint, the ledger row) as lone surrogates: each must cope, and the ledger must go on."""
    key_id, token = issue(fgw)
    cases = [
        (b"GET", b"/v1/payment_intents/pi_\xc3\xa9", 200),
        (b"GET", b"/v1/payment_intents/pi_\xff", 200),
        (b"POST", b"/v1/payment_intents/pi_\xff\xfe/confirm", 200),
        (b"GET", b"/v1/payment_int%E9nts", 403),
        (b"GET", b"/v1/%70ayment_intents/../payment_methods", 403),
        (b"GET", b"/v1/payment_intents/a%2Fb", 403),
    ]
    for method, path, expected in cases:
        request = (method + b" " + path + b" HTTP/1.1\r\nHost: api.stripe.com\r\nX-Vault-Key: " + token.encode()
                   + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        status, out = raw_exchange(fgw, request)
        assert status == expected, (path, out[:300])
    rows = row_for(fgw, key_id, len(cases))
    assert [r["status"] for r in rows] == [e for _, _, e in cases]
    assert rows[1]["path"] == "/v1/payment_intents/pi_\\udcff", "kept, as an escape"
    # the ledger is still being written after those rows
    _, r = post(fgw, token, "ok")
    assert r.status_code == 200
    assert len(row_for(fgw, key_id, len(cases) + 1)) == len(cases) + 1


# --------------------------------------------------------------------------- oversized bodies


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture
def big_gw(tmp_path: Path, fakes: FakeVendors, certs: Path, hostile: Hostile,
           refused_url: str) -> Iterator[Gateway]:
    """A gateway of its own per test, so one test's peak memory does not hide the next one's."""
    gw = start_gateway(tmp_path / "big", fakes, certs,
                       policy=failure_policy(hostile.url, refused_url, fakes.url),
                       extra=("--set", "stream_large_bodies=1m", "--set", "body_size_limit=64m"))
    yield gw
    gw.stop()


SIZE = 20 * 1024 * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_oversized_request_is_checked_before_it_is_sent(big_gw: Gateway, hostile: Hostile) -> None:
    """With stream_large_bodies, mitmproxy would stream a large request upstream *before* the
    request hook, i.e. before any check, with the vault key, to the real vendor host. The gateway
    buffers vendor requests (bounded by body_size_limit) so every check sees the whole request."""
    key_id, token = issue(big_gw)
    _, warm = post(big_gw, token, "ok")
    assert warm.status_code == 200
    pid = big_gw.proc.pid  # type: ignore[union-attr]
    base = rss_kb(pid)
    body = b"amount=2000&currency=usd&description=" + b"a" * SIZE
    with big_gw.client() as c:
        r = c.post(STRIPE + "/v1/payment_intents", content=body,
                   headers={"X-Vault-Key": token, "X-Marker": "big-req",
                            "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text[:300]
    [seen] = hostile.requests("big-req")
    assert seen["body_len"] == len(body)
    assert dict((k.lower(), v) for k, v in seen["headers"])["authorization"] == \
        f"Bearer {REAL_CREDENTIALS['STRIPE_SECRET_KEY']}"
    rows = row_for(big_gw, key_id, 2)
    assert (rows[-1]["status"], rows[-1]["cost_status"], rows[-1]["cost_usd"]) == (200, "parsed", "20.00")
    grew = (rss_kb(pid, "VmHWM") - base) * 1024
    # Bounded, not constant: the body is read whole (so every check sees it), and the Stripe
    # estimate parses it as a form (~3x the body at its peak). Measured: 4-5x.
    assert grew < 6 * SIZE, f"peak RSS grew by {grew / SIZE:.1f}x the body"

    # a vault key hidden deep in a large body is still found: the body was read before sending
    leak = b"amount=2000&currency=usd&description=" + b"a" * (2 * 1024 * 1024) + token.encode()
    with big_gw.client() as c:
        r = c.post(STRIPE + "/v1/payment_intents", content=leak,
                   headers={"X-Vault-Key": token, "X-Marker": "big-leak",
                            "Content-Type": "application/x-www-form-urlencoded"})
    assert (r.status_code, r.headers.get("x-spendgate-reason")) == (403, "vault_key_leak")
    assert hostile.requests("big-leak") == []


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_oversized_response_is_streamed_with_bounded_memory(big_gw: Gateway) -> None:
    key_id, token = issue(big_gw)
    _, warm = post(big_gw, token, "ok")
    assert warm.status_code == 200
    pid = big_gw.proc.pid  # type: ignore[union-attr]
    before = rss_kb(pid, "VmHWM")
    received = 0
    with big_gw.client() as c, c.stream(
            "POST", STRIPE + "/v1/payment_intents", headers={"X-Vault-Key": token, "X-Mode": f"big{SIZE}"},
            data={"amount": "2000", "currency": "usd", "description": "big-resp"}) as r:
        for chunk in r.iter_raw():
            received += len(chunk)
    assert r.status_code == 200 and received == SIZE
    rows = row_for(big_gw, key_id, 2)
    assert (rows[-1]["status"], rows[-1]["decision"]) == (200, "allow")
    # a streamed body is not kept, so it cannot be priced: unknown, flagged, counted at the estimate
    assert (rows[-1]["cost_status"], rows[-1]["flagged"]) == ("unknown", 1)
    assert usage(big_gw, key_id) == (2 * ESTIMATE, 0, 0)
    grew = (rss_kb(pid, "VmHWM") - before) * 1024
    assert grew < SIZE // 2, f"peak RSS grew by {grew / SIZE:.2f}x the streamed body"


# --------------------------------------------------------------------------- kill -9 under load


def test_kill_9_under_load_loses_no_row_of_an_answered_call(tmp_path: Path, fakes: FakeVendors, certs: Path,
                                                           hostile: Hostile, refused_url: str) -> None:
    """~200 calls from 8 clients; meanwhile another process holds the ledger's write lock (as a
    report, the CLI or a second gateway may); SIGKILL lands while it is held. Every call whose
    answer reached its client must be in ``calls``: a response leaves the gateway only once its
    row is committed."""
    gw = start_gateway(tmp_path / "gw", fakes, certs, policy=failure_policy(hostile.url, refused_url, fakes.url))
    key_id, token = issue(gw)
    answered: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()
    ctx = ssl.create_default_context(cafile=gw.ca)

    def worker(w: int) -> None:
        with httpx.Client(proxy=gw.proxy, verify=ctx, timeout=10) as c:
            for i in range(25):
                if stop.is_set():
                    return
                marker = f"k9-{w}-{i}"
                try:
                    headers = {"X-Vault-Key": token, "X-Marker": marker}
                    if i % 3:
                        r = c.get(f"{STRIPE}/v1/payment_intents/{marker}", headers=headers)
                    else:  # a hold, settled behind the request
                        r = c.post(f"{STRIPE}/v1/payment_intents", headers=headers,
                                   data={"amount": "2000", "currency": "usd", "description": marker})
                    r.read()
                except httpx.HTTPError:
                    return  # the gateway is gone
                with lock:
                    answered[marker] = r.status_code

    def hold_write_lock_then_kill() -> None:
        while len(answered) < 100:
            time.sleep(0.005)
        conn = sqlite3.connect(gw.db, timeout=10, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")  # the gateway's writer must now wait for the lock
        time.sleep(0.4)
        os.kill(gw.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        stop.set()
        conn.execute("ROLLBACK")
        conn.close()

    killer = threading.Thread(target=hold_write_lock_then_kill)
    killer.start()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    killer.join(15)
    gw.proc.wait(10)  # type: ignore[union-attr]
    assert gw.proc.returncode == -signal.SIGKILL  # type: ignore[union-attr]
    assert 100 <= len(answered) < 200, f"{len(answered)} answered: the kill did not land mid-load"

    with contextlib.closing(sqlite3.connect(gw.db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        recorded = {rid.removeprefix("req_"): status for rid, status in conn.execute(
            "SELECT request_id, status FROM calls WHERE key_id = ?", (key_id,))}
    missing = sorted(m for m in answered if m not in recorded)
    assert not missing, f"{len(missing)} of {len(answered)} answered calls are not in the ledger: {missing[:5]}"
    assert all(recorded[m] == answered[m] for m in answered), "the ledger says what the client saw"

    # A new gateway on the ledger recovers the holds the killed one left (its pid is gone on this
    # host: no need to wait for the lease): a forwarded call may have moved money, so it counts at
    # its estimate with a flagged row; a hold never sent (waiting for an approval) is released.
    waiting = 7 * NANOS
    with contextlib.closing(sqlite3.connect(gw.db, isolation_level=None)) as conn:
        in_flight = conn.execute("SELECT instance, count(*), sum(nanos) FROM reservations "
                                 "WHERE forwarded = 1 GROUP BY instance").fetchall()
        assert len(in_flight) <= 1
        dead_instance, n_flight, flight_nanos = in_flight[0] if in_flight else (None, 0, 0)
        conn.execute("INSERT INTO reservations (id, nanos, scopes, created_at, instance, forwarded) "
                     "VALUES (?, ?, ?, ?, ?, 0)",
                     ("res_waiting", waiting, json.dumps([f"key:{key_id}"]), "2026-01-01T00:00:00.000+00:00",
                      dead_instance or "gone/1/x"))
        conn.execute("UPDATE counters SET reserved_nanos = reserved_nanos + ? WHERE scope = ?",
                     (waiting, f"key:{key_id}"))
    used_before = usage(gw, key_id, settled=False)[0]
    gw2 = start_gateway(tmp_path / "gw2", fakes, certs, db=gw.db,
                        policy=failure_policy(hostile.url, refused_url, fakes.url))
    try:
        _, r = post(gw2, token, "ok")
        assert r.status_code == 200
        used, reserved, holds = usage(gw2, key_id)
        assert (reserved, holds) == (0, 0), "holds of the killed gateway were never recovered"
        assert used == used_before + flight_nanos + ESTIMATE, "in-flight calls counted, the waiting one released"
        with contextlib.closing(sqlite3.connect(gw.db)) as conn:
            flagged = conn.execute("SELECT count(*) FROM calls WHERE cost_status = 'unknown' AND flagged = 1 "
                                   "AND note LIKE '%stopped before the answer%'").fetchone()[0]
        assert flagged == n_flight
        print(f"\nkill -9 under load with the write lock held elsewhere: {len(answered)} answered calls, "
              f"0 without a row, integrity ok; {n_flight} forwarded hold(s) counted at the estimate "
              f"(flagged) and 1 never-sent hold released by the next gateway at start-up")
    finally:
        gw2.stop()


# --------------------------------------------------------------------------- the ledger under pressure


def test_a_write_lock_held_elsewhere_delays_only_the_calls_that_need_it(
        tmp_path: Path, fakes: FakeVendors, certs: Path, hostile: Hostile, refused_url: str) -> None:
    """Another process holds the ledger's write lock for 3 s (a migration, a backup, the CLI).
    The event loop keeps serving: a money call waiting for its hold is refused 503
    ``store_unavailable`` after ``STORE_WAIT`` (2 s) while new tunnels are still accepted at once;
    reads are answered as soon as their rows can be committed, never unrecorded."""
    from spendgate.runtime import STORE_WAIT

    gw = start_gateway(tmp_path / "gw", fakes, certs, policy=failure_policy(hostile.url, refused_url, fakes.url))
    try:
        key_id, token = issue(gw)
        ctx = ssl.create_default_context(cafile=gw.ca)
        with httpx.Client(proxy=gw.proxy, verify=ctx, timeout=15) as c:  # warm: tunnel + TLS
            assert c.get(f"{STRIPE}/v1/payment_intents/warm", headers={"X-Vault-Key": token,
                                                                       "X-Mode": "ok"}).status_code == 200
        results: dict[str, tuple[float, int, str | None]] = {}
        connects: list[float] = []

        def money() -> None:
            with httpx.Client(proxy=gw.proxy, verify=ctx, timeout=15) as c:
                t = time.perf_counter()
                marker, r = post(gw, token, "ok", client=c)
                results["money"] = (time.perf_counter() - t, r.status_code, r.headers.get("X-Spendgate-Reason"))

        def read() -> None:
            with httpx.Client(proxy=gw.proxy, verify=ctx, timeout=15) as c:
                t = time.perf_counter()
                r = c.get(f"{STRIPE}/v1/payment_intents/under-lock", headers={"X-Vault-Key": token, "X-Mode": "ok"})
                results["read"] = (time.perf_counter() - t, r.status_code, r.headers.get("X-Spendgate-Reason"))

        def tunnels() -> None:  # the event loop: a CONNECT answered while the lock is held
            for _ in range(10):
                t = time.perf_counter()
                with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
                    s.sendall(b"CONNECT api.stripe.com:443 HTTP/1.1\r\nHost: api.stripe.com:443\r\n\r\n")
                    assert s.recv(100).startswith(b"HTTP/1.1 200")
                connects.append(time.perf_counter() - t)
                time.sleep(0.2)

        conn = sqlite3.connect(gw.db, timeout=10, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        locked = time.perf_counter()
        threads = [threading.Thread(target=f) for f in (money, read, tunnels)]
        for t in threads:
            t.start()
        time.sleep(3)
        conn.execute("ROLLBACK")
        released = time.perf_counter() - locked
        conn.close()
        for t in threads:
            t.join(20)
        waited, status, reason = results["money"]
        assert (status, reason) == (503, "store_unavailable")
        assert STORE_WAIT - 0.2 <= waited < STORE_WAIT + 0.8, waited  # not held until the lock goes
        assert results["read"][1] == 200 and results["read"][0] >= released - 0.5  # held until recorded
        assert max(connects) < 0.5, connects  # the loop never waited for the lock
        rows = {r["path"]: r for r in gw.calls(at_least=3)}
        assert rows["/v1/payment_intents/under-lock"]["status"] == 200
        used, reserved, holds = usage(gw, key_id)
        assert (reserved, holds) == (0, 0), "the late hold of the refused call was given back"
        print(f"\nwrite lock held 3 s: money call refused 503 after {waited:.2f} s, read answered after "
              f"{results['read'][0]:.2f} s (once recorded), CONNECT p100 {max(connects) * 1000:.0f} ms")
    finally:
        gw.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs for the ledger, so the test can fill it (needs mount rights: root in CI)."""
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()}): disk-full not simulated")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(a writable directory, the same directory through a read-only bind mount): needs mount
    rights (root in CI); as root, a file's mode alone does not stop a write."""
    src, ro = tmp_path / "rw", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    done = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({done.stderr.decode().strip()}): read-only not simulated")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, capture_output=True)
        yield src, ro
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_a_read_only_ledger_at_start_up_is_a_clean_error_naming_the_path_and_the_problem(
        read_only_dir: tuple[Path, Path], tmp_path: Path, fakes: FakeVendors, certs: Path, hostile: Hostile,
        refused_url: str) -> None:
    """A ledger on a read-only filesystem: the gateway does not start, and says which file and
    why in one line (no traceback); the ledger is left as it was."""
    src, ro = read_only_dir
    SQLiteStore(str(src / "ledger.db")).close()
    before = (src / "ledger.db").read_bytes()
    try:  # (mitmdump prints "proxy listening" before its errorcheck stops it)
        gw = start_gateway(tmp_path / "gw", fakes, certs, db=str(ro / "ledger.db"),
                           policy=failure_policy(hostile.url, refused_url, fakes.url))
        assert gw.proc is not None and gw.proc.wait(20) == 1
        log = read_log(gw)
    except RuntimeError as e:  # it exited before
        log = str(e)
    assert f"cannot open the ledger {ro / 'ledger.db'}: unable to open database file (the filesystem of " \
           f"{ro} is mounted read-only), not starting" in log, log
    assert "Traceback" not in log
    assert (src / "ledger.db").read_bytes() == before


def fill(path: Path) -> None:
    with path.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_disk_full_one_log_line_per_state_no_unrecorded_money_and_recovery(
        small_disk: Path, tmp_path: Path, fakes: FakeVendors, certs: Path, hostile: Hostile,
        refused_url: str) -> None:
    """The ledger's filesystem fills up for a while. New money calls are refused 503
    store_unavailable before anything is sent; a payment already forwarded whose answer arrives
    meanwhile is held (never delivered unrecorded) until its row is committed; a free read is
    answered at once (its row is committed later). The writer logs once when it starts failing
    and once when it recovers (not once per row), backs off instead of spinning, and commits
    every held row when space comes back."""
    gw = start_gateway(tmp_path / "gw", fakes, certs, db=str(small_disk / "ledger.db"),
                       policy=failure_policy(hostile.url, refused_url, fakes.url))
    try:
        key_id, token = issue(gw)
        ctx = ssl.create_default_context(cafile=gw.ca)
        slow: list[tuple[float, int, str]] = []

        def slow_payment() -> None:  # forwarded before the disk fills; the vendor answers 3 s later
            with httpx.Client(proxy=gw.proxy, verify=ctx, timeout=60) as sc:
                marker, r = post(gw, token, "slow3", client=sc)
                slow.append((time.monotonic(), r.status_code, marker))

        with httpx.Client(proxy=gw.proxy, verify=ctx, timeout=30) as c:
            assert post(gw, token, "ok", client=c)[1].status_code == 200
            payer = threading.Thread(target=slow_payment)
            payer.start()
            time.sleep(0.5)  # its hold is committed, it is on its way to the vendor
            filler = small_disk / "filler"
            fill(filler)
            full_at = time.monotonic()
            answers = [post(gw, token, "ok", client=c)[1] for _ in range(5)]
            t = time.monotonic()
            read = c.get(f"{STRIPE}/v1/payment_intents/while-full", headers={"X-Vault-Key": token, "X-Mode": "ok"})
            read_s = time.monotonic() - t
            time.sleep(3)
            busy = cpu_seconds(gw.proc.pid)  # type: ignore[union-attr]
            time.sleep(2)
            busy = cpu_seconds(gw.proc.pid) - busy  # type: ignore[union-attr]
            assert not slow, "a payment answer left the gateway while its row could not be written"
            filler.unlink()
            freed_at = time.monotonic()
            payer.join(30)
            assert post(gw, token, "ok", client=c)[1].status_code == 200  # normal service again
        assert {(r.status_code, r.headers.get("X-Spendgate-Reason")) for r in answers} == {(503, "store_unavailable")}
        assert read.status_code == 200 and read_s < 1.0
        answered_at, status, marker = slow[0]
        assert status == 200 and answered_at >= freed_at
        log = gw.log.read_text()
        assert log.count("ledger: cannot write") == 1, log[-3000:]
        assert log.count("writable again") == 1
        assert "cannot rollback" not in log and "Traceback" not in log
        assert busy < 1.0, f"the writer spun at {busy:.2f} s CPU in 2 s while the disk was full"
        rows = gw.calls(at_least=9)
        mine = [r for r in rows if r["key_id"] == key_id]
        assert "/v1/payment_intents/while-full" in [r["path"] for r in mine]
        assert sum(1 for r in mine if r["reason"] == "store_unavailable") == 5
        assert [r["status"] for r in mine if r["request_id"] == f"req_{marker}"] == [200]
        print(f"\ndisk full {freed_at - full_at:.1f} s: 5 money calls refused 503, a free read answered in "
              f"{read_s * 1000:.0f} ms, the forwarded payment's answer held {answered_at - freed_at:.2f} s "
              f"past the recovery until its row was committed; gateway CPU {busy / 2 * 100:.0f}% while full")
    finally:
        gw.stop()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_kill_9_mid_stream_leaves_a_row_at_the_estimate(tmp_path: Path, fakes: FakeVendors, certs: Path,
                                                        hostile: Hostile, refused_url: str) -> None:
    """A streamed answer is under way (the agent has its first event) when the gateway is killed:
    the call is never forgotten: the next gateway on the ledger counts it at its estimate, flagged,
    with a ``calls`` row (its hold was the durable "in progress" record)."""
    gw = start_gateway(tmp_path / "gw", fakes, certs, policy=failure_policy(hostile.url, refused_url, fakes.url))
    key_id, token = issue(gw)
    got = threading.Event()

    def stream() -> None:
        with contextlib.suppress(httpx.HTTPError), \
                httpx.Client(proxy=gw.proxy, verify=ssl.create_default_context(cafile=gw.ca), timeout=30) as c, \
                c.stream("POST", "https://api.anthropic.com/v1/messages",
                         headers={"X-Vault-Key": token, "X-Mode": "sse-stall", "anthropic-version": "2023-06-01"},
                         json={"model": "claude-3-5-haiku-20241022", "max_tokens": 100, "stream": True,
                               "messages": [{"role": "user", "content": "hi"}]}) as r:
            for chunk in r.iter_bytes():
                if b"message_start" in chunk:
                    got.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert got.wait(15), "the stream did not start"
    os.kill(gw.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
    gw.proc.wait(10)  # type: ignore[union-attr]
    with contextlib.closing(sqlite3.connect(gw.db)) as conn:
        assert conn.execute("SELECT count(*) FROM calls WHERE path = '/v1/messages'").fetchone() == (0,)
        (held,) = conn.execute("SELECT nanos FROM reservations WHERE forwarded = 1").fetchone()
    assert held > 0
    gw2 = start_gateway(tmp_path / "gw2", fakes, certs, db=gw.db,
                        policy=failure_policy(hostile.url, refused_url, fakes.url))
    try:
        rows = [r for r in gw2.calls(at_least=1) if r["path"] == "/v1/messages"]
        assert len(rows) == 1
        row = rows[0]
        assert (row["key_id"], row["vendor"], row["cost_status"], row["flagged"], row["estimated_nanos"]) == (
            key_id, "anthropic", "unknown", 1, held)
        assert usage(gw2, key_id)[:2] == (held, 0)
        print(f"\nkill -9 mid-stream: the next gateway wrote the row at its estimate "
              f"${held / NANOS:g} (unknown, flagged) at start-up")
    finally:
        gw2.stop()


# --------------------------------------------------------------------------- no ledger wait on the event loop

ADMIN_TOKEN = "adm_" + "p" * 40
HELD_POLICY = """\
  held:
    vendors:
      stripe: {allow: ["GET /v1/payment_intents/*"], approve: ["GET /v1/transfers/*"]}
    approval_timeout: 30s
    circuit: off
"""


def admin_gateway(tmp: Path, fakes: FakeVendors, certs: Path, hostile: Hostile, refused_url: str,
                  db: str | None = None) -> tuple[Gateway, str]:
    """A gateway with the admin API on (its URL) and a policy ``held`` whose GET /v1/transfers/*
    waits for a human (no budget hold: the approval is the only ledger write before it)."""
    from fakes import free_port

    port = free_port()
    gw = start_gateway(tmp, fakes, certs, db=db,
                       policy=failure_policy(hostile.url, refused_url, fakes.url) + HELD_POLICY,
                       extra=("--set", f"spendgate_admin_listen=127.0.0.1:{port}"),
                       env={"SPENDGATE_ADMIN_TOKEN": ADMIN_TOKEN})
    return gw, f"http://127.0.0.1:{port}"


def admin_call(url: str, method: str, path: str, **kw: object) -> tuple[float, httpx.Response]:
    t = time.perf_counter()
    r = httpx.request(method, url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                      timeout=20, trust_env=False, **kw)  # type: ignore[arg-type]
    return time.perf_counter() - t, r


def connect_latencies(gw: Gateway, stop: threading.Event, out: list[float]) -> None:
    """The event loop's stall, as an unrelated agent sees it: how long a new CONNECT waits."""
    while not stop.is_set():
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            s.sendall(b"CONNECT api.stripe.com:443 HTTP/1.1\r\nHost: api.stripe.com:443\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
        out.append(time.perf_counter() - t)
        time.sleep(0.05)


def timed(results: dict, name: str, fn: object, *args: object) -> threading.Thread:
    def run() -> None:
        t = time.perf_counter()
        try:
            out = fn(*args)  # type: ignore[operator]
        except Exception as e:  # surfaced by the assertions
            out = e
        results[name] = (time.perf_counter() - t, out)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def agent_get(gw: Gateway, token: str, path: str) -> httpx.Response:
    with httpx.Client(proxy=gw.proxy, verify=ssl.create_default_context(cafile=gw.ca), timeout=30) as c:
        return c.get(STRIPE + path, headers={"X-Vault-Key": token, "X-Mode": "ok"})


def refused_503(out: object) -> bool:
    return isinstance(out, httpx.Response) and (out.status_code, out.headers.get("X-Spendgate-Reason")) == (
        503, "store_unavailable")


def admin_503(out: object) -> bool:
    return isinstance(out, tuple) and out[1].status_code == 503 and \
        out[1].json()["error"]["code"] == "store_unavailable"


@pytest.mark.parametrize("lock", ["BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"])
def test_a_ledger_lock_fails_approvals_and_admin_writes_closed_without_stalling_the_event_loop(
        tmp_path: Path, fakes: FakeVendors, certs: Path, hostile: Hostile, refused_url: str, lock: str) -> None:
    """Another process holds the SQLite ledger's write lock for 3 s. Meanwhile a request that
    needs an approval (its row is a write), the admin API issuing a key and approving a held
    call are refused 503 ``store_unavailable`` after ``STORE_WAIT``, never waiting on the event
    loop: a CONNECT from an unrelated agent is answered at once throughout, a key never used
    before (not cached anywhere) is looked up without waiting (WAL), the admin API's reads are
    answered. Once the lock goes, the held call is approved and forwarded."""
    from spendgate.runtime import STORE_WAIT

    gw, admin = admin_gateway(tmp_path / "gw", fakes, certs, hostile, refused_url)
    try:
        _, token = issue(gw)
        _, held_token = issue(gw, "held")
        _, fresh_token = issue(gw)  # never used before the lock
        assert agent_get(gw, token, "/v1/payment_intents/warm").status_code == 200
        held: dict = {}
        held_thread = timed(held, "first", agent_get, gw, held_token, "/v1/transfers/tr_first")
        deadline = time.monotonic() + 10
        while not (pending := admin_call(admin, "GET", "/v1/approvals")[1].json()["approvals"]):
            assert time.monotonic() < deadline, "no pending approval appeared"
            time.sleep(0.05)

        stop, connects, results = threading.Event(), [], {}
        conn = sqlite3.connect(gw.db, timeout=10, isolation_level=None)
        conn.execute(lock)
        conn.execute("UPDATE keys SET labels = labels WHERE 0")  # a writer's transaction, as a migration's
        locked = time.perf_counter()
        tunnels = threading.Thread(target=connect_latencies, args=(gw, stop, connects), daemon=True)
        tunnels.start()
        threads = [
            timed(results, "approval", agent_get, gw, held_token, "/v1/transfers/tr_locked"),
            timed(results, "issue", functools.partial(admin_call, json={"policy": "pay"}), admin, "POST", "/v1/keys"),
            timed(results, "decide", admin_call, admin, "POST", f"/v1/approvals/{pending[0]['id']}/approve"),
            timed(results, "list", admin_call, admin, "GET", "/v1/keys"),
            timed(results, "fresh", agent_get, gw, fresh_token, "/v1/payment_intents/fresh"),
            # a policy reload writes the file's static keys to the ledger: not on the event loop either
            timed(results, "reload", gw.write_policy, gw.config.read_text() + "# edited\n"),
        ]
        time.sleep(3)
        conn.execute("ROLLBACK")
        released = time.perf_counter() - locked
        conn.close()
        for t in threads:
            t.join(20)
        stop.set()
        tunnels.join(10)

        waited, out = results["approval"]
        assert refused_503(out), out
        assert STORE_WAIT - 0.2 <= waited < STORE_WAIT + 0.8, waited
        waited_issue, out = results["issue"]
        assert admin_503(out), out[1].text
        assert STORE_WAIT - 0.2 <= waited_issue < STORE_WAIT + 0.8, waited_issue
        waited_decide, out = results["decide"]
        assert admin_503(out), out[1].text
        assert STORE_WAIT - 0.2 <= waited_decide < STORE_WAIT + 0.8, waited_decide
        waited_list, out = results["list"]
        assert out[1].status_code == 200 and waited_list < 1.0, (waited_list, out[1].text)
        fresh_s, out = results["fresh"]
        assert isinstance(out, httpx.Response) and out.status_code == 200, out
        assert fresh_s >= released - 0.5  # looked up at once; answered once its row could be committed
        assert max(connects) < 0.5, connects  # the loop never waited for the lock
        assert len(connects) >= 20
        assert results["reload"][1] is None and results["reload"][0] < 2.0, results["reload"]

        # The lock is gone: the approve that was answered 503 still lands (its UPDATE was waiting; a
        # retry says so), the held call is forwarded; the key issued too late was revoked at once.
        again = admin_call(admin, "POST", f"/v1/approvals/{pending[0]['id']}/approve")[1]
        assert again.status_code == 200 or again.json()["error"]["code"] == "not_pending", again.text
        held_thread.join(10)
        assert held["first"][1].status_code == 200
        keys = admin_call(admin, "GET", "/v1/keys?all=true")[1].json()["keys"]
        late = [k for k in keys if k["policy"] == "pay" and k["created_at"] > pending[0]["created_at"]]
        assert all(k["state"] == "revoked" for k in late), late
        assert admin_call(admin, "POST", "/v1/keys", json={"policy": "pay"})[1].status_code == 201
        print(f"\n{lock} held {released:.1f} s: approval refused 503 after {waited:.2f} s, admin issue 503 "
              f"after {waited_issue:.2f} s, admin approve 503 "
              f"after {waited_decide:.2f} s, admin list {waited_list * 1000:.0f} ms, a new key's read answered "
              f"after {fresh_s:.2f} s (once recorded); CONNECT p50 {sorted(connects)[len(connects) // 2] * 1000:.0f} "
              f"ms, max {max(connects) * 1000:.0f} ms over {len(connects)}")
    finally:
        gw.stop()
    assert "Traceback" not in read_log(gw)


def test_a_lock_on_the_keys_table_fails_keyed_calls_closed_on_postgresql(
        pg_url: str, tmp_path: Path, fakes: FakeVendors, certs: Path, hostile: Hostile, refused_url: str) -> None:
    """Fleet mode: another session holds ``LOCK TABLE keys IN ACCESS EXCLUSIVE MODE`` for 3 s (a
    migration), which blocks every read of the table. Every call reads its key's row in the round
    trip it makes before forwarding (a revoke is refused on the next request, whatever the key
    cache says), so a key the gateway has cached is refused 503 ``store_unavailable`` after
    ``STORE_WAIT`` like a key it never saw, and so is the admin API's key list, while the event
    loop never waits: a CONNECT from an unrelated agent is answered at once throughout."""
    import psycopg

    from spendgate.runtime import STORE_WAIT
    from spendgate.store.postgres import PostgresStore

    gw, admin = admin_gateway(tmp_path / "gw", fakes, certs, hostile, refused_url, db=pg_url)
    try:
        store = PostgresStore(pg_url, replica="test")
        try:
            _, known = store.issue_key("pay", 3600)
            _, fresh = store.issue_key("pay", 3600)
        finally:
            store.close()
        assert agent_get(gw, known, "/v1/payment_intents/warm").status_code == 200  # now cached
        stop, connects, results = threading.Event(), [], {}
        with psycopg.connect(pg_url, autocommit=True) as lock:
            lock.execute("BEGIN")
            lock.execute("LOCK TABLE keys IN ACCESS EXCLUSIVE MODE")
            locked = time.perf_counter()
            tunnels = threading.Thread(target=connect_latencies, args=(gw, stop, connects), daemon=True)
            tunnels.start()
            threads = [
                timed(results, "fresh", agent_get, gw, fresh, "/v1/payment_intents/fresh"),
                timed(results, "known", agent_get, gw, known, "/v1/payment_intents/known"),
                timed(results, "list", admin_call, admin, "GET", "/v1/keys"),
            ]
            time.sleep(3)
            lock.execute("ROLLBACK")
            released = time.perf_counter() - locked
        for t in threads:
            t.join(20)
        stop.set()
        tunnels.join(10)
        waited, out = results["fresh"]
        assert refused_503(out), out
        assert STORE_WAIT - 0.2 <= waited < STORE_WAIT + 0.8, waited
        known_s, out = results["known"]  # cached, but its row cannot be read: not forwarded
        assert refused_503(out), out
        assert STORE_WAIT - 0.2 <= known_s < STORE_WAIT + 0.8, known_s
        waited_list, out = results["list"]
        assert admin_503(out), out
        assert max(connects) < 0.5, connects
        assert len(connects) >= 20
        assert agent_get(gw, fresh, "/v1/payment_intents/fresh-again").status_code == 200  # the lock is gone
        assert agent_get(gw, known, "/v1/payment_intents/known-again").status_code == 200
        print(f"\nkeys locked {released:.1f} s (PostgreSQL): a new key refused 503 after {waited:.2f} s, a cached "
              f"key after {known_s:.2f} s, admin list 503 after {waited_list:.2f} s; CONNECT p50 "
              f"{sorted(connects)[len(connects) // 2] * 1000:.0f} ms, max {max(connects) * 1000:.0f} ms "
              f"over {len(connects)}")
    finally:
        gw.stop()
    assert "Traceback" not in read_log(gw)
