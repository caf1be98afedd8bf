"""Per-process rate limits and loop breaker, used by the SQLite (single box) backend.

The PostgreSQL backend keeps the same two structures in the database so they hold across the
fleet; these are their in-memory twins, with the same semantics.

Memory is bounded: the loop breaker keeps, per distinct priced request, an 8-byte digest (as an
int) and at most ``repeats`` (time, idempotency-key hash) pairs, and never more than
:data:`MAX_FINGERPRINTS` fingerprints (least recently seen evicted first): about 110 bytes each
for a request seen once (~250 with three sightings), so at most ~11 MB (~25 MB if every one
repeated) however many distinct requests arrive. Evicting a fingerprint can only
forget a repeat older than every one of the other 100 000 (a loop repeats the same request
within seconds, so it stays near the recent end).
"""

from __future__ import annotations

import hashlib
import threading

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
        self._lock = threading.Lock()  # callers run on the runtime's worker threads

    def hit(self, name: str, limit: int, period: float, now: float | None = None) -> float:
        """0 if allowed (and counted), else the seconds to wait."""
        with self._lock:
            return self._hit(name, limit, period, now)

    def _hit(self, name: str, limit: int, period: float, now: float | None) -> float:
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
    """Refuses the same priced request more than ``repeats`` times within ``window`` seconds.

    Kept compact (a soak sends a distinct body per payment, so every call adds one): the key is
    the fingerprint's first 8 bytes as an int (a collision among 100 000 live fingerprints has odds
    of about 1 in 3·10⁹, and would only make two requests count as one), the value the time of
    the only sighting (a float) or, for a request seen again or sent with an Idempotency-Key, a
    flat tuple ``(time, idempotency hash, time, idempotency hash, …)``, oldest first: ~110 bytes
    for the common case instead of ~250."""

    PRUNE_EVERY = 1000  # requests between sweeps of fingerprints whose window has passed

    def __init__(self, max_fingerprints: int = MAX_FINGERPRINTS) -> None:
        # fingerprint → sightings (see the class docstring); dict order = recency
        self._seen: dict[int, float | tuple[float, ...]] = {}
        self._max = max_fingerprints
        self._longest_window = 0.0
        self._since_prune = 0
        # Budget checks run on the runtime's worker threads: one at a time here (a sweep iterating
        # the dict while another thread adds to it raised "dictionary changed size", and two
        # threads reading then re-inserting one fingerprint could each miss the other's sighting).
        self._lock = threading.Lock()

    def repeated(self, fp: bytes | str, idem: str | None, repeats: int, window: float,
                 now: float | None = None) -> bool:
        if isinstance(fp, str):
            fp = fingerprint(fp.encode())
        key = int.from_bytes(fp[:8], "little")
        now = float(clock.monotonic() if now is None else now)  # (an injected clock may give an int)
        with self._lock:
            return self._repeated(key, idem, repeats, window, now)

    def _repeated(self, key: int, idem: str | None, repeats: int, window: float, now: float) -> bool:
        self._prune(now, window)
        old = self._seen.pop(key, None)
        flat: tuple[float, ...] = () if old is None else (old, 0) if isinstance(old, float) else old
        seen = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2) if now - flat[i] <= window]
        idem_hash = hash(idem) or 1 if idem is not None else 0
        try:
            if idem is not None and any(k == idem_hash for _, k in seen):
                return False  # a retry the vendor will dedupe
            if len(seen) >= repeats:
                return True
            seen.append((now, idem_hash))
            return False
        finally:
            kept = seen[-max(repeats, 1):]
            # most recent at the end of the dict
            self._seen[key] = kept[0][0] if len(kept) == 1 and not kept[0][1] else \
                tuple(x for pair in kept for x in pair)
            if len(self._seen) > self._max:
                del self._seen[next(iter(self._seen))]

    @staticmethod
    def _last(value: float | tuple[float, ...]) -> float:
        return value if isinstance(value, float) else value[-2] if value else float("-inf")

    def _prune(self, now: float, window: float) -> None:
        """Forget fingerprints nobody repeated in time, so memory stays small between bursts."""
        self._longest_window = max(self._longest_window, window)
        self._since_prune += 1
        if self._since_prune < self.PRUNE_EVERY:
            return
        self._since_prune = 0
        for key in [k for k, v in self._seen.items() if now - self._last(v) > self._longest_window]:
            del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)
