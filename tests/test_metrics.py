"""/metrics: Prometheus text format 0.0.4, and counters that follow the traffic and the ledger.

A small strict parser of the exposition format stands in for Prometheus; the gateway
here takes its admin token from a file (``file:``), which test_admin_api.py does not.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from harness import Gateway, free_port, start_gateway

from fakes import FakeVendors
from spendgate.admin import Admin
from spendgate.call import Call
from spendgate.metrics import CONTENT_TYPE, Metrics, decimal_str
from spendgate.runtime import Runtime

# --------------------------------------------------------------------------- a strict parser

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"^({NAME})(?:\{{(.*)\}})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
VALUE = re.compile(r"^-?(?:[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?|\+Inf|-Inf|NaN)$")

Labels = frozenset[tuple[str, str]]


@dataclass
class Family:
    name: str
    type: str
    help: str = ""
    samples: dict[tuple[str, Labels], Decimal] = field(default_factory=dict)


def parse_labels(text: str) -> Labels:
    labels, pos = [], 0
    while pos < len(text):
        m = LABEL.match(text, pos)
        assert m, f"bad labels at {text[pos:]!r}"
        labels.append((m.group(1), m.group(2).replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")))
        pos = m.end()
        if pos < len(text):
            assert text[pos] == ",", f"expected ',' in {text!r}"
            pos += 1
    names = [n for n, _ in labels]
    assert len(names) == len(set(names)), f"duplicate label in {text!r}"
    return frozenset(labels)


def parse(text: str) -> dict[str, Family]:
    """Parse the text format; assert every rule a scraper would hold it to."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families: dict[str, Family] = {}
    current: Family | None = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"{name} declared twice"
            current = families[name] = Family(name, "", help_text)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert current is not None and current.name == name and not current.type, line
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            current.type = kind
        elif line.startswith("#"):
            continue
        else:
            m = SAMPLE.match(line)
            assert m and current is not None and current.type, f"bad sample line {line!r}"
            name, labels, value = m.group(1), parse_labels(m.group(2) or ""), m.group(3)
            suffixes = ("_bucket", "_sum", "_count") if current.type == "histogram" else ("",)
            assert name in {current.name + s for s in suffixes}, f"{name} outside its family {current.name}"
            assert VALUE.match(value), f"bad value {value!r}"
            key = (name, labels)
            assert key not in current.samples, f"duplicate series {line!r}"
            current.samples[key] = Decimal(value) if "Inf" not in value else Decimal("Infinity")
    for fam in families.values():
        if fam.type == "counter":
            assert fam.name.endswith("_total") and all(v >= 0 for v in fam.samples.values())
        if fam.type == "histogram":
            check_histogram(fam)
    return families


def check_histogram(fam: Family) -> None:
    series: dict[Labels, list[tuple[Decimal, Decimal]]] = {}
    for (name, labels), value in fam.samples.items():
        if name.endswith("_bucket"):
            le = dict(labels)["le"]
            rest = frozenset(x for x in labels if x[0] != "le")
            series.setdefault(rest, []).append((Decimal("Infinity") if le == "+Inf" else Decimal(le), value))
    for labels, buckets in series.items():
        counts = [c for _, c in sorted(buckets)]
        assert counts == sorted(counts), f"{fam.name}{dict(labels)}: buckets not cumulative"
        assert max(b for b, _ in buckets) == Decimal("Infinity")
        assert counts[-1] == fam.samples[(fam.name + "_count", labels)]
        assert (fam.name + "_sum", labels) in fam.samples


def values(fam: Family, sample: str | None = None) -> dict[tuple[tuple[str, str], ...], Decimal]:
    """{sorted labels: value} of one sample name (default: the family's own)."""
    name = sample or fam.name
    return {tuple(sorted(labels)): v for (n, labels), v in fam.samples.items() if n == name}


def delta(before: dict, after: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


# --------------------------------------------------------------------------- the gateway


@dataclass
class Env:
    gw: Gateway
    admin: str
    token_file: Path

    def scrape(self) -> dict[str, Family]:
        r = httpx.get(f"{self.admin}/metrics", trust_env=False, timeout=10)  # no token: loopback
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == CONTENT_TYPE
        return parse(r.text)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, fakes: FakeVendors, certs: Path) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("metrics")
    token_file = tmp / "admin-token"
    token_file.write_text("first-token-000000000000000000000000\n")
    port = free_port()
    gw = start_gateway(tmp, fakes, certs, extra=(
        "--set", f"spendgate_admin_listen=127.0.0.1:{port}",
        "--set", f"spendgate_admin_token=file:{token_file}",
    ))
    try:
        deadline = time.monotonic() + 10
        while "admin API listening" not in gw.log.read_text():
            assert time.monotonic() < deadline, gw.log.read_text()
            time.sleep(0.05)
        yield Env(gw, f"http://127.0.0.1:{port}", token_file)
    finally:
        gw.stop()


def test_metrics_is_prometheus_text(env: Env) -> None:
    families = env.scrape()
    assert {name: f.type for name, f in families.items()} == {
        "spendgate_requests_total": "counter",
        "spendgate_spend_usd_total": "counter",
        "spendgate_added_latency_seconds": "histogram",
        "spendgate_approval_wait_seconds": "histogram",
        "spendgate_ledger_queue_depth": "gauge",
        "spendgate_circuit_open": "gauge",
        "spendgate_reconciled_calls_total": "counter",
        "spendgate_estimate_drift_usd": "gauge",
        "spendgate_store_up": "gauge",
        "spendgate_store_outages_total": "counter",
    }
    assert all(f.help for f in families.values())
    (depth,) = values(families["spendgate_ledger_queue_depth"]).values()
    assert depth >= 0 and depth == int(depth)
    assert list(values(families["spendgate_store_up"]).values()) == [1]
    assert list(values(families["spendgate_store_outages_total"]).values()) == [0]


def _connect(gw: Gateway, target: str) -> str:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return s.recv(4096).decode()


def test_counters_move_with_traffic_and_match_the_ledger(env: Env) -> None:
    gw = env.gw
    _, llm = gw.issue("llm")
    _, billing = gw.issue("billing")
    rows_before = len(gw.calls())
    before = env.scrape()

    with gw.client() as c:
        r = c.post("https://api.openai.com/v1/chat/completions", headers={"X-Vault-Key": llm},
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]})
        assert r.status_code == 200, r.text
        r = c.post("https://api.stripe.com/v1/payment_intents", headers={"X-Vault-Key": billing},
                   data={"amount": "2000", "currency": "usd"})
        assert r.status_code == 200, r.text
        r = c.post("https://api.stripe.com/v1/payment_intents", headers={"X-Vault-Key": "vk_" + "x" * 43},
                   data={"amount": "2000", "currency": "usd"})
        assert r.status_code == 401
    assert _connect(gw, "blocked.example:443").startswith("HTTP/1.1 403")

    after = env.scrape()  # rows are observed before the agent gets its answer: no waiting
    requests = delta(values(before["spendgate_requests_total"]), values(after["spendgate_requests_total"]))
    assert requests == {
        (("decision", "allow"), ("reason", "none"), ("vendor", "openai")): 1,
        (("decision", "allow"), ("reason", "none"), ("vendor", "stripe")): 1,
        (("decision", "deny"), ("reason", "unknown_key"), ("vendor", "stripe")): 1,
        (("decision", "deny"), ("reason", "egress_denied"), ("vendor", "other")): 1,
    }

    # Spend moves by exactly what the ledger holds, by the report's rule.
    rows = gw.calls(at_least=rows_before + 4)[rows_before:]
    assert len(rows) == 4
    expected: dict[tuple, Decimal] = {}
    for row in rows:
        nanos = row["cost_nanos"] if row["cost_nanos"] is not None else (row["estimated_nanos"] or 0)
        if row["decision"] != "deny" and nanos > 0:
            kind = "parsed" if row["cost_status"] == "parsed" else "estimated"
            key = (("kind", kind), ("policy", row["policy"]), ("vendor", row["vendor"]))
            expected[key] = expected.get(key, Decimal(0)) + Decimal(nanos).scaleb(-9)
    spend = delta(values(before["spendgate_spend_usd_total"]), values(after["spendgate_spend_usd_total"]))
    assert spend == expected
    openai = (("kind", "parsed"), ("policy", "llm"), ("vendor", "openai"))
    assert spend[openai] > 0 and spend[openai] == sum(
        (Decimal(r["cost_usd"]) for r in rows if r["vendor"] == "openai"), Decimal(0))

    hist_b, hist_a = before.get("spendgate_added_latency_seconds"), after["spendgate_added_latency_seconds"]
    counts = delta(values(hist_b, "spendgate_added_latency_seconds_count") if hist_b else {},
                   values(hist_a, "spendgate_added_latency_seconds_count"))
    assert counts == {(("decision", "allow"),): 2, (("decision", "deny"),): 2}
    sums = delta(values(hist_b, "spendgate_added_latency_seconds_sum") if hist_b else {},
                 values(hist_a, "spendgate_added_latency_seconds_sum"))
    ledger_seconds = sum(Decimal(str(r["latency_ms"])) for r in rows) / 1000
    assert abs(sum(sums.values()) - ledger_seconds) < Decimal("0.00001")


def test_admin_token_file_is_read_on_every_request(env: Env) -> None:
    def status(token: str) -> int:
        return httpx.get(f"{env.admin}/v1/keys", headers={"Authorization": f"Bearer {token}"},
                         trust_env=False).status_code

    assert status("first-token-000000000000000000000000") == 200
    env.token_file.write_text("second-token-000000000000000000000000\n")  # rotated: no restart
    try:
        assert (status("first-token-000000000000000000000000"), status("second-token-000000000000000000000000")) == (401, 200)
    finally:
        env.token_file.write_text("first-token-000000000000000000000000\n")
    log = env.gw.log.read_text()
    assert "first-token-000000000000000000000000" not in log and "second-token-000000000000000000000000" not in log


# --------------------------------------------------------------------------- /metrics off loopback


def test_metrics_needs_the_token_when_not_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDGATE_ADMIN_TOKEN", "tok-metrics-000000000000000000000000")
    port = free_port()

    async def main() -> None:
        runtime = Runtime()
        admin = Admin(runtime, Metrics(runtime))
        admin.listen = ("0.0.0.0", port)  # as configured; the test itself binds loopback only
        assert not admin.metrics_open
        server = admin.app().listen(port, "127.0.0.1")
        try:
            async with httpx.AsyncClient(trust_env=False) as c:
                r = await c.get(f"http://127.0.0.1:{port}/metrics")
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
                r = await c.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer tok-metrics-000000000000000000000000"})
                assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE
                parse(r.text)
        finally:
            server.stop()
        admin.listen = ("127.0.0.1", port)
        assert admin.metrics_open

    asyncio.run(main())


# --------------------------------------------------------------------------- Metrics (unit)


def _row(**kw: object) -> dict:
    return {"vendor": "openai", "policy": "llm", "decision": "allow", "reason": None, "cost_nanos": None,
            "estimated_nanos": 0, "cost_status": None, "latency_ms": 1.0, **kw}


def test_spend_is_exact_integer_nanos() -> None:
    m = Metrics(Runtime())
    for _ in range(10):
        m.observe(_row(cost_nanos=100_000_000, cost_status="parsed"))  # $0.10: as floats, 0.9999999999999999
    for _ in range(3):
        m.observe(_row(cost_nanos=1, cost_status="estimated"))
    m.observe(_row(cost_nanos=None, cost_status="unknown", estimated_nanos=285))  # the report's rule
    m.observe(_row(decision="deny", reason="cap_exhausted", cost_status="zero", estimated_nanos=5 * 10**9))
    m.observe(_row(cost_nanos=-7, cost_status="parsed"))  # a counter never goes down
    spend = values(parse(m.render())["spendgate_spend_usd_total"])
    assert spend == {
        (("kind", "parsed"), ("policy", "llm"), ("vendor", "openai")): Decimal("1"),
        (("kind", "estimated"), ("policy", "llm"), ("vendor", "openai")): Decimal("0.000000288"),
    }
    assert "E-" not in m.render()


def test_requests_labels_are_escaped_and_defaulted() -> None:
    m = Metrics(Runtime())
    m.observe(_row(vendor=None, policy=None, decision="deny", reason='odd "reason"\\\n'))
    m.observe(_row(reason=None))
    fam = parse(m.render())["spendgate_requests_total"]
    assert values(fam) == {
        (("decision", "deny"), ("reason", 'odd "reason"\\\n'), ("vendor", "other")): 1,
        (("decision", "allow"), ("reason", "none"), ("vendor", "openai")): 1,
    }


def test_latency_buckets_are_inclusive_upper_bounds() -> None:
    m = Metrics(Runtime())
    for ms in (0.5, 1.0, 1.001, 70_000.0):
        m.observe(_row(latency_ms=ms))
    hist = parse(m.render())["spendgate_added_latency_seconds"]
    buckets = {dict(k)["le"]: v for k, v in values(hist, "spendgate_added_latency_seconds_bucket").items()}
    assert (buckets["0.0005"], buckets["0.001"], buckets["0.0025"], buckets["60"], buckets["+Inf"]) == (1, 2, 3, 3, 4)
    assert values(hist, "spendgate_added_latency_seconds_sum") == {(("decision", "allow"),): Decimal("70.002501")}


def test_no_store_no_queue_gauge() -> None:
    assert "spendgate_ledger_queue_depth" not in parse(Metrics(Runtime()).render())


def test_decimal_str() -> None:
    assert [decimal_str(n, 9) for n in (0, 1, 10**9, 1_500_000_000, -25, 285)] == [
        "0", "0.000000001", "1", "1.5", "-0.000000025", "0.000000285"]
    assert decimal_str(2_500_123, 6) == "2.500123"


def test_time_held_for_a_human_is_reported_apart_from_the_latency() -> None:
    m = Metrics(Runtime())
    held = Call(vendor="stripe")
    held.held_seconds = 4.9
    m.observe(_row(latency_ms=5000.0), held)  # 4.9 s waiting for a human, 0.1 s the gateway's own
    m.observe(_row(latency_ms=2.0), Call(vendor="stripe"))  # never held
    fams = parse(m.render())
    added = fams["spendgate_added_latency_seconds"]
    assert values(added, "spendgate_added_latency_seconds_sum") == {(("decision", "allow"),): Decimal("0.102")}
    wait = fams["spendgate_approval_wait_seconds"]
    assert values(wait, "spendgate_approval_wait_seconds_count") == {(): 1}
    assert values(wait, "spendgate_approval_wait_seconds_sum") == {(): Decimal("4.9")}
    buckets = {dict(k)["le"]: v for k, v in values(wait, "spendgate_approval_wait_seconds_bucket").items()}
    assert (buckets["2.5"], buckets["5"], buckets["+Inf"]) == (0, 1, 1)
