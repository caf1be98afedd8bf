"""Shared fixtures; the harness itself is in ``harness.py``."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import BIN, REAL_CREDENTIALS, Gateway, start_gateway
from inprocess import POLICY
from pg import pg_database, pg_url  # noqa: F401  (fixtures: a throwaway PostgreSQL schema)

from fakes import FakeVendors
from spendgate.pipeline import Pipeline

# --------------------------------------------------------------------------- running in parallel
# ./scripts/test runs the suite on every core (pytest-xdist: ``-n auto --dist loadfile``). Each
# worker is its own session: its own SPENDGATE_HOME, CA, fake vendors and PostgreSQL database; every
# port is a free one. A module's tests all run on one worker, in order, as in a serial run: a
# module-scoped gateway (or fleet) starts once, and a test that reads what the module's earlier
# tests left (a report, the documented responses seen) still finds it.

# The longest modules start first, so that none of them is the last one running while the other
# workers idle. A scheduling hint only (whole modules move, in order; nothing depends on it).
LONG_FIRST = ("test_failures.py", "test_fleet.py", "test_e2e_govern.py", "test_cli_onboarding.py",
              "test_e2e_gateway.py", "test_e2e_spend.py", "test_e2e_operators.py", "test_paths.py",
              "test_readme_walkthrough.py", "test_e2e_replay.py", "test_demo.py", "test_properties.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # only in xdist workers: a serial run keeps its order
        rank = {name: i for i, name in enumerate(LONG_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: modules stay whole


@pytest.fixture(scope="session", autouse=True)
def spendgate_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """SPENDGATE_HOME for the whole run: no test reads or writes the checkout's (the default
    home's) policy, ledger or CA by leaving a path out. Tests that build their own environment
    set their own."""
    home = tmp_path_factory.mktemp("spendgate-home")
    saved = os.environ.get("SPENDGATE_HOME")
    os.environ["SPENDGATE_HOME"] = str(home)
    checkout = Path(__file__).resolve().parents[1]
    guarded = [checkout / "data" / "spendgate.db", checkout / "policies" / "spendgate.yaml"]
    before = {p for p in guarded if p.exists()}
    yield home
    if saved is None:
        os.environ.pop("SPENDGATE_HOME", None)
    else:
        os.environ["SPENDGATE_HOME"] = saved
    created = [str(p) for p in guarded if p.exists() and p not in before]
    assert not created, f"a test wrote the checkout's own files (a subprocess without SPENDGATE_HOME?): {created}"


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA for the whole session (mitmproxy creates it in its confdir)."""
    path = tmp_path_factory.mktemp("certs")
    subprocess.run([str(BIN / "spendgate"), "ca", "--dir", str(path)], check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def fakes() -> Iterator[FakeVendors]:
    server = FakeVendors().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fakes: FakeVendors, certs: Path) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path_factory.mktemp("gw"), fakes, certs)
    yield gw
    gw.stop()


@pytest.fixture
def sdk_env(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    """Configure this process like an agent container: HTTPS_PROXY and the CA, nothing else."""
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, gateway.proxy)
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(name, gateway.ca)
    return gateway


@pytest.fixture
def pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Pipeline]]:
    """A fresh in-process gateway (``spendgate.pipeline``) per call, its own ledger in tmp_path:
    ``pipeline()`` with ``inprocess.POLICY``, or ``pipeline(policy_text, **mitmproxy_options)``."""
    for name, value in REAL_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    made: list[Pipeline] = []

    def make(policy: str = POLICY, **options: object) -> Pipeline:
        path = tmp_path / f"policy-{len(made)}.yaml"
        path.write_text(policy)
        made.append(Pipeline(path, tmp_path / f"ledger-{len(made)}.db", **options))
        return made[-1]

    yield make
    for p in made:
        p.close()
