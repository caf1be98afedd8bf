"""The README's "Run it", run as written: its three terminal blocks, extracted from README.md (so
this fails when the README drifts), in a fresh copy of the repository (tracked files only: no
.venv, no certs, no ledger), with the fake secrets and the offline fakes the README starts.

The copy's ``.venv`` is made like ``./scripts/demo`` makes it, except that the dependencies come
from this test run's environment (a ``.pth`` line) instead of a download: spendgate itself is
installed editable from the copy, and ``scripts/_bootstrap.sh`` creates the CA there. Timings of
each terminal are printed (``pytest -s``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHELL_ENV_DROP = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "NO_PROXY",
                  "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "VIRTUAL_ENV", "PYTHONPATH")  # fmt: skip


def run_it_blocks(readme: str) -> list[str]:
    """The ```sh blocks of the "Run it" section that start with "# Terminal N"."""
    section = readme.split("\n## Run it\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    terminals = [b for b in blocks if b.startswith("# Terminal ")]
    assert [b.split(":", 1)[0] for b in terminals] == ["# Terminal 1", "# Terminal 2", "# Terminal 3"]
    return terminals


def test_the_readme_agent_is_examples_agent_py() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## An agent, in ten lines\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert code == (ROOT / "examples" / "agent.py").read_text()


def fresh_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def make_venv(repo: Path) -> None:
    """.venv with this run's packages underneath and spendgate installed editable from ``repo``."""
    subprocess.run([sys.executable, "-m", "venv", str(repo / ".venv")], check=True)
    py = repo / ".venv" / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    Path(site, "_spendgate_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-e", str(repo)] if _has_setuptools(py) else
                   [str(py), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", "-e", str(repo)],
                   check=True, capture_output=True)  # fmt: skip
    for tool in ("mitmdump", "mitmweb"):  # console scripts of the dependencies, as pip would write them
        script = repo / ".venv" / "bin" / tool
        script.write_text(f"#!{py}\nimport sys\nfrom mitmproxy.tools.main import {tool}\nsys.exit({tool}())\n")
        script.chmod(0o755)
    (repo / ".venv" / ".spendgate-installed-demo").touch()  # what _bootstrap.sh checks
    subprocess.run(["bash", "-c", "source scripts/_bootstrap.sh demo"], cwd=repo, check=True, capture_output=True,
                   env=user_env())  # fmt: skip
    assert (repo / "certs" / "mitmproxy-ca-cert.pem").exists()


def user_env() -> dict[str, str]:
    """A new user's shell: no spendgate or proxy variables (the home is the clone)."""
    return {k: v for k, v in os.environ.items() if k not in SHELL_ENV_DROP and not k.startswith("SPENDGATE_")}


def _has_setuptools(py: Path) -> bool:
    return subprocess.run([str(py), "-c", "import setuptools"], capture_output=True).returncode == 0


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if text in log.read_text():
            return time.monotonic() - start
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {text!r}:\n{log.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} after {timeout} s:\n{log.read_text()}")


def test_run_it_from_a_fresh_copy(tmp_path: Path) -> None:
    t0 = time.monotonic()
    repo = tmp_path / "spendgate"
    fresh_copy(repo)
    make_venv(repo)
    setup = time.monotonic() - t0
    term1, term2, term3 = run_it_blocks((repo / "README.md").read_text())
    # The README's fixed ports; on a busy machine (another gateway on 8080) the same blocks run on
    # free ports instead, with only the port numbers changed.
    if _busy(9100) or _busy(8080):
        fake, proxy = _free_port(), _free_port()
        demo = repo / "policies" / "demo.yaml"
        demo.write_text(demo.read_text().replace("127.0.0.1:9100", f"127.0.0.1:{fake}"))
        term1 = term1.replace("python -m fakes\n", f"python -m fakes --port {fake}\n")
        term2 = term2.replace("spendgate run --config policies/demo.yaml ",
                              f"spendgate run --port {proxy} --config policies/demo.yaml ")
        term3 = term3.replace('"$(spendgate env)"', f'"$(spendgate env --proxy http://127.0.0.1:{proxy})"')
    env = user_env() | {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(tmp_path)}
    procs: list[subprocess.Popen] = []
    timings: dict[str, float] = {"fresh copy + .venv + CA": setup}
    try:
        for name, block, ready in (("terminal 1", term1, "fake vendors listening"),
                                   ("terminal 2", term2, "proxy listening")):  # fmt: skip
            log = tmp_path / f"{name.replace(' ', '')}.log"
            procs.append(subprocess.Popen(["bash", "-euo", "pipefail", "-c", block], cwd=repo, env=env,
                                          stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True))
            timings[name + " (until ready)"] = _wait_for(log, ready, procs[-1])
        start = time.monotonic()
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", term3], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=180)  # fmt: skip
        timings["terminal 3"] = time.monotonic() - start
        assert out.returncode == 0, f"terminal 3 failed:\n{out.stdout}\n{out.stderr}\n{(tmp_path / 'terminal2.log').read_text()}"
        assert re.search(r"charged and emailed: pi_\w+ succeeded", out.stdout), out.stdout
        report = out.stdout.split("charged and emailed:", 1)[1]
        assert re.search(r"^stripe +1 +1 +0 +0 +20(\.00)? ", report, re.M), report  # the $20, parsed
        assert re.search(r"^resend +1 +1 ", report, re.M), report
        check = (tmp_path / "terminal2.log").read_text()
        assert "policies/demo.yaml: ok" in check and "every secret resolves" in check
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        print("\nREADME walkthrough timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


@pytest.mark.parametrize("text, problem", [
    ("## Run it\n```sh\n# Terminal 1: x\n```\n## Next\n", "three terminals"),
])  # fmt: skip
def test_block_extraction_fails_when_the_readme_loses_a_terminal(text: str, problem: str) -> None:
    with pytest.raises(AssertionError):
        run_it_blocks("intro\n" + text)
