"""A new user's first commands: the shipped policies, `init`, `check`, `run` refusing before it
listens, and the CLI's messages when something is missing. Real subprocesses of the installed
`spendgate` command, as a user types them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import httpx
import pytest
import yaml
from harness import free_port

from spendgate.cli import main
from spendgate.policy import load_config
from spendgate.vendors import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_") and not k.endswith(
    ("_SECRET_KEY", "_API_KEY", "_AUTH_TOKEN", "_ACCOUNT_SID", "_SERVER_TOKEN", "_ACCESS_TOKEN"))
    and k != "PYTHONUNBUFFERED"}  # (run must make its output line-buffered itself)


def sg(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: str | None = None
       ) -> subprocess.CompletedProcess[str]:
    """``spendgate ARGS`` in ``cwd``, whose home is ``cwd`` unless ``env`` names another."""
    return subprocess.run([str(BIN / "spendgate"), *args], cwd=cwd,
                          env={**CLEAN_ENV, "SPENDGATE_HOME": str(cwd), **(env or {})},
                          capture_output=True, text=True, input=stdin, timeout=60)  # fmt: skip


# --------------------------------------------------------------------------- the shipped policies


def test_the_example_policy_is_production_shaped() -> None:
    cfg = load_config(ROOT / "policies" / "example.yaml")
    assert cfg.vendors and all(v.upstream is None for v in cfg.vendors.values()), "no upstream: in the example"
    assert cfg.egress.default == "deny", "a fresh gateway is not an open forward proxy"


def test_the_demo_policy_sends_everything_to_the_fakes_and_keeps_the_examples_policies() -> None:
    demo, example = load_config(ROOT / "policies" / "demo.yaml"), load_config(ROOT / "policies" / "example.yaml")
    assert {v.upstream for v in demo.vendors.values()} == {"http://127.0.0.1:9100"}
    assert demo.policies == example.policies and demo.egress == example.egress
    assert set(demo.vendors) == set(example.vendors)
    text = (ROOT / "policies" / "demo.yaml").read_text()
    assert text.startswith("# DEMO policy") and "OFFLINE FAKE" in text
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_policy import render

    assert text == render((ROOT / "policies" / "example.yaml").read_text()), \
        "policies/demo.yaml is out of date: run python scripts/demo_policy.py"


# --------------------------------------------------------------------------- init


def test_init_writes_a_commented_starter_policy_that_checks(tmp_path: Path) -> None:
    out = sg("init", "--vendor", "stripe", "--vendor", "twilio", "--vendor", "openai", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "policies" / "spendgate.yaml"  # where `run` looks by default
    text = path.read_text()
    assert text.count("\n#") >= 5 and "upstream" not in text
    cfg = load_config(path)
    assert list(cfg.vendors) == ["stripe", "twilio", "openai"] and cfg.egress.default == "deny"
    assert "TWILIO_ACCOUNT_SID" in out.stdout and "STRIPE_SECRET_KEY" in out.stdout
    missing = sg("check", cwd=tmp_path)  # secrets not exported yet: every one, with its line
    assert missing.returncode == 1
    lines = missing.stderr.strip().splitlines()
    assert [ln.split(": ")[1] for ln in lines] == [
        "vendors.stripe.secret", "vendors.twilio.account_sid", "vendors.twilio.secret", "vendors.openai.secret"]
    assert all(ln.startswith(f"{path}:") and ln.split(":")[1].isdigit() for ln in lines)
    env = {"STRIPE_SECRET_KEY": "x", "TWILIO_ACCOUNT_SID": "AC1", "TWILIO_AUTH_TOKEN": "y", "OPENAI_API_KEY": "z"}
    ok = sg("check", cwd=tmp_path, env=env)
    assert ok.returncode == 0 and "every secret resolves" in ok.stdout, ok.stderr
    again = sg("init", "--vendor", "resend", cwd=tmp_path)
    assert again.returncode == 1 and "exists" in again.stderr and "--force" in again.stderr
    assert sg("init", "--vendor", "nope", cwd=tmp_path).returncode == 2


@pytest.mark.parametrize("vendor", sorted(REGISTRY))
def test_init_knows_every_vendor(tmp_path: Path, vendor: str) -> None:
    assert sg("init", "--vendor", vendor, "-o", "p.yaml", cwd=tmp_path).returncode == 0
    assert sg("check", "--no-secrets", "p.yaml", cwd=tmp_path).returncode == 0


# --------------------------------------------------------------------------- check and run


BAD = """\
version: 1
vendors:
  stripe: {secret: env:NOPE_STRIPE}
  openai: {secret: file:/nonexistent/openai-key}
  twilio: {secret: env:NOPE_TWILIO}
policies:
  a:
    vendors:
      stripe: {allow: ["FOO /v1/x"]}
      anthropic: {allow: ["POST /v1/messages"]}
"""


def test_check_reports_every_problem_at_once_with_lines(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(BAD)
    out = sg("check", "p.yaml", cwd=tmp_path)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.splitlines() == [  # the secrets too, in the same pass, in file order
        "p.yaml:3: vendors.stripe.secret: environment variable NOPE_STRIPE is not set",
        "p.yaml:4: vendors.openai.secret: cannot read /nonexistent/openai-key: No such file or directory",
        "p.yaml:5: vendors.twilio.account_sid: twilio needs account_sid: env:NAME or file:PATH",
        "p.yaml:5: vendors.twilio.secret: environment variable NOPE_TWILIO is not set",
        "p.yaml:9: policies.a.vendors.stripe.allow[0]: 'FOO' is not an HTTP method or * "
        "(one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS)",
        "p.yaml:10: policies.a.vendors.anthropic: vendor 'anthropic' has no credentials under the top-level vendors:",
    ]
    (tmp_path / "typo.yaml").write_text(BAD.replace("anthropic:", "stripee:"))
    typo = sg("check", "--no-secrets", "typo.yaml", cwd=tmp_path).stderr.splitlines()
    assert typo[-1].startswith("typo.yaml:10: policies.a.vendors.stripee: unknown vendor 'stripee' "
                               "(did you mean 'stripe'?): known: anthropic,"), typo
    assert not any("NOPE_" in line for line in typo), "--no-secrets reads no secret"
    fixed = BAD.replace("FOO", "POST").replace("      anthropic: {allow: [\"POST /v1/messages\"]}\n", "")
    (tmp_path / "p.yaml").write_text(fixed.replace("  twilio: {secret: env:NOPE_TWILIO}\n", ""))
    out = sg("check", "p.yaml", cwd=tmp_path)
    assert out.stderr.splitlines() == [
        "p.yaml:3: vendors.stripe.secret: environment variable NOPE_STRIPE is not set",
        "p.yaml:4: vendors.openai.secret: cannot read /nonexistent/openai-key: No such file or directory",
    ]
    assert sg("check", "--no-secrets", "p.yaml", cwd=tmp_path).returncode == 0


def test_run_refuses_before_listening_with_one_clean_message(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(BAD.replace("FOO", "POST").replace(
        "      anthropic: {allow: [\"POST /v1/messages\"]}\n", "").replace("  twilio: {secret: env:NOPE_TWILIO}\n", ""))
    out = sg("run", "--config", "p.yaml", "--port", "0", cwd=tmp_path)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout and "listening" not in out.stderr + out.stdout
    assert out.stderr.startswith("Error: p.yaml cannot be used:\np.yaml:3: vendors.stripe.secret:")
    assert out.stderr.count("NOPE_STRIPE") == 1 and "openai-key" in out.stderr
    assert not (tmp_path / "data").exists(), "nothing was created"


def test_run_names_a_busy_port(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\negress: {default: deny}\n")
    with socket.socket() as s, socket.socket() as w:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = sg("run", "--config", "p.yaml", "--port", str(port), cwd=tmp_path)
        w.bind(("127.0.0.1", 0))
        w.listen()
        web = sg("run", "--config", "p.yaml", "--port", str(free_port()), "--web", "--web-port",
                 str(w.getsockname()[1]), cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (f"Error: port {port} on 127.0.0.1 is in use (another gateway or proxy?): "
                                  "the proxy cannot start (choose another with --port)")
    assert web.returncode == 1 and "mitmweb cannot start (choose another with --web-port)" in web.stderr


def test_run_names_an_address_it_cannot_listen_on(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\n")
    out = sg("run", "--config", "p.yaml", "--host", "192.0.2.1", "--port", str(free_port()), cwd=tmp_path)
    assert out.returncode == 1 and "in use" not in out.stderr
    assert "cannot listen on 192.0.2.1:" in out.stderr and "Cannot assign requested address" in out.stderr


# --------------------------------------------------------------------------- what is missing, said plainly


@pytest.mark.parametrize("args", [("keys", "issue", "--policy", "x"), ("check",), ("run",), ("replay", "cap/"),
                                  ("reconcile",)])  # fmt: skip
def test_commands_needing_a_policy_say_how_to_point_at_one(tmp_path: Path, args: tuple[str, ...]) -> None:
    out = sg(*args, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"Error: no policy file at {tmp_path}/policies/spendgate.yaml (the default under "
                                 f"$SPENDGATE_HOME, {tmp_path}): pass --config FILE")
    assert "SPENDGATE_CONFIG" in out.stderr and "spendgate init" in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing was created"


@pytest.mark.parametrize("args", [("report",), ("keys", "list"), ("keys", "show", "key_x"), ("keys", "revoke", "key_x"),
                                  ("approvals", "list"), ("approvals", "approve", "apr_x"), ("approvals", "deny", "apr_x"),
                                  ("approve", "apr_x"), ("deny", "apr_x"), ("prices", "check"),
                                  ("migrate", "--to", "postgresql://nobody@127.0.0.1:1/x")])  # fmt: skip
def test_ledger_readers_never_create_an_empty_ledger(tmp_path: Path, args: tuple[str, ...]) -> None:
    out = sg(*args, cwd=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"Error: no ledger at {tmp_path}/data/spendgate.db (the default under "
                                 f"$SPENDGATE_HOME, {tmp_path}): pass --{'from' if args[0] == 'migrate' else 'db'} FILE")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing was created"
    given = sg(*args, "--from" if args[0] == "migrate" else "--db", "elsewhere.db", cwd=tmp_path)
    assert given.returncode == 1 and f"no ledger at {tmp_path}/elsewhere.db:" in given.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_reconcile_with_a_policy_and_no_ledger_names_the_ledger(tmp_path: Path) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "spendgate.yaml").write_text("version: 1\negress: {default: deny}\n")
    out = sg("reconcile", cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.startswith(f"Error: no ledger at {tmp_path}/data/spendgate.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policies"]


@pytest.mark.parametrize("token, ok", [
    ("vk_" + "A" * 43, True), ("vk_" + "a-_9" * 8, True), ("", False), ("vk_short", False),
    ("sk_live_" + "a" * 43, False), ("vk_" + "a" * 42 + "!", False), ("vk_" + "a" * 20 + " " + "a" * 20, False),
])  # fmt: skip
def test_keys_hash_rejects_malformed_tokens(tmp_path: Path, token: str, ok: bool) -> None:
    out = sg("keys", "hash", cwd=tmp_path, stdin=token + "\n")
    assert (out.returncode == 0) is ok, out.stderr
    if ok:
        assert len(out.stdout.strip()) == 64
    else:
        assert "not a vault key" in out.stderr and out.stdout == ""


def test_env_prints_absolute_paths(tmp_path: Path) -> None:
    out = sg("env", cwd=tmp_path, env={"SPENDGATE_HOME": "rel/home"})  # even from a relative home
    lines = dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines()
                 if line.startswith("export "))  # fmt: skip
    assert lines["SSL_CERT_FILE"] == str(tmp_path / "rel" / "home" / "certs" / "mitmproxy-ca-cert.pem")
    assert lines["HTTPS_PROXY"] == "http://127.0.0.1:8080"
    assert "no CA at" in out.stderr and "spendgate ca" in out.stderr  # not created yet: said, on stderr
    comments = [ln for ln in out.stdout.splitlines() if ln.startswith("#")]
    assert len(comments) == 4 and all(f" {tmp_path}/rel/home" in ln for ln in comments), comments


def test_every_command_has_help() -> None:
    def walk(cmd: click.Command, path: str) -> list[tuple[str, click.Command]]:
        out = [(path, cmd)]
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                out += walk(sub, f"{path} {name}")
        return out

    commands = walk(main, "spendgate")
    assert {"spendgate approvals approve", "spendgate approvals deny", "spendgate init"} <= {p for p, _ in commands}
    missing = [p for p, c in commands if not (c.help or "").strip()]
    assert missing == []
    undocumented = [f"{p} {o.opts[0]}" for p, c in commands for o in c.params
                    if isinstance(o, click.Option) and not o.help and o.opts[0] not in ("--version",)]
    assert undocumented == []


def test_fakes_env_covers_the_demo_policy() -> None:
    out = subprocess.run([sys.executable, "-m", "fakes", "--env"], cwd=ROOT, capture_output=True, text=True,
                         check=True)  # fmt: skip
    exported = {ln.split()[1].split("=")[0] for ln in out.stdout.splitlines() if ln.startswith("export ")}
    demo = yaml.safe_load((ROOT / "policies" / "demo.yaml").read_text())
    refs = {v.split(":", 1)[1] for vc in demo["vendors"].values() for v in vc.values()
            if isinstance(v, str) and v.startswith("env:")}
    assert "STRIPE_SECRET_KEY" in refs
    assert refs <= exported
    assert "FAKE" in out.stdout.splitlines()[0]


def test_run_log_format_json_prints_only_json_lines_line_buffered(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\nvendors:\n  stripe: {secret: env:SK}\npolicies:\n  a:\n"
                                      "    vendors:\n      stripe: {allow: [\"GET /v1/x\"]}\negress: {default: deny}\n")
    port = free_port()
    log = tmp_path / "gw.log"
    proc = subprocess.Popen([str(BIN / "spendgate"), "run", "--log-format", "json", "--config", "p.yaml",
                             "--port", str(port)],
                            cwd=tmp_path, env={**CLEAN_ENV, "SK": "x", "SPENDGATE_HOME": str(tmp_path)}, stdout=log.open("w"),
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "proxy listening" not in log.read_text():  # in the file while the gateway runs
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        with httpx.Client(proxy=f"http://127.0.0.1:{port}") as c:
            assert c.get("http://blocked.example/").status_code == 403
        while "spendgate.decision" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line is JSON
    decision = next(x for x in lines if x.get("event") == "spendgate.decision")
    assert (decision["decision"], decision["reason"]) == ("deny", "egress_denied")
    assert any("proxy listening" in x.get("message", "") for x in lines)


def test_run_log_format_json_keeps_mitmproxys_own_start_up_errors_json(tmp_path: Path) -> None:
    """mitmproxy's lines printed before the spendgate addon loads (here: a second listener on a
    busy port, which spendgate's own check does not cover) are JSON too; its exit notice goes to
    stderr."""
    (tmp_path / "p.yaml").write_text("version: 1\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        out = sg("run", "--log-format", "json", "--config", "p.yaml", "--port", str(free_port()),
                 "--mode", f"regular@{busy}", cwd=tmp_path)
    assert out.returncode == 1
    lines = [json.loads(line) for line in out.stdout.splitlines()]  # every stdout line is JSON
    assert any(f"failed to listen on 127.0.0.1:{busy}" in x["message"] and x["level"] == "error" for x in lines), \
        out.stdout
    assert "Error logged during startup" in out.stderr


@pytest.mark.parametrize("token, starts", [("a" * 31, False), ("a" * 32, True)])
def test_an_admin_token_shorter_than_32_characters_is_refused(tmp_path: Path, token: str, starts: bool) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\n")
    admin, log = free_port(), tmp_path / "gw.log"
    proc = subprocess.Popen([str(BIN / "spendgate"), "run", "--config", "p.yaml", "--port", str(free_port()),
                             "--admin-port", str(admin)], cwd=tmp_path, env={**CLEAN_ENV, "SPENDGATE_ADMIN_TOKEN": token,
                                                                                  "SPENDGATE_HOME": str(tmp_path)},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    try:  # until it says so or exits (a loaded machine may take a while to start mitmproxy)
        deadline = time.monotonic() + 60
        while proc.poll() is None and "admin API listening" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
    out = log.read_text()
    assert token not in out
    if starts:
        assert "admin API listening" in out, out
    else:
        assert proc.returncode == 1 and "--admin-port needs an admin token of at least 32 characters in " \
            "SPENDGATE_ADMIN_TOKEN (it has 31 characters;" in out, out
        assert "listening" not in out, "refused before anything listens"


def test_admin_port_without_a_token_is_refused_before_listening(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\negress: {default: deny}\n")
    out = sg("run", "--config", "p.yaml", "--port", str(free_port()), "--admin-port", str(free_port()), cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.startswith("Error: --admin-port needs an admin token")
    assert "it is not set" in out.stderr and "listening" not in out.stdout + out.stderr


def test_check_and_run_warn_when_a_policy_leaves_egress_open(tmp_path: Path) -> None:
    (tmp_path / "open.yaml").write_text("version: 1\n")
    (tmp_path / "chosen.yaml").write_text("version: 1\negress: {default: allow}\n")
    out = sg("check", "open.yaml", cwd=tmp_path)
    assert out.returncode == 0 and out.stderr.startswith("open.yaml: warning: no egress: section")
    assert "open forward proxy" in out.stderr and "egress: {default: deny" in out.stderr
    assert sg("check", "chosen.yaml", cwd=tmp_path).stderr == ""  # said explicitly: the user's choice
    assert sg("check", "--no-secrets", str(ROOT / "policies" / "example.yaml"), cwd=tmp_path).stderr == ""
    with socket.socket() as s:  # run says it too (here before refusing a busy port)
        s.bind(("127.0.0.1", 0))
        s.listen()
        run = sg("run", "--config", "open.yaml", "--port", str(s.getsockname()[1]), cwd=tmp_path)
    assert run.returncode == 1 and run.stderr.startswith("open.yaml: warning: no egress: section")


def test_run_web_into_a_file_shows_the_login_url_while_it_runs(tmp_path: Path) -> None:
    """`spendgate run --web > gw.log`: mitmweb's login URL (with its token) is in the file at once,
    not when the process exits (stdout is line-buffered when it is not a terminal)."""
    (tmp_path / "p.yaml").write_text("version: 1\negress: {default: deny}\n")
    web, log = free_port(), tmp_path / "gw.log"
    proc = subprocess.Popen([str(BIN / "spendgate"), "run", "--config", "p.yaml", "--port", str(free_port()),
                             "--web", "--web-port", str(web)], cwd=tmp_path, env={**CLEAN_ENV, "SPENDGATE_HOME": str(tmp_path)},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while f"http://127.0.0.1:{web}/?token=" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        token = log.read_text().split(f"http://127.0.0.1:{web}/?token=", 1)[1].split()[0]
        assert httpx.get(f"http://127.0.0.1:{web}/flows", params={"token": token}).status_code == 200
    finally:
        proc.terminate()
        proc.wait(10)
