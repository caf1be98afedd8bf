"""Model rules (``models: {allow, deny}``) and output ceilings (``max_output_tokens``, ``clamp``).

Pure table tests of where each API style names its model and limits, then the real addon
list in-process (refusals, clamps, report-only mode, ledger rows), then policy errors.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from spendgate.pipeline import Pipeline, response, vendor_flow
from spendgate.policy import ConfigError, parse_config
from spendgate.vendors import REGISTRY
from spendgate.vendors._models import ANTHROPIC, GEMINI, Ambiguous, gemini_target, openai_shape
from spendgate.vendors.base import RequestView

OPENAI = openai_shape()


def view(method: str, path: str, body: bytes | dict = b"", ctype: str = "application/json") -> RequestView:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return RequestView(method=method, path=path, headers={"content-type": ctype}, body=raw)


def multipart(fields: list[tuple[str, str]]) -> tuple[bytes, str]:
    b = "XyZbOuNdArY"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields]
    parts.append(f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 f"Content-Type: audio/wav\r\n\r\nRIFF....\r\n--{b}--\r\n")
    return "".join(parts).encode(), f"multipart/form-data; boundary={b}"


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(("shape", "req", "model"), [
    (OPENAI, view("POST", "/v1/chat/completions", {"model": "gpt-4o", "messages": []}), "gpt-4o"),
    (OPENAI, view("POST", "/v1/responses", {"model": "o3", "input": "x"}), "o3"),
    (OPENAI, view("GET", "/v1/models"), None),
    (OPENAI, view("POST", "/v1/audio/transcriptions", *multipart([("model", "whisper-1")])), "whisper-1"),
    (ANTHROPIC, view("POST", "/v1/messages", {"model": "claude-opus-4-1", "max_tokens": 5}), "claude-opus-4-1"),
    (GEMINI, view("POST", "/v1beta/models/gemini-2.5-pro:generateContent", {}), "gemini-2.5-pro"),
    (GEMINI, view("POST", "/v1beta/models/gemini-2.5-pro%3AstreamGenerateContent", {}), "gemini-2.5-pro"),
    (GEMINI, view("POST", "/v1beta/tunedModels/my-tune:generateContent", {}), "tunedModels/my-tune"),
])
def test_model_named_by_the_request(shape: object, req: RequestView, model: str | None) -> None:
    assert shape.model(req) == model  # type: ignore[attr-defined]


@pytest.mark.parametrize(("shape", "req"), [
    (OPENAI, view("POST", "/v1/chat/completions", b'{"model": "gpt-4o-mini", "model": "o1-pro"}')),
    (OPENAI, view("POST", "/v1/chat/completions", {"model": ["gpt-4o"]})),
    (OPENAI, view("POST", "/v1/audio/transcriptions",
                  *multipart([("model", "whisper-1"), ("model", "gpt-4o-transcribe")]))),
    (ANTHROPIC, view("POST", "/v1/messages", b'{"model": "a", "messages": [], "model": "b"}')),
])
def test_ambiguous_model_raises(shape: object, req: RequestView) -> None:
    with pytest.raises(Ambiguous):
        shape.model(req)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("shape", "req", "limits"), [
    (OPENAI, view("POST", "/v1/chat/completions", {"model": "gpt-4o", "max_tokens": 50}), [50]),
    (OPENAI, view("POST", "/v1/chat/completions", {"max_tokens": 50, "max_completion_tokens": 900}), [900, 50]),
    (OPENAI, view("POST", "/v1/responses", {"max_output_tokens": 7}), [7]),
    (OPENAI, view("POST", "/v1/chat/completions", {"model": "gpt-4o"}), []),
    (OPENAI, view("POST", "/v1/embeddings", {"model": "x", "max_tokens": 5}), []),
    (ANTHROPIC, view("POST", "/v1/messages", {"max_tokens": 64}), [64]),
    (ANTHROPIC, view("POST", "/v1/messages/count_tokens", {"max_tokens": 64}), []),
    (GEMINI, view("POST", "/v1beta/models/g:generateContent", {"generationConfig": {"maxOutputTokens": 8}}), [8]),
    (GEMINI, view("POST", "/v1beta/models/g:countTokens", {"generationConfig": {"maxOutputTokens": 8}}), []),
])
def test_limits_the_request_sets(shape: object, req: RequestView, limits: list[int]) -> None:
    assert [lim.value for lim in shape.limits(req)] == limits  # type: ignore[attr-defined]


def test_limit_that_is_not_a_number_is_ambiguous() -> None:
    with pytest.raises(Ambiguous):
        OPENAI.limits(view("POST", "/v1/chat/completions", {"max_tokens": "lots"}))


def test_default_output_is_the_models_maximum_else_the_tables_default() -> None:
    table = REGISTRY["openai"].prices
    assert OPENAI.default_output(view("POST", "/v1/chat/completions", {"model": "gpt-4o"}), table) == 16384
    assert OPENAI.default_output(view("POST", "/v1/chat/completions", {"model": "new-model-x"}), table) == \
        table["default_max_output_tokens"]


@pytest.mark.parametrize(("shape", "req", "field", "expect"), [
    (OPENAI, view("POST", "/v1/chat/completions", {"model": "m", "max_tokens": 5000}), "max_tokens", 100),
    (OPENAI, view("POST", "/v1/chat/completions", {"model": "m"}), "max_completion_tokens", 100),
    (openai_shape("max_tokens"), view("POST", "/v1/chat/completions", {"model": "m"}), "max_tokens", 100),
    (OPENAI, view("POST", "/v1/responses", {"model": "m"}), "max_output_tokens", 100),
    (ANTHROPIC, view("POST", "/v1/messages", {"model": "m", "max_tokens": 9000}), "max_tokens", 100),
])
def test_clamp_writes_the_ceiling(shape: object, req: RequestView, field: str, expect: int) -> None:
    out = json.loads(shape.clamped(req, 100))  # type: ignore[attr-defined]
    assert out[field] == expect
    assert out["model"] == "m"


def test_clamp_gemini_nested_and_keeps_smaller_limits() -> None:
    req = view("POST", "/v1beta/models/g:generateContent", {"contents": [], "generationConfig": {"temperature": 1}})
    assert json.loads(GEMINI.clamped(req, 64))["generationConfig"] == {"temperature": 1, "maxOutputTokens": 64}
    both = view("POST", "/v1/chat/completions", {"max_tokens": 10, "max_completion_tokens": 500})
    assert json.loads(OPENAI.clamped(both, 100)) == {"max_tokens": 10, "max_completion_tokens": 100}


def test_gemini_target_decodes_the_colon() -> None:
    assert gemini_target("/v1beta/models/gemini-2.0-flash:streamGenerateContent") == (
        "gemini-2.0-flash", "streamGenerateContent")
    assert gemini_target("/v1beta/files") == (None, None)


# --------------------------------------------------------------------------- in-process pipeline

POLICY = """\
version: 1
vendors:
  openai: {secret: env:OPENAI_API_KEY}
  anthropic: {secret: env:ANTHROPIC_API_KEY}
policies:
  strict:
    vendors:
      openai:
        allow: ["POST /v1/chat/completions", "POST /v1/responses", "POST /v1/audio/transcriptions"]
        models: {allow: ["gpt-4o-mini*", "gpt-4.1-*", "whisper-1"], deny: ["gpt-4.1-nano"]}
        max_output_tokens: 1000
      anthropic:
        allow: ["POST /v1/messages"]
        models: {deny: ["claude-opus-*"]}
        max_output_tokens: 256
        clamp: true
    budget: {key_usd: 100}
  shadow:
    mode: report
    vendors:
      openai:
        allow: ["POST /v1/chat/completions"]
        models: {allow: ["gpt-4o-mini"]}
        max_output_tokens: 100
        clamp: true
"""
OK_CHAT = response(200, json.dumps({"model": "gpt-4o-mini-2024-07-18", "choices": [],
                                    "usage": {"prompt_tokens": 10, "completion_tokens": 5}}))


@pytest.fixture
def pipe(pipeline: Callable[..., Pipeline]) -> Pipeline:
    return pipeline(POLICY)


def chat(token: str, body: dict | bytes, path: str = "/v1/chat/completions", host: str = "api.openai.com",
         ctype: str = "application/json"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return vendor_flow("POST", f"https://{host}{path}", {"Authorization": f"Bearer {token}", "Content-Type": ctype},
                       raw)


def messages(token: str, body: dict):
    return vendor_flow("POST", "https://api.anthropic.com/v1/messages",
                       {"x-api-key": token, "Content-Type": "application/json"}, json.dumps(body))


@pytest.mark.parametrize(("body", "code"), [
    ({"model": "gpt-4o-mini", "max_tokens": 50}, None),
    ({"model": "GPT-4o-mini-2024-07-18", "max_tokens": 50}, None),  # globs ignore case
    ({"model": "gpt-4.1-mini", "max_completion_tokens": 1000}, None),
    ({"model": "o1-pro", "max_tokens": 50}, "model_not_allowed"),  # not in allow
    ({"model": "gpt-4.1-nano", "max_tokens": 50}, "model_not_allowed"),  # deny wins
    ({"model": "gpt-4o-mini", "max_tokens": 1001}, "output_limit_exceeded"),
    ({"model": "gpt-4o-mini"}, "output_limit_exceeded"),  # no limit: the default 16384 is larger
    ({"model": "gpt-4o-mini", "max_tokens": 10, "max_completion_tokens": 5000}, "output_limit_exceeded"),
])
def test_openai_decisions(pipe: Pipeline, body: dict, code: str | None) -> None:
    out = pipe.run(chat(pipe.issue_key("strict"), body), OK_CHAT)
    assert out.reason == code
    assert out.refused == bool(code)
    if code:
        assert out.status == 403
        err = json.loads(out.flow.response.content)["error"]
        assert err["code"] == code and err["type"] == "spendgate_error" and err["policy"] == "strict"


def test_duplicate_model_key_is_refused(pipe: Pipeline) -> None:
    out = pipe.run(chat(pipe.issue_key("strict"), b'{"model": "gpt-4o-mini", "max_tokens": 5, "model": "o1-pro"}'))
    assert out.reason == "model_not_allowed" and out.refused


def test_multipart_model_is_checked(pipe: Pipeline) -> None:
    token = pipe.issue_key("strict")
    body, ctype = multipart([("model", "gpt-4o-transcribe")])
    assert pipe.run(chat(token, body, "/v1/audio/transcriptions", ctype=ctype)).reason == "model_not_allowed"
    body, ctype = multipart([("model", "whisper-1")])
    out = pipe.run(chat(token, body, "/v1/audio/transcriptions", ctype=ctype), response(200, '{"text": "hi"}'))
    assert out.status == 200 and out.row["model"] == "whisper-1"


def test_clamp_rewrites_and_the_estimate_uses_the_ceiling(pipe: Pipeline) -> None:
    token = pipe.issue_key("strict")
    answer = response(200, json.dumps({"model": "claude-sonnet-4-5", "usage": {"input_tokens": 5, "output_tokens": 5}}))
    big = pipe.run(messages(token, {"model": "claude-sonnet-4-5", "max_tokens": 64000, "messages": []}), answer)
    assert big.status == 200
    assert json.loads(big.forwarded.content)["max_tokens"] == 256  # what the vendor got
    assert "256 output tokens" in big.call.estimate.basis
    assert big.row["model"] == "claude-sonnet-4-5"
    assert "clamped max_tokens=64000 to 256" in big.row["note"]
    assert "clamped max_tokens=64000 to 256" in big.flow.comment
    small = pipe.run(messages(token, {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": []}), answer)
    assert json.loads(small.forwarded.content)["max_tokens"] == 10 and "clamped" not in small.row["note"]
    denied = pipe.run(messages(token, {"model": "claude-opus-4-1", "max_tokens": 10, "messages": []}))
    assert denied.reason == "model_not_allowed"


def test_report_mode_records_would_deny_and_changes_nothing(pipe: Pipeline) -> None:
    body = {"model": "o1-pro", "max_tokens": 5000, "messages": []}
    out = pipe.run(chat(pipe.issue_key("shadow"), body), OK_CHAT)
    assert out.status == 200
    assert json.loads(out.forwarded.content) == body  # not clamped in report-only mode
    assert [d.code for d in out.call.would_deny] == ["model_not_allowed", "output_limit_exceeded"]
    assert (out.row["decision"], out.row["reason"], out.row["model"]) == ("would_deny", "model_not_allowed", "o1-pro")


def test_ledger_has_the_model_and_the_refusal(pipe: Pipeline) -> None:
    token = pipe.issue_key("strict")
    ok = pipe.run(chat(token, {"model": "gpt-4o-mini", "max_tokens": 5, "messages": []}), OK_CHAT)
    no = pipe.run(chat(token, {"model": "o1-pro", "max_tokens": 5}))
    assert [(r.row["decision"], r.row["reason"], r.row["model"], r.row["status"]) for r in (ok, no)] == [
        ("allow", None, "gpt-4o-mini", 200), ("deny", "model_not_allowed", "o1-pro", 403)]
    pipe.flush()
    from spendgate import reports

    by_model = {r["model"]: r for r in reports.spend(str(pipe.runtime.store.path), by="model")}
    assert by_model["o1-pro"]["refused"] == 1 and by_model["gpt-4o-mini"]["allowed"] == 1
    assert by_model["gpt-4o-mini"]["spend_usd"] != "0"


# --------------------------------------------------------------------------- policy errors

BASE = "version: 1\nvendors:\n  openai: {secret: env:X}\n  stripe: {secret: env:Y}\npolicies:\n  p:\n    vendors:\n"


@pytest.mark.parametrize(("rules", "line", "field", "msg"), [
    ("      openai: {clamp: true}\n", 8, "policies.p.vendors.openai", "clamp: true needs max_output_tokens"),
    ("      openai: {max_output_tokens: 0}\n", 8, "policies.p.vendors.openai.max_output_tokens", "greater than"),
    ("      openai: {max_output_tokens: lots}\n", 8, "policies.p.vendors.openai.max_output_tokens", "integer"),
    ("      openai:\n        models: {allow: [3]}\n", 9, "policies.p.vendors.openai.models.allow[0]", "glob"),
    ("      openai:\n        models: {alow: [x]}\n", 9, "policies.p.vendors.openai.models.alow", "unknown field"),
    ("      stripe:\n        models: {allow: [x]}\n", 9, "policies.p.vendors.stripe.models", "not an LLM vendor"),
    ("      stripe: {max_output_tokens: 5}\n", 8, "policies.p.vendors.stripe.max_output_tokens", "not an LLM vendor"),
])
def test_bad_model_rules_name_file_line_field(rules: str, line: int, field: str, msg: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(BASE + rules, "p.yaml")
    problems = e.value.problems
    assert any(p.line == line and p.field == field and msg in p.message for p in problems), \
        [str(p) for p in problems]
    assert str(problems[0]).startswith(f"p.yaml:{problems[0].line}: ")
