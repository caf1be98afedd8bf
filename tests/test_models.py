"""Model rules (``models: {allow, deny}``) and output ceilings (``max_output_tokens``, ``clamp``).

Pure table tests of where each API style names its model and limits, then the real addon
list in-process (refusals, clamps, report-only mode, ledger rows), then policy errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from inproc import Pipeline, make_flow, reason

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


@pytest.fixture
def pipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-proj-real")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-real")
    p = Pipeline(tmp_path, POLICY)
    with p.running():
        yield p


def chat(token: str, body: dict, path: str = "/v1/chat/completions", host: str = "api.openai.com"):
    return make_flow("POST", f"https://{host}{path}", headers={"Authorization": f"Bearer {token}"}, body=body)


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
    flow = pipe.run(chat(pipe.token("strict"), body))
    assert reason(flow) == code
    if code:
        assert flow.response.status_code == 403
        err = json.loads(flow.response.content)["error"]
        assert err["code"] == code and err["type"] == "spendgate_error" and err["policy"] == "strict"


def test_duplicate_model_key_is_refused(pipe: Pipeline) -> None:
    flow = make_flow("POST", "https://api.openai.com/v1/chat/completions",
                     headers={"Authorization": f"Bearer {pipe.token('strict')}", "Content-Type": "application/json"},
                     body=b'{"model": "gpt-4o-mini", "max_tokens": 5, "model": "o1-pro"}')
    assert reason(pipe.run(flow)) == "model_not_allowed"


def test_multipart_model_is_checked(pipe: Pipeline) -> None:
    body, ctype = multipart([("model", "gpt-4o-transcribe")])
    flow = make_flow("POST", "https://api.openai.com/v1/audio/transcriptions",
                     headers={"Authorization": f"Bearer {pipe.token('strict')}", "Content-Type": ctype}, body=body)
    assert reason(pipe.run(flow)) == "model_not_allowed"
    body, ctype = multipart([("model", "whisper-1")])
    flow = make_flow("POST", "https://api.openai.com/v1/audio/transcriptions",
                     headers={"Authorization": f"Bearer {pipe.token('strict')}", "Content-Type": ctype}, body=body)
    assert reason(pipe.run(flow)) is None


def test_clamp_rewrites_and_the_estimate_uses_the_ceiling(pipe: Pipeline) -> None:
    token = pipe.token("strict")
    big = pipe.run(make_flow("POST", "https://api.anthropic.com/v1/messages", headers={"x-api-key": token},
                             body={"model": "claude-sonnet-4-5", "max_tokens": 64000, "messages": []}))
    assert big.response is None
    assert json.loads(big.request.content)["max_tokens"] == 256
    call = pipe.call(big)
    assert "256 output tokens" in call.estimate.basis
    assert call.model == "claude-sonnet-4-5"
    assert any("clamped max_tokens=64000 to 256" in n for n in call.notes)
    small = pipe.run(make_flow("POST", "https://api.anthropic.com/v1/messages", headers={"x-api-key": token},
                               body={"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": []}))
    assert json.loads(small.request.content)["max_tokens"] == 10 and not pipe.call(small).notes
    denied = pipe.run(make_flow("POST", "https://api.anthropic.com/v1/messages", headers={"x-api-key": token},
                                body={"model": "claude-opus-4-1", "max_tokens": 10, "messages": []}))
    assert reason(denied) == "model_not_allowed"


def test_report_mode_records_would_deny_and_changes_nothing(pipe: Pipeline) -> None:
    token = pipe.token("shadow")
    body = {"model": "o1-pro", "max_tokens": 5000, "messages": []}
    flow = pipe.run(chat(token, body))
    assert flow.response is None  # forwarded
    assert json.loads(flow.request.content) == body  # not clamped in report-only mode
    call = pipe.call(flow)
    assert call.decision == "would_deny"
    assert [d.code for d in call.would_deny] == ["model_not_allowed", "output_limit_exceeded"]
    pipe.respond(flow, 200, {"model": "o1-pro", "usage": {"prompt_tokens": 5, "completion_tokens": 5}})
    row = pipe.rows()[-1]
    assert (row["decision"], row["reason"], row["model"]) == ("would_deny", "model_not_allowed", "o1-pro")


def test_ledger_has_the_model_and_the_refusal(pipe: Pipeline) -> None:
    token = pipe.token("strict")
    ok = pipe.run(chat(token, {"model": "gpt-4o-mini", "max_tokens": 5, "messages": []}))
    pipe.respond(ok, 200, {"model": "gpt-4o-mini-2024-07-18", "usage": {"prompt_tokens": 10, "completion_tokens": 5}})
    pipe.run(chat(token, {"model": "o1-pro", "max_tokens": 5}))
    rows = pipe.rows()
    assert [(r["decision"], r["reason"], r["model"], r["status"]) for r in rows[-2:]] == [
        ("allow", None, "gpt-4o-mini", 200), ("deny", "model_not_allowed", "o1-pro", 403)]
    from spendgate import reports

    by_model = {r["model"]: r for r in reports.spend(pipe.db, by="model")}
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
