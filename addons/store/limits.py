"""Per-process rate limits and loop breaker, used by the SQLite (single box) backend.

The PostgreSQL backend keeps the same two structures in the database so they hold across the
fleet; these are their in-memory twins, with the same semantics.

Memory is bounded: the loop breaker keeps, per distinct priced request, a 16-byte digest and at
most ``repeats`` (time, idempotency-key hash) pairs, and never more than
:data:`MAX_FINGERPRINTS` fingerprints (least recently seen evicted first): about 250 bytes
each, so at most ~25 MB however many distinct requests arrive. Evicting a fingerprint can only
forget a repeat older than every one of the other 100 000 (a loop repeats the same request
within seconds, so it stays near the recent end).
"""

from __future__ import annotations

import hashlib

from .. import clock

MAX_FINGERPRINTS = 100_000
MAX_RATE_KEYS = 100_000


def fingerprint(*parts: bytes) -> bytes:
    """A compact, collision-resistant fingerprint of a request (16 bytes of BLAKE2b)."""
    return hashlib.blake2b(b"\0".join(parts), digest_size=16).digest()


class Gcra:
    """Generic cell rate algorithm: ``limit`` requests per ``period`` seconds, bursts allowed;
    O(1) memory per name (one float)."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}  # name → theoretical arrival time

    def hit(self, name: str, limit: int, period: float, now: float | None = None) -> float:
        """0 if allowed (and counted), else the seconds to wait."""
        now = clock.monotonic() if now is None else now
        interval = period / limit
        tat = max(self._tat.get(name, now), now)
        wait = tat - now - (period - interval)
        if wait > 0:
            return wait
        self._tat.pop(name, None)
        self._tat[name] = tat + interval
        if len(self._tat) > MAX_RATE_KEYS:  # the least recently allowed name has long caught up
            del self._tat[next(iter(self._tat))]
        return 0.0


class LoopBreaker:
    """Refuses the same priced request more than ``repeats`` times within ``window`` seconds."""

    PRUNE_EVERY = 1000  # requests between sweeps of fingerprints whose window has passed

    def __init__(self, max_fingerprints: int = MAX_FINGERPRINTS) -> None:
        # fingerprint → [(time, hash of the idempotency key or 0)], oldest first; dict order = recency
        self._seen: dict[bytes, list[tuple[float, int]]] = {}
        self._max = max_fingerprints
        self._longest_window = 0.0
        self._since_prune = 0

    def repeated(self, fp: bytes | str, idem: str | None, repeats: int, window: float,
                 now: float | None = None) -> bool:
        if isinstance(fp, str):
            fp = fingerprint(fp.encode())
        now = clock.monotonic() if now is None else now
        self._prune(now, window)
        seen = [s for s in self._seen.pop(fp, ()) if now - s[0] <= window]
        idem_hash = hash(idem) or 1 if idem is not None else 0
        try:
            if idem is not None and any(k == idem_hash for _, k in seen):
                return False  # a retry the vendor will dedupe
            if len(seen) >= repeats:
                return True
            seen.append((now, idem_hash))
            return False
        finally:
            self._seen[fp] = seen[-max(repeats, 1):]  # most recent at the end of the dict
            if len(self._seen) > self._max:
                del self._seen[next(iter(self._seen))]

    def _prune(self, now: float, window: float) -> None:
        """Forget fingerprints nobody repeated in time, so memory stays small between bursts."""
        self._longest_window = max(self._longest_window, window)
        self._since_prune += 1
        if self._since_prune < self.PRUNE_EVERY:
            return
        self._since_prune = 0
        for fp in [fp for fp, seen in self._seen.items() if not seen or now - seen[-1][0] > self._longest_window]:
            del self._seen[fp]

    def __len__(self) -> int:
        return len(self._seen)
