"""Issue 12 item 13 end to end: a request held for a human adds its wait to
``spendgate_approval_wait_seconds``, not to the gateway's own latency
(``spendgate_added_latency_seconds``), as a real gateway's /metrics reports them."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
from harness import free_port, in_background, start_gateway

from fakes import FakeVendors

TOKEN = "metrics-e2e-admin-token-0123456789abcdef"


def sample(text: str, name: str) -> float:
    """The value of one unlabelled or single-series sample (summed over its label sets)."""
    found = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert found, f"no {name} in /metrics"
    return sum(found)


def test_a_human_wait_is_reported_apart_from_the_gateway_latency(tmp_path: Path, fakes: FakeVendors,
                                                                  certs: Path) -> None:
    admin = free_port()
    gw = start_gateway(tmp_path, fakes, certs, extra=("--set", f"spendgate_admin_listen=127.0.0.1:{admin}"),
                       env={"SPENDGATE_ADMIN_TOKEN": TOKEN})  # fmt: skip
    try:
        _, key = gw.issue("held")  # approve: POST /v1/transfers, approval_timeout 60s

        def transfer() -> httpx.Response:
            with gw.client() as c:
                return c.post("https://api.stripe.com/v1/transfers", headers={"X-Vault-Key": key},
                              data={"amount": "700", "currency": "usd", "destination": "acct_m"})  # fmt: skip

        thread, out = in_background(transfer)
        deadline = time.monotonic() + 20
        while not (pending := json.loads(gw.cli("approvals", "list", "--json").stdout)):
            assert time.monotonic() < deadline, "the transfer was not held"
            time.sleep(0.05)
        time.sleep(1.5)  # the human takes their time
        gw.cli("approvals", "approve", pending[0]["id"])
        thread.join(15)
        assert out["result"].status_code == 200, out
        metrics = ""
        for _ in range(50):  # the row (and its observation) is written behind the answer
            metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", headers={"Authorization": f"Bearer {TOKEN}"},
                                trust_env=False).text  # fmt: skip
            if "spendgate_approval_wait_seconds_count 1" in metrics:
                break
            time.sleep(0.1)
    finally:
        gw.stop()
    assert sample(metrics, "spendgate_approval_wait_seconds_count") == 1
    assert sample(metrics, "spendgate_approval_wait_seconds_sum") >= 1.5
    assert sample(metrics, "spendgate_added_latency_seconds_count") == 1
    assert sample(metrics, "spendgate_added_latency_seconds_sum") < 1.0, "the human's wait counted as latency"
