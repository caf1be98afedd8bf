"""Fleet mode as a platform engineer operates it, in seconds: every ``spendgate`` subcommand on a
``postgresql://`` ledger (``--db`` or ``SPENDGATE_DB``), errors that name the problem and never
print a password, and ``spendgate migrate`` of a box that crashed or is mounted read-only.

Real PostgreSQL (``SPENDGATE_TEST_POSTGRES``): skipped without one, failed under ``CI=true``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from spendgate.cli import main
from spendgate.store import open_store

NANOS = 10**9


def sg(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def test_every_subcommand_reads_the_fleet_ledger_from_db_or_the_environment(pg_url: str, tmp_path: Path) -> None:
    store = open_store(pg_url, replica="t")
    try:
        key, _ = store.issue_key("billing", None)
        store.add_approval({"id": "apr_fleet1", "key_id": key.id, "rule": "POST /v1/refunds", "status": "pending",
                            "vendor": "stripe", "method": "POST", "path": "/v1/refunds"})
        store.record_call({"ts": "2026-12-01T10:00:00.000+00:00", "key_id": key.id, "policy": "billing",
                           "vendor": "openai", "model": "gpt-imaginary-9", "method": "POST", "host": "api.openai.com",
                           "path": "/v1/chat/completions", "decision": "allow", "status": 200,
                           "cost_nanos": 2 * NANOS, "cost_status": "parsed"})
        store.flush()
    finally:
        store.close()
    env = {"SPENDGATE_DB": pg_url, "SPENDGATE_HOME": str(tmp_path)}  # no SQLite file anywhere
    for args in (["approvals"], ["approvals", "list"]):  # `spendgate approvals` alone lists, as the README says
        out = sg(*args, env=env)
        assert out.exit_code == 0 and "apr_fleet1" in out.output, (args, out.output)
    out = sg("approvals", "--db", pg_url, "--json", env={"SPENDGATE_HOME": str(tmp_path)})
    assert out.exit_code == 2  # --json belongs to `list`
    out = sg("approvals", "--db", pg_url, env={"SPENDGATE_HOME": str(tmp_path)})
    assert out.exit_code == 0 and "apr_fleet1" in out.output, out.output
    # a --db given to the group is the ledger its subcommand decides on (never the default one)
    out = sg("approvals", "--db", pg_url, "deny", "apr_fleet1", env={"SPENDGATE_HOME": str(tmp_path)})
    assert out.exit_code == 0 and "denied" in out.output, out.output
    # prices check: the models seen in the fleet's ledger without a price row
    for extra, e in ((["--db", pg_url], {"SPENDGATE_HOME": str(tmp_path)}), ([], env)):
        out = sg("prices", "check", "--json", *extra, env=e)
        assert out.exit_code == 1, out.output
        missing = json.loads(out.output)["models_without_a_row"]
        assert [(m["vendor"], m["model"], m["calls"]) for m in missing] == [("openai", "gpt-imaginary-9", 1)]
    out = sg("report", "--by", "model", "--json", env=env)
    assert out.exit_code == 0 and json.loads(out.output)[0]["spend_usd"] == "2", out.output
    assert sg("keys", "list", env=env).output.count(key.id) == 1


@pytest.mark.parametrize("url", [
    "postgresql://agent:{pw}@127.0.0.1:1/spendgate",
    "postgresql://agent@127.0.0.1:1/spendgate?password={pw}&sslmode=disable",
    "postgresql://agent:{pw}@[::1/spendgate",  # malformed: libpq quotes the whole URL back
])
def test_a_bad_or_unreachable_url_is_one_clear_line_without_the_password(url: str, tmp_path: Path) -> None:
    pw = "Sup3rS3cretPw"
    for args in (["keys", "list"], ["report"], ["approvals"], ["prices", "check"]):
        out = sg(*args, "--db", url.format(pw=pw), env={"SPENDGATE_HOME": str(tmp_path)})
        assert out.exit_code == 1 and out.exception is None or isinstance(out.exception, SystemExit), out.exception
        assert pw not in out.output and "Traceback" not in out.output, out.output
        assert "ledger" in out.output and "***" in out.output, out.output


def test_a_ledger_that_stops_answering_mid_command_is_a_clear_error_not_a_traceback(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg

    from spendgate.store import postgres

    monkeypatch.setattr(postgres, "STATEMENT_TIMEOUT_MS", 300)  # (5 s in production)
    open_store(pg_url, replica="t").close()  # the schema
    env = {"SPENDGATE_DB": pg_url, "SPENDGATE_HOME": str(tmp_path)}
    with psycopg.connect(pg_url) as locker:  # someone holds a lock on the ledger's tables
        locker.execute("LOCK TABLE keys, approvals, calls IN ACCESS EXCLUSIVE MODE")
        for args in (["keys", "list"], ["approvals"], ["report"], ["keys", "revoke", "key_x"], ["approve", "apr_x"]):
            out = sg(*args, env=env)
            assert out.exit_code == 1 and isinstance(out.exception, SystemExit), (args, out.exception)
            assert "did not answer within 300 ms" in out.output, (args, out.output)
        locker.rollback()
    assert sg("keys", "list", env=env).exit_code == 0


CRASHED_BOX = """
import os, sys
from spendgate.store.sqlite import SQLiteStore
box = SQLiteStore(sys.argv[1], replica="box")
key, _ = box.issue_key("pay", None)
box.heartbeat()
scopes = {f"key:{key.id}": 100 * 10**9, "policy:pay:day:2026-12-02": 100 * 10**9}
done = box.reserve(5 * 10**9, scopes, {"key_id": key.id})
box.settle(done, 4 * 10**9)
box.flush()
box.reserve(7 * 10**9, scopes, {"key_id": key.id, "policy": "pay", "vendor": "stripe", "method": "POST",
                                "path": "/v1/payment_intents", "flow_id": "f-in-flight"})
box.reserve(3 * 10**9, scopes, {"key_id": key.id, "path": "/v1/transfers"}, forwarded=False)  # awaiting a human
print(key.id, flush=True)
os._exit(0)  # kill -9: no clean stop, the holds stay open (and the -wal beside the file)
"""


def crashed_box(path: Path) -> str:
    return subprocess.run([sys.executable, "-c", CRASHED_BOX, str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_migrate_settles_a_crashed_box_holds_by_the_dead_replica_rule(tmp_path: Path, pg_url: str) -> None:
    box = tmp_path / "data" / "spendgate.db"
    box.parent.mkdir()
    key_id = crashed_box(box)
    env = {"SPENDGATE_HOME": str(tmp_path)}
    out = sg("migrate", "--from", str(box), "--to", pg_url, env=env)
    assert out.exit_code == 0, out.output
    assert "1 forwarded counted at their estimate" in out.output and "1 never forwarded released" in out.output
    # the progress, in a log (not a terminal): a line per chunk of rows, from 0 to all
    assert "calls rows: 0/1 (0%)" in out.stderr and "calls rows: 1/1 (100%)" in out.stderr, out.stderr
    fleet = open_store(pg_url, replica="fleet")
    try:
        # $4 settled + the forwarded $7 at its estimate; the $3 transfer never sent: not spend
        assert fleet.used(f"key:{key_id}") == 11 * NANOS
        assert fleet.read("SELECT sum(reserved_nanos) FROM counters") == [(0,)]
        rows = fleet.read("SELECT path, flow_id, cost_status, flagged, estimated_nanos FROM calls")
        assert rows == [("/v1/payment_intents", "f-in-flight", "unknown", 1, 7 * NANOS)]
        # the box's file agrees (what it would have done at its next start): a second run adds nothing
        again = sg("migrate", "--from", str(box), "--to", pg_url, env=env)
        assert again.exit_code == 0 and "0 new calls rows" in again.output and "$0 of budget" in again.output
        assert "holds settled" not in again.output
        assert fleet.used(f"key:{key_id}") == 11 * NANOS
    finally:
        fleet.close()


def test_migrate_reads_a_ledger_mounted_read_only(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``docker compose run -v "$PWD/data:/old:ro" … spendgate migrate --from /old/spendgate.db``: the
    file (and its -wal, a crashed box's last writes) is read as it is, never written; its open holds
    count as spend (the conservative side: the box's own file cannot record their settlement)."""
    import os

    from spendgate.store import transfer

    box = tmp_path / "ro" / "spendgate.db"
    box.parent.mkdir()
    key_id = crashed_box(box)
    assert Path(str(box) + "-wal").stat().st_size > 0  # the rows are in the WAL only
    # (the -shm is SQLite's shared memory: readers write it when they can, and on a read-only mount
    # SQLite keeps it in memory)
    before = {p.name: p.read_bytes() for p in box.parent.iterdir() if not p.name.endswith("-shm")}
    real_access = os.access
    monkeypatch.setattr(transfer.os, "access",  # a read-only mount (root ignores chmod, so say it)
                        lambda p, mode, **kw: False if mode == os.W_OK else real_access(p, mode, **kw))
    out = transfer.migrate(str(box), pg_url)
    assert out == {"keys": 1, "approvals": 0, "calls": 0, "reconciliations": 0,
                   "counter_nanos_added": 2 * 14 * NANOS}  # two scopes
    assert {p.name: p.read_bytes() for p in box.parent.iterdir() if not p.name.endswith("-shm")} == before
    fleet = open_store(pg_url, replica="fleet")
    try:
        assert fleet.used(f"key:{key_id}") == 14 * NANOS
    finally:
        fleet.close()


def test_after_an_outage_a_replica_does_not_take_live_replicas_for_dead(pg_url: str) -> None:
    """The database away longer than the lease: every heartbeat is stale when it is back, the live
    replicas' too. A replica that has not itself been connected for a whole lease since must not
    recover their holds (it counted a call at its estimate with a flagged row, then its live
    replica settled it and wrote the real row: two rows, the spend reported twice)."""
    import time

    from spendgate.store import StoreUnavailable

    a, b = open_store(pg_url, replica="a", lease=0.3), open_store(pg_url, replica="b", lease=0.3)
    try:
        a.heartbeat()
        b.heartbeat()
        a.reserve(5, {"key:k": 100}, {"key_id": "k", "flow_id": "in-flight"})  # forwarded, in flight on a
        b._down(StoreUnavailable("the outage"))  # (what every statement of b saw meanwhile)
        time.sleep(0.45)  # nobody could beat: a's heartbeat is now older than the lease
        b._up()  # the database is back: b's first statement
        b.heartbeat()
        assert b.recover_holds() == (0, 0)  # a is silent only because b could not hear it
        a.heartbeat()  # a beats within a third of the lease once the database is back
        time.sleep(0.35)
        a.heartbeat()
        b.heartbeat()
        assert b.recover_holds() == (0, 0) and b.used("key:k") == 5  # still a's hold
        time.sleep(0.45)  # now a really is silent, and b was connected all along
        b.heartbeat()
        assert b.recover_holds() == (1, 0)
    finally:
        a.close()
        b.close()


def test_check_also_checks_the_fleet_ledger(pg_url: str, tmp_path: Path) -> None:
    """`spendgate check --db URL` (or SPENDGATE_DB=postgresql://…): the policy, then whether the
    ledger answers with a schema this spendgate runs on; read only (nothing created or migrated)."""
    import psycopg

    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nvendors:\n  stripe: {secret: env:NOPE}\npolicies:\n"
                      "  p: {vendors: {stripe: {allow: ['GET /v1/charges']}}}\n")
    home = {"SPENDGATE_HOME": str(tmp_path)}
    out = sg("check", str(policy), "--no-secrets", "--db", pg_url, env=home)
    assert out.exit_code == 0 and "no schema yet" in out.output, out.output
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,)  # nothing created
    open_store(pg_url, replica="t").close()
    out = sg("check", str(policy), "--no-secrets", env={**home, "SPENDGATE_DB": pg_url})
    assert out.exit_code == 0 and "p.yaml: ok" in out.output and "ok (schema version" in out.output, out.output
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (99)")
    out = sg("check", str(policy), "--no-secrets", "--db", pg_url, env=home)
    assert out.exit_code == 1 and "version 99, newer than this spendgate knows" in out.output, out.output
    out = sg("check", str(policy), "--no-secrets", "--db", "postgresql://u:Sup3rS3cretPw@127.0.0.1:1/x", env=home)
    assert out.exit_code == 1 and "cannot be read" in out.output and "Sup3rS3cretPw" not in out.output, out.output
    # a single box: SQLite as before (a file not there yet is not a problem)
    out = sg("check", str(policy), "--no-secrets", "--db", str(tmp_path / "none.db"), env=home)
    assert out.exit_code == 0 and "none yet" in out.output, out.output


def test_after_a_ledger_outage_a_single_box_process_does_not_take_live_ones_for_dead(tmp_path: Path) -> None:
    """The same rule on SQLite (processes sharing one file; an outage: disk full, a lock)."""
    import time

    from spendgate.store.sqlite import SQLiteStore

    path = str(tmp_path / "box.db")
    a, b = SQLiteStore(path, replica="a", lease=0.3), SQLiteStore(path, replica="b", lease=0.3)
    try:
        a.heartbeat()
        b.heartbeat()
        a.reserve(5, {"key:k": 100}, {"key_id": "k", "flow_id": "in-flight"})
        b._outage(OSError("disk full"))  # (what b's writer saw meanwhile)
        time.sleep(0.45)
        b._outage(None)  # writable again
        b.heartbeat()
        assert b.recover_holds() == (0, 0)
        a.heartbeat()
        time.sleep(0.35)
        a.heartbeat()
        b.heartbeat()
        assert b.recover_holds() == (0, 0) and b.used("key:k") == 5
        time.sleep(0.45)
        b.heartbeat()
        assert b.recover_holds() == (1, 0)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_dead_gateways_pending_approval_is_closed_with_its_released_hold(backend: str, tmp_path: Path,
                                                                          request: pytest.FixtureRequest) -> None:
    """A call waiting for a human dies with its gateway: its hold is released and its approval is
    no longer pending (approving it would resume nothing); a live gateway's stays pending."""
    import time

    url = str(tmp_path / "box.db") if backend == "sqlite" else request.getfixturevalue("pg_url")
    dead, live = open_store(url, replica="dead", lease=0.3), open_store(url, replica="live", lease=0.3)
    try:
        for s, flow in ((dead, "f-dead"), (live, "f-live")):
            s.heartbeat()
            s.reserve(3, {"key:k": 100}, {"key_id": "k", "flow_id": flow}, forwarded=False)
            s.add_approval({"id": f"apr_{flow}", "flow_id": flow, "key_id": "k", "rule": "POST /v1/refunds",
                            "status": "pending"})
        time.sleep(0.45)  # "dead" never beats again
        live.heartbeat()
        assert live.recover_holds() == (0, 1)
        status = {a["id"]: (a["status"], a["decided_by"]) for a in live.list_approvals(None)}
        assert status == {"apr_f-dead": ("timeout", "recovery"), "apr_f-live": ("pending", None)}
        assert [a["id"] for a in live.list_approvals()] == ["apr_f-live"]
    finally:
        dead.close()
        live.close()
