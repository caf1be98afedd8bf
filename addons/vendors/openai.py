"""OpenAI: api.openai.com, key as Bearer; cost = token usage × per-model prices.

Prices come from ``prices/openai.yaml`` (policy ``prices: {openai: …}`` overrides).

- Usage: ``prompt_tokens``/``input_tokens`` INCLUDE cached tokens, which are
  billed at the cached rate (the rest at the input rate); reasoning tokens are
  already inside ``completion_tokens``/``output_tokens`` and are not added again.
- The model is taken from the response (``gpt-4o-2024-08-06``), else the request.
- Estimate (worst case, before forwarding): input from the body size (see
  ``_llm.input_guess``) + ``n × limit`` output tokens, where the limit is
  ``max_completion_tokens``, ``max_tokens`` or ``max_output_tokens``, else the
  model's own output limit from the table (the true worst case: a call without a
  limit may legitimately use it), else ``default_max_output_tokens``.
- Streams: usage arrives in the final chunk (chat, with
  ``stream_options.include_usage``) or in ``response.completed`` /
  ``response.incomplete`` / ``response.failed`` (Responses API). No usage → the
  estimate, marked "estimated", with the reason in the note. An error event
  before any output → "zero" (nothing was generated); after output → estimated.
- Audio (transcriptions, translations, speech) and images are priced by their own
  units in ``_openai_media`` (minutes, characters, images, image tokens).
- Endpoints billed otherwise (video, fine-tuning, batches, containers, thread runs,
  realtime) are estimated as "moves money, amount unknown" (the policy default
  applies) and priced "unknown" unless their response carries token usage.
- Reconcile (``spendgate reconcile``): a batch (``POST /v1/batches``, recorded unknown at the
  policy's default) names its id. GET ``/v1/batches/{id}``: still validating, in progress,
  finalizing or cancelling → stays as it is; ``failed`` (never ran) → zero; completed, expired
  or cancelled → its ``usage`` × the model's rates at the batch tier (½), or, for batches
  without ``usage`` (created before September 2025), the sum of the ``usage`` of every line
  of its output file (GET ``/v1/files/{output_file_id}/content``), at the batch tier.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from . import _llm, _openai_media
from ._models import openai_shape
from ._sse import NULL, Event, EventMeter, Keys, find_object, forms_of, quiet
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
    bearer,
    load_prices,
)

_TOKEN_KINDS = {
    "/chat/completions": "chat",
    "/responses": "responses",
    "/completions": "completions",
    "/embeddings": "embeddings",
}
_OTHER_BILLED = re.compile(
    r"/(images|audio|videos|realtime)(/|$)|/(fine_tuning/jobs|batches|containers)$"
    r"|/threads/([^/]+/)?runs$|/threads/[^/]+/runs/[^/]+/submit_tool_outputs$|/evals/[^/]+/runs$"
)
# Non-reads that bill nothing (storage is billed per GB-day, not per call). Any other POST
# this module does not price holds the policy's default estimate.
FREE = (
    "POST /v1/moderations",
    "POST /v1/responses/input_tokens",
    "POST /v1/responses/*/cancel",
    "POST /v1/chat/completions/*",  # update a stored completion's metadata
    "POST /v1/files", "POST /v1/uploads/**",
    "POST /v1/vector_stores/**",
    "POST /v1/assistants/**",
    "POST /v1/threads", "POST /v1/threads/*", "POST /v1/threads/*/messages/**",
    "POST /v1/threads/*/runs/*", "POST /v1/threads/*/runs/*/cancel",
    "POST /v1/conversations/**",
    "POST /v1/batches/*/cancel",
    "POST /v1/fine_tuning/jobs/*/cancel", "POST /v1/fine_tuning/jobs/*/pause",
    "POST /v1/fine_tuning/checkpoints/**",
    "POST /v1/evals", "POST /v1/evals/*", "POST /v1/evals/*/runs/*",
    "POST /v1/organization/**",  # Admin API
    "POST /v1/realtime/client_secrets", "POST /v1/realtime/sessions",
    "POST /v1/realtime/transcription_sessions",
    "DELETE /**",
)
_MEDIA = ("transcription", "speech", "image")
_REASONING = re.compile(r"^(o\d|gpt-5)")  # reasoning models: web_search_preview at the web_search fee
# /v1/completions defaults to 16 output tokens (API reference, max_tokens).
_LEGACY_COMPLETIONS_MAX = 16


def _kind(req: RequestView) -> str | None:
    """What the request is billed as: a token endpoint, "other" (billed, unmodelled), or None."""
    if req.method.upper() != "POST":
        return None
    path = req.path.rstrip("/")
    if path.endswith("/responses/compact"):  # a compaction pass runs the model: billed like a response
        return "responses"
    if media := _openai_media.kind(req):
        return media
    for suffix, kind in _TOKEN_KINDS.items():
        if path.endswith(suffix):
            return kind
    return "other" if _OTHER_BILLED.search(path) else None


def _body(req: RequestView) -> dict[str, Any]:
    data = req.json
    return data if isinstance(data, dict) else {}


def _rates(prices: Prices, model: object) -> _llm.Rates:
    # OpenAI has no cache-write surcharge; models listed without a cached rate get no discount.
    return _llm.lookup(prices.table(VENDOR), model, cache_read_x=Decimal(1), cache_write_x=Decimal(1))


@dataclass(frozen=True)
class _Worst:
    usd: Decimal
    basis: str
    open_context: bool = False


def _worst(req: RequestView, prices: Prices, kind: str) -> _Worst:
    table = prices.table(VENDOR)
    body = _body(req)
    model = body.get("model")
    rates = _rates(prices, model)
    in_tokens = _llm.input_guess(req.body, _llm.tokens(table.get("image_input_tokens")))
    n, limit, limit_note = _output_budget(body, kind, rates, table)
    r = rates.for_input(in_tokens)
    input_usd = in_tokens * r.input / _llm.MILLION
    output_usd = n * limit * r.output / _llm.MILLION
    basis = f"{_llm.describe(rates, model)}: ~{in_tokens} input tokens (from body size)"
    if kind != "embeddings":
        basis += f" + {n}×{limit} output tokens ({limit_note})"
    open_context = bool(body.get("previous_response_id") or body.get("conversation")
                        or isinstance(body.get("prompt"), Mapping))  # a stored prompt {"id": "pmpt_…"}
    if open_context:
        basis += "; earlier conversation context not counted"
    return _Worst(input_usd + output_usd, basis, open_context)


def _output_budget(body: Mapping[str, Any], kind: str, rates: _llm.Rates,
                   table: Mapping[str, Any]) -> tuple[int, int, str]:
    """(choices, output tokens per choice, where the limit came from)."""
    if kind == "embeddings":
        return 1, 0, "embeddings"
    n = max(_llm.tokens(body.get("n")), 1)
    if kind == "completions":
        n = max(n, _llm.tokens(body.get("best_of")))  # best_of candidates are all billed
    fields = ("max_output_tokens",) if kind == "responses" else ("max_completion_tokens", "max_tokens")
    for name in fields:
        value = _llm.opt_int(body.get(name))
        if value is not None:
            return n, value, name
    if kind == "completions":
        return n, _LEGACY_COMPLETIONS_MAX, "API default max_tokens 16"
    if rates.known and rates.max_output:
        return n, rates.max_output, "no limit set: model maximum"
    default = _llm.tokens(table.get("default_max_output_tokens")) or 16384
    return n, default, "no limit set: default_max_output_tokens"


def _estimate(req: RequestView, prices: Prices) -> Estimate:
    kind = _kind(req)
    if kind is None:
        return NO_COST
    if kind in _MEDIA:
        return _openai_media.estimate(kind, req, prices.table(VENDOR))
    if kind == "other":
        return Estimate(usd=None, moves_money=True,
                        basis="OpenAI endpoint billed per image/second/job/run: moves money, amount unknown")
    worst = _worst(req, prices, kind)
    return Estimate(usd=worst.usd, moves_money=True, currency="USD", amount=worst.usd, basis=worst.basis,
                    open_context=worst.open_context)


# --- usage → cost ---------------------------------------------------------------------------


def _usage(u: Mapping[str, Any]) -> _llm.Usage:
    """Chat/embeddings (``prompt_tokens``) or Responses (``input_tokens``) usage, split by rate.

    The totals include their details: cached, audio and image input tokens are carved out
    of the input total, audio output tokens out of the output total, each billed once at
    its own rate."""
    if "input_tokens" in u or "output_tokens" in u:
        total_in = _llm.tokens(u.get("input_tokens"))
        details = u.get("input_tokens_details")
        out = _llm.tokens(u.get("output_tokens"))
        out_details = u.get("output_tokens_details")
    else:
        total_in = _llm.tokens(u.get("prompt_tokens"))
        details = u.get("prompt_tokens_details")
        out = _llm.tokens(u.get("completion_tokens"))
        out_details = u.get("completion_tokens_details")
    details = details if isinstance(details, Mapping) else {}
    out_details = out_details if isinstance(out_details, Mapping) else {}
    left = total_in
    cached = min(_llm.tokens(details.get("cached_tokens")), left)  # a subset of input
    left -= cached
    write = min(_llm.tokens(details.get("cache_write_tokens")), left)
    left -= write
    audio_in = min(_llm.tokens(details.get("audio_tokens")), left)
    left -= audio_in
    image_in = min(_llm.tokens(details.get("image_tokens")), left)
    left -= image_in
    audio_out = min(_llm.tokens(out_details.get("audio_tokens")), out)
    return _llm.Usage(input=left, cached=cached, cache_write=write, output=out - audio_out,
                      audio_input=audio_in, audio_output=audio_out, image_input=image_in)


def _tool_fees(src: Mapping[str, Any] | None, req: RequestView | None, table: Mapping[str, Any],
               counts: Mapping[str, int] | None = None) -> tuple[Decimal, str]:
    """Built-in tool fees of a Responses answer: web and file search calls, code interpreter
    containers (``tool_fees_usd`` in the table). ``counts`` (from a stream) or ``src["output"]``."""
    fees = table.get("tool_fees_usd")
    fees = fees if isinstance(fees, Mapping) else {}
    if counts is None:
        output = src.get("output") if isinstance(src, Mapping) else None
        found: dict[str, int] = {}
        containers: set[str] = set()
        for item in output if isinstance(output, list) else []:
            if isinstance(item, Mapping) and isinstance(t := item.get("type"), str):
                if t == "code_interpreter_call":
                    containers.add(str(item.get("container_id") or item.get("id") or len(containers)))
                else:
                    found[t] = found.get(t, 0) + 1
        found["code_interpreter_container"] = len(containers)
        counts = found
    web_kind = "web_search_call"
    body = req.json if req is not None and isinstance(req.json, Mapping) else {}
    tools, model = body.get("tools"), str(body.get("model") or (src or {}).get("model") or "")
    if isinstance(tools, list) and any(isinstance(t, Mapping) and str(t.get("type", "")).startswith(
            "web_search_preview") for t in tools) and not _REASONING.match(model):
        web_kind = "web_search_preview_call"  # the preview tool on non-reasoning models costs more
    usd, parts = Decimal(0), []
    for kind, fee_key in (("web_search_call", web_kind), ("file_search_call", "file_search_call"),
                          ("code_interpreter_container", "code_interpreter_container")):
        n = counts.get(kind, 0)
        if n:
            usd += n * _llm.dec(fees.get(fee_key), Decimal(0))
            parts.append(f"{n} {kind.replace('_', ' ')}{'s' if n != 1 else ''}")
    return usd, ", ".join(parts)


def _priced(usage: Mapping[str, Any], model: object, prices: Prices, extra: str = "",
            src: Mapping[str, Any] | None = None, req: RequestView | None = None,
            tool_counts: Mapping[str, int] | None = None, tier: object = None) -> Cost:
    table = prices.table(VENDOR)
    rates = _rates(prices, model)
    base = _usage(usage)
    tier = tier if tier is not None else (src.get("service_tier") if isinstance(src, Mapping) else None)
    tool_usd, tool_note = _tool_fees(src, req, table, tool_counts)
    full = replace(base, tier_x=rates.tier_x(tier, table), tool_usd=tool_usd, tool_note=tool_note)
    if full.tier_x != 1:
        extra = f"service_tier {tier}" + (f"; {extra}" if extra else "")
    return _llm.usd_cost(full, rates, model, extra=extra)


def _fallback(req: RequestView, prices: Prices, estimate: Estimate | None, why: str) -> Cost:
    """No usage: count the estimate (the worst case), flagged as estimated."""
    usd = getattr(estimate, "usd", None)
    if not isinstance(usd, Decimal):
        kind = _kind(req)
        usd = _worst(req, prices, kind).usd if kind in _TOKEN_KINDS.values() else None
    if usd is None:
        return Cost("unknown", None, note=f"{why}; no estimate to fall back on")
    return Cost("estimated", usd, "USD", usd, f"{why}; counted at the estimate")


def _cost(req: RequestView, resp: ResponseView, prices: Prices, estimate: Estimate) -> Cost:
    if (kind := _kind(req)) in _MEDIA:
        return _openai_media.cost(str(kind), req, resp, prices.table(VENDOR), estimate)
    if resp.body.lstrip().startswith((b"data:", b"event:")):  # an SSE body not announced as such
        meter = _Meter(req, prices, estimate)
        meter.feed(resp.body)
        return meter.finish()
    obj = resp.json
    kind = _kind(req)
    if not isinstance(obj, dict):
        if kind is None:
            return Cost("zero", Decimal(0), note="endpoint not billed")
        return Cost("unknown", None, note="response is not JSON")
    src = obj.get("response") if isinstance(obj.get("response"), dict) else obj
    usage = src.get("usage")
    if isinstance(usage, Mapping):
        return _priced(usage, _llm.model_of(src, req), prices, src=src, req=req)
    if kind is None:
        return Cost("zero", Decimal(0), note="endpoint not billed")
    if kind == "other":
        batch = obj.get("id") if obj.get("object") == "batch" else None
        return Cost("unknown", None, note="billed endpoint without token usage in the response",
                    object_id=batch if isinstance(batch, str) and _BATCH_ID.fullmatch(batch) else None)
    state = src.get("status") or obj.get("type") or "no usage"
    return _fallback(req, prices, estimate, f"usage missing from response ({state})")


# --- streaming ------------------------------------------------------------------------------


class _Meter(EventMeter):
    """Prices a chat-completions or Responses SSE stream; keeps the latest usage only."""

    def __init__(self, req: RequestView, prices: Prices, estimate: Estimate) -> None:
        super().__init__()
        self._req = req
        self._prices = prices
        self._estimate = estimate
        self._usage: dict[str, Any] | None = None
        self._model: str | None = None
        self._events = 0  # JSON events before any error
        self._error: str | None = None
        self._terminal: str | None = None
        self._tier: str | None = None
        self._tools: dict[str, int] = {}
        self._containers: set[str] = set()
        self._keys = _keys(None, None)

    def _quiet(self, event: Event) -> bool:
        """Whether parsing this event could change nothing ``_on`` keeps: no usage, error, terminal
        or tool event, and ``model``/``service_tier`` only as they already are (a chat stream
        repeats both in every chunk, with ``"usage":null``). The first JSON event is always parsed
        (``_events`` tells an error before any output from one after it)."""
        if event.truncated or (self._events == 0 and self._error is None):
            return False
        raw = event.raw
        if raw.find(b'"response.') >= 0:
            for loud in _LOUD:
                if raw.find(loud) >= 0:
                    return False
        return quiet(raw, (b"\\u",), self._keys)

    def _on(self, event: Event) -> None:
        if self._quiet(event):
            return
        obj = event.json()
        if not isinstance(obj, dict):
            if event.truncated and (usage := find_object(event.data, "usage")) is not None:
                self._usage = usage  # a huge response.completed: usage survives in the tail
            return
        typ = obj.get("type")
        src = obj.get("response") if isinstance(obj.get("response"), dict) else obj
        if isinstance(model := src.get("model"), str) and model and model != self._model:
            self._model = model
            self._keys = _keys(model, self._tier)
        if isinstance(usage := src.get("usage"), dict):
            self._usage = usage
        if isinstance(tier := src.get("service_tier"), str) and tier != self._tier:
            self._tier = tier
            self._keys = _keys(self._model, tier)
        if typ == "response.output_item.done" and isinstance(item := obj.get("item"), dict):
            kind = item.get("type")
            if kind == "code_interpreter_call":
                self._containers.add(str(item.get("container_id") or item.get("id")))
            elif isinstance(kind, str):
                self._tools[kind] = self._tools.get(kind, 0) + 1
        if typ in ("response.completed", "response.incomplete", "response.failed"):
            self._terminal = typ
        if error := _stream_error(obj, typ):
            self._error = self._error or _describe_error(error)
        elif self._error is None:
            self._events += 1

    def _finish(self) -> Cost:
        model = self._model or _body(self._req).get("model")
        if self._usage is not None:
            extra = ""
            if self._terminal in ("response.incomplete", "response.failed"):
                extra = self._terminal
            if self._error:
                extra = f"stream error after usage: {self._error}"
            counts = {**self._tools, "code_interpreter_container": len(self._containers)}
            return _priced(self._usage, model, self._prices, extra, req=self._req, tool_counts=counts,
                           tier=self._tier)
        if self._error and self._events == 0:
            return Cost("zero", Decimal(0), note=f"stream error before any output: {self._error}")
        if self._broken:
            why = f"stream meter failed ({self._broken})"
        elif self._error:
            why = f"stream error midway ({self._error}), no usage"
        elif self._terminal:
            why = f"{self._terminal} without usage"
        else:
            why = "usage missing from stream (request stream_options.include_usage)"
        return _fallback(self._req, self._prices, self._estimate, why)


# Any of these in an event's data: parse it (the events that end a response or count a tool).
_LOUD = (b'"response.output_item.done"', b'"response.completed"', b'"response.incomplete"',
         b'"response.failed"')


@functools.lru_cache(maxsize=256)
def _keys(model: str | None, tier: str | None) -> Keys:
    """The keys whose values an event may hold without being parsed: usage and error null, model
    null, "" or the one already seen, service_tier null or the one already seen."""
    return ((b'"usage"', NULL), (b'"model"', (*NULL, *forms_of(""), *(forms_of(model) if model else ()))),
            (b'"service_tier"', NULL + (forms_of(tier) if tier is not None else ())), (b'"error"', NULL))


def _stream_error(obj: Mapping[str, Any], typ: object) -> object:
    """The error an event carries: a Responses ``error`` event, or a chat stream's
    plain ``{"error": {...}}`` data line."""
    if typ == "error":
        return obj.get("error") or obj
    return obj.get("error") if typ is None else None


def _describe_error(error: object) -> str:
    if isinstance(error, Mapping):
        return str(error.get("code") or error.get("type") or error.get("message") or "error")[:80]
    return str(error)[:80]


def stream_meter(req: RequestView, prices: Prices, estimate: Estimate) -> StreamMeter | None:
    kind = _kind(req)
    if kind is None or kind in ("other", "embeddings", *_MEDIA):
        return None
    return _Meter(req, prices, estimate)


# --- reconcile ------------------------------------------------------------------------------

_BATCH_ID = re.compile(r"batch_[A-Za-z0-9]{1,200}")
_FILE_ID = re.compile(r"file-[A-Za-z0-9_-]{1,200}")
_RUNNING = ("validating", "in_progress", "finalizing", "cancelling")
_OUTPUT_MAX = 64 << 20  # bytes of a batch's output file read (OpenAI's input limit is 200 MB)


def reconcile(call: LedgerCall, answers: list[ResponseView], prices: Prices) -> Fetch | Cost | Pending:
    """A batch: its final usage, from the batch object or its output file, at the batch tier."""
    if not _BATCH_ID.fullmatch(call.object_id) or call.path.rstrip("/") != "/v1/batches":
        return Pending("not an OpenAI batch")
    if not answers:
        return Fetch(f"/v1/batches/{call.object_id}")
    batch = answers[0].json
    if not isinstance(batch, dict) or batch.get("id") != call.object_id:
        return Pending(f"the answer is not {call.object_id}")
    status = batch.get("status")
    if status in _RUNNING:
        return Pending(f"batch {status}")
    if status == "failed":
        return Cost("zero", Decimal(0), note=f"{call.object_id} failed validation: nothing ran",
                    object_id=call.object_id)
    if status not in ("completed", "expired", "cancelled"):
        return Pending(f"batch status {status!r}")
    if isinstance(usage := batch.get("usage"), Mapping) and batch.get("model"):
        cost = _priced(usage, batch.get("model"), prices, tier="batch")
        return replace(cost, note=f"{call.object_id} {status}: {cost.note}", object_id=call.object_id)
    out = batch.get("output_file_id")
    if out is None:
        return Cost("zero", Decimal(0), note=f"{call.object_id} {status}: no request completed",
                    object_id=call.object_id)
    if not isinstance(out, str) or not _FILE_ID.fullmatch(out):
        return Pending("output_file_id not readable")
    if len(answers) == 1:
        return Fetch(f"/v1/files/{out}/content", max_bytes=_OUTPUT_MAX)
    return _output_file(call.object_id, str(status), answers[1], prices)


def _output_file(batch: str, status: str, resp: ResponseView, prices: Prices) -> Cost | Pending:
    """Every line of a batch's output file ({"custom_id", "response": {"status_code", "body"}}) at
    the batch tier; a line that failed bills nothing; a line that cannot be read leaves it pending."""
    total, lines, flagged = Decimal(0), 0, ""
    for n, raw in enumerate(resp.body.splitlines(), 1):
        if not raw.strip():
            continue
        line = ResponseView(200, body=raw).json
        response = line.get("response") if isinstance(line, dict) else None
        if not isinstance(response, Mapping):
            return Pending(f"output line {n} is not a batch result")
        body = response.get("body")
        if response.get("status_code") != 200:
            continue  # an error line: not billed
        if not isinstance(body, Mapping) or not isinstance(usage := body.get("usage"), Mapping):
            return Pending(f"output line {n} has no usage")
        cost = _priced(usage, body.get("model"), prices, src=body, tier="batch")
        if cost.usd is None:
            return Pending(f"output line {n}: {cost.note}")
        if cost.status != "parsed" and not flagged:
            flagged = cost.note
        total += cost.usd
        lines += 1
    if flagged:
        return Pending(f"{batch}: {flagged}")
    note = f"{batch} {status}: {lines} result{'s' if lines != 1 else ''} at the batch tier"
    return Cost("parsed" if total else "zero", total, "USD", total, note, object_id=batch)


VENDOR = Vendor(
    name="openai",
    hosts=("api.openai.com",),
    key_headers=("authorization",),
    real_key=re.compile(r"^sk-(?!ant-)[A-Za-z0-9_-]{8,}"),
    credential_headers=lambda c: {"authorization": bearer(c["secret"])},
    estimator=_estimate,
    parser=_cost,
    free=FREE,
    stream_meter=stream_meter,
    prices=load_prices("openai"),
    llm=openai_shape(),
    reconciler=reconcile,
)
