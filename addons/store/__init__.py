"""The ledger behind one contract: keys, budget, approvals and calls.

Every part of spendgate (stages, CLI, admin API, metrics) talks to a :class:`Store`, which is
the sum of four small protocols; nothing probes a backend for optional methods. Two backends
implement it, and one contract test suite (``tests/test_store_contract.py``) runs against both:

- ``sqlite.py``: the embedded default, one box (a path: ``data/spendgate.db``);
- ``postgres.py``: fleet mode, N gateway replicas on one database (``postgresql://…``).

``open_store(url)`` picks the backend by the ledger's name: a ``postgresql://`` (or
``postgres://``) URL means PostgreSQL, anything else is a SQLite path.

**Holds of a dead gateway** (one rule for both backends): every gateway process registers an
*instance* (its replica name, host, pid) and heartbeats it. When an instance is silent past the
lease (``--lease``, 30 s by default), or is known dead (same host, pid gone), any live gateway
recovers its holds: a hold whose request had been forwarded becomes spend at its estimate, with a
``calls`` row (``cost_status=unknown``, flagged: the vendor may have acted), and a hold never
forwarded (waiting for an approval) is released.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from hmac import compare_digest
from typing import Any, Protocol

from .. import clock

TOKEN_PREFIX = "vk_"


def new_token() -> str:
    """A vault key: ``vk_`` + 43 URL-safe characters (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """Vault keys are stored as SHA-256 only. They carry 256 random bits, so a fast hash
    is enough (no password stretching needed) and keeps the per-request lookup cheap."""
    return hashlib.sha256(token.encode()).hexdigest()


def now() -> datetime:
    return clock.now()


def iso(dt: datetime | None) -> str | None:
    return dt.astimezone(UTC).isoformat(timespec="milliseconds") if dt else None


@dataclass(frozen=True)
class KeyRecord:
    id: str
    policy: str
    token_sha256: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    cap_usd: Decimal | None = None
    source: str = "issued"  # "issued" (CLI/API) or "static" (policy file)

    def state(self, at: datetime | None = None) -> str:
        """``active``, ``revoked`` or ``expired``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (at or now()) >= self.expires_at:
            return "expired"
        return "active"

    @functools.cached_property
    def labels_json(self) -> str:
        """The labels as the ledger stores them (sorted JSON)."""
        return json.dumps(self.labels, sort_keys=True)

    def public(self) -> dict[str, Any]:
        """What `keys show`/`--json` and the admin API print: never the hash."""
        return {
            "id": self.id,
            "policy": self.policy,
            "labels": self.labels,
            "state": self.state(),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "cap_usd": str(self.cap_usd) if self.cap_usd is not None else None,
            "source": self.source,
        }


@dataclass(frozen=True)
class Reservation:
    """Money held against budget scopes until the call's real cost is known."""

    id: str
    nanos: int
    scopes: tuple[str, ...]
    left_nanos: int | None = None  # the tightest scope's room after this hold, as its transaction saw it


@dataclass(frozen=True)
class Settle:
    """Queue item: replace a hold by the real cost (0 releases it)."""

    reservation: Reservation
    actual_nanos: int


@dataclass(frozen=True)
class Usage:
    """Queue item: spend that was never held (report-only mode), added to every scope."""

    scopes: tuple[str, ...]
    nanos: int


@dataclass(frozen=True)
class CallRow:
    """Queue item: one ``calls`` row."""

    row: dict[str, Any]


LedgerItem = Settle | Usage | CallRow


@dataclass(frozen=True)
class Reconciliation:
    """A cost settled later (``spendgate reconcile``): the vendor's final figure replaces the estimate
    a ``calls`` row was counted at. ``old_nanos`` is what the budgets counted (the cost, else the
    estimate): the row is changed only if it still says so, so two runs never count one fix twice."""

    call_id: int
    vendor: str
    object_id: str
    from_status: str  # estimated | unknown
    to_status: str  # parsed | zero
    old_nanos: int
    new_nanos: int
    new_usd: str  # exact decimal string, as the row stores it
    currency: str | None
    amount: str | None
    note: str
    scopes: tuple[str, ...]  # every budget scope the call counted in
    source: str  # what answered: "GET /v1/payment_intents/pi_…" (never a credential)
    by: str = "cli"  # "cli", or the gateway replica that ran it

    @property
    def delta_nanos(self) -> int:
        return self.new_nanos - self.old_nanos


# ``reconciliations`` columns (both backends), in order.
RECONCILIATION_COLUMNS = ("ts", "call_id", "vendor", "object_id", "from_status", "to_status", "old_usd",
                          "old_nanos", "new_usd", "new_nanos", "delta_usd", "delta_nanos", "source", "reconciled_by",
                          "note")


def reconciliation_row(fix: Reconciliation, ts: str) -> tuple[Any, ...]:
    from ..money import from_nanos, plain

    return (ts, fix.call_id, fix.vendor, fix.object_id, fix.from_status, fix.to_status,
            plain(from_nanos(fix.old_nanos)), fix.old_nanos, fix.new_usd, fix.new_nanos,
            plain(from_nanos(fix.delta_nanos)), fix.delta_nanos, clean_text(fix.source[:300]), fix.by,
            clean_text(fix.note[:500]))


def reconciled_note(fix: Reconciliation) -> str:
    """The row's note after a reconcile: the vendor's figure, and what it replaced."""
    from ..money import fmt_usd, from_nanos

    return clean_text(f"reconciled from {fix.from_status} {fmt_usd(from_nanos(fix.old_nanos))}: {fix.note}")[:500]


@dataclass(frozen=True)
class LoopCheck:
    """The loop breaker's question for one priced request (see :meth:`BudgetStore.loop_hit`)."""

    fingerprint: bytes
    idem: str | None
    repeats: int
    window: float


@dataclass(frozen=True)
class Admission:
    """What :meth:`BudgetStore.admit` decided: the loop breaker's answer, then the hold (or the
    scope that refused it), and the tightest scope's room as the same transaction saw it."""

    looped: bool = False
    reservation: Reservation | None = None
    refused: CapExceeded | None = None
    left_nanos: int | None = None  # after the hold; None when no scope applies (or nothing was checked)
    key_state: str | None = None  # asked with ``key=``: "active", else "revoked"/"unknown" and nothing done


@dataclass(frozen=True)
class RateCheck:
    """The rate limiter's question for one request (see :meth:`BudgetStore.rate_hit`)."""

    name: str
    limit: int
    period: float


@dataclass(frozen=True)
class Precheck:
    """What :meth:`BudgetStore.precheck` found: the key's state now; if active, the rate limiter's
    wait (0: allowed and counted); if allowed, the room left in the caps it was given."""

    key_state: str  # active | revoked | unknown (no row with this id and token hash)
    wait: float = 0.0
    caps: dict[str, int] | None = None  # the caps whose room was read (None: not read)
    left_nanos: int | None = None  # the tightest of them (None: no scope)


class StoreUnavailable(Exception):
    """The ledger database cannot be reached (or answered too late): the call fails closed with
    503 ``store_unavailable``."""


class WouldBlock(Exception):
    """``key_by_token(token, wait=False)`` could not answer without waiting on the database (a
    cache miss on PostgreSQL, a lock in the way on SQLite): ask again off the event loop."""


class SchemaError(Exception):
    """The ledger's schema is newer than this code, or cannot be upgraded."""


class CapExceeded(Exception):
    def __init__(self, scope: str, cap_nanos: int, used_nanos: int) -> None:
        super().__init__(scope)
        self.scope, self.cap_nanos, self.used_nanos = scope, cap_nanos, used_nanos


# The ``calls`` columns (SPEC §6), in order, with their Python types; both backends use them.
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
    # The vendor's id of the object the call created (SM…, CA…, pi_…, batch_…, msgbatch_…), when its
    # final cost can be asked for later (``spendgate reconcile``).
    "object_id": str,
    "scopes": str,  # JSON list: the budget scopes the call counted in (a reconcile corrects each)
    "reconciled_at": str,  # when ``spendgate reconcile`` replaced an estimate by the vendor's figure
}

# Fields of a would-be ``calls`` row a hold carries, so a recovered hold gets a proper row.
HOLD_FIELDS = ("flow_id", "key_id", "policy", "labels", "vendor", "method", "host", "path", "currency")
DEFAULT_LEASE = 30.0  # seconds a gateway instance may be silent before its holds are recovered


def clean_text(value: Any) -> Any:
    """A value as both databases can store it. mitmproxy decodes raw non-UTF-8 bytes (in an agent's
    path, a vendor's header) to lone surrogates, which neither accepts: keep them as backslash
    escapes; PostgreSQL text cannot hold NUL either."""
    if isinstance(value, str):
        if not value.isascii():  # (a flag of the string: no scan) only non-ASCII text can hold a surrogate
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value.replace("\x00", "\\x00") if "\x00" in value else value
    return value


def recovered_row(meta: dict[str, Any], nanos: int, created_at: str, replica: str,
                  scopes: Iterable[str] = ()) -> dict[str, Any]:
    """The ``calls`` row of a forwarded hold whose gateway died: spend at its estimate, flagged."""
    from ..money import from_nanos, plain

    return {
        **{k: meta.get(k) for k in HOLD_FIELDS}, "ts": created_at, "status": None,
        "decision": "allow", "reason": None, "estimated_usd": plain(from_nanos(nanos)),
        "estimated_nanos": nanos, "cost_usd": None, "cost_nanos": None, "cost_status": "unknown",
        "flagged": 1, "note": f"gateway {replica} stopped before the answer; counted at the estimate",
        "labels": meta.get("labels") or "{}", "scopes": json.dumps(list(scopes)),
    }


class KeyStore(Protocol):
    """Vault keys: stored as a SHA-256 only; a revoke is seen by the next request everywhere."""

    def issue_key(
        self, policy: str, ttl_seconds: int | None, cap_usd: Decimal | None = None,
        labels: dict[str, str] | None = None,
    ) -> tuple[KeyRecord, str]: ...
    def key_by_token(self, token: str, wait: bool = True) -> KeyRecord | None:
        """The key with this token, or None. ``wait=False`` (the event loop): answer only if no
        wait on the database is needed, else raise :class:`WouldBlock`."""
        ...
    def get_key(self, key_id: str) -> KeyRecord | None: ...
    def list_keys(self) -> list[KeyRecord]: ...
    def revoke(self, key_id: str) -> bool:
        """True if the key exists (revoked now or before)."""
        ...
    def revoke_by_labels(self, labels: dict[str, str]) -> list[str]: ...
    def sync_static_keys(self, keys: list[KeyRecord]) -> None:
        """Add the policy file's static keys; a key revoked by the CLI stays revoked."""
        ...


class BudgetStore(Protocol):
    """Budget counters per scope (spent + held), holds, and the fleet-wide limits."""

    def reserve(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                forwarded: bool = True) -> Reservation:
        """Hold ``nanos`` on every scope of ``caps`` (scope → cap) in one transaction, or on none
        (:class:`CapExceeded` names the first scope that would overshoot). ``hold`` carries the
        would-be ``calls`` row (:data:`HOLD_FIELDS`) for a recovery; ``forwarded=False`` marks a
        request that will wait (an approval) before it is sent."""
        ...
    def mark_forwarded(self, reservation: Reservation) -> None:
        """The held request is about to be sent (an approval was granted)."""
        ...
    def settle(self, reservation: Reservation, actual_nanos: int) -> None:
        """Replace a hold by the real cost (0 releases it); queued; settling twice counts once."""
        ...
    def add_usage(self, nanos: int, scopes: Iterable[str]) -> None:
        """Count spend that was never held (report-only mode); queued."""
        ...
    def used(self, scope: str) -> int: ...
    def reconcile_call(self, fix: Reconciliation) -> bool:
        """Settle a call's cost later, in ONE transaction: if its row still has ``fix.from_status``
        and was counted at ``fix.old_nanos``, set its cost (status, amount, note, ``reconciled_at``),
        add ``fix.delta_nanos`` to every scope of ``fix.scopes`` (never below 0), and record the
        change in ``reconciliations``. False, and nothing changed, if the row moved on meanwhile."""
        ...
    def used_by_scope(self, scopes: Iterable[str]) -> dict[str, int]: ...
    def heartbeat(self) -> None:
        """Register (first call) or refresh this gateway instance's lease."""
        ...
    def recover_holds(self) -> tuple[int, int]:
        """Settle the holds of dead gateway instances: (counted at estimate, released)."""
        ...
    def rate_hit(self, name: str, limit: int, period: float) -> float:
        """GCRA: 0 if a request under ``limit``/``period`` is allowed (and counted), else the
        seconds to wait. Per process on SQLite, across the fleet on PostgreSQL."""
        ...
    def loop_hit(self, fingerprint: bytes, idem: str | None, repeats: int, window: float) -> bool:
        """Has this priced request been seen ``repeats`` times within ``window`` seconds? (A retry
        with an Idempotency-Key already seen is not a repeat.) Counts it if not."""
        ...
    def admit(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
              forwarded: bool = True, loop: LoopCheck | None = None,
              hold_if_looped: bool = False, key: KeyRecord | None = None) -> Admission:
        """The budget stage's database work for one request, in one round trip where the backend
        has round trips: with ``key``, its state now first (not active: ``key_state`` says so and
        nothing else is done); ``loop_hit`` (if ``loop``); unless it looped (and not ``hold_if_looped``:
        report mode goes on), ``reserve(nanos, caps, …)`` if ``nanos`` > 0, else the room left in
        ``caps`` (for the remaining-budget header). The same answers as those calls in that order."""
        ...
    def admit_now(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                  forwarded: bool = True, loop: LoopCheck | None = None,
                  hold_if_looped: bool = False, key: KeyRecord | None = None) -> Admission | None:
        """:meth:`admit` if it can be answered at once, without waiting for a lock or the network
        (it then runs on the event loop); else None, having done nothing."""
        ...
    async def admit_async(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                          forwarded: bool = True, loop: LoopCheck | None = None,
                          hold_if_looped: bool = False, key: KeyRecord | None = None,
                          timeout: float = 2.0) -> Admission:
        """:meth:`admit` awaited on the running event loop without blocking it (PostgreSQL: its
        socket); :class:`StoreUnavailable` past ``timeout`` seconds, and a hold the call then no
        longer needs is given back once its statement ends."""
        ...
    def precheck(self, key: KeyRecord, rate: RateCheck | None, caps: dict[str, int]) -> Precheck:
        """What a request needs before the budget stage, in one round trip where the backend has
        round trips: the key's state as the database says now (``key_state``: a revoke committed
        before this call is seen); if active, ``rate_hit`` (if ``rate``); if allowed (wait 0), the
        room left in ``caps``, read as :meth:`admit` with nothing to hold reads it. A key that is not
        active counts nothing."""
        ...
    async def precheck_async(self, key: KeyRecord, rate: RateCheck | None, caps: dict[str, int],
                             timeout: float) -> Precheck:
        """:meth:`precheck` awaited on the running event loop without blocking it (PostgreSQL: its
        socket; the others answer at once); :class:`StoreUnavailable` past ``timeout`` seconds."""
        ...


class ApprovalStore(Protocol):
    """Calls held for a human: decidable from any gateway, the CLI or the admin API."""

    def add_approval(self, row: dict[str, Any]) -> None: ...
    def approval_status(self, approval_id: str) -> str | None: ...
    def decide_approval(self, approval_id: str, status: str, by: str) -> bool:
        """Set a pending approval to approved/denied/timeout; False if it was not pending."""
        ...
    def list_approvals(self, status: str | None = "pending") -> list[dict[str, Any]]: ...


class Ledger(Protocol):
    """The ``calls`` table: rows written behind (group commit), read by reports."""

    dialect: str  # "sqlite" | "postgres": the SQL the reports speak
    url: str  # the path or URL it was opened with
    available: bool  # False during an outage (database unreachable, disk full, read-only)
    outages: int  # outages since the store was opened

    def record_call(self, row: dict[str, Any], on_commit: Callable[[], None] | None = None) -> None:
        """Queue a row; ``on_commit`` runs (on the writer thread) once it is committed."""
        ...
    def record_call_now(self, row: dict[str, Any]) -> bool:
        """Commit a row on the calling thread if that cannot wait (SQLite: its write lock is free this
        instant); False, having done nothing, otherwise: then :meth:`record_call` queues it."""
        ...
    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A read-only query (``?`` placeholders) for reports."""
        ...
    @property
    def queue_depth(self) -> int:
        """Rows and settlements waiting for the writer."""
        ...
    def check_writable(self) -> None:
        """Raise :class:`SchemaError` naming the ledger and the problem if it cannot be written."""
        ...
    def flush(self, timeout: float = 10.0) -> None: ...
    def close(self) -> None: ...


class Store(KeyStore, BudgetStore, ApprovalStore, Ledger, Protocol):
    """The whole contract: what a backend implements and ``tests/test_store_contract.py`` checks."""

    replica: str
    lease: float
    # key_by_token may answer from a cache (PostgreSQL: invalidated by NOTIFY, so a revoke reaches
    # it a few ms after its commit): the stages then pass ``key=`` to the round trip a request
    # makes anyway (precheck, admit), so that a revoke is provably refused on the next request.
    keys_cached: bool


def key_state_now(store: KeyStore, key: KeyRecord) -> str:
    """The key's state as the ledger says now: ``active``, ``revoked``, or ``unknown`` (no row
    with this id and token hash). (Expiry is the record's own ``state()``: it never changes.)"""
    row = store.get_key(key.id)
    if row is None or not compare_digest(row.token_sha256, key.token_sha256):
        return "unknown"
    return "revoked" if row.revoked_at is not None else "active"


def precheck_stepwise(store: Store, key: KeyRecord, rate: RateCheck | None, caps: dict[str, int]) -> Precheck:
    """:meth:`BudgetStore.precheck` as its steps (a backend whose steps cost no round trip)."""
    state = key_state_now(store, key)
    if state != "active":
        return Precheck(state)
    wait = store.rate_hit(rate.name, rate.limit, rate.period) if rate is not None else 0.0
    if wait > 0:
        return Precheck(state, wait)
    left = None
    if caps:
        used = store.used_by_scope(caps)
        left = min(cap - used[scope] for scope, cap in caps.items())
    return Precheck(state, 0.0, dict(caps), left)


def admit_stepwise(store: Store, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                   forwarded: bool = True, loop: LoopCheck | None = None,
                   hold_if_looped: bool = False, key: KeyRecord | None = None) -> Admission:
    """:meth:`BudgetStore.admit` as its steps, for a backend whose steps cost no round trip (the
    loop breaker in memory, a local SQLite file)."""
    state = None if key is None else key_state_now(store, key)
    if state not in (None, "active"):
        return Admission(key_state=state)
    looped = loop is not None and store.loop_hit(loop.fingerprint, loop.idem, loop.repeats, loop.window)
    if looped and not hold_if_looped:
        return Admission(looped=True, key_state=state)
    if nanos > 0:
        try:
            res = store.reserve(nanos, caps, hold, forwarded)
        except CapExceeded as e:
            return Admission(looped, refused=e, left_nanos=max(0, e.cap_nanos - e.used_nanos), key_state=state)
        return Admission(looped, res, left_nanos=res.left_nanos, key_state=state)
    if not caps:
        return Admission(looped, key_state=state)
    used = store.used_by_scope(caps)
    return Admission(looped, left_nanos=min(cap - used[scope] for scope, cap in caps.items()), key_state=state)


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str, replica: str | None = None, lease: float = DEFAULT_LEASE) -> Store:
    """The backend for ``url``: PostgreSQL for a ``postgresql://`` URL; ``:memory:``, a throwaway
    ledger in this process (replay, tests); else a SQLite file."""
    if url == ":memory:":
        from .memory import MemoryStore

        return MemoryStore(replica=replica, lease=lease)
    if is_postgres(url):
        from .postgres import PostgresStore

        return PostgresStore(url, replica=replica, lease=lease)
    from .sqlite import SQLiteStore

    return SQLiteStore(url, replica=replica, lease=lease)


def default_replica() -> str:
    import socket

    return socket.gethostname()


def redact_url(url: str, text: str | None = None) -> str:
    """``postgresql://user:secret@host/db`` → ``postgresql://user:***@host/db`` (for logs), and a
    ``password=`` in its query string too. With ``text`` (an error message about ``url``, which
    libpq may quote whole): ``text`` with every password ``url`` holds masked."""
    import re
    from urllib.parse import parse_qsl, unquote

    secrets_ = []
    at = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*:(.*)@", url.split("?", 1)[0])
    if at:
        secrets_.append(at.group(1))
    if "?" in url:
        secrets_ += [v for k, v in parse_qsl(url.split("?", 1)[1], keep_blank_values=True) if k == "password"]
    out = url if text is None else text
    for secret in secrets_:
        for form in {secret, unquote(secret)}:
            if form:
                out = out.replace(form, "***")
    if text is None:  # also a malformed userinfo the patterns above did not catch
        out = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", out)
    return re.sub(r"(?i)(password=)[^&\s]+", r"\1***", out)


class Stepwise:
    """:meth:`BudgetStore.admit` and :meth:`BudgetStore.precheck` as their steps, for a backend
    whose steps cost no round trip (memory, a local SQLite file); mixed into those stores."""

    def admit(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
              forwarded: bool = True, loop: LoopCheck | None = None,
              hold_if_looped: bool = False, key: KeyRecord | None = None) -> Admission:
        return admit_stepwise(self, nanos, caps, hold, forwarded, loop, hold_if_looped, key)  # type: ignore[arg-type]

    def precheck(self, key: KeyRecord, rate: RateCheck | None, caps: dict[str, int]) -> Precheck:
        return precheck_stepwise(self, key, rate, caps)  # type: ignore[arg-type]

    async def precheck_async(self, key: KeyRecord, rate: RateCheck | None, caps: dict[str, int],
                             timeout: float) -> Precheck:
        return self.precheck(key, rate, caps)  # (not asked: keys_cached is False)

    async def admit_async(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                          forwarded: bool = True, loop: LoopCheck | None = None,
                          hold_if_looped: bool = False, key: KeyRecord | None = None,
                          timeout: float = 2.0) -> Admission:
        return self.admit(nanos, caps, hold, forwarded, loop, hold_if_looped, key)  # (asked of PostgreSQL only)
