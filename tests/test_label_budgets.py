"""Grouped budgets (``budget.per_label``) and the ``timezone:`` of budget days, in process."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest

from spendgate import clock, reports
from spendgate.pipeline import Outcome, Pipeline, response, vendor_flow
from spendgate.policy import ConfigError, parse_config

POLICY = """\
version: 1
timezone: Pacific/Kiritimati
vendors:
  stripe: {secret: env:STRIPE_SECRET_KEY}
policies:
  agents:
    vendors:
      stripe: {allow: ["POST /v1/payment_intents"]}
    budget:
      per_label:
        team: {daily_usd: 50, monthly_usd: 80}
  other-agents:
    vendors:
      stripe: {allow: ["POST /v1/payment_intents"]}
    budget:
      per_label:
        team: {daily_usd: 50}
  shadow:
    mode: report
    vendors:
      stripe: {allow: ["POST /v1/payment_intents"]}
    budget:
      per_label:
        team: {daily_usd: 10}
"""


def pay(p: Pipeline, token: str, dollars: int) -> Outcome:
    body = f"amount={dollars * 100}&currency=usd"
    answer = response(200, json.dumps({"id": "pi_1", "object": "payment_intent", "status": "succeeded",
                                       "amount": dollars * 100, "amount_received": dollars * 100,
                                       "currency": "usd"}))
    return p.run(vendor_flow("POST", "https://api.stripe.com/v1/payment_intents",
                             {"Authorization": f"Bearer {token}"}, body), answer)


@pytest.fixture
def pipe(pipeline: Callable[..., Pipeline]) -> Pipeline:
    return pipeline(POLICY)


def scopes(p: Pipeline) -> dict[str, int]:
    p.flush()
    conn = sqlite3.connect(str(p.runtime.store.path))
    try:
        return dict(conn.execute("SELECT scope, used_nanos FROM counters"))
    finally:
        conn.close()


def test_each_label_value_has_its_own_cap_shared_by_its_keys(pipe: Pipeline) -> None:
    a1 = pipe.issue_key("agents", labels={"team": "acme"})
    a2 = pipe.issue_key("other-agents", labels={"team": "acme", "run": "7"})  # another policy, same team
    b = pipe.issue_key("agents", labels={"team": "blue:ops/1"})
    loner = pipe.issue_key("agents")  # no team label: not capped by it
    assert pay(pipe, a1, 30).status == 200
    out = pay(pipe, a2, 25)  # acme has $20 left today
    assert (out.status, out.reason) == (402, "cap_exhausted")
    assert "label:team=acme:day:" in out.flow.response.text
    assert pay(pipe, a2, 20).status == 200
    assert pay(pipe, b, 45).status == 200  # another team, its own $50
    assert pay(pipe, loner, 60).status == 200
    day = datetime.now(ZoneInfo("Pacific/Kiritimati")).date().isoformat()
    used = scopes(pipe)
    assert used[f"label:team=acme:day:{day}"] == 50 * 10**9
    assert used[f"label:team=acme:month:{day[:7]}"] == 50 * 10**9
    assert used[f"label:team=blue%3Aops%2F1:day:{day}"] == 45 * 10**9  # values are escaped in scope names
    assert not any("team=" in s and loner in s for s in used)
    by_team = {r["label:team"]: r for r in reports.spend(str(pipe.runtime.store.path), by="label:team")}
    assert Decimal(by_team["acme"]["spend_usd"]) == 50 and by_team["acme"]["refused"] == 1


def test_monthly_label_cap_spans_days(pipe: Pipeline) -> None:
    token = pipe.issue_key("agents", labels={"team": "acme"})
    try:
        clock.set_time(datetime(2026, 11, 3, 12, tzinfo=UTC).timestamp())
        assert pay(pipe, token, 45).status == 200
        clock.set_time(datetime(2026, 11, 20, 12, tzinfo=UTC).timestamp())
        assert pay(pipe, token, 45).reason == "cap_exhausted"  # $45 + $45 > the $80 of November
        assert pay(pipe, token, 35).status == 200
        clock.set_time(datetime(2026, 11, 30, 11, tzinfo=UTC).timestamp())  # Dec 1st in Kiritimati (UTC+14)
        assert pay(pipe, token, 45).status == 200  # a new calendar month there
    finally:
        clock.set_time(None)
    used = scopes(pipe)
    assert used["label:team=acme:month:2026-11"] == 80 * 10**9
    assert used["label:team=acme:month:2026-12"] == 45 * 10**9
    assert used["label:team=acme:day:2026-12-01"] == 45 * 10**9


def test_report_mode_records_would_deny(pipe: Pipeline) -> None:
    token = pipe.issue_key("shadow", labels={"team": "acme"})
    assert pay(pipe, token, 8).status == 200
    out = pay(pipe, token, 8)
    assert out.status == 200 and (out.decision, out.reason) == ("would_deny", "cap_exhausted")


@pytest.mark.parametrize(("text", "line", "field", "msg"), [
    ("timezone: Mars/Olympus\n", 2, "timezone", "not a time zone"),
    ("policies:\n  p:\n    budget:\n      per_label:\n        team: {}\n", 6, "policies.p.budget.per_label.team",
     "daily_usd and/or monthly_usd"),
    ("policies:\n  p:\n    budget:\n      per_label:\n        team: {daily_usd: -1}\n", 6,
     "policies.p.budget.per_label.team.daily_usd", "non-negative"),
    ("policies:\n  p:\n    budget:\n      per_label:\n        'te am': {daily_usd: 1}\n", 5,
     "policies.p.budget.per_label", "not a label name"),
    ("policies:\n  p:\n    budget:\n      per_label:\n        team: {weekly_usd: 1}\n", 6,
     "policies.p.budget.per_label.team.weekly_usd", "unknown field"),
])
def test_bad_fields_name_file_line_field(text: str, line: int, field: str, msg: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("version: 1\n" + text, "b.yaml")
    assert any(p.line == line and p.field == field and msg in p.message for p in e.value.problems), \
        [str(p) for p in e.value.problems]
