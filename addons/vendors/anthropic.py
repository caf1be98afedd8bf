"""Anthropic: api.anthropic.com, key in ``x-api-key``; cost = token usage × per-model prices.

Prices come from ``prices/anthropic.yaml`` (policy ``prices: {anthropic: …}`` overrides).

- Usage: ``input_tokens`` EXCLUDES cache traffic. ``cache_creation_input_tokens``
  are billed at the cache-write rate (1.25× input for the 5-minute TTL, 2× for
  1 hour when the ``cache_creation`` breakdown says so; without a breakdown all
  writes count as 5-minute), ``cache_read_input_tokens`` at the read rate (0.1×).
  Server web searches (``server_tool_use.web_search_requests``) add $10/1000.
- Model: from the response (``claude-sonnet-4-5-20250929``), else the request;
  aliases (``claude-sonnet-4-5``) map to dated ids in the table.
- Estimate (worst case): input from the body size, at the cache-write rate when
  the request marks ``cache_control`` (a write costs more than plain input) +
  ``max_tokens`` (required by the API) output tokens.
- Streams: ``message_start.message.usage`` gives input, cache and an initial
  output count; ``message_delta.usage`` is CUMULATIVE, so its fields replace the
  ones seen before (absent fields keep their value) and are never added.
  An ``error`` event after ``message_start`` (or a stream cut before
  ``message_stop``): input is known, output is not → "estimated" = the known
  input + the estimate's worst-case output (never less than the output seen),
  flagged in the note. An error before ``message_start`` → "zero".
- Reconcile (``spendgate reconcile``): a message batch (``POST /v1/messages/batches``,
  recorded unknown at the policy's default) names its id. GET
  ``/v1/messages/batches/{id}``: ``in_progress``/``canceling`` → stays as it is; ``ended`` →
  its ``results_url`` (on api.anthropic.com only) is read and every ``succeeded`` result's
  ``usage`` is priced × ``batch_multiplier`` (½); errored, canceled and expired requests
  bill nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from . import _llm
from ._models import ANTHROPIC
from ._sse import Event, EventMeter
from .base import (
    NO_COST,
    Cost,
    Estimate,
    Fetch,
    LedgerCall,
    Pending,
    Prices,
    RequestView,
    ResponseView,
    StreamMeter,
    Vendor,
    load_prices,
)

_CACHE_1H = re.compile(rb'"ttl"\s*:\s*"1h"')
# Non-reads that bill nothing. Any other POST (a new paid endpoint) holds the policy's default.
FREE = (
    "POST /v1/messages/count_tokens",
    "POST /v1/messages/batches/*/cancel",
    "POST /v1/files",
    "POST /v1/skills/**",
    "POST /v1/organizations/**",  # Admin API: keys, members, workspaces
    "DELETE /**",
)


def _kind(req: RequestView) -> str | None:
    """"messages" (token-billed), "other" (billed later: batches), or None (not billed)."""
    if req.method.upper() != "POST":
        return None
    path = req.path.rstrip("/")
    if path.endswith("/messages") or path.endswith("/complete"):
        return "messages"
    if "/messages/batches" in path and path.endswith("/batches"):
        return "other"
    return None  # count_tokens, files, models, cancel: free


def _body(req: RequestView) -> dict[str, Any]:
    data = req.json
    return data if isinstance(data, dict) else {}


def _table(prices: Prices) -> dict[str, Any]:
    return prices.table(VENDOR)


def _rates(prices: Prices, model: object) -> _llm.Rates:
    return _llm.lookup(_table(prices), model, cache_read_x=Decimal("0.1"))


def _worst(req: RequestView, prices: Prices) -> tuple[Decimal, Decimal, str]:
    """(input USD, output USD, basis) of the worst case for a Messages request."""
    table = _table(prices)
    body = _body(req)
    model = body.get("model")
    rates = _rates(prices, model)
    in_tokens = _llm.input_guess(req.body, _llm.tokens(table.get("image_input_tokens")))
    limit = _llm.opt_int(body.get("max_tokens"))
    if limit is None:
        limit = _llm.opt_int(body.get("max_tokens_to_sample"))  # legacy /v1/complete
    limit_note = "max_tokens"
    if limit is None:
        limit = rates.max_output if rates.known and rates.max_output else (
            _llm.tokens(table.get("default_max_output_tokens")) or 64000)
        limit_note = "no max_tokens: model maximum"
    r = rates.for_input(in_tokens)
    in_rate, in_note = r.input, "input"
    if b"cache_control" in req.body:  # the marked prefix is written to the cache, at a premium
        in_rate, in_note = (r.cache_write_1h, "1h cache write") if _CACHE_1H.search(req.body) else (
            r.cache_write, "cache write")
    input_usd = in_tokens * in_rate / _llm.MILLION
    output_usd = limit * r.output / _llm.MILLION
    basis = (f"{_llm.describe(rates, model)}: ~{in_tokens} input tokens (from body size, at {in_note} "
             f"rate) + {limit} output tokens ({limit_note})")
    return input_usd, output_usd, basis


def _estimate(req: RequestView, prices: Prices) -> Estimate:
    kind = _kind(req)
    if kind is None:
        return NO_COST
    if kind == "other":
        return Estimate(usd=None, moves_money=True, basis="message batch: billed as it runs, amount unknown")
    input_usd, output_usd, basis = _worst(req, prices)
    usd = input_usd + output_usd
    return Estimate(usd=usd, moves_money=True, currency="USD", amount=usd, basis=basis)


# --- usage → cost ---------------------------------------------------------------------------


def _usage(u: Mapping[str, Any]) -> _llm.Usage:
    read = _llm.tokens(u.get("cache_read_input_tokens"))
    written = _llm.opt_int(u.get("cache_creation_input_tokens"))
    breakdown = u.get("cache_creation")
    w1h = 0
    if isinstance(breakdown, Mapping):
        w1h = _llm.tokens(breakdown.get("ephemeral_1h_input_tokens"))
        if written is None:
            written = _llm.tokens(breakdown.get("ephemeral_5m_input_tokens")) + w1h
    written = written or 0
    w1h = min(w1h, written)  # the total is authoritative; the breakdown only splits it
    tools = u.get("server_tool_use")
    searches = _llm.tokens(tools.get("web_search_requests")) if isinstance(tools, Mapping) else 0
    return _llm.Usage(
        input=_llm.tokens(u.get("input_tokens")), cached=read, cache_write=written - w1h,
        cache_write_1h=w1h, output=_llm.tokens(u.get("output_tokens")), web_searches=searches,
    )


def _web_search_usd(prices: Prices) -> Decimal:
    return _llm.dec(_table(prices).get("web_search_usd"), Decimal("0.01"))


def _priced(usage: Mapping[str, Any], model: object, prices: Prices, extra: str = "") -> Cost:
    return _llm.usd_cost(_usage(usage), _rates(prices, model), model, _web_search_usd(prices), extra)


def _fallback(req: RequestView, prices: Prices, estimate: Estimate | None, why: str) -> Cost:
    usd = getattr(estimate, "usd", None)
    if not isinstance(usd, Decimal) and _kind(req) == "messages":
        input_usd, output_usd, _ = _worst(req, prices)
        usd = input_usd + output_usd
    if not isinstance(usd, Decimal):
        return Cost("unknown", None, note=f"{why}; no estimate to fall back on")
    return Cost("estimated", usd, "USD", usd, f"{why}; counted at the estimate")


def _cost(req: RequestView, resp: ResponseView, prices: Prices, estimate: Estimate) -> Cost:
    if resp.body.lstrip().startswith((b"event:", b"data:")):  # an SSE body not announced as such
        meter = _Meter(req, prices, estimate)
        meter.feed(resp.body)
        return meter.finish()
    obj = resp.json
    kind = _kind(req)
    if isinstance(obj, dict) and obj.get("type") == "error":
        return Cost("zero", Decimal(0), note=f"error: {resp.error_label()}")
    if isinstance(obj, dict) and isinstance(usage := obj.get("usage"), Mapping):
        return _priced(usage, _llm.model_of(obj, req), prices)
    if kind is None:
        return Cost("zero", Decimal(0), note="endpoint not billed")
    if kind == "other":
        batch = obj.get("id") if isinstance(obj, dict) and obj.get("type") == "message_batch" else None
        return Cost("unknown", None, note="message batch: billed as it runs",
                    object_id=batch if isinstance(batch, str) and _BATCH_ID.fullmatch(batch) else None)
    if not isinstance(obj, dict):
        return Cost("unknown", None, note="response is not JSON")
    return _fallback(req, prices, estimate, "usage missing from response")


# --- streaming ------------------------------------------------------------------------------


class _Meter(EventMeter):
    """Prices a Messages SSE stream; keeps only the merged usage and a few flags."""

    def __init__(self, req: RequestView, prices: Prices, estimate: Estimate) -> None:
        super().__init__()
        self._req = req
        self._prices = prices
        self._estimate = estimate
        self._usage: dict[str, Any] | None = None  # None until message_start
        self._model: str | None = None
        self._stopped = False
        self._error: str | None = None

    @staticmethod
    def _quiet(event: Event) -> bool:
        """Only message_start, message_delta, message_stop and error events change anything: an
        event whose name and data name none of them (the content_block_* deltas, pings) need not
        be parsed. A type written with a \\u escape could be any of them: parsed."""
        if event.name in _KEPT:
            return False
        raw = event.raw  # `"message_` covers the three message_* types
        return raw.find(b'"message_') < 0 and raw.find(b'"error"') < 0 and raw.find(b"\\u") < 0

    def _on(self, event: Event) -> None:
        if self._quiet(event):
            return
        obj = event.json()
        if not isinstance(obj, dict):
            return
        typ = obj.get("type") or event.name
        if typ == "message_start":
            message = obj.get("message")
            message = message if isinstance(message, Mapping) else {}
            if isinstance(model := message.get("model"), str):
                self._model = model
            usage = message.get("usage")
            self._usage = dict(usage) if isinstance(usage, Mapping) else {}
        elif typ == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, Mapping):
                # Cumulative counts: present fields replace, absent ones keep.
                self._usage = {**(self._usage or {}), **usage}
        elif typ == "message_stop":
            self._stopped = True
        elif typ == "error" and self._error is None:
            err = obj.get("error")
            self._error = str(err.get("type") or "error")[:80] if isinstance(err, Mapping) else "error"

    def _finish(self) -> Cost:
        model = self._model or _body(self._req).get("model")
        if self._usage is None:
            if self._error:
                return Cost("zero", Decimal(0), note=f"stream error before message_start: {self._error}")
            why = f"stream meter failed ({self._broken})" if self._broken else "no message_start in stream"
            return _fallback(self._req, self._prices, self._estimate, why)
        if self._stopped and not self._error and not self._broken:
            return _priced(self._usage, model, self._prices)
        return self._partial(model)

    def _partial(self, model: object) -> Cost:
        """Input known, output not: the known input + the worst-case output of the request."""
        if self._error:
            why = f"stream error {self._error} after message_start"
        elif self._broken:
            why = f"stream meter failed ({self._broken})"
        else:
            why = "stream ended before message_stop"
        usage = _usage(self._usage or {})
        rates = _rates(self._prices, model)
        seen = usage.usd(rates, _web_search_usd(self._prices))
        known_output = usage.output * rates.for_input(usage.input_total).output / _llm.MILLION
        worst_output = Decimal(0)
        if _kind(self._req) == "messages":
            worst_output = _worst(self._req, self._prices)[1]
        usd = seen - known_output + max(known_output, worst_output)
        note = (f"{_llm.describe(rates, model)}: {usage.summary()}; {why}: "
                f"input known, output counted at the estimate's worst case")
        return Cost("estimated", usd, "USD", usd, note)


_KEPT = ("message_start", "message_delta", "message_stop", "error")


def stream_meter(req: RequestView, prices: Prices, estimate: Estimate) -> StreamMeter | None:
    return _Meter(req, prices, estimate) if _kind(req) == "messages" else None


# --- reconcile ------------------------------------------------------------------------------

_BATCH_ID = re.compile(r"msgbatch_[A-Za-z0-9]{1,200}")
_RESULTS_MAX = 64 << 20  # bytes of a batch's results read
_VERSION = {"anthropic-version": "2023-06-01"}  # the API refuses a request without one


def reconcile(call: LedgerCall, answers: list[ResponseView], prices: Prices) -> Fetch | Cost | Pending:
    """A message batch: once ended, the usage of its succeeded results at the batch discount."""
    if not _BATCH_ID.fullmatch(call.object_id) or not call.path.rstrip("/").endswith("/messages/batches"):
        return Pending("not an Anthropic message batch")
    if not answers:
        return Fetch(f"/v1/messages/batches/{call.object_id}", headers=_VERSION)
    batch = answers[0].json
    if not isinstance(batch, dict) or batch.get("id") != call.object_id:
        return Pending(f"the answer is not {call.object_id}")
    status = batch.get("processing_status")
    if status != "ended":
        return Pending(f"batch {status}")
    url = batch.get("results_url")
    if not isinstance(url, str) or not url:
        return Pending("ended without a results_url")
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname or not parts.path.startswith("/v1/"):
        return Pending("results_url is not an https URL of the API")
    if len(answers) == 1:  # the driver sends the key only to a host this vendor serves
        return Fetch(parts.path + (f"?{parts.query}" if parts.query else ""), host=parts.hostname,
                     max_bytes=_RESULTS_MAX, headers=_VERSION)
    return _results(call.object_id, answers[1], prices)


def _results(batch: str, resp: ResponseView, prices: Prices) -> Cost | Pending:
    multiplier = _llm.dec(_table(prices).get("batch_multiplier"), Decimal("0.5"))
    total, billed = Decimal(0), 0
    for n, raw in enumerate(resp.body.splitlines(), 1):
        if not raw.strip():
            continue
        line = ResponseView(200, body=raw).json
        result = line.get("result") if isinstance(line, dict) else None
        if not isinstance(result, Mapping):
            return Pending(f"results line {n} is not a batch result")
        if result.get("type") != "succeeded":
            continue  # errored, canceled, expired: not billed
        message = result.get("message")
        if not isinstance(message, Mapping) or not isinstance(usage := message.get("usage"), Mapping):
            return Pending(f"results line {n} has no usage")
        cost = _priced(usage, message.get("model"), prices)
        if cost.usd is None or cost.status != "parsed":
            return Pending(f"results line {n}: {cost.note}")
        total += cost.usd * multiplier
        billed += 1
    note = f"{batch} ended: {billed} succeeded result{'s' if billed != 1 else ''} × {multiplier} (batch)"
    return replace(Cost("parsed" if total else "zero", total, "USD", total, note), object_id=batch)


VENDOR = Vendor(
    name="anthropic",
    hosts=("api.anthropic.com",),
    key_headers=("x-api-key", "authorization"),
    real_key=re.compile(r"^sk-ant-[A-Za-z0-9_-]{8,}"),
    credential_headers=lambda c: {"x-api-key": c["secret"]},
    estimator=_estimate,
    parser=_cost,
    free=FREE,
    stream_meter=stream_meter,
    prices=load_prices("anthropic"),
    llm=ANTHROPIC,
    reconciler=reconcile,
)
