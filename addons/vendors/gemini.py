"""Google Gemini API: generativelanguage.googleapis.com; cost = ``usageMetadata`` × per-model prices.

Prices come from ``prices/gemini.yaml`` (policy ``prices: {gemini: …}`` overrides).

- Key: the ``x-goog-api-key`` header (what the google-genai SDK sends) or the ``?key=`` query
  parameter (REST samples, curl). Both are credential slots: a vault key in ``?key=`` is read
  there, taken out of the flow, and the real key is written into the URL **on the wire
  only** (``stages/querykey.py`` and ``wire.py``); a key sent in the header goes out in the header.
- Model: the path (``/v1beta/models/gemini-2.5-flash:generateContent``); the response's
  ``modelVersion`` when present.
- Usage: ``promptTokenCount`` INCLUDES ``cachedContentTokenCount`` (billed at the cached
  rate, the rest at the input rate); ``thoughtsTokenCount`` (thinking) is billed as output on
  top of ``candidatesTokenCount``; ``toolUsePromptTokenCount`` as input. Prompts above 200K
  tokens on the Pro models are billed at the long-context rates.
- Estimate: input from the body size + ``generationConfig.maxOutputTokens`` (thinking counts
  against it), else the model's maximum output. ``countTokens`` and other reads are free;
  ``embedContent``/``batchEmbedContents`` are input tokens at the embedding rate;
  ``batchGenerateContent`` is "moves money, amount unknown" (the policy default applies).
- Streams: ``streamGenerateContent?alt=sse`` sends one GenerateContentResponse per event,
  each with the usage so far; the last one counts. Without ``alt=sse`` the stream is one JSON
  array (not SSE): the array's last usage counts. No usage → the estimate, flagged.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from . import _llm
from ._models import GEMINI, gemini_target
from ._sse import NULL, Event, EventMeter, Keys, forms_of, quiet
from .base import (
    NO_COST,
    Cost,
    Estimate,
    Prices,
    RequestView,
    ResponseView,
    StreamMeter,
    Vendor,
    load_prices,
)

_GENERATE = ("generateContent", "streamGenerateContent")
_EMBED = ("embedContent", "batchEmbedContents")


# Non-reads that bill nothing; any other POST this module does not price holds the policy default.
FREE = (
    "POST /*/models/*:countTokens", "POST /*/tunedModels/*:countTokens",
    "POST /upload/**", "POST /*/files", "POST /*/files/**",  # uploads (stored free for 48 h)
    "DELETE /**",
)


def _kind(req: RequestView) -> str | None:
    """"generate", "embed", "other" (billed, unmodelled) or None (free)."""
    if req.method.upper() != "POST":
        return None
    _, method = gemini_target(req.path)
    if method in _GENERATE:
        return "generate"
    if method in _EMBED:
        return "embed"
    if method == "batchGenerateContent":
        return "other"
    return None


def _table(prices: Prices) -> dict[str, Any]:
    return prices.table(VENDOR)


def _rates(prices: Prices, model: object) -> _llm.Rates:
    return _llm.lookup(_table(prices), model, cache_read_x=Decimal("0.25"))


def _model(req: RequestView) -> str | None:
    model, _ = gemini_target(req.path)
    return model


def _worst(req: RequestView, prices: Prices, kind: str) -> tuple[Decimal, str]:
    table = _table(prices)
    model = _model(req)
    rates = _rates(prices, model)
    in_tokens = _llm.input_guess(req.body, _llm.tokens(table.get("image_input_tokens")))
    r = rates.for_input(in_tokens)
    basis = f"{_llm.describe(rates, model)}: ~{in_tokens} input tokens (from body size)"
    if kind == "embed":
        return in_tokens * r.input / _llm.MILLION, basis
    body = req.json if isinstance(req.json, dict) else {}
    config = body.get("generationConfig")
    limit = _llm.opt_int(config.get("maxOutputTokens")) if isinstance(config, Mapping) else None
    note = "maxOutputTokens"
    if limit is None:
        limit = rates.max_output if rates.known and rates.max_output else (
            _llm.tokens(table.get("default_max_output_tokens")) or 65536)
        note = "no maxOutputTokens: model maximum"
    n = max(_llm.tokens(config.get("candidateCount")) if isinstance(config, Mapping) else 0, 1)
    usd = (in_tokens * r.input + n * limit * r.output) / _llm.MILLION
    return usd, f"{basis} + {n}×{limit} output tokens ({note})"


def _estimate(req: RequestView, prices: Prices) -> Estimate:
    kind = _kind(req)
    if kind is None:
        return NO_COST
    if kind == "other":
        return Estimate(usd=None, moves_money=True, basis="Gemini batch: billed as it runs, amount unknown")
    usd, basis = _worst(req, prices, kind)
    return Estimate(usd=usd, moves_money=True, currency="USD", amount=usd, basis=basis)


def _usage(u: Mapping[str, Any]) -> _llm.Usage:
    prompt = _llm.tokens(u.get("promptTokenCount")) + _llm.tokens(u.get("toolUsePromptTokenCount"))
    cached = min(_llm.tokens(u.get("cachedContentTokenCount")), prompt)
    output = _llm.tokens(u.get("candidatesTokenCount")) + _llm.tokens(u.get("thoughtsTokenCount"))
    return _llm.Usage(input=prompt - cached, cached=cached, output=output)


def _priced(usage: Mapping[str, Any], model: object, prices: Prices, extra: str = "") -> Cost:
    return _llm.usd_cost(_usage(usage), _rates(prices, model), model, extra=extra)


def _model_of(obj: Mapping[str, Any], req: RequestView) -> object:
    version = obj.get("modelVersion")
    return version if isinstance(version, str) and version else _model(req)


def _fallback(req: RequestView, prices: Prices, estimate: Estimate | None, why: str) -> Cost:
    usd = getattr(estimate, "usd", None)
    if not isinstance(usd, Decimal) and (kind := _kind(req)) in ("generate", "embed"):
        usd = _worst(req, prices, kind)[0]
    if not isinstance(usd, Decimal):
        return Cost("unknown", None, note=f"{why}; no estimate to fall back on")
    return Cost("estimated", usd, "USD", usd, f"{why}; counted at the estimate")


def _cost(req: RequestView, resp: ResponseView, prices: Prices, estimate: Estimate) -> Cost:
    body = resp.body
    if body.lstrip().startswith(b"data:"):  # an SSE body not announced as such
        meter = _Meter(req, prices, estimate)
        meter.feed(body)
        return meter.finish()
    kind = _kind(req)
    obj = resp.json
    if isinstance(obj, list):  # streamGenerateContent without alt=sse: a JSON array of chunks
        chunks = [c for c in obj if isinstance(c, Mapping)]
        obj = next((c for c in reversed(chunks) if isinstance(c.get("usageMetadata"), Mapping)),
                   chunks[-1] if chunks else None)
    if not isinstance(obj, Mapping):
        return Cost("zero", Decimal(0), note="endpoint not billed") if kind is None else Cost(
            "unknown", None, note="response is not JSON")
    usage = obj.get("usageMetadata")
    if isinstance(usage, Mapping) and kind == "generate":
        return _priced(usage, _model_of(obj, req), prices)
    if kind is None:
        return Cost("zero", Decimal(0), note="endpoint not billed")
    if kind == "embed":
        return _fallback(req, prices, estimate, "embeddings report no usage")
    if kind == "other":
        return Cost("unknown", None, note="Gemini batch: billed as it runs")
    feedback = obj.get("promptFeedback")
    if isinstance(feedback, Mapping) and feedback.get("blockReason"):
        return Cost("zero", Decimal(0), note=f"prompt blocked: {str(feedback['blockReason'])[:60]}")
    return _fallback(req, prices, estimate, "usageMetadata missing from response")


class _Meter(EventMeter):
    """Prices a ``streamGenerateContent?alt=sse`` stream: the latest usageMetadata counts."""

    def __init__(self, req: RequestView, prices: Prices, estimate: Estimate) -> None:
        super().__init__()
        self._req, self._prices, self._estimate = req, prices, estimate
        self._usage: Mapping[str, Any] | None = None
        self._model: object = None
        self._error: str | None = None
        self._chunks = 0
        self._keys = _keys(None)

    def _quiet(self, event: Event) -> bool:
        """Whether parsing this event could change nothing ``_on`` keeps: no usageMetadata, no
        error, ``modelVersion`` only as it already is. The first JSON chunk is always parsed
        (``_chunks`` tells an error before any output). Gemini may send usageMetadata in every
        chunk: those are all parsed (the latest counts)."""
        if event.truncated or self._chunks == 0:
            return False
        return quiet(event.raw, (b"\\u", b'"usageMetadata"'), self._keys)

    def _on(self, event: Event) -> None:
        if self._quiet(event):
            return
        obj = event.json()
        if not isinstance(obj, dict):
            return
        if isinstance(err := obj.get("error"), Mapping):
            self._error = self._error or str(err.get("status") or err.get("code") or "error")[:80]
            return
        self._chunks += 1
        if isinstance(usage := obj.get("usageMetadata"), Mapping):
            self._usage = usage
        if isinstance(version := obj.get("modelVersion"), str) and version and version != self._model:
            self._model = version
            self._keys = _keys(version)

    def _finish(self) -> Cost:
        model = self._model or _model(self._req)
        if self._usage is not None:
            extra = f"stream error after usage: {self._error}" if self._error else ""
            return _priced(self._usage, model, self._prices, extra)
        if self._error and self._chunks == 0:
            return Cost("zero", Decimal(0), note=f"stream error before any output: {self._error}")
        why = f"stream meter failed ({self._broken})" if self._broken else "no usageMetadata in stream"
        return _fallback(self._req, self._prices, self._estimate, why)


@functools.lru_cache(maxsize=64)
def _keys(version: str | None) -> Keys:
    """The keys a chunk may hold without being parsed: error null, modelVersion null, "" or the
    one already seen. (A \\u escape or usageMetadata: parsed.)"""
    return ((b'"error"', NULL), (b'"modelVersion"', (*NULL, *forms_of(""), *(forms_of(version) if version else ()))))


def stream_meter(req: RequestView, prices: Prices, estimate: Estimate) -> StreamMeter | None:
    return _Meter(req, prices, estimate) if _kind(req) == "generate" else None


VENDOR = Vendor(
    name="gemini",
    hosts=("generativelanguage.googleapis.com",),
    key_headers=("x-goog-api-key",),
    real_key=re.compile(r"^AIza[0-9A-Za-z_-]{30,}$"),
    credential_headers=lambda c: {"x-goog-api-key": c["secret"]},
    estimator=_estimate,
    free=FREE,
    parser=_cost,
    stream_meter=stream_meter,
    prices=load_prices("gemini"),
    llm=GEMINI,
    key_query={"key": "x-goog-api-key"},
)
