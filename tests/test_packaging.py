"""What ships: the wheel a user installs holds spendgate and its price tables, never the test-side
offline fake vendors (``./fakes``), which tests, the demo and ``python -m fakes`` import from a
checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_contains_no_fake(tmp_path: Path) -> None:
    # Build from a copy: setuptools reuses a checkout's build/ directory, whose leftovers would
    # make the answer depend on what was built there before.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "data", "certs", "*.egg-info", "__pycache__", ".*_cache", "tests"))  # fmt: skip
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check", "-w", str(out), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = out.glob("spendgate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "spendgate/gateway.py" in names and "spendgate/vendors/stripe.py" in names  # a real wheel
    assert "spendgate/prices/stripe.yaml" in names
    fakes = [n for n in names if "fake" in n.lower()]
    assert fakes == [], f"fake vendors shipped in the wheel: {fakes}"
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"spendgate", wheel.name.removesuffix("-py3-none-any.whl") + ".dist-info"}


def test_fakes_start_with_python_m_from_a_checkout() -> None:
    out = subprocess.run([sys.executable, "-m", "fakes", "--help"], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)  # fmt: skip
    assert out.stdout.startswith("usage: python -m fakes")
