"""``spendgate migrate --from data/spendgate.db --to postgresql://…``: move a single-box ledger
into the fleet's database.

What moves: keys (hash only; a key revoked on either side stays revoked), approvals, budget
counters, every ``calls`` row, and the ``reconciliations`` record (costs settled later, each
pointing at its call's new id; a call the box reconciled after it was copied is brought up to
date too). Stop the single-box gateway first. The holds a stopped or crashed box left are first
settled in its file by the rule every gateway applies to a dead one (what the box would do at its
next start): a hold whose call had been forwarded becomes spend at its estimate with a flagged
``calls`` row, a hold never forwarded (waiting for an approval) is released; then both sides agree
and a later run cannot count them twice. A hold of a box that is still running (or a file that
cannot be written: a read-only mount) is copied as spend, the conservative side.

**Idempotent**, and safe to interrupt: the destination remembers, per source (the file's real
path), the last ``calls`` id it copied and the counter values it already added (table
``imported``). Running it again copies only the rows written since and adds only the spend
added since; each chunk of rows commits together with its bookmark.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from typing import Any

from . import CALL_COLUMNS, RECONCILIATION_COLUMNS, is_postgres
from .postgres import PostgresStore
from .sqlite import SQLiteStore

CHUNK = 5000
_KEY_COLS = "id, policy, token_sha256, labels, created_at, expires_at, revoked_at, cap_usd, source"
_APPROVAL_COLS = ("id, flow_id, key_id, policy, vendor, method, path, rule, estimated_usd, created_at, "
                  "expires_at, status, decided_by, decided_at")


def migrate(src_path: str, dst_url: str, progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
    """Copy the SQLite ledger at ``src_path`` into the PostgreSQL ledger at ``dst_url``.
    ``progress(done, total)`` is called after each chunk of calls. Returns what was copied."""
    if is_postgres(src_path):
        raise ValueError("--from must be a SQLite ledger file (the single box)")
    if not is_postgres(dst_url):
        raise ValueError("--to must be a postgresql:// URL (the fleet's ledger)")
    if not os.path.exists(src_path):
        raise ValueError(f"--from {src_path}: no such ledger")
    source = "sqlite:" + os.path.realpath(src_path)
    real = os.path.realpath(src_path)
    writable = os.access(real, os.W_OK) and os.access(os.path.dirname(real), os.W_OK)
    src: SQLiteStore | _ReadOnly = SQLiteStore(src_path, replica="migrate") if writable else _ReadOnly(real)
    try:
        holds = src.recover_holds() if isinstance(src, SQLiteStore) else (0, 0)
        dst = PostgresStore(dst_url, replica="migrate")
        try:
            out = _copy(src, dst, source, progress)
        finally:
            dst.close()
    finally:
        src.close()
    if any(holds):
        out["holds_counted"], out["holds_released"] = holds
    return out


class _ReadOnly:
    """A ledger file that cannot be written (``-v data:/old:ro``): read as it is, never migrated
    or changed (``immutable``: no -shm file is needed beside it)."""

    def __init__(self, path: str) -> None:
        from urllib.parse import quote

        try:  # read-only, with the -wal file a crashed box left (SQLite keeps the -shm in memory)
            self.conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)
            self.conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
        except sqlite3.OperationalError:  # no -wal/-shm to read beside it: the file as it is
            self.conn = sqlite3.connect(f"file:{quote(path)}?mode=ro&immutable=1", uri=True)

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def close(self) -> None:
        self.conn.close()


def _copy(src: SQLiteStore | _ReadOnly, dst: PostgresStore, source: str,
          progress: Callable[[int, int], None] | None) -> dict[str, int]:
    out: dict[str, int] = {}
    keys = src.read(f"SELECT {_KEY_COLS} FROM keys")
    approvals = src.read(f"SELECT {_APPROVAL_COLS} FROM approvals")
    counters = src.read("SELECT scope, coalesce(used_nanos, 0) + coalesce(reserved_nanos, 0) FROM counters")

    def small_tables(c: Any) -> None:
        with c.transaction():
            cur = c.cursor()
            cur.executemany(f"INSERT INTO keys ({_KEY_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) "
                            "ON CONFLICT (id) DO UPDATE SET revoked_at = coalesce(keys.revoked_at, "
                            "excluded.revoked_at)", keys)
            cur.executemany(f"INSERT INTO approvals ({_APPROVAL_COLS}) VALUES ({', '.join(['%s'] * 14)}) "
                            "ON CONFLICT (id) DO NOTHING", approvals)
            done = dict(c.execute("SELECT what, value FROM imported WHERE source = %s AND what LIKE 'counter:%%' "
                                  "FOR UPDATE", (source,)).fetchall())
            added = 0
            for scope, value in sorted(counters):
                delta = value - done.get("counter:" + scope, 0)
                if delta:
                    added += delta
                    c.execute("INSERT INTO counters AS k (scope, used_nanos) VALUES (%s, %s) ON CONFLICT (scope) "
                              "DO UPDATE SET used_nanos = k.used_nanos + excluded.used_nanos, updated_at = now()",
                              (scope, delta))
                    c.execute("INSERT INTO imported (source, what, value) VALUES (%s, %s, %s) ON CONFLICT "
                              "(source, what) DO UPDATE SET value = excluded.value", (source, "counter:" + scope, value))
            out["counter_nanos_added"] = added

    dst._run(small_tables)
    out["keys"], out["approvals"] = len(keys), len(approvals)

    cols = [k for k in CALL_COLUMNS if k != "id"]
    have = {r[1] for r in src.read('PRAGMA table_info("calls")')}
    select = ", ".join(k if k in have else "NULL" for k in cols)
    last = dst._run(lambda c: c.execute("SELECT value FROM imported WHERE source = %s AND what = 'calls'",
                                        (source,)).fetchone())
    last_id = last[0] if last else 0
    total = src.read("SELECT count(*) FROM calls WHERE id > ?", (last_id,))[0][0]
    copied = 0
    if progress:
        progress(0, total)
    while True:
        rows = src.read(f"SELECT id, {select} FROM calls WHERE id > ? ORDER BY id LIMIT {CHUNK}", (last_id,))
        if not rows:
            break
        chunk_last = rows[-1][0]

        def write(c: Any, rows: list[tuple] = rows, chunk_last: int = chunk_last) -> None:
            with c.transaction():
                with c.cursor().copy(f"COPY calls ({', '.join(cols)}) FROM STDIN") as copy:
                    for r in rows:
                        copy.write_row(r[1:])
                c.execute("INSERT INTO imported (source, what, value) VALUES (%s, 'calls', %s) "
                          "ON CONFLICT (source, what) DO UPDATE SET value = excluded.value", (source, chunk_last))

        dst._run(write)
        last_id, copied = chunk_last, copied + len(rows)
        if progress:
            progress(copied, total)
    out["calls"] = copied
    out["reconciliations"] = _copy_reconciliations(src, dst, source)
    return out


# What a reconcile changes on a ``calls`` row (``SQLiteStore.reconcile_call``).
_RECONCILED_COLS = ("cost_status", "cost_usd", "cost_nanos", "currency", "amount", "note", "flagged", "reconciled_at")


def _copy_reconciliations(src: SQLiteStore | _ReadOnly, dst: PostgresStore, source: str) -> int:
    """Copy the ``reconciliations`` records written since the last run. Calls get new ids in the
    fleet, so each record finds its call by what the call was (ts, vendor, method, host, path,
    object id), and that call's cost columns are set from the box's row: a call reconciled on the
    box after it was copied carries the settled cost in the fleet too. A record whose call is not
    in the fleet (it was never copied) keeps ``call_id`` NULL rather than pointing at another row."""
    if not src.read("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'reconciliations'"):
        return 0
    last = dst._run(lambda c: c.execute("SELECT value FROM imported WHERE source = %s AND what = 'reconciliations'",
                                        (source,)).fetchone())
    last_id = last[0] if last else 0
    cols = ", ".join(RECONCILIATION_COLUMNS)
    rows = src.read(f"SELECT id, {cols} FROM reconciliations WHERE id > ? ORDER BY id", (last_id,))
    if not rows:
        return 0
    call_ix = RECONCILIATION_COLUMNS.index("call_id")
    calls = {r[0]: r[1:] for r in src.read(
        f"SELECT id, ts, vendor, method, host, path, object_id, {', '.join(_RECONCILED_COLS)} FROM calls "
        f"WHERE id IN ({','.join('?' * len({r[1 + call_ix] for r in rows}))})",
        tuple({r[1 + call_ix] for r in rows}))}

    def write(c: Any) -> None:
        with c.transaction():
            for r in rows:
                rec = list(r[1:])
                call = calls.get(rec[call_ix])
                new_id = None
                if call is not None:
                    found = c.execute(
                        "SELECT id FROM calls WHERE ts = %s AND vendor IS NOT DISTINCT FROM %s AND method = %s "
                        "AND host = %s AND path = %s AND object_id IS NOT DISTINCT FROM %s ORDER BY id LIMIT 1",
                        call[:6]).fetchone()
                    if found:
                        new_id = found[0]
                        c.execute(f"UPDATE calls SET {', '.join(f'{k} = %s' for k in _RECONCILED_COLS)} "
                                  "WHERE id = %s", (*call[6:], new_id))
                rec[call_ix] = new_id
                c.execute(f"INSERT INTO reconciliations ({cols}) VALUES ({', '.join(['%s'] * len(rec))})", rec)
            c.execute("INSERT INTO imported (source, what, value) VALUES (%s, 'reconciliations', %s) "
                      "ON CONFLICT (source, what) DO UPDATE SET value = excluded.value", (source, rows[-1][0]))

    dst._run(write)
    return len(rows)
