"""Spend reports over the ``calls`` table: plain functions, like sqlite-utils'.

Spend counts what was billed or moved: parsed costs, rate-table estimates
(``cost_status=estimated``), and, for ``unknown`` costs, the pre-call estimate
(the same conservative rule the budget uses). Sums are exact integer nano-dollars.
``reconciled_usd`` is the part of the spend settled later by ``spendgate reconcile`` (the
vendor's final figure, inside ``parsed_usd``); ``estimated_usd`` is what is still an estimate.

The query is the same on both ledger backends (SQLite, PostgreSQL); only the JSON label
lookup is spelled per dialect.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from .money import from_nanos, plain
from .policy import parse_duration

GROUPS = {
    "key": "coalesce(key_id, '-')",
    "policy": "coalesce(policy, '-')",
    "vendor": "coalesce(vendor, host)",
    "day": "substr(ts, 1, 10)",
    "model": "coalesce(model, '-')",
    "tool": "coalesce(tool, '-')",
}


def _since(since: str | None) -> str | None:
    if not since:
        return None
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", since):
        return since
    try:
        return (datetime.now(UTC) - timedelta(seconds=parse_duration(since))).isoformat()
    except ValueError:
        raise ValueError(f"--since {since!r}: give a date (2026-11-01) or a duration (24h, 7d)") from None


LABEL = {
    "sqlite": lambda name: f"json_extract(labels, '$.\"{name}\"')",
    "postgres": lambda name: f"(labels::jsonb ->> '{name}')",
}


def spend(source: str | Any, by: str = "key", since: str | None = None) -> list[dict[str, Any]]:
    """Rows of {group, calls, allowed, refused, would_deny, spend_usd, parsed_usd,
    reconciled_usd, estimated_usd, unknown}, biggest spend first. ``source`` is an open store (its ``read``
    runs the query) or a SQLite path (opened read-only)."""
    dialect = "sqlite" if isinstance(source, str) else source.dialect
    if by.startswith("label:"):
        name = by.removeprefix("label:")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"bad label name {name!r}")
        group = f"coalesce({LABEL[dialect](name)}, '-')"
    elif by in GROUPS:
        group = GROUPS[by]
    else:
        raise ValueError(f"--by {by!r}: use key, policy, vendor, day, model, tool or label:NAME")
    counted = "CASE WHEN decision != 'deny' THEN coalesce(cost_nanos, estimated_nanos, 0) ELSE 0 END"
    sql = f"""
        SELECT {group} AS grp,
               count(*) AS calls,
               sum(CASE WHEN decision = 'allow' THEN 1 ELSE 0 END) AS allowed,
               sum(CASE WHEN decision = 'deny' THEN 1 ELSE 0 END) AS refused,
               sum(CASE WHEN decision = 'would_deny' THEN 1 ELSE 0 END) AS would_deny,
               sum({counted}) AS spend,
               sum(CASE WHEN cost_status = 'parsed' THEN cost_nanos ELSE 0 END) AS parsed,
               sum(CASE WHEN reconciled_at IS NOT NULL AND decision != 'deny'
                        THEN coalesce(cost_nanos, 0) ELSE 0 END) AS reconciled,
               sum(CASE WHEN cost_status IN ('estimated', 'unknown') AND decision != 'deny'
                        THEN coalesce(cost_nanos, estimated_nanos, 0) ELSE 0 END) AS estimated,
               sum(CASE WHEN cost_status = 'unknown' THEN 1 ELSE 0 END) AS unknown
        FROM calls {"WHERE ts >= ?" if since else ""}
        GROUP BY grp ORDER BY spend DESC, grp
    """
    params = (_since(since),) if since else ()
    if isinstance(source, str):
        conn = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            rows = conn.execute(sql, params).fetchall()
        finally:
            conn.close()
    else:
        rows = source.read(sql, params)
    return [
        {
            by: grp, "calls": calls, "allowed": int(allowed or 0), "refused": int(refused or 0),
            "would_deny": int(would or 0), "spend_usd": plain(from_nanos(int(sp or 0))),
            "parsed_usd": plain(from_nanos(int(parsed or 0))),
            "reconciled_usd": plain(from_nanos(int(reconciled or 0))),
            "estimated_usd": plain(from_nanos(int(est or 0))), "unknown": int(unknown or 0),
        }
        for grp, calls, allowed, refused, would, sp, parsed, reconciled, est, unknown in rows
    ]


def render(rows: list[dict[str, Any]], fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if not rows:
        return "" if fmt == "csv" else "(no calls)"
    cols = list(rows[0])
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, cols, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    numeric = {c for c in cols if c != cols[0]}
    cells = [[str(r[c]) for c in cols] for r in rows]
    totals = ["TOTAL"] + [
        plain(sum((Decimal(r[c]) for r in rows), Decimal(0)).normalize()) if c.endswith("_usd")
        else str(sum(int(r[c]) for r in rows))
        for c in cols[1:]
    ]
    widths = [max(len(c), *(len(row[i]) for row in [*cells, totals])) for i, c in enumerate(cols)]

    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if cols[i] in numeric else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    out = [line([c.upper() for c in cols]), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    out += [line(["-" * w for w in widths]), line(totals)]
    return "\n".join(out)
