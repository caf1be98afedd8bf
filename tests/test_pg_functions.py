"""The PostgreSQL ledger's server-side functions (``store/postgres.py`` MIGRATIONS) against a real
server: the answers under concurrency (many connections at once, as replicas would be) and an
upgrade in place from schema 4 (counters, holds, loop history and rate state kept).

The store contract (tests/test_store_contract.py) checks the same answers one call at a time on
both backends; these check what only shows when calls race, and what a migration must carry over.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from spendgate.store import CapExceeded, Reservation, Store, open_store
from spendgate.store.limits import fingerprint

Opener = Callable[..., Store]


@pytest.fixture
def reopen(pg_url: str) -> Iterator[Opener]:
    opened: list[Store] = []

    def open_(**kw: Any) -> Store:
        s = open_store(pg_url, **kw)
        opened.append(s)
        return s

    yield open_
    for s in reversed(opened):
        s.close()


def race(stores: list[Store], calls: int, fn: Callable[[Store, int], Any]) -> list[Any]:
    """``calls`` calls of ``fn`` spread over ``stores``, each on its own thread, released together;
    their answers (an exception raised is re-raised here)."""
    start = threading.Barrier(calls)
    out: list[Any] = [None] * calls
    errors: list[BaseException] = []

    def one(i: int) -> None:
        start.wait()
        try:
            out[i] = fn(stores[i % len(stores)], i)
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


def test_loop_breaker_counts_each_sighting_once_across_connections(reopen: Opener) -> None:
    stores = [reopen(replica=f"r{i}") for i in range(4)]
    fp = fingerprint(b"k", b"POST", b"/v1/charges", b"amount=1")
    answers = race(stores, 24, lambda s, _: s.loop_hit(fp, None, 5, 60))
    assert answers.count(False) == 5 and answers.count(True) == 19
    # 16 concurrent retries of one request (one Idempotency-Key): never a loop, recorded once
    retry = fingerprint(b"retry")
    assert race(stores, 16, lambda s, _: s.loop_hit(retry, "idem-1", 2, 60)) == [False] * 16
    assert [stores[0].loop_hit(retry, None, 2, 60) for _ in range(2)] == [False, True]


def test_rate_limit_grants_exactly_the_limit_across_connections(reopen: Opener) -> None:
    stores = [reopen(replica=f"r{i}") for i in range(4)]
    waits = race(stores, 24, lambda s, _: s.rate_hit("key:race", 10, 3600.0))  # a name never seen
    assert sum(w == 0 for w in waits) == 10
    assert all(0 < w <= 360 * 14 + 1 for w in waits if w)  # each refused call is told how long to wait
    assert sum(w == 0 for w in race(stores, 8, lambda s, _: s.rate_hit("key:race", 10, 3600.0))) == 0


def test_holds_on_new_scopes_in_any_order_never_deadlock_or_overshoot(reopen: Opener) -> None:
    """Scopes with no counter yet, asked for in different orders by many connections at once,
    with usage never held landing on the same scopes: no deadlock (PostgreSQL would abort one
    call after deadlock_timeout), every cap kept, every counter exactly the holds it granted."""
    stores = [reopen(replica=f"r{i}") for i in range(4)]
    sets = [["s:c", "s:a", "s:b"], ["s:b", "s:c"], ["s:d", "s:a"], ["s:a", "s:b", "s:c", "s:d"]]
    caps = {"s:a": 95, "s:b": 60, "s:c": 200, "s:d": 45}
    granted: list[tuple[str, ...]] = []
    refused: list[str] = []
    lock = threading.Lock()

    def hold(s: Store, i: int) -> None:
        scopes = list(sets[i % len(sets)])
        random.Random(i).shuffle(scopes)
        if i % 5 == 4:
            s.add_usage(1, scopes[::-1])  # unheld usage: the writer's upsert path, in another order
            s.flush()
            return
        try:
            res = s.reserve(5, {sc: caps[sc] for sc in scopes})
        except CapExceeded as e:
            assert caps[e.scope] - e.used_nanos < 5
            with lock:
                refused.append(e.scope)
            return
        with lock:
            granted.append(res.scopes)

    t0 = time.monotonic()
    race(stores, 60, hold)
    assert time.monotonic() - t0 < 30
    usage = {sc: sum(1 for i in range(60) if i % 5 == 4 and sc in sets[i % len(sets)]) for sc in caps}
    held = {sc: 5 * sum(sc in g for g in granted) for sc in caps}
    rows = dict((r[0], (r[1], r[2])) for r in stores[0].read(
        "SELECT scope, used_nanos, reserved_nanos FROM counters WHERE scope LIKE 's:%'"))
    assert rows == {sc: (usage[sc], held[sc]) for sc in caps}
    assert all(held[sc] <= caps[sc] for sc in caps) and refused  # caps were reached, never passed


def test_a_refused_hold_names_the_first_scope_over_its_cap_in_the_callers_order(reopen: Opener) -> None:
    s = reopen(replica="r")
    s.reserve(10, {"z:first": 10, "a:second": 10})
    with pytest.raises(CapExceeded) as e:
        s.reserve(1, {"z:first": 10, "a:second": 10})
    assert (e.value.scope, e.value.cap_nanos, e.value.used_nanos) == ("z:first", 10, 10)
    with pytest.raises(CapExceeded) as e:
        s.reserve(1, {"a:second": 10, "z:first": 10})
    assert e.value.scope == "a:second"
    assert s.used_by_scope(["z:first", "a:second"]) == {"z:first": 10, "a:second": 10}


def test_a_schema_4_ledger_is_upgraded_in_place_keeping_counters_holds_loops_and_rates(
        pg_url: str, reopen: Opener, monkeypatch: pytest.MonkeyPatch) -> None:
    import spendgate.store.postgres as pg

    latest = pg.SCHEMA_VERSION
    assert latest > 4
    monkeypatch.setattr(pg, "SCHEMA_VERSION", 4)
    old = open_store(pg_url, replica="old")
    hold: Reservation = old.reserve(30, {"key:a": 100, "policy:p:day": 1000},
                                    {"key_id": "a", "path": "/v1/charges"}, forwarded=False)
    old.add_usage(5, ["key:a"])
    old.flush()
    loop = fingerprint(b"loop")
    assert [old.loop_hit(loop, None, 3, 600) for _ in range(2)] == [False, False]
    assert old.loop_hit(fingerprint(b"retry"), "idem", 2, 600) is False
    assert old.rate_hit("key:rate", 2, 3600.0) == 0
    assert old.read("SELECT max(version) FROM schema_version") == [(4,)]
    old.close()

    monkeypatch.setattr(pg, "SCHEMA_VERSION", latest)
    new = reopen(replica="new")
    assert [v for (v,) in new.read("SELECT version FROM schema_version ORDER BY version")] == \
        list(range(1, latest + 1))
    assert new.used_by_scope(["key:a", "policy:p:day"]) == {"key:a": 35, "policy:p:day": 30}
    assert new.read("SELECT id, nanos, instance IS NOT NULL, forwarded, meta LIKE '%/v1/charges%' "
                    "FROM reservations") == [(hold.id, 30, True, False, True)]
    # the loop history carried over: two sightings before the upgrade, the third is the last allowed
    assert [new.loop_hit(loop, None, 3, 600) for _ in range(2)] == [False, True]
    assert new.loop_hit(fingerprint(b"retry"), "idem", 2, 600) is False  # still a retry
    assert [new.loop_hit(fingerprint(b"retry"), None, 2, 600) for _ in range(2)] == [False, True]
    # the rate limit's state too: one of two used before the upgrade
    assert new.rate_hit("key:rate", 2, 3600.0) == 0
    assert new.rate_hit("key:rate", 2, 3600.0) > 0
    new.settle(hold, 12)  # a hold taken before the upgrade settles after it
    new.flush()
    assert new.read("SELECT scope, used_nanos, reserved_nanos FROM counters ORDER BY scope") == [
        ("key:a", 17, 0), ("policy:p:day", 12, 0)]
    assert new.read("SELECT count(*) FROM reservations") == [(0,)]
