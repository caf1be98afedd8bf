"""PostgreSQL ledger: fleet mode, N gateway replicas on one database (psycopg 3 + psycopg-pool).

The same contract as ``sqlite.py`` (``tests/test_store_contract.py`` runs against both); what
differs is how each promise is kept across machines:

- **Caps never overshoot across replicas.** A reservation is one call of the server-side function
  ``spendgate_reserve``: it locks the counters of every scope *in scope order* (``SELECT … ORDER
  BY scope FOR UPDATE``; one lock order, so replicas never deadlock), checks every cap, and adds
  the hold, in one transaction and one round trip. The budget stage asks the loop breaker and the
  hold together (``spendgate_admit``, inside ``spendgate_check`` with the key's row and the rate
  limit: still one round trip), awaited on the event loop's own connection (``admit_async``: no
  worker thread). Settlements are applied by the ledger writer in batches, also in scope order.
- **Revoke on the next request everywhere.** Keys are cached by token hash in each replica (the
  record: policy, labels, cap). A trigger on ``keys`` sends ``NOTIFY spendgate_keys`` on every
  change (CLI, admin API, another replica, psql); a listener thread drops the entry at once. That
  alone would leave a few ms after a revoke's commit in which a replica still trusts its entry,
  so every request also reads its key's row in the round trip it makes anyway before it is
  forwarded (``spendgate_check``: the rate limit, or the loop breaker and hold): a revoke committed
  before that statement is refused, on every replica, whether or not the NOTIFY has arrived.
- **Rate limits and the loop breaker are fleet-wide**: ``spendgate_rate_hit`` (GCRA on one row
  per key, the database's clock) and ``spendgate_loop_hit`` (recent fingerprints in ``loops``).
- **``calls`` rows are batched off the event loop**: the loop's writer (a task, group commit:
  what arrives while a batch is in flight is the next batch) sends them with the queued
  settlements in one statement per batch (``spendgate_write``: one round trip, one transaction)
  on its own connection, awaited: the loop never waits on the database, it is woken by the
  answer (see :meth:`PostgresStore._awrite_loop`). ``on_commit`` runs after the statement returns
  (committed), so an answer still leaves only once its row is committed. Without a running loop
  (the CLI, tests) or from another thread, a writer thread does the same. (Recovered holds still
  use ``COPY``.)
- **Schema**: ``schema_version``; migrations run under a transaction-scoped advisory lock
  (replicas starting at once migrate once); a newer schema is refused.
- **Unreachable database**: every operation raises :class:`StoreUnavailable` (the call is refused
  503 ``store_unavailable``); one log line when the outage starts and one when it ends; queued
  rows wait and are committed when the database is back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from decimal import Decimal
from hmac import compare_digest
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

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
    Precheck,
    RateCheck,
    Reconciliation,
    Reservation,
    SchemaError,
    Settle,
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
    redact_url,
)
from .sqlite import pid_alive

log = logging.getLogger("spendgate")

CONNECT_TIMEOUT = 3  # seconds to open a connection
POOL_WAIT = 1.0  # seconds a call waits for a pooled connection
PROBE_EVERY = 0.5  # during an outage, one call in this many seconds tries the database; the rest fail at once
STATEMENT_TIMEOUT_MS = 5000  # a lock wait or a slow query fails the call, not the gateway
FLUSH_INTERVAL = 0.05
# Statements in flight at once on the event loop's connections (admit_async, precheck_async): each
# needs its own connection, and a server's max_connections is shared by every replica; more would
# only queue on the counters' row locks of a busy key.
ASYNC_SLOTS = 10
CHANNEL = "spendgate_keys"

# The ``calls`` columns spendgate_write inserts (every one but ``id``), as of the latest migration
# that (re)defines it; tests/test_store_contract.py checks they are CALL_COLUMNS' own.
ROW_COLUMNS = ("ts", "flow_id", "key_id", "policy", "labels", "vendor", "method", "host", "path", "status",
               "decision", "reason", "estimated_usd", "estimated_nanos", "cost_usd", "cost_nanos", "cost_status",
               "flagged", "note", "currency", "amount", "request_id", "latency_ms", "model", "tool", "object_id",
               "scopes", "reconciled_at")

MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE keys (id text PRIMARY KEY, policy text, token_sha256 text UNIQUE, labels text,
           created_at text, expires_at text, revoked_at text, cap_usd text, source text)""",
        """CREATE TABLE calls (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, ts text, flow_id text,
           key_id text, policy text, labels text, vendor text, method text, host text, path text, status bigint,
           decision text, reason text, estimated_usd text, estimated_nanos bigint, cost_usd text,
           cost_nanos bigint, cost_status text, flagged bigint, note text, currency text, amount text,
           request_id text, latency_ms double precision, model text, tool text)""",
        "CREATE INDEX calls_ts ON calls (ts)",
        "CREATE INDEX calls_key_ts ON calls (key_id, ts)",
        """CREATE TABLE counters (scope text PRIMARY KEY, used_nanos bigint NOT NULL DEFAULT 0,
           reserved_nanos bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now())""",
        """CREATE TABLE approvals (id text PRIMARY KEY, flow_id text, key_id text, policy text, vendor text,
           method text, path text, rule text, estimated_usd text, created_at text, expires_at text,
           status text, decided_by text, decided_at text)""",
        """CREATE TABLE reservations (id text PRIMARY KEY, nanos bigint NOT NULL, scopes text[] NOT NULL,
           created_at timestamptz NOT NULL DEFAULT now(), instance text, forwarded boolean NOT NULL DEFAULT true,
           meta text)""",
        "CREATE INDEX reservations_instance ON reservations (instance)",
        """CREATE TABLE instances (id text PRIMARY KEY, replica text, host text, pid integer,
           started_at timestamptz NOT NULL DEFAULT now(), heartbeat_at timestamptz NOT NULL DEFAULT now())""",
        "CREATE TABLE rates (name text PRIMARY KEY, tat double precision NOT NULL)",
        "CREATE TABLE loops (fp bytea NOT NULL, ts timestamptz NOT NULL, idem bytea)",
        "CREATE INDEX loops_fp ON loops (fp, ts)",
        "CREATE TABLE imported (source text NOT NULL, what text NOT NULL, value bigint NOT NULL, "
        "PRIMARY KEY (source, what))",
        # Every change to a key (CLI, admin API, another replica, psql) tells every replica.
        """CREATE FUNCTION spendgate_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN
             PERFORM pg_notify('spendgate_keys', coalesce(NEW.token_sha256, OLD.token_sha256, ''));
             RETURN NULL;
           END $$""",
        """CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE ON keys
           FOR EACH ROW EXECUTE FUNCTION spendgate_keys_changed()""",
        # The hold: lock every scope's counter in scope order, check every cap, add the hold.
        """CREATE FUNCTION spendgate_reserve(p_id text, p_nanos bigint, p_scopes text[], p_caps bigint[],
                                            p_instance text, p_forwarded boolean, p_meta text)
           RETURNS TABLE (ok boolean, scope text, cap bigint, used bigint, left_nanos bigint)
           LANGUAGE plpgsql AS $$
           DECLARE
             i int;
             u bigint;
             tightest bigint := NULL;
           BEGIN
             INSERT INTO counters AS c (scope) SELECT s FROM unnest(p_scopes) s ORDER BY s
               ON CONFLICT DO NOTHING;
             PERFORM 1 FROM counters c WHERE c.scope = ANY(p_scopes) ORDER BY c.scope FOR UPDATE;
             FOR i IN 1 .. cardinality(p_scopes) LOOP
               SELECT c.used_nanos + c.reserved_nanos INTO u FROM counters c WHERE c.scope = p_scopes[i];
               IF u + p_nanos > p_caps[i] THEN
                 RETURN QUERY SELECT false, p_scopes[i], p_caps[i], u, NULL::bigint;
                 RETURN;
               END IF;
               tightest := least(tightest, p_caps[i] - u - p_nanos);
             END LOOP;
             UPDATE counters c SET reserved_nanos = c.reserved_nanos + p_nanos, updated_at = now()
               WHERE c.scope = ANY(p_scopes);
             INSERT INTO reservations (id, nanos, scopes, instance, forwarded, meta)
               VALUES (p_id, p_nanos, p_scopes, p_instance, p_forwarded, p_meta);
             RETURN QUERY SELECT true, NULL::text, NULL::bigint, NULL::bigint, tightest;
           END $$""",
        # Settlements and unheld usage of one batch: per-scope deltas applied in scope order.
        """CREATE FUNCTION spendgate_apply(p_ids text[], p_actuals bigint[], p_uscopes text[], p_unanos bigint[])
           RETURNS void LANGUAGE plpgsql AS $$
           DECLARE
             sc text[];
             rels bigint[];
             acts bigint[];
             i int;
           BEGIN
             WITH d AS (
               DELETE FROM reservations h USING unnest(p_ids, p_actuals) AS x(id, actual)
               WHERE h.id = x.id RETURNING h.nanos, x.actual, h.scopes),
             deltas AS (
               SELECT s AS scope, d.nanos AS rel, d.actual AS act FROM d, unnest(d.scopes) s
               UNION ALL SELECT u.s, 0, u.n FROM unnest(p_uscopes, p_unanos) AS u(s, n))
             SELECT array_agg(scope ORDER BY scope), array_agg(r ORDER BY scope), array_agg(a ORDER BY scope)
               INTO sc, rels, acts
               FROM (SELECT scope, sum(rel)::bigint AS r, sum(act)::bigint AS a FROM deltas GROUP BY scope) g;
             FOR i IN 1 .. coalesce(cardinality(sc), 0) LOOP
               INSERT INTO counters AS c (scope, used_nanos, reserved_nanos) VALUES (sc[i], acts[i], 0)
                 ON CONFLICT (scope) DO UPDATE SET
                   reserved_nanos = greatest(0, c.reserved_nanos - rels[i]),
                   used_nanos = c.used_nanos + acts[i], updated_at = now();
             END LOOP;
           END $$""",
        # GCRA on the database's clock: one row per key, across the fleet.
        """CREATE FUNCTION spendgate_rate_hit(p_name text, p_limit int, p_period double precision)
           RETURNS double precision LANGUAGE plpgsql AS $$
           DECLARE
             t double precision := extract(epoch FROM clock_timestamp());
             step double precision := p_period / p_limit;
             cur double precision;
             wait double precision;
           BEGIN
             INSERT INTO rates AS r (name, tat) VALUES (p_name, t) ON CONFLICT DO NOTHING;
             SELECT greatest(r.tat, t) INTO cur FROM rates r WHERE r.name = p_name FOR UPDATE;
             wait := cur - t - (p_period - step);
             IF wait > 0 THEN
               RETURN wait;
             END IF;
             UPDATE rates r SET tat = cur + step WHERE r.name = p_name;
             RETURN 0;
           END $$""",
        # The loop breaker: the same priced request seen p_repeats times within p_window seconds.
        """CREATE FUNCTION spendgate_loop_hit(p_fp bytea, p_idem bytea, p_repeats int, p_window double precision)
           RETURNS boolean LANGUAGE plpgsql AS $$
           DECLARE t timestamptz := clock_timestamp();
           BEGIN
             PERFORM pg_advisory_xact_lock(hashtextextended(encode(p_fp, 'hex'), 7));
             DELETE FROM loops l WHERE l.fp = p_fp AND l.ts < t - make_interval(secs => p_window);
             IF p_idem IS NOT NULL AND EXISTS (SELECT 1 FROM loops l WHERE l.fp = p_fp AND l.idem = p_idem) THEN
               RETURN false;
             END IF;
             IF (SELECT count(*) FROM loops l WHERE l.fp = p_fp) >= p_repeats THEN
               RETURN true;
             END IF;
             INSERT INTO loops (fp, ts, idem) VALUES (p_fp, t, p_idem);
             RETURN false;
           END $$""",
    ],
    2: [  # costs settled later (spendgate reconcile)
        "ALTER TABLE calls ADD COLUMN object_id text, ADD COLUMN scopes text, ADD COLUMN reconciled_at text",
        """CREATE TABLE reconciliations (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, ts text,
           call_id bigint, vendor text, object_id text, from_status text, to_status text, old_usd text,
           old_nanos bigint, new_usd text, new_nanos bigint, delta_usd text, delta_nanos bigint, source text,
           reconciled_by text, note text)""",
        "CREATE INDEX reconciliations_call_id ON reconciliations (call_id)",
    ],
    3: [
        # A money call's database work in one round trip: the loop breaker, then (unless it looped
        # and p_hold_if_looped is false) the hold, or, with nothing to hold, the room left in the
        # caps. One transaction: the fingerprint's advisory lock, then the counters in scope order.
        """CREATE FUNCTION spendgate_admit(p_fp bytea, p_idem bytea, p_repeats int, p_window double precision,
                                          p_hold_if_looped boolean, p_id text, p_nanos bigint, p_scopes text[],
                                          p_caps bigint[], p_instance text, p_forwarded boolean, p_meta text)
           RETURNS TABLE (looped boolean, ok boolean, scope text, cap bigint, used bigint, left_nanos bigint)
           LANGUAGE plpgsql AS $$
           DECLARE
             hit boolean := false;
             r record;
           BEGIN
             IF p_fp IS NOT NULL THEN
               hit := spendgate_loop_hit(p_fp, p_idem, p_repeats, p_window);
               IF hit AND NOT p_hold_if_looped THEN
                 RETURN QUERY SELECT true, NULL::boolean, NULL::text, NULL::bigint, NULL::bigint, NULL::bigint;
                 RETURN;
               END IF;
             END IF;
             IF p_nanos > 0 THEN
               SELECT * INTO r FROM spendgate_reserve(p_id, p_nanos, p_scopes, p_caps, p_instance, p_forwarded, p_meta);
               RETURN QUERY SELECT hit, r.ok, r.scope, r.cap, r.used, r.left_nanos;
               RETURN;
             END IF;
             RETURN QUERY SELECT hit, true, NULL::text, NULL::bigint, NULL::bigint,
               (SELECT min(x.cp - coalesce(c.used_nanos + c.reserved_nanos, 0))::bigint
                  FROM unnest(p_scopes, p_caps) AS x(sc, cp) LEFT JOIN counters c ON c.scope = x.sc);
           END $$""",
        # Settlements find their holds through the primary key (a join on unnest() was planned as a
        # sequential scan of ``reservations``, whose dead rows pile up between autovacuums).
        """CREATE OR REPLACE FUNCTION spendgate_apply(p_ids text[], p_actuals bigint[], p_uscopes text[],
                                                     p_unanos bigint[])
           RETURNS void LANGUAGE plpgsql AS $$
           DECLARE
             sc text[];
             rels bigint[];
             acts bigint[];
             i int;
           BEGIN
             WITH d AS (
               DELETE FROM reservations h WHERE h.id = ANY(p_ids)
               RETURNING h.nanos, p_actuals[array_position(p_ids, h.id)] AS actual, h.scopes),
             deltas AS (
               SELECT s AS scope, d.nanos AS rel, d.actual AS act FROM d, unnest(d.scopes) s
               UNION ALL SELECT u.s, 0, u.n FROM unnest(p_uscopes, p_unanos) AS u(s, n))
             SELECT array_agg(scope ORDER BY scope), array_agg(r ORDER BY scope), array_agg(a ORDER BY scope)
               INTO sc, rels, acts
               FROM (SELECT scope, sum(rel)::bigint AS r, sum(act)::bigint AS a FROM deltas GROUP BY scope) g;
             FOR i IN 1 .. coalesce(cardinality(sc), 0) LOOP
               INSERT INTO counters AS c (scope, used_nanos, reserved_nanos) VALUES (sc[i], acts[i], 0)
                 ON CONFLICT (scope) DO UPDATE SET
                   reserved_nanos = greatest(0, c.reserved_nanos - rels[i]),
                   used_nanos = c.used_nanos + acts[i], updated_at = now();
             END LOOP;
           END $$""",
        # The writer's batch in one round trip: its settlements and unheld usage, then its rows (a
        # JSON array of objects). A column added to ``calls`` later redefines this function too.
        f"""CREATE FUNCTION spendgate_write(p_ids text[], p_actuals bigint[], p_uscopes text[], p_unanos bigint[],
                                           p_rows json)
           RETURNS void LANGUAGE plpgsql AS $$
           BEGIN
             IF cardinality(p_ids) > 0 OR cardinality(p_uscopes) > 0 THEN
               PERFORM spendgate_apply(p_ids, p_actuals, p_uscopes, p_unanos);
             END IF;
             INSERT INTO calls ({', '.join(ROW_COLUMNS)})
               SELECT {', '.join(ROW_COLUMNS)} FROM json_populate_recordset(NULL::calls, p_rows);
           END $$""",
    ],
    4: [
        # Everything a request asks before it is forwarded, in one round trip: the key's row (a
        # revoke committed before this statement is seen: the next request is refused on every
        # replica, whatever its key cache says), then the rate limit, then spendgate_admit (the
        # loop breaker, the hold or the room left). A key that is not active counts nothing; a
        # rate-limited request holds nothing. p_scopes NULL: stop after the rate limit.
        """CREATE OR REPLACE FUNCTION spendgate_check(
             p_key text, p_sha text, p_rate text, p_limit int, p_period double precision,
             p_fp bytea, p_idem bytea, p_repeats int, p_window double precision, p_hold_if_looped boolean,
             p_id text, p_nanos bigint, p_scopes text[], p_caps bigint[], p_instance text, p_forwarded boolean,
             p_meta text)
           RETURNS TABLE (key_state text, wait double precision, looped boolean, ok boolean, scope text,
                          cap bigint, used bigint, left_nanos bigint)
           LANGUAGE plpgsql AS $$
           DECLARE
             ks text := NULL;
             w double precision := 0;
             r record;
           BEGIN
             IF p_key IS NOT NULL THEN
               SELECT CASE WHEN k.revoked_at IS NULL THEN 'active' ELSE 'revoked' END INTO ks
                 FROM keys k WHERE k.id = p_key AND k.token_sha256 = p_sha;
               ks := coalesce(ks, 'unknown');
               IF ks <> 'active' THEN
                 RETURN QUERY SELECT ks, 0::double precision, false, NULL::boolean, NULL::text, NULL::bigint,
                   NULL::bigint, NULL::bigint;
                 RETURN;
               END IF;
             END IF;
             IF p_rate IS NOT NULL THEN
               w := spendgate_rate_hit(p_rate, p_limit, p_period);
             END IF;
             IF w > 0 OR p_scopes IS NULL THEN
               RETURN QUERY SELECT ks, w, false, NULL::boolean, NULL::text, NULL::bigint, NULL::bigint, NULL::bigint;
               RETURN;
             END IF;
             SELECT * INTO r FROM spendgate_admit(p_fp, p_idem, p_repeats, p_window, p_hold_if_looped, p_id,
                                                  p_nanos, p_scopes, p_caps, p_instance, p_forwarded, p_meta);
             RETURN QUERY SELECT ks, w, r.looped, r.ok, r.scope, r.cap, r.used, r.left_nanos;
           END $$""",
        # The loop breaker counts at most p_repeats sightings (it read every sighting of the
        # fingerprint in the window: a request repeated thousands of times a minute under a high
        # ``repeats`` made each check slower than the last). Same answers.
        """CREATE OR REPLACE FUNCTION spendgate_loop_hit(p_fp bytea, p_idem bytea, p_repeats int,
                                                        p_window double precision)
           RETURNS boolean LANGUAGE plpgsql AS $$
           DECLARE t timestamptz := clock_timestamp();
           BEGIN
             PERFORM pg_advisory_xact_lock(hashtextextended(encode(p_fp, 'hex'), 7));
             DELETE FROM loops l WHERE l.fp = p_fp AND l.ts < t - make_interval(secs => p_window);
             IF p_idem IS NOT NULL AND EXISTS (SELECT 1 FROM loops l WHERE l.fp = p_fp AND l.idem = p_idem) THEN
               RETURN false;
             END IF;
             IF (SELECT count(*) FROM (SELECT 1 FROM loops l WHERE l.fp = p_fp LIMIT p_repeats) x) >= p_repeats THEN
               RETURN true;
             END IF;
             INSERT INTO loops (fp, ts, idem) VALUES (p_fp, t, p_idem);
             RETURN false;
           END $$""",
    ],
    5: [
        # Cheaper server-side work for every request: the same answers, locks and lock order, in
        # fewer and simpler statements (each statement a plpgsql function runs has a fixed cost; a
        # money call ran ~17 of them, now 6). Figures: the commit message.
        #
        # Every table stays logged (crash-safe). Unlogged ``rates`` and ``loops`` (whose loss
        # would only reset rate limits and loop history) were measured: no gain within the noise,
        # since a commit's cost here is not the WAL. So a PostgreSQL crash loses no loop history.
        #
        # Counters and rate rows are updated in place many times a second: room on their pages for
        # HOT updates (a new version on the same page, no index entry).
        "ALTER TABLE counters SET (fillfactor = 50)",
        "ALTER TABLE rates SET (fillfactor = 50)",
        # The loop breaker: one row per fingerprint (its sightings within the window, oldest first,
        # and each one's Idempotency-Key digest), not one row per sighting under an advisory lock
        # (lock, DELETE, count, INSERT: four statements). The row lock serializes one fingerprint's
        # checks across the fleet as the advisory lock did. ``ts`` is the newest sighting, so
        # ``DELETE FROM loops WHERE ts < now() - window`` (recover_holds) still drops only
        # fingerprints with nothing left in the window. ``hit``: the answer of the last check (what
        # the statement returns). Existing sightings are carried over.
        "ALTER TABLE loops RENAME TO loops_v4",
        """CREATE TABLE loops (fp bytea PRIMARY KEY, ts timestamptz NOT NULL, seen timestamptz[] NOT NULL,
           idems bytea[] NOT NULL, hit boolean NOT NULL DEFAULT false) WITH (fillfactor = 70)""",
        """INSERT INTO loops (fp, ts, seen, idems)
           SELECT fp, max(ts), array_agg(ts ORDER BY ts), array_agg(idem ORDER BY ts) FROM loops_v4 GROUP BY fp""",
        "DROP TABLE loops_v4",
        # Same answers as migration 1's: p_repeats sightings of a fingerprint within p_window seconds
        # (the database's clock) and the next one is a loop (not recorded); a sighting whose
        # Idempotency-Key was already seen in the window is a retry, never a loop (not recorded).
        # One statement: a new fingerprint is an insert; a known one is locked and updated.
        """CREATE OR REPLACE FUNCTION spendgate_loop_hit(p_fp bytea, p_idem bytea, p_repeats int,
                                                        p_window double precision)
           RETURNS boolean LANGUAGE plpgsql AS $$
           DECLARE
             t timestamptz := clock_timestamp();
             since timestamptz := t - make_interval(secs => p_window);
             hit boolean;
           BEGIN
             INSERT INTO loops AS l (fp, ts, seen, idems, hit)
               VALUES (p_fp, t, CASE WHEN p_repeats > 0 THEN ARRAY[t] ELSE '{}' END,
                       CASE WHEN p_repeats > 0 THEN ARRAY[p_idem] ELSE '{}' END, p_repeats <= 0)
             ON CONFLICT (fp) DO UPDATE SET (ts, seen, idems, hit) = (
               SELECT CASE WHEN k.stop THEN l.ts ELSE t END,
                      CASE WHEN k.stop THEN k.seen ELSE array_append(k.seen, t) END,
                      CASE WHEN k.stop THEN k.idems ELSE array_append(k.idems, p_idem) END,
                      NOT k.retry AND k.n >= p_repeats
                 FROM (SELECT coalesce(array_agg(u.s ORDER BY u.o), '{}') AS seen,
                              coalesce(array_agg(u.d ORDER BY u.o), '{}') AS idems,
                              coalesce(bool_or(u.d = p_idem), false) AS retry, count(*) AS n,
                              coalesce(bool_or(u.d = p_idem), false) OR count(*) >= p_repeats AS stop
                         FROM unnest(l.seen, l.idems) WITH ORDINALITY AS u(s, d, o) WHERE u.s >= since) k)
             RETURNING l.hit INTO hit;
             RETURN hit;
           END $$""",
        # GCRA as in migration 1, but the common case (the row exists, the request is allowed) is
        # one UPDATE (not INSERT … ON CONFLICT, SELECT … FOR UPDATE, UPDATE). A refused request
        # reads the row (tat only grows, so the wait read is never smaller than the one that
        # refused it); a new name is inserted.
        """CREATE OR REPLACE FUNCTION spendgate_rate_hit(p_name text, p_limit int, p_period double precision)
           RETURNS double precision LANGUAGE plpgsql AS $$
           DECLARE
             t double precision := extract(epoch FROM clock_timestamp());
             step double precision := p_period / p_limit;
             w double precision;
           BEGIN
             FOR attempt IN 1 .. 10 LOOP
               UPDATE rates r SET tat = greatest(r.tat, t) + step
                 WHERE r.name = p_name AND greatest(r.tat, t) - t <= p_period - step;
               IF FOUND THEN
                 RETURN 0;
               END IF;
               SELECT greatest(r.tat, t) - t - (p_period - step) INTO w FROM rates r WHERE r.name = p_name;
               IF NOT FOUND THEN
                 INSERT INTO rates (name, tat) VALUES (p_name, t + step) ON CONFLICT DO NOTHING;
                 IF FOUND THEN
                   RETURN 0;
                 END IF;
               ELSIF w > 0 THEN
                 RETURN w;
               END IF;
             END LOOP;
             RAISE EXCEPTION 'spendgate_rate_hit: no answer for %', p_name;
           END $$""",
        # The hold: the counters locked in scope order and read in one statement (ORDER BY … FOR
        # UPDATE: the one lock order, so replicas never deadlock), every cap checked, then the hold
        # added and recorded in one more (migration 1 ran eight). A scope without a counter yet:
        # its row is inserted first, in scope order, before any counter is locked, as migration 1
        # did. (One statement doing all of it, with CTEs, cost more: its many plan nodes.)
        """CREATE OR REPLACE FUNCTION spendgate_reserve(p_id text, p_nanos bigint, p_scopes text[], p_caps bigint[],
                                                       p_instance text, p_forwarded boolean, p_meta text)
           RETURNS TABLE (ok boolean, scope text, cap bigint, used bigint, left_nanos bigint)
           LANGUAGE plpgsql AS $$
           DECLARE
             n int := cardinality(p_scopes);
             got text[];
             us bigint[];
             i int;
             u bigint;
           BEGIN
             FOR attempt IN 1 .. 3 LOOP
               SELECT array_agg(l.s), array_agg(l.u) INTO got, us
                 FROM (SELECT c.scope AS s, c.used_nanos + c.reserved_nanos AS u FROM counters c
                        WHERE c.scope = ANY(p_scopes) ORDER BY c.scope FOR UPDATE) l;
               EXIT WHEN coalesce(cardinality(got), 0) >= n;
               INSERT INTO counters AS c (scope) SELECT DISTINCT x.s FROM unnest(p_scopes) AS x(s) ORDER BY 1
                 ON CONFLICT DO NOTHING;
             END LOOP;
             FOR i IN 1 .. n LOOP
               u := us[array_position(got, p_scopes[i])];
               IF u IS NULL THEN
                 RAISE EXCEPTION 'spendgate_reserve: no counter for %', p_scopes[i];
               END IF;
               IF u + p_nanos > p_caps[i] THEN
                 ok := false;
                 scope := p_scopes[i];
                 cap := p_caps[i];
                 used := u;
                 RETURN NEXT;
                 RETURN;
               END IF;
               left_nanos := least(left_nanos, p_caps[i] - u - p_nanos);
             END LOOP;
             WITH hold AS (UPDATE counters c SET reserved_nanos = c.reserved_nanos + p_nanos, updated_at = now()
                             WHERE c.scope = ANY(p_scopes))
             INSERT INTO reservations (id, nanos, scopes, instance, forwarded, meta)
               VALUES (p_id, p_nanos, p_scopes, p_instance, p_forwarded, p_meta);
             ok := true;
             RETURN NEXT;
           END $$""",
        # As migration 3's, without a query per nested call's result (RETURN NEXT of the output
        # columns, not RETURN QUERY).
        """CREATE OR REPLACE FUNCTION spendgate_admit(p_fp bytea, p_idem bytea, p_repeats int, p_window double precision,
                                                     p_hold_if_looped boolean, p_id text, p_nanos bigint,
                                                     p_scopes text[], p_caps bigint[], p_instance text,
                                                     p_forwarded boolean, p_meta text)
           RETURNS TABLE (looped boolean, ok boolean, scope text, cap bigint, used bigint, left_nanos bigint)
           LANGUAGE plpgsql AS $$
           BEGIN
             looped := false;
             IF p_fp IS NOT NULL THEN
               looped := spendgate_loop_hit(p_fp, p_idem, p_repeats, p_window);
               IF looped AND NOT p_hold_if_looped THEN
                 RETURN NEXT;
                 RETURN;
               END IF;
             END IF;
             IF p_nanos > 0 THEN
               SELECT r.ok, r.scope, r.cap, r.used, r.left_nanos INTO ok, scope, cap, used, left_nanos
                 FROM spendgate_reserve(p_id, p_nanos, p_scopes, p_caps, p_instance, p_forwarded, p_meta) r;
               RETURN NEXT;
               RETURN;
             END IF;
             ok := true;
             SELECT min(x.cp - coalesce(c.used_nanos + c.reserved_nanos, 0))::bigint INTO left_nanos
               FROM unnest(p_scopes, p_caps) AS x(sc, cp) LEFT JOIN counters c ON c.scope = x.sc;
             RETURN NEXT;
           END $$""",
        # As migration 4's: the key's row, the rate limit, then the loop breaker and the hold (or
        # the room left); a read (nothing to hold, no loop check) reads the room left itself.
        """CREATE OR REPLACE FUNCTION spendgate_check(
             p_key text, p_sha text, p_rate text, p_limit int, p_period double precision,
             p_fp bytea, p_idem bytea, p_repeats int, p_window double precision, p_hold_if_looped boolean,
             p_id text, p_nanos bigint, p_scopes text[], p_caps bigint[], p_instance text, p_forwarded boolean,
             p_meta text)
           RETURNS TABLE (key_state text, wait double precision, looped boolean, ok boolean, scope text,
                          cap bigint, used bigint, left_nanos bigint)
           LANGUAGE plpgsql AS $$
           BEGIN
             wait := 0;
             looped := false;
             IF p_key IS NOT NULL THEN
               SELECT CASE WHEN k.revoked_at IS NULL THEN 'active' ELSE 'revoked' END INTO key_state
                 FROM keys k WHERE k.id = p_key AND k.token_sha256 = p_sha;
               key_state := coalesce(key_state, 'unknown');
               IF key_state <> 'active' THEN
                 RETURN NEXT;
                 RETURN;
               END IF;
             END IF;
             IF p_rate IS NOT NULL THEN
               wait := spendgate_rate_hit(p_rate, p_limit, p_period);
             END IF;
             IF wait > 0 OR p_scopes IS NULL THEN
               RETURN NEXT;
               RETURN;
             END IF;
             IF p_fp IS NULL AND p_nanos <= 0 THEN
               ok := true;
               SELECT min(x.cp - coalesce(c.used_nanos + c.reserved_nanos, 0))::bigint INTO left_nanos
                 FROM unnest(p_scopes, p_caps) AS x(sc, cp) LEFT JOIN counters c ON c.scope = x.sc;
               RETURN NEXT;
               RETURN;
             END IF;
             SELECT a.looped, a.ok, a.scope, a.cap, a.used, a.left_nanos INTO looped, ok, scope, cap, used, left_nanos
               FROM spendgate_admit(p_fp, p_idem, p_repeats, p_window, p_hold_if_looped, p_id, p_nanos, p_scopes,
                                    p_caps, p_instance, p_forwarded, p_meta) a;
             RETURN NEXT;
           END $$""",
        # Settlements and unheld usage of one batch: the holds deleted and the per-scope deltas
        # summed (as migration 3), then each scope's counter updated in scope order (the lock
        # order); only a scope without a counter yet (usage never held) takes the upsert that
        # migration 3 ran for every scope.
        """CREATE OR REPLACE FUNCTION spendgate_apply(p_ids text[], p_actuals bigint[], p_uscopes text[],
                                                     p_unanos bigint[])
           RETURNS void LANGUAGE plpgsql AS $$
           DECLARE
             sc text[];
             rels bigint[];
             acts bigint[];
             i int;
           BEGIN
             WITH d AS (
               DELETE FROM reservations h WHERE h.id = ANY(p_ids)
               RETURNING h.nanos, p_actuals[array_position(p_ids, h.id)] AS actual, h.scopes),
             deltas AS (
               SELECT s AS scope, d.nanos AS rel, d.actual AS act FROM d, unnest(d.scopes) s
               UNION ALL SELECT u.s, 0, u.n FROM unnest(p_uscopes, p_unanos) AS u(s, n))
             SELECT array_agg(scope ORDER BY scope), array_agg(r ORDER BY scope), array_agg(a ORDER BY scope)
               INTO sc, rels, acts
               FROM (SELECT scope, sum(rel)::bigint AS r, sum(act)::bigint AS a FROM deltas GROUP BY scope) g;
             FOR i IN 1 .. coalesce(cardinality(sc), 0) LOOP
               UPDATE counters c SET reserved_nanos = greatest(0, c.reserved_nanos - rels[i]),
                                     used_nanos = c.used_nanos + acts[i], updated_at = now()
                 WHERE c.scope = sc[i];
               IF NOT FOUND THEN
                 INSERT INTO counters AS c (scope, used_nanos, reserved_nanos) VALUES (sc[i], acts[i], 0)
                   ON CONFLICT (scope) DO UPDATE SET
                     reserved_nanos = greatest(0, c.reserved_nanos - rels[i]),
                     used_nanos = c.used_nanos + acts[i], updated_at = now();
               END IF;
             END LOOP;
           END $$""",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)
# precheck: spendgate_check with nothing to hold and no loop check (7 parameters to send, not 17)
_PRECHECK = ("SELECT * FROM spendgate_check(%s, %s, %s, %s, %s, NULL, NULL, 0, 0, false, NULL, 0, %s::text[], "
             "%s::bigint[], NULL, true, NULL)")
# admit: the whole of spendgate_check but the rate limit
_CHECK = ("SELECT * FROM spendgate_check(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::text[], "
          "%s::bigint[], %s, %s, %s)")
_NO_HOLD = dict.fromkeys(HOLD_FIELDS)
_KEY_COLS = "id, policy, token_sha256, labels, created_at, expires_at, revoked_at, cap_usd, source"


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _key(row: tuple | None) -> KeyRecord | None:
    if row is None:
        return None
    (kid, policy, sha, labels, created, expires, revoked, cap, source) = row
    return KeyRecord(
        id=kid, policy=policy, token_sha256=sha, labels=json.loads(labels or "{}"),
        created_at=_dt(created), expires_at=_dt(expires), revoked_at=_dt(revoked),
        cap_usd=Decimal(cap) if cap is not None else None, source=source or "issued",
    )


# Durability of a commit. "off" (the default here) is PostgreSQL's equivalent of the SQLite
# ledger's synchronous=NORMAL: a commit survives any gateway crash and a PostgreSQL restart, and
# only an OS crash or power cut of the database host can lose the last ~0.6 s (3 × wal_writer_delay);
# a commit then costs a round trip, not a disk flush. SPENDGATE_PG_SYNCHRONOUS_COMMIT=on makes
# every hold, limit and row wait for the flush (or for a synchronous standby).
SYNCHRONOUS_COMMIT = os.environ.get("SPENDGATE_PG_SYNCHRONOUS_COMMIT", "off")


# Every session's settings, sent once per new connection (pooled, event-loop and writer alike).
_SESSION_SETTINGS = ("SELECT set_config('statement_timeout', %s, false), set_config('synchronous_commit', %s, false)",
                     (str(STATEMENT_TIMEOUT_MS), SYNCHRONOUS_COMMIT))


def _configure(conn: psycopg.Connection) -> None:
    conn.execute(*_SESSION_SETTINGS)


def migrate(conn: psycopg.Connection) -> None:
    """Bring the schema (the connection's ``search_path``) to :data:`SCHEMA_VERSION` under an
    advisory lock; refuse a newer one."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('spendgate_migrate:' || current_schema(), 0))")
        exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
        current = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0 if exists else 0
        if current > SCHEMA_VERSION:
            raise SchemaError(f"the ledger's schema is version {current}, newer than this spendgate "
                              f"knows ({SCHEMA_VERSION}): upgrade spendgate")
        if current == SCHEMA_VERSION:
            return
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY, "
                     "applied_at timestamptz NOT NULL DEFAULT now())")
        for v in range(current + 1, SCHEMA_VERSION + 1):
            for sql in MIGRATIONS[v]:
                conn.execute(sql)  # type: ignore[arg-type]
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (v,))


class PostgresStore:
    dialect = "postgres"
    keys_cached = True  # key_by_token answers from a cache NOTIFY invalidates: see Store.keys_cached

    def __init__(self, url: str, replica: str | None = None, lease: float = DEFAULT_LEASE,
                 pool_size: int = 20) -> None:
        self.url = url
        self.replica = replica or default_replica()
        self.lease = lease
        self.instance = f"{self.replica}/{os.getpid()}/{secrets.token_hex(3)}"
        self._registered = False
        self.available = True
        self.outages = 0
        self._outage_since = 0.0
        self._up_since = time.monotonic()  # connected without a break since: see recover_holds
        self._probed = 0.0
        self._state_lock = threading.Lock()
        self._longest_window = 0.0
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                migrate(conn)
        except psycopg.OperationalError as e:
            raise StoreUnavailable(f"cannot reach the ledger {redact_url(url)}: {redact_url(url, _first_line(e))}") from None
        except psycopg.Error as e:
            raise SchemaError(f"cannot open the ledger {redact_url(url)}: {redact_url(url, _first_line(e))}") from None
        self.pool = ConnectionPool(
            url, min_size=2, max_size=pool_size, open=False, configure=_configure,  # ≥ the worker threads
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
            timeout=POOL_WAIT, reconnect_timeout=10**9, name="spendgate",
        )
        self.pool.open(wait=False)
        # keys: token hash → record; trusted only while the listener is connected
        self._keys: dict[str, KeyRecord] = {}
        self._keys_gen = 0
        self._cache_live = threading.Event()
        self._stop = threading.Event()
        self._listener = threading.Thread(target=self._listen, name="spendgate-keys", daemon=True)
        self._listener.start()
        # precheck_async: connections on the event loop that asks (idle ones in a free list)
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._aidle: list[psycopg.AsyncConnection] = []
        self._aslots: asyncio.Semaphore | None = None
        self._asize = min(pool_size, ASYNC_SLOTS)
        self._abusy = 0  # statements under way on the loop's connections (connecting included)
        self._await_idle: collections.deque[asyncio.Future[psycopg.AsyncConnection]] = collections.deque()
        # write-behind queue
        self._queue: queue.SimpleQueue[tuple[LedgerItem, Callable[[], None] | None]] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._flushed = threading.Condition()
        self._pending = 0
        # the event loop's writer (_awrite_loop): queued items, the batch in flight, its connection
        self._abuf: list[tuple[LedgerItem, Callable[[], None] | None]] = []
        self._ainflight: list[tuple[LedgerItem, Callable[[], None] | None]] = []
        self._atask: asyncio.Task[None] | None = None
        self._agen = 0  # the running writer task's number: one at a time
        self._awconn: psycopg.AsyncConnection | None = None
        self._aloop_thread = 0
        self._closing = False

    # ------------------------------------------------------------------ plumbing

    def _down(self, error: BaseException) -> StoreUnavailable:
        with self._state_lock:
            if self.available:
                self.available = False
                self.outages += 1
                self._outage_since = time.monotonic()
                log.error("spendgate: ledger %s unreachable (%s); refusing calls with 503 store_unavailable "
                          "until it is back", redact_url(self.url), redact_url(self.url, _first_line(error)))
        return StoreUnavailable(f"the ledger {redact_url(self.url)} cannot be reached")

    def _up(self) -> None:
        if not self.available:
            with self._state_lock:
                if not self.available:
                    self.available = True
                    self._up_since = time.monotonic()
                    log.warning("spendgate: ledger %s reachable again after %.1fs",
                                redact_url(self.url), time.monotonic() - self._outage_since)

    def _run(self, fn: Callable[[psycopg.Connection], Any]) -> Any:
        """Run ``fn`` on a pooled connection; a dead connection (a restarted server) is replaced
        and the call retried; an unreachable database raises :class:`StoreUnavailable`."""
        if not self.available:
            now_ = time.monotonic()
            if now_ - self._probed < PROBE_EVERY:  # known down: fail at once, never wait on the pool
                raise StoreUnavailable(f"the ledger {redact_url(self.url)} cannot be reached")
            self._probed = now_
        last: BaseException | None = None
        for attempt in range(3):
            conn = None
            try:
                with self.pool.connection(timeout=POOL_WAIT if self.available else 0.2) as conn:
                    out = fn(conn)
                self._up()
                return out
            except psycopg.errors.QueryCanceled as e:  # statement_timeout (a lock held elsewhere)
                raise StoreUnavailable(f"the ledger did not answer within {STATEMENT_TIMEOUT_MS} ms") from e
            except psycopg.OperationalError as e:
                if not is_outage(e, conn):
                    raise
                last = e
                if conn is None or not conn.broken:
                    break  # the pool could not connect, or a timeout: not a stale connection
                if attempt == 0:  # a restarted server: drop every stale idle connection, then retry
                    with contextlib.suppress(Exception):
                        self.pool.check()
        raise self._down(last or RuntimeError("no connection")) from None

    def check_writable(self) -> None:
        try:
            self._run(lambda c: c.execute("SELECT 1 FROM schema_version FOR UPDATE").fetchall())
        except StoreUnavailable as e:
            raise SchemaError(str(e)) from None
        except psycopg.Error as e:
            raise SchemaError(f"cannot write to the ledger {redact_url(self.url)}: {_first_line(e)}") from None

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        sql = sql.replace("%", "%%").replace("?", "%s")
        return self._run(lambda c: c.execute(sql, params).fetchall())  # type: ignore[arg-type]

    # ------------------------------------------------------------------ keys

    def _listen(self) -> None:
        """Drop cached keys as soon as any replica (or the CLI) changes them."""
        backoff = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._drop_keys(None)  # changes missed while not listening
                    self._cache_live.set()
                    backoff = 0.1
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._drop_keys(note.payload or None)
            except psycopg.Error:
                pass
            self._cache_live.clear()
            self._drop_keys(None)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _drop_keys(self, sha: str | None) -> None:
        with self._state_lock:
            self._keys_gen += 1
            if sha is None:
                self._keys.clear()
            else:
                self._keys.pop(sha, None)

    def issue_key(
        self, policy: str, ttl_seconds: int | None, cap_usd: Decimal | None = None,
        labels: dict[str, str] | None = None,
    ) -> tuple[KeyRecord, str]:
        token = new_token()
        created = now()
        created = created.replace(microsecond=created.microsecond // 1000 * 1000)
        rec = KeyRecord(
            id="key_" + secrets.token_hex(6), policy=policy, token_sha256=hash_token(token),
            labels=dict(labels or {}), created_at=created,
            expires_at=created + timedelta(seconds=ttl_seconds) if ttl_seconds else None,
            cap_usd=cap_usd,
        )
        self._run(lambda c: self._insert_key(c, rec))
        return rec, token

    @staticmethod
    def _insert_key(conn: psycopg.Connection, rec: KeyRecord, or_ignore: bool = False) -> None:
        conn.execute(
            f"INSERT INTO keys ({_KEY_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)"
            + (" ON CONFLICT (id) DO NOTHING" if or_ignore else ""),
            (rec.id, rec.policy, rec.token_sha256, json.dumps(rec.labels, sort_keys=True),
             iso(rec.created_at), iso(rec.expires_at), iso(rec.revoked_at),
             str(rec.cap_usd) if rec.cap_usd is not None else None, rec.source),
        )

    def key_by_token(self, token: str, wait: bool = True) -> KeyRecord | None:
        digest = hash_token(token)
        rec = self._keys.get(digest) if self._cache_live.is_set() else None
        if rec is None:
            if not wait:  # a cache miss is a round trip (and a lock on keys may hold it): not here
                raise WouldBlock(digest[:8])
            gen = self._keys_gen
            rec = _key(self._run(lambda c: c.execute(
                f"SELECT {_KEY_COLS} FROM keys WHERE token_sha256 = %s", (digest,)).fetchone()))
            if rec is not None and self._cache_live.is_set():
                with self._state_lock:
                    if gen == self._keys_gen:  # no change was announced while we read it
                        self._keys[digest] = rec
        if rec is None or not compare_digest(rec.token_sha256, digest):
            return None
        return rec

    def get_key(self, key_id: str) -> KeyRecord | None:
        return _key(self._run(lambda c: c.execute(
            f"SELECT {_KEY_COLS} FROM keys WHERE id = %s", (key_id,)).fetchone()))

    def list_keys(self) -> list[KeyRecord]:
        rows = self._run(lambda c: c.execute(f"SELECT {_KEY_COLS} FROM keys ORDER BY created_at, id").fetchall())
        return [k for k in map(_key, rows) if k]

    def revoke(self, key_id: str) -> bool:
        def go(c: psycopg.Connection) -> bool:
            c.execute("UPDATE keys SET revoked_at = %s WHERE id = %s AND revoked_at IS NULL", (iso(now()), key_id))
            return c.execute("SELECT 1 FROM keys WHERE id = %s", (key_id,)).fetchone() is not None

        try:
            return self._run(go)
        finally:
            self._drop_keys(None)  # this process sees its own change at once, before the NOTIFY

    def revoke_by_labels(self, labels: dict[str, str]) -> list[str]:
        revoked = []
        for key in self.list_keys():
            if key.revoked_at is None and all(key.labels.get(k) == v for k, v in labels.items()):
                self.revoke(key.id)
                revoked.append(key.id)
        return revoked

    def sync_static_keys(self, keys: list[KeyRecord]) -> None:
        def go(c: psycopg.Connection) -> None:
            with c.transaction():
                for rec in keys:
                    cap = str(rec.cap_usd) if rec.cap_usd is not None else None
                    self._insert_key(c, rec, or_ignore=True)
                    c.execute(
                        "UPDATE keys SET policy = %s, labels = %s, cap_usd = %s WHERE id = %s AND source = 'static' "
                        "AND (policy, labels, cap_usd) IS DISTINCT FROM (%s, %s, %s)",
                        (rec.policy, rec.labels_json, cap, rec.id, rec.policy, rec.labels_json, cap),
                    )

        try:
            self._run(go)
        finally:
            self._drop_keys(None)

    # ------------------------------------------------------------------ budget

    def reserve(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                forwarded: bool = True) -> Reservation:
        if not self._registered:
            self.heartbeat()
        rid = "res_" + secrets.token_hex(8)
        meta = json.dumps({k: (hold or {}).get(k) for k in HOLD_FIELDS})
        ok, scope, cap, used, left = self._run(lambda c: c.execute(
            "SELECT * FROM spendgate_reserve(%s, %s, %s::text[], %s::bigint[], %s, %s, %s)",
            (rid, nanos, list(caps), list(caps.values()), self.instance, forwarded, meta),
        ).fetchone())
        if not ok:
            raise CapExceeded(scope, cap, used)
        return Reservation(rid, nanos, tuple(caps), left_nanos=left)

    def admit(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
              forwarded: bool = True, loop: LoopCheck | None = None,
              hold_if_looped: bool = False, key: KeyRecord | None = None) -> Admission:
        """The key's row, the loop breaker and the hold (or the room left) in one round trip
        (``spendgate_check``)."""
        if not self._registered and nanos > 0:
            self.heartbeat()
        rid, params = self._admit_params(nanos, caps, hold, forwarded, loop, hold_if_looped, key)
        row = tuple(self._run(lambda c: c.execute(_CHECK, params).fetchone()))
        return self._admission(row, rid, nanos, caps, key)

    async def admit_async(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                          forwarded: bool = True, loop: LoopCheck | None = None,
                          hold_if_looped: bool = False, key: KeyRecord | None = None,
                          timeout: float = 2.0) -> Admission:
        """:meth:`admit` awaited on the calling event loop (one round trip on one of its
        connections: no worker thread). Past ``timeout`` seconds :class:`StoreUnavailable` (the
        call is refused 503); the statement itself runs on to its end (its connection is left in
        a known state) and a hold it made for the call already refused is given back then."""
        aloop = asyncio.get_running_loop()
        if not self._bind_loop(aloop):  # another loop has the connections: a thread (late release as offload's)
            fut = aloop.run_in_executor(None, self.admit, nanos, caps, hold, forwarded, loop, hold_if_looped, key)
            try:
                return await asyncio.wait_for(asyncio.shield(fut), timeout)
            except TimeoutError:
                fut.add_done_callback(self._release_late_admission)
                raise StoreUnavailable(f"the ledger did not answer within {timeout:g}s") from None
        started = aloop.time()
        if not self._registered and nanos > 0:  # once per process: this instance's row, for its lease
            try:
                await asyncio.wait_for(asyncio.to_thread(self.heartbeat), timeout)
            except TimeoutError:
                raise StoreUnavailable(f"the ledger did not answer within {timeout:g}s") from None
        rid, params = self._admit_params(nanos, caps, hold, forwarded, loop, hold_if_looped, key)
        task = aloop.create_task(self._arun(_CHECK, params))
        try:
            row = await asyncio.wait_for(asyncio.shield(task), max(0.0, timeout - (aloop.time() - started)))
        except (TimeoutError, asyncio.CancelledError) as e:
            # refused (or cancelled) before the answer came: whatever it holds goes back once it ends
            task.add_done_callback(lambda t: self._release_late_row(t, rid, nanos, caps))
            if isinstance(e, TimeoutError):
                raise StoreUnavailable(f"the ledger did not answer within {timeout:g}s") from None
            raise
        return self._admission(row, rid, nanos, caps, key)

    def _release_late_admission(self, fut: asyncio.Future[Admission]) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result().reservation is not None:
            self._submit_thread(Settle(fut.result().reservation, 0))  # type: ignore[arg-type]

    def _release_late_row(self, task: asyncio.Task[tuple[Any, ...]], rid: str, nanos: int,
                          caps: dict[str, int]) -> None:
        """The hold of a call refused for its slow answer: given back (settled at 0) once known.
        A statement cancelled mid-way (the loop shut down) may still have committed its hold:
        given back too (no hold under that id: nothing happens)."""
        if nanos <= 0:
            return
        if not task.cancelled():
            if task.exception() is not None:
                return  # the statement failed: nothing was held
            row = task.result()
            if row[0] not in (None, "active") or not row[3]:
                return  # refused, looped or over a cap: nothing was held
        self._submit_thread(Settle(Reservation(rid, nanos, tuple(caps)), 0))

    def _admit_params(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None, forwarded: bool,
                      loop: LoopCheck | None, hold_if_looped: bool, key: KeyRecord | None,
                      ) -> tuple[str, tuple[Any, ...]]:
        if loop is not None:
            if loop.window > self._longest_window:
                self._longest_window = loop.window
            idem = hashlib.blake2b(loop.idem.encode(), digest_size=16).digest() if loop.idem is not None else None
            fp, repeats, window = loop.fingerprint, loop.repeats, loop.window
        else:
            fp = idem = None
            repeats, window = 0, 0.0
        rid = "res_" + secrets.token_hex(8)
        meta = json.dumps({k: hold.get(k) for k in HOLD_FIELDS} if hold else _NO_HOLD) if nanos > 0 else None
        return rid, (key.id if key else None, key.token_sha256 if key else None, None, 0, 0.0,
                     fp, idem, repeats, window, hold_if_looped, rid, nanos, text_array(caps), int_array(caps.values()),
                     self.instance, forwarded, meta)

    def _admission(self, row: tuple[Any, ...], rid: str, nanos: int, caps: dict[str, int],
                   key: KeyRecord | None) -> Admission:
        state, _wait, looped, ok, scope, cap, used, left = row
        if key is not None and state != "active":
            self._drop_keys(key.token_sha256)  # (its NOTIFY may still be on its way)
        if state not in (None, "active"):
            return Admission(key_state=state)
        if ok is None:  # looped, nothing held
            return Admission(looped=True, key_state=state)
        if not ok:
            return Admission(looped, refused=CapExceeded(scope, cap, used), left_nanos=max(0, cap - used),
                             key_state=state)
        if nanos > 0:
            return Admission(looped, Reservation(rid, nanos, tuple(caps), left_nanos=left), left_nanos=left,
                             key_state=state)
        return Admission(looped, left_nanos=left, key_state=state)

    def precheck(self, key: KeyRecord, rate: RateCheck | None, caps: dict[str, int]) -> Precheck:
        """The key's row, the rate limit and the room left, in one round trip (``spendgate_check``)."""
        row = self._run(lambda c: c.execute(_PRECHECK, (
            key.id, key.token_sha256, rate.name if rate else None, rate.limit if rate else 0,
            rate.period if rate else 0.0, text_array(caps), int_array(caps.values()))).fetchone())
        state, wait, left = row[0], row[1], row[7]
        if state != "active":
            self._drop_keys(key.token_sha256)
            return Precheck(state)
        if wait > 0:
            return Precheck(state, wait)
        return Precheck(state, 0.0, dict(caps), left)

    async def precheck_async(self, key: KeyRecord, rate: RateCheck | None, caps: dict[str, int],
                             timeout: float) -> Precheck:
        """:meth:`precheck` awaited on the calling event loop (the round trip is a socket the loop
        watches: no worker thread, no wait that blocks the loop); past ``timeout`` seconds
        :class:`StoreUnavailable`. (Its rate limit may then still have been counted, as a worker
        thread's would.)"""
        if not self._bind_loop(asyncio.get_running_loop()):  # another loop has them: a thread
            return await asyncio.wait_for(asyncio.to_thread(self.precheck, key, rate, caps), timeout)
        try:
            row = await asyncio.wait_for(self._arun(_PRECHECK, (
                key.id, key.token_sha256, rate.name if rate else None, rate.limit if rate else 0,
                rate.period if rate else 0.0, text_array(caps), int_array(caps.values()))), timeout)
        except TimeoutError:
            raise StoreUnavailable(f"the ledger did not answer within {timeout:g}s") from None
        state, wait, left = row[0], row[1], row[7]
        if state != "active":
            self._drop_keys(key.token_sha256)
            return Precheck(state)
        if wait > 0:
            return Precheck(state, wait)
        return Precheck(state, 0.0, dict(caps), left)

    def _bind_loop(self, loop: asyncio.AbstractEventLoop) -> bool:
        """May this event loop use the store's loop connections (precheck_async, admit_async, the
        loop's ledger writer)? One loop has them at a time; a loop that has closed loses them."""
        if self._aloop is loop:
            return True
        if self._aloop is not None and not self._aloop.is_closed():
            return False
        for conn in self._aidle:  # a loop that has closed: its connections go with it
            conn.pgconn.finish()
        self._steal_async()  # (its writer's rows, if any, go to the thread)
        self._aloop, self._aidle, self._aslots = loop, [], asyncio.Semaphore(self._asize)
        self._aloop_thread = threading.get_ident()
        return True

    async def _aconnect(self) -> psycopg.AsyncConnection:
        conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        await conn.execute(*_SESSION_SETTINGS)
        return conn

    async def _arun(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...]:
        """One statement on an event-loop connection, with :meth:`_run`'s outage rules."""
        if not self.available:
            now_ = time.monotonic()
            if now_ - self._probed < PROBE_EVERY:
                raise StoreUnavailable(f"the ledger {redact_url(self.url)} cannot be reached")
            self._probed = now_
        assert self._aslots is not None
        last: BaseException | None = None
        async with self._aslots:
            for attempt in range(2):
                conn = self._aidle.pop() if self._aidle else None
                self._abusy += 1
                try:
                    try:
                        if conn is None:
                            conn = await self._aconnect_or_wait()
                        cur = _cursor(conn)
                        await cur.execute(sql, params)  # type: ignore[arg-type]
                        row = await cur.fetchone()
                    finally:
                        self._abusy -= 1
                except psycopg.errors.QueryCanceled as e:
                    self._aput(conn)
                    raise StoreUnavailable(f"the ledger did not answer within {STATEMENT_TIMEOUT_MS} ms") from e
                except psycopg.OperationalError as e:
                    if not is_outage(e, conn):
                        self._aput(conn)
                        raise
                    last = e
                    stale = conn is not None and conn.broken
                    self._aput(conn)
                    if stale and attempt == 0:  # a restarted server: drop the idle ones, once more
                        for c in self._aidle:
                            c.pgconn.finish()
                        self._aidle.clear()
                        continue
                    break
                except BaseException:  # cancelled (a timeout): the connection's state is unknown
                    if conn is not None:
                        conn.pgconn.finish()
                    raise
                self._aput(conn)
                self._up()
                assert row is not None
                return tuple(row)
        raise self._down(last or RuntimeError("no connection"))

    async def _aconnect_or_wait(self) -> psycopg.AsyncConnection:
        """A new loop connection; when the server has no room for one more (``max_connections``,
        shared by every replica and tool) while this loop has others at work, the next of those
        to be free instead (the caller's timeout bounds the wait): a full server is not an outage."""
        try:
            return await self._aconnect()
        except psycopg.OperationalError as e:
            if not (self._abusy > 1 and _too_many_clients(e)):  # (others: beside this one)
                raise
        waiter: asyncio.Future[psycopg.AsyncConnection] = asyncio.get_running_loop().create_future()
        self._await_idle.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._aput(waiter.result())  # handed over just as it was cancelled: pass it on
            raise

    def _aput(self, conn: psycopg.AsyncConnection | None) -> None:
        if conn is None:
            return
        if conn.broken or conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.pgconn.finish()
            return
        while self._await_idle:  # someone is waiting for a connection the server had no room for
            waiter = self._await_idle.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._aidle.append(conn)

    def admit_now(self, nanos: int, caps: dict[str, int], hold: dict[str, Any] | None = None,
                  forwarded: bool = True, loop: LoopCheck | None = None,
                  hold_if_looped: bool = False, key: KeyRecord | None = None) -> Admission | None:
        return None  # every answer is a round trip: never on the event loop

    def mark_forwarded(self, reservation: Reservation) -> None:
        self._run(lambda c: c.execute("UPDATE reservations SET forwarded = true WHERE id = %s", (reservation.id,)))

    def settle(self, reservation: Reservation, actual_nanos: int) -> None:
        self._submit(Settle(reservation, actual_nanos))

    def add_usage(self, nanos: int, scopes: Iterable[str]) -> None:
        self._submit(Usage(tuple(scopes), nanos))

    def reconcile_call(self, fix: Reconciliation) -> bool:
        """One transaction: the row (locked; changed only if it still says what was counted), every
        scope's counter in scope order (the order holds lock them in), the ``reconciliations`` record."""
        ts = iso(now())

        def go(c: psycopg.Connection) -> bool:
            with c.transaction():
                cur = c.execute(
                    "UPDATE calls SET cost_status = %s, cost_usd = %s, cost_nanos = %s, "
                    "currency = coalesce(%s, currency), amount = %s, note = %s, flagged = 0, reconciled_at = %s "
                    "WHERE id = %s AND cost_status = %s AND decision <> 'deny' "
                    "AND coalesce(cost_nanos, estimated_nanos, 0) = %s",
                    (fix.to_status, fix.new_usd, fix.new_nanos, fix.currency, fix.amount, reconciled_note(fix),
                     ts, fix.call_id, fix.from_status, fix.old_nanos))
                if cur.rowcount != 1:
                    return False
                for scope in sorted(set(fix.scopes)):
                    c.execute("INSERT INTO counters AS k (scope, used_nanos) VALUES (%s, greatest(0, %s)) "
                              "ON CONFLICT (scope) DO UPDATE SET used_nanos = greatest(0, k.used_nanos + %s), "
                              "updated_at = now()", (scope, fix.delta_nanos, fix.delta_nanos))
                c.execute(f"INSERT INTO reconciliations ({', '.join(RECONCILIATION_COLUMNS)}) "  # type: ignore[arg-type]
                          f"VALUES ({', '.join(['%s'] * len(RECONCILIATION_COLUMNS))})", reconciliation_row(fix, ts))
                return True

        return bool(self._run(go))

    def used(self, scope: str) -> int:
        return self.used_by_scope([scope])[scope]

    def used_by_scope(self, scopes: Iterable[str]) -> dict[str, int]:
        out = dict.fromkeys(scopes, 0)
        rows = self._run(lambda c: c.execute(
            "SELECT scope, used_nanos + reserved_nanos FROM counters WHERE scope = ANY(%s)", (list(out),)
        ).fetchall())
        out.update(rows)
        return out

    def heartbeat(self) -> None:
        self._run(lambda c: c.execute(
            "INSERT INTO instances (id, replica, host, pid) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
            (self.instance, self.replica, _HOST, os.getpid()),
        ))
        self._registered = True

    def recover_holds(self) -> tuple[int, int]:
        def go(c: psycopg.Connection) -> tuple[int, int]:
            here = c.execute("SELECT id, pid FROM instances WHERE host = %s AND id <> %s",
                             (_HOST, self.instance)).fetchall()
            gone = [iid for iid, pid in here if not pid_alive(pid)]
            lease = timedelta(seconds=self.lease)
            # Silence means death only to a replica that was itself connected for a whole lease: after
            # an outage of the database (or of this replica's link) every heartbeat is stale, live
            # replicas' too, and recovering their holds then counted calls they go on to settle
            # twice (a flagged row at the estimate and the real one). Until then: a pid gone on this
            # host, and a clean stop, only.
            trusted = time.monotonic() - self._up_since >= self.lease
            counted = released = 0
            with c.transaction():
                dead = dict(c.execute(
                    "SELECT id, replica FROM instances WHERE id <> %s AND ((%s AND heartbeat_at < now() - %s) "
                    "OR heartbeat_at = '-infinity' OR id = ANY(%s)) FOR UPDATE SKIP LOCKED",
                    (self.instance, trusted, lease, gone)).fetchall())
                holds = c.execute(
                    "DELETE FROM reservations r WHERE r.instance = ANY(%s) "
                    "OR (r.instance IS NOT NULL AND r.instance <> %s "
                    "    AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = r.instance)) "
                    "OR (r.instance IS NULL AND r.created_at < now() - %s) "
                    "RETURNING r.id, r.nanos, r.scopes, r.created_at, r.instance, r.forwarded, r.meta",
                    (list(dead), self.instance, lease)).fetchall()
                deltas: dict[str, list[int]] = {}
                rows = []
                abandoned: list[str] = []  # flows of released holds (approval waits)
                for _rid, nanos, scopes, created, inst, forwarded, meta in holds:
                    for s in scopes:
                        d = deltas.setdefault(s, [0, 0])
                        d[0] += nanos
                        d[1] += nanos if forwarded else 0
                    if forwarded:
                        counted += 1
                        rows.append(recovered_row(json.loads(meta or "{}"), nanos, iso(created) or "",
                                                  dead.get(inst) or (inst or "unknown").split("/")[0],
                                                  scopes))
                    else:
                        released += 1
                        if flow := json.loads(meta or "{}").get("flow_id"):
                            abandoned.append(flow)
                for scope in sorted(deltas):
                    rel, act = deltas[scope]
                    c.execute("UPDATE counters SET reserved_nanos = greatest(0, reserved_nanos - %s), "
                              "used_nanos = used_nanos + %s, updated_at = now() WHERE scope = %s", (rel, act, scope))
                if abandoned:  # their calls are gone with the dead replica: nobody can resume them
                    c.execute("UPDATE approvals SET status = 'timeout', decided_by = 'recovery', decided_at = %s "
                              "WHERE status = 'pending' AND flow_id = ANY(%s)", (iso(now()), abandoned))
                if rows:
                    self._copy_calls(c, rows)
                if dead:
                    c.execute("DELETE FROM instances WHERE id = ANY(%s)", (list(dead),))
            if self._longest_window:  # its own transaction: spendgate_admit locks loops rows, then counters
                c.execute("DELETE FROM loops WHERE ts < now() - %s", (timedelta(seconds=self._longest_window),))
            return counted, released

        return self._run(go)

    def rate_hit(self, name: str, limit: int, period: float) -> float:
        return float(self._run(lambda c: c.execute(
            "SELECT spendgate_rate_hit(%s, %s, %s)", (name, limit, period)).fetchone()[0]))

    def loop_hit(self, fingerprint: bytes, idem: str | None, repeats: int, window: float) -> bool:
        self._longest_window = max(self._longest_window, window)
        idem_digest = hashlib.blake2b(idem.encode(), digest_size=16).digest() if idem is not None else None
        return bool(self._run(lambda c: c.execute(
            "SELECT spendgate_loop_hit(%s, %s, %s, %s)", (fingerprint, idem_digest, repeats, window)).fetchone()[0]))

    # ------------------------------------------------------------------ approvals

    def add_approval(self, row: dict[str, Any]) -> None:
        row = {**row, "status": "pending", "created_at": iso(now())}
        self._run(lambda c: c.execute(
            f"INSERT INTO approvals ({', '.join(row)}) VALUES ({', '.join(['%s'] * len(row))})",  # type: ignore[arg-type]
            tuple(row.values())))

    def approval_status(self, approval_id: str) -> str | None:
        row = self._run(lambda c: c.execute("SELECT status FROM approvals WHERE id = %s", (approval_id,)).fetchone())
        return row[0] if row else None

    def decide_approval(self, approval_id: str, status: str, by: str) -> bool:
        return bool(self._run(lambda c: c.execute(
            "UPDATE approvals SET status = %s, decided_by = %s, decided_at = %s WHERE id = %s AND status = 'pending'",
            (status, by, iso(now()), approval_id)).rowcount))

    def list_approvals(self, status: str | None = "pending") -> list[dict[str, Any]]:
        def go(c: psycopg.Connection) -> list[dict[str, Any]]:
            cur = c.execute("SELECT * FROM approvals" + (" WHERE status = %s" if status else "")  # type: ignore[arg-type]
                            + " ORDER BY created_at, id", (status,) if status else ())
            cols = [d.name for d in cur.description or ()]
            return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

        return self._run(go)

    # ------------------------------------------------------------------ calls (write-behind)

    def record_call(self, row: dict[str, Any], on_commit: Callable[[], None] | None = None) -> None:
        self._submit(CallRow(row), on_commit)

    def record_call_now(self, row: dict[str, Any]) -> bool:
        return False  # a commit is a round trip: never on the event loop

    def _submit(self, item: LedgerItem, on_commit: Callable[[], None] | None = None) -> None:
        """Queue a ledger write: on the event loop's own writer when called on a running loop
        that may use the store (see :meth:`_awrite_loop`), else on the writer thread (the CLI,
        tests without a loop, worker threads)."""
        loop = asyncio._get_running_loop()
        if loop is not None and not self._closing and self._bind_loop(loop):
            with self._flushed:
                self._pending += 1
            self._abuf.append((item, on_commit))
            if self._atask is None:  # (its first batch: all this turn of the loop queues; see _awrite_loop)
                self._agen += 1
                self._atask = loop.create_task(self._awrite_loop(self._agen))
            return
        self._submit_thread(item, on_commit)

    def _submit_thread(self, item: LedgerItem, on_commit: Callable[[], None] | None = None) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="spendgate-ledger", daemon=True)
            self._writer.start()
        with self._flushed:
            self._pending += 1
        self._queue.put((item, on_commit))

    async def _awrite_loop(self, gen: int) -> None:
        """The event loop's ledger writer: group commit without a thread. The rows, settlements and
        usage queued while a batch is in flight form the next batch: one ``spendgate_write``
        statement (one round trip, one transaction) per batch, on its own connection.

        This keeps the promise that rows are written *off the event loop*: the loop only sends the
        statement and is woken when its answer arrives (the socket is one more the loop watches,
        like a client's); it never waits on the database, so other flows run meanwhile, and a
        batch's ``on_commit`` callbacks (which release the answers) run only after its statement
        has returned, i.e. after its transaction is committed. During an outage the batch is kept
        (in front of what came since) and retried with a backoff; nothing accepted is dropped.
        """
        backoff = 0.0
        try:
            # The loop's next turn first (mitmproxy's tasks start eagerly, inside create_task): a
            # settlement and its row are queued by two hooks of one turn, and go in one batch.
            await asyncio.sleep(0)
            while self._abuf and not self._closing and self._agen == gen:
                if backoff:
                    await asyncio.sleep(backoff)
                    if not self._abuf or self._closing or self._agen != gen:
                        break
                batch = self._abuf[:1000]
                del self._abuf[:1000]
                self._ainflight = batch
                try:
                    done = await self._awrite_or_split(batch, batch)
                except _Stolen:
                    return  # flush() or close() took the batch over (see _steal_async)
                except (psycopg.OperationalError, StoreUnavailable) as e:
                    self._ainflight = []
                    self._abuf[:0] = batch  # kept, first in line
                    if isinstance(e, psycopg.OperationalError) and not _too_many_clients(e):
                        self._down(e)  # (a server with no room for the writer's session is not down)
                    backoff = min(max(backoff * 2, 0.05), 2.0)
                    continue
                except BaseException:
                    if self._ainflight is batch:  # cancelled mid-statement: settled (or re-queued) there
                        self._steal_async()
                    raise
                self._ainflight = []
                backoff = 0.0
                self._up()
                self._committed(done, len(batch))
        finally:
            if self._agen == gen:  # (else flush() or close() took over: a later task may be running)
                self._atask = None

    async def _awrite_or_split(self, batch: list[tuple[LedgerItem, Callable[[], None] | None]],
                               whole: list[Any]) -> list[tuple[Any, Any]]:
        """:meth:`_write_or_split` on the loop's writer connection: a row that can never be
        written (a bug) is logged and dropped alone; an outage raises (the batch is kept)."""
        conn = self._awconn
        try:
            if conn is None or conn.closed or conn.broken:
                self._awconn = conn = None
                if not self.available:  # known down: at most one connection attempt per PROBE_EVERY
                    now_ = time.monotonic()
                    if now_ - self._probed < PROBE_EVERY:
                        raise StoreUnavailable("down")
                    self._probed = now_
                self._awconn = conn = await self._aconnect()
                if self._ainflight is not whole:
                    raise _Stolen
            await _cursor(conn).execute(_WRITE, _batch_params(batch))
        except BaseException as e:
            if self._ainflight is not whole:  # taken over while in flight: this task only closes up
                if conn is not None:
                    conn.pgconn.finish()
                raise _Stolen from None
            if isinstance(e, psycopg.OperationalError) and is_outage(e, conn):
                if conn is not None and (conn.broken or conn.info.transaction_status
                                         != psycopg.pq.TransactionStatus.IDLE):
                    conn.pgconn.finish()
                raise
            if not isinstance(e, psycopg.Error):
                raise
            if len(batch) == 1:
                log.error("ledger: dropped a %s that cannot be written: %s", type(batch[0][0]).__name__,
                          _first_line(e))
                return batch  # logged and gone: its answer need not wait any longer
            out: list[tuple[Any, Any]] = []
            for one in batch:
                out += await self._awrite_or_split([one], whole)
            return out
        if self._ainflight is not whole:
            raise _Stolen
        return batch

    def _committed(self, done: list[tuple[Any, Any]], n: int) -> None:
        for _, on_commit in done:
            if on_commit is not None:
                try:
                    on_commit()
                except Exception:
                    log.exception("ledger: commit callback failed")
        with self._flushed:
            self._pending -= n
            self._flushed.notify_all()

    def _steal_async(self) -> None:
        """Hand what the loop's writer holds to the writer thread: the loop cannot run it now (this
        is its own thread, blocked in flush() or close(); or it is not running, or closed; or
        the writer was cancelled). A batch whose statement was sent is settled first: its answer
        is read here (at most :data:`STEAL_WAIT` s); committed, its callbacks run; failed or
        unknown (no answer, or the writer was cancelled mid-statement), it is re-queued: a
        duplicate row is then possible, a lost one is not."""
        batch, self._ainflight = self._ainflight, []
        queued, self._abuf = self._abuf, []
        conn, self._awconn = self._awconn, None
        task, self._atask = self._atask, None
        self._agen += 1  # a writer task still running stops at its next step
        if batch:
            if conn is not None and not conn.closed and _drain_result(conn.pgconn, STEAL_WAIT):
                self._committed(batch, len(batch))
            else:
                queued[:0] = batch
        current = asyncio.current_task() if asyncio._get_running_loop() is not None else None
        loop = self._aloop
        if task is not None and not task.done() and task is not current and loop is not None and not loop.is_closed():
            # it must never send what the thread now has: cancelled, it only closes its connection
            # as it unwinds (after its wait's reader is removed from the loop)
            task.cancel()
            if not batch and conn is not None:  # (not in use: the task was between batches)
                conn.pgconn.finish()
        elif conn is not None:
            conn.pgconn.finish()
        for item, on_commit in queued:
            with self._flushed:
                self._pending -= 1
            self._submit_thread(item, on_commit)

    def _loop_writer_can_run(self) -> bool:
        """Can a wait on this thread let the loop's writer finish? (Not on the loop's own thread,
        nor while that loop is not running.)"""
        loop = self._aloop
        return (loop is not None and loop.is_running() and not loop.is_closed()
                and threading.get_ident() != self._aloop_thread)

    @property
    def queue_depth(self) -> int:
        return self._pending

    @staticmethod
    def _copy_calls(c: psycopg.Connection, rows: list[dict[str, Any]]) -> None:
        cols = [k for k in CALL_COLUMNS if k != "id"]
        with c.cursor().copy(f"COPY calls ({', '.join(cols)}) FROM STDIN") as copy:  # type: ignore[arg-type]
            for r in rows:
                copy.write_row([clean_text(r.get(k)) for k in cols])

    def _write_batch(self, c: psycopg.Connection, batch: list[tuple[LedgerItem, Callable[[], None] | None]]) -> None:
        """One statement, so one round trip and one transaction (autocommit): the batch's
        settlements and usage, then its rows."""
        c.execute(_WRITE, _batch_params(batch))

    def _write_loop(self) -> None:
        conn: psycopg.Connection | None = None
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
            if not batch:
                continue
            try:
                try:
                    if conn is None or conn.closed or conn.broken:
                        conn = self._connect_writer()
                    done = self._write_or_split(conn, batch)
                except psycopg.OperationalError:
                    if conn is None or not conn.broken:
                        raise
                    conn = self._connect_writer()  # its old session died (a restart): once more, fresh
                    done = self._write_or_split(conn, batch)
            except psycopg.OperationalError as e:  # unreachable, restarted, timed out: keep the rows
                if conn is not None and not is_outage(e, conn):
                    log.exception("ledger: a batch failed")
                self._down(e)
                if self._stop.is_set() and backoff >= 2.0:
                    log.error("ledger: stopping with %d write(s) that could not be committed", self._pending)
                    return
                backoff = min(max(backoff * 2, 0.05), 2.0)
                for item in batch:
                    self._queue.put(item)
                continue
            backoff = 0.0
            self._up()
            for _, on_commit in done:
                if on_commit is not None:
                    try:
                        on_commit()
                    except Exception:
                        log.exception("ledger: commit callback failed")
            with self._flushed:
                self._pending -= len(batch)
                self._flushed.notify_all()
        if conn is not None:
            conn.close()

    def _connect_writer(self) -> psycopg.Connection:
        conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        _configure(conn)
        return conn

    def _write_or_split(self, conn: psycopg.Connection,
                        batch: list[tuple[LedgerItem, Callable[[], None] | None]]) -> list[tuple[Any, Any]]:
        """Commit the batch; a row that can never be written (a bug) is logged and dropped alone."""
        try:
            self._write_batch(conn, batch)
            return batch
        except Exception as e:
            if is_outage(e, conn):
                raise
            if len(batch) == 1:
                log.exception("ledger: dropped a %s that cannot be written", type(batch[0][0]).__name__)
                return batch  # logged and gone: its answer need not wait any longer
            return [x for item in batch for x in self._write_or_split(conn, [item])]

    def flush(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        if (self._abuf or self._ainflight) and not self._loop_writer_can_run():
            self._steal_async()  # the loop cannot write them while this waits: the thread does
        with self._flushed:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0 or not self._flushed.wait(left):
                    break

    def close(self) -> None:
        self.flush()
        self._closing = True
        self._steal_async()  # (whatever reached the loop's writer since)
        self.flush()
        self._stop.set()
        if self._writer is not None:
            self._writer.join(timeout=10)
        if self._registered:
            with contextlib.suppress(StoreUnavailable):  # a clean stop: this instance's lease ends now
                self._run(lambda c: c.execute("UPDATE instances SET heartbeat_at = '-infinity' WHERE id = %s",
                                              (self.instance,)))
        self._listener.join(timeout=2)
        for conn in self._aidle:  # (idle: no coroutine is using them)
            conn.pgconn.finish()
        self._aidle.clear()
        self.pool.close()


_WRITE = "SELECT spendgate_write(%s::text[], %s::bigint[], %s::text[], %s::bigint[], %s::json)"


def _batch_params(batch: list[tuple[LedgerItem, Callable[[], None] | None]]) -> tuple[Any, ...]:
    """spendgate_write's arguments for a batch: its settlements, its usage, its rows (JSON)."""
    cols = ROW_COLUMNS
    ids: list[str] = []
    actuals: list[int] = []
    uscopes: list[str] = []
    unanos: list[int] = []
    rows = []
    for item, _ in batch:
        if isinstance(item, CallRow):
            get = item.row.get
            rows.append(dict(zip(cols, map(clean_text, map(get, cols)), strict=True)))
        elif isinstance(item, Settle):
            ids.append(item.reservation.id)
            actuals.append(item.actual_nanos)
        elif isinstance(item, Usage):
            uscopes += item.scopes
            unanos += [item.nanos] * len(item.scopes)
    return (text_array(ids), int_array(actuals), text_array(uscopes), int_array(unanos),
            json.dumps(rows, ensure_ascii=False, allow_nan=False))


# Arrays sent as their text literal (a str param the statement casts: ``%s::text[]``): psycopg's
# adaptation of a list (element types, a dumper per list) costs ~20 µs a statement, this ~1 µs.
def text_array(items: Iterable[str]) -> str:
    """``['a', 'b"c']`` → ``{"a","b\\"c"}``: every element quoted (commas, braces, "NULL": any text)."""
    return "{" + ",".join(['"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in items]) + "}"


def int_array(items: Iterable[int]) -> str:
    return "{" + ",".join([str(int(n)) for n in items]) + "}"


def _cursor(conn: psycopg.AsyncConnection) -> psycopg.AsyncCursor:
    """The connection's own cursor, kept: its adapters are looked up once, not per statement
    (``conn.execute`` makes a new cursor, and a new adapter context, each time)."""
    cur = getattr(conn, "_spendgate_cursor", None)
    if cur is None:
        cur = conn._spendgate_cursor = conn.cursor()  # type: ignore[attr-defined]
    return cur


class _Stolen(Exception):
    """The loop writer's batch was taken over by flush() or close() while in flight."""


STEAL_WAIT = 2.0  # seconds flush()/close() wait for the answer of a batch the loop's writer had sent


def _drain_result(pgconn: Any, timeout: float) -> bool:
    """Read, blocking (at most ``timeout`` s), the answer of the statement in flight on ``pgconn``:
    did it succeed (a row back: ``spendgate_write`` committed)? False when it failed, when the
    connection died, or when no answer came in time."""
    import select

    from psycopg import pq

    deadline = time.monotonic() + timeout
    ok = False
    try:
        while True:
            while pgconn.flush():  # (a statement cancelled while still being sent)
                if not select.select([], [pgconn.socket], [], max(0.0, deadline - time.monotonic()))[1]:
                    return False
            pgconn.consume_input()
            if pgconn.is_busy():
                if not select.select([pgconn.socket], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    return False
                continue
            res = pgconn.get_result()
            if res is None:
                return ok
            ok = res.status == pq.ExecStatus.TUPLES_OK  # (a PREPARE's own result is COMMAND_OK)
    except psycopg.Error:
        return False


def is_outage(e: BaseException, conn: psycopg.Connection | None = None) -> bool:
    """Is this the database being unreachable (down, restarting, out of connections or disk, a
    timeout) rather than a bug in a statement?"""
    if not isinstance(e, psycopg.OperationalError):
        return False
    if conn is None or conn.closed or conn.broken:
        return True
    state = getattr(e, "sqlstate", None)
    return state is None or state.startswith(("08", "53", "57", "58"))


def _too_many_clients(e: BaseException) -> bool:
    """The server refused a new session for want of room: max_connections ("too many clients"),
    a role's or a database's CONNECTION LIMIT ("too many connections for …"): SQLSTATE 53300."""
    msg = str(e)  # (a refused connection carries no SQLSTATE: its message says it)
    return getattr(e, "sqlstate", None) == "53300" or "too many c" in msg or "connection slots are reserved" in msg


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


_HOST = default_replica()
