"""The fleet deployment example (``docker-compose.fleet.yml``, ``docker/fleet/``) is coherent: three
replicas on one PostgreSQL and one CA, a TCP load balancer that names each of them, health checks,
and a CA created once when the replicas start together. Docker itself need not run here; HAProxy's
own check runs when ``haproxy`` is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import ROOT

COMPOSE = ROOT / "docker-compose.fleet.yml"
HAPROXY = ROOT / "docker" / "fleet" / "haproxy.cfg"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_three_replicas_share_one_database_one_ca_and_one_policy() -> None:
    services = compose()["services"]
    gateways = {name: s for name, s in services.items() if name.startswith("gateway-")}
    assert len(gateways) == 3
    assert len({s["hostname"] for s in gateways.values()}) == 3  # the replica names (--replica defaults to it)
    dbs = {s["environment"]["SPENDGATE_DB"] for s in gateways.values()}
    assert len(dbs) == 1 and next(iter(dbs)).startswith("postgresql://") and "@postgres:" in next(iter(dbs))
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "SPENDGATE_HOME=/app" in dockerfile  # so /app/certs is every replica's CA directory
    for s in gateways.values():
        assert "certs:/app/certs" in s["volumes"] and any(v.startswith("./policies:") for v in s["volumes"])
        assert s["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert s["healthcheck"]["test"] and "run" in s["command"]
    assert services["postgres"]["image"].startswith("postgres:") and services["postgres"]["healthcheck"]
    # room for every replica's connections (~42 each under load: README "Fleet", Connections)
    command = services["postgres"]["command"]
    max_connections = int(next(a for a in command if a.startswith("max_connections=")).split("=")[1])
    assert max_connections >= 45 * len(gateways) + 20, max_connections


def test_the_load_balancer_is_tcp_and_names_every_replica() -> None:
    services = compose()["services"]
    lb = services["lb"]
    assert any("haproxy.cfg" in v for v in lb["volumes"]) and lb["ports"] == ["8080:8080"]
    cfg = HAPROXY.read_text()
    assert "mode tcp" in cfg and "mode http" not in cfg
    backends = {line.split()[2] for line in cfg.splitlines() if line.strip().startswith("server ")}
    assert backends == {f"{name}:8080" for name in services if name.startswith("gateway-")}
    assert set(lb["depends_on"]) == {name for name in services if name.startswith("gateway-")}


def test_haproxy_accepts_the_configuration(tmp_path: Path) -> None:
    if not shutil.which("haproxy"):
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    # the replicas' names do not resolve here, as when one of them is not up yet: still valid
    out = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


RACE = """
import sys
from pathlib import Path
from mitmproxy.certs import CertStore
from spendgate.cli import ensure_ca
ensure_ca(Path(sys.argv[1]))
print(CertStore.from_store(sys.argv[1], "mitmproxy", 2048).default_ca.fingerprint().hex())
"""


def test_replicas_starting_together_on_one_certs_volume_get_one_ca(tmp_path: Path) -> None:
    """`spendgate run` and the image's entrypoint (`spendgate ca`) create the CA under a lock."""
    for round_ in range(3):
        where = tmp_path / f"certs{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", RACE, str(where)], stdout=subprocess.PIPE, text=True)
                 for _ in range(3)]
        seen = {p.communicate(timeout=60)[0].strip() for p in procs}
        assert len(seen) == 1 and all(seen), f"round {round_}: {len(seen)} different CAs"
