"""Keeping price tables true: ``spendgate prices check``.

Two questions, answered from the shipped tables (``prices/*.yaml``, merged with the policy's
``prices:`` when a policy is given) and the ledger:

- **Tables**: every table must say where its prices come from (``source``) and when they were
  read (``as_of``, a date); one older than ``max_age_days`` (90 by default) is stale.
- **Models**: every model the ledger has seen (``calls.model``) must have a row in its vendor's
  table (a model, an alias, a dated id of a listed model, or a row of a per-model section such
  as OpenAI's ``audio``). A model without a row was priced at the vendor's highest listed
  rates, flagged "estimated": add its row (``prices: {vendor: {models: {…}}}``) to count it
  right.

Both are plain functions returning plain values; the CLI renders them.
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from datetime import date
from typing import Any

from .vendors import REGISTRY
from .vendors._llm import known_model
from .vendors.base import Prices


@dataclass(frozen=True)
class TableCheck:
    vendor: str
    as_of: str | None
    age_days: int | None
    source: str | None
    problem: str | None  # None: fine


@dataclass(frozen=True)
class ModelCheck:
    vendor: str
    model: str
    calls: int
    last_seen: str


def _as_of(value: object) -> date | None:
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            return None
    return None


def check_tables(today: date, max_age_days: int = 90) -> list[TableCheck]:
    out = []
    for name in sorted(REGISTRY):
        table = REGISTRY[name].prices
        if not table:
            continue
        as_of, source = _as_of(table.get("as_of")), table.get("source")
        age = (today - as_of).days if as_of else None
        problem = None
        if not isinstance(source, str) or not source.strip():
            problem = "no source"
        elif as_of is None:
            problem = "no as_of date"
        elif age is not None and age > max_age_days:
            problem = f"older than {max_age_days} days"
        out.append(TableCheck(name, as_of.isoformat() if as_of else None, age,
                              source if isinstance(source, str) else None, problem))
    return out


def _priced_per_model(table: dict[str, Any]) -> bool:
    return isinstance(table.get("models"), dict)


MODELS_SQL = ("SELECT vendor, model, count(*), max(ts) FROM calls WHERE model IS NOT NULL AND model != '' "
              "GROUP BY vendor, model ORDER BY vendor, model")


def check_models(db: str, prices: Prices) -> list[ModelCheck]:
    """Models seen in the ledger that have no row in their vendor's table (after overrides).
    ``db``: a SQLite file, or a ``postgresql://`` URL (the fleet's ledger: the same query)."""
    from .store import is_postgres, open_store

    if is_postgres(db):
        store = open_store(db)
        try:
            rows = [tuple(r) for r in store.read(MODELS_SQL)]
        finally:
            store.close()
        return _without_a_row(rows, prices)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
        if "model" not in columns:
            return []
        rows = conn.execute(MODELS_SQL).fetchall()
    finally:
        conn.close()
    return _without_a_row(rows, prices)


def _without_a_row(rows: list[tuple], prices: Prices) -> list[ModelCheck]:
    out = []
    for vendor_name, model, calls, last in rows:
        vendor = REGISTRY.get(vendor_name or "")
        if vendor is None:
            continue
        table = prices.table(vendor)
        if _priced_per_model(table) and not known_model(table, model):
            out.append(ModelCheck(vendor_name, model, calls, last))
    return out


def report(db: str | None, prices: Prices, today: date, max_age_days: int = 90) -> dict[str, Any]:
    tables = check_tables(today, max_age_days)
    models = check_models(db, prices) if db else []
    return {
        "tables": [asdict(t) for t in tables],
        "models_without_a_row": [asdict(m) for m in models],
        "ok": not models and all(t.problem is None for t in tables),
    }
