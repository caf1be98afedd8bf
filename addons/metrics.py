"""Prometheus metrics, fed by every ledger row and served by the admin listener at ``/metrics``.

Plain Python, no prometheus_client: four families, text exposition format 0.0.4.

- ``spendgate_requests_total{vendor,decision,reason}``: every recorded request.
  ``vendor="other"`` is a non-vendor host (an egress refusal); ``reason="none"`` an
  allowed request. Both label sets are small and fixed (vendors, refusal codes).
- ``spendgate_spend_usd_total{vendor,policy,kind}``: the spend the report counts
  (``reports.spend``): a parsed cost (``kind="parsed"``), else the rate-table cost or
  the pre-call estimate (``kind="estimated"``); refused requests count nothing. Money
  is summed as integer nano-dollars and rendered as an exact decimal.
- ``spendgate_added_latency_seconds{decision}``: the row's ``latency_ms``, from the
  moment the gateway holds the whole request (its ``request`` hook) to the moment it
  records the call. For a refused request that is all the gateway's own time; for a
  forwarded one it also contains the vendor's response time, so read
  ``decision="deny"`` as the gateway's overhead and ``"allow"`` as an upper bound. Time a
  request spent held for a human (an ``approve:`` rule) is not in it:
- ``spendgate_approval_wait_seconds``: how long held requests waited for a human's answer
  (approved, denied, killed in mitmweb or timed out).
- ``spendgate_ledger_queue_depth``: ledger writes (rows and budget settlements)
  waiting for the writer thread; it should hover near zero.

Rows are observed and ``/metrics`` is rendered on mitmproxy's event loop, so the
counters need no lock.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from .runtime import Runtime

log = logging.getLogger("spendgate")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upper bounds in seconds, as rendered, and in microseconds for exact integer comparison.
LATENCY_BUCKETS: tuple[tuple[str, int], ...] = tuple(
    (le, int(float(le) * 1_000_000))
    for le in ("0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25",
               "0.5", "1", "2.5", "5", "10", "30", "60")
)


def decimal_str(units: int, scale: int) -> str:
    """``units`` × 10^-``scale`` as a plain decimal (no exponent, no float rounding)."""
    sign = "-" if units < 0 else ""
    whole, frac = divmod(abs(units), 10**scale)
    digits = f"{frac:0{scale}d}".rstrip("0")
    return f"{sign}{whole}" + (f".{digits}" if digits else "")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))


class Histogram:
    def __init__(self) -> None:
        self.buckets = [0] * len(LATENCY_BUCKETS)  # not cumulative; rendered cumulative
        self.count = 0
        self.sum_us = 0

    def observe(self, micros: int) -> None:
        self.count += 1
        self.sum_us += micros
        for i, (_, bound) in enumerate(LATENCY_BUCKETS):
            if micros <= bound:
                self.buckets[i] += 1
                break


class Metrics:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.spend_nanos: Counter[tuple[str, str, str]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.approval_wait = Histogram()
        runtime.on_record.append(self.observe)

    def observe(self, row: dict[str, Any], call: Any = None) -> None:
        vendor = row.get("vendor") or "other"
        decision = row.get("decision") or "allow"
        self.requests[(vendor, decision, row.get("reason") or "none")] += 1
        if decision != "deny":
            # The report's rule (reports.spend): the cost if known, else the estimate.
            nanos = row.get("cost_nanos")
            if nanos is None:
                nanos = row.get("estimated_nanos") or 0
            kind = "parsed" if row.get("cost_status") == "parsed" else "estimated"
            if nanos > 0:  # a Prometheus counter may never go down: a negative cost stays in the ledger only
                self.spend_nanos[(vendor, row.get("policy") or "none", kind)] += nanos
        held = getattr(call, "held_seconds", 0.0) or 0.0  # waiting for a human is not the gateway's latency
        if held > 0:
            self.approval_wait.observe(round(held * 1_000_000))
        latency_ms = row.get("latency_ms")
        if latency_ms is not None:
            hist = self.latency.setdefault(decision, Histogram())
            hist.observe(max(0, round(latency_ms * 1000 - held * 1_000_000)))

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("spendgate_requests_total", "counter",
               "Requests recorded by the gateway, by vendor, decision and refusal reason.")
        names = ("vendor", "decision", "reason")
        for key, n in sorted(self.requests.items()):
            out.append(f"spendgate_requests_total{{{_labels(names, key)}}} {n}")

        family("spendgate_spend_usd_total", "counter",
               "Spend in USD as the ledger counts it: parsed from the vendor, or estimated.")
        names = ("vendor", "policy", "kind")
        for key, nanos in sorted(self.spend_nanos.items()):
            out.append(f"spendgate_spend_usd_total{{{_labels(names, key)}}} {decimal_str(nanos, 9)}")

        def histogram(name: str, label: str, hist: Histogram) -> None:
            sep = "," if label else ""
            cumulative = 0
            for (le, _), n in zip(LATENCY_BUCKETS, hist.buckets, strict=True):
                cumulative += n
                out.append(f'{name}_bucket{{{label}{sep}le="{le}"}} {cumulative}')
            out.append(f'{name}_bucket{{{label}{sep}le="+Inf"}} {hist.count}')
            out.append(f"{name}_sum{{{label}}} {decimal_str(hist.sum_us, 6)}" if label else
                       f"{name}_sum {decimal_str(hist.sum_us, 6)}")
            out.append(f"{name}_count{{{label}}} {hist.count}" if label else f"{name}_count {hist.count}")

        family("spendgate_added_latency_seconds", "histogram",
               "Time from the gateway holding the whole request to recording the call "
               "(includes the vendor's response time for forwarded requests; not the time held for a human).")
        for decision, hist in sorted(self.latency.items()):
            histogram("spendgate_added_latency_seconds", f'decision="{_escape(decision)}"', hist)

        family("spendgate_approval_wait_seconds", "histogram",
               "Time held requests waited for a human's answer (approved, denied, killed or timed out).")
        histogram("spendgate_approval_wait_seconds", "", self.approval_wait)

        store = self.runtime.store
        if store is not None:  # (not yet open: nothing to report)
            family("spendgate_ledger_queue_depth", "gauge",
                   "Ledger writes (call rows, budget settlements) waiting for the writer thread.")
            out.append(f"spendgate_ledger_queue_depth {store.queue_depth}")
            family("spendgate_store_up", "gauge",
                   "1 while the ledger database accepts writes, 0 during an outage (calls refused 503).")
            out.append(f"spendgate_store_up {int(store.available)}")
            family("spendgate_store_outages_total", "counter",
                   "Ledger outages (database unreachable, disk full, read-only) since start.")
            out.append(f"spendgate_store_outages_total {store.outages}")
        for source in self.runtime.metric_sources:  # e.g. spendgate_circuit_open (stages/circuit.py)
            try:
                out += source()
            except Exception:
                log.exception("spendgate: a metrics source failed")
        return "\n".join(out) + "\n"
