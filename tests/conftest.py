"""Shared fixtures; the harness itself is in ``harness.py``."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import BIN, Gateway, start_gateway

from fakes import FakeVendors


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
