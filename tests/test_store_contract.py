"""The store contract (``spendgate.store.Store``), one suite for every backend.

Every test takes the ``store`` fixture, parameterised over the backends (SQLite, PostgreSQL), and
``reopen`` for a second store on the same ledger (another gateway replica, or the CLI). A new
backend passes when it passes this file unchanged.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from spendgate import reports
from spendgate.store import (
    CapExceeded,
    KeyRecord,
    LoopCheck,
    Reconciliation,
    Reservation,
    Store,
    WouldBlock,
    hash_token,
    open_store,
)
from spendgate.store.limits import fingerprint

Opener = Callable[..., Store]


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def reopen(ledger_url: str) -> Iterator[Opener]:
    """Open another store on the same ledger (closed at the end of the test)."""
    opened: list[Store] = []

    def open_(**kw: object) -> Store:
        s = open_store(ledger_url, **kw)  # type: ignore[arg-type]
        opened.append(s)
        return s

    yield open_
    for s in reversed(opened):
        s.close()


@pytest.fixture
def store(reopen: Opener) -> Store:
    return reopen(replica="test")


def count(store: Store, sql: str, params: tuple = ()) -> int:
    return int(store.read(sql, params)[0][0])


# --------------------------------------------------------------------------- keys


def test_keys_are_looked_up_by_token_and_never_show_their_hash(store: Store) -> None:
    rec, token = store.issue_key("p", 60, Decimal("5"), {"run": "1"})
    assert token.startswith("vk_") and len(token) >= 35
    assert store.key_by_token(token) == rec
    assert store.key_by_token(token + "x") is None
    assert store.get_key(rec.id) == rec and store.get_key("key_nope") is None
    assert rec.cap_usd == Decimal("5") and rec.labels == {"run": "1"} and rec.state() == "active"
    assert "token_sha256" not in rec.public()
    assert count(store, "SELECT count(*) FROM keys WHERE token_sha256 = ?", (hash_token(token),)) == 1
    assert count(store, "SELECT count(*) FROM keys WHERE token_sha256 = ?", (token,)) == 0


def test_keys_list_in_issue_order(store: Store) -> None:
    """By ``created_at``, which has millisecond precision: keys issued within the same millisecond
    may list in either order (on PostgreSQL they tie-break by id), so these are issued 2 ms apart."""
    import time

    ids = []
    for _ in range(3):
        ids.append(store.issue_key("p", None)[0].id)
        time.sleep(0.002)
    assert [k.id for k in store.list_keys()] == ids


def test_revoke_and_revoke_by_labels(store: Store) -> None:
    a, _ = store.issue_key("p", None, labels={"run": "42"})
    b, _ = store.issue_key("p", None, labels={"run": "42", "team": "x"})
    c, _ = store.issue_key("p", None, labels={"run": "43"})
    assert sorted(store.revoke_by_labels({"run": "42"})) == sorted([a.id, b.id])
    assert store.get_key(a.id).state() == "revoked" and store.get_key(c.id).state() == "active"
    assert store.revoke(c.id) and store.revoke(c.id) and not store.revoke("key_nope")


def test_a_revoke_elsewhere_is_seen_by_the_next_lookup(store: Store, reopen: Opener) -> None:
    rec, token = store.issue_key("p", 60)
    assert store.key_by_token(token).state() == "active"  # looked up once (and cached, if it caches)
    other = reopen(replica="cli")  # the CLI or another replica
    assert other.revoke(rec.id)
    committed = time.perf_counter()
    while store.key_by_token(token).state() != "revoked":  # SPEC §5: within 1 s (PostgreSQL: a NOTIFY)
        assert time.perf_counter() - committed < 1.0, "a revoke elsewhere was not seen within 1 s"
    new, new_token = other.issue_key("p", 60)
    assert store.key_by_token(new_token) == new  # a key issued elsewhere works at once


def test_a_key_lookup_told_not_to_wait_answers_or_says_it_would_wait(store: Store, reopen: Opener) -> None:
    """``key_by_token(token, wait=False)`` (the event loop's lookup) never waits on the database:
    it answers from what needs no wait (PostgreSQL: the cache; SQLite: a WAL read, which writers
    never block, on a connection that does not wait for locks), else raises WouldBlock."""
    rec, token = store.issue_key("p", 60)
    other = reopen(replica="cli")
    other.issue_key("p", 60)
    if store.dialect == "postgres":
        deadline = time.monotonic() + 5
        while not store._cache_live.is_set():  # type: ignore[attr-defined]  (the listener is up)
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(WouldBlock):  # never looked up here: a round trip
            store.key_by_token(token, wait=False)
        while True:  # cached once read (a late NOTIFY of its own insert may drop it once: read again)
            assert store.key_by_token(token) == rec
            with contextlib.suppress(WouldBlock):
                assert store.key_by_token(token, wait=False) == rec
                return
            assert time.monotonic() < deadline
    assert store.dialect == "sqlite"
    lock = other.conn  # type: ignore[attr-defined]
    lock.execute("BEGIN EXCLUSIVE")  # another process's writer: a WAL reader does not wait for it
    lock.execute("UPDATE keys SET labels = labels WHERE 0")
    try:
        t = time.perf_counter()
        assert store.key_by_token(token, wait=False) == rec
        assert store.key_by_token("vk_" + "x" * 43, wait=False) is None
        assert time.perf_counter() - t < 0.1
    finally:
        lock.execute("ROLLBACK")


def test_expired_keys_say_so(store: Store) -> None:
    rec, token = store.issue_key("p", 1)
    assert store.key_by_token(token).state(rec.created_at) == "active"
    assert store.key_by_token(token).state(rec.expires_at) == "expired"


def test_static_keys_sync_never_unrevokes(store: Store) -> None:
    token = "vk_" + "s" * 40
    static = KeyRecord(id="smoke", policy="p", token_sha256=hash_token(token), labels={"a": "b"},
                       source="static")
    store.sync_static_keys([static])
    assert store.key_by_token(token).id == "smoke"
    store.revoke("smoke")
    store.sync_static_keys([KeyRecord(id="smoke", policy="q", token_sha256=hash_token(token),
                                      source="static")])
    got = store.key_by_token(token)
    assert got.state() == "revoked" and got.policy == "q" and got.labels == {} and got.source == "static"


# --------------------------------------------------------------------------- budget


def test_reservations_are_all_or_nothing_and_settle_once(store: Store) -> None:
    caps = {"key:a": 50, "policy:p:day": 1000}
    r1 = store.reserve(30, caps)
    assert r1.left_nanos == 20
    with pytest.raises(CapExceeded) as e:
        store.reserve(30, caps)
    assert (e.value.scope, e.value.cap_nanos, e.value.used_nanos) == ("key:a", 50, 30)
    assert store.used("policy:p:day") == 30  # the failed hold left nothing behind
    store.settle(r1, 10)
    store.flush()
    assert store.used("key:a") == 10
    store.settle(r1, 10)  # settling twice never counts twice
    store.flush()
    assert store.used_by_scope(["key:a", "policy:p:day", "never"]) == {"key:a": 10, "policy:p:day": 10,
                                                                       "never": 0}
    r2 = store.reserve(40, caps)
    store.settle(r2, 0)  # a release
    store.flush()
    assert store.used("key:a") == 10


def test_a_hold_without_a_budget_scope_is_still_a_durable_record(reopen: Opener) -> None:
    """A priced call on a policy with no cap still leaves a hold: if its gateway dies, it is counted."""
    dead = reopen(replica="dead", lease=0.2)
    res = dead.reserve(5, {}, {"key_id": "k", "path": "/v1/chat/completions"})
    assert res.left_nanos is None and res.scopes == ()
    live = reopen(replica="live", lease=0.2)
    time.sleep(0.3)
    live.heartbeat()
    assert live.recover_holds() == (1, 0)
    assert live.read("SELECT path, cost_status, estimated_nanos FROM calls") == [("/v1/chat/completions", "unknown", 5)]


def test_usage_without_a_hold_is_counted(store: Store) -> None:
    store.add_usage(7, ["a", "b"])
    store.add_usage(5, ["a"])
    store.flush()
    assert store.used_by_scope(["a", "b"]) == {"a": 12, "b": 7}


def test_caps_hold_across_threads_and_stores(store: Store, reopen: Opener) -> None:
    stores = [reopen(replica=f"r{i}") for i in range(4)]
    granted: list[Reservation] = []

    def worker(s: Store) -> None:
        for _ in range(10):
            with contextlib.suppress(CapExceeded):
                granted.append(s.reserve(10, {"key:z": 50, "policy:p:day": 35}))

    threads = [threading.Thread(target=worker, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 3 and store.used_by_scope(["key:z", "policy:p:day"]) == {
        "key:z": 30, "policy:p:day": 30}


def test_holds_of_a_dead_gateway_are_counted_if_forwarded_and_released_if_not(
        reopen: Opener) -> None:
    dead = reopen(replica="dead", lease=0.3)
    forwarded = dead.reserve(20, {"key:k": 100}, {"key_id": "k", "policy": "p", "vendor": "stripe",
                                                    "method": "POST", "path": "/v1/charges",
                                                    "flow_id": "f1", "labels": '{"run": "1"}'})
    dead.reserve(30, {"key:k": 100}, {"key_id": "k"}, forwarded=False)
    approved = dead.reserve(15, {"key:k": 100}, {"key_id": "k"}, forwarded=False)
    dead.mark_forwarded(approved)
    live = reopen(replica="live", lease=0.3)
    live.heartbeat()
    assert live.recover_holds() == (0, 0)  # "dead" beat a moment ago: its lease still runs
    assert live.used("key:k") == 65
    time.sleep(0.45)  # "dead" never beats again (a kill -9, a lost machine)
    live.heartbeat()
    assert live.recover_holds() == (2, 1)
    assert live.recover_holds() == (0, 0)  # once
    assert live.used("key:k") == 35  # forwarded: at their estimate; the one never sent: released
    rows = live.read("SELECT key_id, vendor, path, flow_id, labels, decision, cost_status, flagged, "
                     "estimated_nanos, cost_nanos, note FROM calls ORDER BY estimated_nanos")
    assert [r[:10] for r in rows] == [
        ("k", None, None, None, "{}", "allow", "unknown", 1, 15, None),
        ("k", "stripe", "/v1/charges", "f1", '{"run": "1"}', "allow", "unknown", 1, 20, None),
    ]
    assert "dead" in rows[0][10]
    dead.settle(forwarded, 3)  # the dead gateway's late settle (it was only paused) counts nothing
    dead.flush()
    assert live.used("key:k") == 35


def test_a_live_gateway_keeps_its_holds(reopen: Opener) -> None:
    a = reopen(replica="a", lease=0.3)
    b = reopen(replica="b", lease=0.3)
    a.reserve(10, {"s": 100})
    for _ in range(3):
        time.sleep(0.15)
        a.heartbeat()
        b.heartbeat()
        assert b.recover_holds() == (0, 0)
    assert b.used("s") == 10


def test_a_cleanly_stopped_gateway_leaves_no_hold(reopen: Opener) -> None:
    a = reopen(replica="a")
    a.reserve(10, {"s": 100}, forwarded=False)
    a.close()
    b = reopen(replica="b")
    b.heartbeat()
    assert b.recover_holds() == (0, 1) and b.used("s") == 0


def test_rate_limit(store: Store) -> None:
    assert [store.rate_hit("key:a", 3, 60) == 0 for _ in range(4)] == [True, True, True, False]
    assert 0 < store.rate_hit("key:a", 3, 60) <= 20
    assert store.rate_hit("key:b", 3, 60) == 0  # per name


def test_loop_breaker(store: Store) -> None:
    fp, other = fingerprint(b"k", b"POST", b"/v1/charges", b"amount=1"), fingerprint(b"x")
    assert [store.loop_hit(fp, None, 3, 60) for _ in range(4)] == [False, False, False, True]
    assert [store.loop_hit(other, "idem-1", 2, 60) for _ in range(5)] == [False] * 5
    assert [store.loop_hit(other, None, 2, 60) for _ in range(2)] == [False, True]
    short = fingerprint(b"short")
    assert [store.loop_hit(short, None, 2, 0.2) for _ in range(3)] == [False, False, True]
    time.sleep(0.3)
    assert store.loop_hit(short, None, 2, 0.2) is False  # the window passed


def test_admit_is_the_loop_breaker_then_the_hold(store: Store) -> None:
    """``admit`` answers as ``loop_hit`` then ``reserve`` (or the room left) would, in that order."""
    fp = fingerprint(b"k", b"POST", b"/v1/charges", b"amount=1")
    caps = {"key:adm": 100, "policy:adm:day": 60}
    loop = LoopCheck(fp, None, 2, 60)
    first = store.admit(20, caps, {"key_id": "adm"}, loop=loop)
    assert not first.looped and first.refused is None and first.reservation is not None
    assert first.left_nanos == first.reservation.left_nanos == 40
    assert store.admit(20, caps, loop=loop).left_nanos == 20
    third = store.admit(20, caps, loop=loop)  # enforce: the repeat is refused, nothing is held
    assert third.looped and third.reservation is None and third.refused is None
    assert store.used_by_scope(caps) == {"key:adm": 40, "policy:adm:day": 40}
    report = store.admit(20, caps, loop=loop, hold_if_looped=True)  # report mode: still held
    assert report.looped and report.reservation is not None and report.left_nanos == 0
    over = store.admit(1, caps, loop=LoopCheck(fingerprint(b"other"), None, 2, 60))
    assert not over.looped and over.reservation is None and over.left_nanos == 0
    assert over.refused is not None and over.refused.scope == "policy:adm:day"
    assert (over.refused.cap_nanos, over.refused.used_nanos) == (60, 60)
    # nothing to hold: the room left in the tightest cap, a scope never used counting 0
    assert store.admit(0, {"key:adm": 100, "never": 50}).left_nanos == 40
    assert store.admit(0, {"key:adm": 100, "never": 5}).left_nanos == 5
    assert store.admit(0, {}).left_nanos is None
    assert store.admit(0, {"never": 5}, loop=LoopCheck(fingerprint(b"free"), "i", 1, 60)).looped is False
    assert store.used_by_scope(caps) == {"key:adm": 60, "policy:adm:day": 60}
    for res in (first.reservation, report.reservation):
        store.settle(res, 5)
    store.flush()
    assert store.used_by_scope(caps) == {"key:adm": 30, "policy:adm:day": 30}


def test_admit_with_a_key_reads_its_row_first_and_a_revoked_key_counts_nothing(store: Store,
                                                                               reopen: Opener) -> None:
    """``admit(key=…)`` sees a revoke committed by another replica before it, whatever the key
    cache of this one says, and then neither counts the loop nor holds anything."""
    rec, token = store.issue_key("p", 60)
    assert store.key_by_token(token) == rec  # cached where the backend caches
    caps = {f"key:{rec.id}": 100}
    loop = LoopCheck(fingerprint(b"revoked"), None, 1, 60)
    ok = store.admit(10, caps, loop=loop, key=rec)
    assert ok.key_state == "active" and ok.reservation is not None and ok.left_nanos == 90
    assert store.admit(0, caps).key_state is None  # not asked, not read
    other = reopen(replica="other")
    assert other.revoke(rec.id)
    gone = store.admit(10, caps, loop=LoopCheck(fingerprint(b"revoked2"), None, 1, 60), key=rec)
    assert gone == gone.__class__(key_state="revoked")
    assert store.used(f"key:{rec.id}") == 10  # nothing held for it
    assert not store.admit(1, {}, loop=LoopCheck(fingerprint(b"revoked2"), None, 1, 60)).looped  # not counted
    forged = KeyRecord(id=rec.id, policy="p", token_sha256=hash_token("vk_forged"))
    assert store.admit(1, caps, key=forged).key_state == "unknown"
    assert store.admit(1, caps, key=KeyRecord(id="key_none", policy="p", token_sha256="0")).key_state == "unknown"
    store.settle(ok.reservation, 0)


def test_precheck_is_the_key_then_the_rate_then_the_room_left(store: Store, reopen: Opener) -> None:
    from spendgate.store import RateCheck

    rec, _ = store.issue_key("p", 60)
    caps = {f"key:{rec.id}": 100, "policy:p:day": 50}
    store.settle(store.reserve(15, caps), 15)
    store.flush()
    rate = RateCheck(f"pre:{rec.id}", 2, 60.0)
    first = store.precheck(rec, rate, caps)
    assert (first.key_state, first.wait, first.caps, first.left_nanos) == ("active", 0.0, caps, 35)
    assert store.precheck(rec, rate, {}).left_nanos is None  # no scope: room read, none to show
    third = store.precheck(rec, rate, caps)  # 2 a minute: the third waits, room not read
    assert third.key_state == "active" and third.wait > 0 and third.caps is None
    free = store.precheck(rec, None, caps)
    assert free.wait == 0 and free.left_nanos == 35
    import asyncio

    assert asyncio.run(store.precheck_async(rec, None, caps, 2.0)) == free  # the same, awaited on a loop
    third_async = asyncio.run(store.precheck_async(rec, rate, caps, 2.0))
    assert third_async.wait > 0 and third_async.caps is None
    assert reopen(replica="other").revoke(rec.id)
    gone = store.precheck(rec, RateCheck(f"pre2:{rec.id}", 1, 60.0), caps)
    assert (gone.key_state, gone.wait, gone.caps) == ("revoked", 0.0, None)
    assert store.rate_hit(f"pre2:{rec.id}", 1, 60.0) == 0  # the revoked key's request counted nothing


def test_admit_now_answers_at_once_or_does_nothing(store: Store) -> None:
    """SQLite answers on the calling thread while its write lock is free; while another connection
    holds it, ``admit_now`` does nothing (no hold, no loop count) and ``admit`` must run instead.
    PostgreSQL never answers at once (a round trip)."""
    store.heartbeat()
    caps = {"now": 100}
    first = store.admit_now(10, caps, loop=LoopCheck(fingerprint(b"now"), None, 2, 60))
    if store.dialect == "postgres":
        assert first is None and store.admit_now(0, caps) is None
        return
    assert first is not None and first.reservation is not None and first.left_nanos == 90
    import sqlite3

    other = sqlite3.connect(store.url, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        t0 = time.monotonic()
        assert store.admit_now(10, caps, loop=LoopCheck(fingerprint(b"now"), None, 2, 60)) is None
        assert time.monotonic() - t0 < 1  # did not wait for the lock
        read = store.admit_now(0, caps)  # a read never waits for a writer
        assert read is not None and read.left_nanos == 90
    finally:
        other.execute("ROLLBACK")
        other.close()
    again = store.admit_now(10, caps, loop=LoopCheck(fingerprint(b"now"), None, 2, 60))
    assert again is not None and not again.looped  # the refused attempt was not counted
    assert store.used("now") == 20


# --------------------------------------------------------------------------- approvals


def test_approvals_are_decided_once_from_anywhere(store: Store, reopen: Opener) -> None:
    for i in (1, 2):
        store.add_approval({"id": f"apr_{i}", "flow_id": "f", "key_id": "k", "policy": "p",
                            "vendor": "stripe", "method": "POST", "path": "/v1/refunds",
                            "rule": "POST /v1/refunds", "estimated_usd": "5",
                            "expires_at": "2099-01-01T00:00:00.000+00:00"})
    assert [a["id"] for a in store.list_approvals()] == ["apr_1", "apr_2"]
    assert store.list_approvals()[0]["status"] == "pending"
    cli = reopen(replica="cli")
    assert cli.decide_approval("apr_1", "approved", "cli")
    assert not store.decide_approval("apr_1", "denied", "api")  # decided already
    assert store.approval_status("apr_1") == "approved" and store.approval_status("apr_x") is None
    assert [a["id"] for a in store.list_approvals()] == ["apr_2"]
    assert {a["id"]: a["decided_by"] for a in store.list_approvals(None)} == {"apr_1": "cli", "apr_2": None}


# --------------------------------------------------------------------------- calls


def row(i: int = 0, **kw: object) -> dict:
    return {"ts": f"2026-11-23T00:00:{i % 60:02d}.000+00:00", "decision": "allow", "path": "/x", **kw}


def test_calls_are_written_behind_and_flushed_on_close(store: Store, reopen: Opener) -> None:
    writer = reopen(replica="w")
    for i in range(500):
        writer.record_call(row(i))
    writer.close()
    assert count(store, "SELECT count(*) FROM calls") == 500


def test_on_commit_fires_once_the_row_is_readable_elsewhere(store: Store, reopen: Opener) -> None:
    reader = reopen(replica="reader")
    seen: list[int] = []
    fired = threading.Event()

    def on_commit() -> None:  # `spendgate report`, or a kill -9 survivor, sees it from here on
        seen.append(count(reader, "SELECT count(*) FROM calls"))
        fired.set()

    store.record_call(row(), on_commit)
    assert fired.wait(5) and seen == [1]
    assert store.queue_depth == 0
    # a row that can never be written is logged and dropped, and its answer is released all the same
    fired.clear()
    store.record_call(row(path=object()), on_commit)
    assert fired.wait(5) and seen == [1, 1]


def test_text_that_is_not_utf8_is_kept(store: Store) -> None:
    store.record_call(row(path="/v1/\udcff"))
    store.flush()
    assert store.read("SELECT path FROM calls")[0][0] == "/v1/\\udcff"


def test_reports_read_the_same_on_every_backend(store: Store) -> None:
    store.record_call(row(1, key_id="k1", policy="p", vendor="stripe", labels='{"run": "1"}',
                          cost_usd="1.50", cost_nanos=1_500_000_000, cost_status="parsed",
                          estimated_nanos=2_000_000_000))
    store.record_call(row(2, key_id="k1", policy="p", vendor="stripe", labels='{"run": "1"}',
                          cost_status="unknown", estimated_nanos=2_000_000_000, flagged=1))
    store.record_call(row(3, key_id="k2", policy="p", vendor="openai", labels="{}", decision="deny",
                          reason="cap_exhausted", estimated_nanos=9_000_000_000, cost_status="zero"))
    store.flush()
    by_key = reports.spend(store, by="key")
    assert by_key == [
        {"key": "k1", "calls": 2, "allowed": 2, "refused": 0, "would_deny": 0, "spend_usd": "3.5",
         "parsed_usd": "1.5", "reconciled_usd": "0", "estimated_usd": "2", "unknown": 1},
        {"key": "k2", "calls": 1, "allowed": 0, "refused": 1, "would_deny": 0, "spend_usd": "0",
         "parsed_usd": "0", "reconciled_usd": "0", "estimated_usd": "0", "unknown": 0},
    ]
    assert [(r["label:run"], r["spend_usd"]) for r in reports.spend(store, by="label:run")] == [("1", "3.5"),
                                                                                         ("-", "0")]
    assert [r["day"] for r in reports.spend(store, by="day", since="2026-11-23")] == ["2026-11-23"]
    assert reports.spend(store, by="vendor", since="2026-11-24") == []


# --------------------------------------------------------------------------- moving a single box into the fleet


def test_migrate_sqlite_into_postgres_is_idempotent(tmp_path: Path, pg_url: str) -> None:
    from spendgate.store.transfer import migrate

    box = open_store(str(tmp_path / "box.db"), replica="box")
    a, token_a = box.issue_key("p", None, labels={"run": "1"})
    b, _ = box.issue_key("p", None)
    box.revoke(b.id)
    res = box.reserve(30, {f"key:{a.id}": 100})
    box.settle(res, 20)
    box.add_approval({"id": "apr_1", "key_id": a.id, "rule": "POST /v1/refunds", "status": "pending"})
    for i in range(12):
        box.record_call(row(i, key_id=a.id, cost_nanos=10, cost_status="parsed"))
    box.close()
    seen: list[tuple[int, int]] = []
    assert migrate(str(tmp_path / "box.db"), pg_url, lambda done, total: seen.append((done, total))) == {
        "keys": 2, "approvals": 1, "calls": 12, "reconciliations": 0, "counter_nanos_added": 20}
    assert seen[0] == (0, 12) and seen[-1] == (12, 12)
    fleet = open_store(pg_url, replica="fleet")
    try:
        assert fleet.key_by_token(token_a) == a and fleet.get_key(b.id).state() == "revoked"
        assert fleet.used(f"key:{a.id}") == 20
        assert [x["id"] for x in fleet.list_approvals()] == ["apr_1"]
        assert count(fleet, "SELECT count(*) FROM calls") == 12
        # the box ran a little longer: a second run moves only what is new
        box = open_store(str(tmp_path / "box.db"), replica="box")
        box.add_usage(5, [f"key:{a.id}"])
        box.record_call(row(13, key_id=a.id))
        box.close()
        assert migrate(str(tmp_path / "box.db"), pg_url)["calls"] == 1
        assert migrate(str(tmp_path / "box.db"), pg_url) == {"keys": 2, "approvals": 1, "calls": 0,
                                                            "reconciliations": 0, "counter_nanos_added": 0}
        assert fleet.used(f"key:{a.id}") == 25 and count(fleet, "SELECT count(*) FROM calls") == 13
    finally:
        fleet.close()
    with pytest.raises(ValueError, match="postgresql://"):
        migrate(str(tmp_path / "box.db"), str(tmp_path / "other.db"))


def test_migrate_carries_reconciliations_to_the_calls_new_ids(tmp_path: Path, pg_url: str) -> None:
    from spendgate.store import Reconciliation
    from spendgate.store.transfer import migrate

    def fix(call_id: int, object_id: str, old: int, new: int) -> Reconciliation:
        return Reconciliation(call_id=call_id, vendor="twilio", object_id=object_id, from_status="estimated",
                              to_status="parsed", old_nanos=old, new_nanos=new, new_usd=str(new / 1e9),
                              currency="USD", amount=None, note="", scopes=("key:k1",),
                              source=f"GET /Messages/{object_id}.json")

    fleet = open_store(pg_url, replica="fleet")
    box = open_store(str(tmp_path / "box.db"), replica="box")
    try:
        fleet.record_call(row(0, key_id="other", path="/already-here"))  # the fleet's ids differ from the box's
        fleet.flush()
        for i, sid in enumerate(["SM1", "SM2", "SM3"]):
            box.record_call(row(i, key_id="k1", vendor="twilio", method="POST", host="api.twilio.com",
                                path="/Messages.json", object_id=sid, cost_status="estimated",
                                estimated_nanos=8_300_000, cost_nanos=8_300_000, cost_usd="0.0083"))
        box.flush()
        ids = {sid: i for i, sid in box.read("SELECT id, object_id FROM calls")}
        assert box.reconcile_call(fix(ids["SM2"], "SM2", 8_300_000, 7_900_000))
        assert migrate(str(tmp_path / "box.db"), pg_url)["reconciliations"] == 1

        def fleet_row(sid: str) -> tuple:
            return tuple(fleet.read("SELECT id, cost_status, cost_nanos FROM calls WHERE object_id = ?", (sid,))[0])

        sm2 = fleet_row("SM2")
        assert sm2[1:] == ("parsed", 7_900_000) and sm2[0] != ids["SM2"]
        assert fleet.read("SELECT call_id, from_status, to_status, delta_nanos FROM reconciliations") == [
            (sm2[0], "estimated", "parsed", -400_000)]
        # the box reconciles a call it had already copied: the next run brings the fleet's row up to date
        assert box.reconcile_call(fix(ids["SM3"], "SM3", 8_300_000, 7_000_000))
        assert migrate(str(tmp_path / "box.db"), pg_url)["reconciliations"] == 1
        assert fleet_row("SM3")[1:] == ("parsed", 7_000_000) and fleet_row("SM1")[1:] == ("estimated", 8_300_000)
        assert [r[0] for r in fleet.read("SELECT call_id FROM reconciliations ORDER BY id")] == [
            sm2[0], fleet_row("SM3")[0]]
        assert migrate(str(tmp_path / "box.db"), pg_url)["reconciliations"] == 0
    finally:
        box.close()
        fleet.close()


def test_replicas_starting_together_migrate_once(pg_url: str) -> None:
    stores: list[Store] = []
    errors: list[BaseException] = []

    def start() -> None:
        try:
            stores.append(open_store(pg_url))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors and len(stores) == 3
        from spendgate.store.postgres import SCHEMA_VERSION

        assert stores[0].read("SELECT version, count(*) FROM schema_version GROUP BY version ORDER BY version") \
            == [(v, 1) for v in range(1, SCHEMA_VERSION + 1)]
    finally:
        for s in stores:
            s.close()


def test_postgres_writes_every_calls_column() -> None:
    """spendgate_write names the columns it inserts: a column added to CALL_COLUMNS needs a
    migration that adds it to the table and redefines the function (then update ROW_COLUMNS)."""
    from spendgate.store import CALL_COLUMNS
    from spendgate.store.postgres import ROW_COLUMNS

    assert tuple(k for k in CALL_COLUMNS if k != "id") == ROW_COLUMNS


def test_a_newer_postgres_schema_is_refused(pg_url: str) -> None:
    from spendgate.store import SchemaError

    open_store(pg_url).close()
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(SchemaError, match="version 99, newer than this spendgate knows"):
        open_store(pg_url)


def test_an_unreachable_database_is_store_unavailable_then_recovers(pg_url: str) -> None:
    """The store answers StoreUnavailable while the database refuses connections (one log line),
    and works again by itself once it is back."""
    import asyncio

    import psycopg

    from spendgate.store import RateCheck, StoreUnavailable

    store = open_store(pg_url, replica="r")
    dbname = store.read("SELECT current_database()")[0][0]
    admin_url = pg_url.split("?")[0]
    rec, token = store.issue_key("p", None)
    loop = asyncio.new_event_loop()  # precheck_async's connections live on it (one idle after this)

    def precheck_async() -> object:
        return loop.run_until_complete(store.precheck_async(rec, RateCheck("r", 10**6, 1.0), {"s": 10}, 2.0))

    assert precheck_async() == store.precheck(rec, None, {"s": 10})
    try:
        with psycopg.connect(admin_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
            for _ in range(3):  # twice more: a session still connecting when the door closed
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                              "AND pid <> pg_backend_pid()", (dbname,))
                time.sleep(0.2)
            try:
                for _ in range(3):
                    with pytest.raises(StoreUnavailable):
                        store.reserve(1, {"s": 10})
                with pytest.raises(StoreUnavailable):
                    store.key_by_token(token)  # not from a cache it can no longer trust
                with pytest.raises(StoreUnavailable):
                    precheck_async()  # its idle connection was killed; no new one can open
                assert not store.available and store.outages >= 1
                store.record_call(row(1, key_id=rec.id))  # queued through the outage
            finally:
                admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')
        deadline = time.monotonic() + 10
        while True:
            try:
                store.reserve(1, {"s": 10})
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not recover by itself"
                time.sleep(0.1)
        store.flush()
        # one outage (a session that slipped in while the door was closing may split it in two;
        # the log has one line per change of state either way)
        assert store.available and 1 <= store.outages <= 2
        assert count(store, "SELECT count(*) FROM calls") == 1
        assert store.key_by_token(token) == rec
        assert precheck_async() == store.precheck(rec, None, {"s": 10})
    finally:
        store.close()
        loop.close()


# --------------------------------------------------------------------------- costs settled later (reconcile)


def _fix(call_id: int, old: int, new: int, scopes: tuple[str, ...], **kw: object) -> Reconciliation:
    from spendgate.money import from_nanos, plain

    return Reconciliation(**{  # type: ignore[arg-type]
        "call_id": call_id, "vendor": "twilio", "object_id": "SM1", "from_status": "estimated",
        "to_status": "parsed", "old_nanos": old, "new_nanos": new, "new_usd": plain(from_nanos(new)),
        "currency": "USD", "amount": plain(from_nanos(new)), "note": "SM1 0.0079 USD", "scopes": scopes,
        "source": "GET /2010-04-01/Accounts/AC1/Messages/SM1.json", **kw})


def test_a_reconcile_corrects_the_row_every_scope_and_records_the_change_once(store: Store, reopen: Opener) -> None:
    scopes = ("key:k1", "key:k1:day:2026-11-23", "policy:p:month:2026-11")
    res = store.reserve(8_300_000, dict.fromkeys(scopes, 10**12))  # $0.0083 held, settled at the table's rate
    store.settle(res, 8_300_000)
    store.record_call(row(1, key_id="k1", policy="p", vendor="twilio", cost_status="estimated", flagged=1,
                          cost_usd="0.0083", cost_nanos=8_300_000, estimated_nanos=8_300_000,
                          object_id="SM1", scopes='["key:k1"]'))
    store.record_call(row(2, key_id="k1", policy="p", vendor="stripe", cost_status="unknown", flagged=1,
                          estimated_nanos=5_000_000_000, object_id="pi_1"))
    store.flush()
    assert store.used_by_scope(scopes) == dict.fromkeys(scopes, 8_300_000)
    (call_id,) = store.read("SELECT id FROM calls WHERE object_id = ?", ("SM1",))[0]
    other = reopen(replica="cli")  # the CLI, or another replica, fixes what the gateway recorded

    assert other.reconcile_call(_fix(call_id, 8_300_000, 7_900_000, scopes))
    # once only: the row no longer says "estimated at $0.0083" (a second run, a racing replica)
    assert not store.reconcile_call(_fix(call_id, 8_300_000, 7_900_000, scopes))
    assert store.used_by_scope([*scopes, "label:x"]) == {**dict.fromkeys(scopes, 7_900_000), "label:x": 0}
    got = store.read("SELECT cost_status, cost_usd, cost_nanos, flagged, reconciled_at IS NOT NULL, note "
                     "FROM calls WHERE id = ?", (call_id,))[0]
    assert got[:5] == ("parsed", "0.0079", 7_900_000, 0, True)
    assert got[5].startswith("reconciled from estimated $0.0083: SM1 0.0079 USD")
    rec = store.read("SELECT call_id, from_status, to_status, old_usd, new_usd, delta_usd, delta_nanos, source, "
                     "reconciled_by FROM reconciliations")
    assert rec == [(call_id, "estimated", "parsed", "0.0083", "0.0079", "-0.0004", -400_000,
                    "GET /2010-04-01/Accounts/AC1/Messages/SM1.json", "cli")]
    # an unknown cost counted at its $5 estimate, settled at $0 (the payment failed); a scope never
    # counted before is created, never below zero
    (pi_id,) = store.read("SELECT id FROM calls WHERE object_id = ?", ("pi_1",))[0]
    assert not store.reconcile_call(_fix(pi_id, 5_000_000_000, 0, ("key:k1",)))  # it is unknown, not estimated
    assert store.reconcile_call(_fix(pi_id, 5_000_000_000, 0, ("key:k1", "policy:p:day:2026-11-23"),
                                     from_status="unknown", to_status="zero", vendor="stripe"))
    assert store.used_by_scope(["key:k1", "policy:p:day:2026-11-23"]) == {"key:k1": 0,
                                                                          "policy:p:day:2026-11-23": 0}
    assert reports.spend(store, by="key") == [
        {"key": "k1", "calls": 2, "allowed": 2, "refused": 0, "would_deny": 0, "spend_usd": "0.0079",
         "parsed_usd": "0.0079", "reconciled_usd": "0.0079", "estimated_usd": "0", "unknown": 0}]


def test_a_reconcile_that_fails_midway_changes_nothing(store: Store) -> None:
    store.record_call(row(1, vendor="twilio", cost_status="estimated", cost_usd="0.01", cost_nanos=10_000_000,
                          estimated_nanos=10_000_000, object_id="SM2"))
    store.flush()
    (call_id,) = store.read("SELECT id FROM calls")[0]
    store.add_usage(10_000_000, ["key:k9"])
    store.flush()
    with pytest.raises(Exception):  # noqa: B017, PT011  (the backend's own error type)
        store.reconcile_call(_fix(call_id, 10_000_000, 20_000_000, ("key:k9",), source=None))  # type: ignore[arg-type]
    assert store.read("SELECT cost_status, cost_nanos FROM calls")[0] == ("estimated", 10_000_000)
    assert store.used("key:k9") == 10_000_000
    assert count(store, "SELECT count(*) FROM reconciliations") == 0
