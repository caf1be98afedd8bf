"""What a hostile (prompt-injected, or just creative) agent tries, against a real mitmdump.

One class of attack per section, in the order of issue 10; each test asserts what the vendor
fake received (nothing, or exactly the checked request), what the agent saw, and what the
ledger holds. README "Security" states each guarantee and its limits.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from harness import REAL_CREDENTIALS, SECRET_VALUES, Gateway, free_port, start_gateway

from fakes import FakeVendors
from spendgate.store.sqlite import SQLiteStore

STRIPE = "https://api.stripe.com"
RESEND = "https://api.resend.com"
OPENAI = "https://api.openai.com"


# --------------------------------------------------------------------------- a hostile upstream

BOMB_RAW = gzip.compress(b"{" + b" " * (200 * 1024 * 1024) + b"}", compresslevel=9, mtime=0)


SEEN_BY_BOMBS: list[str] = []  # request lines the hostile upstream received


class _Bombs(BaseHTTPRequestHandler):
    """Answers every request with what ``X-Answer`` asks for: a gzip bomb by default; ``body``: the
    ``X-Body`` header's text (``gzip-body``: gzipped), with the ``X-Headers`` (``k=v;k=v``)."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        SEEN_BY_BOMBS.append(self.requestline)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        answer = self.headers.get("X-Answer", "bomb")
        headers: dict[str, str] = {"Content-Type": "application/json"}
        if answer == "bomb":
            body = BOMB_RAW
            headers["Content-Encoding"] = "gzip"
        elif answer == "echo":  # what a careless vendor does: echo the request's headers
            body = json.dumps({"headers": dict(self.headers.items())}).encode()
            headers["X-Echo-Auth"] = self.headers.get("Authorization", "")
        else:
            body = self.headers.get("X-Body", "{}").replace("\\n", "\n").encode()
            if answer == "gzip-body":
                body = gzip.compress(body, mtime=0)
                headers["Content-Encoding"] = "gzip"
            for pair in filter(None, self.headers.get("X-Headers", "").split(";")):
                k, v = pair.split("=", 1)
                headers[k] = v
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def bombs() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Bombs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


POLICY = """\
version: 1
vendors:
  stripe: {{secret: env:STRIPE_SECRET_KEY, upstream: "{up}"}}
  resend: {{secret: env:RESEND_API_KEY, upstream: "{up}"}}
  openai: {{secret: env:OPENAI_API_KEY, upstream: "{bombs}"}}
  shopify: {{secret: env:SHOPIFY_ACCESS_TOKEN, upstream: "{up}", credential_hosts: [shop-1.myshopify.com]}}
policies:
  pay:
    vendors:
      stripe:
        allow: ["POST /v1/payment_intents", "GET /v1/payment_intents/*"]
        approve: ["POST /v1/transfers"]
        max_request_usd: 100
      resend: {{allow: ["POST /emails", "POST /emails/batch"]}}
      openai: {{allow: ["POST /v1/chat/completions", "POST /v1/responses", "GET /v1/realtime",
                       "POST /v1/organization/**"],
               default_estimate_usd: 1}}
      shopify: {{allow: ["GET /admin/api/**"]}}
    budget: {{key_usd: 50}}
    approval_timeout: 30s
    loop: {{repeats: 1000, window: 1s}}
  nodefault:
    vendors:
      openai: {{allow: ["POST /v1/responses"]}}
egress: {{default: allow, deny: ["blocked.example"]}}
"""


ADMIN_PORT = free_port()
ADMIN_TOKEN = "admin-token-for-the-attack-tests"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fakes: FakeVendors, certs: Path, bombs: str) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("attacks"), fakes, certs,
                       policy=POLICY.format(up=fakes.url, bombs=bombs),
                       extra=("--set", f"spendgate_admin_listen=127.0.0.1:{ADMIN_PORT}"),
                       env={"SPENDGATE_ADMIN_TOKEN": ADMIN_TOKEN})
    yield gw
    gw.stop()


ISSUED: list[str] = []  # every vault key the attacks used: none may show in a flow file, log or ledger


def issue(gw: Gateway, cap_usd: str | None = None, policy: str = "pay") -> tuple[str, str]:
    store = SQLiteStore(gw.db)
    try:
        rec, token = store.issue_key(policy, 3600, cap_usd=cap_usd) if cap_usd else store.issue_key(policy, 3600)
    finally:
        store.close()
    ISSUED.append(token)
    return rec.id, token


def rows_of(gw: Gateway, key_id: str, n: int) -> list[dict]:
    deadline = time.monotonic() + 5
    while True:
        rows = [r for r in gw.calls() if r["key_id"] == key_id]
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def tls_through(gw: Gateway, host: str = "api.stripe.com") -> ssl.SSLSocket:
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, "the gateway closed the CONNECT"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return ssl.create_default_context(cafile=gw.ca).wrap_socket(s, server_hostname=host)


def raw(gw: Gateway, request: bytes, host: str = "api.stripe.com", shut: bool = False) -> tuple[int, bytes]:
    """Raw request bytes over TLS through the gateway: (status, whole answer); ``shut``: then
    end the agent's side (a body that never completes)."""
    with tls_through(gw, host) as tls:
        tls.sendall(request)
        if shut:
            time.sleep(0.3)
            with contextlib.suppress(OSError, ssl.SSLError):
                tls.unwrap()
        out = b""
        with contextlib.suppress(TimeoutError, ssl.SSLError, ConnectionError):
            while chunk := tls.recv(65536):
                out += chunk
    return (int(out.split(b" ", 2)[1]) if out.startswith(b"HTTP/1.1 ") else 0), out


def connect(gw: Gateway, target: str) -> bytes:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return s.recv(4096)


def seen_since(gw: Gateway, n: int) -> list[dict]:
    return gw.fakes.requests()[n:]


def reason(r: httpx.Response) -> tuple[int, str | None]:
    return r.status_code, r.headers.get("x-spendgate-reason")


# --------------------------------------------------------------------------- 1. one canonical request

SPELLINGS = ["/v1/%70ayment_intents", "//v1/payment_intents", "/v1//payment_intents", "/v1/payment_intents/",
             "/v1/payment%5Fintents", "/%76%31/payment_intents", "/v1/payment_intents//"]


@pytest.mark.parametrize("path", SPELLINGS)
def test_path_spellings_cannot_dodge_the_per_request_limit(gw: Gateway, path: str) -> None:
    """$200 on a key with max_request_usd 100 and a $50 cap: refused whatever the spelling (these
    went through before: the rules read the decoded path, the estimator the raw one)."""
    key_id, token = issue(gw)
    n = len(gw.fakes.requests())
    with gw.client() as c:
        r = c.post(STRIPE + path, headers={"X-Vault-Key": token}, data={"amount": "20000", "currency": "usd"})
    assert reason(r) == (402, "request_over_limit"), r.text
    assert seen_since(gw, n) == []
    [row] = rows_of(gw, key_id, 1)
    assert (row["reason"], row["estimated_usd"], row["path"]) == ("request_over_limit", "200", "/v1/payment_intents")


PAY_40 = {"amount": "4000", "currency": "usd", "confirm": "true", "payment_method": "pm_card_visa"}


def test_path_spellings_are_forwarded_canonical_and_held_against_the_cap(gw: Gateway) -> None:
    key_id, token = issue(gw)
    n = len(gw.fakes.requests())
    with gw.client() as c:
        r1 = c.post(STRIPE + "/v1/%70ayment_intents", headers={"X-Vault-Key": token}, data=PAY_40)
        r2 = c.post(STRIPE + "//v1/payment_intents", headers={"X-Vault-Key": token}, data=PAY_40)
    assert r1.status_code == 200 and r1.headers["x-spendgate-cost-usd"] == "40.00"
    assert reason(r2) == (402, "cap_exhausted"), "the first $40 was held: $10 left of $50"
    [seen] = seen_since(gw, n)
    assert (seen["method"], seen["path"], seen["body"]) == (
        "POST", "/v1/payment_intents", "amount=4000&currency=usd&confirm=true&payment_method=pm_card_visa")
    rows = rows_of(gw, key_id, 2)
    assert [(r["path"], r["reason"], r["cost_usd"]) for r in rows] == [
        ("/v1/payment_intents", None, "40.00"), ("/v1/payment_intents", "cap_exhausted", None)]


@pytest.mark.parametrize("path", ["/%65mails/batch", "//emails/batch", "/emails/batch/", "/%65mails"])
def test_email_to_an_encoded_path_on_an_exhausted_cap_is_refused(gw: Gateway, path: str) -> None:
    key_id, token = issue(gw, cap_usd="0.001")  # one email is $0.0009: two do not fit
    batch = [{"from": "a@example.com", "to": ["b@example.com", "c@example.com"], "subject": "s", "text": "t"}]
    body = batch if path.rstrip("/").endswith("batch") else batch[0]
    n = len(gw.fakes.requests())
    with gw.client() as c:
        r = c.post(RESEND + path, headers={"Authorization": f"Bearer {token}"}, json=body)
    assert reason(r) == (402, "cap_exhausted"), r.text
    assert seen_since(gw, n) == []
    [row] = rows_of(gw, key_id, 1)
    assert row["estimated_usd"] == "0.0018" and row["path"] == path.replace("%65", "e").replace("//", "/").rstrip("/")


@pytest.mark.parametrize("target", [
    "/v1/payment_intents#frag", "/v1/payment_intents?expand=x#frag", "/v1/x/%2e%2e/payment_intents",
    "/v1/x/../payment_intents", "/v1/%2Fpayment_intents", "/v1\\payment_intents", "/v1/payment_%zzintents",
    "/v1/payment_intents%00", "/v1/%2e/payment_intents",
])
def test_ambiguous_request_targets_are_refused_before_any_estimate(gw: Gateway, target: str) -> None:
    key_id, token = issue(gw)
    n = len(gw.fakes.requests())
    status, out = raw(gw, (f"POST {target} HTTP/1.1\r\nHost: api.stripe.com\r\nX-Vault-Key: {token}\r\n"
                           "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 24\r\n"
                           "Connection: close\r\n\r\namount=2000&currency=usd").encode())
    assert status in (400, 403), out[:300]
    if status == 403:
        assert b"X-Spendgate-Reason: endpoint_not_allowed" in out
        [row] = rows_of(gw, key_id, 1)
        assert (row["reason"], row["estimated_usd"]) == ("endpoint_not_allowed", "0")
    assert seen_since(gw, n) == []


# --------------------------------------------------------------------------- 2. no call without a hold

WS_HEAD = ("GET /v1/realtime?model=gpt-4o-realtime-preview HTTP/1.1\r\nHost: api.openai.com\r\n"
           "Authorization: Bearer {token}\r\n{upgrade}Connection: close\r\n\r\n")


@pytest.mark.parametrize("upgrade", [
    "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
    "upgrade: WebSocket\r\nconnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n",
    "Upgrade: tcp\r\n",
])
def test_upgrades_to_a_vendor_are_refused_unpriceable(gw: Gateway, upgrade: str) -> None:
    """A WebSocket (OpenAI realtime) or other upgrade opens a session no estimate bounds. (An h2c
    upgrade header is removed by mitmproxy itself: that request goes on as a plain one.)"""
    key_id, token = issue(gw)
    before = len(SEEN_BY_BOMBS)
    status, out = raw(gw, WS_HEAD.format(token=token, upgrade=upgrade).encode(), host="api.openai.com")
    assert status == 402 and b"X-Spendgate-Reason: unpriceable" in out, out[:300]
    assert SEEN_BY_BOMBS[before:] == []
    [row] = rows_of(gw, key_id, 1)
    assert (row["reason"], row["vendor"]) == ("unpriceable", "openai")


@pytest.mark.parametrize("context", [{"previous_response_id": "resp_1"}, {"conversation": "conv_1"},
                                     {"prompt": {"id": "pmpt_1", "version": "2"}}])
def test_context_the_estimate_cannot_see_is_held_at_the_policy_default(gw: Gateway, context: dict) -> None:
    """A Responses call continuing a stored conversation (or a stored prompt) bills input the
    request does not show: it holds at least default_estimate_usd, or is refused without one."""
    key_id, token = issue(gw)
    other_id, other = issue(gw, policy="nodefault")
    body = {"model": "gpt-4o-mini", "input": "go on", "max_output_tokens": 10, **context}
    before = len(SEEN_BY_BOMBS)
    with gw.client() as c:
        held = c.post(OPENAI + "/v1/responses", json=body,
                      headers={"Authorization": f"Bearer {token}", "X-Answer": "body", "X-Body": "{}"})
        refused = c.post(OPENAI + "/v1/responses", json=body,
                         headers={"Authorization": f"Bearer {other}", "X-Answer": "body", "X-Body": "{}"})
    assert held.status_code == 200
    assert reason(refused) == (402, "unpriceable") and "default_estimate_usd" in refused.text
    assert len(SEEN_BY_BOMBS) == before + 1
    [row] = rows_of(gw, key_id, 1)
    assert row["estimated_usd"] == "1" and row["cost_status"] in ("unknown", "estimated"), row
    assert rows_of(gw, other_id, 1)[0]["reason"] == "unpriceable"


# --------------------------------------------------------------------------- 3. responses scrubbed

MINTED = "sk-proj-NEWLYmintedKEYabcdefghijklmnop0123456789"


@pytest.mark.parametrize("answer", ["body", "gzip-body", "sse"])
def test_vendor_secrets_in_a_response_never_reach_the_agent(gw: Gateway, answer: str) -> None:
    """The real key echoed back (in a header and the body) and a newly minted key are scrubbed
    from what the agent gets (plain, gzip, and a stream), and the ledger says so."""
    key_id, token = issue(gw)
    real = REAL_CREDENTIALS["OPENAI_API_KEY"]
    text = json.dumps({"id": "x", "api_key": MINTED, "usage": None})
    headers = {"Authorization": f"Bearer {token}", "X-Answer": "gzip-body" if answer == "gzip-body" else "body",
               "X-Body": text}
    if answer == "sse":
        headers["X-Body"] = "data: " + text + "\\n\\ndata: [DONE]\\n\\n"
        headers["X-Headers"] = "Content-Type=text/event-stream"
    with gw.client() as c:
        r = c.post(OPENAI + "/v1/chat/completions", headers=headers,
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
        echo = c.post(OPENAI + "/v1/chat/completions", headers={"Authorization": f"Bearer {token}", "X-Answer": "echo"},
                      json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == echo.status_code == 200
    assert MINTED not in r.text and "sk-proj-" not in r.text, r.text
    assert "[scrubbed by spendgate]" in r.text
    # the real key the gateway put on the wire, echoed back in a header and the body
    seen = echo.text + json.dumps(dict(echo.headers))
    assert real not in seen and "[scrubbed by spendgate]" in echo.headers["x-echo-auth"], seen
    assert echo.headers["x-spendgate-scrubbed"] == "2"
    rows = rows_of(gw, key_id, 2)
    assert all("scrubbed from the response" in row["note"] for row in rows), rows


def test_key_minting_endpoints_are_refused_unless_named(gw: Gateway) -> None:
    key_id, token = issue(gw)
    before = len(SEEN_BY_BOMBS)
    with gw.client() as c:
        r = c.post(OPENAI + "/v1/organization/admin_api_keys", headers={"Authorization": f"Bearer {token}"},
                   json={"name": "mine"})
    assert reason(r) == (403, "endpoint_not_allowed") and "mints credentials" in r.text
    assert SEEN_BY_BOMBS[before:] == []


# --------------------------------------------------------------------------- 4. bounded work

def rss_kb(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_request_gzip_bomb_is_not_inflated_for_an_unknown_key_and_refused_413_for_a_known_one(gw: Gateway) -> None:
    key_id, token = issue(gw)
    n = len(gw.fakes.requests())
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/x-www-form-urlencoded"}
    with gw.client() as c:
        unknown = c.post(STRIPE + "/v1/payment_intents", content=BOMB_RAW,
                         headers={**headers, "X-Vault-Key": "vk_" + "u" * 43})
        known = c.post(STRIPE + "/v1/payment_intents", content=BOMB_RAW, headers={**headers, "X-Vault-Key": token})
    assert reason(unknown) == (401, "unknown_key")
    assert reason(known) == (413, "body_too_large")
    assert seen_since(gw, n) == []
    [row] = rows_of(gw, key_id, 1)
    assert row["reason"] == "body_too_large"


def test_compressed_request_is_forwarded_decoded_exactly_as_checked(gw: Gateway) -> None:
    """A gzip body is decoded once (bounded) and forwarded decoded: the vendor cannot read a
    second gzip member (or any other decoder disagreement) that the estimate never saw."""
    key_id, token = issue(gw)
    n = len(gw.fakes.requests())
    checked = b"amount=1000&currency=usd&confirm=true&payment_method=pm_card_visa"
    body = gzip.compress(checked, mtime=0) + gzip.compress(b"&amount=900000", mtime=0)
    with gw.client() as c:
        r = c.post(STRIPE + "/v1/payment_intents", content=body,
                   headers={"X-Vault-Key": token, "Content-Encoding": "gzip",
                            "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    [seen] = seen_since(gw, n)
    assert seen["body"] == checked.decode()
    assert not any(k.lower() == "content-encoding" for k, _ in seen["headers"])
    assert rows_of(gw, key_id, 1)[0]["cost_usd"] == "10.00"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_twenty_concurrent_bombs_stay_within_the_memory_bound_and_others_are_served(gw: Gateway) -> None:
    """10 request bombs (half with an unknown key) and 10 response bombs (200 MB of JSON behind
    191 KB of gzip) at once: the gateway's peak RSS grows by less than the documented bound
    (2 × spendgate_inflate_limit + 20 × the raw body), and a normal call is served meanwhile."""
    _, token = issue(gw)
    pid = gw.proc.pid  # type: ignore[union-attr]
    with gw.client() as c:  # warm up every code path once
        c.post(OPENAI + "/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
               json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    base = rss_kb(pid)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/x-www-form-urlencoded"}

    def request_bomb(i: int) -> int:
        with gw.client() as c:
            key = token if i % 2 else "vk_" + "u" * 43
            return c.post(STRIPE + "/v1/payment_intents", content=BOMB_RAW,
                          headers={**headers, "X-Vault-Key": key}).status_code

    def response_bomb(i: int) -> int:
        with gw.client() as c:
            r = c.post(OPENAI + "/v1/chat/completions", headers={"Authorization": f"Bearer {token}"},
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
            reasons.append(r.headers.get("x-spendgate-reason"))
            return r.status_code

    reasons: list[str | None] = []

    with ThreadPoolExecutor(21) as pool:
        futures = [pool.submit(request_bomb, i) for i in range(10)] + [pool.submit(response_bomb, i) for i in range(10)]
        time.sleep(0.2)
        with gw.client() as c:
            other = c.get(STRIPE + "/v1/payment_intents/pi_other", headers={"X-Vault-Key": issue(gw)[1]})
        statuses = sorted(f.result() for f in futures)
    assert other.status_code == 404 and "x-spendgate-reason" not in other.headers  # the vendor's answer
    assert statuses.count(401) == 5 and statuses.count(413) == 5, statuses
    assert statuses.count(502) == 10, (statuses, reasons)  # a response that cannot be checked is withheld
    grew_mib = (rss_kb(pid, "VmHWM") - base) / 1024
    print(f"20 concurrent bombs: peak RSS grew by {grew_mib:.0f} MiB")  # the README quotes it
    assert grew_mib < 2 * 32 + 20 * len(BOMB_RAW) / 2**20 + 16, f"peak RSS grew by {grew_mib:.0f} MiB"


# --------------------------------------------------------------------------- 5. egress

@pytest.mark.parametrize("target", [
    "blocked.example:443", "127.0.0.1:8081", "[::7f00:1]:443", "[64:ff9b::a9fe:a9fe]:80", "[::ffff:127.0.0.1]:443", "[::ffff:0:7f00:1]:443",
    "[2002:7f00:1::]:443", "[::a9fe:a9fe]:80", "127.0.0.1:443", "169.254.169.254:80", "[::1]:443",
    "2130706433:443", "0x7f.1:443", "localhost:443",
])
def test_internal_addresses_in_any_spelling_are_refused_at_connect(gw: Gateway, target: str) -> None:
    rows = len(gw.calls())
    head = connect(gw, target)
    assert head.startswith(b"HTTP/1.1 403"), head[:200]
    assert b"egress_denied" in head
    row = gw.calls(at_least=rows + 1)[-1]
    assert (row["decision"], row["reason"], row["method"]) == ("deny", "egress_denied", "CONNECT")


def test_plain_http_proxy_request_to_loopback_refused(gw: Gateway) -> None:
    with httpx.Client(proxy=gw.proxy) as c:
        r = c.get(f"http://127.0.0.1:{gw.fakes.url.rsplit(':', 1)[1]}/__requests")
    assert reason(r) == (403, "egress_denied")


# --------------------------------------------------------------------------- 6. vault keys never in clear

def test_vault_key_in_the_body_is_refused_and_masked(gw: Gateway) -> None:
    key_id, token = issue(gw)
    n = len(gw.fakes.requests())
    with gw.client() as c:
        r = c.post(STRIPE + "/v1/payment_intents", headers={"X-Vault-Key": token},
                   data={"amount": "100", "currency": "usd", "description": f"my key is {token}"})
    assert reason(r) == (403, "vault_key_leak")
    assert seen_since(gw, n) == []
    assert rows_of(gw, key_id, 1)[0]["reason"] == "vault_key_leak"


def test_two_different_vault_keys_are_ambiguous(gw: Gateway) -> None:
    _, a = issue(gw)
    _, b = issue(gw)
    n = len(gw.fakes.requests())
    with gw.client() as c:
        r = c.get(STRIPE + "/v1/payment_intents/pi_1", headers={"X-Vault-Key": a, "Authorization": f"Bearer {b}"})
    assert reason(r) == (401, "ambiguous_vault_key")
    assert seen_since(gw, n) == []


def test_percent_and_json_escaped_vault_keys_count_as_leaks(gw: Gateway) -> None:
    _, token = issue(gw)
    escaped = token.replace("_", "%5F", 1)
    n = len(gw.fakes.requests())
    with gw.client() as c:
        in_path = c.get(STRIPE + f"/v1/payment_intents/{escaped}", headers={"X-Vault-Key": token})
        in_query = c.get(STRIPE + f"/v1/payment_intents/pi_1?note={escaped}", headers={"X-Vault-Key": token})
        in_form = c.post(STRIPE + "/v1/payment_intents", headers={"X-Vault-Key": token},
                         content=f"amount=100&currency=usd&description={escaped}".encode(),
                         )
        in_form2 = c.post(STRIPE + "/v1/payment_intents", headers={"X-Vault-Key": token},
                          content=f"amount=100&currency=usd&description={token.replace('_', '%255F', 1)}".encode())
        in_json = c.post(RESEND + "/emails", headers={"Authorization": f"Bearer {token}"},
                         content=('{"from": "a@example.com", "to": "b@example.com", "subject": "s", "text": "'
                                  + token.replace("_", "\\u005f", 1) + '"}').encode())
        in_header = c.post(OPENAI + "/v1/chat/completions",
                           headers={"Authorization": f"Bearer {token}", "X-Note": escaped, "X-Answer": "echo"},
                           json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    for r in (in_path, in_query, in_form, in_form2, in_json):
        assert reason(r) == (403, "vault_key_leak"), r.text
    assert seen_since(gw, n) == []
    # another header: masked, then forwarded (the hostile upstream echoes what it received)
    assert in_header.status_code == 200 and "x-spendgate-reason" not in in_header.headers
    assert token[3:] not in in_header.text and "vk_[redacted]" in in_header.text


@pytest.mark.parametrize(("name", "framing"), [
    ("cl-and-te", "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
    ("two-cl", "Content-Length: 5\r\nContent-Length: 6\r\n"),
    ("bad-te", "Transfer-Encoding: gzip, chunked, identity\r\n"),
    ("bad-cl", "Content-Length: -1\r\n"),
    ("bad-chunk", "Transfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ("short-body", "Content-Length: 500\r\n\r\namount=1"),
])
@pytest.mark.parametrize("slot", ["X-Vault-Key: {t}", "Authorization: Bearer {t}", "X-Note: {e}"])
def test_requests_mitmproxy_rejects_keep_no_vault_key(gw: Gateway, name: str, framing: str, slot: str) -> None:
    """mitmproxy refuses these before the request hook; the flow (saved by -w, shown in mitmweb)
    and the log still never hold the vault key (checked in the last test)."""
    _, token = issue(gw)
    n = len(gw.fakes.requests())
    line = slot.format(t=token, e=token.replace("_", "%5F", 1))
    status, out = raw(gw, (f"POST /v1/payment_intents?k={token.replace('_', '%5F', 1)} HTTP/1.1\r\n"
                           f"Host: api.stripe.com\r\nConnection: close\r\n{line}\r\n{framing}"
                           + ("" if framing.endswith("\n\r\n") or "\r\n\r\n" in framing else "\r\n0\r\n\r\n")).encode(),
                      shut=True)
    assert status in (0, 400, 403, 501), out[:300]
    assert token.encode() not in out
    assert seen_since(gw, n) == []


# --------------------------------------------------------------------------- 7. smaller ones

@pytest.mark.parametrize("host", ["api.stripe.com:443@evil.example", "api.stripe.com evil.example",
                                  "api.stripe.com,evil.example", "evil.example#api.stripe.com"])
def test_malformed_host_headers_are_refused(gw: Gateway, host: str) -> None:
    key_id, token = issue(gw)
    n = len(gw.fakes.requests())
    status, out = raw(gw, (f"GET /v1/payment_intents/pi_1 HTTP/1.1\r\nHost: {host}\r\nX-Vault-Key: {token}\r\n"
                           "Connection: close\r\n\r\n").encode())
    assert status in (400, 403), out[:300]
    if status == 403:
        assert b"host_mismatch" in out
    assert seen_since(gw, n) == []


def test_host_header_of_another_host_is_refused(gw: Gateway) -> None:
    key_id, token = issue(gw)
    n = len(gw.fakes.requests())
    with gw.client() as c:
        r = c.get(STRIPE + "/v1/payment_intents/pi_1", headers={"X-Vault-Key": token, "Host": "evil.example"})
    assert reason(r) == (403, "host_mismatch")
    assert seen_since(gw, n) == []


def test_plain_http_to_a_vendor_is_refused(gw: Gateway) -> None:
    _, token = issue(gw)
    n = len(gw.fakes.requests())
    with httpx.Client(proxy=gw.proxy) as c:
        r = c.get("http://api.stripe.com/v1/payment_intents/pi_1", headers={"X-Vault-Key": token})
    assert reason(r) == (403, "insecure_scheme")
    assert seen_since(gw, n) == []


def test_two_host_headers_are_refused(gw: Gateway) -> None:
    _, token = issue(gw)
    n = len(gw.fakes.requests())
    status, out = raw(gw, (f"GET /v1/payment_intents/pi_1 HTTP/1.1\r\nHost: api.stripe.com\r\nHost: evil.example\r\n"
                           f"X-Vault-Key: {token}\r\nConnection: close\r\n\r\n").encode())
    assert status in (400, 403), out[:300]
    assert seen_since(gw, n) == []


def test_shopify_credential_is_bound_to_the_named_shop(gw: Gateway) -> None:
    _, token = issue(gw)
    n = len(gw.fakes.requests())
    with gw.client() as c:
        other = c.get("https://shop-2.myshopify.com/admin/api/2024-10/shop.json",
                      headers={"X-Shopify-Access-Token": token})
        own = c.get("https://shop-1.myshopify.com/admin/api/2024-10/shop.json",
                    headers={"X-Shopify-Access-Token": token})
    assert reason(other) == (403, "vendor_not_allowed") and "shop-1.myshopify.com" in other.text
    assert "x-spendgate-reason" not in own.headers, own.text
    [seen] = seen_since(gw, n)
    assert seen["path"] == "/admin/api/2024-10/shop.json"


def test_an_approval_released_after_a_revoke_is_refused(gw: Gateway) -> None:
    key_id, token = issue(gw)
    n = len(gw.fakes.requests())
    with ThreadPoolExecutor(1) as pool, gw.client() as c:
        held = pool.submit(c.post, STRIPE + "/v1/transfers", headers={"X-Vault-Key": token},
                           data={"amount": "1000", "currency": "usd", "destination": "acct_1"})
        deadline = time.monotonic() + 10
        approval = None
        store = SQLiteStore(gw.db)
        try:
            while approval is None and time.monotonic() < deadline:
                approval = next((a for a in store.list_approvals("pending") if a["key_id"] == key_id), None)
                time.sleep(0.1)
            assert approval is not None, "the transfer was not held"
            store.revoke(key_id)
            store.decide_approval(approval["id"], "approved", "test")
        finally:
            store.close()
        r = held.result(timeout=15)
    assert reason(r) == (401, "revoked"), r.text
    assert seen_since(gw, n) == []
    rows = rows_of(gw, key_id, 1)
    assert rows[-1]["reason"] == "revoked"


@pytest.mark.parametrize(("host", "answered"), [
    (f"127.0.0.1:{ADMIN_PORT}", True), (f"localhost:{ADMIN_PORT}", True), ("evil.example", False),
    (f"rebind.attacker.example:{ADMIN_PORT}", False)],
    ids=["127.0.0.1:port", "localhost:port", "evil.example", "rebind:port"])  # the same ids in every xdist worker
def test_admin_listener_answers_only_its_own_host_names(gw: Gateway, host: str, answered: bool) -> None:
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 sends its own name as Host."""
    for path, auth in (("/metrics", {}), ("/v1/keys", {"Authorization": f"Bearer {ADMIN_TOKEN}"})):
        r = httpx.get(f"http://127.0.0.1:{ADMIN_PORT}{path}", headers={"Host": host, **auth})
        assert (r.status_code == 200) is answered, (path, r.status_code, r.text)
        if not answered:
            assert r.status_code == 421 and "misdirected_request" in r.text


def test_control_characters_in_a_logged_target_are_escaped(gw: Gateway) -> None:
    _, token = issue(gw)
    raw(gw, (f"GET /v1/payment_intents/pi_\x1b[31mred HTTP/1.1\r\nHost: api.stripe.com\r\nX-Vault-Key: {token}\r\n"
             "Connection: close\r\n\r\n").encode())
    time.sleep(0.3)
    log = gw.log.read_bytes()
    assert b"\x1b[31m" not in log
    assert b"pi_\\x1b[31mred" in log


def test_nothing_secret_in_the_flow_file_or_log(gw: Gateway) -> None:
    """Runs last: every attack above went through this gateway."""
    gw.stop()
    blob = gw.flows.read_bytes() + gw.log.read_bytes() + Path(gw.db).read_bytes()
    for secret in SECRET_VALUES:
        assert secret.encode() not in blob
    assert ISSUED
    for token in ISSUED:
        assert token[3:].encode() not in blob, "a vault key (or its escaped form) was kept"
