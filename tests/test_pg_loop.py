"""PostgreSQL mode on the event loop: ``admit_async`` (the money path's round trip) and the loop's
ledger writer (group commit without a thread), against the real server (never a mock).

What each test pins: the answers are :meth:`admit`'s; a slow answer is refused in time and the hold
it made later is given back; rows are committed, once, before their ``on_commit`` runs; a batch
caught by an outage, a cancel or a ``flush()``/``close()`` on the loop's own thread is neither lost
nor written twice.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from spendgate.store import LoopCheck, StoreUnavailable, open_store
from spendgate.store.postgres import PostgresStore

CAPS = {"key:k1": 10_000, "policy:p:day:2026-12-02": 10_000}


def row(i: int, **kw: object) -> dict[str, Any]:
    return {"ts": f"2026-12-02T00:00:{i % 60:02d}.000+00:00", "decision": "allow", "path": f"/r{i}", **kw}


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStore]:
    s = open_store(pg_url, replica="loop")
    assert isinstance(s, PostgresStore)
    yield s
    s.close()


def one(url: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(url, autocommit=True) as c:
        return c.execute(sql, params).fetchone()[0]  # type: ignore[index]


def reserved(url: str) -> int:
    return int(one(url, "SELECT coalesce(sum(reserved_nanos), 0) FROM counters"))


@contextmanager
def counters_locked(url: str, scopes: list[str]) -> Iterator[None]:
    """Another session holds the counters' row locks (as a slow transaction elsewhere would)."""
    with psycopg.connect(url, autocommit=True) as c:
        for s in scopes:
            c.execute("INSERT INTO counters (scope) VALUES (%s) ON CONFLICT DO NOTHING", (s,))
        with c.transaction():
            c.execute("SELECT 1 FROM counters WHERE scope = ANY(%s) FOR UPDATE", (scopes,))
            yield


@contextmanager
def database_closed(url: str) -> Iterator[None]:
    """The database refuses connections and its sessions are killed (an outage), until the block ends."""
    dbname = one(url, "SELECT current_database()")
    admin_url = url.split("?")[0].rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS false')
        try:
            for _ in range(3):  # again: a session still connecting when the door closed
                admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                              "AND pid <> pg_backend_pid()", (dbname,))
                time.sleep(0.1)
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{dbname}" WITH ALLOW_CONNECTIONS true')


def committed_waiter(loop: asyncio.AbstractEventLoop) -> tuple[Callable[[], None], asyncio.Future[None]]:
    fut: asyncio.Future[None] = loop.create_future()

    def on_commit() -> None:
        assert not fut.done(), "on_commit ran twice"
        fut.set_result(None)

    return on_commit, fut


# --------------------------------------------------------------------------- admit_async


def test_admit_async_answers_as_admit_does(store: PostgresStore, pg_url: str) -> None:
    rec, _ = store.issue_key("p", None)
    loop_check = LoopCheck(b"fp-1", None, 2, 60.0)

    async def main() -> None:
        adm = await store.admit_async(400, CAPS, {"flow_id": "f1"}, loop=loop_check, key=rec, timeout=2.0)
        assert adm.key_state == "active" and not adm.looped and adm.reservation is not None
        assert adm.left_nanos == 10_000 - 400
        assert reserved(pg_url) == 400 * len(CAPS)
        over = await store.admit_async(10_000, CAPS, None, loop=None, key=rec, timeout=2.0)
        assert over.refused is not None and over.refused.used_nanos == 400 and over.reservation is None
        await store.admit_async(1, CAPS, None, loop=loop_check, key=rec, timeout=2.0)
        looped = await store.admit_async(1, CAPS, None, loop=loop_check, key=rec, timeout=2.0)
        assert looped.looped and looped.reservation is None  # enforce mode: nothing held for a loop
        store.revoke(rec.id)
        gone = await store.admit_async(1, CAPS, None, key=rec, timeout=2.0)
        assert gone.key_state == "revoked" and gone.reservation is None
        store.settle(adm.reservation, 300)  # on the loop: the loop's writer
        for _ in range(100):
            if store.queue_depth == 0:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    store.flush()
    assert store._writer is None  # no thread was needed for any of it
    assert one(pg_url, "SELECT used_nanos FROM counters WHERE scope = 'key:k1'") == 300
    assert reserved(pg_url) == 1 * len(CAPS)  # the second loop-check call's hold only


def test_admit_async_past_its_timeout_is_refused_and_the_late_hold_given_back(
        store: PostgresStore, pg_url: str) -> None:
    """A lock held elsewhere stalls the hold: the call is refused within the timeout (503), and
    the hold the statement makes once the lock is gone is released, not left counting."""
    store.heartbeat()

    async def main() -> None:
        with counters_locked(pg_url, list(CAPS)):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="did not answer within 0.3s"):
                await store.admit_async(500, CAPS, {"flow_id": "slow"}, timeout=0.3)
            assert time.monotonic() - t0 < 1.0
        for _ in range(100):  # the lock is gone: the statement ends, holds, and is given back
            await asyncio.sleep(0.05)
            if one(pg_url, "SELECT count(*) FROM reservations") == 0 and store.queue_depth == 0:
                break
        # the loop's connection came back in a known state: the next call uses it
        assert (await store.admit_async(1, CAPS, timeout=2.0)).reservation is not None

    asyncio.run(main())
    store.flush()
    assert one(pg_url, "SELECT count(*) FROM reservations") == 1  # only the last call's
    assert reserved(pg_url) == 1 * len(CAPS)
    assert int(one(pg_url, "SELECT coalesce(sum(used_nanos), 0) FROM counters")) == 0  # released, not spent


def test_admit_async_cancelled_by_its_caller_gives_the_hold_back(store: PostgresStore, pg_url: str) -> None:
    store.heartbeat()

    async def main() -> None:
        with counters_locked(pg_url, list(CAPS)):
            task = asyncio.ensure_future(store.admit_async(700, CAPS, timeout=5.0))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        for _ in range(100):
            await asyncio.sleep(0.05)
            if one(pg_url, "SELECT count(*) FROM reservations") == 0 and store.queue_depth == 0:
                break

    asyncio.run(main())
    store.flush()
    assert one(pg_url, "SELECT count(*) FROM reservations") == 0
    assert reserved(pg_url) == 0


def test_admit_async_during_an_outage_is_store_unavailable_then_recovers(store: PostgresStore, pg_url: str) -> None:
    rec, _ = store.issue_key("p", None)
    loop = asyncio.new_event_loop()
    try:
        def admit() -> Any:
            return loop.run_until_complete(store.admit_async(1, CAPS, key=rec, timeout=2.0))

        assert admit().reservation is not None  # (an idle loop connection now exists)
        with database_closed(pg_url):
            for _ in range(3):
                with pytest.raises(StoreUnavailable):
                    admit()
            assert not store.available
        deadline = time.monotonic() + 10
        while True:
            try:
                assert admit().reservation is not None
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "admit_async did not recover by itself"
                time.sleep(0.1)
        assert store.available
    finally:
        loop.close()


# --------------------------------------------------------------------------- the loop's ledger writer


@pytest.mark.parametrize("eager", [False, True], ids=["tasks", "eager-tasks"])
def test_rows_queued_in_one_turn_are_one_batch_committed_before_their_callbacks(
        store: PostgresStore, pg_url: str, eager: bool) -> None:
    """(mitmproxy's loop starts its tasks eagerly: the writer task then runs inside create_task.)"""
    seen: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if eager:
            loop.set_task_factory(asyncio.eager_task_factory)
        waiters = []
        for i in range(50):
            on_commit, fut = committed_waiter(loop)
            store.record_call(row(i), on_commit)
            waiters.append(fut)
        assert store.queue_depth == 50
        await asyncio.wait_for(waiters[0], 5)
        seen.append(one(pg_url, "SELECT count(*) FROM calls"))  # every row of the batch, already committed
        await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert store.queue_depth == 0
        for i in range(3):  # and again, once the first batch is done
            on_commit, fut = committed_waiter(loop)
            store.record_call(row(100 + i), on_commit)
            await asyncio.wait_for(fut, 5)

    asyncio.run(main())
    assert seen == [50]
    assert store._writer is None  # committed from the loop: no thread
    assert one(pg_url, "SELECT count(DISTINCT path) FROM calls") == 53


def test_a_batch_caught_by_an_outage_is_kept_and_committed_once_when_the_database_is_back(
        store: PostgresStore, pg_url: str) -> None:
    got: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        on_commit, fut = committed_waiter(loop)
        store.record_call(row(0), on_commit)
        await asyncio.wait_for(fut, 5)  # the writer's connection is open now
        with database_closed(pg_url):
            waiters = []
            for i in range(1, 21):
                on_commit, fut = committed_waiter(loop)
                store.record_call(row(i), on_commit)
                waiters.append(fut)
            await asyncio.sleep(0.5)
            assert not any(f.done() for f in waiters), "an answer was released before its row was committed"
            assert not store.available and store.queue_depth == 20
            got.append("outage")
        await asyncio.wait_for(asyncio.gather(*waiters), 10)
        assert store.available and store.queue_depth == 0

    asyncio.run(main())
    assert got == ["outage"]
    assert one(pg_url, "SELECT count(*) FROM calls") == 21
    assert one(pg_url, "SELECT count(DISTINCT path) FROM calls") == 21


def test_a_writer_cancelled_mid_statement_loses_nothing_and_writes_nothing_twice(
        store: PostgresStore, pg_url: str) -> None:
    """The batch's statement waits on a lock; the writer task is cancelled (the loop shutting
    down): the batch goes to the writer thread, which commits it once the lock is gone."""
    store.heartbeat()
    res = store.reserve(100, CAPS)

    async def main() -> None:
        store.settle(res, 60)
        store.record_call(row(1))
        await asyncio.sleep(0.3)  # the statement is in flight, blocked on the counters' lock
        assert store._ainflight and store._atask is not None
        store._atask.cancel()
        await asyncio.sleep(0.3)

    with counters_locked(pg_url, list(CAPS)):
        asyncio.run(main())
        assert one(pg_url, "SELECT count(*) FROM calls") == 0
    store.flush()
    assert store.queue_depth == 0
    assert one(pg_url, "SELECT count(*) FROM calls") == 1
    assert one(pg_url, "SELECT used_nanos FROM counters WHERE scope = 'key:k1'") == 60
    assert reserved(pg_url) == 0


def test_flush_from_another_thread_waits_for_the_loop_writer(store: PostgresStore, pg_url: str) -> None:
    started = threading.Event()
    stop: asyncio.Future[None] | None = None
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        nonlocal stop
        stop = loop.create_future()
        for i in range(200):
            store.record_call(row(i))
        started.set()
        await stop

    runner = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    runner.start()
    try:
        assert started.wait(5)
        store.flush()
        assert store.queue_depth == 0
        assert one(pg_url, "SELECT count(*) FROM calls") == 200
        assert store._writer is None  # the loop wrote them; flush only waited
    finally:
        loop.call_soon_threadsafe(lambda: stop.set_result(None))  # type: ignore[union-attr]
        runner.join(5)
        loop.close()


def test_close_on_the_loop_thread_with_a_batch_in_flight_commits_it_once(pg_url: str) -> None:
    """mitmproxy's ``done`` closes the store on the loop's own thread: the loop cannot finish the
    batch it sent, so close() reads its answer itself; what was only queued goes to the thread."""
    store = open_store(pg_url, replica="loop")
    assert isinstance(store, PostgresStore)
    calls: list[int] = []

    async def main() -> None:
        store.record_call(row(0))
        await asyncio.sleep(0.2)  # warm: the writer's connection is open
        store.record_call(row(1), lambda: calls.append(1))
        for _ in range(10):  # the writer sends the batch ...
            if store._ainflight:
                break
            await asyncio.sleep(0)
        assert store._ainflight
        store.record_call(row(2), lambda: calls.append(2))  # ... and this one waits for the next
        store.close()  # blocking, on the loop's thread

    asyncio.run(main())
    assert sorted(calls) == [1, 2]
    assert one(pg_url, "SELECT count(*) FROM calls") == 3
    assert one(pg_url, "SELECT count(DISTINCT path) FROM calls") == 3


def test_rows_of_a_stopped_loop_are_written_by_flush(store: PostgresStore, pg_url: str) -> None:
    """The CLI and tests run the loop now and then (run_until_complete): a flush between runs
    does not wait for a loop that is not running."""
    loop = asyncio.new_event_loop()
    try:
        async def queue_some() -> None:
            for i in range(10):
                store.record_call(row(i))

        loop.run_until_complete(queue_some())  # the writer task never got a turn
        t0 = time.monotonic()
        store.flush()
        assert time.monotonic() - t0 < 3
        assert one(pg_url, "SELECT count(*) FROM calls") == 10
        loop.run_until_complete(asyncio.sleep(0.1))  # the stale task wakes up and writes nothing
        store.flush()
        assert one(pg_url, "SELECT count(*) FROM calls") == 10
    finally:
        loop.close()


def test_a_row_that_cannot_be_written_is_dropped_alone(store: PostgresStore, pg_url: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        waiters = []
        for i in range(5):
            on_commit, fut = committed_waiter(loop)
            # a status no bigint holds: that row alone fails
            store.record_call(row(i, status=10**30 if i == 2 else 200), on_commit)
            waiters.append(fut)
        await asyncio.wait_for(asyncio.gather(*waiters), 5)

    asyncio.run(main())
    assert one(pg_url, "SELECT count(*) FROM calls") == 4


def test_a_full_server_makes_loop_calls_wait_for_a_connection_not_fail(pg_database: str) -> None:
    """The server has room for two more sessions of this gateway (a role's CONNECTION LIMIT stands
    for max_connections, shared by every replica): eight concurrent calls on the loop share the
    loop connections that did open, instead of failing 503 as if the database were down."""
    from pg import with_schema

    role, schema = f"pgloop_{secrets.token_hex(4)}", f"t_{secrets.token_hex(5)}"
    with psycopg.connect(pg_database, autocommit=True) as admin:
        # migrate (closed after), the pool's two, the key listener: 3 at rest; 2 more for the loop
        admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 5")
        admin.execute(f"CREATE SCHEMA {schema} AUTHORIZATION {role}")
        try:
            url = with_schema(pg_database.replace("postgres@", f"{role}@", 1), schema)
            store = open_store(url, replica="full")
            assert isinstance(store, PostgresStore)
            try:
                store.heartbeat()
                time.sleep(0.5)  # (the pool's connections are open)

                async def main() -> list[Any]:
                    return await asyncio.gather(*(
                        store.admit_async(1, CAPS, loop=LoopCheck(secrets.token_bytes(8), None, 3, 60.0), timeout=5.0)
                        for _ in range(8)), return_exceptions=True)

                got = asyncio.run(main())
                assert all(not isinstance(a, BaseException) and a.reservation is not None for a in got), got
                assert store.outages == 0 and store.available
            finally:
                store.close()
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")
            admin.execute(f"DROP ROLE {role}")


def test_arrays_sent_as_text_literals_arrive_as_sent(pg_url: str) -> None:
    """Scopes are any text (labels are URL-quoted, key ids are not ours to trust): quoting holds."""
    from spendgate.store.postgres import int_array, text_array

    odd = ["a,b", 'c"d', "e\\f", "{x}", "NULL", " sp ", "ü", "", "label:team=a%2Cb:day:2026-12-02"]
    with psycopg.connect(pg_url, autocommit=True) as c:
        for xs in ([], ["a"], odd):
            assert c.execute("SELECT %s::text[]", (text_array(xs),)).fetchone() == (xs,)
        for ns in ([], [1], [2**62, -5, 0]):
            assert c.execute("SELECT %s::bigint[]", (int_array(ns),)).fetchone() == (ns,)
