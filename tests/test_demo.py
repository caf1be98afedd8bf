"""``./scripts/demo`` as a new user reads it (issue 12 item 8): it runs, every refusal reads as one
(✘ with its code and the gateway's own message, not an SDK's "Error code: 403 - {...}" wrapping
nor a message cut mid-word), nothing leaks, and the command it suggests at the end works as
printed."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_the_demo_reads_right(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("HTTPS_PROXY", "https_proxy", "SSL_CERT_FILE")}
    out = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=240, env={**env, "SPENDGATE_DEMO_DIR": str(work),
                                           "PATH": f"{BIN}:{env.get('PATH', '')}"})  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    lines = [ln for ln in text.splitlines() if ln.startswith(("  ✔ ", "  ✘ "))]
    assert len(lines) >= 15, text
    refused: dict[str, str] = {}
    for line in (ln for ln in lines if ln.startswith("  ✘ ")):
        what, sep, rest = line[4:].partition(": refused [")
        assert sep and re.match(r"[a-z_]+\] \S", rest), f"a refusal without its code or message: {line}"
        assert not rest.rstrip().endswith(("…", "...")), f"cut short: {line}"
        refused[what] = "refused [" + rest
    for line in lines:
        assert "Error code:" not in line, f"the SDK's wrapping, not the gateway's message: {line}"
        if line.startswith("  ✔ "):
            assert not re.search(r"\b(missing_vault_key|revoked|endpoint_not_allowed)\b", line), \
                f"a refusal shown as a success: {line}"

    def allowed(what: str) -> str:
        (line,) = [ln for ln in lines if ln.startswith(f"  ✔ {what}: ")]
        return line.removeprefix(f"  ✔ {what}: ")

    assert refused["Stripe with no key at all"].startswith("refused [missing_vault_key] no vault key")
    assert refused["OpenAI with a real key instead of a vault key"].endswith("vault key")
    assert refused["Stripe: charge $20.00 again (revoked key)"].startswith("refused [revoked] vault key key_")
    assert re.search(r"\d+ in / \d+ out tokens", allowed("OpenAI: the same, streamed"))
    assert allowed("Stripe: charge €15.00 (fx)").startswith("succeeded, cost $16.20, budget left $63.80")
    assert "ledger and gateway log checked: clean" in text
    # The suggested command, as printed (in the activated .venv the line above it names).
    (suggested,) = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("spendgate report")]
    args = shlex.split(suggested)
    report = subprocess.run([str(BIN / "spendgate"), *args[1:]], cwd=ROOT, capture_output=True, text=True,
                            env=env)  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert re.search(r"^billing ", report.stdout, re.M) and re.search(r"^support ", report.stdout, re.M)
