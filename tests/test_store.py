"""The SQLite store: keys (hash only), static keys, revocation, reservations, write-behind."""

from __future__ import annotations

import sqlite3
import threading
from decimal import Decimal
from pathlib import Path

import pytest

from spendgate.store import CapExceeded, KeyRecord, hash_token
from spendgate.store.sqlite import SQLiteStore


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    s = SQLiteStore(str(tmp_path / "ledger.db"))
    yield s
    s.close()


def test_tokens_are_stored_hashed_and_looked_up(store: SQLiteStore, tmp_path: Path) -> None:
    rec, token = store.issue_key("p", 60, Decimal("5"), {"run": "1"})
    assert token.startswith("vk_") and len(token) >= 35
    assert store.key_by_token(token) == rec
    assert store.key_by_token(token + "x") is None
    raw = (tmp_path / "ledger.db").read_bytes() + (tmp_path / "ledger.db-wal").read_bytes()
    assert token.encode() not in raw and hash_token(token).encode() in raw
    assert "token_sha256" not in rec.public()


def test_revoke_and_labels(store: SQLiteStore) -> None:
    a, _ = store.issue_key("p", None, labels={"run": "42"})
    b, _ = store.issue_key("p", None, labels={"run": "42", "team": "x"})
    c, _ = store.issue_key("p", None, labels={"run": "43"})
    assert sorted(store.revoke_by_labels({"run": "42"})) == sorted([a.id, b.id])
    assert store.get_key(a.id).state() == "revoked" and store.get_key(c.id).state() == "active"
    assert store.revoke(c.id) and not store.revoke("key_nope")


def test_revoke_from_another_connection_is_seen_at_once(store: SQLiteStore) -> None:
    rec, token = store.issue_key("p", None)
    other = SQLiteStore(store.path)  # the CLI, in another process, in real life
    other.revoke(rec.id)
    other.close()
    assert store.key_by_token(token).state() == "revoked"


def test_static_keys_sync_never_unrevokes(store: SQLiteStore) -> None:
    token = "vk_" + "s" * 40
    static = KeyRecord(id="smoke", policy="p", token_sha256=hash_token(token), labels={"a": "b"},
                       source="static")
    store.sync_static_keys([static])
    assert store.key_by_token(token).id == "smoke"
    store.revoke("smoke")
    store.sync_static_keys([static])
    assert store.key_by_token(token).state() == "revoked"


def test_reservations_are_all_or_nothing(store: SQLiteStore) -> None:
    caps = {"key:a": 50, "policy:p:day": 1000}
    r1 = store.reserve(30, caps)
    with pytest.raises(CapExceeded) as e:
        store.reserve(30, caps)
    assert e.value.scope == "key:a" and e.value.used_nanos == 30
    assert store.used("policy:p:day") == 30  # the failed hold left nothing behind
    store.settle(r1, 10)
    store.flush()
    assert store.used("key:a") == 10
    store.settle(r1, 10)  # settling twice never counts twice
    store.flush()
    assert store.used("key:a") == 10


def test_reservations_hold_across_threads_and_connections(store: SQLiteStore) -> None:
    stores = [SQLiteStore(store.path) for _ in range(4)]
    granted: list[int] = []

    def worker(s: SQLiteStore) -> None:
        for _ in range(10):
            try:
                s.reserve(10, {"key:z": 50})
                granted.append(1)
            except CapExceeded:
                pass

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.close()
    assert len(granted) == 5 and store.used("key:z") == 50


def test_calls_are_written_behind_and_flushed_on_close(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "l.db"))
    for i in range(500):
        s.record_call({"ts": f"2026-11-23T00:00:{i % 60:02d}", "decision": "allow", "path": "/x"})
    s.close()
    n = sqlite3.connect(tmp_path / "l.db").execute("SELECT count(*) FROM calls").fetchone()[0]
    assert n == 500


def test_on_commit_fires_once_the_row_is_readable_elsewhere(tmp_path: Path) -> None:
    s = SQLiteStore(str(tmp_path / "l.db"))
    seen: list[int] = []
    fired = threading.Event()

    def on_commit() -> None:  # another connection, as `spendgate report` or a kill -9 survivor sees it
        seen.append(sqlite3.connect(tmp_path / "l.db").execute("SELECT count(*) FROM calls").fetchone()[0])
        fired.set()

    s.record_call({"ts": "2026-11-23T00:00:00", "decision": "allow", "path": "/x"}, on_commit)
    assert fired.wait(5) and seen == [1]
    # a row that can never be written is logged and dropped, and its answer is released all the same
    fired.clear()
    s.record_call({"ts": "2026-11-23T00:00:00", "decision": "allow", "path": object()}, on_commit)
    assert fired.wait(5) and seen == [1, 1]
    s.close()


def test_a_revoke_is_seen_through_the_parsed_key_cache(store: SQLiteStore) -> None:
    rec, token = store.issue_key("p", 60)
    assert store.key_by_token(token).state() == "active"  # parsed, cached by its row
    other = SQLiteStore(store.path)  # the CLI: another connection
    other.revoke(rec.id)
    other.close()
    assert store.key_by_token(token).state() == "revoked"


def test_used_by_scope_reads_every_scope_at_once(store: SQLiteStore) -> None:
    store.reserve(7, {"a": 100, "b": 100})
    assert store.used_by_scope(["a", "b", "never"]) == {"a": 7, "b": 7, "never": 0}


def test_ledger_opens_with_the_sqlite_utils_cli(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    s = SQLiteStore(str(tmp_path / "l.db"))
    s.record_call({"ts": "2026-11-23T00:00:00", "decision": "allow", "vendor": "stripe", "cost_usd": "1.50",
                   "cost_nanos": 1_500_000_000})
    s.close()
    exe = str(Path(sys.executable).parent / "sqlite-utils")
    tables = json.loads(subprocess.run([exe, "tables", str(tmp_path / "l.db"), "--counts"],
                                       capture_output=True, text=True, check=True).stdout)
    assert {t["table"] for t in tables} >= {"keys", "calls", "counters", "reservations", "approvals"}
    rows = json.loads(subprocess.run([exe, "rows", str(tmp_path / "l.db"), "calls"],
                                     capture_output=True, text=True, check=True).stdout)
    assert rows[0]["cost_usd"] == "1.50" and rows[0]["cost_nanos"] == 1_500_000_000


def test_money_strings_never_use_exponents() -> None:
    from spendgate.money import from_nanos, plain, to_nanos

    assert plain(from_nanos(285)) == "0.000000285"
    assert plain(from_nanos(to_nanos(Decimal("1E+2")))) == "100"
    assert to_nanos(Decimal("0.00000015")) == 150
