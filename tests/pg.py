"""The real PostgreSQL server the tests use (never a mock).

``SPENDGATE_TEST_POSTGRES`` names it (default ``postgresql://postgres@127.0.0.1:5432/test``).
Each test session (each xdist worker is its own session) creates one throwaway database and drops
it at the end; each test gets its own schema in it (a ``search_path`` in the URL), so tests never
see each other's rows. When no server answers, tests that need one skip with the reason, except
under ``CI=true``, where they fail: CI can never pass by skipping them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def server_url() -> str:
    return os.environ.get("SPENDGATE_TEST_POSTGRES") or DEFAULT


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def with_schema(url: str, schema: str) -> str:
    """``url`` with ``search_path`` set to ``schema`` for every connection made from it."""
    sep = "&" if urlsplit(url).query else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


def unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required under CI=true: {reason}")
    pytest.skip(f"no PostgreSQL server: {reason} (set SPENDGATE_TEST_POSTGRES)")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A throwaway database on the test server, for this session; its URL."""
    try:
        import psycopg
    except ImportError as e:  # pragma: no cover (a dev dependency)
        unavailable(f"psycopg is not installed ({e})")
    url = server_url()
    # One per session, so one per xdist worker (gw0, gw1, ...): a test that closes its database to
    # new connections (an outage) or terminates its backends never touches another worker's.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"spendgate_test_{worker}_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as e:
        unavailable(f"{url} did not answer ({str(e).strip().splitlines()[0]})")
    try:
        yield with_database(url, name)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(pg_database: str) -> Iterator[str]:
    """A fresh schema in the session's database: a ledger URL no other test shares."""
    import psycopg

    schema = "t_" + secrets.token_hex(5)
    with psycopg.connect(pg_database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield with_schema(pg_database, schema)
