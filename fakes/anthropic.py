"""Fake Anthropic: messages (streamed or not), count_tokens, and message batches (create, retrieve,
results: the shapes of anthropic-sdk-python's ``MessageBatch`` and ``MessageBatchIndividualResponse``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
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


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def anthropic_create_batch(req: Request) -> Response:
    """POST /v1/messages/batches: in_progress; ended at the next retrieve (``X-Fake-Ready-After: N``:
    after N). Each request is answered as /v1/messages would (same token counts)."""
    body = req.json()
    requests = body.get("requests") if isinstance(body, dict) else None
    if not isinstance(requests, list) or not requests:
        raise BadRequest(400, "requests: Field required")
    results = []
    for item in requests:
        params = item.get("params") if isinstance(item, dict) else None
        if not isinstance(params, dict) or "messages" not in params or "model" not in params:
            raise BadRequest(400, "requests.params: model and messages are required")
        out = completion_tokens(params.get("max_tokens"))
        model = ANTHROPIC_ALIASES.get(str(params["model"]), str(params["model"]))
        results.append({"custom_id": item.get("custom_id"), "result": {"type": "succeeded", "message": {
            "id": f"msg_{rand(24)}", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "".join(reply_pieces(out))}],
            "stop_reason": "end_turn" if out == DEFAULT_COMPLETION_TOKENS else "max_tokens", "stop_sequence": None,
            "usage": anthropic_usage(prompt_tokens(params["messages"], params.get("system")), out)}}})  # fmt: skip
    created = datetime.now(UTC)
    batch = {
        "id": f"msgbatch_{rand(24)}", "type": "message_batch", "processing_status": "in_progress",
        "request_counts": {"processing": len(results), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
        "ended_at": None, "created_at": _iso(created), "expires_at": _iso(created + timedelta(hours=24)),
        "archived_at": None, "cancel_initiated_at": None, "results_url": None,
    }  # fmt: skip
    try:
        ready_after = max(0, int(req.headers.get("X-Fake-Ready-After") or 0))
    except ValueError:
        ready_after = 0
    with req.state.lock:
        req.state.anthropic_batches[batch["id"]] = {"batch": batch, "results": results, "ready_after": ready_after}
    return json_response(batch)


def anthropic_get_batch(req: Request) -> Response:
    with req.state.lock:
        entry = req.state.anthropic_batches.get(req.params["id"])
        if entry is None:
            raise BadRequest(404, f"Message batch {req.params['id']} not found")
        batch = entry["batch"]
        if entry["ready_after"] > 0:
            entry["ready_after"] -= 1
        elif batch["processing_status"] != "ended":
            n = len(entry["results"])
            batch.update(processing_status="ended", ended_at=_iso(datetime.now(UTC)),
                         request_counts={"processing": 0, "succeeded": n, "errored": 0, "canceled": 0, "expired": 0},
                         results_url=f"https://api.anthropic.com/v1/messages/batches/{batch['id']}/results")
        return json_response(batch)


def anthropic_batch_results(req: Request) -> Response:
    with req.state.lock:
        entry = req.state.anthropic_batches.get(req.params["id"])
        if entry is None or entry["batch"]["processing_status"] != "ended":
            raise BadRequest(404, f"Message batch {req.params['id']} has no results yet")
        body = "".join(json.dumps(r) + "\n" for r in entry["results"]).encode()
    return Response(200, body, content_type="application/binary")


def request_id() -> tuple[str, str] | None:
    """The header this vendor names its request id in, with a fresh id."""
    return "request-id", f"req_011C{rand(20)}"

ROUTES: list[Route] = [
    route("POST", r"/v1/messages", VENDOR, anthropic_messages),
    route("POST", r"/v1/messages/count_tokens", VENDOR, anthropic_count_tokens),
    route("POST", r"/v1/messages/batches", VENDOR, anthropic_create_batch),
    route("GET", r"/v1/messages/batches/(?P<id>[^/]+)", VENDOR, anthropic_get_batch),
    route("GET", r"/v1/messages/batches/(?P<id>[^/]+)/results", VENDOR, anthropic_batch_results),
]
