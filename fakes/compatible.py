"""Fake OpenAI-compatible providers at their own base paths (the fake routes by path only):
Groq ``/openai/v1``, Fireworks ``/inference/v1``, DeepSeek ``/chat/completions`` (usage with
``prompt_cache_hit_tokens``/``prompt_cache_miss_tokens``) and OpenRouter ``/api/v1`` (usage
with ``cost``: $1 per 1M prompt tokens + $2 per 1M completion tokens, what it "charged").
Mistral, xAI and Together use ``/v1/chat/completions``: the OpenAI fake answers those.
"""

from __future__ import annotations

import json
from typing import Any

from fakes.base import JSON, Request, Response, Route, route
from fakes.openai import openai_chat_completions, openai_error

VENDOR = "compatible"
ERROR = openai_error


def request_id() -> tuple[str, str] | None:
    return None


def _rewrite_usage(resp: Response, change: Any) -> Response:
    """Apply ``change(usage)`` to the usage block of a chat answer (plain or streamed)."""
    if resp.events is None:
        obj = json.loads(resp.body)
        if isinstance(obj.get("usage"), dict):
            change(obj["usage"])
        resp.body = json.dumps(obj).encode()
        return resp
    events = []
    for ev in resp.events:
        text = ev.decode()
        if text.startswith("data: {") and '"usage": {' in text:
            obj = json.loads(text[len("data: "):])
            change(obj["usage"])
            ev = f"data: {json.dumps(obj)}\n\n".encode()
        events.append(ev)
    resp.events = events
    return resp


def openrouter_cost(usage: JSON) -> None:
    usage["cost"] = round(usage["prompt_tokens"] * 1e-6 + usage["completion_tokens"] * 2e-6, 12)
    usage["is_byok"] = False


def deepseek_cache(usage: JSON) -> None:
    hit = usage["prompt_tokens"] // 2
    usage["prompt_cache_hit_tokens"] = hit
    usage["prompt_cache_miss_tokens"] = usage["prompt_tokens"] - hit
    usage.pop("prompt_tokens_details", None)


def openrouter(req: Request) -> Response:
    return _rewrite_usage(openai_chat_completions(req), openrouter_cost)


def deepseek(req: Request) -> Response:
    return _rewrite_usage(openai_chat_completions(req), deepseek_cache)


ROUTES: list[Route] = [
    route("POST", r"/openai/v1/chat/completions", VENDOR, openai_chat_completions),
    route("POST", r"/inference/v1/chat/completions", VENDOR, openai_chat_completions),
    route("POST", r"/api/v1/chat/completions", VENDOR, openrouter),
    route("POST", r"/chat/completions", VENDOR, deepseek),
]
