"""Issue 12 item 5: the policy file, the ledger and the CA are the same files whatever directory a
command runs from (SPENDGATE_HOME, else the checkout, else ~/.spendgate), and every subcommand
agrees. Real subprocesses of the installed ``spendgate``, a real gateway, real HTTPS through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from harness import free_port

from fakes import FakeVendors

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_") and k not in (
    "STRIPE_SECRET_KEY", "HTTPS_PROXY", "https_proxy", "SSL_CERT_FILE")}
FAKE_SECRET = "sk_test_paths_FAKE_0000000000"

POLICY = """\
version: 1
vendors:
  stripe: {{secret: "file:secrets/stripe.key", upstream: "{up}"}}   # relative to this file
policies:
  agent:
    vendors:
      stripe: {{allow: ["POST /v1/payment_intents"]}}
egress: {{default: deny}}
"""


def sg(*args: str, cwd: Path, home: Path | None) -> subprocess.CompletedProcess[str]:
    env = {**CLEAN_ENV, **({"SPENDGATE_HOME": str(home)} if home else {})}
    return subprocess.run([str(BIN / "spendgate"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out.stderr
    return out.stdout


def agent_env(out: str) -> dict[str, str]:
    return dict(ln.removeprefix("export ").split("=", 1) for ln in out.splitlines() if ln.startswith("export "))


def test_every_subcommand_finds_the_same_files_from_any_directory(tmp_path: Path, fakes: FakeVendors) -> None:
    home, a, b = tmp_path / "home", tmp_path / "a", tmp_path / "x" / "b"
    for d in (a, b):
        d.mkdir(parents=True)
    (home / "policies" / "secrets").mkdir(parents=True)
    policy = home / "policies" / "spendgate.yaml"
    policy.write_text(POLICY.format(up=fakes.url))
    (home / "policies" / "secrets" / "stripe.key").write_text(FAKE_SECRET + "\n")

    for cwd in (a, b):  # the policy, and its relative file: secret, from either directory
        assert ok(sg("check", cwd=cwd, home=home)).startswith(f"{policy}: ok (1 policies")
    key = json.loads(ok(sg("keys", "issue", "--policy", "agent", "--json", cwd=a, home=home)))
    assert (home / "data" / "spendgate.db").is_file()
    assert [k["id"] for k in json.loads(ok(sg("keys", "list", "--json", cwd=b, home=home)))] == [key["id"]]
    env_a, env_b = ok(sg("env", cwd=a, home=home)), ok(sg("env", cwd=b, home=home))
    assert env_a == env_b and f"# spendgate home {home} ($SPENDGATE_HOME)" in env_a
    ca = home / "certs" / "mitmproxy-ca-cert.pem"
    assert agent_env(env_a)["SSL_CERT_FILE"] == str(ca)

    port = free_port()
    log = tmp_path / "gw.log"
    gw = subprocess.Popen([str(BIN / "spendgate"), "run", "--port", str(port), "--capture", "cap"], cwd=b,
                          env={**CLEAN_ENV, "SPENDGATE_HOME": str(home)}, stdout=log.open("w"),
                          stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "proxy listening" not in log.read_text():
            assert gw.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert f"ledger {home}/data/spendgate.db" in log.read_text()
        assert ca.is_file(), "the gateway keeps its CA in the home, where `spendgate env` points agents"
        with httpx.Client(proxy=f"http://127.0.0.1:{port}", verify=str(ca), timeout=15) as c:
            r = c.post("https://api.stripe.com/v1/payment_intents", data={"amount": "2000", "currency": "usd"},
                       headers={"Authorization": f"Bearer {key['token']}"})  # fmt: skip
            assert r.status_code == 200, r.text
        ok(sg("keys", "revoke", key["id"], cwd=a, home=home))  # the gateway sees it: same ledger
        with httpx.Client(proxy=f"http://127.0.0.1:{port}", verify=str(ca), timeout=15) as c:
            r = c.post("https://api.stripe.com/v1/payment_intents", data={"amount": "100", "currency": "usd"},
                       headers={"Authorization": f"Bearer {key['token']}"})  # fmt: skip
            assert r.status_code == 401 and r.json()["error"]["code"] == "revoked"
    finally:
        gw.terminate()
        gw.wait(15)
    sent = [v for r in fakes.requests() if r["vendor"] == "stripe" for k, v in r["headers"]
            if k.lower() == "authorization"]
    assert f"Bearer {FAKE_SECRET}" in sent, "the relative file: secret was read from beside the policy"

    rows = json.loads(ok(sg("report", "--by", "vendor", "--json", cwd=a, home=home)))
    (stripe,) = [r for r in rows if r.get("vendor") == "stripe"]
    assert (stripe["calls"], stripe["allowed"], stripe["refused"]) == (2, 1, 1)
    assert ok(sg("approvals", "list", cwd=b, home=home)).strip() == "(none)"
    assert ok(sg("ca", cwd=b, home=home)).strip() == str(ca)
    replayed = json.loads(ok(sg("replay", str(b / "cap"), "--json", cwd=a, home=home)))  # the home's policy
    assert [r["now"]["decision"] for r in replayed["rows"]] == ["allow", "deny"]
    assert sorted(p.name for p in a.iterdir()) == [] and sorted(p.name for p in b.iterdir()) == ["cap"]


def test_migrate_reads_the_home_ledger_from_any_directory(tmp_path: Path, pg_url: str) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home / "policies").mkdir(parents=True)
    (home / "policies" / "spendgate.yaml").write_text(POLICY.format(up="http://127.0.0.1:9"))
    ok(sg("keys", "issue", "--policy", "agent", cwd=tmp_path, home=home))
    out = ok(sg("migrate", "--to", pg_url, cwd=elsewhere, home=home))
    assert out.startswith(f"migrated {home}/data/spendgate.db → ") and ": 1 keys" in out
    missing = sg("migrate", "--to", pg_url, cwd=elsewhere, home=tmp_path / "empty")
    assert missing.returncode == 1 and f"no ledger at {tmp_path}/empty/data/spendgate.db" in missing.stderr
    assert "--from FILE" in missing.stderr and not (tmp_path / "empty").exists()


def test_the_default_home_is_the_checkout_for_a_clone(tmp_path: Path) -> None:
    env = agent_env(ok(sg("env", cwd=tmp_path, home=None)))
    assert env["SSL_CERT_FILE"] == str(ROOT / "certs" / "mitmproxy-ca-cert.pem")
    out = sg("report", cwd=tmp_path, home=None)
    assert out.returncode == 1 and f"no ledger at {ROOT}/data/spendgate.db (the default under the checkout" in \
        out.stderr or (ROOT / "data" / "spendgate.db").exists()


def test_an_installed_package_keeps_its_files_in_dot_spendgate(tmp_path: Path) -> None:
    """paths.py outside a checkout (as in a wheel): the home is ~/.spendgate."""
    pkg = tmp_path / "site" / "spendgate"
    pkg.mkdir(parents=True)
    (pkg / "paths.py").write_text((ROOT / "addons" / "paths.py").read_text())
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib; p = importlib.import_module('paths');"
            "print(p.home(), p.db_path(), p.config_path(), p.ca_dir(), sep='\\n')")
    out = subprocess.run([sys.executable, "-c", code, str(pkg)], env={**CLEAN_ENV, "HOME": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    dot = tmp_path / ".spendgate"
    assert out == [str(dot), f"{dot}/data/spendgate.db", f"{dot}/policies/spendgate.yaml", f"{dot}/certs"]
