"""Vendors declared in YAML (``vendors: {name: {hosts: …}}``): credential placement, pricing, MCP
tool rules, and file:line: field errors for every new field. In process (``spendgate.pipeline``)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest

from spendgate.pipeline import Pipeline, response, vendor_flow
from spendgate.policy import ConfigError, load_config, parse_config
from spendgate.vendors import BUILT_IN, REGISTRY

ROOT = Path(__file__).resolve().parents[1]

POLICY = """\
version: 1
vendors:
  search:
    hosts: [api.search.example]
    secret: env:OPENAI_API_KEY
    credential: {header: X-Subscription-Token}
    raw_credential: "^SRCH[A-Za-z0-9]{20,}$"
    price:
      per_call_usd: {"GET /res/v1/web/search": 0.005, "GET /res/v1/images/**": 0.01}
  scraper:
    hosts: [api.scrape.example]
    secret: env:ANTHROPIC_API_KEY
    credential: {header: Authorization, format: "Bearer {secret}"}
    price:
      per_call_usd: {"POST /v1/scrape": 0.002}
      response_field: {path: data.creditsUsed, unit: 0.001, currency: EUR}
  serp:
    hosts: [serp.example]
    secret: env:STRIPE_SECRET_KEY
    credential: {query: api_key}
    price:
      response_header: {name: x-cost-cents, unit: 0.01}
  basicapi:
    hosts: ["*.basic.example"]
    secret: env:RESEND_API_KEY
    credential: {basic: {user: "{secret}", password: ""}}
    price: {per_call_usd: {"GET /v1/**": 0}}
  llm:
    compatible: openai
    hosts: [llm.internal.example]
    secret: env:OPENAI_API_KEY
fx: {EUR: 1.1}
prices:
  llm:
    models: {house-model: {input: 1.0, output: 2.0, max_output: 1000}}
policies:
  agent:
    vendors:
      search: {allow: ["GET /res/v1/**"]}
      scraper: {allow: ["POST /v1/scrape"], max_request_usd: 1, default_estimate_usd: 0.5}
      serp: {allow: ["GET /search"], default_estimate_usd: 0.02}   # priced from the answer: hold this
      basicapi: {allow: ["GET /**"]}
      llm: {allow: ["POST /v1/chat/completions"], max_output_tokens: 500}
    budget: {key_usd: 5}
"""


@pytest.fixture
def pipe(pipeline: Callable[..., Pipeline]) -> Pipeline:
    return pipeline(POLICY)


def header(req, name: str) -> str | None:  # noqa: ANN001
    return req.headers.get(name)


def test_header_credential_and_per_call_price(pipe: Pipeline) -> None:
    token = pipe.issue_key("agent")
    out = pipe.run(vendor_flow("GET", "https://api.search.example/res/v1/web/search?q=x",
                               {"X-Subscription-Token": token}), response(200, "{}"))
    assert out.status == 200 and out.forwarded is not None
    assert header(out.forwarded, "X-Subscription-Token") == "sk-proj-REALopenaiSECRETdoNotLeak0000"
    assert (out.row["vendor"], out.row["cost_status"], out.row["cost_usd"]) == ("search", "parsed", "0.005")
    assert "vk_" not in str(out.forwarded.headers) and token not in out.flow.request.path
    assert pipe.run(vendor_flow("GET", "https://api.search.example/res/v1/web/search",
                                {"X-Subscription-Token": "SRCH" + "a" * 24})).reason == "raw_credential"
    assert pipe.run(vendor_flow("GET", "https://api.search.example/other", {"X-Vault-Key": token})).reason == \
        "endpoint_not_allowed"


def test_response_field_in_a_currency(pipe: Pipeline) -> None:
    token = pipe.issue_key("agent")
    out = pipe.run(vendor_flow("POST", "https://api.scrape.example/v1/scrape", {"Authorization": f"Bearer {token}"},
                               '{"url": "https://x"}'), response(200, json.dumps({"data": {"creditsUsed": 5}})))
    assert out.forwarded.headers["authorization"] == "Bearer sk-ant-api03-REALanthropicSECRETdoNotLeak"
    assert out.row["estimated_usd"] == "0.002"
    assert (out.row["cost_status"], Decimal(out.row["cost_usd"])) == ("parsed", Decimal("0.0055"))  # 5 × €0.001 × 1.1
    junk = pipe.run(vendor_flow("POST", "https://api.scrape.example/v1/scrape", {"X-Vault-Key": token}, "{}"),
                    response(200, '{"data": {}}'))
    assert junk.row["cost_status"] == "unknown" and junk.row["flagged"] == 1  # counted at the estimate


def test_query_credential_is_on_the_wire_only_and_header_price(pipe: Pipeline) -> None:
    token = pipe.issue_key("agent")
    out = pipe.run(vendor_flow("GET", f"https://serp.example/search?q=cats&api_key={token}"),
                   response(200, "{}", {"x-cost-cents": "150"}))
    assert out.status == 200
    assert out.forwarded.path == "/search?q=cats&api_key=sk_test_51REALstripeSECRETdoNotLeak0000"
    assert "REAL" not in out.flow.request.path and token not in out.flow.request.path  # the flow: a placeholder
    assert not any(k.lower().startswith("x-spendgate-query") for k in out.forwarded.headers)
    assert (out.row["cost_status"], Decimal(out.row["cost_usd"])) == ("parsed", Decimal("1.5"))
    # X-Vault-Key works too, and the real key still goes in the query (the vendor takes it there only)
    out = pipe.run(vendor_flow("GET", "https://serp.example/search?q=dogs", {"X-Vault-Key": token}),
                   response(200, "{}", {"x-cost-cents": "1"}))
    assert out.forwarded.path.endswith("&api_key=sk_test_51REALstripeSECRETdoNotLeak0000")


def test_basic_credential_and_wildcard_host(pipe: Pipeline) -> None:
    token = pipe.issue_key("agent")
    out = pipe.run(vendor_flow("GET", "https://eu.basic.example/v1/things", {"X-Vault-Key": token}),
                   response(200, "{}"))
    want = base64.b64encode(b"re_REALresendSECRETdoNotLeak:").decode()
    assert out.forwarded.headers["authorization"] == f"Basic {want}"
    assert (out.row["vendor"], out.row["cost_usd"]) == ("basicapi", "0")


def test_compatible_declared_llm_priced_from_the_policy_table(pipe: Pipeline) -> None:
    token = pipe.issue_key("agent")
    body = json.dumps({"model": "house-model", "max_tokens": 100, "messages": []})
    out = pipe.run(vendor_flow("POST", "https://llm.internal.example/v1/chat/completions",
                               {"Authorization": f"Bearer {token}"}, body),
                   response(200, json.dumps({"model": "house-model", "usage": {"prompt_tokens": 1000,
                                                                               "completion_tokens": 500}})))
    assert (out.row["model"], out.row["cost_status"], out.row["cost_usd"]) == ("house-model", "parsed", "0.002")
    over = pipe.run(vendor_flow("POST", "https://llm.internal.example/v1/chat/completions",
                                {"Authorization": f"Bearer {token}"},
                                json.dumps({"model": "house-model", "max_tokens": 501})))
    assert over.reason == "output_limit_exceeded"


def test_declared_vendors_are_installed_and_removed_with_the_policy(pipe: Pipeline) -> None:
    assert {"search", "scraper", "serp", "basicapi", "llm"} <= set(REGISTRY)
    from spendgate.vendors import install_declared

    install_declared({})
    assert set(REGISTRY) == set(BUILT_IN)
    install_declared(pipe.runtime.state.config.declared_vendors)


def test_shipped_tool_api_examples_check(monkeypatch: pytest.MonkeyPatch) -> None:
    for path in sorted((ROOT / "policies").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.version == 1
    tools = load_config(ROOT / "policies" / "tool-apis.yaml")
    declared = tools.declared_vendors
    assert {"brave-search", "firecrawl"} <= set(declared)


# --------------------------------------------------------------------------- errors: file:line: field

BASE = "version: 1\nvendors:\n  thing:\n    secret: env:X\n"


@pytest.mark.parametrize(("extra", "line", "field", "msg"), [
    ("", 3, "vendors.thing", "to declare one, give its hosts"),
    ("    hosts: []\n", 5, "vendors.thing.hosts", "at least 1"),
    ("    hosts: [api.stripe.com]\n", 5, "vendors.thing.hosts", "already served by stripe"),
    ("    hosts: ['http://x.example']\n", 5, "vendors.thing.hosts[0]", "not a host name"),
    ("    hosts: [x.example]\n    credential: {header: X-K, query: k}\n", 6, "vendors.thing.credential",
     "exactly one of header, query or basic"),
    ("    hosts: [x.example]\n    credential: {header: X-K, format: Bearer}\n", 6, "vendors.thing.credential",
     "{secret}"),
    ("    hosts: [x.example]\n    raw_credential: '[unclosed'\n", 6, "vendors.thing.raw_credential",
     "not a regular expression"),
    ("    hosts: [x.example]\n    price: {per_call_usd: {'FETCH': 1}}\n", 6, "vendors.thing.price.per_call_usd",
     "METHOD /path"),
    ("    hosts: [x.example]\n    price: {per_call_usd: {'GET /a': -1}}\n", 6,
     "vendors.thing.price.per_call_usd.GET /a", "non-negative"),
    ("    hosts: [x.example]\n    price: {response_field: {unit: 2}}\n", 6, "vendors.thing.price", "needs path"),
    ("    hosts: [x.example]\n    price: {response_field: {path: a, currency: euro}}\n", 6,
     "vendors.thing.price.response_field.currency", "pattern"),
    ("    hosts: [x.example]\n    tools: {a: {per_call_usd: 1}}\n", 3, "vendors.thing", "needs kind: mcp"),
    ("    hosts: [x.example]\n    kind: mcp\n    tools: {a: {per_call_usd: x}}\n", 7,
     "vendors.thing.tools.a.per_call_usd", "amount"),
    ("    hosts: [x.example]\n    kind: ftp\n", 6, "vendors.thing.kind", "'http' or 'mcp'"),
])
def test_bad_declarations_name_file_line_field(extra: str, line: int, field: str, msg: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + extra, "v.yaml")
    assert any(p.line == line and p.field == field and msg in p.message for p in e.value.problems), \
        [str(p) for p in e.value.problems]


def test_builtin_cannot_be_redeclared_and_tools_need_an_mcp_vendor() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("version: 1\nvendors:\n  stripe: {secret: env:X, hosts: [x.example]}\n", "v.yaml")
    assert "v.yaml:3: vendors.stripe.hosts: stripe is built in" in str(e.value)
    text = ("version: 1\nvendors:\n  stripe: {secret: env:X}\npolicies:\n  p:\n    vendors:\n"
            "      stripe:\n        tools: {allow: [a]}\n")
    with pytest.raises(ConfigError) as e:
        parse_config(text, "v.yaml")
    assert "v.yaml:8: policies.p.vendors.stripe.tools: stripe is not an MCP server" in str(e.value)
    bad_rate = ("version: 1\nvendors:\n  m: {secret: env:X, hosts: [m.example], kind: mcp}\npolicies:\n  p:\n"
                "    vendors:\n      m:\n        tools: {rate: {a: often}}\n")
    with pytest.raises(ConfigError) as e:
        parse_config(bad_rate, "v.yaml")
    assert "v.yaml:8: policies.p.vendors.m.tools.rate.a: 'often' is not a rate" in str(e.value)


def test_sse_tool_lists_are_filtered_keeping_event_ids() -> None:
    from spendgate.policy import ToolRules
    from spendgate.stages.tools import Tools

    rules = ToolRules(allow=["a*"], deny=["ab"])
    msg = {"jsonrpc": "2.0", "id": 1, "result": {"tools": [{"name": "a1"}, {"name": "ab"}, {"name": "z"}]}}
    body = b"id: ev-7\r\nevent: message\r\ndata: " + json.dumps(msg).encode() + b"\r\n\r\n"
    out, hidden = Tools._filter_sse(body, rules)
    assert hidden == 2 and out.startswith(b"id: ev-7\r\nevent: message\r\ndata: ")
    assert [t["name"] for t in json.loads(out.split(b"data: ")[1])["result"]["tools"]] == ["a1"]
    split = b'data: {"jsonrpc": "2.0", "id": 1,\ndata: "result": {"tools": [{"name": "z"}, {"name": "a2"}]}}\n\n'
    out, hidden = Tools._filter_sse(split, rules)  # JSON over two data lines: re-serialised whole
    assert hidden == 1 and b'"a2"' in out and b'"z"' not in out
