"""``spendgate.testing``: a pytest plugin to test a policy against captured traffic.

Installed with spendgate (entry point ``pytest11``), so any test suite can use the
``spendgate_replay`` fixture::

    def test_the_new_policy(spendgate_replay):
        calls = spendgate_replay("policies/prod.yaml", "captures/last-week/")
        calls.where(path="/v1/refunds").assert_refused("endpoint_not_allowed")
        calls.where(vendor="openai").assert_allowed()
        calls.assert_cost_at_most("25.00")
        assert calls.summary.newly_refused == 0

``spendgate_replay(policy, *captures, old=None, policy_name=None)`` replays the captures (flow
files, HAR files, directories; relative paths from the rootdir) exactly as ``spendgate replay``
does and returns :class:`Calls`: the replayed calls, filterable with :meth:`Calls.where`, with
assertion helpers that list every offending call. Nothing is imported from mitmproxy until the
fixture is used.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import pytest

if TYPE_CHECKING:
    from .replay import Row, Summary


class Calls(Sequence["Row"]):
    """Replayed calls (each a :class:`spendgate.replay.Row`: ``then`` and ``now`` decisions)."""

    def __init__(self, rows: list[Row], summary: Summary) -> None:
        self.rows = rows
        self.summary = summary

    @overload
    def __getitem__(self, i: int) -> Row: ...
    @overload
    def __getitem__(self, i: slice) -> Calls: ...
    def __getitem__(self, i: int | slice) -> Row | Calls:
        return Calls(self.rows[i], self.summary) if isinstance(i, slice) else self.rows[i]

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)

    def where(self, *, method: str | None = None, host: str | None = None, path: str | None = None,
              vendor: str | None = None, key: str | None = None, decision: str | None = None,
              reason: str | None = None, changed: bool | None = None) -> Calls:
        """The calls matching every given filter (``path`` and ``host`` take globs: ``/v1/refunds*``)."""
        from .vendors import vendor_for_host

        def ok(r: Row) -> bool:
            v = vendor_for_host(r.host)
            return ((method is None or r.method.upper() == method.upper())
                    and (host is None or fnmatch.fnmatchcase(r.host, host))
                    and (path is None or fnmatch.fnmatchcase(r.path, path))
                    and (vendor is None or (v is not None and v.name == vendor))
                    and (key is None or r.key == key)
                    and (decision is None or r.now.decision == decision)
                    and (reason is None or r.now.reason == reason)
                    and (changed is None or r.changed == changed))

        return Calls([r for r in self.rows if ok(r)], self.summary)

    @property
    def changed(self) -> Calls:
        return Calls([r for r in self.rows if r.changed], self.summary)

    @property
    def cost(self) -> Decimal:
        """What these calls cost now (USD, estimates included)."""
        return sum((r.now.cost for r in self.rows), Decimal(0))

    # -- assertions ----------------------------------------------------------------------------
    def assert_any(self) -> Calls:
        if not self.rows:
            pytest.fail("no replayed call matches", pytrace=False)
        return self

    def assert_allowed(self) -> Calls:
        """Every call (at least one) goes through: allowed, or would_deny in report mode."""
        self.assert_any()
        bad = [r for r in self.rows if r.now.refused]
        if bad:
            pytest.fail(_listing(f"{len(bad)} of {len(self.rows)} calls would be refused", bad), pytrace=False)
        return self

    def assert_refused(self, code: str | None = None) -> Calls:
        """Every call (at least one) is refused, with ``code`` if given (e.g. ``cap_exhausted``)."""
        self.assert_any()
        bad = [r for r in self.rows if not r.now.refused or (code is not None and r.now.reason != code)]
        if bad:
            want = f"refused with {code}" if code else "refused"
            pytest.fail(_listing(f"{len(bad)} of {len(self.rows)} calls would not be {want}", bad), pytrace=False)
        return self

    def assert_cost_at_most(self, usd: str | int | Decimal) -> Calls:
        """These calls together cost at most ``usd`` (under the candidate policy)."""
        limit = Decimal(str(usd))
        if self.cost > limit:
            top = sorted(self.rows, key=lambda r: r.now.cost, reverse=True)[:10]
            pytest.fail(_listing(f"these calls cost ${self.cost}, over ${limit}; the most expensive", top),
                        pytrace=False)
        return self

    def assert_unchanged(self) -> Calls:
        """No call is decided differently than it was (or than under ``old``)."""
        bad = [r for r in self.rows if r.changed]
        if bad:
            pytest.fail(_listing(f"{len(bad)} calls would be decided differently", bad), pytrace=False)
        return self


def _listing(title: str, rows: list[Row]) -> str:
    def cell(d: Any) -> str:
        return f"{d.decision} {d.reason}" if d.reason else d.decision

    lines = [f"{title}:"]
    for r in rows[:20]:
        lines.append(f"  #{r.n} {r.method} {r.host}{r.path} (key {r.key}): then {cell(r.then)} ${r.then.cost}, "
                     f"now {cell(r.now)} ${r.now.cost}")
    if len(rows) > 20:
        lines.append(f"  … and {len(rows) - 20} more")
    return "\n".join(lines)


@pytest.fixture
def spendgate_replay(request: pytest.FixtureRequest) -> Callable[..., Calls]:
    """``spendgate_replay(policy, *captures, old=None, policy_name=None) -> Calls``"""
    root = Path(str(request.config.rootpath))

    def resolve(p: str | os.PathLike[str]) -> Path:
        path = Path(p)
        return path if path.is_absolute() or path.exists() else root / path

    def run(policy: str | os.PathLike[str], *captures: str | os.PathLike[str],
            old: str | os.PathLike[str] | None = None, policy_name: str | None = None) -> Calls:
        from .replay import Replay

        if not captures:
            raise ValueError("spendgate_replay(policy, capture, ...): give at least one capture")
        with Replay(resolve(policy), old=resolve(old) if old is not None else None, policy=policy_name) as r:
            rows = list(r.run([resolve(c) for c in captures]))
        if r.summary.problems:
            import warnings

            for problem in r.summary.problems:
                warnings.warn(f"spendgate replay: {problem}", stacklevel=2)
        return Calls(rows, r.summary)

    return run
