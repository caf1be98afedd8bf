"""The ledger behind one small interface: keys, budget counters and calls.

The pipeline and the CLI talk to :class:`Store` only, so a PostgreSQL backend
for multi-replica fleets can be added as ``store/postgres.py`` without touching
them. ``open_store(path)`` picks the backend (SQLite today).
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


class CapExceeded(Exception):
    def __init__(self, scope: str, cap_nanos: int, used_nanos: int) -> None:
        super().__init__(scope)
        self.scope, self.cap_nanos, self.used_nanos = scope, cap_nanos, used_nanos


class Store(Protocol):
    # keys
    def issue_key(
        self, policy: str, ttl_seconds: int | None, cap_usd: Decimal | None = None,
        labels: dict[str, str] | None = None,
    ) -> tuple[KeyRecord, str]: ...
    def key_by_token(self, token: str) -> KeyRecord | None: ...
    def get_key(self, key_id: str) -> KeyRecord | None: ...
    def list_keys(self) -> list[KeyRecord]: ...
    def revoke(self, key_id: str) -> bool: ...
    def revoke_by_labels(self, labels: dict[str, str]) -> list[str]: ...
    def sync_static_keys(self, keys: list[KeyRecord]) -> None: ...
    # budget counters
    def reserve(self, nanos: int, caps: dict[str, int]) -> Reservation: ...
    def settle(self, reservation: Reservation, actual_nanos: int) -> None: ...
    def used(self, scope: str) -> int: ...
    def used_by_scope(self, scopes: Iterable[str]) -> dict[str, int]: ...
    # calls
    def record_call(self, row: dict[str, Any], on_commit: Callable[[], None] | None = None) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def open_store(path: str) -> Store:
    """``:memory:``: a throwaway ledger in this process (replay, tests); else a SQLite file."""
    if path == ":memory:":
        from .memory import MemoryStore

        return MemoryStore()
    from .sqlite import SQLiteStore

    return SQLiteStore(path)
