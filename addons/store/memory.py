"""A throwaway ledger in memory: ``--db :memory:`` (``spendgate replay`` and in-process tests).

The same operations as the SQLite store, synchronous and deterministic: a settle takes effect
before the next request is checked, a committed row is committed when ``record_call`` returns.
Nothing survives the process; one process only (there is nothing to share): no other gateway
instance can die holding its holds, rate limits and the loop breaker are this process's
(``limits.py``, on the gateway's clock), and ``read`` (reports' SQL) is not offered.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import timedelta
from decimal import Decimal
from hmac import compare_digest
from typing import Any

from . import (
    DEFAULT_LEASE,
    RECONCILIATION_COLUMNS,
    Admission,
    CapExceeded,
    KeyRecord,
    LoopCheck,
    Reconciliation,
    Reservation,
    Stepwise,
    default_replica,
    hash_token,
    iso,
    new_token,
    now,
    reconciled_note,
    reconciliation_row,
)
from .limits import Gcra, LoopBreaker


class MemoryStore(Stepwise):
    path = url = ":memory:"
    dialect = "memory"
    keys_cached = False  # key_by_token reads the row on every request
    available = True  # nothing to be unavailable
    outages = 0

    def __init__(self, keep_calls: bool = True, replica: str | None = None, lease: float = DEFAULT_LEASE) -> None:
        self.replica = replica or default_replica()
        self.lease = lease
        self._limits = Gcra()
        self._loops = LoopBreaker()
        self.keep_calls = keep_calls  # False: rows go to on_record listeners only (memory stays flat)
        self.keys: dict[str, KeyRecord] = {}  # id → key
        self._by_hash: dict[str, str] = {}  # token sha256 → id
        self.counters: dict[str, list[int]] = {}  # scope → [used, reserved]
        self.reservations: dict[str, tuple[Reservation, str]] = {}  # id → (hold, created_at)
        self.approvals: dict[str, dict[str, Any]] = {}
        self.calls: list[dict[str, Any]] = []
        self.reconciliations: list[dict[str, Any]] = []
        self.queue_depth = 0

    # keys
    def issue_key(self, policy: str, ttl_seconds: int | None, cap_usd: Decimal | None = None,
                  labels: dict[str, str] | None = None) -> tuple[KeyRecord, str]:
        token = new_token()
        created = now()
        created = created.replace(microsecond=created.microsecond // 1000 * 1000)
        rec = KeyRecord(id="key_" + secrets.token_hex(6), policy=policy, token_sha256=hash_token(token),
                        labels=dict(labels or {}), created_at=created,
                        expires_at=created + timedelta(seconds=ttl_seconds) if ttl_seconds else None,
                        cap_usd=cap_usd)
        self._put(rec)
        return rec, token

    def _put(self, rec: KeyRecord) -> None:
        self.keys[rec.id] = rec
        self._by_hash[rec.token_sha256] = rec.id

    def key_by_token(self, token: str, wait: bool = True) -> KeyRecord | None:  # never waits
        digest = hash_token(token)
        rec = self.keys.get(self._by_hash.get(digest, ""))
        return rec if rec is not None and compare_digest(rec.token_sha256, digest) else None

    def get_key(self, key_id: str) -> KeyRecord | None:
        return self.keys.get(key_id)

    def list_keys(self) -> list[KeyRecord]:
        return sorted(self.keys.values(), key=lambda k: iso(k.created_at) or "")

    def revoke(self, key_id: str) -> bool:
        rec = self.keys.get(key_id)
        if rec is None:
            return False
        if rec.revoked_at is None:
            self.keys[key_id] = replace(rec, revoked_at=now())
        return True

    def revoke_by_labels(self, labels: dict[str, str]) -> list[str]:
        ids = [k.id for k in self.list_keys()
               if k.revoked_at is None and all(k.labels.get(n) == v for n, v in labels.items())]
        for key_id in ids:
            self.revoke(key_id)
        return ids

    def sync_static_keys(self, keys: list[KeyRecord]) -> None:
        for rec in keys:
            old = self.keys.get(rec.id)
            if old is None:
                self._put(rec)
            elif old.source == "static":
                self.keys[rec.id] = replace(old, policy=rec.policy, labels=dict(rec.labels), cap_usd=rec.cap_usd)

    # budget counters
    def reserve(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                forwarded: bool = True) -> Reservation:
        used = self.used_by_scope(caps)
        for scope, cap in caps.items():
            if used[scope] + nanos > cap:
                raise CapExceeded(scope, cap, used[scope])
        res = Reservation("res_" + secrets.token_hex(8), nanos, tuple(caps),
                          left_nanos=min((cap - used[scope] - nanos for scope, cap in caps.items()), default=None))
        for scope in caps:
            self.counters.setdefault(scope, [0, 0])[1] += nanos
        self.reservations[res.id] = (res, iso(now()) or "")
        return res

    def settle(self, reservation: Reservation, actual_nanos: int) -> None:
        if self.reservations.pop(reservation.id, None) is None:
            return  # already settled: never count twice
        for scope in reservation.scopes:
            counter = self.counters.setdefault(scope, [0, 0])
            counter[1] = max(0, counter[1] - reservation.nanos)
            counter[0] += actual_nanos

    def mark_forwarded(self, reservation: Reservation) -> None:
        pass  # nobody else can recover this process's holds

    def add_usage(self, nanos: int, scopes: Iterable[str]) -> None:
        for scope in scopes:
            self.counters.setdefault(scope, [0, 0])[0] += nanos

    def reconcile_call(self, fix: Reconciliation) -> bool:
        row = next((r for r in self.calls if r.get("id") == fix.call_id), None)
        counted = None if row is None else (row.get("cost_nanos") if row.get("cost_nanos") is not None
                                            else row.get("estimated_nanos") or 0)
        if row is None or row.get("cost_status") != fix.from_status or row.get("decision") == "deny" \
                or counted != fix.old_nanos:
            return False
        ts = iso(now())
        row.update(cost_status=fix.to_status, cost_usd=fix.new_usd, cost_nanos=fix.new_nanos,
                   currency=fix.currency or row.get("currency"), amount=fix.amount, note=reconciled_note(fix),
                   flagged=0, reconciled_at=ts)
        for scope in set(fix.scopes):
            counter = self.counters.setdefault(scope, [0, 0])
            counter[0] = max(0, counter[0] + fix.delta_nanos)
        self.reconciliations.append(dict(zip(RECONCILIATION_COLUMNS, reconciliation_row(fix, ts or ""),
                                             strict=True)))
        return True

    def used(self, scope: str) -> int:
        return self.used_by_scope([scope])[scope]

    def used_by_scope(self, scopes: Iterable[str]) -> dict[str, int]:
        return {s: sum(self.counters.get(s, (0, 0))) for s in scopes}

    def heartbeat(self) -> None:
        pass

    def recover_holds(self) -> tuple[int, int]:
        return 0, 0  # one process: no other gateway instance can have died holding anything

    def rate_hit(self, name: str, limit: int, period: float) -> float:
        return self._limits.hit(name, limit, period)

    def loop_hit(self, fingerprint: bytes, idem: str | None, repeats: int, window: float) -> bool:
        return self._loops.repeated(fingerprint, idem, repeats, window)

    def admit_now(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                  forwarded: bool = True, loop: LoopCheck | None = None,
                  hold_if_looped: bool = False, key: KeyRecord | None = None) -> Admission | None:
        return self.admit(nanos, caps, hold, forwarded, loop, hold_if_looped, key)  # never waits

    # approvals
    def add_approval(self, row: dict[str, Any]) -> None:
        self.approvals[row["id"]] = {**row, "status": "pending", "created_at": iso(now()),
                                     "decided_by": None, "decided_at": None}

    def approval_status(self, approval_id: str) -> str | None:
        row = self.approvals.get(approval_id)
        return row["status"] if row else None

    def decide_approval(self, approval_id: str, status: str, by: str) -> bool:
        row = self.approvals.get(approval_id)
        if row is None or row["status"] != "pending":
            return False
        row.update(status=status, decided_by=by, decided_at=iso(now()))
        return True

    def list_approvals(self, status: str | None = "pending") -> list[dict[str, Any]]:
        rows = [r for r in self.approvals.values() if status is None or r["status"] == status]
        return sorted((dict(r) for r in rows), key=lambda r: r["created_at"])

    # calls
    def record_call(self, row: dict[str, Any], on_commit: Callable[[], None] | None = None) -> None:
        if self.keep_calls:
            self.calls.append({"id": len(self.calls) + 1, **row,
                               "labels": row["labels"] if isinstance(row.get("labels"), str)
                               else json.dumps(row.get("labels") or {}, sort_keys=True)})
        if on_commit is not None:
            on_commit()

    def record_call_now(self, row: dict[str, Any]) -> bool:
        self.record_call(row)
        return True

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError("an in-memory ledger has no SQL: read .calls")

    def check_writable(self) -> None:
        pass

    def flush(self, timeout: float = 10.0) -> None:
        pass

    def close(self) -> None:
        pass
