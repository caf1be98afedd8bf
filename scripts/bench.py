"""Benchmark the gateway: what spendgate costs on top of a bare mitmdump, on this machine.

    ./scripts/bench                  # the full benchmark (~15 minutes on 2 cores), a table
    ./scripts/bench --json           # the same figures as JSON on stdout
    ./scripts/bench --smoke          # a few seconds: every part on a small load, no targets

Every load runs on this machine only (127.0.0.1): a local HTTPS fake vendor (a minimal
asyncio server with a self-signed CA, answering a Stripe-shaped payment intent), and a
keep-alive load client (asyncio, raw HTTP/1.1 over TLS, CONNECT through the proxy).
The same load is sent three ways:

- direct:    client → fake vendor;
- bare:      client → ``mitmdump`` (no addons) → fake vendor (CONNECT 127.0.0.1:PORT);
- spendgate: client → ``mitmdump -s addons/gateway.py`` → fake vendor: the client
  CONNECTs to api.stripe.com:443 and sends ``GET /v1/payment_intents/pi_x`` with an
  ``X-Vault-Key``; the policy's ``upstream:`` sends it to the fake vendor. The ledger
  is on (one ``calls`` row per request).

Both mitmdumps get the same options (lazy connection strategy, no flow output,
confdir in a temp dir, the fake vendor's CA as trusted upstream CA).

Then: vault-key lookup (10 vs 100 000 keys) and policy rule matching (10 vs 1 000
rules), measured in-process; report queries over a ledger of 1 000 000 ``calls`` rows;
revoke-to-refusal latency against the running gateway; and the gateway's resident
memory (VmRSS) after 0, N/2 and N requests.

``--only soak`` is the memory soak: per kind of call (reads, payments, streams), a fresh
gateway, 10 000 calls of warm-up, then ``--soak-calls`` more (default 50 000) with VmRSS
every 10 000; flat means within 10% of the warm-up's last sample.

``--pg URL`` (or ``--only fleet --pg URL``) adds fleet mode: the same gateway on a
PostgreSQL ledger (a throwaway schema in that database) against the SQLite ledger, for
reads (GET) and money-moving calls (a priced POST: loop breaker, hold, settle), at each
concurrency, and the cost of each database round trip in-process (µs per operation).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ADDONS = ROOT / "addons"  # the spendgate package under test; --addons DIR tries a scratch copy
VENDOR_HOST = "api.stripe.com"
PATH = "/v1/payment_intents/pi_x"
REAL_STRIPE_KEY = "sk_test_51BENCHstripeSECRETnotReal0000"

sys.path.insert(0, str(ROOT))  # the test-side fakes package lives at the root
from fakes import free_port  # noqa: E402

TARGETS = {
    "throughput_ratio_min": 0.90,  # spendgate req/s ÷ bare mitmdump req/s
    "p50_added_ms_max": 0.5,  # spendgate p50 − bare p50, at concurrency 1
    "cpu_added_us_max": 250.0,  # spendgate's CPU per request − bare mitmdump's (load runs and in-process)
    "lookup_ratio_max": 2.0,  # key lookup p50 with 100 000 keys ÷ with 10 keys ("flat")
    "revoke_ms_max": 100.0,  # revoke commit → first 401 revoked
    "pg_over_sqlite_min": 0.85,  # fleet mode req/s ÷ SQLite mode req/s (reads and money calls)
    "replay_flows_per_s_min": 2000,  # spendgate replay, 100 000 flows (CPU time: the machine is shared)
    "replay_rss_growth_mib_max": 30.0,  # RSS after 100 000 flows − after 10 000 ("memory flat")
    "soak_growth_pct_max": 10.0,  # soak: peak RSS after the warm-up ÷ RSS at its end − 1 (reads, payments, streams)
}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


# --------------------------------------------------------------------------- certificates


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a leaf for 127.0.0.1 / localhost / api.stripe.com, signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "spendgate bench fake-vendor CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
            x509.DNSName(VENDOR_HOST),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, cert_pem, key_pem = directory / "fake-ca.pem", directory / "fake.pem", directory / "fake-key.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return ca_pem, cert_pem, key_pem


# --------------------------------------------------------------------------- the fake vendor

PAYMENT_INTENT = {
    "id": "pi_x", "object": "payment_intent", "amount": 2000, "amount_capturable": 0,
    "amount_received": 2000, "capture_method": "automatic", "client_secret": "pi_x_secret_bench",
    "confirmation_method": "automatic", "created": 1767225600, "currency": "usd", "customer": None,
    "description": None, "latest_charge": "ch_bench", "livemode": False, "metadata": {},
    "payment_method": "pm_card_visa", "payment_method_types": ["card"], "status": "succeeded",
}


def _fake_response(status: int, obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, indent=2).encode()
    reason = {200: "OK", 404: "Not Found"}[status]
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRequest-Id: req_bench\r\nStripe-Version: 2024-06-20\r\n"
        "Connection: keep-alive\r\n\r\n"
    ).encode() + body


def _sse_events() -> list[bytes]:
    """A chat completion streamed as OpenAI does it: a role delta, 16 content deltas, the finish,
    the usage chunk (``stream_options.include_usage``), ``[DONE]``."""
    head = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1767225600,
            "model": "gpt-4o-mini-2024-07-18", "service_tier": "default", "system_fingerprint": "fp_bench"}

    def chunk(choices: list[Any], **more: Any) -> bytes:
        return b"data: " + json.dumps({**head, "choices": choices, "usage": None, **more}).encode() + b"\n\n"

    events = [chunk([{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None},
                      "logprobs": None, "finish_reason": None}])]
    events += [chunk([{"index": 0, "delta": {"content": f" word{i}"}, "logprobs": None, "finish_reason": None}])
               for i in range(16)]
    events.append(chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]))
    events.append(chunk([], usage={"prompt_tokens": 12, "completion_tokens": 16, "total_tokens": 28,
                                   "prompt_tokens_details": {"cached_tokens": 0},
                                   "completion_tokens_details": {"reasoning_tokens": 0}}))
    events.append(b"data: [DONE]\n\n")
    return events


SSE_EVENTS = _sse_events()


def _sse_response() -> bytes:
    """One HTTP chunk per SSE event (as a vendor flushes them), written at once."""
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
            b"Transfer-Encoding: chunked\r\nx-request-id: req_bench_sse\r\nConnection: keep-alive\r\n\r\n")
    return head + b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in SSE_EVENTS) + b"0\r\n\r\n"


class FakeVendor(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive server: GET …/payment_intents/… and POST /v1/payment_intents →
    a succeeded payment intent; POST /v1/chat/completions → a streamed (SSE) chat completion."""

    OK = _fake_response(200, PAYMENT_INTENT)
    SSE = _sse_response()
    NOT_FOUND = _fake_response(404, {"error": {"type": "invalid_request_error", "message": "no such route"}})

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length:]
            method, target = head.split(b" ", 2)[:2]
            if target.endswith(b"/chat/completions"):
                self.transport.write(self.SSE)
            elif b"/payment_intents" in target:
                self.transport.write(self.OK)
            else:
                self.transport.write(self.NOT_FOUND)


def serve_fake(port_file: str, cert: str, key: str) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(FakeVendor, "127.0.0.1", 0, ssl=ctx,
                                                                backlog=512)
        port = server.sockets[0].getsockname()[1]
        Path(port_file + ".tmp").write_text(str(port))
        os.replace(port_file + ".tmp", port_file)
        await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        asyncio.run(main())


# --------------------------------------------------------------------------- the load client


@dataclass(frozen=True)
class Scenario:
    """One kind of call the benchmark sends: the same bytes to bare mitmdump and to spendgate."""

    name: str
    what: str  # for the table
    method: str
    vendor_host: str  # the host spendgate sees (the CONNECT target)
    path: str
    policy: str  # the policy of the vault key it uses
    content_type: str | None = None
    body_template: str = ""  # {i}: a per-request counter (distinct bodies: the loop breaker is not tripped)

    def body(self, i: int) -> bytes:
        return self.body_template.replace("{i}", str(i)).encode()


REQUEST_COUNTER = itertools.count()  # one per bench process: no body is ever sent twice
SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("read", f"GET {PATH} (a read: $0, not reserved)", "GET", VENDOR_HOST, PATH, "billing-agent"),
    Scenario("pay", "POST /v1/payment_intents $20 (priced, reserved, settled)", "POST", VENDOR_HOST,
             "/v1/payment_intents", "billing-agent", "application/x-www-form-urlencoded",
             "amount=2000&currency=usd&confirm=true&payment_method=pm_card_visa&description=bench+{i}"),
    Scenario("sse", "POST /v1/chat/completions, streamed (SSE, tokens priced)", "POST", "api.openai.com",
             "/v1/chat/completions", "support-agent", "application/json",
             '{"model":"gpt-4o-mini","max_tokens":64,"stream":true,"stream_options":{"include_usage":true},'
             '"messages":[{"role":"user","content":"Say sixteen words, please ({i})."}]}'),
)}


@dataclass
class Target:
    """Where the client connects and what it sends."""

    host: str  # the TLS server name and Host header
    port: int
    ca: str  # the CA the client trusts
    proxy: int | None = None  # a proxy on 127.0.0.1, reached with CONNECT host:port
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "GET"
    path: str = PATH
    body: bytes = b""
    scenario: Scenario | None = None  # the bench's calls; None: method, path and body above

    def request(self, i: int = 0) -> bytes:
        sc = self.scenario
        host = self.host if self.port == 443 else f"{self.host}:{self.port}"
        if sc is None:
            headers = {**self.headers}
            if self.body:
                headers.update({"Content-Type": "application/x-www-form-urlencoded",
                                "Content-Length": str(len(self.body))})
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            return (f"{self.method} {self.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: spendgate-bench\r\n"
                    f"Accept: application/json\r\n{extra}\r\n").encode() + self.body
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        body = sc.body(i)
        if sc.method != "GET":
            extra += f"Content-Type: {sc.content_type}\r\nContent-Length: {len(body)}\r\n"
        return (f"{sc.method} {sc.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: spendgate-bench\r\n"
                f"Accept: application/json\r\n{extra}\r\n").encode() + body


@dataclass
class LoadResult:
    requests: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    proxy_cpu: float | None = None  # seconds of CPU the proxy process used during the run

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        cpu = (round(self.proxy_cpu / self.requests * 1e6) if self.proxy_cpu is not None and self.requests
               else None)
        return {
            "requests": self.requests,
            "seconds": round(self.elapsed, 3),
            "rps": round(self.requests / self.elapsed, 1) if self.elapsed else 0.0,
            "p50_ms": round(quantile(lat, 0.50) * 1000, 3),
            "p99_ms": round(quantile(lat, 0.99) * 1000, 3),
            "mean_ms": round(statistics.fmean(lat) * 1000, 3) if lat else None,
            "proxy_cpu_us_per_request": cpu,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": dict(self.errors),
        }

    def merge(self, other: LoadResult) -> None:
        self.requests += other.requests
        self.elapsed += other.elapsed
        self.latencies += other.latencies
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        if other.proxy_cpu is not None:
            self.proxy_cpu = (self.proxy_cpu or 0.0) + other.proxy_cpu


class Conn:
    """One keep-alive HTTP/1.1 connection over TLS, through a CONNECT proxy or not."""

    def __init__(self, target: Target, ctx: ssl.SSLContext) -> None:
        self.target, self.ctx = target, ctx
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        t = self.target
        if t.proxy is None:
            self.reader, self.writer = await asyncio.open_connection(
                "127.0.0.1", t.port, ssl=self.ctx, server_hostname=t.host)
            return
        reader, writer = await asyncio.open_connection("127.0.0.1", t.proxy)
        writer.write(f"CONNECT {t.host}:{t.port} HTTP/1.1\r\nHost: {t.host}:{t.port}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if head.split(b" ", 2)[1] != b"200":
            writer.close()
            raise ConnectionError(f"CONNECT refused: {head.splitlines()[0].decode()}")
        await writer.start_tls(self.ctx, server_hostname=t.host)
        self.reader, self.writer = reader, writer

    async def call(self, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            body = await self.reader.readexactly(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                parts.append(await self.reader.readexactly(size + 2))
                if size == 0:
                    break
            body = b"".join(parts)
        else:
            body = b""
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, headers, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def client_context(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def run_load(target: Target, concurrency: int, *, seconds: float | None = None,
                   requests: int | None = None, warmup: int = 0,
                   on_start: Any = None) -> LoadResult:
    """``concurrency`` keep-alive connections, each sending the next request as soon as the
    last answer is read, for ``seconds`` or ``requests`` in all (after ``warmup`` each)."""
    ctx = client_context(target.ca)
    counter = REQUEST_COUNTER
    fixed = target.request()
    request = target.request if target.scenario and target.scenario.body_template else (lambda _i: fixed)
    conns = [Conn(target, ctx) for _ in range(concurrency)]

    async def warm(c: Conn) -> None:
        await c.open()
        for _ in range(max(1, warmup // concurrency)):
            await c.call(request(next(counter)))

    await asyncio.gather(*(warm(c) for c in conns))
    result = LoadResult()
    left = [requests if requests is not None else -1]
    if on_start is not None:
        on_start()
    start = time.perf_counter()
    end = start + seconds if seconds is not None else float("inf")
    last = [start]

    async def worker(c: Conn) -> None:
        perf = time.perf_counter
        while True:
            if left[0] == 0:
                return
            left[0] -= 1
            t0 = perf()
            if t0 >= end:
                return
            try:
                status, _, _ = await c.call(request(next(counter)))
            except (OSError, asyncio.IncompleteReadError, ValueError, ConnectionError) as e:
                result.errors[type(e).__name__] += 1
                c.close()
                await asyncio.sleep(0.01)
                continue
            t1 = perf()
            result.latencies.append(t1 - t0)
            result.statuses[status] += 1
            last[0] = t1

    await asyncio.gather(*(worker(c) for c in conns))
    result.requests = len(result.latencies)
    result.elapsed = last[0] - start
    for c in conns:
        c.close()
    return result


# --------------------------------------------------------------------------- processes


POLICY = """\
version: 1
vendors:
  stripe: {{secret: env:STRIPE_SECRET_KEY, upstream: "https://127.0.0.1:{port}"}}
  openai: {{secret: env:OPENAI_API_KEY, upstream: "https://127.0.0.1:{port}"}}
  resend: {{secret: env:RESEND_API_KEY, upstream: "https://127.0.0.1:{port}"}}
fx: {{EUR: 1.08, GBP: 1.27}}
policies:
  billing-agent:
    vendors:
      stripe:
        allow:   ["POST /v1/payment_intents", "GET /v1/payment_intents/*", "POST /v1/payment_intents/*/confirm",
                  "GET /v1/customers/*", "POST /v1/customers", "GET /v1/charges/*"]
        deny:    ["* /v1/payment_methods/**", "* /v1/accounts/**", "POST /v1/transfers"]
        approve: ["POST /v1/refunds"]
        max_request_usd: 200
        default_estimate_usd: 50
      resend: {{allow: ["POST /emails"]}}
    # every cap checked and held on each money call, none ever reached by the benchmark
    budget: {{key_usd: 1000000000, key_daily_usd: 1000000000, policy_daily_usd: 1000000000,
              policy_monthly_usd: 1000000000}}
    rate: 100000000/hour      # per key; high enough never to refuse the benchmark (the limiter still runs)
    ttl: 1h
    approval_timeout: 5m
    loop: {{repeats: 3, window: 10m}}
  money-agent:               # fleet mode: a priced call every time (hold, loop breaker, settle), never refused
    vendors:
      stripe: {{allow: ["POST /v1/payment_intents/*/confirm"], default_estimate_usd: 1}}
    budget: {{key_usd: 1000000000, key_daily_usd: 1000000000, policy_daily_usd: 1000000000}}
    loop: {{repeats: 3, window: 1m}}  # each call's body is its own (distinct payments): never a repeat
  support-agent:
    vendors:
      openai: {{allow: ["POST /v1/chat/completions", "POST /v1/responses", "POST /v1/embeddings"]}}
    budget: {{key_usd: 1000000000, key_daily_usd: 1000000000}}
    rate: 100000000/hour
egress: {{default: deny, allow: [], deny: []}}
"""


@dataclass
class Proxy:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """user + system CPU time of the proxy process so far (immune to other load's wall time)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # mitmdump shuts down cleanly (ledger flushed)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_mitmdump(name: str, tmp: Path, confdir: Path, upstream_ca: Path, env: dict[str, str],
                   addon_args: list[str]) -> Proxy:
    """The same options for every run; only ``addon_args`` differ."""
    port = free_port()
    cmd = [
        str(BIN / "mitmdump"), *addon_args,
        "--listen-host", "127.0.0.1", "-p", str(port),
        "--set", f"confdir={confdir}",
        "--set", "connection_strategy=lazy",
        "--set", "flow_detail=0",
        "--set", "termlog_verbosity=" + os.environ.get("BENCH_VERBOSITY", "warn"),
        "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}",
    ]
    logfile = tmp / f"{name}.log"
    proc = subprocess.Popen(cmd, stdout=logfile.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
    except RuntimeError as e:
        raise RuntimeError(f"{name}: {e}\n{logfile.read_text()}") from None
    return Proxy(name, port, proc, logfile)


@dataclass
class Bench:
    tmp: Path
    fake_port: int
    fake_ca: Path
    confdir: Path
    env: dict[str, str]
    policy: Path
    db: Path
    procs: list[Any] = field(default_factory=list)

    @property
    def gateway_ca(self) -> str:
        return str(self.confdir / "mitmproxy-ca-cert.pem")

    def target(self, mode: str, proxy: Proxy | None, token: str, scenario: Scenario | None = None) -> Target:
        headers = {"X-Vault-Key": token}
        if mode == "direct":
            return Target("127.0.0.1", self.fake_port, str(self.fake_ca), headers=headers, scenario=scenario)
        if mode == "bare":
            assert proxy is not None
            return Target("127.0.0.1", self.fake_port, self.gateway_ca, proxy=proxy.port, headers=headers,
                          scenario=scenario)
        assert proxy is not None
        return Target(scenario.vendor_host if scenario else VENDOR_HOST, 443, self.gateway_ca, proxy=proxy.port,
                      headers=headers, scenario=scenario)

    def bare(self) -> Proxy:
        p = start_mitmdump("bare", self.tmp, self.confdir, self.fake_ca, self.env, [])
        self.procs.append(p)
        return p

    def gateway(self, db: str | None = None, name: str = "spendgate") -> Proxy:
        extra = []
        if any('"spendgate_admin_listen"' in f.read_text() for f in ADDONS.glob("*.py")):
            extra = ["--set", "spendgate_admin_listen="]  # no admin listener: no fixed port to collide on
        p = start_mitmdump(name, self.tmp, self.confdir, self.fake_ca, self.env, [
            "-s", str(ADDONS / "gateway.py"),
            "--set", f"spendgate_config={self.policy}", "--set", f"spendgate_db={db or self.db}", *extra,
        ])
        self.procs.append(p)
        return p

    def issue(self, policy: str = "billing-agent", db: str | None = None) -> tuple[str, str]:
        from spendgate.store import open_store

        store = open_store(db or str(self.db))
        try:
            rec, token = store.issue_key(policy, 3600, labels={"run": "bench"})
        finally:
            store.close()
        return rec.id, token


@contextlib.contextmanager
def bench_env(tmp: Path):
    certs = tmp / "fake-certs"
    certs.mkdir()
    fake_ca, cert, key = make_certs(certs)
    port_file = tmp / "fake.port"
    fake = subprocess.Popen([sys.executable, __file__, "_fake", str(port_file), str(cert), str(key)],
                            stdin=subprocess.DEVNULL)
    b = None
    try:
        deadline = time.monotonic() + 15
        while not port_file.exists():
            if fake.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the fake vendor did not start")
            time.sleep(0.02)
        port = int(port_file.read_text())
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY.format(port=port))
        env = {**os.environ, "STRIPE_SECRET_KEY": REAL_STRIPE_KEY, "OPENAI_API_KEY": "sk-proj-BENCHnotReal",
               "RESEND_API_KEY": "re_BENCHnotReal", "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        confdir = tmp / "confdir"
        confdir.mkdir()
        b = Bench(tmp, port, fake_ca, confdir, env, policy, tmp / "ledger.db")
        yield b
    finally:
        for p in reversed(b.procs if b else []):
            p.stop()
        fake.terminate()
        fake.wait(10)


# --------------------------------------------------------------------------- parts


def measured(proxy: Proxy | None, target: Target, concurrency: int, **kw: Any) -> LoadResult:
    """A load run, with the proxy's CPU time over the measured part (warm-up excluded)."""
    cpu: list[float] = []

    def mark() -> None:
        if proxy is not None:
            cpu.append(proxy.cpu_seconds())

    res = asyncio.run(run_load(target, concurrency, on_start=mark, **kw))
    if proxy is not None:
        res.proxy_cpu = proxy.cpu_seconds() - cpu[0]
    return res


def part_throughput(b: Bench, scenarios: list[Scenario], concurrencies: list[int], seconds: float,
                    rounds: int, warmup: int) -> dict[str, Any]:
    """Per scenario and concurrency: bare mitmdump and spendgate (and, for the read, direct) on
    the same load, interleaved ``rounds`` times so drift and the other processes on the machine
    hit them alike."""
    bare, gw = b.bare(), b.gateway()
    out: dict[str, Any] = {}
    for sc in scenarios:
        _, token = b.issue(sc.policy)
        modes = (("direct", None), ("bare", bare), ("spendgate", gw)) if sc.name == "read" else \
            (("bare", bare), ("spendgate", gw))
        out[sc.name] = {}
        for c in concurrencies:
            totals = {m: LoadResult() for m, _ in modes}
            for r in range(rounds):
                for mode, proxy in (modes if r % 2 == 0 else modes[::-1]):
                    res = measured(proxy, b.target(mode, proxy, token, sc), c, seconds=seconds, warmup=warmup)
                    log(f"{sc.name} c={c} round {r + 1}/{rounds} {mode}: {res.requests / res.elapsed:.0f} req/s "
                        f"statuses={dict(res.statuses)} errors={dict(res.errors)}")
                    totals[mode].merge(res)
            row = {m: t.summary() for m, t in totals.items()}
            br, sg = row["bare"], row["spendgate"]
            cpu_b, cpu_s = br["proxy_cpu_us_per_request"], sg["proxy_cpu_us_per_request"]
            row["ratios"] = {
                "spendgate_rps_over_bare": round(sg["rps"] / br["rps"], 3) if br["rps"] else None,
                "spendgate_p50_over_bare": round(sg["p50_ms"] / br["p50_ms"], 3) if br["p50_ms"] else None,
                "spendgate_p99_over_bare": round(sg["p99_ms"] / br["p99_ms"], 3) if br["p99_ms"] else None,
                "spendgate_p50_added_over_bare_ms": round(sg["p50_ms"] - br["p50_ms"], 3),
                "spendgate_cpu_added_us_per_request": (cpu_s - cpu_b) if cpu_s is not None and cpu_b is not None
                else None,
            }
            if "direct" in row:
                d = row["direct"]
                row["ratios"]["bare_rps_over_direct"] = round(br["rps"] / d["rps"], 3) if d["rps"] else None
                row["ratios"]["bare_p50_added_ms"] = round(br["p50_ms"] - d["p50_ms"], 3)
            out[sc.name][str(c)] = row
            if row["spendgate"]["statuses"].keys() != {"200"}:
                log(f"WARNING: the spendgate run had non-200 answers; see {gw.log}")
    return out


@contextlib.contextmanager
def pg_schema(url: str):
    """A throwaway schema in the PostgreSQL database at ``url``: a ledger URL, dropped afterwards."""
    from urllib.parse import quote

    import psycopg

    schema = f"bench_{os.getpid()}_{random.randrange(10**6)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def pg_server_cpu(url: str) -> float:
    """CPU seconds (user + system) used so far by the PostgreSQL server processes serving
    connections whose ``application_name`` is the one in ``url`` (the gateway's, in the bench)."""
    import psycopg

    name = dict(p.split("=", 1) for p in url.split("?", 1)[1].split("&"))["application_name"]
    with psycopg.connect(url, autocommit=True) as conn:
        pids = [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND pid <> pg_backend_pid()",
            (name,)).fetchall()]
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):  # a connection closed meanwhile
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def part_fleet(b: Bench, pg_url: str, concurrencies: list[int], seconds: float, rounds: int,
               warmup: int) -> dict[str, Any]:
    """The same gateway on SQLite and on PostgreSQL, and bare mitmdump, interleaved (the order
    reversed every other round): reads and money-moving calls. Besides the pooled req/s, each
    round's PG ÷ SQLite is kept (its median is steadier than the pooled ratio on a busy box), and
    the PostgreSQL server's own CPU per request (its backends serving the gateway: on one machine
    it competes with the gateway for the same cores)."""
    out: dict[str, Any] = {"round_trips_us": round_trips(b.tmp, pg_url)}
    gw_url = f"{pg_url}{'&' if '?' in pg_url else '?'}application_name=spendgate-bench-{os.getpid()}"
    gws = {"bare": b.bare(),
           "sqlite": b.gateway(name="spendgate-sqlite", db=str(b.tmp / "fleet-sqlite.db")),
           "postgres": b.gateway(name="spendgate-pg", db=gw_url)}
    dbs = {"sqlite": str(b.tmp / "fleet-sqlite.db"), "postgres": pg_url}
    # A money call confirms a payment: each one its own (a distinct body, as distinct payments are;
    # the same body sent thousands of times a minute would be a loop, which the loop breaker is
    # there to stop: under a high ``repeats`` each check then reads every earlier sighting).
    kinds = {"read": SCENARIOS["read"],
             "money": Scenario("fleet-money", "POST …/confirm (priced: loop breaker, hold, settle)", "POST",
                               VENDOR_HOST, PATH + "/confirm", "money-agent", "application/x-www-form-urlencoded",
                               "return_url=https%3A%2F%2Fexample.com%2Fdone%3Fn%3D{i}")}
    modes = list(gws)
    for kind, scenario in kinds.items():
        tokens = {name: b.issue(scenario.policy, db=db)[1] for name, db in dbs.items()}
        tokens["bare"] = tokens["sqlite"]  # (bare mitmdump ignores it)
        for c in concurrencies:
            totals = {name: LoadResult() for name in gws}
            per_round: list[float] = []
            pg_cpu = 0.0
            for r in range(rounds):
                rps = {}
                for name in (modes if r % 2 == 0 else modes[::-1]):
                    gw = gws[name]
                    t = b.target("bare" if name == "bare" else "spendgate", gw, tokens[name], scenario)
                    before = pg_server_cpu(gw_url) if name == "postgres" else 0.0
                    res = measured(gw, t, c, seconds=seconds, warmup=warmup)
                    if name == "postgres":  # (includes the warm-up's share: a slight overestimate)
                        pg_cpu += pg_server_cpu(gw_url) - before
                    rps[name] = res.requests / res.elapsed if res.elapsed else 0.0
                    log(f"fleet {kind} c={c} round {r + 1}/{rounds} {name}: {rps[name]:.0f} req/s "
                        f"statuses={dict(res.statuses)} errors={dict(res.errors)}")
                    totals[name].merge(res)
                if rps["sqlite"]:
                    per_round.append(rps["postgres"] / rps["sqlite"])
            row = {name: t.summary() for name, t in totals.items()}
            sq, pg, bare = row["sqlite"]["rps"], row["postgres"]["rps"], row["bare"]["rps"]
            row["pg_over_sqlite"] = round(pg / sq, 3) if sq else None
            row["pg_over_sqlite_rounds"] = [round(x, 3) for x in per_round]
            row["pg_over_sqlite_median"] = round(statistics.median(per_round), 3) if per_round else None
            row["sqlite_over_bare"] = round(sq / bare, 3) if bare else None
            row["pg_over_bare"] = round(pg / bare, 3) if bare else None
            n = totals["postgres"].requests
            row["postgres"]["server_cpu_us_per_request"] = round(pg_cpu / n * 1e6) if n else None
            out[f"{kind} c={c}"] = row
    gws.pop("bare").stop()
    # revoke through the database, seen by two PostgreSQL replicas
    second = b.gateway(name="spendgate-pg2", db=pg_url)
    replicas = [gws["postgres"], second]
    runs = [asyncio.run(_revoke_across(b, replicas, pg_url)) for _ in range(3 if warmup < 100 else 15)]
    ms = sorted(max(r for r, _ in run) for run in runs)
    window = sorted(max(a for _, a in run) for run in runs)
    out["revoke_across_replicas"] = {
        "replicas": len(replicas), "n": len(ms), "p50_ms": round(quantile(ms, 0.5), 2), "max_ms": round(ms[-1], 2),
        # the last request any replica still accepted was sent this long after the commit (<0: none)
        "accepted_after_commit_p50_ms": round(quantile(window, 0.5), 2),
        "accepted_after_commit_max_ms": round(window[-1], 2)}
    log(f"fleet revoke → refused on every replica: p50 {quantile(ms, 0.5):.1f} ms, max {ms[-1]:.1f} ms; the last "
        f"request still accepted was sent ≤ {window[-1]:.1f} ms after the commit (p50 {quantile(window, 0.5):.1f})")
    for gw in [*gws.values(), second]:
        gw.stop()
    return out


def round_trips(tmp: Path, pg_url: str, n: int = 2000) -> dict[str, dict[str, float]]:
    """µs per store operation, in-process, per backend: what each database round trip costs."""
    from spendgate.store import open_store

    out: dict[str, dict[str, float]] = {}
    for name, url in (("sqlite", str(tmp / "rt.db")), ("postgres", pg_url)):
        store = open_store(url, replica="bench-rt")
        try:
            out[name] = _time_ops(store, n)
            log(f"round trips {name}: {out[name]}")
        finally:
            store.close()
    return out


def _time_ops(store: Any, n: int) -> dict[str, float]:
    from spendgate.store import iso, now

    rec, token = store.issue_key("p", 3600)
    caps = {f"key:{rec.id}": 10**18, "policy:p:day:x": 10**18, "policy:p:month:x": 10**18}
    row = {"ts": iso(now()), "flow_id": "f", "key_id": rec.id, "policy": "p", "labels": "{}", "vendor": "stripe",
           "method": "POST", "host": "api.stripe.com", "path": "/v1/payment_intents", "status": 200,
           "decision": "allow", "estimated_usd": "1", "estimated_nanos": 10**9, "cost_usd": "1",
           "cost_nanos": 10**9, "cost_status": "parsed", "flagged": 0, "latency_ms": 1.0}

    def committed() -> None:  # what an answer waits for: its row (and its hold's settlement) committed
        done = threading.Event()
        store.settle(store.reserve(1000, caps), 500)
        store.record_call(dict(row), done.set)
        done.wait(10)

    ops = {
        "key_by_token": lambda: store.key_by_token(token),
        "reserve (3 scopes)": lambda: store.reserve(1000, caps),
        "rate_hit": lambda: store.rate_hit(rec.id, 10**9, 3600.0),
        "loop_hit": lambda: store.loop_hit(os.urandom(16), None, 3, 600.0),
        "used_by_scope": lambda: store.used_by_scope(caps),
    }
    if hasattr(store, "admit"):  # (a --addons copy from before it)
        from spendgate.store import LoopCheck

        ops["admit: loop breaker + hold (3 scopes)"] = lambda: store.admit(
            1000, caps, loop=LoopCheck(os.urandom(16), None, 3, 600.0))
    if hasattr(store, "precheck"):  # what a request asks before forwarding, in one round trip on PostgreSQL
        from spendgate.store import LoopCheck, RateCheck

        ops["admit with the key's row: key + loop breaker + hold"] = lambda: store.admit(
            1000, caps, loop=LoopCheck(os.urandom(16), None, 3, 600.0), key=rec)
        ops["precheck: key + rate limit + room left (a read)"] = lambda: store.precheck(
            rec, RateCheck(rec.id, 10**9, 3600.0), caps)
    ops["hold + settle + row committed"] = committed
    row = {}
    for op, fn in ops.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        row[op] = round((time.perf_counter() - t0) / n * 1e6, 1)
    return row


def _bulk_keys(store: Any, n: int) -> list[str]:
    from spendgate.store import hash_token, iso, now

    tokens = ["vk_" + os.urandom(32).hex() for _ in range(n)]
    created = iso(now())
    rows = [(f"key_{i:012x}", "billing-agent", hash_token(t), json.dumps({"run": str(i % 100)}), created,
             None, None, None, "issued") for i, t in enumerate(tokens)]
    store.conn.execute("BEGIN")
    store.conn.executemany(f"INSERT INTO keys ({store._KEY_COLS}) VALUES (?,?,?,?,?,?,?,?,?)", rows)
    store.conn.execute("COMMIT")
    return tokens


def _timed(fn: Any, args: list[Any]) -> dict[str, float]:
    """p50/p99/mean of ``fn(arg)`` over ``args``, in microseconds."""
    ns = []
    perf = time.perf_counter_ns
    for a in args:
        t0 = perf()
        fn(*a)
        ns.append(perf() - t0)
    ns.sort()
    return {"p50_us": round(quantile(ns, 0.5) / 1000, 2), "p99_us": round(quantile(ns, 0.99) / 1000, 2),
            "mean_us": round(statistics.fmean(ns) / 1000, 2), "n": len(ns)}


@contextlib.contextmanager
def _uncached_key_rows() -> Any:
    """Parse every looked-up row afresh (the store's parsed-row cache off), if it has one."""
    from spendgate.store import sqlite as store_sqlite

    cached = getattr(store_sqlite, "_key_record", None)
    if cached is None or not hasattr(cached, "__wrapped__"):
        yield
        return
    store_sqlite._key_record = cached.__wrapped__
    try:
        yield
    finally:
        store_sqlite._key_record = cached


def part_lookup(tmp: Path, key_counts: list[int], rule_counts: list[int], lookups: int) -> dict[str, Any]:
    from spendgate.policy import Rule, first_match, path_segments
    from spendgate.store.sqlite import SQLiteStore

    out: dict[str, Any] = {"keys": {}, "rules": {}}
    rnd = random.Random(7)
    for n in key_counts:
        store = SQLiteStore(str(tmp / f"keys-{n}.db"))
        t0 = time.perf_counter()
        tokens = _bulk_keys(store, n)
        insert_s = time.perf_counter() - t0
        hits = [(rnd.choice(tokens),) for _ in range(lookups)]
        misses = [("vk_" + os.urandom(32).hex(),) for _ in range(lookups)]
        for t in hits + misses:  # warm up: the page cache, the statement cache, the interpreter
            store.key_by_token(*t)
        # "hit": the index lookup and the row parsed into a KeyRecord, the same work for 10 keys as
        # for 100 000 (the target compares these); "hit_cached": a key whose row was parsed before
        # (the store caches 4 096 parsed rows), the usual case for a fleet's active keys.
        with _uncached_key_rows():
            hit = _timed(store.key_by_token, hits)
        hit_cached = _timed(store.key_by_token, [(tokens[0],)] * lookups)
        miss = _timed(store.key_by_token, misses)
        assert store.key_by_token(tokens[0]) is not None and store.key_by_token(misses[0][0]) is None
        store.close()
        out["keys"][str(n)] = {"hit": hit, "hit_cached": hit_cached, "miss": miss,
                               "bulk_insert_s": round(insert_s, 3)}
        log(f"key_by_token with {n} keys: hit p50 {hit['p50_us']} µs (parsed before: "
            f"{hit_cached['p50_us']} µs), miss p50 {miss['p50_us']} µs")

    target_rule = "GET /v1/payment_intents/*"
    for n in rule_counts:
        # n-1 rules that do not match, then the one that does: the worst case of a linear scan.
        rules = [Rule.parse(f"{'GET' if i % 2 else 'POST'} /v1/resource_{i}/*/items/**") for i in range(n - 1)]
        rules.append(Rule.parse(target_rule))
        path = PATH
        matched = [("GET", path)] * lookups
        unmatched = [("GET", "/v1/nothing/here")] * lookups

        def match(method: str, p: str, rules: list[Rule] = rules) -> Rule | None:
            return first_match(rules, method, path_segments(p))

        assert match("GET", path) is rules[-1] and match("GET", "/v1/nothing/here") is None
        m = _timed(match, matched)
        u = _timed(match, unmatched)
        out["rules"][str(n)] = {"last_rule_matches": m, "no_match": u}
        log(f"first_match over {n} rules: match-last p50 {m['p50_us']} µs, no-match p50 {u['p50_us']} µs")
    return out


def part_pipeline(tmp: Path, scenarios: list[Scenario], concurrencies: list[int], n: int,
                  rounds: int) -> dict[str, Any]:
    """spendgate's own hooks, in-process, through the hook dispatch of a real mitmdump master
    (``DumpMaster``: mitmdump's ~40 default addons, the same options as the load runs), with no
    sockets: the CPU time per request of the bare master's hooks and of the same master with
    spendgate's addons, on the same flows, alternated ``rounds`` times. The difference is what
    spendgate adds per request, the ledger writer thread's work included (process CPU time:
    steady on a shared machine, unlike wall time). ``concurrency`` flows are in flight at once
    (at 20 the ledger commits rows in groups, as under load)."""
    return asyncio.run(_pipeline(tmp, scenarios, concurrencies, n, rounds))


class _InProcess:
    """A DumpMaster, with or without spendgate's addons, driving flows through mitmproxy's hooks
    in the order its HTTP layer emits them (a streamed response's body through its stream function)."""

    def __init__(self, tmp: Path, with_spendgate: bool) -> None:
        from mitmproxy import hooks, options
        from mitmproxy.tools.dump import DumpMaster

        from spendgate import gateway

        self.master = DumpMaster(options.Options(), loop=asyncio.get_running_loop(), with_termlog=True,
                                 with_dumper=True)
        (tmp / "inprocess-confdir").mkdir(exist_ok=True)  # tlsconfig makes its CA there, as mitmdump does
        self.master.options.update(confdir=str(tmp / "inprocess-confdir"), connection_strategy="lazy",
                                   flow_detail=0, termlog_verbosity="warn")
        self.addons: list[Any] = []
        if with_spendgate:
            self.master.options.update_defer(spendgate_admin_listen="")
            self.addons = gateway.make_addons()
            self.master.addons.add(*self.addons)
            # What mitmdump's script loader does once a script's addons are registered: configure each
            # with every option (else the chain, registered after the options were set, keeps its
            # defaults: flow comments built and a decision line logged for every request, which a
            # mitmdump at termlog_verbosity=warn does neither of).
            every = set(self.master.options.keys())
            for addon in self.addons:
                self.master.addons.invoke_addon_sync(addon, hooks.ConfigureHook(every))
        self.runtime = next((a for a in self.addons if hasattr(a, "store")), None)

    def activate(self) -> None:
        from mitmproxy import ctx

        ctx.master, ctx.options = self.master, self.master.options  # one master at a time

    async def run(self, flows: list[tuple[Any, Any, list[bytes] | None]], concurrency: int) -> Counter:
        from mitmproxy.proxy.layers.http import _hooks as hooks

        am = self.master.addons
        statuses: Counter = Counter()
        it = iter(flows)

        async def worker() -> None:
            for f, resp, chunks in it:
                await am.handle_lifecycle(hooks.HttpRequestHeadersHook(f))
                await am.handle_lifecycle(hooks.HttpRequestHook(f))
                if f.response is None:
                    from spendgate import wire

                    if self.addons:
                        wire.with_credentials(f.request)  # what assembling the upstream request adds
                    f.response = resp
                await am.handle_lifecycle(hooks.HttpResponseHeadersHook(f))
                if chunks is not None and f.response is resp:
                    if callable(resp.stream):
                        # as mitmproxy's HTTP layer: each chunk, then b"" at the end; what the
                        # function returns (bytes or an iterable of them) is consumed and sent
                        for c in (*chunks, b""):
                            out = resp.stream(c)
                            for _ in (out,) if isinstance(out, bytes) else out:
                                pass
                        resp.data.content = b""
                    else:
                        resp.content = b"".join(chunks)
                await am.handle_lifecycle(hooks.HttpResponseHook(f))
                statuses[f.response.status_code] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        if self.runtime is not None and self.runtime.store is not None:
            self.runtime.store.flush()  # the writer thread's share of the work, inside the timing
        return statuses

    async def close(self) -> None:
        self.activate()
        for a in self.addons:
            if hasattr(a, "done"):
                res = a.done()
                if asyncio.iscoroutine(res):
                    await res


def _inprocess_flows(sc: Scenario, token: str, n: int) -> list[tuple[Any, Any, list[bytes] | None]]:
    from mitmproxy import http
    from mitmproxy.test import tflow

    out = []
    for _ in range(n):
        i = next(REQUEST_COUNTER)
        headers = {"Host": sc.vendor_host, "User-Agent": "spendgate-bench", "Accept": "application/json",
                   "X-Vault-Key": token}
        if sc.content_type:
            headers["Content-Type"] = sc.content_type
        f = tflow.tflow(req=http.Request.make(sc.method, f"https://{sc.vendor_host}{sc.path}", sc.body(i), headers))
        f.client_conn.sni = sc.vendor_host
        if sc.name == "sse":
            resp = http.Response.make(200, b"", {"Content-Type": "text/event-stream; charset=utf-8",
                                                 "Transfer-Encoding": "chunked", "x-request-id": "req_sse"})
            out.append((f, resp, list(SSE_EVENTS)))
        else:
            resp = http.Response.make(200, FakeVendor.OK.split(b"\r\n\r\n", 1)[1],
                                      {"Content-Type": "application/json", "Request-Id": "req_bench"})
            out.append((f, resp, None))
    return out


async def _pipeline(tmp: Path, scenarios: list[Scenario], concurrencies: list[int], n: int,
                    rounds: int) -> dict[str, Any]:
    from spendgate.store.sqlite import SQLiteStore

    db = tmp / "pipeline.db"
    policy = tmp / "pipeline-policy.yaml"
    policy.write_text(POLICY.format(port=9))
    os.environ.update({"STRIPE_SECRET_KEY": REAL_STRIPE_KEY, "OPENAI_API_KEY": "sk-proj-BENCHnotReal",
                       "RESEND_API_KEY": "re_BENCHnotReal",  # the options default to these two:
                       "SPENDGATE_CONFIG": str(policy), "SPENDGATE_DB": str(db)})
    store = SQLiteStore(str(db))
    tokens = {p: store.issue_key(p, 3600, labels={"run": "bench"})[1] for p in {sc.policy for sc in scenarios}}
    store.close()
    bare, sg = _InProcess(tmp, False), _InProcess(tmp, True)
    out: dict[str, Any] = {}
    try:
        for sc in scenarios:
            out[sc.name] = {}
            for c in concurrencies:
                cpu = {"bare": 0.0, "spendgate": 0.0}
                statuses: dict[str, Counter] = {"bare": Counter(), "spendgate": Counter()}
                for m in (bare, sg):  # warm up: caches, statements, pools
                    m.activate()
                    await m.run(_inprocess_flows(sc, tokens[sc.policy], 100), c)
                for r in range(rounds):
                    for mode, m in ((("bare", bare), ("spendgate", sg)) if r % 2 == 0 else
                                    (("spendgate", sg), ("bare", bare))):
                        flows = _inprocess_flows(sc, tokens[sc.policy], n)
                        m.activate()
                        c0 = time.process_time()
                        statuses[mode].update(await m.run(flows, c))
                        cpu[mode] += time.process_time() - c0
                per = {mode: round(cpu[mode] / (n * rounds) * 1e6, 1) for mode in cpu}
                out[sc.name][str(c)] = {
                    "n": n * rounds,
                    "bare_cpu_us_per_request": per["bare"],
                    "spendgate_cpu_us_per_request": per["spendgate"],
                    "cpu_added_us_per_request": round(per["spendgate"] - per["bare"], 1),
                    "statuses": {m: {str(k): v for k, v in st.items()} for m, st in statuses.items()},
                }
                log(f"in-process {sc.name} c={c}: bare hooks {per['bare']} µs, spendgate "
                    f"{per['spendgate']} µs CPU per request: +{per['spendgate'] - per['bare']:.1f} µs "
                    f"{dict(statuses['spendgate'])}")
    finally:
        await sg.close()
    return out


def part_instructions(tmp: Path, scenarios: list[Scenario], n: int) -> dict[str, Any]:
    """Instructions per request of the in-process hooks (as ``pipeline``, concurrency 1), counted by
    valgrind's callgrind: the one figure other processes on the machine cannot disturb. Each
    (scenario, bare/spendgate) runs in its own process under valgrind with instrumentation off,
    switched on (``callgrind_control -i on``) around the measured requests only."""
    valgrind = shutil.which("valgrind")
    if not valgrind or not shutil.which("callgrind_control"):
        log("valgrind not found: no instruction counts (apt-get install valgrind)")
        return {"error": "valgrind not installed"}
    out: dict[str, Any] = {}
    for sc in scenarios:
        row: dict[str, Any] = {"n": n}
        for mode in ("bare", "spendgate"):
            work = tmp / f"ir-{sc.name}-{mode}"
            work.mkdir()
            proc = subprocess.run(
                [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={work}/callgrind.out",
                 sys.executable, __file__, "_ir", mode, sc.name, str(n), str(work)],
                capture_output=True, text=True, cwd=ROOT, timeout=3600)
            counted = [int(line.rsplit(":", 1)[1]) for line in proc.stderr.splitlines() if "Collected :" in line]
            if proc.returncode != 0 or not counted or "ok" not in proc.stdout:
                raise RuntimeError(f"instructions {sc.name} {mode}: valgrind exited {proc.returncode}\n"
                                   f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            row[f"{mode}_per_request"] = counted[-1] // n
        row["added_per_request"] = row["spendgate_per_request"] - row["bare_per_request"]
        row["spendgate_over_bare"] = round(row["spendgate_per_request"] / row["bare_per_request"], 3)
        out[sc.name] = row
        log(f"instructions {sc.name}: bare master's hooks {row['bare_per_request']:,}, with spendgate "
            f"{row['spendgate_per_request']:,} per request: +{row['added_per_request']:,}")
    return out


def _ir_child(mode: str, scenario: str, n: int, work: Path) -> None:
    """Under valgrind: ``n`` requests through the in-process master, counted only while they run."""
    from spendgate.store.sqlite import SQLiteStore

    sc = SCENARIOS[scenario]
    policy = work / "policy.yaml"
    policy.write_text(POLICY.format(port=9))
    os.environ.update({"STRIPE_SECRET_KEY": REAL_STRIPE_KEY, "OPENAI_API_KEY": "sk-proj-BENCHnotReal",
                       "RESEND_API_KEY": "re_BENCHnotReal", "SPENDGATE_CONFIG": str(policy),
                       "SPENDGATE_DB": str(work / "ledger.db")})
    store = SQLiteStore(str(work / "ledger.db"))
    token = store.issue_key(sc.policy, 3600, labels={"run": "bench"})[1]
    store.close()

    def instrument(on: bool) -> None:
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], check=True,
                       capture_output=True, timeout=300)

    async def main() -> None:
        m = _InProcess(work, mode == "spendgate")
        m.activate()
        await m.run(_inprocess_flows(sc, token, 50), 1)
        flows = _inprocess_flows(sc, token, n)
        instrument(True)
        statuses = await m.run(flows, 1)
        instrument(False)
        await m.close()
        if set(statuses) != {200}:
            raise SystemExit(f"answered {dict(statuses)}")

    asyncio.run(main())
    print("ok")


def replay_capture(tmp: Path, n: int) -> tuple[Path, Path]:
    """The candidate policy and a capture of ``n`` flows written like ``--capture`` writes them:
    Stripe payment intents, reads and refusals, OpenAI chats, from 200 keys over a day."""
    from mitmproxy import http
    from mitmproxy.io import tnetstring
    from mitmproxy.test import tflow

    policy = tmp / "replay-policy.yaml"
    # the candidate: a tighter per-request limit ($150 instead of $200) over the bench policy, caps
    # raised so the budget path runs (holds, settles) without refusing most of a day's traffic
    policy.write_text(POLICY.format(port=9).replace("max_request_usd: 200", "max_request_usd: 150").replace(
        "budget: {key_usd: 500, key_daily_usd: 200, policy_daily_usd: 2000, policy_monthly_usd: 20000}",
        "budget: {key_usd: 100000, key_daily_usd: 100000, policy_daily_usd: 10000000}"))
    capture = tmp / "replay-capture.mitm"
    pi = b'{"id": "pi_1", "object": "payment_intent", "amount": %d, "amount_received": %d, "currency": "usd", "status": "succeeded"}'
    chat = (b'{"model": "gpt-4o-mini", "choices": [{"message": {"content": "ok"}}], '
            b'"usage": {"prompt_tokens": 40, "completion_tokens": 12}}')
    t0 = 1_764_547_200.0
    written = time.perf_counter()
    with capture.open("wb") as f:
        templates = []
        for method, url, body, resp, policy_name in [
            ("POST", "https://api.stripe.com/v1/payment_intents", b"amount=%d&currency=usd", pi, "billing-agent"),
            ("GET", "https://api.stripe.com/v1/payment_intents/pi_1", b"", pi, "billing-agent"),
            ("POST", "https://api.openai.com/v1/chat/completions",
             b'{"model": "gpt-4o-mini", "max_tokens": 50, "messages": [{"role": "user", "content": "hi %d"}]}',
             chat, "support-agent"),
        ]:
            req = http.Request.make(method, url, b"", {"Authorization": "spendgate:key_x:0", "Content-Type":
                                    "application/json" if b"{" in body else "application/x-www-form-urlencoded"})
            fl = tflow.tflow(req=req, resp=http.Response.make(200, b"", {"Content-Type": "application/json"}))
            templates.append((fl.get_state(), body, resp, policy_name))
        for i in range(n):
            state, body, resp, policy_name = templates[i % 3]
            cents = 100 + (i * 7919) % 20_000
            state["id"] = f"flow-{i}"
            state["request"]["timestamp_start"] = t0 + i * 86_400 / n
            state["request"]["content"] = body.replace(b"%d", str(cents).encode())
            state["response"]["content"] = resp.replace(b"%d", str(cents).encode())
            state["metadata"] = {"spendgate": {
                "vendor": "stripe", "host": "api.openai.com" if i % 3 == 2 else "api.stripe.com",
                "key_id": f"key_{policy_name}_{i % 200}", "policy": policy_name, "labels": {"agent": str(i % 200)},
                "decision": "allow", "reason": None, "estimated_usd": "0",
                "cost_usd": None if i % 3 else f"{cents / 100:.2f}", "cost_status": None if i % 3 else "parsed"}}
            tnetstring.dump(state, f)
    log(f"replay: wrote {n:,} flows ({capture.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - written:.1f} s")
    return policy, capture


def part_replay(tmp: Path, n: int) -> dict[str, Any]:
    """``spendgate replay`` over a capture of ``n`` flows (:func:`replay_capture`), through the real
    pipeline in process. Flows/s by wall and by CPU time; RSS sampled every tenth."""
    from spendgate.replay import Replay

    policy, capture = replay_capture(tmp, n)
    samples: list[dict[str, Any]] = []
    with Replay(policy) as r:
        start_rss = round(_rss_kib() / 1024, 1)  # set up, nothing replayed yet
        w0, c0 = time.perf_counter(), time.process_time()
        count = 0
        for row in r.run([capture]):
            count += 1
            if count % max(1, n // 10) == 0:
                samples.append({"after": count, "rss_mib": round(_rss_kib() / 1024, 1)})
            del row
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        summary = r.summary
    out = {
        "flows": n, "replayed": count, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "flows_per_s_wall": round(count / wall), "flows_per_s_cpu": round(count / cpu),
        "rss_start_mib": start_rss,
        "rss": samples, "rss_growth_mib": round(samples[-1]["rss_mib"] - samples[0]["rss_mib"], 1) if samples else 0,
        "changed": summary.changed, "summary": summary.line(), "problems": [str(p) for p in summary.problems],
    }
    log(f"replay: {count:,} flows in {wall:.1f} s wall ({out['flows_per_s_wall']:,}/s), {cpu:.1f} s CPU "
        f"({out['flows_per_s_cpu']:,}/s); RSS {start_rss} at start, {', '.join(str(x['rss_mib']) for x in samples)} MiB; "
        f"{summary.line()}")
    return out


def part_replay_instructions(tmp: Path, n: int) -> dict[str, Any]:
    """Instructions per replayed flow (callgrind, counted only around the replay loop, in its own
    process): reading the capture alone, and the whole replay. Load-independent, unlike CPU time."""
    valgrind = shutil.which("valgrind")
    if not valgrind or not shutil.which("callgrind_control"):
        log("valgrind not found: no instruction counts (apt-get install valgrind)")
        return {"error": "valgrind not installed"}
    out: dict[str, Any] = {"flows": n}
    for mode in ("read", "replay"):
        work = tmp / f"ir-replay-{mode}"
        work.mkdir()
        proc = subprocess.run(
            [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={work}/callgrind.out",
             sys.executable, __file__, "_ir_replay", mode, str(n), str(work)],
            capture_output=True, text=True, cwd=ROOT, timeout=3600)
        counted = [int(line.rsplit(":", 1)[1]) for line in proc.stderr.splitlines() if "Collected :" in line]
        if proc.returncode != 0 or not counted or "ok" not in proc.stdout:
            raise RuntimeError(f"instructions replay {mode}: valgrind exited {proc.returncode}\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        out[f"{mode}_per_flow"] = counted[-1] // n
    log(f"replay instructions per flow ({n:,} flows): reading {out['read_per_flow']:,}, "
        f"whole replay {out['replay_per_flow']:,}")
    return out


def _ir_replay_child(mode: str, n: int, work: Path) -> None:
    """Under valgrind: replay (or only read) ``n`` flows, counted only while they run."""
    from spendgate.captures import Reader
    from spendgate.replay import Replay

    policy, capture = replay_capture(work, n)

    def instrument(on: bool) -> None:
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], check=True,
                       capture_output=True, timeout=300)

    with Replay(policy) as r:
        instrument(True)
        count = sum(1 for _ in (Reader.of([capture]) if mode == "read" else r.run([capture])))
        instrument(False)
    if count != n:
        raise SystemExit(f"{mode}: {count} of {n} flows")
    print("ok")


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def part_ledger(tmp: Path, rows: int) -> dict[str, Any]:
    from spendgate import reports
    from spendgate.store.sqlite import CALL_COLUMNS, ensure_schema

    path = tmp / "ledger-big.db"
    conn = sqlite3.connect(path, isolation_level=None)
    ensure_schema(conn)
    conn.execute("PRAGMA synchronous=OFF")
    cols = [k for k in CALL_COLUMNS if k != "id"]
    sql = f"INSERT INTO calls ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    vendors = [("stripe", "api.stripe.com", "/v1/payment_intents"), ("openai", "api.openai.com", "/v1/chat/completions"),
               ("anthropic", "api.anthropic.com", "/v1/messages"), ("twilio", "api.twilio.com", "/2010-04-01/x"),
               ("resend", "api.resend.com", "/emails")]
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rnd = random.Random(11)
    t0 = time.perf_counter()
    conn.execute("BEGIN")
    chunk = []
    for i in range(rows):
        vendor, host, p = vendors[i % len(vendors)]
        ts = (start + dt.timedelta(seconds=i * 2592000 // max(rows, 1))).isoformat(timespec="milliseconds")
        deny = rnd.random() < 0.05
        nanos = rnd.randrange(0, 50_000_000_000)
        chunk.append({
            "ts": ts, "flow_id": f"f{i}", "key_id": f"key_{i % 1000:04d}", "policy": f"policy-{i % 7}",
            "labels": json.dumps({"run": str(i % 200), "team": f"t{i % 5}"}, sort_keys=True),
            "vendor": vendor, "method": "POST", "host": host, "path": p, "status": 402 if deny else 200,
            "decision": "deny" if deny else "allow", "reason": "cap_exhausted" if deny else None,
            "estimated_usd": str(nanos / 1e9), "estimated_nanos": nanos,
            "cost_usd": None if deny else str(nanos / 1e9), "cost_nanos": None if deny else nanos,
            "cost_status": "zero" if deny else "parsed", "flagged": 0, "note": "", "currency": "usd",
            "amount": None, "request_id": f"req_{i}", "latency_ms": 1.5,
        })
        if len(chunk) == 10_000:
            conn.executemany(sql, [tuple(r.get(k) for k in cols) for r in chunk])
            chunk = []
    if chunk:
        conn.executemany(sql, [tuple(r.get(k) for k in cols) for r in chunk])
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    insert_s = time.perf_counter() - t0
    size_mb = path.stat().st_size / 1e6
    log(f"ledger: {rows} calls rows inserted in {insert_s:.1f} s ({size_mb:.0f} MB)")
    out: dict[str, Any] = {"rows": rows, "insert_s": round(insert_s, 2), "db_mb": round(size_mb, 1),
                           "report_ms": {}}
    for by, since in (("key", None), ("policy", None), ("vendor", None), ("day", None),
                      ("label:run", None), ("key", "2026-01-25")):
        name = by + (f" --since {since}" if since else "")
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            got = reports.spend(str(path), by=by, since=since)
            times.append(time.perf_counter() - t0)
        out["report_ms"][name] = {"ms": round(min(times) * 1000, 1), "groups": len(got)}
        log(f"report --by {name}: {min(times) * 1000:.0f} ms ({len(got)} groups)")
    path.unlink()
    with contextlib.suppress(FileNotFoundError):
        Path(str(path) + "-wal").unlink()
    return out


async def _revoke_once(b: Bench, gw: Proxy) -> float:
    """Loop requests with a fresh key; revoke it from another thread; return ms from the
    revoke's commit to the first ``401 revoked`` answer."""
    from spendgate.store.sqlite import SQLiteStore

    key_id, token = b.issue()
    target = b.target("spendgate", gw, token)
    ctx = client_context(target.ca)
    request = target.request()
    conn = Conn(target, ctx)
    for _ in range(5):
        status, _, _ = await conn.call(request)
        assert status == 200, status
    committed: list[float] = []

    def revoke() -> None:
        store = SQLiteStore(str(b.db))
        time.sleep(random.uniform(0.05, 0.15))
        store.revoke(key_id)  # autocommit: returns after the COMMIT
        committed.append(time.perf_counter())
        store.close()

    thread = threading.Thread(target=revoke)
    thread.start()
    deadline = time.perf_counter() + 5
    try:
        while time.perf_counter() < deadline:
            status, headers, _ = await conn.call(request)
            t = time.perf_counter()
            if status == 401 and headers.get(b"x-spendgate-reason") == b"revoked":
                thread.join()
                return (t - committed[0]) * 1000
            assert status == 200, status
        raise RuntimeError("the revoked key was still accepted after 5 s")
    finally:
        thread.join()
        conn.close()


async def _revoke_across(b: Bench, gws: list[Proxy], db: str) -> list[tuple[float, float]]:
    """A fresh key warmed on every replica; revoked through the store (as the CLI or another
    replica does); per replica, ms from the commit to its first ``401 revoked``, and to the
    sending of the last request it still accepted."""
    from spendgate.store import open_store

    key_id, token = b.issue(db=db)
    conns = []
    for gw in gws:
        target = b.target("spendgate", gw, token)
        conn = Conn(target, client_context(target.ca))
        for _ in range(3):
            status, _, _ = await conn.call(target.request())
            assert status == 200, status
        conns.append((conn, target.request()))
    committed: list[float] = []

    def revoke() -> None:
        store = open_store(db, replica="bench-cli")
        time.sleep(random.uniform(0.05, 0.15))
        store.revoke(key_id)  # autocommit: returns after the COMMIT
        committed.append(time.perf_counter())
        store.close()

    async def poll(conn: Conn, request: bytes) -> tuple[float, float]:
        """(ms from the commit to the first refusal, ms from the commit to the sending of the last
        request still accepted: negative when none sent after the commit was accepted)."""
        deadline = time.perf_counter() + 5
        accepted_sent = 0.0
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            status, headers, _ = await conn.call(request)
            t = time.perf_counter()
            if status == 401 and headers.get(b"x-spendgate-reason") == b"revoked":
                while not committed:
                    await asyncio.sleep(0.001)
                return (t - committed[0]) * 1000, (accepted_sent - committed[0]) * 1000
            accepted_sent = sent
        raise RuntimeError("the revoked key was still accepted after 5 s")

    thread = threading.Thread(target=revoke)
    thread.start()
    try:
        return list(await asyncio.gather(*(poll(c, r) for c, r in conns)))
    finally:
        thread.join()
        for c, _ in conns:
            c.close()


def part_revoke(b: Bench, gw: Proxy, times: int) -> dict[str, Any]:
    ms = sorted(asyncio.run(_revoke_once(b, gw)) for _ in range(times))
    log(f"revoke → refusal: p50 {quantile(ms, 0.5):.2f} ms, max {ms[-1]:.2f} ms over {times}")
    return {"n": times, "p50_ms": round(quantile(ms, 0.5), 3), "max_ms": round(ms[-1], 3)}


def part_memory(b: Bench, gw: Proxy, bare: Proxy | None, requests: int, concurrency: int) -> dict[str, Any]:
    _, token = b.issue()
    out: dict[str, Any] = {"requests": requests, "concurrency": concurrency}
    for proxy, mode in ((gw, "spendgate"), (bare, "bare")):
        if proxy is None:
            continue
        target = b.target(mode, proxy, token)
        asyncio.run(run_load(target, concurrency, requests=min(500, requests)))  # warm: caches, certs, pools
        samples = [{"after": 0, "rss_mib": round(proxy.rss_kib() / 1024, 1)}]
        done = 0
        t0 = time.perf_counter()
        for half in (requests // 2, requests - requests // 2):
            res = asyncio.run(run_load(target, concurrency, requests=half))
            done += res.statuses.get(200, 0)
            samples.append({"after": done, "rss_mib": round(proxy.rss_kib() / 1024, 1)})
            log(f"memory {mode}: {samples[-1]['rss_mib']} MiB after {done} requests "
                f"({done / (time.perf_counter() - t0):.0f} req/s) statuses={dict(res.statuses)}")
        out[mode] = {"samples": samples,
                     "growth_mib": round(samples[-1]["rss_mib"] - samples[1]["rss_mib"], 1),
                     "growth_from_start_mib": round(samples[-1]["rss_mib"] - samples[0]["rss_mib"], 1)}
    return out


SOAK_CHUNK = 10_000  # calls between two RSS samples


def part_soak(b: Bench, scenarios: list[Scenario], calls: int, concurrency: int,
              chunk: int = SOAK_CHUNK) -> dict[str, Any]:
    """Memory under a long run, per kind of call: a fresh gateway per scenario, ``chunk`` calls
    of warm-up (caches, pools, the ledger's pages, TLS), then ``calls`` more, VmRSS sampled
    every ``chunk``. Flat: no sample after the warm-up more than ``soak_growth_pct_max`` above
    the one that ended it. Every payment has a distinct body, so the loop breaker keeps one
    fingerprint per call (its window, 10 minutes, is longer than the run): what grows if it is
    not compact."""
    out: dict[str, Any] = {"calls": calls, "chunk": chunk, "concurrency": concurrency}
    for sc in scenarios:
        gw = b.gateway(db=str(b.tmp / f"soak-{sc.name}.db"), name=f"soak-{sc.name}")
        try:
            _, token = b.issue(sc.policy, db=str(b.tmp / f"soak-{sc.name}.db"))
            target = b.target("spendgate", gw, token, sc)
            samples = [{"after": 0, "rss_mib": round(gw.rss_kib() / 1024, 1)}]
            done, statuses, t0 = 0, Counter(), time.perf_counter()
            cpu0 = gw.cpu_seconds()
            for _ in range(-(-(calls + chunk) // chunk)):
                res = asyncio.run(run_load(target, concurrency, requests=chunk))
                done += res.requests
                statuses.update(res.statuses)
                samples.append({"after": done, "rss_mib": round(gw.rss_kib() / 1024, 1)})
                log(f"soak {sc.name}: {samples[-1]['rss_mib']} MiB after {done:,} calls "
                    f"({done / (time.perf_counter() - t0):.0f} calls/s) statuses={dict(res.statuses)}")
            warm = samples[1]["rss_mib"]
            peak = max(x["rss_mib"] for x in samples[1:])
            out[sc.name] = {
                "samples": samples, "warm_mib": warm, "peak_mib": peak,
                "growth_pct": round((peak - warm) / warm * 100, 1),
                "calls_per_s": round(done / (time.perf_counter() - t0)),
                "cpu_us_per_call": round((gw.cpu_seconds() - cpu0) / max(done, 1) * 1e6),
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
            }
        finally:
            gw.stop()
            b.procs.remove(gw)
    return out


def part_profile(b: Bench, gw: Proxy, seconds: float, concurrency: int, outdir: Path) -> dict[str, Any]:
    """py-spy on the running gateway under load: the top functions by own time."""
    pyspy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if not pyspy:
        log("py-spy not found; `./scripts/bench --profile` installs it into .venv")
        return {"error": "py-spy not installed"}
    _, token = b.issue()
    outdir.mkdir(parents=True, exist_ok=True)
    raw = outdir / "spendgate.collapsed"
    cmd = [pyspy, "record", "--pid", str(gw.pid), "--duration", str(int(seconds)), "--rate", "250",
           "--nonblocking"]
    asyncio.run(run_load(b.target("spendgate", gw, token), concurrency, requests=500))  # warm
    spy_raw = subprocess.Popen([*cmd, "--format", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    asyncio.run(run_load(b.target("spendgate", gw, token), concurrency, seconds=seconds + 1))
    _, err = spy_raw.communicate(timeout=60)
    if spy_raw.returncode != 0 or not raw.exists():
        return {"error": err.decode(errors="replace")[-500:]}
    return {"collapsed": str(raw), **summarize_profile(raw)}


def summarize_profile(raw: Path) -> dict[str, Any]:
    """Own and inclusive time per function (line numbers dropped) from py-spy's raw output."""
    own: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") else f for f in stack.split(";")]
        count = int(n)
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count

    def ours(frame: str) -> bool:  # spendgate's own files: (addons/...), not (mitmproxy/addons/...)
        return "(addons/" in frame or "/main/addons/" in frame

    def pct(items: Any) -> list[tuple[str, float]]:
        return [(f, round(100 * c / total, 1)) for f, c in items]

    return {
        "samples": total,
        "top_own": pct(own.most_common(25)),
        "top_spendgate_inclusive": pct(sorted(((f, c) for f, c in incl.items() if ours(f)),
                                              key=lambda x: -x[1])[:25]),
    }


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import version

    return {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "mitmproxy": version("mitmproxy"), "platform": platform.platform(),
            "background_busy_pct": background_busy(), "loadavg_start": os.getloadavg()[0]}


def background_busy(seconds: float = 1.0) -> float | None:
    """How busy the machine is before we start (other processes share these cores)."""
    def sample() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        return sum(f) - idle, sum(f)

    try:
        b0, t0 = sample()
        time.sleep(seconds)
        b1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return round(100 * (b1 - b0) / max(1, t1 - t0), 1)


def tree() -> str:
    """The commit benchmarked (and whether the addons had uncommitted changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "addons"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in addons/" if dirty else "")


def check_targets(res: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    for name, rows in res.get("throughput", {}).items():
        for c, row in rows.items():
            r = row["ratios"]["spendgate_rps_over_bare"]
            checks[f"{name} c={c}: throughput ≥ {TARGETS['throughput_ratio_min']}× bare"] = (
                r, r is not None and r >= TARGETS["throughput_ratio_min"])
            cpu = row["ratios"]["spendgate_cpu_added_us_per_request"]
            checks[f"{name} c={c}: proxy CPU added ≤ {TARGETS['cpu_added_us_max']:.0f} µs/request"] = (
                cpu, cpu is not None and cpu <= TARGETS["cpu_added_us_max"])
        if "1" in rows:
            added = rows["1"]["ratios"]["spendgate_p50_added_over_bare_ms"]
            checks[f"{name} c=1: p50 added ≤ {TARGETS['p50_added_ms_max']} ms"] = (
                added, added <= TARGETS["p50_added_ms_max"])
    for name, rows in res.get("pipeline", {}).items():
        for c, row in rows.items():
            cpu = row["cpu_added_us_per_request"]
            checks[f"{name} c={c}: in-process CPU added ≤ {TARGETS['cpu_added_us_max']:.0f} µs/request"] = (
                cpu, cpu <= TARGETS["cpu_added_us_max"])
    keys = res.get("lookup", {}).get("keys", {})
    if len(keys) >= 2:
        lo, hi = keys[min(keys, key=int)]["hit"]["p50_us"], keys[max(keys, key=int)]["hit"]["p50_us"]
        r = round(hi / lo, 2)
        checks[f"key lookup flat ({max(keys, key=int)} vs {min(keys, key=int)} keys ≤ {TARGETS['lookup_ratio_max']}×)"] = (r, r <= TARGETS["lookup_ratio_max"])
    if "replay" in res:
        rp = res["replay"]
        checks[f"replay ≥ {TARGETS['replay_flows_per_s_min']} flows/s (CPU)"] = (
            rp["flows_per_s_cpu"], rp["flows_per_s_cpu"] >= TARGETS["replay_flows_per_s_min"])
        checks[f"replay memory flat (RSS growth ≤ {TARGETS['replay_rss_growth_mib_max']} MiB)"] = (
            rp["rss_growth_mib"], rp["rss_growth_mib"] <= TARGETS["replay_rss_growth_mib_max"])
    for name, row in res.get("soak", {}).items():
        if isinstance(row, dict):
            checks[f"soak {name}: RSS flat after the warm-up (≤ {TARGETS['soak_growth_pct_max']:.0f}% growth)"] = (
                row["growth_pct"], row["growth_pct"] <= TARGETS["soak_growth_pct_max"])
    if "revoke" in res:
        m = res["revoke"]["max_ms"]
        checks[f"revoke effective < {TARGETS['revoke_ms_max']:.0f} ms (max)"] = (m, m < TARGETS["revoke_ms_max"])
    if "revoke_across_replicas" in res.get("fleet", {}):
        m = res["fleet"]["revoke_across_replicas"]["max_ms"]
        checks[f"fleet revoke seen by every replica < {TARGETS['revoke_ms_max']:.0f} ms (max)"] = (
            m, m < TARGETS["revoke_ms_max"])
    for name, row in res.get("fleet", {}).items():
        if name not in ("round_trips_us", "revoke_across_replicas"):
            r = row["pg_over_sqlite"]
            checks[f"fleet {name}: PostgreSQL ≥ {TARGETS['pg_over_sqlite_min']}× SQLite req/s"] = (
                r, r is not None and r >= TARGETS["pg_over_sqlite_min"])
    return {k: {"value": v, "ok": ok} for k, (v, ok) in checks.items()}


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    out = [f"machine: {m['nproc']} × {m['cpu']}, Python {m['python']}, mitmproxy {m['mitmproxy']}; "
           f"busy before start {m['background_busy_pct']}%, load average {m['loadavg_start']:.2f} → "
           f"{m.get('loadavg_end', 0):.2f}",
           f"spendgate: {res['params']['addons']} ({res['params']['tree']})",
           "load: " + "; ".join(f"{k}: {v}" for k, v in res["params"]["scenarios"].items()),
           f"keep-alive, {res['params']['seconds']} s × {res['params']['rounds']} interleaved round(s) per run",
           ""]
    pl = res.get("pipeline")
    if pl:
        out += ["in-process (a mitmdump master's hook dispatch, no sockets), CPU µs per request:",
                "| scenario | conc. | bare master's hooks | with spendgate | added |",
                "| --- | ---: | ---: | ---: | ---: |"]
        for name, rows in pl.items():
            for c, row in rows.items():
                out.append(f"| {name} | {c} | {row['bare_cpu_us_per_request']} | "
                           f"{row['spendgate_cpu_us_per_request']} | **{row['cpu_added_us_per_request']}** |")
        out.append("")
    ir = res.get("instructions")
    if ir and "error" not in ir:
        out += ["instructions per request, in-process, concurrency 1 (valgrind --tool=callgrind):",
                "| scenario | bare master's hooks | with spendgate | added | ÷ bare |",
                "| --- | ---: | ---: | ---: | ---: |"]
        out += [f"| {name} | {r['bare_per_request']:,} | {r['spendgate_per_request']:,} | "
                f"**{r['added_per_request']:,}** | {r['spendgate_over_bare']} |" for name, r in ir.items()]
        out.append("")
    tp = res.get("throughput")
    if tp:
        out += ["| scenario | conc. | run | req/s | p50 ms | p99 ms | proxy CPU µs/req | req/s ÷ bare "
                "| p50 added ms | CPU added µs/req |",
                "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, rows in tp.items():
            for c, row in rows.items():
                br = row["bare"]
                for mode in ("direct", "bare", "spendgate"):
                    if mode not in row:
                        continue
                    s = row[mode]
                    cpu, bcpu = s["proxy_cpu_us_per_request"], br["proxy_cpu_us_per_request"]
                    ratio = s["rps"] / br["rps"] if br["rps"] else float("nan")
                    bold = "**" if mode == "spendgate" else ""
                    out.append(
                        f"| {name} | {c} | {mode} | {s['rps']:.0f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | "
                        f"{cpu if cpu is not None else '–'} | {bold}{ratio:.2f}{bold} | "
                        f"{s['p50_ms'] - br['p50_ms']:+.2f} | "
                        f"{f'{cpu - bcpu:+d}' if cpu is not None and bcpu is not None else '–'} |")
        out.append("")
    lk = res.get("lookup")
    if lk:
        out += ["| in-process | p50 µs | p99 µs |", "| --- | ---: | ---: |"]
        for n, v in lk["keys"].items():
            out.append(f"| key_by_token, {int(n):,} keys (hit) | {v['hit']['p50_us']} | {v['hit']['p99_us']} |")
            if "hit_cached" in v:
                out.append(f"| key_by_token, {int(n):,} keys (hit, row parsed before) | "
                           f"{v['hit_cached']['p50_us']} | {v['hit_cached']['p99_us']} |")
            out.append(f"| key_by_token, {int(n):,} keys (miss) | {v['miss']['p50_us']} | {v['miss']['p99_us']} |")
        for n, v in lk["rules"].items():
            out.append(f"| first_match, {int(n):,} rules (last matches) | {v['last_rule_matches']['p50_us']} | "
                       f"{v['last_rule_matches']['p99_us']} |")
            out.append(f"| first_match, {int(n):,} rules (none matches) | {v['no_match']['p50_us']} | "
                       f"{v['no_match']['p99_us']} |")
        out.append("")
    lg = res.get("ledger")
    if lg:
        out += [f"ledger: {lg['rows']:,} calls rows ({lg['db_mb']} MB, inserted in {lg['insert_s']} s)",
                "| spendgate report | ms | groups |", "| --- | ---: | ---: |"]
        out += [f"| --by {k} | {v['ms']} | {v['groups']} |" for k, v in lg["report_ms"].items()]
        out.append("")
    fl = res.get("fleet")
    if fl:
        out += ["fleet mode: the same gateway on PostgreSQL vs SQLite (reads: GET; money: a priced POST "
                "with loop breaker, hold and settle)",
                "| load | bare req/s | SQLite req/s | PostgreSQL req/s | PG ÷ SQLite (median of rounds) | "
                "SQLite ÷ bare | PG ÷ bare | SQLite p50 ms | PG p50 ms | CPU µs/req: SQLite gateway | "
                "PG gateway | PG server |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for name, row in fl.items():
            if name in ("round_trips_us", "revoke_across_replicas"):
                continue
            sq, pg, br = row["sqlite"], row["postgres"], row.get("bare", {})
            out.append(f"| {name} | {br.get('rps', 0):.0f} | {sq['rps']:.0f} | {pg['rps']:.0f} | "
                       f"{row['pg_over_sqlite']} ({row.get('pg_over_sqlite_median')}) | "
                       f"{row.get('sqlite_over_bare')} | {row.get('pg_over_bare')} | "
                       f"{sq['p50_ms']:.2f} | {pg['p50_ms']:.2f} | {sq['proxy_cpu_us_per_request']} | "
                       f"{pg['proxy_cpu_us_per_request']} | {pg.get('server_cpu_us_per_request')} |")
        rv = fl["revoke_across_replicas"]
        out += [f"revoke (commit) → refused by every one of {rv['replicas']} PostgreSQL replicas: "
                f"p50 {rv['p50_ms']} ms, max {rv['max_ms']} ms ({rv['n']} revokes); the last request still "
                f"accepted was sent ≤ {rv.get('accepted_after_commit_max_ms')} ms after the commit "
                f"(p50 {rv.get('accepted_after_commit_p50_ms')})"]
        rt = fl["round_trips_us"]
        out += ["", "store operation, µs each (in-process, one thread) | " + " | ".join(rt),
                "| --- | " + " | ".join("---:" for _ in rt) + " |"]
        for op in next(iter(rt.values())):
            out.append(f"| {op} | " + " | ".join(str(rt[b][op]) for b in rt) + " |")
        out.append("")
    rp = res.get("replay")
    if rp:
        out += [f"replay: {rp['replayed']:,} flows in {rp['wall_s']} s wall ({rp['flows_per_s_wall']:,} flows/s), "
                f"{rp['cpu_s']} s CPU ({rp['flows_per_s_cpu']:,} flows/s); RSS {rp.get('rss_start_mib')} MiB at start, "
                + ", ".join(f"{x['rss_mib']} MiB after {x['after']:,}" for x in rp["rss"])
                + f" (growth {rp['rss_growth_mib']} MiB); {rp['summary']}", ""]
    ri = res.get("replay_instructions")
    if ri and "error" not in ri:
        out += [f"replay instructions per flow ({ri['flows']:,} flows, callgrind): reading the capture "
                f"{ri['read_per_flow']:,}, the whole replay {ri['replay_per_flow']:,}", ""]
    rv = res.get("revoke")
    if rv:
        out += [f"revoke → first 401 revoked: p50 {rv['p50_ms']} ms, max {rv['max_ms']} ms ({rv['n']} revokes)", ""]
    mem = res.get("memory")
    if mem:
        for mode in ("spendgate", "bare"):
            if mode in mem:
                s = mem[mode]["samples"]
                out.append(f"{mode} mitmdump VmRSS: " + ", ".join(f"{x['rss_mib']} MiB after {x['after']:,}" for x in s)
                           + f" requests (growth over the last {s[-1]['after'] - s[1]['after']:,}: "
                             f"{mem[mode]['growth_mib']} MiB)")
        out.append("")
    soak = res.get("soak")
    if soak:
        out.append(f"soak (a fresh gateway per kind of call, {soak['chunk']:,} calls of warm-up, then "
                   f"{soak['calls']:,}; concurrency {soak['concurrency']}): VmRSS every {soak['chunk']:,} calls")
        for name, row in soak.items():
            if isinstance(row, dict):
                out.append(f"  {name}: " + ", ".join(f"{x['rss_mib']}" for x in row["samples"])
                           + f" MiB; after the warm-up {row['warm_mib']} → peak {row['peak_mib']} MiB "
                             f"({row['growth_pct']:+.1f}%); {row['calls_per_s']} calls/s, "
                             f"{row['cpu_us_per_call']} µs CPU per call; statuses {row['statuses']}")
        out.append("")
    if res.get("targets"):
        out += ["targets:"] + [f"  [{'ok' if v['ok'] else 'MISSED'}] {k}: {v['value']}"
                               for k, v in res["targets"].items()]
    prof = res.get("profile")
    if prof and "top_own" in prof:
        out += ["", f"profile ({prof['samples']} samples; {prof['collapsed']}): top own time"]
        out += [f"  {pct:5.1f}%  {f}" for f, pct in prof["top_own"][:15]]
        out += ["spendgate frames, inclusive:"] + [f"  {pct:5.1f}%  {f}" for f, pct in prof["top_spendgate_inclusive"][:15]]
    return "\n".join(out)


def use_addons(directory: Path) -> None:
    """Import ``spendgate`` from ``directory`` here and in the gateway (PYTHONPATH beats the
    editable install's finder, which sits after the path finder)."""
    global ADDONS
    ADDONS = directory.resolve()
    root = Path(tempfile.mkdtemp(prefix="spendgate-addons-"))
    (root / "spendgate").symlink_to(ADDONS, target_is_directory=True)
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    for name in [m for m in sys.modules if m == "spendgate" or m.startswith("spendgate.")]:
        del sys.modules[name]


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_fake"]:
        serve_fake(*argv[1:4])
        return 0
    if argv[:1] == ["_ir_replay"]:
        _ir_replay_child(argv[1], int(argv[2]), Path(argv[3]))
        return 0
    if argv[:1] == ["_ir"]:
        _ir_child(argv[1], argv[2], int(argv[3]), Path(argv[4]))
        return 0
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds: small loads, 10 000 ledger rows, 300 requests for memory; no targets")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    ap.add_argument("--seconds", type=float, help="length of each throughput run (default 8, smoke 0.5)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds of direct/bare/spendgate (default 2, smoke 1)")
    ap.add_argument("--concurrency", default="1,20", help="comma-separated (default 1,20)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help=f"comma-separated, of {', '.join(SCENARIOS)} (default: all)")
    ap.add_argument("--inprocess-requests", type=int,
                    help="requests per in-process run (default 2000, smoke 100)")
    ap.add_argument("--requests", type=int, help="requests for the memory check (default 100000, smoke 300)")
    ap.add_argument("--memory-bare", action="store_true", help="also measure the bare mitmdump's memory")
    ap.add_argument("--ledger-rows", type=int, help="calls rows for the report timing (default 1000000, smoke 10000)")
    ap.add_argument("--keys", type=int, help="the larger key count (default 100000, smoke 2000)")
    ap.add_argument("--soak-calls", type=int,
                    help="calls per kind of call in the soak, after a 10 000-call warm-up "
                         "(--only soak; default 50000, smoke 2000)")
    ap.add_argument("--only", default="pipeline,replay,throughput,lookup,ledger,revoke,memory",
                    help="comma-separated parts to run (pipeline,replay,throughput,lookup,ledger,revoke,memory,profile,instructions,"
                         "replay_instructions,soak)")
    ap.add_argument("--instructions", action="store_true",
                    help="also count instructions per request in-process under valgrind (slow: minutes a scenario)")
    ap.add_argument("--flows", type=int, help="flows for the replay part (default 100000, smoke 2000)")
    ap.add_argument("--profile", metavar="DIR", help="also profile the gateway under load with py-spy into DIR")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed (not with --smoke)")
    ap.add_argument("--pg", metavar="URL",
                    help="also benchmark fleet mode on this PostgreSQL database (a throwaway schema), "
                         "e.g. postgresql://postgres@127.0.0.1:5432/test")
    ap.add_argument("--addons", metavar="DIR",
                    help="benchmark the spendgate package in DIR (a scratch copy of addons/) instead")
    args = ap.parse_args(argv)
    if args.addons:
        use_addons(Path(args.addons))
    smoke = args.smoke
    seconds = args.seconds or (0.5 if smoke else 8.0)
    rounds = args.rounds or (1 if smoke else 2)
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    requests = args.requests or (300 if smoke else 100_000)
    ledger_rows = args.ledger_rows or (10_000 if smoke else 1_000_000)
    big_keys = args.keys or (2000 if smoke else 100_000)
    parts = set(args.only.split(","))
    if args.pg:
        parts.add("fleet")
    elif "fleet" in parts:
        ap.error("--only fleet needs --pg URL")
    scenarios = [SCENARIOS[name] for name in args.scenarios.split(",") if name]
    if args.profile:
        parts.add("profile")
    if args.instructions:
        parts.add("instructions")

    res: dict[str, Any] = {
        "machine": machine(),
        "params": {"smoke": smoke, "seconds": seconds, "rounds": rounds, "concurrency": concurrencies,
                   "memory_requests": requests, "ledger_rows": ledger_rows, "keys": [10, big_keys],
                   "rules": [10, 1000], "scenarios": {sc.name: sc.what for sc in scenarios},
                   "addons": str(ADDONS), "tree": tree() if ADDONS == ROOT / "addons" else "scratch copy"},
        "targets_spec": TARGETS,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spendgate-bench-") as tmpname:
        tmp = Path(tmpname)
        if "pipeline" in parts:
            res["pipeline"] = part_pipeline(tmp, scenarios, concurrencies,
                                            args.inprocess_requests or (100 if smoke else 2000), rounds)
        if "instructions" in parts:
            res["instructions"] = part_instructions(tmp, scenarios, 30 if smoke else 300)
        if "replay" in parts:
            res["replay"] = part_replay(tmp, args.flows or (2000 if smoke else 100_000))
        if "replay_instructions" in parts or {"replay", "instructions"} <= parts:
            res["replay_instructions"] = part_replay_instructions(tmp, 100 if smoke else 2000)
        if "lookup" in parts:
            res["lookup"] = part_lookup(tmp, [10, big_keys], [10, 1000], 500 if smoke else 20_000)
        if "ledger" in parts:
            res["ledger"] = part_ledger(tmp, ledger_rows)
        if parts & {"throughput", "revoke", "memory", "profile", "fleet", "soak"}:
            with bench_env(tmp) as b:
                if "fleet" in parts:
                    with pg_schema(args.pg) as url:
                        res["fleet"] = part_fleet(b, url, concurrencies, seconds, rounds,
                                                  warmup=20 if smoke else 200)
                if "throughput" in parts:
                    res["throughput"] = part_throughput(b, scenarios, concurrencies, seconds, rounds,
                                                        warmup=20 if smoke else 200)
                if "soak" in parts:
                    res["soak"] = part_soak(b, scenarios, args.soak_calls or (2000 if smoke else 50_000), 20,
                                            chunk=500 if smoke else SOAK_CHUNK)
                if parts & {"revoke", "profile", "memory"}:
                    gw = next((p for p in b.procs if p.name == "spendgate"), None) or b.gateway()
                bare = next((p for p in b.procs if p.name == "bare"), None)
                if "revoke" in parts:
                    res["revoke"] = part_revoke(b, gw, 3 if smoke else 20)
                if "profile" in parts:
                    res["profile"] = part_profile(b, gw, 3 if smoke else 15, 20,
                                                  Path(args.profile or tmp / "profile"))
                if "memory" in parts:
                    res["memory"] = part_memory(b, gw, bare if args.memory_bare else None, requests, 20)
                for p in b.procs:  # at termlog_verbosity=warn, anything logged is worth a look
                    lines = p.log.read_text().splitlines()
                    if lines:
                        log(f"{p.name} mitmdump logged {len(lines)} line(s), first: {lines[:3]}")
    res["seconds"] = round(time.perf_counter() - started, 1)
    res["machine"]["loadavg_end"] = os.getloadavg()[0]
    if not smoke:
        res["targets"] = check_targets(res)
    if args.json:
        print(json.dumps(res, indent=2, ensure_ascii=False))
    else:
        print(render(res))
    if problems := broken(res):  # the benchmark itself is broken (not a missed target): fail, smoke too
        for p in problems:
            log(f"BROKEN: {p}")
        return 2
    if args.check and not smoke and not all(v["ok"] for v in res["targets"].values()):
        return 1
    return 0


def broken(res: dict[str, Any]) -> list[str]:
    """What says the benchmark did not measure what it claims: no answers, refusals, errors."""
    problems = []
    for name, rows in res.get("pipeline", {}).items():
        for c, row in rows.items():
            for mode, st in row["statuses"].items():
                if set(st) != {"200"}:
                    problems.append(f"in-process {name} c={c} {mode} answered {st}, not only 200")
    for name, rows in res.get("throughput", {}).items():
        for c, row in rows.items():
            for mode in ("direct", "bare", "spendgate"):
                if mode not in row:
                    continue
                s = row[mode]
                if not s["requests"] or set(s["statuses"]) != {"200"} or s["errors"]:
                    problems.append(f"{name} c={c} {mode}: {s['requests']} requests, statuses {s['statuses']}, "
                                    f"errors {s['errors']}")
    for name, row in res.get("soak", {}).items():
        if isinstance(row, dict) and set(row["statuses"]) != {"200"}:
            problems.append(f"soak {name} answered {row['statuses']}, not only 200")
    mem = res.get("memory", {})
    for mode in ("spendgate", "bare"):
        if mode in mem and mem[mode]["samples"][-1]["after"] < mem["requests"]:
            problems.append(f"memory {mode}: only {mem[mode]['samples'][-1]['after']} requests answered")
    return problems


if __name__ == "__main__":
    sys.exit(main())
