"""What only the SQLite backend promises (the shared contract is tests/test_store_contract.py):
no token on disk, Datasette/sqlite-utils compatibility, schema versions."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest

from spendgate.store import hash_token
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


OLD_V1_SCHEMA = [  # the ledger as spendgate wrote it before schema versions (sqlite-utils' DDL)
    'CREATE TABLE "keys" ("id" TEXT PRIMARY KEY, "policy" TEXT, "token_sha256" TEXT, "labels" TEXT, '
    '"created_at" TEXT, "expires_at" TEXT, "revoked_at" TEXT, "cap_usd" TEXT, "source" TEXT)',
    'CREATE UNIQUE INDEX "idx_keys_token_sha256" ON "keys" ("token_sha256")',
    'CREATE TABLE "calls" ("id" INTEGER PRIMARY KEY, "ts" TEXT, "key_id" TEXT, "decision" TEXT, '
    '"flow_id" TEXT, "policy" TEXT, "labels" TEXT, "vendor" TEXT, "method" TEXT, "host" TEXT, "path" TEXT, '
    '"status" INTEGER, "reason" TEXT, "estimated_usd" TEXT, "estimated_nanos" INTEGER, "cost_usd" TEXT, '
    '"cost_nanos" INTEGER, "cost_status" TEXT, "flagged" INTEGER, "note" TEXT, "currency" TEXT, '
    '"amount" TEXT, "request_id" TEXT, "latency_ms" REAL)',
    'CREATE TABLE "counters" ("scope" TEXT PRIMARY KEY, "used_nanos" INTEGER, "reserved_nanos" INTEGER, '
    '"updated_at" TEXT)',
    'CREATE TABLE "approvals" ("id" TEXT PRIMARY KEY, "flow_id" TEXT, "key_id" TEXT, "policy" TEXT, '
    '"vendor" TEXT, "method" TEXT, "path" TEXT, "rule" TEXT, "estimated_usd" TEXT, "created_at" TEXT, '
    '"expires_at" TEXT, "status" TEXT, "decided_by" TEXT, "decided_at" TEXT)',
    'CREATE TABLE "reservations" ("id" TEXT PRIMARY KEY, "nanos" INTEGER, "scopes" TEXT, "created_at" TEXT)',
]


def test_an_old_ledger_is_upgraded_in_place_and_its_old_holds_recovered(tmp_path: Path) -> None:
    from spendgate.store.sqlite import SCHEMA_VERSION

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for sql in OLD_V1_SCHEMA:
        conn.execute(sql)
    conn.execute("INSERT INTO counters VALUES ('key:k', 0, 40, '')")
    conn.execute("INSERT INTO reservations VALUES ('res_old', 40, '[\"key:k\"]', '2000-01-01T00:00:00.000+00:00')")
    conn.execute("INSERT INTO calls (ts, key_id, decision) VALUES ('2026-01-01', 'k', 'allow')")
    conn.close()
    s = SQLiteStore(str(path), lease=1)
    try:
        versions = [v for (v,) in s.read("SELECT version FROM schema_version ORDER BY version")]
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        assert s.read("SELECT count(*) FROM calls")[0][0] == 1  # kept
        s.heartbeat()
        # an old hold (no gateway instance) older than the lease: its gateway is gone; it was forwarded
        assert s.recover_holds() == (1, 0) and s.used("key:k") == 40
    finally:
        s.close()
    SQLiteStore(str(path)).close()  # opening again migrates nothing


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    from spendgate.store import SchemaError

    path = str(tmp_path / "l.db")
    SQLiteStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version VALUES (99, '')")
    with pytest.raises(SchemaError, match="version 99, newer than this spendgate knows"):
        SQLiteStore(path)


def test_an_unwritable_ledger_is_a_clean_error_naming_it(tmp_path: Path) -> None:
    import os

    from spendgate.store import SchemaError

    path = tmp_path / "l.db"
    SQLiteStore(str(path)).close()
    os.chmod(path, 0o444)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("running as root: a read-only file is still writable")
        s = SQLiteStore(str(path))
        with pytest.raises(SchemaError, match=f"cannot write to the ledger {path}: .*readonly"):
            s.check_writable()
        s.close()
    finally:
        os.chmod(path, 0o644)


def test_a_ledger_that_turns_read_only_keeps_its_rows_logs_twice_and_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The writer's connection sees the ledger read-only (SQLITE_READONLY, as on a filesystem
    remounted read-only): batches are kept, not dropped; one log line when writes start failing,
    none per retry, one when they work again, and every kept row is then committed."""
    import logging
    import sqlite3

    from spendgate.store import CallRow

    path = str(tmp_path / "l.db")
    store = SQLiteStore(path)
    ro = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    rw = sqlite3.connect(path, isolation_level=None)
    committed: list[int] = []
    batch = [(CallRow({"flow_id": f"f{i}", "status": 200}), lambda i=i: committed.append(i)) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="spendgate"):
        for _ in range(5):
            assert store._write_batch(ro, batch) is False  # kept for a retry
        assert not store.available and store.outages == 1 and committed == []
        assert store._write_batch(rw, batch) is True
    assert store.available and committed == [0, 1, 2]
    assert [r[0] for r in rw.execute("SELECT flow_id FROM calls ORDER BY id")] == ["f0", "f1", "f2"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "readonly" in lines[0] and "writable again" in lines[1], lines
    ro.close()
    rw.close()
    store.close()


def test_the_loop_breaker_and_the_rate_limiter_are_safe_across_threads() -> None:
    """Budget checks run on the runtime's worker threads, on one per-process LoopBreaker and Gcra:
    sweeps racing additions must neither raise ("dictionary changed size during iteration", seen
    in the soak as a 503 internal_error) nor lose a sighting."""
    import threading

    from spendgate.store.limits import Gcra, LoopBreaker, fingerprint

    lb, gcra, errors = LoopBreaker(), Gcra(), []
    lb.PRUNE_EVERY = 7  # sweep often, while other threads add
    shared = fingerprint(b"the same request")
    repeated = []

    def hammer(t: int) -> None:
        try:
            for i in range(3000):
                lb.repeated(fingerprint(f"{t}-{i}".encode()), None, 3, 0.0005 if i % 2 else 600)
                gcra.hit(f"{t}-{i % 500}", 10**9, 1.0)
            repeated.append(lb.repeated(shared, None, 8, 600))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert repeated.count(False) == 8  # 8 sightings of one request from 8 threads: all counted
    assert lb.repeated(shared, None, 8, 600)  # the 9th is a repeat


def test_the_loop_breaker_keeps_a_bounded_compact_memory() -> None:
    from spendgate.store.limits import LoopBreaker, fingerprint

    lb = LoopBreaker(max_fingerprints=100)
    for i in range(1000):  # 1 000 distinct priced requests: only the 100 most recent are kept
        assert not lb.repeated(fingerprint(str(i).encode()), None, 3, 600, now=float(i))
    assert len(lb) == 100
    assert all(isinstance(k, int) and k < 2**64 for k in lb._seen)  # an 8-byte digest each, not the request
    assert all(isinstance(v, float) for v in lb._seen.values())  # seen once, no Idempotency-Key: one float
    recent = fingerprint(b"999")
    assert [lb.repeated(recent, None, 3, 600, now=1000.0) for _ in range(3)] == [False, False, True]
    assert max(len(v) for v in lb._seen.values() if isinstance(v, tuple)) <= 2 * 3  # at most `repeats` sightings
    assert [lb.repeated(fingerprint(b"int"), None, 2, 600, now=1001) for _ in range(3)] == [False, False, True]
    import tracemalloc

    from spendgate.store.limits import MAX_FINGERPRINTS

    tracemalloc.start()
    try:  # the documented bound: MAX_FINGERPRINTS fingerprints seen once each take ~11 MB in all
        big, before = LoopBreaker(), tracemalloc.get_traced_memory()[0]
        for i in range(MAX_FINGERPRINTS + 1000):
            big.repeated(fingerprint(b"pay", str(i).encode()), None, 3, 600, now=i / 1000)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(big) == MAX_FINGERPRINTS and used < 12 * 2**20, f"{used / 2**20:.1f} MiB"


def _row(i: int, **kw: object) -> dict:
    return {"ts": "2026-12-02T00:00:00", "flow_id": f"f{i}", "decision": "allow", "status": 200, **kw}


def test_a_row_is_committed_on_the_event_loop_with_its_settle_when_the_write_lock_is_free(tmp_path: Path) -> None:
    """``record_call_now`` on an event loop: the row and the settle deferred before it (by the meter)
    are committed in one transaction before it returns (an answer then needs no writer thread); with
    the write lock held elsewhere it does nothing and says so, and the deferred settle reaches the
    writer at the loop's next turn."""
    import asyncio

    path = str(tmp_path / "l.db")
    store = SQLiteStore(path)
    other = sqlite3.connect(path, isolation_level=None)

    def seen() -> tuple:
        return (other.execute("SELECT count(*) FROM calls").fetchone()[0],
                other.execute("SELECT count(*) FROM reservations").fetchone()[0],
                other.execute("SELECT used_nanos, reserved_nanos FROM counters WHERE scope = 'k'").fetchone())

    async def main() -> None:
        res = store.reserve(20, {"k": 100})
        assert seen() == (0, 1, (0, 20))
        store.settle(res, 15)
        assert seen() == (0, 1, (0, 20))  # deferred: not queued, not committed
        assert store.record_call_now(_row(1)) is True
        assert seen() == (1, 0, (15, 0))  # the row and its settle, committed, one transaction
        await asyncio.sleep(0.01)
        assert store.queue_depth == 0  # nothing was left for the writer

        res = store.reserve(20, {"k": 100})
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        store.settle(res, 5)
        assert store.record_call_now(_row(2)) is False  # did nothing, did not wait
        await asyncio.sleep(0)  # the loop's next turn: the settle goes to the writer
        assert store.queue_depth == 1
        store.record_call(_row(2))
        other.execute("ROLLBACK")
        store.flush()
        assert seen() == (2, 0, (20, 0))

    asyncio.run(main())
    other.close()
    store.close()


def test_rows_committed_on_the_event_loop_keep_the_wal_bounded(tmp_path: Path) -> None:
    """The event loop's connection never checkpoints (a checkpoint there would stall every agent):
    the writer thread does, every ``CHECKPOINT_EVERY`` rows committed there, so the WAL file stops
    growing, also under commits that never pause (a passive checkpoint never completes then: the
    WAL grew to ~65 MB for these 5 000 rows, ~13 KB a row)."""
    import asyncio
    import time

    path = tmp_path / "l.db"
    store = SQLiteStore(str(path))
    fell_back = 0

    async def main() -> None:
        nonlocal fell_back
        for i in range(5000):  # a row every 200 µs (5 000 requests/s), never a pause
            due = time.perf_counter() + 0.0002
            if not store.record_call_now(_row(i, note="x" * 200)):  # a checkpoint runs: to the writer
                store.record_call(_row(i, note="x" * 200))
                fell_back += 1
            while time.perf_counter() < due:
                pass

    asyncio.run(main())
    store.flush()
    wal = Path(f"{path}-wal").stat().st_size
    rows = sqlite3.connect(path).execute("SELECT count(*) FROM calls").fetchone()[0]
    store.close()
    assert wal < 15_000_000, (wal, fell_back)
    assert rows == 5000


def test_the_event_loops_key_read_sees_every_change_made_elsewhere_at_once(tmp_path: Path) -> None:
    """``key_by_token(wait=False)`` skips the key row's ``SELECT`` while ``PRAGMA data_version`` says
    no other connection committed anything; its own commits (rows, holds) do not count. A revoke
    from another process (a second store on the file: its own connections), from this gateway's
    other threads (the admin API, the CLI in process), an expiry change in raw SQL, a key issued
    after a miss: each is seen by the very next lookup."""
    import subprocess
    import sys

    path = str(tmp_path / "l.db")
    store = SQLiteStore(path)
    a, token_a = store.issue_key("p", 3600)
    b, token_b = store.issue_key("p", 3600)
    assert store.key_by_token(token_a, wait=False).state() == "active"
    for i in range(3):  # the loop's own commits keep the read cached, and change nothing it sees
        assert store.record_call_now(_row(i))
        assert store.key_by_token(token_a, wait=False).state() == "active"

    other = SQLiteStore(path)  # another gateway, or the CLI
    assert other.revoke(a.id)
    assert store.key_by_token(token_a, wait=False).state() == "revoked"
    other.close()

    assert store.key_by_token(token_b, wait=False).state() == "active"
    assert store.revoke(b.id)  # this process, another thread's connection
    assert store.key_by_token(token_b, wait=False).state() == "revoked"

    c, token_c = store.issue_key("p", 3600)
    assert store.key_by_token(token_c, wait=False).state() == "active"
    subprocess.run([sys.executable, "-c", "import sqlite3; c = sqlite3.connect(__import__('sys').argv[1]); "
                    "c.execute(\"UPDATE keys SET expires_at = '2000-01-01T00:00:00+00:00' WHERE id = ?\", "
                    "(__import__('sys').argv[2],)); c.commit()", path, c.id], check=True)
    assert store.key_by_token(token_c, wait=False).state() == "expired"

    missing = "vk_" + "x" * 40
    assert store.key_by_token(missing, wait=False) is None
    store.conn.execute("UPDATE keys SET token_sha256 = ? WHERE id = ?", (hash_token(missing), c.id))
    assert store.key_by_token(missing, wait=False) is not None  # a miss is not remembered past a change
    store.close()


def test_a_worker_threads_hold_is_not_starved_by_the_event_loops_commits(tmp_path: Path) -> None:
    """The event loop commits rows and holds whenever SQLite's write lock is free that instant; a
    worker thread's hold (the loop's fallback) waits for it. SQLite's busy handler sleeps between
    tries instead of waking on release, so without this process's own write turns a thread could
    lose every race for the whole busy timeout (5 s) and its hold failed 503 ``store_unavailable``
    (2 of 4 000 payments at concurrency 20 in the in-process bench). With them, a thread that has
    waited a few ms goes next: every hold here is taken quickly while the loop commits back to back."""
    import asyncio
    import threading
    import time

    store = SQLiteStore(str(tmp_path / "l.db"))
    store.heartbeat()
    stop = threading.Event()
    loop_rows = loop_tries = 0
    waits: list[float] = []

    async def event_loop() -> None:  # commits back to back, as a busy gateway's loop would
        nonlocal loop_rows, loop_tries
        while not stop.is_set():
            loop_tries += 1
            if store.record_call_now(_row(loop_rows)):
                loop_rows += 1
            else:  # a waiting thread goes first (the gateway hands this row to the writer thread)
                await asyncio.sleep(0)

    runner = threading.Thread(target=asyncio.run, args=(event_loop(),))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while loop_rows < 50 and time.monotonic() < deadline:
            time.sleep(0.001)
        before, until = loop_tries, time.monotonic() + 1.0
        while len(waits) < 40 or time.monotonic() < until:  # for a second at least, 40 holds at least
            t0 = time.perf_counter()
            res = store.reserve(10, {"k": 10**9})
            waits.append(time.perf_counter() - t0)
            store.settle(res, 10)
        during = loop_tries - before
    finally:
        stop.set()
        runner.join(10)
    store.flush()
    store.close()
    assert loop_rows > 50 and during > 100, (loop_rows, during)  # the loop kept trying to commit all along
    assert max(waits) < 0.5, sorted(waits)[-5:]  # was up to the 5 s busy timeout, then 503
