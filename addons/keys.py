"""The rules for issuing a vault key, shared by ``spendgate keys issue`` and ``POST /v1/keys``.

One function, so the CLI and the admin API can never disagree on what a valid key is:
its policy must exist, its TTL defaults to the policy's ``ttl``, and its ``cap_usd``
may narrow the policy's ``budget.key_usd``, never widen it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from .money import parse_decimal
from .policy import Config, parse_duration
from .store import KeyRecord, Store


class IssueError(ValueError):
    """A key request that breaks a rule; ``param`` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    """``["run=42", "team=ops"]`` → ``{"run": "42", "team": "ops"}``; ``ValueError`` names a bad pair.
    Shared by ``--label`` (CLI) and ``?label=`` (admin API)."""
    out = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not k:
            raise ValueError(f"{pair!r} is not k=v")
        out[k] = v
    return out


@dataclass(frozen=True)
class KeySpec:
    policy: str
    ttl_seconds: int | None
    cap_usd: Decimal | None
    labels: dict[str, str]


def key_spec(config: Config, policy: Any, ttl: Any = None, cap_usd: Any = None,
             labels: Any = None) -> KeySpec:
    """Check a key request against ``config``; raises :class:`IssueError`.

    ``ttl`` is a duration (``"10m"``) or seconds; ``cap_usd`` a decimal string or a
    number (JSON callers send either). Values arrive untyped from JSON, hence ``Any``.
    """
    if not isinstance(policy, str) or not policy:
        raise IssueError("a policy name is required", "policy")
    pol = config.policies.get(policy)
    if pol is None:
        raise IssueError(f"no policy {policy!r} (have: {', '.join(config.policies) or 'none'})", "policy")
    try:
        ttl_s = parse_duration(ttl) if ttl is not None else pol.ttl
    except ValueError as e:
        raise IssueError(str(e), "ttl") from None
    cap = None
    if cap_usd is not None:
        cap = parse_decimal(cap_usd)
        if cap is None:
            raise IssueError(f"{cap_usd!r} is not an amount in USD", "cap_usd")
        if cap < 0:
            raise IssueError("a cap must be >= 0", "cap_usd")
        cap = Decimal(f"{cap:f}")  # stored and shown as 100, never 1E+2
        if pol.budget.key_usd is not None and cap > pol.budget.key_usd:
            raise IssueError(
                f"a cap of {cap} would widen policy {policy!r}'s key_usd {pol.budget.key_usd}; "
                "a key may only narrow its policy's caps", "cap_usd",
            )
    labels = {} if labels is None else labels
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in labels.items()
    ):
        raise IssueError("labels must map non-empty names to strings", "labels")
    return KeySpec(policy, ttl_s, cap, dict(labels))


def issue_key(store: Store, config: Config, policy: Any, ttl: Any = None, cap_usd: Any = None,
              labels: Any = None) -> tuple[KeyRecord, str]:
    """Check the request, then issue the key: (record, token). The token exists only here."""
    spec = key_spec(config, policy, ttl, cap_usd, labels)
    return store.issue_key(spec.policy, spec.ttl_seconds, spec.cap_usd, spec.labels)
