"""OpenAI-compatible providers: one mechanism, each provider with its own hosts, key pattern and
price table (``prices/<name>.yaml``, with its source and date).

``openai_compatible(...)`` builds a :class:`Vendor` that reads requests and responses exactly as
the OpenAI module does (chat completions, Responses, embeddings, streams with
``stream_options.include_usage``) but prices them from the provider's own table (the policy's
``prices: {<name>: …}`` overrides it). What differs between providers is normalised first:

- OpenRouter reports what it charged, ``usage.cost`` (USD credits): that figure is used when
  present (``parsed``, note "reported by the provider"); the table is the fallback.
- DeepSeek splits input into ``prompt_cache_hit_tokens``/``prompt_cache_miss_tokens``: hits
  are billed at the cached rate.
- Tables may say ``reasoning_billed_separately: true`` when a provider reports
  ``completion_tokens_details.reasoning_tokens`` outside ``completion_tokens``; they are then
  added to the output.

Declared vendors (``vendors: {x: {compatible: openai, hosts: […]}}``) use the same builder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from . import openai as _openai
from ._models import openai_shape
from ._sse import NULL, Event, SSEParser, forms_of, quiet
from .base import Cost, Estimate, Prices, RequestView, ResponseView, StreamMeter, Vendor, bearer, plausible


@dataclass(frozen=True)
class _Retarget(Prices):
    """The prices in force, with the OpenAI module's table lookups answered from ``vendor``'s."""

    vendor: Vendor | None = None

    def table(self, vendor: Vendor) -> dict[str, Any]:
        return super().table(self.vendor or vendor)


def _retarget(prices: Prices, vendor: Vendor) -> _Retarget:
    return _Retarget(fx=prices.fx, overrides=prices.overrides, vendor=vendor)


def normalise_usage(usage: Mapping[str, Any], table: Mapping[str, Any]) -> dict[str, Any]:
    """Provider usage in OpenAI's shape (cached tokens in ``prompt_tokens_details``, reasoning in
    ``completion_tokens``)."""
    out = dict(usage)
    hit = usage.get("prompt_cache_hit_tokens")
    if isinstance(hit, int) and not isinstance(hit, bool) and hit >= 0:
        details = dict(out.get("prompt_tokens_details") or {})
        details.setdefault("cached_tokens", hit)
        out["prompt_tokens_details"] = details
    if table.get("reasoning_billed_separately"):
        details = usage.get("completion_tokens_details")
        reasoning = details.get("reasoning_tokens") if isinstance(details, Mapping) else None
        if isinstance(reasoning, int) and not isinstance(reasoning, bool) and reasoning > 0:
            out["completion_tokens"] = (usage.get("completion_tokens") or 0) + reasoning
    return out


def reported_cost(usage: Mapping[str, Any]) -> Decimal | None:
    """A provider's own figure for the call (OpenRouter ``usage.cost``), if it gives one."""
    cost = usage.get("cost")
    if isinstance(cost, bool) or not isinstance(cost, int | float | str):
        return None
    try:
        d = Decimal(str(cost))
    except ArithmeticError:
        return None
    return d if d.is_finite() and d >= 0 else None


def _from_usage(usage: Mapping[str, Any], model: object, prices: _Retarget, vendor: Vendor) -> Cost:
    reported = reported_cost(usage)
    if reported is not None:
        note = f"{model}: cost reported by {vendor.name}"
        return Cost("parsed", reported, "USD", reported, note)
    return _openai._priced(normalise_usage(usage, prices.table(vendor)), model, prices)


class _StreamMeter:
    """The OpenAI stream meter, plus the provider's last usage block (cost, cache hits)."""

    def __init__(self, inner: StreamMeter, req: RequestView, prices: _Retarget, vendor: Vendor) -> None:
        self._inner, self._req, self._prices, self._vendor = inner, req, prices, vendor
        self._parser = SSEParser()
        self._usage: Mapping[str, Any] | None = None
        self._model: object = None

    def feed(self, chunk: bytes) -> None:
        self._inner.feed(chunk)
        for event in self._parser.feed(bytes(chunk)):
            self._on(event)

    def _quiet(self, event: Event) -> bool:
        """Whether parsing this event could change nothing kept here (usage null, the model as it
        is): the content chunks, which repeat the model and often ``"usage":null``."""
        model = self._model
        forms = NULL + forms_of(model) if isinstance(model, str) else NULL
        return not event.truncated and quiet(event.raw, (b"\\u",), ((b'"usage"', NULL), (b'"model"', forms)))

    def _on(self, event: Event) -> None:
        if self._quiet(event):
            return
        obj = event.json()
        if isinstance(obj, dict):
            if isinstance(usage := obj.get("usage"), Mapping):
                self._usage = usage
            if isinstance(model := obj.get("model"), str):
                self._model = model

    def finish(self) -> Cost:
        inner = self._inner.finish()
        for event in self._parser.close():
            self._on(event)
        usage = self._usage
        if usage is None:
            return inner
        try:
            model = self._model or (self._req.json or {}).get("model")
            return plausible(_from_usage(usage, model, self._prices, self._vendor))
        except Exception:
            return inner


def openai_compatible(name: str, hosts: tuple[str, ...], real_key: str, prices: Mapping[str, Any],
                      key_headers: tuple[str, ...] = ("authorization",),
                      credential: Callable[[Mapping[str, str]], dict[str, str]] | None = None) -> Vendor:
    """A Vendor speaking OpenAI's API at ``hosts``, priced from ``prices``."""
    vendor: Vendor

    def estimator(req: RequestView, p: Prices) -> Estimate:
        return _openai._estimate(req, _retarget(p, vendor))

    def parser(req: RequestView, resp: ResponseView, p: Prices, estimate: Estimate) -> Cost:
        prices = _retarget(p, vendor)
        obj = resp.json
        if isinstance(obj, dict) and isinstance(usage := obj.get("usage"), Mapping):
            return _from_usage(usage, obj.get("model") or (req.json or {}).get("model"), prices, vendor)
        return _openai._cost(req, resp, prices, estimate)

    def stream_meter(req: RequestView, p: Prices, estimate: Estimate) -> StreamMeter | None:
        prices = _retarget(p, vendor)
        inner = _openai.stream_meter(req, prices, estimate)
        return None if inner is None else _StreamMeter(inner, req, prices, vendor)

    vendor = Vendor(
        name=name, hosts=hosts, key_headers=key_headers, real_key=re.compile(real_key),
        credential_headers=credential or (lambda c: {"authorization": bearer(c["secret"])}),
        estimator=estimator, parser=parser, stream_meter=stream_meter, prices=prices,
        free=_openai.FREE,  # the same API surface: what is free at OpenAI is free here
        # compatible servers accept max_tokens; not all know max_completion_tokens
        llm=openai_shape("max_tokens"),
    )
    return vendor


def anthropic_compatible(name: str, hosts: tuple[str, ...], real_key: str, prices: Mapping[str, Any],
                         key_headers: tuple[str, ...],
                         credential: Callable[[Mapping[str, str]], dict[str, str]]) -> Vendor:
    """A Vendor speaking Anthropic's Messages API at ``hosts`` (``compatible: anthropic``: the
    Anthropic-compatible endpoints several providers offer), priced from ``prices``."""
    from . import anthropic as _anthropic
    from ._models import ANTHROPIC

    vendor: Vendor

    def estimator(req: RequestView, p: Prices) -> Estimate:
        return _anthropic._estimate(req, _retarget(p, vendor))

    def parser(req: RequestView, resp: ResponseView, p: Prices, estimate: Estimate) -> Cost:
        return _anthropic._cost(req, resp, _retarget(p, vendor), estimate)

    def stream_meter(req: RequestView, p: Prices, estimate: Estimate) -> StreamMeter | None:
        return _anthropic.stream_meter(req, _retarget(p, vendor), estimate)

    vendor = Vendor(
        name=name, hosts=hosts, key_headers=tuple(dict.fromkeys((*key_headers, "x-api-key"))),
        real_key=re.compile(real_key), credential_headers=credential, estimator=estimator, parser=parser,
        stream_meter=stream_meter, prices=prices, llm=ANTHROPIC, free=_anthropic.FREE,
    )
    return vendor
