"""The end-to-end harness: a real mitmdump running the gateway, fake vendors, helpers.

End-to-end tests start ``mitmdump -s addons/gateway.py`` as a subprocess with a
policy whose vendors all point (``upstream:``) at one local :class:`FakeVendors`
server, and drive it with real clients through the proxy, trusting only the
gateway's CA.
"""

from __future__ import annotations

import json
import os
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from fakes import FakeVendors, free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# What the gateway injects. They look real on purpose: tests grep for them everywhere.
REAL_CREDENTIALS = {
    "STRIPE_SECRET_KEY": "sk_test_51REALstripeSECRETdoNotLeak0000",
    "OPENAI_API_KEY": "sk-proj-REALopenaiSECRETdoNotLeak0000",
    "ANTHROPIC_API_KEY": "sk-ant-api03-REALanthropicSECRETdoNotLeak",
    "TWILIO_ACCOUNT_SID": "AC11111111111111111111111111111111",
    "TWILIO_AUTH_TOKEN": "feedfacefeedfacefeedfacefeedface",
    "RESEND_API_KEY": "re_REALresendSECRETdoNotLeak",
    "POSTMARK_SERVER_TOKEN": "99999999-8888-7777-6666-555555555555",
    "SHOPIFY_ACCESS_TOKEN": "shpat_REALshopifySECRETdoNotLeak",
    "GEMINI_API_KEY": "AIzaSyREALgeminiSECRETdoNotLeak000000000",
    "OPENROUTER_API_KEY": "sk-or-v1-" + "f" * 64,
    "DOCS_MCP_TOKEN": "mcp-REALdocsSECRETdoNotLeak",
}
SECRET_VALUES = [v for k, v in REAL_CREDENTIALS.items() if k != "TWILIO_ACCOUNT_SID"]

POLICY = """\
version: 1
vendors:
  stripe:    {{secret: env:STRIPE_SECRET_KEY, upstream: "{up}"}}
  openai:    {{secret: env:OPENAI_API_KEY, upstream: "{up}"}}
  anthropic: {{secret: env:ANTHROPIC_API_KEY, upstream: "{up}"}}
  twilio:    {{account_sid: env:TWILIO_ACCOUNT_SID, secret: env:TWILIO_AUTH_TOKEN, upstream: "{up}"}}
  resend:    {{secret: env:RESEND_API_KEY, upstream: "{up}"}}
  postmark:  {{secret: env:POSTMARK_SERVER_TOKEN, upstream: "{up}"}}
  shopify:   {{secret: env:SHOPIFY_ACCESS_TOKEN, upstream: "{up}", credential_hosts: [shop-1.myshopify.com]}}
fx: {{EUR: 1.08, GBP: 1.27, JPY: 0.0067}}
policies:
  billing:
    vendors:
      stripe:
        allow: ["POST /v1/payment_intents", "GET /v1/payment_intents/*", "POST /v1/payment_intents/*/confirm", "POST /v1/refunds"]
        deny: ["* /v1/payment_methods/**"]
        approve: ["POST /v1/transfers"]
        max_request_usd: 200
      resend: {{allow: ["POST /emails", "POST /emails/batch"]}}
    budget: {{key_usd: 500}}
    approval_timeout: 3s
    loop: {{repeats: 3, window: 10m}}
  llm:
    vendors:
      openai: {{allow: ["POST /v1/chat/completions", "POST /v1/responses", "POST /v1/embeddings"]}}
      anthropic: {{allow: ["POST /v1/messages"]}}
      twilio: {{allow: ["POST /2010-04-01/Accounts/*/Messages.json", "GET /2010-04-01/Accounts/*/Messages/*"]}}
      postmark: {{allow: ["POST /email", "POST /email/batch"]}}
  held:
    vendors:
      stripe: {{allow: ["GET /v1/payment_intents/*"], approve: ["POST /v1/transfers"]}}
    approval_timeout: 60s
  limited:
    vendors:
      stripe: {{allow: ["POST /v1/payment_intents"]}}
    rate: 2/minute
  shadow:
    mode: report
    vendors:
      stripe: {{allow: ["GET /v1/payment_intents/*"], max_request_usd: 5}}
    budget: {{key_usd: 1}}
egress: {{default: allow, allow: [], deny: ["blocked.example"]}}
"""


@dataclass
class Gateway:
    proxy: str
    port: int
    ca: str
    db: str
    config: Path
    log: Path
    flows: Path
    fakes: FakeVendors
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / "spendgate"), *args]
        if args and args[0] in ("keys", "approvals", "approve", "deny", "report"):
            cmd += ["--db", self.db]
            if args[:2] == ("keys", "issue"):
                cmd += ["--config", str(self.config)]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=ROOT, env=self.env)

    def issue(self, policy: str = "billing", *extra: str) -> tuple[str, str]:
        """A vault key from ``spendgate keys issue --json``: the command's own code (click parsing,
        the policy checked against ``--config``, the store), run in this process under the
        gateway's environment. A subprocess per key cost ~0.5 s of interpreter start-up, over a
        hundred times a run; ``cli()`` still runs the installed command (tests of the CLI use it)."""
        from click.testing import CliRunner

        from spendgate.cli import main

        args = ["keys", "issue", "--policy", policy, "--json", *extra, "--db", self.db, "--config", str(self.config)]
        env = {k: v for k, v in self.env.items() if os.environ.get(k) != v}
        result = CliRunner().invoke(main, args, env=env, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        return out["id"], out["token"]

    def client(self, **kw: object) -> httpx.Client:
        return httpx.Client(proxy=self.proxy, verify=ssl.create_default_context(cafile=self.ca),
                            timeout=15, **kw)

    def calls(self, at_least: int = 0, timeout: float = 5.0) -> list[dict]:
        """Ledger rows (oldest first), waiting for the write-behind queue."""
        deadline = time.monotonic() + timeout
        while True:
            conn = sqlite3.connect(self.db)
            conn.row_factory = sqlite3.Row
            try:
                rows = [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY id")]
            except sqlite3.OperationalError:
                rows = []
            finally:
                conn.close()
            if len(rows) >= at_least or time.monotonic() > deadline:
                return rows

    def last_call(self, n_before: int) -> dict:
        rows = self.calls(at_least=n_before + 1)
        assert len(rows) > n_before, "no ledger row was written"
        return rows[-1]

    def write_policy(self, text: str) -> None:
        """Replace the policy file and wait for the gateway to pick it up."""
        before = self.log.read_text()
        self.config.write_text(text)
        # make sure the mtime moves even on coarse-grained filesystems
        st = self.config.stat()
        os.utime(self.config, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            new = self.log.read_text()[len(before):]
            if "loaded" in new or "rejected" in new:
                return
            time.sleep(0.05)
        raise AssertionError("the gateway did not react to the policy change")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_gateway(tmp: Path, fakes: FakeVendors, certs: Path, policy: str | None = None,
                  extra: tuple[str, ...] = (), db: str | None = None, tool: str = "mitmdump",
                  env: dict[str, str] | None = None) -> Gateway:
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "policy.yaml"
    config.write_text(policy if policy is not None else POLICY.format(up=fakes.url))
    for _ in range(3):
        gw = _launch(tmp, fakes, certs, config, extra, db, tool, env)
        if gw.proc is not None:
            return gw
        # free_port() let the port go before mitmdump bound it: in the meantime another process
        # (a parallel test worker, another engineer's run) took it. Only that is retried.
    raise RuntimeError(f"gateway: no free port after 3 tries:\n{gw.log.read_text()}")


def _launch(tmp: Path, fakes: FakeVendors, certs: Path, config: Path, extra: tuple[str, ...],
            db: str | None, tool: str, env: dict[str, str] | None) -> Gateway:
    """Start the gateway on a port free a moment ago; ``proc`` None when it was taken meanwhile."""
    port = free_port()
    gw = Gateway(
        proxy=f"http://127.0.0.1:{port}", port=port, ca=str(certs / "mitmproxy-ca-cert.pem"),
        db=db or str(tmp / "ledger.db"), config=config, log=tmp / "gateway.log",
        flows=tmp / "flows.mitm", fakes=fakes,
        env={**os.environ, **REAL_CREDENTIALS, "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **(env or {})},
    )
    cmd = [
        str(BIN / tool), "-s", str(ROOT / "addons" / "gateway.py"),
        "--set", f"spendgate_config={config}", "--set", f"spendgate_db={gw.db}",
        "--set", f"confdir={certs}", "--listen-host", "127.0.0.1", "-p", str(port),
        "-w", str(gw.flows), *extra,
    ]
    if tool == "mitmweb":
        cmd += ["--set", "web_open_browser=false"]
    with gw.log.open("w") as log:
        gw.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=gw.env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if gw.proc.poll() is not None:
            text = gw.log.read_text()
            if f"proxy failed to listen on 127.0.0.1:{port} " in text and "address already in use" in text:
                gw.proc = None
                return gw
            raise RuntimeError(f"gateway exited:\n{text}")
        if "proxy listening" in gw.log.read_text():
            return gw
        time.sleep(0.05)
    gw.stop()
    raise RuntimeError(f"gateway did not start:\n{gw.log.read_text()}")


def in_background(fn: Any, *args: Any) -> tuple[threading.Thread, dict]:
    """Run ``fn(*args)`` in a daemon thread (a held request, say); ``out`` gets its result or error."""
    out: dict = {}

    def run() -> None:
        try:
            out["result"] = fn(*args)
        except Exception as e:  # surfaced by the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out
