"""SQLite ledger (via sqlite-utils), safe to share between the gateway, the CLI and
other gateway processes on the same machine.

- WAL mode: readers (reports, Datasette) never block the gateway.
- Key lookups read the ``keys`` table on every request, unless ``PRAGMA data_version`` says no
  other connection committed anything since: a revoke committed by the CLI (or any process) is
  seen by the very next request.
- Budget reservations are one ``BEGIN IMMEDIATE`` transaction: the check and the
  hold are atomic across processes.
- Nothing on mitmproxy's event loop ever waits for a lock: the loop writes (a hold, a call's row
  with its settle: ``admit_now``, ``record_call_now``) on a connection with no busy timeout, only
  when the write lock is free that instant (then it is a few statements on a local file, cheaper
  than a hop to a thread); otherwise the hold runs on a worker thread and the row goes through a
  queue written by one writer thread, in batches (group commit). Either way the record stage holds
  an answer until its row is committed: a ``kill -9`` then loses no row of an answered call.
- Rate limits and the loop breaker are per process (``limits.py``): one box, one gateway.
- ``schema_version`` records the schema; :data:`MIGRATIONS` upgrade an older ledger under the
  write lock, and a newer one is refused (:class:`SchemaError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from hmac import compare_digest
from pathlib import Path
from typing import Any

from . import (
    CALL_COLUMNS,
    DEFAULT_LEASE,
    HOLD_FIELDS,
    RECONCILIATION_COLUMNS,
    Admission,
    CallRow,
    CapExceeded,
    KeyRecord,
    LedgerItem,
    LoopCheck,
    Reconciliation,
    Reservation,
    SchemaError,
    Settle,
    Stepwise,
    StoreUnavailable,
    Usage,
    WouldBlock,
    clean_text,
    default_replica,
    hash_token,
    iso,
    new_token,
    now,
    reconciled_note,
    reconciliation_row,
    recovered_row,
)
from .limits import Gcra, LoopBreaker

log = logging.getLogger("spendgate")

FLUSH_INTERVAL = 0.05  # seconds the idle writer thread waits for work (a new row wakes it at once)
BUSY_TIMEOUT_MS = 5000
# Rows committed on the event loop (whose connection never checkpoints) before the writer thread
# checkpoints the WAL (about 1 000 WAL pages, as SQLite's automatic checkpoint would).
CHECKPOINT_EVERY = 250
CHECKPOINT_WAIT_MS = 100  # how long that checkpoint waits for a writer or a reader in its way



def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _notify(batch: list[tuple[LedgerItem, Callable[[], None] | None]]) -> None:
    for _, on_commit in batch:
        if on_commit is not None:
            try:
                on_commit()
            except Exception:  # e.g. the event loop is gone at shutdown
                log.exception("ledger: commit callback failed")


def _busy(e: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: another connection holds the lock (not a broken ledger)."""
    return (getattr(e, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


@functools.cache
def _hold_sql(n: int) -> str:
    """Add a hold to ``n`` scopes' counters (a counter is created at its first use) and return each
    scope's total after it (spent + held): one statement for every scope of a call."""
    return ("INSERT INTO counters (scope, used_nanos, reserved_nanos, updated_at) VALUES "
            + ", ".join(["(?, 0, ?, ?)"] * n)
            + " ON CONFLICT(scope) DO UPDATE SET reserved_nanos = reserved_nanos + excluded.reserved_nanos, "
            "updated_at = excluded.updated_at RETURNING scope, used_nanos + reserved_nanos")


@functools.lru_cache(maxsize=1024)
def _scopes_json(scopes: tuple[str, ...]) -> str:
    return json.dumps(scopes)


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


def _why_unwritable(path: str) -> str:
    """What SQLite's "unable to open database file" leaves out: a read-only filesystem or
    directory (a WAL ledger needs to create its -wal and -shm files next to it)."""
    where = Path(path).resolve().parent
    try:
        if os.statvfs(where).f_flag & os.ST_RDONLY:
            return f" (the filesystem of {where} is mounted read-only)"
    except OSError:
        return ""
    if not os.access(where, os.W_OK):
        return f" ({where} is not writable by this user)"
    return ""


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
    return conn


SCHEMA_VERSION = 2


_TYPES = {int: "INTEGER", str: "TEXT", float: "REAL"}

def _add_call_columns(conn: sqlite3.Connection) -> None:
    """``calls`` gains the columns it lacks (``model``, ``tool``; a ledger written by a build
    between versions may have some already)."""
    have = {r[1] for r in conn.execute('PRAGMA table_info("calls")')}
    for name, kind in CALL_COLUMNS.items():
        if name not in have:
            conn.execute(f'ALTER TABLE "calls" ADD COLUMN "{name}" {_TYPES[kind]}')


# version → the steps that bring the schema to it (raw SQL or a function of the connection; all
# of a migration runs inside one transaction).
MIGRATIONS: dict[int, list[str | Callable[[sqlite3.Connection], None]]] = {
    1: [  # the first schema (ledgers from before versions were recorded are at 1)
        'CREATE TABLE IF NOT EXISTS "keys" ("id" TEXT PRIMARY KEY, "policy" TEXT, "token_sha256" TEXT, '
        '"labels" TEXT, "created_at" TEXT, "expires_at" TEXT, "revoked_at" TEXT, "cap_usd" TEXT, "source" TEXT)',
        'CREATE UNIQUE INDEX IF NOT EXISTS "idx_keys_token_sha256" ON "keys" ("token_sha256")',
        'CREATE TABLE IF NOT EXISTS "calls" ("id" INTEGER PRIMARY KEY, "ts" TEXT, "flow_id" TEXT, "key_id" TEXT, '
        '"policy" TEXT, "labels" TEXT, "vendor" TEXT, "method" TEXT, "host" TEXT, "path" TEXT, "status" INTEGER, '
        '"decision" TEXT, "reason" TEXT, "estimated_usd" TEXT, "estimated_nanos" INTEGER, "cost_usd" TEXT, '
        '"cost_nanos" INTEGER, "cost_status" TEXT, "flagged" INTEGER, "note" TEXT, "currency" TEXT, '
        '"amount" TEXT, "request_id" TEXT, "latency_ms" REAL)',
        'CREATE INDEX IF NOT EXISTS "idx_calls_ts" ON "calls" ("ts")',
        'CREATE INDEX IF NOT EXISTS "idx_calls_key_id_ts" ON "calls" ("key_id", "ts")',
        'CREATE TABLE IF NOT EXISTS "counters" ("scope" TEXT PRIMARY KEY, "used_nanos" INTEGER, '
        '"reserved_nanos" INTEGER, "updated_at" TEXT)',
        'CREATE TABLE IF NOT EXISTS "approvals" ("id" TEXT PRIMARY KEY, "flow_id" TEXT, "key_id" TEXT, '
        '"policy" TEXT, "vendor" TEXT, "method" TEXT, "path" TEXT, "rule" TEXT, "estimated_usd" TEXT, '
        '"created_at" TEXT, "expires_at" TEXT, "status" TEXT, "decided_by" TEXT, "decided_at" TEXT)',
        'CREATE TABLE IF NOT EXISTS "reservations" ("id" TEXT PRIMARY KEY, "nanos" INTEGER, "scopes" TEXT, '
        '"created_at" TEXT)',
    ],
    2: [  # holds know their gateway instance, whether they were forwarded, and their would-be row
        'ALTER TABLE "reservations" ADD COLUMN "instance" TEXT',
        'ALTER TABLE "reservations" ADD COLUMN "forwarded" INTEGER NOT NULL DEFAULT 1',
        'ALTER TABLE "reservations" ADD COLUMN "meta" TEXT',
        'CREATE TABLE IF NOT EXISTS "instances" ("id" TEXT PRIMARY KEY, "replica" TEXT, "host" TEXT, '
        '"pid" INTEGER, "started_at" TEXT, "heartbeat_at" TEXT)',
    ],
    3: [_add_call_columns],  # model, tool
    4: [_add_call_columns,  # object_id, scopes, reconciled_at: costs settled later (spendgate reconcile)
        'CREATE TABLE IF NOT EXISTS "reconciliations" ("id" INTEGER PRIMARY KEY, "ts" TEXT, "call_id" INTEGER, '
        '"vendor" TEXT, "object_id" TEXT, "from_status" TEXT, "to_status" TEXT, "old_usd" TEXT, '
        '"old_nanos" INTEGER, "new_usd" TEXT, "new_nanos" INTEGER, "delta_usd" TEXT, "delta_nanos" INTEGER, '
        '"source" TEXT, "reconciled_by" TEXT, "note" TEXT)',
        'CREATE INDEX IF NOT EXISTS "idx_reconciliations_call_id" ON "reconciliations" ("call_id")'],
}
SCHEMA_VERSION = max(MIGRATIONS)


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create or upgrade the schema under the write lock (two gateways starting at once migrate
    once); refuse a schema newer than this code knows."""
    conn.execute("PRAGMA journal_mode=WAL")

    def version() -> int:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" in tables:
            return conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        return 1 if "calls" in tables else 0

    if version() == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = version()
        if current > SCHEMA_VERSION:
            raise SchemaError(f"the ledger's schema is version {current}, newer than this spendgate "
                              f"knows ({SCHEMA_VERSION}): upgrade spendgate")
        for v in range(current + 1, SCHEMA_VERSION + 1):
            for step in MIGRATIONS[v]:
                if callable(step):
                    step(conn)
                else:
                    conn.execute(step)
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT)")
        conn.executemany("INSERT OR IGNORE INTO schema_version VALUES (?, ?)",
                         [(v, iso(now())) for v in range(max(current, 1), SCHEMA_VERSION + 1)])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class WriteTurns:
    """This process's writers take turns here before they ask SQLite for its write lock.

    SQLite's busy handler does not wake a waiting connection when the lock is released: it sleeps
    (1 ms, 2 ms, … up to 100 ms) and tries again. The event loop commits whenever the lock is free
    that instant (holds, rows: :meth:`SQLiteStore.admit_now`, :meth:`SQLiteStore.record_call_now`),
    so under load a worker thread sleeping in the busy handler could lose every race for seconds
    and fail its hold (503 ``store_unavailable``). Here a thread waits on a lock that wakes it when
    the holder is done, and once a thread has waited ``PATIENCE`` seconds the loop stops taking its
    fast path (its row goes to the writer, its hold to the pool) until the waiters are through; so
    a thread's wait is bounded by a few commits, and the loop keeps its fast path otherwise.
    SQLite's own busy handler is left to arbitrate between processes only.
    """

    PATIENCE = 0.005

    def __init__(self) -> None:
        self._lock = threading.RLock()  # re-entrant: a write path may call another
        self._count = threading.Lock()
        self.waiting = 0
        self._since: float | None = None  # when the longest-waiting thread began (about)

    @contextlib.contextmanager
    def wait(self) -> Iterator[None]:
        """Wait for this process's turn to write (a thread that may block)."""
        with self._count:
            self.waiting += 1
            if self._since is None:
                self._since = time.monotonic()
        try:
            self._lock.acquire()
        finally:
            with self._count:
                self.waiting -= 1
                self._since = time.monotonic() if self.waiting else None  # the next one's wait begins
        try:
            yield
        finally:
            self._lock.release()

    def try_take(self) -> bool:
        """The event loop's turn, if it is free this instant and no thread has waited past PATIENCE."""
        since = self._since
        if since is not None and time.monotonic() - since > self.PATIENCE:
            return False
        return self._lock.acquire(blocking=False)

    def give_back(self) -> None:
        self._lock.release()


class SQLiteStore(Stepwise):
    dialect = "sqlite"
    keys_cached = False  # key_by_token reads the row on every request

    def __init__(self, path: str, replica: str | None = None, lease: float = DEFAULT_LEASE) -> None:
        self.path = self.url = path
        self.replica = replica or default_replica()
        self.lease = lease
        self.instance = f"{self.replica}/{os.getpid()}/{secrets.token_hex(3)}"
        self._registered = False
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        try:
            ensure_schema(self.conn)
        except sqlite3.Error as e:
            self.close_connections()
            raise SchemaError(f"cannot open the ledger {path}: {e}{_why_unwritable(path)}") from None
        self._queue: queue.SimpleQueue[tuple[LedgerItem, Callable[[], None] | None]] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._stop = threading.Event()
        self._flushed = threading.Condition()
        self._pending = 0
        self.available = True  # False while the writer cannot commit (disk full, read-only, locked)
        self.outages = 0
        self._outage_since = 0.0
        self._up_since = time.monotonic()  # writable without a break since: see recover_holds
        self._state_lock = threading.Lock()
        self._limits = Gcra()
        self._loops = LoopBreaker()
        self._loop_commits = 0  # rows committed on the event loop since the writer's last checkpoint
        self._checkpointing = False  # the writer thread is checkpointing: the loop takes no write lock
        self._turns = WriteTurns()  # this process's writers, in turn (see WriteTurns)
        # hold ids: unique across processes (a random prefix) without a getrandom call per hold
        self._res_prefix = secrets.token_hex(5)
        self._res_serial = itertools.count(1)

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection (the event loop, a worker thread and the writer each have one)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
            self._conns.append(conn)
        return conn

    @property
    def _nowait_conn(self) -> sqlite3.Connection:
        """This thread's connection that never waits: SQLITE_BUSY at once instead of waiting for a
        lock, and no automatic checkpoint (a commit here, a budget hold on the event loop, never
        runs one: the writer thread's commits do)."""
        conn = getattr(self._local, "nowait", None)
        if conn is None:
            conn = self._local.nowait = _connect(self.path)
            conn.execute("PRAGMA busy_timeout=0")
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self._conns.append(conn)
        return conn

    def close_connections(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns.clear()
        self._local = threading.local()

    def check_writable(self) -> None:
        """Raise :class:`SchemaError` naming the path and the problem if the ledger cannot be written."""
        with self._turns.wait():
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                self.conn.execute("CREATE TABLE IF NOT EXISTS _spendgate_probe (x)")
                self.conn.execute("ROLLBACK")
            except sqlite3.Error as e:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise SchemaError(f"cannot write to the ledger {self.path}: {e}") from None

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
        with self._turns.wait():
            verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
            self.conn.execute(
                f"{verb} INTO keys ({self._KEY_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                (rec.id, rec.policy, rec.token_sha256, json.dumps(rec.labels, sort_keys=True),
                 iso(rec.created_at), iso(rec.expires_at), iso(rec.revoked_at),
                 str(rec.cap_usd) if rec.cap_usd is not None else None, rec.source),
            )

    def key_by_token(self, token: str, wait: bool = True) -> KeyRecord | None:
        """``wait=False`` reads on a connection that never waits for a lock (busy timeout 0): a
        WAL reader is not blocked by writers, so this is the rule; SQLITE_BUSY (a lock in its way)
        raises :class:`WouldBlock` instead of stalling the event loop."""
        digest = hash_token(token)
        try:
            if wait:
                row = self.conn.execute(self._KEY_BY_SHA, (digest,)).fetchone()
            else:
                row = self._key_row_now(digest)
        except sqlite3.OperationalError as e:
            if wait:
                raise
            raise WouldBlock(str(e)) from None
        rec = self._key(row)
        # The index lookup already matched; compare again in constant time so the
        # decision never depends on a short-circuiting string comparison.
        if rec is None or not compare_digest(rec.token_sha256, digest):
            return None
        return rec

    _KEY_BY_SHA = f"SELECT {_KEY_COLS} FROM keys WHERE token_sha256 = ?"

    def _key_row_now(self, digest: str) -> tuple | None:
        """The key row, read on the connection that never waits, unless nothing was committed to the
        ledger by any other connection (another process, this gateway's other threads) since this
        connection last read it: ``PRAGMA data_version`` says so (across processes), and this
        connection's own commits (holds, rows, settles) never write ``keys``. A revoke, a new key, an
        expiry change, from anywhere, is therefore read by the next request."""
        conn = self._nowait_conn
        local = self._local
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        rows: dict[str, tuple | None] | None = getattr(local, "key_rows", None)
        if rows is None or local.key_rows_version != version or len(rows) > 10_000:
            rows = local.key_rows = {}
            local.key_rows_version = version
        elif digest in rows:
            return rows[digest]
        row = conn.execute(self._KEY_BY_SHA, (digest,)).fetchone()
        rows[digest] = row
        return row

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self.conn.execute(f"SELECT {self._KEY_COLS} FROM keys WHERE id = ?", (key_id,)).fetchone()
        return self._key(row)

    def list_keys(self) -> list[KeyRecord]:
        rows = self.conn.execute(f"SELECT {self._KEY_COLS} FROM keys ORDER BY created_at").fetchall()
        return [k for k in map(self._key, rows) if k]

    def revoke(self, key_id: str) -> bool:
        with self._turns.wait():
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
        with self._turns.wait():
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

    def reserve(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                forwarded: bool = True) -> Reservation:
        """Hold ``nanos`` against every scope in ``caps`` (scope → cap in nanos), or none.

        Raises :class:`CapExceeded` naming the first scope that would overshoot. One
        ``BEGIN IMMEDIATE`` transaction takes SQLite's write lock, so concurrent
        reservations from other processes are serialised: a cap can't be overshot.
        """
        if not self._registered:
            self.heartbeat()
        conn = self.conn
        with self._turns.wait():
            conn.execute("BEGIN IMMEDIATE")
            with self._hold_transaction(conn):
                res = self._hold(conn, nanos, caps, hold, forwarded)
                conn.execute("COMMIT")
        return res

    @contextlib.contextmanager
    def _hold_transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        """The body of a hold's open transaction: any failure rolls it back, and a SQLite error
        is an outage (logged once per state change) raised as the hold's StoreUnavailable."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._outage(e)
            raise StoreUnavailable(f"the ledger {self.path} cannot take a budget hold: {e}") from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _hold(self, conn: sqlite3.Connection, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None,
              forwarded: bool) -> Reservation:
        """The hold's statements, inside a ``BEGIN IMMEDIATE`` the caller opened (and commits)."""
        ts = iso(now())
        scopes = tuple(caps)
        # One statement adds the hold to every scope and returns each total with it (spent + held);
        # a total over its cap raises, and the caller's ROLLBACK undoes the statement.
        after = dict(conn.execute(_hold_sql(len(scopes)), [x for s in scopes for x in (s, nanos, ts)]).fetchall()) \
            if scopes else {}
        for scope, cap in caps.items():
            if after[scope] > cap:
                raise CapExceeded(scope, cap, after[scope] - nanos)
        res = Reservation(f"res_{self._res_prefix}{next(self._res_serial):06x}", nanos, scopes,
                          left_nanos=min((cap - after[scope] for scope, cap in caps.items()), default=None))
        conn.execute(
            "INSERT INTO reservations (id, nanos, scopes, created_at, instance, forwarded, meta) VALUES (?,?,?,?,?,?,?)",
            (res.id, nanos, _scopes_json(scopes), ts, self.instance, int(forwarded),
             json.dumps({k: (hold or {}).get(k) for k in HOLD_FIELDS})),
        )
        return res

    def admit_now(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                  forwarded: bool = True, loop: LoopCheck | None = None,
                  hold_if_looped: bool = False, key: KeyRecord | None = None) -> Admission | None:
        """:meth:`admit` on the calling thread if SQLite's write lock is free this instant (a hold is
        then a few statements on a local file, ~50 µs, cheaper than a hop to a worker thread);
        None, having done nothing, if it is taken (the writer's commit, another process): then
        :meth:`admit` must run where it may wait."""
        if key is not None:  # (never asked here: keys_cached is False)
            return None
        conn = self._nowait_conn
        if nanos <= 0:  # a read: WAL readers never wait for writers (rare exceptions are SQLITE_BUSY)
            try:
                used = self._used(conn, caps) if caps else {}
            except sqlite3.OperationalError as e:
                if _busy(e):
                    return None
                raise
            looped = loop is not None and self.loop_hit(loop.fingerprint, loop.idem, loop.repeats, loop.window)
            if looped and not hold_if_looped:
                return Admission(looped=True)
            return Admission(looped, left_nanos=min((cap - used[s] for s, cap in caps.items()), default=None))
        if not self._registered or self._checkpointing:
            return None  # the first hold registers this gateway first, off the loop; a checkpoint runs
        if not self._turns.try_take():
            return None  # a thread of this process is writing or waiting to: it goes first
        try:
            return self._admit_now(conn, nanos, caps, hold, forwarded, loop, hold_if_looped)
        finally:
            self._turns.give_back()

    def _admit_now(self, conn: sqlite3.Connection, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None,
                   forwarded: bool, loop: LoopCheck | None, hold_if_looped: bool) -> Admission | None:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if _busy(e):
                return None
            self._outage(e)
            raise StoreUnavailable(f"the ledger {self.path} cannot take a budget hold: {e}") from None
        with self._hold_transaction(conn):
            looped = loop is not None and self.loop_hit(loop.fingerprint, loop.idem, loop.repeats, loop.window)
            if looped and not hold_if_looped:
                conn.execute("ROLLBACK")
                return Admission(looped=True)
            try:
                res = self._hold(conn, nanos, caps, hold, forwarded)
            except CapExceeded as e:
                conn.execute("ROLLBACK")
                return Admission(looped, refused=e, left_nanos=max(0, e.cap_nanos - e.used_nanos))
            conn.execute("COMMIT")
        return Admission(looped, res, left_nanos=res.left_nanos)

    def mark_forwarded(self, reservation: Reservation) -> None:
        with self._turns.wait():
            self.conn.execute("UPDATE reservations SET forwarded = 1 WHERE id = ?", (reservation.id,))

    def settle(self, reservation: Reservation, actual_nanos: int) -> None:
        """Replace a hold by the real cost (0 releases it). Written behind (with the call's row when
        that is committed on the event loop, else by the writer thread): holding a little longer is
        always safe, it can only make a cap stricter for a few milliseconds."""
        self._defer(Settle(reservation, actual_nanos))

    def add_usage(self, nanos: int, scopes: Iterable[str]) -> None:
        """Count spend that was not reserved (e.g. report-only mode); written behind as :meth:`settle`."""
        self._defer(Usage(tuple(scopes), nanos))

    @staticmethod
    def _settle_now(conn: sqlite3.Connection, res_id: str, nanos: int, scopes: Iterable[str],
                    actual: int) -> bool:
        cur = conn.execute("DELETE FROM reservations WHERE id = ?", (res_id,))
        if cur.rowcount == 0:
            return False  # already settled (or recovered): never count twice
        scopes = tuple(scopes)
        if scopes:
            conn.execute(
                "UPDATE counters SET reserved_nanos = max(0, reserved_nanos - ?), used_nanos = used_nanos + ?, "
                f"updated_at = ? WHERE scope IN ({', '.join('?' * len(scopes))})",
                (nanos, actual, iso(now()), *scopes))
        return True

    @staticmethod
    def _add_usage_now(conn: sqlite3.Connection, scopes: Iterable[str], nanos: int) -> None:
        conn.executemany(
            "INSERT INTO counters (scope, used_nanos, reserved_nanos, updated_at) "
            "VALUES (?, ?, 0, ?) ON CONFLICT(scope) DO UPDATE SET "
            "used_nanos = used_nanos + excluded.used_nanos, updated_at = excluded.updated_at",
            [(scope, nanos, iso(now())) for scope in scopes],
        )

    def reconcile_call(self, fix: Reconciliation) -> bool:
        """One ``BEGIN IMMEDIATE`` transaction: the row (if it still says what was counted), every
        scope's counter, and the ``reconciliations`` record."""
        with self._turns.wait():
            ts = iso(now())
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    "UPDATE calls SET cost_status = ?, cost_usd = ?, cost_nanos = ?, currency = coalesce(?, currency), "
                    "amount = ?, note = ?, flagged = 0, reconciled_at = ? "
                    "WHERE id = ? AND cost_status = ? AND decision != 'deny' "
                    "AND coalesce(cost_nanos, estimated_nanos, 0) = ?",
                    (fix.to_status, fix.new_usd, fix.new_nanos, fix.currency, fix.amount, reconciled_note(fix), ts,
                     fix.call_id, fix.from_status, fix.old_nanos))
                if cur.rowcount != 1:
                    conn.execute("ROLLBACK")
                    return False
                delta = fix.delta_nanos
                for scope in sorted(set(fix.scopes)):
                    conn.execute(
                        "INSERT INTO counters (scope, used_nanos, reserved_nanos, updated_at) VALUES (?, max(0, ?), 0, ?) "
                        "ON CONFLICT(scope) DO UPDATE SET used_nanos = max(0, used_nanos + ?), "
                        "updated_at = excluded.updated_at", (scope, delta, ts, delta))
                conn.execute(f"INSERT INTO reconciliations ({', '.join(RECONCILIATION_COLUMNS)}) "
                             f"VALUES ({', '.join('?' * len(RECONCILIATION_COLUMNS))})", reconciliation_row(fix, ts))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return True

    def used(self, scope: str) -> int:
        """Spent plus held in ``scope``, in nanos."""
        return self.used_by_scope([scope])[scope]

    def used_by_scope(self, scopes: Iterable[str]) -> dict[str, int]:
        """Spent plus held, per scope, in one query (0 for a scope never used)."""
        return self._used(self.conn, scopes)

    @staticmethod
    def _used(conn: sqlite3.Connection, scopes: Iterable[str]) -> dict[str, int]:
        out = dict.fromkeys(scopes, 0)
        rows = conn.execute(
            f"SELECT scope, used_nanos + reserved_nanos FROM counters WHERE scope IN ({','.join('?' * len(out))})",
            tuple(out),
        ).fetchall()
        out.update(rows)
        return out

    # ------------------------------------------------------------------ gateway instances, dead holds

    def heartbeat(self) -> None:
        with self._turns.wait():
            ts = iso(now())
            self.conn.execute(
                "INSERT INTO instances (id, replica, host, pid, started_at, heartbeat_at) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (self.instance, self.replica, _HOST, os.getpid(), ts, ts),
            )
            self._registered = True

    def recover_holds(self) -> tuple[int, int]:
        """Settle the holds of dead gateway instances (silent past the lease, or a pid on this host
        that is gone): forwarded → spend at the estimate with a flagged row; not forwarded → released."""
        cutoff = iso(now() - timedelta(seconds=self.lease))
        # Silence means death only to a process that could itself write for a whole lease: after
        # an outage (disk full, a lock) every heartbeat is stale, live processes' too (as on
        # PostgreSQL). Until then: a pid gone on this host, and a clean stop ('').
        trusted = time.monotonic() - self._up_since >= self.lease
        conn = self.conn
        instances = conn.execute("SELECT id, replica, host, pid, heartbeat_at FROM instances").fetchall()
        dead = {iid: replica for iid, replica, host, pid, beat in instances
                if iid != self.instance and ((trusted and beat < cutoff) or beat == ""
                                             or (host == _HOST and not pid_alive(pid)))}
        live = {iid for iid, *_ in instances} - dead.keys()
        rows = conn.execute(
            "SELECT id, nanos, scopes, created_at, instance, forwarded, meta FROM reservations"
        ).fetchall()
        # A hold with no live instance: its gateway is dead, stopped, or older than instances
        # (a ledger from before schema 2: only once older than the lease).
        todo = [r for r in rows if r[4] in dead or (r[4] not in live and r[4] != self.instance
                                                    and (r[4] is not None or r[3] < cutoff))]
        counted = released = 0
        if todo or dead:
            with self._turns.wait():
                counted, released = self._recover(conn, todo, dead)
        return counted, released

    def _recover(self, conn: sqlite3.Connection, todo: list[tuple], dead: dict[str, str]) -> tuple[int, int]:
        """The recovery of :meth:`recover_holds`, one transaction (the caller has this process's write turn)."""
        counted = released = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for rid, nanos, scopes, created, inst, forwarded, meta in todo:
                actual = nanos if forwarded else 0
                if not self._settle_now(conn, rid, nanos, json.loads(scopes), actual):
                    continue
                if forwarded:
                    counted += 1
                    row = recovered_row(json.loads(meta or "{}"), nanos, created,
                                        dead.get(inst) or (inst or "unknown").split("/")[0],
                                        json.loads(scopes))
                    cols = [k for k in CALL_COLUMNS if k != "id"]
                    conn.execute(f"INSERT INTO calls ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                 tuple(clean_text(row.get(k)) for k in cols))
                else:
                    released += 1
                    if flow := json.loads(meta or "{}").get("flow_id"):  # an approval wait: nobody can resume it
                        conn.execute("UPDATE approvals SET status = 'timeout', decided_by = 'recovery', "
                                     "decided_at = ? WHERE status = 'pending' AND flow_id = ?", (iso(now()), flow))
            conn.executemany("DELETE FROM instances WHERE id = ?", [(i,) for i in dead])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return counted, released

    def _retire(self) -> None:
        """A clean stop: this instance's lease ends now (any hold it still has is recovered)."""
        with self._turns.wait():
            if self._registered:
                self.conn.execute("UPDATE instances SET heartbeat_at = '' WHERE id = ?", (self.instance,))

    # ------------------------------------------------------------------ fleet-wide limits (one box here)

    def rate_hit(self, name: str, limit: int, period: float) -> float:
        return self._limits.hit(name, limit, period)

    def loop_hit(self, fingerprint: bytes, idem: str | None, repeats: int, window: float) -> bool:
        return self._loops.repeated(fingerprint, idem, repeats, window)

    # ------------------------------------------------------------------ approvals

    def add_approval(self, row: dict[str, Any]) -> None:
        with self._turns.wait():
            row = {**row, "status": "pending", "created_at": iso(now())}
            cols = ", ".join(row)
            self.conn.execute(f"INSERT INTO approvals ({cols}) VALUES ({', '.join('?' * len(row))})",
                              tuple(row.values()))

    def approval_status(self, approval_id: str) -> str | None:
        row = self.conn.execute("SELECT status FROM approvals WHERE id = ?", (approval_id,)).fetchone()
        return row[0] if row else None

    def decide_approval(self, approval_id: str, status: str, by: str) -> bool:
        """Set a pending approval to approved/denied/timeout; False if it was not pending."""
        with self._turns.wait():
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

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def record_call(self, row: dict[str, Any], on_commit: Callable[[], None] | None = None) -> None:
        """Queue a ``calls`` row; ``on_commit`` is called (from the writer thread) once it is committed."""
        self._submit(CallRow(row), on_commit)

    def record_call_now(self, row: dict[str, Any]) -> bool:
        """Commit ``row`` on the calling thread (the event loop) if SQLite's write lock is free this
        instant, with the settlements and usage this thread deferred since the loop's last turn (a
        call's settle and its row: one transaction); False, having done nothing, if the lock is
        taken (the writer's commit, a hold, another process) or the ledger cannot be written: then
        :meth:`record_call` queues it for the writer thread, which waits and logs outages.

        A local commit (WAL, ``synchronous=NORMAL``: no fsync) is cheaper than the hand-off to the
        writer thread and back (a queue put, a thread wake-up, a self-pipe write to the loop); and
        with every write of a request on this one connection its page cache stays valid."""
        if not self.available or self._checkpointing:
            return False
        if not self._turns.try_take():
            return False  # a thread of this process is writing or waiting to: it goes first
        conn = self._nowait_conn
        held: list[LedgerItem] | None = getattr(self._local, "held", None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._apply(conn, [CallRow(row), *(held or ())])
            conn.execute("COMMIT")
        except Exception:  # the lock is taken (another process), or the row cannot be written here
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return False  # the row goes to the writer (the deferred items at the loop's next turn)
        finally:
            self._turns.give_back()
        if held:
            held.clear()
        self._loop_commits += 1
        if self._writer is None:
            self._start_writer()  # it checkpoints the WAL this connection never does
        return True

    def _defer(self, item: LedgerItem) -> None:
        """On an event loop: hold ``item`` until the loop's next turn, for :meth:`record_call_now` to
        commit with the call's row (then queued for the writer if no row took it); elsewhere: queue it."""
        loop = asyncio._get_running_loop()
        if loop is None:
            self._submit(item)
            return
        held = getattr(self._local, "held", None)
        if held is None:
            held = self._local.held = []
        if not held:
            loop.call_soon(self._submit_held, held)
        held.append(item)

    def _submit_held(self, held: list[LedgerItem]) -> None:
        items = list(held)
        held.clear()
        for item in items:
            self._submit(item)

    def _start_writer(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="spendgate-ledger", daemon=True)
        self._writer.start()

    def _submit(self, item: LedgerItem, on_commit: Callable[[], None] | None = None) -> None:
        if self._writer is None:
            self._start_writer()
        with self._flushed:
            self._pending += 1
        self._queue.put((item, on_commit))

    @property
    def queue_depth(self) -> int:
        return self._pending

    def _write_loop(self) -> None:
        conn = _connect(self.path)
        backoff = 0.0
        while not self._stop.is_set() or not self._queue.empty():
            if backoff:
                self._stop.wait(backoff)
            batch: list[tuple[LedgerItem, Callable[[], None] | None]] = []
            try:
                batch.append(self._queue.get(timeout=FLUSH_INTERVAL))
                while len(batch) < 1000:
                    batch.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            if self._loop_commits >= CHECKPOINT_EVERY:
                self._loop_commits = 0
                self._checkpoint(conn)
            if batch:
                ok = self._write_batch(conn, batch)
                backoff = 0.0 if ok else min(max(backoff * 2, 0.05), 2.0)
                if ok:
                    with self._flushed:
                        self._pending -= len(batch)
                        self._flushed.notify_all()
                else:
                    if self._stop.is_set() and backoff >= 2.0:
                        log.error("ledger: stopping with %d write(s) that could not be committed",
                                  self._pending)
                        return
                    for item in batch:  # keep them, in order, for the retry
                        self._queue.put(item)
        conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL into the database and have the next commit start the WAL over. ``RESTART``,
        not ``PASSIVE``: under a steady stream of commits on the event loop a passive checkpoint
        never sees the WAL complete, and it grows without bound (~40 KB a payment). Meanwhile the
        loop takes no write lock (``_checkpointing``: its holds go to the pool, its rows to this
        thread's queue), so the checkpoint gets the lock at once and holds it a few ms; it waits at
        most ``CHECKPOINT_WAIT_MS`` for a reader or another process in its way (a long report),
        then tries again at the next one."""
        self._checkpointing = True
        try:
            conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
            with self._turns.wait():
                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        except sqlite3.Error:
            pass  # busy past the wait, or failing: the next checkpoint, or the writer's own commits
        finally:
            self._checkpointing = False
            with contextlib.suppress(sqlite3.Error):
                conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _outage(self, error: Exception | None) -> None:
        """One log line per change of state (not one per row) while the ledger cannot be written."""
        if (error is None) == self.available:
            return
        with self._state_lock:
            self._change_state(error)

    def _change_state(self, error: Exception | None) -> None:
        if error is not None and self.available:
            self.available = False
            self.outages += 1
            self._outage_since = time.monotonic()
            log.error("ledger: cannot write %s (%s); holding %d write(s) and retrying with back-off",
                      self.path, error, self._pending)
        elif error is None and not self.available:
            self.available = True
            self._up_since = time.monotonic()
            log.warning("ledger: %s writable again after %.1fs; %d queued write(s) committed",
                        self.path, time.monotonic() - self._outage_since, self._pending)

    def _write_batch(self, conn: sqlite3.Connection,
                     batch: list[tuple[LedgerItem, Callable[[], None] | None]]) -> bool:
        """Commit a batch in one transaction; False (rows kept) if the ledger cannot be written."""
        try:
            self._transaction(self._apply, [item for item, _ in batch], conn=conn)
        except sqlite3.OperationalError as e:  # locked, busy, disk full, read-only: keep the rows
            self._outage(e)
            return False
        except Exception:  # one row that can never be written must not stop the others, or this thread
            if len(batch) > 1:
                for item in batch:
                    if not self._write_batch(conn, [item]):
                        self._queue.put(item)
                        with self._flushed:
                            self._pending += 1
                return True
            log.exception("ledger: dropped a %s that cannot be written", type(batch[0][0]).__name__)
            _notify(batch)  # logged and gone: its answer need not wait any longer
            return True
        self._outage(None)
        _notify(batch)
        return True

    _INSERT_CALL = (f"INSERT INTO calls ({', '.join(k for k in CALL_COLUMNS if k != 'id')}) "
                    f"VALUES ({', '.join('?' * (len(CALL_COLUMNS) - 1))})")

    _CALL_COLS = tuple(k for k in CALL_COLUMNS if k != "id")

    def _apply(self, conn: sqlite3.Connection, items: list[LedgerItem]) -> None:
        """A batch's statements (rows, settlements, usage) inside the caller's transaction."""
        rows = [tuple(clean_text(item.row.get(k)) for k in self._CALL_COLS)
                for item in items if isinstance(item, CallRow)]
        if len(rows) == 1:
            conn.execute(self._INSERT_CALL, rows[0])
        elif rows:
            conn.executemany(self._INSERT_CALL, rows)
        for item in items:
            if isinstance(item, Settle):
                res = item.reservation
                self._settle_now(conn, res.id, res.nanos, res.scopes, item.actual_nanos)
            elif isinstance(item, Usage):
                self._add_usage_now(conn, item.scopes, item.nanos)

    def _transaction(self, fn: Any, *args: Any, conn: sqlite3.Connection | None = None) -> None:
        conn = conn or self.conn
        with self._turns.wait():
            conn.execute("BEGIN IMMEDIATE")
            try:
                fn(conn, *args)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                    conn.execute("ROLLBACK")
                raise

    def flush(self, timeout: float = 10.0) -> None:
        """Block until every queued row is committed."""
        if held := getattr(self._local, "held", None):
            self._submit_held(held)  # deferred on this thread's loop, which may not turn again first
        deadline = time.monotonic() + timeout
        with self._flushed:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0 or not self._flushed.wait(left):
                    break

    def close(self) -> None:
        self.flush()
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=10)
        with contextlib.suppress(sqlite3.Error):
            self._retire()
        self.close_connections()


_HOST = default_replica()
