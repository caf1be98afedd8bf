"""The circuit breaker (``circuit:``, stages/circuit.py), in process with a controlled clock."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from spendgate import clock
from spendgate.pipeline import Outcome, Pipeline, response, vendor_flow
from spendgate.policy import ConfigError, parse_config

POLICY = """\
version: 1
vendors:
  openai: {secret: env:OPENAI_API_KEY}
  anthropic: {secret: env:ANTHROPIC_API_KEY}
policies:
  agents:
    vendors:
      openai: {allow: ["POST /v1/embeddings"]}
      anthropic: {allow: ["POST /v1/messages/count_tokens"]}
    circuit: {failures: 3, window: 60s, cooldown: 30s}
    loop: {repeats: 1000}
  defaults:
    vendors:
      openai: {allow: ["POST /v1/embeddings"]}
    loop: {repeats: 1000}
  unguarded:
    vendors:
      openai: {allow: ["POST /v1/embeddings"]}
    circuit: off
    loop: {repeats: 1000}
  shadow:
    mode: report
    vendors:
      openai: {allow: ["POST /v1/embeddings"]}
    circuit: {failures: 2}
    loop: {repeats: 1000}
"""
OK = response(200, json.dumps({"object": "list", "data": [], "model": "text-embedding-3-small",
                               "usage": {"prompt_tokens": 1, "total_tokens": 1}}))
DOWN = response(503, '{"error": {"message": "overloaded", "type": "server_error"}}')


@pytest.fixture
def pipe(pipeline: Callable[..., Pipeline]) -> Iterator[Pipeline]:
    clock.set_time(1_800_000_000.0)
    try:
        yield pipeline(POLICY)
    finally:
        clock.set_time(None)


def later(seconds: float) -> None:
    clock.set_time(clock.wall() + seconds)


def embed(p: Pipeline, token: str, answer=OK, **kw) -> Outcome:  # noqa: ANN001, ANN003
    flow = vendor_flow("POST", "https://api.openai.com/v1/embeddings", {"Authorization": f"Bearer {token}"},
                       '{"model": "text-embedding-3-small", "input": "x"}')
    return p.run(flow, answer, **kw)


def test_opens_after_consecutive_failures_then_probes_and_closes(pipe: Pipeline) -> None:
    token = pipe.issue_key("agents")
    assert [embed(pipe, token, DOWN).status for _ in range(2)] == [503, 503]
    third = embed(pipe, token, error="Connection reset by peer")  # a lost answer is a failure too
    assert "circuit opened for 30s after 3 failures" in third.row["note"]
    assert "circuit opened" in third.flow.comment
    refused = embed(pipe, token)
    assert (refused.status, refused.reason, refused.refused) == (503, "circuit_open", True)
    assert refused.flow.response.headers["Retry-After"] == "30"
    assert refused.row["reason"] == "circuit_open" and refused.row["status"] == 503
    other = pipe.run(vendor_flow("POST", "https://api.anthropic.com/v1/messages/count_tokens",
                                 {"x-api-key": token}, "{}"), response(200, '{"input_tokens": 3}'))
    assert other.status == 200  # another vendor: its own circuit
    assert 'spendgate_circuit_open{policy="agents",vendor="openai"} 1' in metrics(pipe)
    later(20)
    assert embed(pipe, token).flow.response.headers["Retry-After"] == "10"
    later(10)
    probe = embed(pipe, token, DOWN)  # half-open: one call goes through, and fails
    assert probe.forwarded is not None and "circuit reopened" in probe.row["note"]
    assert embed(pipe, token).reason == "circuit_open"
    later(30)
    assert embed(pipe, token).status == 200  # the probe succeeds: closed
    assert embed(pipe, token).status == 200
    assert 'spendgate_circuit_open{policy="agents",vendor="openai"} 0' in metrics(pipe)


def metrics(p: Pipeline) -> str:
    from spendgate.gateway import members
    from spendgate.metrics import Metrics

    m = next(a for a in members(p.addons) if isinstance(a, Metrics))
    return m.render()


def test_successes_and_the_window_reset_the_count(pipe: Pipeline) -> None:
    token = pipe.issue_key("agents")
    embed(pipe, token, DOWN), embed(pipe, token, DOWN)
    assert embed(pipe, token, response(400, '{"error": {"message": "bad"}}')).status == 400  # the vendor is up
    embed(pipe, token, DOWN), embed(pipe, token, DOWN)
    assert embed(pipe, token).status == 200
    embed(pipe, token, DOWN), embed(pipe, token, DOWN)
    later(61)
    assert embed(pipe, token, DOWN).status == 503  # the first two fell out of the window
    assert embed(pipe, token).status == 200


def test_defaults_on_off_switch_and_refusals_do_not_count(pipe: Pipeline) -> None:
    on, off = pipe.issue_key("defaults"), pipe.issue_key("unguarded")
    assert [embed(pipe, on, DOWN).reason for _ in range(5)] == [None] * 5
    assert embed(pipe, on).reason == "circuit_open"  # default: 5 failures
    assert [embed(pipe, off, DOWN).status for _ in range(8)] == [503] * 8
    assert embed(pipe, off).status == 200


def test_report_mode_records_would_deny_and_forwards(pipe: Pipeline) -> None:
    token = pipe.issue_key("shadow")
    embed(pipe, token, DOWN), embed(pipe, token, DOWN)
    out = embed(pipe, token)
    assert out.status == 200 and out.forwarded is not None
    assert (out.decision, out.reason) == ("would_deny", "circuit_open")


@pytest.mark.parametrize(("text", "line", "field", "msg"), [
    ("    circuit: {failures: 0}\n", 4, "policies.p.circuit.failures", "greater than or equal to 1"),
    ("    circuit: {cooldown: soon}\n", 4, "policies.p.circuit.cooldown", "not a duration"),
    ("    circuit: {thresh: 3}\n", 4, "policies.p.circuit.thresh", "unknown field"),
    ("    circuit: maybe\n", 4, "policies.p.circuit", "valid dictionary"),
])
def test_bad_circuit_fields(text: str, line: int, field: str, msg: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("version: 1\npolicies:\n  p:\n" + text, "c.yaml")
    assert any(p.line == line and p.field == field and msg in p.message for p in e.value.problems), \
        [str(p) for p in e.value.problems]
