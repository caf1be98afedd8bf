"""Token pricing shared by the LLM vendors (OpenAI, Anthropic).

A price table (``prices/openai.yaml``, ``prices/anthropic.yaml``) holds, per
model, USD per 1M tokens: ``input``, ``cached_input`` (cache reads),
``output`` and, for Anthropic, ``cache_write`` (5-minute TTL) and
``cache_write_1h``; plus ``max_output`` (the model's output limit, the worst
case when a request sets none). ``aliases`` maps names to table keys; a dated
id not in the table is tried without its date. An unknown model is priced at
the table's ``fallback`` rates, chosen high on purpose, and every note and
basis then says so.

Usage is normalised to :class:`Usage`, whose fields never overlap: each token
is billed once, at one rate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..money import parse_decimal
from .base import Cost, RequestView

MILLION = Decimal(1_000_000)
MAX_COUNT = 10**15
# No single API call costs a billion dollars: a larger figure is a parsing accident.
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")
# Inline images are base64 text; reading them as text would count a 1 MB photo as
# 250k tokens. Each one is counted as ``image_input_tokens`` instead.
_DATA_URL = re.compile(rb"data:[\w.+-]+/[\w.+-]+;base64,[A-Za-z0-9+/=\\]+")
_B64_FIELD = re.compile(rb'"data"\s*:\s*"[A-Za-z0-9+/=\\]{256,}"')
_NON_ASCII = bytes(range(0x80, 0x100))
_NOT_LEAD = bytes(range(0xC0))


@dataclass(frozen=True)
class Rates:
    """USD per 1M tokens for one model, as found in the table."""

    model: str  # the table key used, or "fallback"
    input: Decimal
    output: Decimal
    cached_input: Decimal
    cache_write: Decimal
    cache_write_1h: Decimal
    max_output: int | None
    known: bool
    long_context: Mapping[str, Any] | None = None
    # audio and image tokens at their own rates (default: the text rates)
    audio_input: Decimal | None = None
    audio_output: Decimal | None = None
    image_input: Decimal | None = None
    tiers: Mapping[str, Any] | None = None  # service_tier → multiplier (this model's own)

    def tier_x(self, tier: object, table: Mapping[str, Any]) -> Decimal:
        """The multiplier of a response's ``service_tier`` (``priority``, ``flex``…): the model's
        own, else the table's ``service_tiers``, else 1 (``default``, ``auto``, unknown)."""
        if not isinstance(tier, str):
            return Decimal(1)
        for source in (self.tiers, table.get("service_tiers")):
            if isinstance(source, Mapping) and tier in source:
                return dec(source.get(tier), Decimal(1))
        return Decimal(1)

    def for_input(self, input_total: int) -> Rates:
        """Rates for a request of ``input_total`` input tokens (long-context surcharge)."""
        lc = self.long_context
        if not lc:
            return self
        above = opt_int(lc.get("above_input_tokens"))
        if above is None or input_total <= above:
            return self
        ix = dec(lc.get("input_x"), Decimal(1))
        ox = dec(lc.get("output_x"), Decimal(1))
        return Rates(
            self.model, self.input * ix, self.output * ox, self.cached_input * ix,
            self.cache_write * ix, self.cache_write_1h * ix, self.max_output, self.known, None,
            None if self.audio_input is None else self.audio_input * ix,
            None if self.audio_output is None else self.audio_output * ox,
            None if self.image_input is None else self.image_input * ix, self.tiers,
        )


@dataclass(frozen=True)
class Usage:
    """Billed tokens by rate; the fields are disjoint."""

    input: int = 0  # uncached input, at the input rate
    cached: int = 0  # cache reads
    cache_write: int = 0  # 5-minute cache writes
    cache_write_1h: int = 0
    output: int = 0  # includes reasoning/thinking tokens
    web_searches: int = 0
    audio_input: int = 0  # audio tokens in, at the model's audio_input rate
    audio_output: int = 0
    image_input: int = 0
    tier_x: Decimal = Decimal(1)  # service tier multiplier of the token charges
    tool_usd: Decimal = Decimal(0)  # built-in tool fees (web/file search calls, containers)
    tool_note: str = ""

    @property
    def input_total(self) -> int:
        return (self.input + self.cached + self.cache_write + self.cache_write_1h + self.audio_input
                + self.image_input)

    def usd(self, rates: Rates, web_search_usd: Decimal = Decimal(0)) -> Decimal:
        r = rates.for_input(self.input_total)
        tokens = (
            self.input * r.input + self.cached * r.cached_input + self.cache_write * r.cache_write
            + self.cache_write_1h * r.cache_write_1h + self.output * r.output
            + self.audio_input * (r.input if r.audio_input is None else r.audio_input)
            + self.audio_output * (r.output if r.audio_output is None else r.audio_output)
            + self.image_input * (r.input if r.image_input is None else r.image_input)
        )
        return tokens * self.tier_x / MILLION + self.web_searches * web_search_usd + self.tool_usd

    def summary(self) -> str:
        parts = [f"in {self.input}"]
        if self.cached:
            parts.append(f"cache read {self.cached}")
        if self.cache_write:
            parts.append(f"cache write {self.cache_write}")
        if self.cache_write_1h:
            parts.append(f"cache write 1h {self.cache_write_1h}")
        if self.audio_input:
            parts.append(f"audio in {self.audio_input}")
        if self.image_input:
            parts.append(f"image in {self.image_input}")
        parts.append(f"out {self.output}")
        if self.audio_output:
            parts.append(f"audio out {self.audio_output}")
        if self.web_searches:
            parts.append(f"web searches {self.web_searches}")
        if self.tier_x != 1:
            parts.append(f"service tier ×{self.tier_x}")
        if self.tool_note:
            parts.append(self.tool_note)
        return ", ".join(parts)


def dec(value: object, default: Decimal) -> Decimal:
    d = parse_decimal(value)
    return d if d is not None and d >= 0 else default


def opt_int(value: object) -> int | None:
    """A non-negative int from a JSON value (ints and integral floats/strings only).

    Bounded: ``1e999999999`` is a valid JSON number, and turning it into an int
    would take minutes; no real token count or limit has more than 15 digits.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value < MAX_COUNT else None
    d = parse_decimal(value)
    if d is None or d < 0 or d.adjusted() >= 15 or d != d.to_integral_value():
        return None
    return int(d)


def tokens(value: object) -> int:
    """A token count from a usage field: missing or malformed counts as 0."""
    return opt_int(value) or 0


def lookup(table: Mapping[str, Any], model: object, cache_read_x: Decimal,
           cache_write_x: Decimal = Decimal("1.25")) -> Rates:
    """Rates for ``model``: exact key, alias, then the id without its date, else fallback.

    Missing cache rates are derived from ``input`` (``cache_read_x`` × for reads,
    1.25× / 2× for 5-minute / 1-hour writes), so a policy override may give only
    ``input`` and ``output``.

    Remembered per (the table's ``models``, ``aliases`` and ``fallback`` objects, model, the
    multipliers): they are all the rates depend on, and price tables are never changed in place
    (a policy's ``prices:`` makes new ones, which are looked up afresh).
    """
    if not isinstance(model, str):
        return _lookup(table, model, cache_read_x, cache_write_x)
    parts = (table.get("models"), table.get("aliases"), table.get("fallback"))
    key = (id(parts[0]), id(parts[1]), id(parts[2]), model, cache_read_x, cache_write_x)
    hit = _looked_up.get(key)
    if hit is not None and all(a is b for a, b in zip(hit[0], parts, strict=True)):
        return hit[1]
    rates = _lookup(table, model, cache_read_x, cache_write_x)
    if len(_looked_up) >= 4096:
        _looked_up.clear()
    _looked_up[key] = (parts, rates)  # (holding the objects: their ids are not reused while here)
    return rates


_looked_up: dict[tuple[Any, ...], tuple[tuple[Any, ...], Rates]] = {}


def _lookup(table: Mapping[str, Any], model: object, cache_read_x: Decimal, cache_write_x: Decimal) -> Rates:
    models = table.get("models")
    models = models if isinstance(models, Mapping) else {}
    aliases = table.get("aliases")
    aliases = aliases if isinstance(aliases, Mapping) else {}
    key = _resolve(models, aliases, model.lower() if isinstance(model, str) else "")
    entry = models.get(key) if key else None
    known = isinstance(entry, Mapping)
    if not known:
        entry = costliest(table)
        key = "fallback"
    assert isinstance(entry, Mapping)
    inp = dec(entry.get("input"), Decimal(0))
    lc = entry.get("long_context")
    tiers = entry.get("service_tiers")
    return Rates(
        model=str(key),
        input=inp,
        output=dec(entry.get("output"), Decimal(0)),
        cached_input=dec(entry.get("cached_input"), inp * cache_read_x),
        cache_write=dec(entry.get("cache_write"), inp * cache_write_x),
        cache_write_1h=dec(entry.get("cache_write_1h"), inp * 2),
        max_output=opt_int(entry.get("max_output")),
        known=known,
        long_context=lc if isinstance(lc, Mapping) else None,
        audio_input=_opt_rate(entry.get("audio_input")),
        audio_output=_opt_rate(entry.get("audio_output")),
        image_input=_opt_rate(entry.get("image_input")),
        tiers=tiers if isinstance(tiers, Mapping) else None,
    )


def _opt_rate(value: object) -> Decimal | None:
    d = parse_decimal(value)
    return d if d is not None and d >= 0 else None


_RATE_FIELDS = ("input", "output", "cached_input", "cache_write", "cache_write_1h", "audio_input",
                "audio_output", "image_input", "max_output")


def costliest(table: Mapping[str, Any]) -> dict[str, Any]:
    """An unknown model's rates: for each rate, the highest of any listed model and of the
    table's ``fallback`` row. A new model is never priced below the vendor's dearest."""
    models = table.get("models")
    rows = [r for r in (models.values() if isinstance(models, Mapping) else []) if isinstance(r, Mapping)]
    fallback = table.get("fallback")
    if isinstance(fallback, Mapping):
        rows.append(fallback)
    out: dict[str, Any] = {}
    for name in _RATE_FIELDS:
        values = [d for r in rows if (d := parse_decimal(r.get(name))) is not None and d >= 0]
        if values:
            out[name] = max(values)
    lc = [r["long_context"] for r in rows if isinstance(r.get("long_context"), Mapping)]
    if lc:  # the earliest surcharge threshold, the steepest multipliers
        out["long_context"] = {
            "above_input_tokens": min(opt_int(x.get("above_input_tokens")) or MAX_COUNT for x in lc),
            "input_x": max(dec(x.get("input_x"), Decimal(1)) for x in lc),
            "output_x": max(dec(x.get("output_x"), Decimal(1)) for x in lc),
        }
    return out


def known_model(table: Mapping[str, Any], model: object) -> bool:
    """Whether ``model`` has a row: in ``models`` (or an alias, or without its date), or in
    any other per-model section of the table (OpenAI's ``audio``, ``speech``, ``images``)."""
    if not isinstance(model, str) or not model:
        return False
    models = table.get("models")
    aliases = table.get("aliases")
    if _resolve(models if isinstance(models, Mapping) else {}, aliases if isinstance(aliases, Mapping) else {},
                model.lower()):
        return True
    name = model.lower()
    return any(isinstance(section, Mapping) and isinstance(section.get(name) or section.get(
        _DATE_SUFFIX.sub("", name)), Mapping) for key, section in table.items() if key != "models")


def _resolve(models: Mapping[str, Any], aliases: Mapping[str, Any], name: str) -> str | None:
    for candidate in (name, _DATE_SUFFIX.sub("", name)):
        if not candidate:
            continue
        if candidate in models:
            return candidate
        target = aliases.get(candidate)
        if isinstance(target, str) and target in models:
            return target
    return None


def model_of(obj: Mapping[str, Any], req: RequestView) -> object:
    """The model a response names (the dated id it actually ran), else the request's."""
    model = obj.get("model")
    if isinstance(model, str) and model:
        return model
    body = req.json
    return body.get("model") if isinstance(body, Mapping) else None


def describe(rates: Rates, asked: object) -> str:
    """How the model was priced, for notes and bases."""
    if rates.known:
        return rates.model
    return f"unknown model {asked!r} priced at the highest listed rates"


def input_guess(body: bytes, image_tokens: int) -> int:
    """Worst-case-ish input tokens from the request body size, without a tokenizer.

    ASCII runs ~4 bytes a token in English; other scripts run closer to one token
    per character, so non-ASCII characters count one token each (4 bytes/token
    would undercount Chinese or Japanese threefold). The whole JSON body is
    counted (keys, tool schemas, system prompt), which errs high.
    """
    images = len(_DATA_URL.findall(body)) + len(_B64_FIELD.findall(body))
    text = _B64_FIELD.sub(b'""', _DATA_URL.sub(b"", body))
    ascii_bytes = len(text.translate(None, _NON_ASCII))
    non_ascii_chars = len(text.translate(None, _NOT_LEAD))  # UTF-8 lead bytes
    return math.ceil(ascii_bytes / 4) + non_ascii_chars + images * image_tokens


def usd_cost(usage: Usage, rates: Rates, asked: object, web_search_usd: Decimal = Decimal(0),
             extra: str = "") -> Cost:
    """A priced Cost for known usage; "estimated" when the model fell back."""
    usd = usage.usd(rates, web_search_usd)
    note = f"{describe(rates, asked)}: {usage.summary()}"
    if extra:
        note += f"; {extra}"
    return Cost("parsed" if rates.known else "estimated", usd, "USD", usd, note)
