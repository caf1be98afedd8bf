"""``spendgate prices check``: tables with a source and a date, and models seen without a row."""

from __future__ import annotations

import json
import subprocess
from datetime import date
from pathlib import Path

import yaml
from harness import BIN

from spendgate import pricing
from spendgate.store.sqlite import SQLiteStore
from spendgate.vendors.base import PRICES_DIR, Prices


def ledger(tmp: Path, models: list[tuple[str, str]]) -> str:
    db = str(tmp / "ledger.db")
    store = SQLiteStore(db)
    for i, (vendor, model) in enumerate(models):
        store.record_call({"ts": f"2026-11-23T00:00:{i:02d}", "decision": "allow", "vendor": vendor,
                           "path": "/v1/x", "model": model})
    store.flush()
    store.close()
    return db


def test_every_shipped_table_names_its_source_and_date() -> None:
    for path in sorted(PRICES_DIR.glob("*.yaml")):
        table = yaml.safe_load(path.read_text())
        assert isinstance(table.get("source"), str) and table["source"].strip(), path.name
        assert pricing._as_of(table.get("as_of")) is not None, path.name


def test_tables_older_than_the_limit_are_stale() -> None:
    as_of = {t.vendor: t for t in pricing.check_tables(date(2026, 6, 2))}
    openai = as_of["openai"]
    assert (openai.as_of, openai.age_days, openai.problem) == ("2026-06-01", 1, None)
    later = {t.vendor: t for t in pricing.check_tables(date(2026, 12, 1), max_age_days=90)}
    assert later["openai"].problem == "older than 90 days" and later["openai"].age_days == 183


def test_models_without_a_row_are_reported_aliases_dated_ids_and_media_models_are_not(tmp_path: Path) -> None:
    db = ledger(tmp_path, [
        ("openai", "gpt-4o"), ("openai", "gpt-4.1-2025-04-14"), ("openai", "gpt-5-chat-latest"),
        ("openai", "whisper-1"), ("openai", "dall-e-3"), ("openai", "gpt-7-ultra"), ("openai", "gpt-7-ultra"),
        ("anthropic", "claude-sonnet-4-5"), ("anthropic", "claude-zeta-1"),
        ("stripe", "n/a"),  # a vendor not priced per model
    ])
    missing = pricing.check_models(db, Prices())
    assert [(m.vendor, m.model, m.calls) for m in missing] == [
        ("anthropic", "claude-zeta-1", 1), ("openai", "gpt-7-ultra", 2)]
    # a policy override that adds the row fixes it
    fixed = Prices(overrides={"openai": {"models": {"gpt-7-ultra": {"input": 1, "output": 2}}}})
    assert [m.model for m in pricing.check_models(db, fixed)] == ["claude-zeta-1"]


def test_the_command_prints_both_and_exits_1_when_something_is_wrong(tmp_path: Path) -> None:
    db = ledger(tmp_path, [("openai", "gpt-7-ultra")])
    run = subprocess.run([str(BIN / "spendgate"), "prices", "check", "--db", db, "--json", "--max-age", "100000"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 1, run.stderr
    out = json.loads(run.stdout)
    assert out["models_without_a_row"][0]["model"] == "gpt-7-ultra"
    assert {t["vendor"] for t in out["tables"]} >= {"openai", "anthropic", "stripe", "twilio"}
    assert all(t["problem"] is None for t in out["tables"])
    (tmp_path / "clean").mkdir()
    clean = ledger(tmp_path / "clean", [("openai", "gpt-4o")])
    ok = subprocess.run([str(BIN / "spendgate"), "prices", "check", "--db", clean, "--max-age", "100000"],
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "without a price row: none" in ok.stdout

