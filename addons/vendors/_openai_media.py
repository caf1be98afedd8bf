"""OpenAI endpoints billed in units that are not chat tokens: audio in, audio out, images.

Rates are in ``prices/openai.yaml`` under ``audio``, ``speech`` and ``images`` (policy
``prices: {openai: {...}}`` overrides, as for models).

- ``POST /v1/audio/transcriptions`` and ``/v1/audio/translations`` (multipart: ``model``
  and ``file``). Estimate: the audio's duration (exact from a WAV header, else bounded
  by the file size at ``audio_min_bytes_per_second``) × ``per_minute``. Cost: a ``usage``
  of ``type: "duration"`` → its ``seconds`` × ``per_minute`` (never read as zero tokens);
  ``type: "tokens"`` → audio and text input tokens and output tokens at the model's
  token rates; no usage (``response_format`` text/srt/vtt, older answers) → the estimate,
  marked "estimated".
- ``POST /v1/audio/speech`` (JSON ``model``, ``input``): characters of ``input`` ×
  ``per_character`` ("parsed" for tts-1/tts-1-hd, which bill exactly that; "estimated"
  for gpt-4o-mini-tts, which bills tokens and reports none in the audio it returns).
- ``POST /v1/images/generations`` (JSON), ``/v1/images/edits`` and ``/variations``
  (multipart): DALL·E per image by model, ``quality`` and ``size``; GPT Image models by
  tokens: the estimate is ``n`` × the output tokens of the asked quality and size (+ the
  prompt, + each input image of an edit), the cost is the response's ``usage`` (text
  and image input tokens, output tokens) or, without usage, the images returned ×
  the per-image figure. DALL·E's cost counts the images in ``data``.

An unknown model is priced at the most expensive listed rates of its kind and flagged.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from . import _llm
from ._sse import find_object
from .base import Cost, Estimate, RequestView, ResponseView

MILLION = _llm.MILLION
_KINDS = {
    "/audio/transcriptions": "transcription",
    "/audio/translations": "transcription",
    "/audio/speech": "speech",
    "/images/generations": "image",
    "/images/edits": "image",
    "/images/variations": "image",
}
_DALLE_DEFAULT = {"dall-e-2": ("standard", "1024x1024"), "dall-e-3": ("standard", "1024x1024")}


def kind(req: RequestView) -> str | None:
    if req.method.upper() != "POST":
        return None
    path = req.path.rstrip("/")
    return next((k for suffix, k in _KINDS.items() if path.endswith(suffix)), None)


def _section(table: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = table.get(name)
    return section if isinstance(section, Mapping) else {}


def _entry(section: Mapping[str, Any], model: str | None, fallback: str | None = None) -> tuple[str, Mapping[str, Any], bool]:
    """(name, row, known): the model's row, else the fallback row (flagged)."""
    key = (model or "").lower()
    if key and isinstance(section.get(key), Mapping):
        return key, section[key], True
    dated = _llm._DATE_SUFFIX.sub("", key)
    if dated and isinstance(section.get(dated), Mapping):
        return dated, section[dated], True
    if fallback and isinstance(section.get(fallback), Mapping):
        return fallback, section[fallback], False
    return _costliest(section)


def _costliest(section: Mapping[str, Any]) -> tuple[str, Mapping[str, Any], bool]:
    """The row with the highest per-unit rate (an unknown model is never priced cheaper)."""
    best: tuple[Decimal, str, Mapping[str, Any]] = (Decimal(-1), "", {})
    for name, row in section.items():
        if isinstance(row, Mapping):
            rate = max((_llm.dec(v, Decimal(0)) for v in row.values() if not isinstance(v, Mapping | bool)),
                       default=Decimal(0))
            if rate > best[0]:
                best = (rate, str(name), row)
    return best[1], best[2], False


def _label(name: str, known: bool, asked: object) -> str:
    return name if known else f"unknown model {asked!r} priced as {name} (the highest listed rate)"


def _priced(usd: Decimal, known: bool, note: str, exact: bool = True) -> Cost:
    status = "parsed" if known and exact else "estimated"
    return Cost(status, usd, "USD", usd, note)


# --- audio in --------------------------------------------------------------------------------


def _wav_seconds(data: bytes) -> Decimal | None:
    """Duration of a PCM WAV file from its header (``fmt`` byte rate, ``data`` size)."""
    if len(data) < 44 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos, byte_rate, size = 12, 0, None
    while pos + 8 <= len(data):
        chunk, length = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        if chunk == b"fmt " and length >= 16:
            byte_rate = struct.unpack("<I", data[pos + 16:pos + 20])[0]
        elif chunk == b"data":
            size = min(length, len(data) - pos - 8)
            break
        pos += 8 + length + (length & 1)
    if not byte_rate or size is None:
        return None
    return Decimal(size) / Decimal(byte_rate)


def _audio_seconds(req: RequestView, table: Mapping[str, Any]) -> tuple[Decimal, str]:
    files = req.multipart.get("file") or []
    data = files[0][0] if files else b""
    if (exact := _wav_seconds(data)) is not None:
        return exact, f"{exact:.1f} s of WAV audio"
    rate = _llm.dec(table.get("audio_min_bytes_per_second"), Decimal(2000)) or Decimal(2000)
    size = len(data) if files else len(req.body)
    seconds = Decimal(math.ceil(Decimal(size) / rate))
    return seconds, f"at most {seconds} s of audio ({size} bytes at {rate} B/s)"


def _transcription_estimate(req: RequestView, table: Mapping[str, Any]) -> Estimate:
    model = req.param("model")
    name, row, known = _entry(_section(table, "audio"), model, "gpt-4o-transcribe")
    seconds, how = _audio_seconds(req, table)
    usd = seconds * _llm.dec(row.get("per_minute"), Decimal(0)) / 60
    return Estimate(usd=usd, moves_money=True, currency="USD", amount=usd,
                    basis=f"{_label(name, known, model)}: {how} × per_minute")


def _transcription_cost(req: RequestView, resp: ResponseView, table: Mapping[str, Any],
                        estimate: Estimate) -> Cost:
    obj = resp.json
    usage = obj.get("usage") if isinstance(obj, Mapping) else None
    if usage is None and resp.body.lstrip().startswith((b"data:", b"event:")):
        # stream=true: usage rides on the final transcript.text.done event
        usage = find_object(resp.body.decode("utf-8", "replace"), "usage")
    model = req.param("model")
    name, row, known = _entry(_section(table, "audio"), model, "gpt-4o-transcribe")
    label = _label(name, known, model)
    if isinstance(usage, Mapping) and usage.get("type") == "duration":
        seconds = _llm.dec(usage.get("seconds"), Decimal(-1))
        if seconds < 0:
            return Cost("unknown", None, note=f"{label}: duration usage without seconds")
        usd = seconds * _llm.dec(row.get("per_minute"), Decimal(0)) / 60
        return _priced(usd, known, f"{label}: {seconds} s of audio")
    if isinstance(usage, Mapping) and ("input_tokens" in usage or usage.get("type") == "tokens"):
        details = usage.get("input_token_details") or usage.get("input_tokens_details")
        details = details if isinstance(details, Mapping) else {}
        total_in = _llm.tokens(usage.get("input_tokens"))
        audio = min(_llm.tokens(details.get("audio_tokens")), total_in)
        text = total_in - audio
        out = _llm.tokens(usage.get("output_tokens"))
        per_min = _llm.dec(row.get("per_minute"), Decimal(0))
        audio_rate = _llm.dec(row.get("audio_input"), per_min)
        usd = (audio * audio_rate + text * _llm.dec(row.get("text_input"), Decimal(0))
               + out * _llm.dec(row.get("output"), Decimal(0))) / MILLION
        return _priced(usd, known, f"{label}: audio in {audio}, text in {text}, out {out} tokens")
    return _from_estimate(estimate, f"{label}: no usage in the response")


# --- audio out ---------------------------------------------------------------------------------


def _speech(req: RequestView, table: Mapping[str, Any]) -> tuple[Decimal, bool, str]:
    model = req.param("model")
    name, row, known = _entry(_section(table, "speech"), model, "tts-1-hd")
    text = req.param("input") or ""
    usd = len(text) * _llm.dec(row.get("per_character"), Decimal(0))
    exact = known and row.get("estimated") is not True
    return usd, exact, f"{_label(name, known, model)}: {len(text)} characters of input"


# --- images --------------------------------------------------------------------------------------


def _count(value: object, default: int = 1) -> int:
    n = _llm.opt_int(value)
    return max(min(n, 10), 1) if n is not None else default  # the API allows 1..10


def _image_tokens(table: Mapping[str, Any], quality: str, size: str) -> tuple[int, str]:
    grid = _section(table, "image_output_tokens")
    qualities = [quality] if isinstance(grid.get(quality), Mapping) else list(grid)  # auto: any
    best, label = 0, ""
    for q in qualities:
        row = grid.get(q)
        if not isinstance(row, Mapping):
            continue
        sizes = [size] if size in row else list(row)  # auto or unknown size: the largest
        for s in sizes:
            tokens = _llm.tokens(row.get(s))
            if tokens > best:
                best, label = tokens, f"{q} {s}"
    return best, label


def _image_row(table: Mapping[str, Any], model: str | None) -> tuple[str, Mapping[str, Any], bool]:
    section = _section(table, "images")
    fallback = table.get("image_fallback")
    return _entry(section, model or "dall-e-2", fallback if isinstance(fallback, str) else None)


def _dalle_price(row: Mapping[str, Any], quality: str, size: str) -> tuple[Decimal, str]:
    grid = row.get("per_image")
    grid = grid if isinstance(grid, Mapping) else {}
    q = quality if isinstance(grid.get(quality), Mapping) else ("standard" if quality in ("", "auto") else "")
    rows = [grid[q]] if q and isinstance(grid.get(q), Mapping) else [r for r in grid.values() if isinstance(r, Mapping)]
    best, label = Decimal(0), ""
    for r in rows:
        for s, v in r.items():
            if size in ("", "auto") or s == size or size not in r:
                price = _llm.dec(v, Decimal(0))
                if price > best:
                    best, label = price, f"{q or 'any quality'} {s}"
    return best, label


def _image_estimate(req: RequestView, table: Mapping[str, Any]) -> tuple[Decimal, bool, str]:
    model = req.param("model")
    name, row, known = _image_row(table, model)
    n = _count(req.param("n"))
    quality = (req.param("quality") or "").lower()
    size = (req.param("size") or "").lower()
    if "per_image" in row:
        default_q, default_s = _DALLE_DEFAULT.get(name, ("standard", "1024x1024"))
        each, how = _dalle_price(row, quality or default_q, size or default_s)
        return n * each, known, f"{_label(name, known, model)}: {n} image(s), {how} at ${each}"
    out_tokens, how = _image_tokens(table, quality or "auto", size or "auto")
    prompt = _llm.input_guess((req.param("prompt") or "").encode(), 0)
    inputs = len(req.multipart.get("image") or []) + len(req.multipart.get("image[]") or [])
    image_in = inputs * _llm.tokens(table.get("image_edit_input_tokens"))
    usd = (n * out_tokens * _llm.dec(row.get("output"), Decimal(0))
           + prompt * _llm.dec(row.get("text_input"), Decimal(0))
           + image_in * _llm.dec(row.get("image_input"), Decimal(0))) / MILLION
    basis = f"{_label(name, known, model)}: {n} × {out_tokens} output tokens ({how}) + ~{prompt} prompt tokens"
    if inputs:
        basis += f" + {inputs} input image(s)"
    return usd, False, basis


def _image_cost(req: RequestView, resp: ResponseView, table: Mapping[str, Any], estimate: Estimate) -> Cost:
    obj = resp.json
    if not isinstance(obj, Mapping):
        return _from_estimate(estimate, "image response is not JSON")
    model = req.param("model")
    name, row, known = _image_row(table, model)
    label = _label(name, known, model)
    usage = obj.get("usage")
    if isinstance(usage, Mapping) and "per_image" not in row:
        details = usage.get("input_tokens_details")
        details = details if isinstance(details, Mapping) else {}
        total_in = _llm.tokens(usage.get("input_tokens"))
        image_in = min(_llm.tokens(details.get("image_tokens")), total_in)
        text_in = total_in - image_in
        out = _llm.tokens(usage.get("output_tokens"))
        usd = (text_in * _llm.dec(row.get("text_input"), Decimal(0))
               + image_in * _llm.dec(row.get("image_input"), Decimal(0))
               + out * _llm.dec(row.get("output"), Decimal(0))) / MILLION
        return _priced(usd, known, f"{label}: text in {text_in}, image in {image_in}, image out {out} tokens")
    data = obj.get("data")
    if not isinstance(data, list):
        return _from_estimate(estimate, f"{label}: no images listed in the response")
    made = len(data)
    if made == 0:
        return Cost("zero", Decimal(0), note=f"{label}: no image generated")
    if "per_image" in row:
        default_q, default_s = _DALLE_DEFAULT.get(name, ("standard", "1024x1024"))
        quality = (req.param("quality") or default_q).lower()
        size = (req.param("size") or default_s).lower()
        each, how = _dalle_price(row, quality, size)
        return _priced(made * each, known, f"{label}: {made} image(s), {how} at ${each}")
    usd, _, basis = _image_estimate(req, table)
    asked = _count(req.param("n"))
    usd = usd * made / asked
    return Cost("estimated", usd, "USD", usd, f"{basis}; {made} made, no usage in the response")


# --- entry points ----------------------------------------------------------------------------------


def _from_estimate(estimate: Estimate, why: str) -> Cost:
    usd = estimate.usd
    if usd is None:
        return Cost("unknown", None, note=f"{why}; no estimate to fall back on")
    return Cost("estimated", usd, "USD", usd, f"{why}; counted at the estimate")


def estimate(what: str, req: RequestView, table: Mapping[str, Any]) -> Estimate:
    if what == "transcription":
        return _transcription_estimate(req, table)
    if what == "speech":
        usd, _, basis = _speech(req, table)
    else:
        usd, _, basis = _image_estimate(req, table)
    return Estimate(usd=usd, moves_money=True, currency="USD", amount=usd, basis=basis)


def cost(what: str, req: RequestView, resp: ResponseView, table: Mapping[str, Any], est: Estimate) -> Cost:
    if what == "transcription":
        return _transcription_cost(req, resp, table, est)
    if what == "speech":
        if not resp.body:
            return _from_estimate(est, "speech: empty response")
        usd, exact, note = _speech(req, table)
        return Cost("parsed" if exact else "estimated", usd, "USD", usd, note)
    return _image_cost(req, resp, table, est)
