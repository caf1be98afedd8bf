"""End to end for issue 14 (govern): a real mitmdump, the official SDKs, the fake vendors.

Model rules and output ceilings with the openai and anthropic SDKs; refusals are checked for
what the SDK raises, what the vendor saw (nothing) and the ledger row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from harness import Gateway, start_gateway

from fakes import FakeVendors

GEMINI_KEY = "AIzaSyREALgeminiSECRETdoNotLeak000000000"
OPENROUTER_KEY = "sk-or-v1-" + "f" * 64
MISTRAL_KEY = "REALmistralSECRETdoNotLeak000000"
MCP_TOKEN = "mcp_live_realsecretdonotleak00"

POLICY = """\
version: 1
vendors:
  openai:    {{secret: env:OPENAI_API_KEY, upstream: "{up}"}}
  anthropic: {{secret: env:ANTHROPIC_API_KEY, upstream: "{up}"}}
  gemini:    {{secret: env:GEMINI_API_KEY, upstream: "{up}"}}
  openrouter: {{secret: env:OPENROUTER_API_KEY, upstream: "{up}"}}
  mistral:   {{secret: env:MISTRAL_API_KEY, upstream: "{up}"}}
  deepseek:  {{secret: env:MISTRAL_API_KEY, upstream: "{up}"}}
  groq:      {{secret: env:MISTRAL_API_KEY, upstream: "{up}"}}
  search-mcp:
    kind: mcp
    hosts: [mcp.tools.example]
    secret: env:MCP_TOKEN
    credential: {{header: Authorization, format: "Bearer {{secret}}"}}
    raw_credential: "^mcp_live_[a-z0-9]{{16,}}$"
    tools:
      web_search: {{per_call_usd: 0.01}}
      "*_lookup": {{per_call_usd: 0.05}}
      flaky: {{per_call_usd: 0.02}}
    upstream: "{up}"
  kimi:
    compatible: anthropic
    hosts: [api.kimi.example]
    secret: env:MISTRAL_API_KEY
    upstream: "{up}"
fx: {{EUR: 1.10}}
prices:
  kimi: {{models: {{kimi-k2: {{input: 0.6, output: 2.5, max_output: 16384}}}}}}
policies:
  tools:
    vendors:
      search-mcp:
        allow: ["* /mcp", "* /mcp/**"]
        tools:
          allow: [web_search, "*_lookup", flaky]
          deny: ["delete_*"]
          approve: [send_email]
          rate: {{web_search: 2/minute}}
    approval_timeout: 1s
    budget: {{key_usd: 10}}
  tools-shadow:
    mode: report
    vendors:
      search-mcp:
        allow: ["* /mcp", "* /mcp/**"]
        tools: {{allow: [web_search]}}
  flaky:
    vendors:
      openai: {{allow: ["POST /v1/embeddings"]}}
    circuit: {{failures: 2, window: 60s, cooldown: 2s}}
    loop: {{repeats: 100}}
  providers:
    vendors:
      gemini:
        allow: ["POST /v1beta/models/*", "POST /v1/models/*"]
        models: {{allow: ["gemini-2.5-*", "gemini-2.0-*"]}}
      openrouter: {{allow: ["POST /api/v1/chat/completions"]}}
      mistral: {{allow: ["POST /v1/chat/completions"], models: {{deny: ["mistral-large-*"]}}}}
      deepseek: {{allow: ["POST /chat/completions"]}}
      groq: {{allow: ["POST /openai/v1/chat/completions"]}}
      kimi: {{allow: ["POST /v1/messages"], max_output_tokens: 32, clamp: true}}
    budget: {{key_usd: 10}}
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
    g = start_gateway(tmp_path_factory.mktemp("govern"), fakes, certs, POLICY.format(up=fakes.url),
                      env={"GEMINI_API_KEY": GEMINI_KEY, "OPENROUTER_API_KEY": OPENROUTER_KEY,
                           "MISTRAL_API_KEY": MISTRAL_KEY, "MCP_TOKEN": MCP_TOKEN})
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


# --------------------------------------------------------------------------- Gemini, compatible providers


def header(req: dict, name: str) -> str | None:
    return next((v for k, v in req["headers"] if k.lower() == name.lower()), None)


def no_secret_anywhere(gw: Gateway) -> None:
    """The real keys are in no flow file, log line or ledger row (the flows are written as they end)."""
    for path in (gw.flows, gw.log, Path(gw.db)):
        data = path.read_bytes() if path.exists() else b""
        for secret in (GEMINI_KEY, OPENROUTER_KEY, MISTRAL_KEY, MCP_TOKEN):
            assert secret.encode() not in data, f"{secret[:8]}… leaked into {path.name}"


def test_genai_sdk_key_in_header(agent: Gateway) -> None:
    from google import genai

    _, token = agent.issue("providers")
    n, rows = len(agent.fakes.requests()), len(agent.calls())
    client = genai.Client(api_key=token)
    out = client.models.generate_content(model="gemini-2.5-flash", contents="Say hi")
    assert out.usage_metadata.thoughts_token_count == 5
    sent = seen_since(agent, n)
    assert len(sent) == 1
    assert header(sent[0], "x-goog-api-key") == GEMINI_KEY
    assert "key=" not in sent[0]["query"]
    row = agent.last_call(rows)
    assert (row["vendor"], row["model"], row["cost_status"]) == ("gemini", "gemini-2.5-flash", "parsed")
    assert row["path"].endswith("/models/gemini-2.5-flash:generateContent")
    chunks = list(client.models.generate_content_stream(model="gemini-2.5-flash", contents="Say hi"))
    assert chunks[-1].usage_metadata.candidates_token_count == 12
    streamed = agent.last_call(rows + 1)
    assert streamed["cost_status"] == "parsed" and streamed["cost_usd"] == row["cost_usd"]
    with pytest.raises(genai.errors.ClientError) as e:
        client.models.generate_content(model="gemini-3-pro-preview", contents="x")
    assert e.value.code == 403 and "model_not_allowed" in str(e.value)
    no_secret_anywhere(agent)


def test_genai_sdk_key_in_the_query_goes_out_in_the_url_only(agent: Gateway) -> None:
    import httpx
    from google import genai
    from google.genai import types

    _, token = agent.issue("providers")
    n, rows = len(agent.fakes.requests()), len(agent.calls())
    # the SDK's own httpx client, with the key as ?key= on every request (the header holds no key)
    http_client = httpx.Client(params={"key": token}, verify=agent.ca, proxy=agent.proxy)
    client = genai.Client(api_key="unused", http_options=types.HttpOptions(httpx_client=http_client))
    out = client.models.generate_content(model="gemini-2.0-flash", contents="hello there")
    assert out.text
    sent = seen_since(agent, n)
    assert len(sent) == 1
    assert f"key={GEMINI_KEY}" in sent[0]["query"]
    assert header(sent[0], "x-goog-api-key") is None  # the key went where the agent put it: the URL
    assert "vk_" not in json.dumps(sent)
    row = agent.last_call(rows)
    assert (row["decision"], row["model"], row["cost_status"]) == ("allow", "gemini-2.0-flash", "parsed")
    assert "key" not in row["path"]
    no_secret_anywhere(agent)


def test_rest_key_in_query_with_sse_stream(agent: Gateway) -> None:
    _, token = agent.issue("providers")
    n, rows = len(agent.fakes.requests()), len(agent.calls())
    with agent.client() as c:
        r = c.post(f"https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent"
                   f"?alt=sse&key={token}", json={"contents": [{"parts": [{"text": "hi"}]}]})
        assert r.status_code == 200 and r.text.count("data: ") == 12
        bad = c.post("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
                     f"?key={GEMINI_KEY}", json={"contents": []})
    assert bad.status_code == 403 and bad.headers["x-spendgate-reason"] == "raw_credential"
    sent = seen_since(agent, n)
    assert len(sent) == 1 and sent[0]["query"] == f"alt=sse&key={GEMINI_KEY}"
    rows_now = agent.calls(rows + 2)
    assert rows_now[rows]["cost_status"] == "parsed"
    assert rows_now[rows + 1]["reason"] == "raw_credential"
    no_secret_anywhere(agent)


def test_openai_sdk_against_compatible_providers(agent: Gateway) -> None:
    import openai

    _, token = agent.issue("providers")
    n, rows = len(agent.fakes.requests()), len(agent.calls())
    msg = [{"role": "user", "content": "hi"}]
    router = openai.OpenAI(api_key=token, base_url="https://openrouter.ai/api/v1", max_retries=0)
    router.chat.completions.create(model="openai/gpt-4o-mini", max_tokens=5, messages=msg)
    mistral = openai.OpenAI(api_key=token, base_url="https://api.mistral.ai/v1", max_retries=0)
    mistral.chat.completions.create(model="mistral-small-latest", max_tokens=5, messages=msg)
    deepseek = openai.OpenAI(api_key=token, base_url="https://api.deepseek.com", max_retries=0)
    deepseek.chat.completions.create(model="deepseek-chat", max_tokens=5, messages=msg)
    groq = openai.OpenAI(api_key=token, base_url="https://api.groq.com/openai/v1", max_retries=0)
    stream = groq.chat.completions.create(model="llama-3.3-70b-versatile", max_tokens=5, messages=msg,
                                          stream=True, stream_options={"include_usage": True})
    assert sum(1 for _ in stream) > 1
    with pytest.raises(openai.PermissionDeniedError) as e:
        mistral.chat.completions.create(model="mistral-large-latest", max_tokens=5, messages=msg)
    assert e.value.body["code"] == "model_not_allowed"  # type: ignore[index]
    sent = seen_since(agent, n)
    assert [header(s, "authorization") for s in sent] == [
        f"Bearer {OPENROUTER_KEY}", f"Bearer {MISTRAL_KEY}", f"Bearer {MISTRAL_KEY}", f"Bearer {MISTRAL_KEY}"]
    got = agent.calls(rows + 5)[rows:]
    assert [r["vendor"] for r in got] == ["openrouter", "mistral", "deepseek", "groq", "mistral"]
    router_row = got[0]
    assert router_row["cost_status"] == "parsed" and "reported by openrouter" in router_row["note"]
    usage = json.loads(sent[0]["body"])  # the request; the fake charged $1/M prompt + $2/M completion
    assert usage["model"] == "openai/gpt-4o-mini"
    assert Decimal(router_row["cost_usd"]) < Decimal("0.001")
    assert got[2]["cost_status"] == "parsed" and got[3]["cost_status"] == "parsed"
    assert got[4]["reason"] == "model_not_allowed"
    no_secret_anywhere(agent)


# --------------------------------------------------------------------------- MCP tool calls


def mcp_session(agent: Gateway, token: str, path: str, body):  # noqa: ANN001, ANN201
    """Run ``body(client)`` in an official MCP SDK client session through the proxy."""
    import asyncio

    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    async def main():  # noqa: ANN202
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=15)
        async with http, Client(streamable_http_client(f"https://mcp.tools.example{path}", http_client=http)) as c:
            return await body(c)

    return asyncio.run(main())


@pytest.mark.parametrize("path", ["/mcp", "/mcp/sse"])
def test_mcp_sdk_tools_filtered_priced_and_refused(agent: Gateway, path: str) -> None:
    from mcp.shared.exceptions import MCPError

    key_id, token = agent.issue("tools")
    n, rows = len(agent.fakes.requests()), len(agent.calls())

    async def session(c):  # noqa: ANN001, ANN202
        listed = [t.name for t in (await c.list_tools()).tools]
        search = await c.call_tool("web_search", {"q": "spendgate"})
        paid = await c.call_tool("paid_lookup", {"q": "x"})
        eu = await c.call_tool("eu_lookup", {"q": "x"})
        flaky = await c.call_tool("flaky", {})
        errors = {}
        for tool in ("delete_index", "send_email", "web_search", "web_search"):
            try:
                await c.call_tool(tool, {})
            except MCPError as e:
                errors.setdefault(tool, []).append((e.error.code, e.error.data, e.error.message))
        return listed, search, paid, eu, flaky, errors

    listed, search, paid, eu, flaky, errors = mcp_session(agent, token, path, session)
    assert listed == ["web_search", "paid_lookup", "eu_lookup", "send_email", "flaky"]  # delete_index hidden
    assert "ok" in search.content[0].text and flaky.is_error
    assert errors["delete_index"][0][1]["code"] == "tool_not_allowed"
    assert errors["delete_index"][0][0] == -32001 and "denied by 'delete_*'" in errors["delete_index"][0][2]
    assert errors["send_email"][0][1]["code"] == "approval_timeout"  # nobody approved within 1s
    assert [e[1]["code"] for e in errors["web_search"]] == ["rate_limited"]  # the 3rd within a minute
    sent = seen_since(agent, n)
    assert all(header(s, "authorization") == f"Bearer {MCP_TOKEN}" for s in sent)
    calls = [json.loads(s["body"]) for s in sent if s["method"] == "POST"]
    tools_sent = [c["params"]["name"] for c in calls if c.get("method") == "tools/call"]
    assert tools_sent == ["web_search", "paid_lookup", "eu_lookup", "flaky", "web_search"]  # refused ones never left
    session_ids = {header(s, "mcp-session-id") for s in sent[1:]} - {None}
    assert len(session_ids) == 1  # the session header went back and forth untouched
    got = [r for r in agent.calls(rows + 12)[rows:] if r["tool"]]
    by_tool = [(r["tool"], r["decision"], r["reason"], r["cost_usd"]) for r in got]
    assert by_tool == [
        ("web_search", "allow", None, "0.01"),
        ("paid_lookup", "allow", None, "0.0042"),  # the server's own _meta cost
        ("eu_lookup", "allow", None, "2.2"),  # _meta.cost 2 EUR at fx 1.10
        ("flaky", "allow", None, "0.02"),  # the tool ran (isError): billed
        ("delete_index", "deny", "tool_not_allowed", None),
        ("send_email", "deny", "approval_timeout", None),
        ("web_search", "allow", None, "0.01"),
        ("web_search", "deny", "rate_limited", None),
    ]
    assert all(r["key_id"] == key_id and r["vendor"] == "search-mcp" for r in got)
    listing = [r for r in agent.calls()[rows:] if "tools/list" in (r["note"] or "")]
    assert listing and "1 tool(s) hidden" in listing[0]["note"]
    no_secret_anywhere(agent)


def test_mcp_batch_refused_as_json_rpc_errors_and_report_mode(agent: Gateway) -> None:
    _, token = agent.issue("tools")
    _, shadow = agent.issue("tools-shadow")
    n, rows = len(agent.fakes.requests()), len(agent.calls())
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "web_search", "arguments": {}}},
             {"jsonrpc": "2.0", "id": "b", "method": "tools/call", "params": {"name": "delete_index"}},
             {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}]
    with agent.client() as c:
        r = c.post("https://mcp.tools.example/mcp", json=batch, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 403 and r.headers["x-spendgate-reason"] == "tool_not_allowed"
        errs = r.json()
        assert [(e["id"], e["error"]["data"]["code"]) for e in errs] == [(1, "tool_not_allowed"), ("b", "tool_not_allowed")]
        assert seen_since(agent, n) == []
        ping = c.post("https://mcp.tools.example/mcp", headers={"Authorization": f"Bearer {token}"},
                      json={"jsonrpc": "2.0", "id": 7, "method": "ping"})
        assert ping.json() == {"jsonrpc": "2.0", "id": 7, "result": {}}
        shadow_call = c.post("https://mcp.tools.example/mcp", headers={"Authorization": f"Bearer {shadow}"},
                             json={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "delete_index"}})
        assert shadow_call.status_code == 200 and "result" in shadow_call.json()  # report-only: forwarded
        listed = c.post("https://mcp.tools.example/mcp", headers={"Authorization": f"Bearer {shadow}"},
                        json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
        assert len(listed.json()["result"]["tools"]) == 6  # report-only: nothing hidden
    got = agent.calls(rows + 4)[rows:]
    assert [(r["tool"], r["decision"], r["reason"]) for r in got] == [
        ("web_search,delete_index", "deny", "tool_not_allowed"), (None, "allow", None),
        ("delete_index", "would_deny", "tool_not_allowed"), (None, "allow", None)]
    report = json.loads(agent.cli("report", "--by", "tool", "--json").stdout)
    assert {r["tool"] for r in report} >= {"web_search", "paid_lookup", "delete_index"}


def test_anthropic_sdk_against_a_declared_anthropic_compatible_provider(agent: Gateway) -> None:
    import anthropic

    _, token = agent.issue("providers")
    n, rows = len(agent.fakes.requests()), len(agent.calls())
    client = anthropic.Anthropic(api_key=token, base_url="https://api.kimi.example", max_retries=0)
    msg = client.messages.create(model="kimi-k2", max_tokens=500, messages=[{"role": "user", "content": "hi"}])
    sent = seen_since(agent, n)
    assert len(sent) == 1 and header(sent[0], "x-api-key") == MISTRAL_KEY
    assert json.loads(sent[0]["body"])["max_tokens"] == 32  # clamped: model rules apply to declared LLMs
    row = agent.last_call(rows)
    assert (row["vendor"], row["model"], row["cost_status"]) == ("kimi", "kimi-k2", "parsed")
    usage = msg.usage
    expect = (Decimal(usage.input_tokens) * Decimal("0.6") + Decimal(usage.output_tokens) * Decimal("2.5")) / 10**6
    assert Decimal(row["cost_usd"]) == expect
    no_secret_anywhere(agent)


# --------------------------------------------------------------------------- circuit breaker


def test_circuit_opens_refuses_without_reaching_the_vendor_then_probes(agent: Gateway) -> None:
    import time

    import openai
    from mitmproxy import io

    _, token = agent.issue("flaky")
    client = openai.OpenAI(api_key=token, max_retries=0)
    n, rows = len(agent.fakes.requests()), len(agent.calls())
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            client.embeddings.create(model="text-embedding-3-small", input="x",
                                     extra_headers={"X-Fake-Status": "500"})
    with pytest.raises(openai.APIStatusError) as e:
        client.embeddings.create(model="text-embedding-3-small", input="x")
    assert e.value.status_code == 503 and e.value.body["code"] == "circuit_open"  # type: ignore[index]
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 2
    assert len(seen_since(agent, n)) == 2  # the refused call never reached the vendor
    time.sleep(2.1)
    assert client.embeddings.create(model="text-embedding-3-small", input="x").data is not None  # the probe
    got = agent.calls(rows + 4)[rows:]
    assert [(r["status"], r["reason"]) for r in got] == [(500, None), (500, None), (503, "circuit_open"), (200, None)]
    assert "circuit opened for 2s after 2 failures" in got[1]["note"]
    assert "circuit closed" in got[3]["note"]
    agent.stop()  # the flow file is complete once the gateway stops (this test runs last in the module)
    with open(agent.flows, "rb") as f:
        comments = [fl.comment for fl in io.FlowReader(f).stream() if getattr(fl, "comment", "")]
    assert any("circuit opened" in c for c in comments) and any("DENY · circuit_open" in c for c in comments)
