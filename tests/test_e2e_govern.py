"""End to end for issue 14 (govern): a real mitmdump, the official SDKs, the fake vendors.

Model rules and output ceilings with the openai and anthropic SDKs; refusals are checked for
what the SDK raises, what the vendor saw (nothing) and the ledger row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Gateway, start_gateway

from fakes import FakeVendors

POLICY = """\
version: 1
vendors:
  openai:    {{secret: env:OPENAI_API_KEY, upstream: "{up}"}}
  anthropic: {{secret: env:ANTHROPIC_API_KEY, upstream: "{up}"}}
policies:
  models:
    vendors:
      openai:
        allow: ["POST /v1/chat/completions"]
        models: {{allow: ["gpt-4o-mini*"]}}
        max_output_tokens: 200
      anthropic:
        allow: ["POST /v1/messages"]
        models: {{deny: ["claude-opus-*"]}}
        max_output_tokens: 64
        clamp: true
  models-shadow:
    mode: report
    vendors:
      openai:
        allow: ["POST /v1/chat/completions"]
        models: {{allow: ["gpt-4o-mini"]}}
        max_output_tokens: 10
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, fakes: FakeVendors, certs: Path) -> Iterator[Gateway]:
    g = start_gateway(tmp_path_factory.mktemp("govern"), fakes, certs, POLICY.format(up=fakes.url))
    yield g
    g.stop()


@pytest.fixture
def agent(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    """This process configured like an agent container: HTTPS_PROXY and the CA only."""
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, gw.proxy)
    for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.setenv(name, gw.ca)
    return gw


def seen_since(gw: Gateway, n: int) -> list[dict]:
    return gw.fakes.requests()[n:]


def test_openai_sdk_model_refused_with_403_model_not_allowed(agent: Gateway) -> None:
    import openai

    key_id, token = agent.issue("models")
    n, rows = len(agent.fakes.requests()), len(agent.calls())
    client = openai.OpenAI(api_key=token, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as e:
        client.chat.completions.create(model="o1-pro", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 403
    assert e.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    assert "o1-pro" in e.value.message
    assert seen_since(agent, n) == []  # never reached the vendor
    row = agent.last_call(rows)
    assert (row["decision"], row["reason"], row["model"], row["status"], row["key_id"]) == \
        ("deny", "model_not_allowed", "o1-pro", 403, key_id)

    with pytest.raises(openai.PermissionDeniedError) as e:  # no limit: the model's default is larger
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "output_limit_exceeded"  # type: ignore[index]

    out = client.chat.completions.create(model="gpt-4o-mini", max_tokens=150,
                                         messages=[{"role": "user", "content": "hi"}])
    assert out.usage is not None
    assert len(seen_since(agent, n)) == 1


def test_anthropic_sdk_clamped_to_the_ceiling(agent: Gateway) -> None:
    import anthropic

    _, token = agent.issue("models")
    n, rows = len(agent.fakes.requests()), len(agent.calls())
    client = anthropic.Anthropic(api_key=token, max_retries=0)
    msg = client.messages.create(model="claude-sonnet-4-5", max_tokens=4000,
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.usage.output_tokens <= 64
    sent = seen_since(agent, n)
    assert len(sent) == 1 and json.loads(sent[0]["body"])["max_tokens"] == 64
    row = agent.last_call(rows)
    assert (row["decision"], row["model"]) == ("allow", "claude-sonnet-4-5")
    assert "clamped max_tokens=4000 to 64" in row["note"]
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        client.messages.create(model="claude-opus-4-1", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["code"] == "model_not_allowed"  # type: ignore[index]


def test_report_mode_forwards_and_records_would_deny(agent: Gateway) -> None:
    import openai

    _, token = agent.issue("models-shadow")
    n, rows = len(agent.fakes.requests()), len(agent.calls())
    out = openai.OpenAI(api_key=token, max_retries=0).chat.completions.create(
        model="gpt-4o", max_tokens=50, messages=[{"role": "user", "content": "hi"}])
    assert out.usage is not None
    sent = seen_since(agent, n)
    assert len(sent) == 1 and json.loads(sent[0]["body"])["max_tokens"] == 50  # untouched
    row = agent.last_call(rows)
    assert (row["decision"], row["reason"], row["model"]) == ("would_deny", "model_not_allowed", "gpt-4o")


def test_report_by_model(agent: Gateway) -> None:
    out = json.loads(agent.cli("report", "--by", "model", "--json").stdout)
    by = {r["model"]: r for r in out}
    assert by["o1-pro"]["refused"] >= 1
    assert by["gpt-4o-mini"]["allowed"] >= 1
    assert by["claude-sonnet-4-5"]["spend_usd"] != "0"
