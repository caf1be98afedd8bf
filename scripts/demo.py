"""Run the spendgate story offline: fake vendors, the gateway, an agent with the real SDKs.

Started by ./scripts/demo. Everything lives in data/demo/ (or $SPENDGATE_DEMO_DIR) and is
recreated each run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORK = Path(os.environ.get("SPENDGATE_DEMO_DIR") or ROOT / "data" / "demo").resolve()

sys.path.insert(0, str(ROOT))  # the test-side fakes package lives at the root
from fakes import free_port  # noqa: E402
from spendgate.paths import CA_CERT, ca_dir  # noqa: E402

CA = str(ca_dir() / CA_CERT)  # where `spendgate run` keeps its CA (SPENDGATE_HOME/certs)

# Obviously fake "real" credentials: the fake vendors accept anything, and the demo
# shows they never leave the gateway.
CREDENTIALS = {
    "STRIPE_SECRET_KEY": "sk_test_demo_gateway_only_0000000000",
    "OPENAI_API_KEY": "sk-demo-gateway-only-00000000",
    "ANTHROPIC_API_KEY": "sk-ant-demo-gateway-only-0000",
    "TWILIO_ACCOUNT_SID": "AC" + "d" * 32,
    "TWILIO_AUTH_TOKEN": "e" * 32,
    "RESEND_API_KEY": "re_demo_gateway_only_0000",
    "POSTMARK_SERVER_TOKEN": "00000000-0000-4000-8000-000000000000",
    "GEMINI_API_KEY": "AIza-demo-gateway-only-000000000000000",
    "OPENROUTER_API_KEY": "sk-or-v1-demo-gateway-only-0000",
    "DOCS_MCP_TOKEN": "mcp-demo-gateway-only-0000",
}


def wait_for(path: Path, text: str, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited:\n{path.read_text()}")
        if text in path.read_text():
            return
        time.sleep(0.05)
    sys.exit(f"{what} did not start:\n{path.read_text()}")


def spendgate(*args: str) -> str:
    out = subprocess.run([str(BIN / "spendgate"), *args, "--db", str(WORK / "spendgate.db")]
                         if args[0] in ("keys", "report") else [str(BIN / "spendgate"), *args],
                         capture_output=True, text=True, check=True, cwd=ROOT, env=ENV)
    return out.stdout


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m")


ENV = {**os.environ, **CREDENTIALS}


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    try:
        fake_port, proxy_port = free_port(), free_port()
        fake_log = WORK / "fakes.log"
        procs.append(subprocess.Popen([sys.executable, "-m", "fakes", "--port", str(fake_port)],
                                      stdout=fake_log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT))
        wait_for(fake_log, "listening", procs[-1], "fake vendors")

        policy = WORK / "policy.yaml"
        policy.write_text((ROOT / "policies" / "demo.yaml").read_text()
                          .replace("http://127.0.0.1:9100", f"http://127.0.0.1:{fake_port}"))
        banner("1. the policy")
        print(spendgate("check", str(policy)).strip())

        gw_log = WORK / "gateway.log"
        procs.append(subprocess.Popen(
            [str(BIN / "spendgate"), "run", "--config", str(policy), "--db", str(WORK / "spendgate.db"),
             "--port", str(proxy_port), "--host", "127.0.0.1", "--capture", str(WORK / "capture"), "--",
             # the flow file doubles as the capture replayed in tests/test_replay_flows.py
             "-w", str(WORK / "flows.mitm"), "--set", "store_streamed_bodies=true"],
            stdout=gw_log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT, env=ENV))
        wait_for(gw_log, "proxy listening", procs[-1], "gateway")
        print(f"gateway on 127.0.0.1:{proxy_port}, fake vendors on 127.0.0.1:{fake_port}")

        banner("2. issue vault keys (the tokens are shown once and stored hashed)")
        billing = json.loads(spendgate("keys", "issue", "--policy", "billing-agent", "--label", "agent=billing",
                                       "--label", "run=demo", "--cap-usd", "100", "--config", str(policy), "--json"))
        support = json.loads(spendgate("keys", "issue", "--policy", "support-agent", "--label", "agent=support",
                                       "--label", "run=demo", "--config", str(policy), "--json"))
        print(spendgate("keys", "list").rstrip())

        banner("3. the agent runs, with only HTTPS_PROXY and the CA")
        agent_env = {
            "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
            "HTTPS_PROXY": f"http://127.0.0.1:{proxy_port}",
            "SSL_CERT_FILE": CA, "REQUESTS_CA_BUNDLE": CA,
            "BILLING_KEY": billing["token"], "SUPPORT_KEY": support["token"],
            "SPENDGATE_DB": str(WORK / "spendgate.db"), "BILLING_KEY_ID": billing["id"],
            "SPENDGATE": str(BIN / "spendgate"),
        }
        subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_agent.py")], env=agent_env,
                       check=True, cwd=ROOT)

        time.sleep(0.3)  # the ledger is written behind the requests
        banner("4. spend by key")
        print(spendgate("report", "--by", "key").rstrip())
        banner("5. spend by vendor")
        print(spendgate("report", "--by", "vendor").rstrip())
        banner("6. the ledger (last rows)")
        import sqlite3

        conn = sqlite3.connect(WORK / "spendgate.db")
        rows = conn.execute("SELECT decision, coalesce(reason, '-'), vendor, method, "
                            "path || coalesce(' · ' || tool, ' · ' || model, ''), status, "
                            "estimated_usd, coalesce(cost_usd, '-'), coalesce(cost_status, '-') "
                            "FROM calls ORDER BY id").fetchall()
        print(f"{'DECISION':9} {'REASON':22} {'VENDOR':9} {'CALL':48} {'ST':>3} {'EST$':>8} {'COST$':>10} STATUS")
        for d, r, v, m, p, s, e, c, cs in rows:
            print(f"{d:9} {r:22} {v or '-':9} {(m + ' ' + p)[:48]:48} {s or '-':>3} {e:>8} {c:>10} {cs}")

        banner("7. no real credential left the gateway")
        leaked = [name for name, value in CREDENTIALS.items() if name != "TWILIO_ACCOUNT_SID" and any(
            value.encode() in f.read_bytes() for f in (WORK / "spendgate.db", gw_log))]
        print("ledger and gateway log checked:", "LEAK " + ", ".join(leaked) if leaked else "clean")
        banner("8. test a tighter policy on what was just captured (spendgate replay)")
        tight = WORK / "tighter.yaml"
        tight.write_text(policy.read_text().replace("max_request_usd: 200", "max_request_usd: 15", 1))
        print("billing-agent: max_request_usd 200 → 15")
        print(spendgate("replay", str(WORK / "capture"), "--config", str(tight), "--only-changed").rstrip())
        work = WORK.relative_to(ROOT) if WORK.is_relative_to(ROOT) else WORK
        print(f"\nEverything is in {work}/ (policy, ledger, gateway log, flows, capture). Try it yourself:")
        print("    source .venv/bin/activate")
        print(f"    spendgate report --db {work}/spendgate.db --by label:agent")
        print('and README "Run it" for a gateway and an agent of your own, in three terminals.')
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
