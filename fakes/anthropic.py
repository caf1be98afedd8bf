"""Fake Anthropic: messages (streamed or not) and count_tokens."""

from __future__ import annotations

from typing import Any

from fakes.base import (
    DEFAULT_COMPLETION_TOKENS,
    JSON,
    BadRequest,
    Request,
    Response,
    Route,
    completion_tokens,
    json_response,
    prompt_tokens,
    rand,
    reply_pieces,
    route,
    sse_event,
    sse_response,
)

ANTHROPIC_ALIASES = {
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
}


def anthropic_error(status: int, message: str | None = None, **_: Any) -> JSON:
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "billing_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }
    type_ = kinds.get(status, "api_error")
    default = "Overloaded" if status == 529 else type_.replace("_", " ").capitalize()
    return {
        "type": "error",
        "error": {"type": type_, "message": message or default},
        "request_id": f"req_011C{rand(20)}",
    }


def anthropic_usage(input_tokens: int, output_tokens: int) -> JSON:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _anthropic_body(req: Request) -> JSON:
    body = req.json()
    if not isinstance(body, dict) or "messages" not in body or "model" not in body:
        raise BadRequest(400, "model: Field required; messages: Field required")
    return body


def anthropic_messages(req: Request) -> Response:
    body = _anthropic_body(req)
    if "max_tokens" not in body:
        raise BadRequest(400, "max_tokens: Field required")
    input_tokens = prompt_tokens(body["messages"], body.get("system"))
    output_tokens = completion_tokens(body["max_tokens"])
    stop = "max_tokens" if output_tokens < DEFAULT_COMPLETION_TOKENS else "end_turn"
    pieces = reply_pieces(output_tokens)
    message = {
        "id": f"msg_01{rand(22)}", "type": "message", "role": "assistant",
        "model": ANTHROPIC_ALIASES.get(body["model"], body["model"]),
        "content": [{"type": "text", "text": "".join(pieces)}],
        "stop_reason": stop, "stop_sequence": None,
        "usage": anthropic_usage(input_tokens, output_tokens),
    }  # fmt: skip
    if not body.get("stream"):
        return json_response(message)
    start = {**message, "content": [], "stop_reason": None,
             "usage": anthropic_usage(input_tokens, 1)}  # fmt: skip
    final_usage = {k: v for k, v in message["usage"].items() if k.endswith("tokens")}
    steps: list[JSON] = [
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *({"type": "content_block_delta", "index": 0,
           "delta": {"type": "text_delta", "text": p}} for p in pieces),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
         "usage": final_usage},
        {"type": "message_stop"},
    ]  # fmt: skip
    return sse_response([sse_event(step, step["type"]) for step in steps])


def anthropic_count_tokens(req: Request) -> Response:
    body = _anthropic_body(req)
    return json_response({"input_tokens": prompt_tokens(body["messages"], body.get("system"))})


VENDOR = "anthropic"
ERROR = anthropic_error


def request_id() -> tuple[str, str] | None:
    """The header this vendor names its request id in, with a fresh id."""
    return "request-id", f"req_011C{rand(20)}"

ROUTES: list[Route] = [
    route("POST", r"/v1/messages", VENDOR, anthropic_messages),
    route("POST", r"/v1/messages/count_tokens", VENDOR, anthropic_count_tokens),
]
