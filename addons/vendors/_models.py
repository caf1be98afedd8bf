"""Where an LLM request names its model and its output limit: one :class:`LLMShape` per API style.

The model-rules stage (``stages/models.py``) asks a vendor's ``llm`` shape three things:
which model the request names, which output limits it sets (and the provider's default
when it sets none), and how to rewrite those limits to a ceiling (``clamp``). Pure
functions on a :class:`RequestView`, no I/O, like the rest of ``vendors/``.

Reading is strict, because the vendor must read the same thing the gateway checked: a
JSON body with the model or a limit given twice (``{"model": "a", "model": "b"}``, which
parsers resolve differently), or two ``model`` fields in a multipart form, raises
:class:`Ambiguous` and the request is refused.

- ``openai`` (OpenAI and every OpenAI-compatible provider): ``model`` in the JSON body or
  in a multipart form (audio transcriptions, image edits); limits ``max_completion_tokens``
  and ``max_tokens`` (chat, completions), ``max_output_tokens`` (Responses API).
- ``anthropic``: ``model``; limit ``max_tokens`` (``max_tokens_to_sample`` on the legacy
  ``/v1/complete``).
- ``gemini``: the model is in the path (``/v1beta/models/gemini-2.5-flash:generateContent``);
  limit ``generationConfig.maxOutputTokens``.

A request that sets no limit gets the provider's default: the model's ``max_output`` in
the price table (what the provider allows when none is asked), else the table's
``default_max_output_tokens``; ``None`` when neither is known (the stage then treats the
request as over any ceiling: it cannot prove otherwise).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import unquote

from . import _llm
from .base import RequestView


class Ambiguous(ValueError):
    """The request names its model or limit in a way two parsers could read differently."""


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise Ambiguous(f"the JSON body gives {k!r} twice")
        out[k] = v
    return out


def strict_json(body: bytes) -> Any:
    """The body as JSON (``None`` if it is not JSON); duplicate keys at any level raise."""
    if not body:
        return None
    try:
        return json.loads(body, object_pairs_hook=_no_dupes)
    except Ambiguous:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def multipart_fields(req: RequestView, name: str) -> list[str]:
    """The text values of form field ``name`` in a ``multipart/form-data`` body."""
    ctype = req.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        return []
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + req.body)
    if not msg.is_multipart():
        return []
    out = []
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == name:
            payload = part.get_payload(decode=True)
            out.append(payload.decode("utf-8", "replace").strip() if isinstance(payload, bytes) else "")
    return out


@dataclass(frozen=True)
class Limit:
    """One output-limit field a request sets: its path in the JSON body and its value."""

    path: tuple[str, ...]
    value: int


@dataclass(frozen=True)
class LLMShape:
    name: str
    model: Callable[[RequestView], str | None]
    limits: Callable[[RequestView], list[Limit]]  # the limits the request sets
    applies: Callable[[RequestView], bool]  # is this a generation request with an output limit?
    clamp_field: Callable[[RequestView], tuple[str, ...]]  # where a missing limit is written

    def default_output(self, req: RequestView, table: Mapping[str, Any]) -> int | None:
        """The provider's output limit when the request sets none (see the module doc)."""
        model = self.model(req)
        rates = _llm.lookup(table, model, cache_read_x=Decimal(1))
        if rates.known and rates.max_output:
            return rates.max_output
        return _llm.opt_int(table.get("default_max_output_tokens"))

    def clamped(self, req: RequestView, ceiling: int) -> bytes:
        """The JSON body with every limit above ``ceiling`` (or a missing one) set to it."""
        body = strict_json(req.body)
        if not isinstance(body, dict):
            raise Ambiguous("the request body is not a JSON object; its output limit cannot be set")
        limits = self.limits(req)
        for lim in limits or [Limit(self.clamp_field(req), ceiling + 1)]:
            if lim.value > ceiling:
                node = body
                for part in lim.path[:-1]:
                    child = node.get(part)
                    if not isinstance(child, dict):
                        child = node[part] = {}
                    node = child
                node[lim.path[-1]] = ceiling
        return json.dumps(body, separators=(",", ":")).encode()


def _json_obj(req: RequestView) -> dict[str, Any]:
    """The body as a strict JSON object (``{}`` if it is not one), parsed once per request view."""
    cache = req.__dict__  # RequestView is frozen; its __dict__ holds cached values like cached_property
    if "_strict_json" not in cache:
        data = strict_json(req.body)
        cache["_strict_json"] = data if isinstance(data, dict) else {}
    return cache["_strict_json"]


def _body_model(req: RequestView) -> str | None:
    """``model`` from a JSON body or, for uploads, a multipart form."""
    if req.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        found = multipart_fields(req, "model")
        if len(found) > 1:
            raise Ambiguous("the form gives 'model' twice")
        return found[0] if found else None
    model = _json_obj(req).get("model")
    if model is not None and not isinstance(model, str):
        raise Ambiguous("'model' is not a string")
    return model


def _int_limits(obj: Mapping[str, Any], fields: tuple[str, ...], prefix: tuple[str, ...] = ()) -> list[Limit]:
    out = []
    for name in fields:
        if name in obj and obj[name] is not None:
            value = _llm.opt_int(obj[name])
            if value is None:
                raise Ambiguous(f"{'.'.join((*prefix, name))} is not a whole number of tokens")
            out.append(Limit((*prefix, name), value))
    return out


def _post_suffix(req: RequestView, *suffixes: str) -> str | None:
    if req.method.upper() != "POST":
        return None
    path = req.path.rstrip("/")
    return next((s for s in suffixes if path.endswith(s)), None)


# --- openai and compatible -------------------------------------------------------------------

_OPENAI_FIELDS = {
    "/chat/completions": ("max_completion_tokens", "max_tokens"),
    "/completions": ("max_tokens",),
    "/responses": ("max_output_tokens",),
}


def _openai_kind(req: RequestView) -> str | None:
    return _post_suffix(req, "/chat/completions", "/responses", "/completions")


def _openai_limits(req: RequestView) -> list[Limit]:
    kind = _openai_kind(req)
    return _int_limits(_json_obj(req), _OPENAI_FIELDS[kind]) if kind else []


def openai_shape(missing_field: str = "max_completion_tokens") -> LLMShape:
    """OpenAI's API style; ``missing_field`` is what a clamp adds to a chat request that set no
    limit (OpenAI: ``max_completion_tokens``; compatible providers: ``max_tokens``)."""

    def clamp_field(req: RequestView) -> tuple[str, ...]:
        kind = _openai_kind(req)
        return ("max_output_tokens",) if kind == "/responses" else (
            (missing_field,) if kind == "/chat/completions" else ("max_tokens",))

    return LLMShape(
        name="openai", model=_body_model, limits=_openai_limits,
        applies=lambda req: _openai_kind(req) is not None, clamp_field=clamp_field,
    )


# --- anthropic -----------------------------------------------------------------------------------


def _anthropic_kind(req: RequestView) -> str | None:
    if "/count_tokens" in req.path:
        return None
    return _post_suffix(req, "/messages", "/complete")


def _anthropic_limits(req: RequestView) -> list[Limit]:
    kind = _anthropic_kind(req)
    if kind is None:
        return []
    return _int_limits(_json_obj(req), ("max_tokens",) if kind == "/messages" else ("max_tokens_to_sample",))


ANTHROPIC = LLMShape(
    name="anthropic", model=_body_model, limits=_anthropic_limits,
    applies=lambda req: _anthropic_kind(req) is not None,
    clamp_field=lambda req: ("max_tokens",) if _anthropic_kind(req) == "/messages" else ("max_tokens_to_sample",),
)


# --- gemini ----------------------------------------------------------------------------------------

GEMINI_GENERATE = ("generateContent", "streamGenerateContent")


def gemini_target(path: str) -> tuple[str | None, str | None]:
    """(model, method) of a Gemini path ``/v1beta/models/{model}:{method}`` (decoded, so
    ``%3A`` cannot hide the colon); tuned models keep their ``tunedModels/`` prefix."""
    segments = [unquote(s) for s in path.split("/") if s]
    for i, seg in enumerate(segments):
        if seg in ("models", "tunedModels") and i + 1 < len(segments):
            rest = "/".join(segments[i + 1:])
            model, sep, method = rest.partition(":")
            name = model if seg == "models" else f"tunedModels/{model}"
            return (name or None), (method if sep else None)
    return None, None


def _gemini_model(req: RequestView) -> str | None:
    model, _ = gemini_target(req.path)
    body_model = _json_obj(req).get("model")  # batch and cached-content bodies name one too
    if isinstance(body_model, str) and model is None:
        model = body_model.removeprefix("models/")
    return model


def _gemini_applies(req: RequestView) -> bool:
    _, method = gemini_target(req.path)
    return req.method.upper() == "POST" and method in GEMINI_GENERATE


def _gemini_limits(req: RequestView) -> list[Limit]:
    if not _gemini_applies(req):
        return []
    config = _json_obj(req).get("generationConfig")
    if config is None:
        return []
    if not isinstance(config, dict):
        raise Ambiguous("generationConfig is not an object")
    return _int_limits(config, ("maxOutputTokens",), ("generationConfig",))


GEMINI = LLMShape(
    name="gemini", model=_gemini_model, limits=_gemini_limits, applies=_gemini_applies,
    clamp_field=lambda req: ("generationConfig", "maxOutputTokens"),
)
