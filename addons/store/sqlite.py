"""SQLite ledger (via sqlite-utils), safe to share between the gateway, the CLI and
other gateway processes on the same machine.

- WAL mode: readers (reports, Datasette) never block the gateway.
- Key lookups read the ``keys`` table on every request: a revoke committed by the
  CLI is seen by the very next request, with no cache to invalidate.
- Budget reservations are one ``BEGIN IMMEDIATE`` transaction: the check and the
  hold are atomic across processes.
- ``calls`` rows go through a queue written by one writer thread, in batches (group
  commit), so no commit ever runs on mitmproxy's event loop. ``record_call(row, on_commit)`` lets the
  record stage hold an answer until its row is committed: a ``kill -9`` then loses no row
  of an answered call.
"""

from __future__ import annotations

import functools
import json
import queue
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from hmac import compare_digest
from pathlib import Path
from typing import Any

import sqlite_utils

from . import CapExceeded, KeyRecord, Reservation, hash_token, iso, new_token, now

FLUSH_INTERVAL = 0.05  # seconds the idle writer thread waits for work (a new row wakes it at once)
BUSY_TIMEOUT_MS = 5000

CALL_COLUMNS: dict[str, type] = {
    "id": int,
    "ts": str,
    "flow_id": str,
    "key_id": str,
    "policy": str,
    "labels": str,  # JSON object
    "vendor": str,
    "method": str,
    "host": str,
    "path": str,
    "status": int,
    "decision": str,  # allow | deny | would_deny
    "reason": str,
    "estimated_usd": str,  # exact decimal strings; *_nanos are the same as integers for SQL sums
    "estimated_nanos": int,
    "cost_usd": str,
    "cost_nanos": int,
    "cost_status": str,  # parsed | estimated | zero | unknown
    "flagged": int,
    "note": str,
    "currency": str,
    "amount": str,
    "request_id": str,  # the vendor's request id, for support tickets
    "latency_ms": float,
    "model": str,  # the model an LLM request named (stages/models.py)
    "tool": str,  # the MCP tool(s) a tools/call named (stages/tools.py)
}


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _text(value: Any) -> Any:
    """A value as SQLite can store it. mitmproxy decodes raw non-UTF-8 bytes (in an agent's path,
    a vendor's header) to lone surrogates, which sqlite3 refuses: keep them as backslash escapes."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value


def _notify(batch: list[tuple[str, Any, Callable[[], None] | None]]) -> None:
    for _, _, on_commit in batch:
        if on_commit is not None:
            try:
                on_commit()
            except Exception:  # e.g. the event loop is gone at shutdown
                import logging

                logging.getLogger("spendgate").exception("ledger: commit callback failed")


@functools.lru_cache(maxsize=4096)
def _key_record(row: tuple) -> KeyRecord:
    """A ``keys`` row as a KeyRecord (frozen). Cached by the whole row, so a changed row (a revoke,
    a new expiry) is parsed afresh: the request path still reads the row every time."""
    (kid, policy, sha, labels, created, expires, revoked, cap, source) = row
    return KeyRecord(
        id=kid, policy=policy, token_sha256=sha, labels=json.loads(labels or "{}"),
        created_at=_dt(created), expires_at=_dt(expires), revoked_at=_dt(revoked),
        cap_usd=Decimal(cap) if cap is not None else None, source=source or "issued",
    )


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
    return conn


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Create tables and indexes if missing (idempotent, like sqlite-utils' create)."""
    db.enable_wal()
    db["keys"].create(
        {
            "id": str, "policy": str, "token_sha256": str, "labels": str, "created_at": str,
            "expires_at": str, "revoked_at": str, "cap_usd": str, "source": str,
        },
        pk="id", if_not_exists=True,
    )
    db["keys"].create_index(["token_sha256"], unique=True, if_not_exists=True)
    db["calls"].create(CALL_COLUMNS, pk="id", if_not_exists=True)
    have = db["calls"].columns_dict
    for name, kind in CALL_COLUMNS.items():  # a ledger from an older version gains new columns
        if name not in have:
            db["calls"].add_column(name, kind)
    db["calls"].create_index(["ts"], if_not_exists=True)
    db["calls"].create_index(["key_id", "ts"], if_not_exists=True)
    db["counters"].create(
        {"scope": str, "used_nanos": int, "reserved_nanos": int, "updated_at": str},
        pk="scope", if_not_exists=True,
    )
    db["approvals"].create(
        {
            "id": str, "flow_id": str, "key_id": str, "policy": str, "vendor": str, "method": str,
            "path": str, "rule": str, "estimated_usd": str, "created_at": str, "expires_at": str,
            "status": str, "decided_by": str, "decided_at": str,
        },
        pk="id", if_not_exists=True,
    )
    db["reservations"].create(
        {"id": str, "nanos": int, "scopes": str, "created_at": str}, pk="id", if_not_exists=True
    )


class SQLiteStore:
    def __init__(self, path: str) -> None:
        self.path = path
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = _connect(path)
        ensure_schema(sqlite_utils.Database(self.conn))
        # (kind, item, callback after commit): "call" rows and "settle" holds
        self._queue: queue.SimpleQueue[tuple[str, Any, Callable[[], None] | None]] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._stop = threading.Event()
        self._flushed = threading.Condition()
        self._pending = 0

    # ------------------------------------------------------------------ keys

    def _key(self, row: sqlite3.Row | tuple | None) -> KeyRecord | None:
        return None if row is None else _key_record(tuple(row))

    _KEY_COLS = "id, policy, token_sha256, labels, created_at, expires_at, revoked_at, cap_usd, source"

    def issue_key(
        self, policy: str, ttl_seconds: int | None, cap_usd: Decimal | None = None,
        labels: dict[str, str] | None = None,
    ) -> tuple[KeyRecord, str]:
        token = new_token()
        created = now()
        created = created.replace(microsecond=created.microsecond // 1000 * 1000)  # as stored
        rec = KeyRecord(
            id="key_" + secrets.token_hex(6), policy=policy, token_sha256=hash_token(token),
            labels=dict(labels or {}), created_at=created,
            expires_at=created + timedelta(seconds=ttl_seconds) if ttl_seconds else None,
            cap_usd=cap_usd,
        )
        self._insert_key(rec)
        return rec, token

    def _insert_key(self, rec: KeyRecord, or_ignore: bool = False) -> None:
        verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
        self.conn.execute(
            f"{verb} INTO keys ({self._KEY_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
            (rec.id, rec.policy, rec.token_sha256, json.dumps(rec.labels, sort_keys=True),
             iso(rec.created_at), iso(rec.expires_at), iso(rec.revoked_at),
             str(rec.cap_usd) if rec.cap_usd is not None else None, rec.source),
        )

    def key_by_token(self, token: str) -> KeyRecord | None:
        digest = hash_token(token)
        row = self.conn.execute(
            f"SELECT {self._KEY_COLS} FROM keys WHERE token_sha256 = ?", (digest,)
        ).fetchone()
        rec = self._key(row)
        # The index lookup already matched; compare again in constant time so the
        # decision never depends on a short-circuiting string comparison.
        if rec is None or not compare_digest(rec.token_sha256, digest):
            return None
        return rec

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self.conn.execute(f"SELECT {self._KEY_COLS} FROM keys WHERE id = ?", (key_id,)).fetchone()
        return self._key(row)

    def list_keys(self) -> list[KeyRecord]:
        rows = self.conn.execute(f"SELECT {self._KEY_COLS} FROM keys ORDER BY created_at").fetchall()
        return [k for k in map(self._key, rows) if k]

    def revoke(self, key_id: str) -> bool:
        cur = self.conn.execute(
            "UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (iso(now()), key_id)
        )
        return cur.rowcount > 0 or self.get_key(key_id) is not None

    def revoke_by_labels(self, labels: dict[str, str]) -> list[str]:
        revoked = []
        for key in self.list_keys():
            if key.revoked_at is None and all(key.labels.get(k) == v for k, v in labels.items()):
                self.revoke(key.id)
                revoked.append(key.id)
        return revoked

    def sync_static_keys(self, keys: list[KeyRecord]) -> None:
        """Add the policy file's static keys; a key revoked by the CLI stays revoked."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for rec in keys:
                self._insert_key(rec, or_ignore=True)
                self.conn.execute(
                    "UPDATE keys SET policy = ?, labels = ?, cap_usd = ? WHERE id = ? AND source = 'static'",
                    (rec.policy, json.dumps(rec.labels, sort_keys=True),
                     str(rec.cap_usd) if rec.cap_usd is not None else None, rec.id),
                )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ budget counters

    def reserve(self, nanos: int, caps: dict[str, int]) -> Reservation:
        """Hold ``nanos`` against every scope in ``caps`` (scope → cap in nanos), or none.

        Raises :class:`CapExceeded` naming the first scope that would overshoot. One
        ``BEGIN IMMEDIATE`` transaction takes SQLite's write lock, so concurrent
        reservations from other processes are serialised: a cap can't be overshot.
        """
        ts = iso(now())
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            used = self.used_by_scope(caps)
            for scope, cap in caps.items():
                if used[scope] + nanos > cap:
                    raise CapExceeded(scope, cap, used[scope])
            res = Reservation("res_" + secrets.token_hex(8), nanos, tuple(caps),
                              left_nanos=min(cap - used[scope] - nanos for scope, cap in caps.items()))
            for scope in caps:
                self.conn.execute(
                    "INSERT INTO counters (scope, used_nanos, reserved_nanos, updated_at) "
                    "VALUES (?, 0, ?, ?) ON CONFLICT(scope) DO UPDATE SET "
                    "reserved_nanos = reserved_nanos + excluded.reserved_nanos, updated_at = excluded.updated_at",
                    (scope, nanos, ts),
                )
            self.conn.execute(
                "INSERT INTO reservations (id, nanos, scopes, created_at) VALUES (?,?,?,?)",
                (res.id, nanos, json.dumps(res.scopes), ts),
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return res

    def settle(self, reservation: Reservation, actual_nanos: int) -> None:
        """Replace a hold by the real cost (0 releases it). Queued: holding a little
        longer is always safe, it can only make a cap stricter for a few milliseconds."""
        self._submit("settle", (reservation, actual_nanos))

    def _settle_now(self, conn: sqlite3.Connection, reservation: Reservation, actual: int) -> None:
        cur = conn.execute("DELETE FROM reservations WHERE id = ?", (reservation.id,))
        if cur.rowcount == 0:
            return  # already settled (or released as stale): never count twice
        ts = iso(now())
        for scope in reservation.scopes:
            conn.execute(
                "UPDATE counters SET reserved_nanos = max(0, reserved_nanos - ?), "
                "used_nanos = used_nanos + ?, updated_at = ? WHERE scope = ?",
                (reservation.nanos, actual, ts, scope),
            )

    def add_usage(self, nanos: int, scopes: list[str]) -> None:
        """Count spend that was not reserved (e.g. report-only mode)."""
        self._submit("settle", (Reservation("", 0, tuple(scopes)), nanos))

    def used(self, scope: str) -> int:
        """Spent plus held in ``scope``, in nanos."""
        return self.used_by_scope([scope])[scope]

    def used_by_scope(self, scopes: Iterable[str]) -> dict[str, int]:
        """Spent plus held, per scope, in one query (0 for a scope never used)."""
        out = dict.fromkeys(scopes, 0)
        rows = self.conn.execute(
            f"SELECT scope, used_nanos + reserved_nanos FROM counters WHERE scope IN ({','.join('?' * len(out))})",
            tuple(out),
        ).fetchall()
        out.update(rows)
        return out

    def release_stale(self, older_than: timedelta = timedelta(hours=1)) -> int:
        """Release holds left by a gateway that died mid-call (run at start-up)."""
        cutoff = iso(now() - older_than)
        rows = self.conn.execute(
            "SELECT id, nanos, scopes FROM reservations WHERE created_at < ?", (cutoff,)
        ).fetchall()
        for rid, nanos, scopes in rows:
            self._transaction(self._settle_now, Reservation(rid, nanos, tuple(json.loads(scopes))), 0)
        return len(rows)

    def _transaction(self, fn: Any, *args: Any, conn: sqlite3.Connection | None = None) -> None:
        conn = conn or self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            fn(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ approvals

    def add_approval(self, row: dict[str, Any]) -> None:
        row = {**row, "status": "pending", "created_at": iso(now())}
        cols = ", ".join(row)
        self.conn.execute(f"INSERT INTO approvals ({cols}) VALUES ({', '.join('?' * len(row))})",
                          tuple(row.values()))

    def approval_status(self, approval_id: str) -> str | None:
        row = self.conn.execute("SELECT status FROM approvals WHERE id = ?", (approval_id,)).fetchone()
        return row[0] if row else None

    def decide_approval(self, approval_id: str, status: str, by: str) -> bool:
        """Set a pending approval to approved/denied/timeout; False if it was not pending."""
        cur = self.conn.execute(
            "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ? "
            "WHERE id = ? AND status = 'pending'", (status, by, iso(now()), approval_id),
        )
        return cur.rowcount > 0

    def list_approvals(self, status: str | None = "pending") -> list[dict[str, Any]]:
        cur = self.conn.execute(
            "SELECT * FROM approvals" + (" WHERE status = ?" if status else "") + " ORDER BY created_at",
            (status,) if status else (),
        )
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    # ------------------------------------------------------------------ calls (write-behind)

    def record_call(self, row: dict[str, Any], on_commit: Callable[[], None] | None = None) -> None:
        """Queue a ``calls`` row; ``on_commit`` is called (from the writer thread) once it is committed."""
        self._submit("call", row, on_commit)

    def _submit(self, kind: str, item: Any, on_commit: Callable[[], None] | None = None) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="spendgate-ledger", daemon=True)
            self._writer.start()
        with self._flushed:
            self._pending += 1
        self._queue.put((kind, item, on_commit))

    @property
    def queue_depth(self) -> int:
        return self._pending

    def _write_loop(self) -> None:
        conn = _connect(self.path)
        while not self._stop.is_set() or not self._queue.empty():
            batch: list[tuple[str, Any, Callable[[], None] | None]] = []
            try:
                batch.append(self._queue.get(timeout=FLUSH_INTERVAL))
                while len(batch) < 1000:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if batch:
                self._write_batch(conn, batch)
                with self._flushed:
                    self._pending -= len(batch)
                    self._flushed.notify_all()
        conn.close()

    def _write_batch(self, conn: sqlite3.Connection,
                     batch: list[tuple[str, Any, Callable[[], None] | None]]) -> None:
        calls = [item for kind, item, _ in batch if kind == "call"]
        settles = [item for kind, item, _ in batch if kind == "settle"]

        def write(c: sqlite3.Connection) -> None:
            if calls:
                cols = [k for k in CALL_COLUMNS if k != "id"]
                c.executemany(
                    f"INSERT INTO calls ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    [tuple(_text(r.get(k)) for k in cols) for r in calls],
                )
            for res, actual in settles:
                if res.id:
                    self._settle_now(c, res, actual)
                else:
                    for scope in res.scopes:
                        c.execute(
                            "INSERT INTO counters (scope, used_nanos, reserved_nanos, updated_at) "
                            "VALUES (?, ?, 0, ?) ON CONFLICT(scope) DO UPDATE SET "
                            "used_nanos = used_nanos + excluded.used_nanos",
                            (scope, actual, iso(now())),
                        )

        try:
            self._transaction(write, conn=conn)
        except sqlite3.OperationalError as e:  # locked, busy, disk: keep the rows for a retry
            import logging

            logging.getLogger("spendgate").error("ledger write failed (%s); retrying", e)
            for item in batch:
                self._queue.put(item)
                with self._flushed:
                    self._pending += 1
        except Exception:  # one row that can never be written must not stop the others, or this thread
            import logging

            if len(batch) > 1:
                for item in batch:
                    self._write_batch(conn, [item])
            else:
                logging.getLogger("spendgate").exception("ledger: dropped a %s that cannot be written",
                                                         batch[0][0])
                _notify(batch)  # logged and gone: its answer need not wait any longer
        else:
            _notify(batch)

    def flush(self, timeout: float = 10.0) -> None:
        """Block until every queued row is committed."""
        deadline = datetime.now(UTC) + timedelta(seconds=timeout)
        with self._flushed:
            while self._pending > 0:
                left = (deadline - datetime.now(UTC)).total_seconds()
                if left <= 0 or not self._flushed.wait(left):
                    break

    def close(self) -> None:
        self.flush()
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=10)
        self.conn.close()
