"""Fake OpenAI: chat completions (streamed or not, ``stream_options.include_usage``), the
Responses API and embeddings, with real-shaped usage blocks."""

from __future__ import annotations

import base64
import json
import math
import struct
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from fakes.base import (
    DEFAULT_COMPLETION_TOKENS,
    JSON,
    BadRequest,
    Request,
    Response,
    Route,
    completion_tokens,
    int_param,
    json_response,
    now,
    prompt_tokens,
    rand,
    rand_hex,
    reply_pieces,
    route,
    sse_event,
    sse_response,
    text_tokens,
)

OPENAI_SNAPSHOTS = {
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "o3-mini": "o3-mini-2025-01-31",
    "o4-mini": "o4-mini-2025-04-16",
}


def openai_error(status: int, message: str | None = None, **extra: Any) -> JSON:
    kinds = {
        400: ("invalid_request_error", None, "Invalid request."),
        401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
        403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
        404: ("invalid_request_error", "model_not_found", "The model does not exist."),
        429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    }
    type_, code, default = kinds.get(status, ("server_error", None, "The server had an error."))
    err: JSON = {"message": message or default, "type": type_, "param": None, "code": code}
    err.update(extra)
    return {"error": err}


def openai_model(name: Any) -> str:
    return OPENAI_SNAPSHOTS.get(str(name), str(name))


def openai_usage(prompt: int, completion: int) -> JSON:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
        },
    }  # fmt: skip


def openai_chat_completions(req: Request) -> Response:
    body = req.json()
    if not isinstance(body, dict) or "model" not in body or "messages" not in body:
        raise BadRequest(400, "Missing required parameter: 'model' or 'messages'.")
    n = int_param(body.get("n") or 1, "n")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    per_choice = completion_tokens(limit)
    finish = "length" if per_choice < DEFAULT_COMPLETION_TOKENS else "stop"
    usage = openai_usage(prompt_tokens(body["messages"]), per_choice * n)
    head = {
        "id": f"chatcmpl-{rand(29)}", "created": now(), "model": openai_model(body["model"]),
        "service_tier": "default", "system_fingerprint": f"fp_{rand_hex(10)}",
    }  # fmt: skip
    pieces = reply_pieces(per_choice)
    if not body.get("stream"):
        choices = [
            {
                "index": i, "logprobs": None, "finish_reason": finish,
                "message": {"role": "assistant", "content": "".join(pieces), "refusal": None,
                            "annotations": []},
            }  # fmt: skip
            for i in range(n)
        ]
        return json_response({**head, "object": "chat.completion", "choices": choices,
                              "usage": usage})  # fmt: skip
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list[JSON], **more: Any) -> bytes:
        return sse_event({**head, "object": "chat.completion.chunk", "choices": choices,
                          **extra, **more})  # fmt: skip

    events = []
    for i in range(n):
        delta: JSON = {"role": "assistant", "content": "", "refusal": None}
        events.append(chunk([{"index": i, "delta": delta, "logprobs": None,
                              "finish_reason": None}]))  # fmt: skip
        for piece in pieces:
            events.append(chunk([{"index": i, "delta": {"content": piece}, "logprobs": None,
                                  "finish_reason": None}]))  # fmt: skip
        events.append(chunk([{"index": i, "delta": {}, "logprobs": None,
                              "finish_reason": finish}]))  # fmt: skip
    if include_usage:
        events.append(chunk([], usage=usage))
    events.append(sse_event("[DONE]"))
    return sse_response(events)


def _responses_usage(input_tokens: int, output_tokens: int) -> JSON:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def openai_responses(req: Request) -> Response:
    body = req.json()
    if not isinstance(body, dict) or "model" not in body:
        raise BadRequest(400, "Missing required parameter: 'model'.", param="model")
    output_tokens = completion_tokens(body.get("max_output_tokens"))
    complete = output_tokens >= DEFAULT_COMPLETION_TOKENS
    usage = _responses_usage(prompt_tokens(body.get("input"), body.get("instructions")),
                             output_tokens)  # fmt: skip
    pieces = reply_pieces(output_tokens)
    text = "".join(pieces)
    resp_id, msg_id = f"resp_{rand_hex(48)}", f"msg_{rand_hex(48)}"
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    message = {"id": msg_id, "type": "message", "status": "completed" if complete else
               "incomplete", "role": "assistant", "content": [part]}  # fmt: skip
    final = {
        "id": resp_id, "object": "response", "created_at": now(),
        "status": "completed" if complete else "incomplete",
        "completed_at": now() if complete else None, "error": None,
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"), "model": openai_model(body["model"]),
        "output": [message], "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None}, "service_tier": "default",
        "store": body.get("store", True), "temperature": body.get("temperature", 1.0),
        "text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto",
        "tools": [], "top_p": body.get("top_p", 1.0), "truncation": "disabled",
        "usage": usage, "user": None, "metadata": body.get("metadata") or {},
    }  # fmt: skip
    if not body.get("stream"):
        return json_response(final)
    pending = {**final, "status": "in_progress", "completed_at": None,
               "incomplete_details": None, "output": [], "usage": None}  # fmt: skip
    where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
    steps: list[JSON] = [
        {"type": "response.created", "response": pending},
        {"type": "response.in_progress", "response": pending},
        {"type": "response.output_item.added", "output_index": 0,
         "item": {**message, "status": "in_progress", "content": []}},
        {"type": "response.content_part.added", **where,
         "part": {**part, "text": "", "logprobs": []}},
        *({"type": "response.output_text.delta", **where, "delta": p, "logprobs": []}
          for p in pieces),
        {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **where, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed" if complete else "response.incomplete", "response": final},
    ]  # fmt: skip
    return sse_response(
        [sse_event({**step, "sequence_number": i}, step["type"]) for i, step in enumerate(steps)]
    )


def _embedding_vector(seed: int, dims: int) -> list[float]:
    return [round(math.sin(seed * 7.1 + j * 0.37) * 0.05, 7) for j in range(dims)]


def openai_embeddings(req: Request) -> Response:
    body = req.json()
    if not isinstance(body, dict) or "model" not in body or "input" not in body:
        raise BadRequest(400, "Missing required parameter: 'model' or 'input'.")
    raw = body["input"]
    inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    model = str(body["model"])
    dims = int_param(body.get("dimensions") or (3072 if "large" in model else 1536), "dimensions")
    data, total = [], 0
    for i, item in enumerate(inputs):
        total += len(item) if isinstance(item, list) else text_tokens(str(item))
        vector = _embedding_vector(i + len(str(item)), dims)
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return json_response({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    })  # fmt: skip


def _multipart(req: Request) -> dict[str, bytes]:
    """Form fields of a multipart body (the last value of each), as the SDKs upload files."""
    ctype = req.headers.get("content-type", "")
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + req.body)
    out: dict[str, bytes] = {}
    for part in msg.iter_parts() if msg.is_multipart() else []:
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str):
            out[name] = payload if isinstance(payload, bytes) else b""
    return out


def _wav_seconds(data: bytes) -> int:
    """Whole seconds (at least 1) of a PCM WAV upload; 1 for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE" and len(data) >= 44:
        byte_rate = struct.unpack("<I", data[28:32])[0]
        if byte_rate:
            return max(1, math.ceil((len(data) - 44) / byte_rate))
    return 1


def openai_transcriptions(req: Request) -> Response:
    form = _multipart(req)
    if "file" not in form or "model" not in form:
        raise BadRequest(400, "Missing required parameter: 'file' or 'model'.")
    model = form["model"].decode()
    seconds = _wav_seconds(form["file"])
    text = "Hello from the fake transcription."
    if model.startswith("gpt-4o"):
        usage: JSON = {"type": "tokens", "input_tokens": 10 * seconds,
                       "input_token_details": {"text_tokens": 0, "audio_tokens": 10 * seconds},
                       "output_tokens": text_tokens(text), "total_tokens": 10 * seconds + text_tokens(text)}
    else:
        usage = {"type": "duration", "seconds": seconds}
    return json_response({"text": text, "usage": usage})


def openai_speech(req: Request) -> Response:
    body = req.json()
    if not isinstance(body, dict) or not body.get("input") or not body.get("model"):
        raise BadRequest(400, "Missing required parameter: 'input' or 'model'.")
    return Response(200, b"ID3\x04\x00fake-mp3" + bytes(64), content_type="audio/mpeg")


def openai_images(req: Request) -> Response:
    body = req.json()
    if not isinstance(body, dict) or not body.get("prompt"):
        raise BadRequest(400, "Missing required parameter: 'prompt'.")
    model = str(body.get("model") or "dall-e-2")
    n = int_param(body.get("n", 1), "n")
    if model.startswith("gpt-image"):
        out = {"low": 272, "medium": 1056}.get(str(body.get("quality")), 4160)
        prompt = text_tokens(str(body["prompt"]))
        return json_response({"created": now(), "data": [{"b64_json": "iVBORw0KGgo="}] * n, "usage": {
            "input_tokens": prompt, "input_tokens_details": {"text_tokens": prompt, "image_tokens": 0},
            "output_tokens": out * n, "total_tokens": prompt + out * n}})
    return json_response({"created": now(), "data": [{"url": f"https://fake.invalid/img-{rand(8)}.png"}] * n})


# A fake batch ran two chat requests on this model (the fake keeps no input file to read).
FAKE_BATCH_MODEL = "gpt-4o-mini-2024-07-18"
FAKE_BATCH_REQUESTS = (("r1", 40), ("r2", 64))  # custom_id, prompt tokens; each answers 12 tokens


def openai_batches(req: Request) -> Response:
    """POST /v1/batches: validating. ``X-Fake-Ready-After: N`` keeps it in_progress for N fetches;
    ``X-Fake-Batch-Usage: none`` answers like a batch created before OpenAI added ``usage`` and
    ``model`` to the Batch object (September 2025): its cost is only in its output file."""
    body = req.json()
    if not isinstance(body, dict) or not body.get("input_file_id"):
        raise BadRequest(400, "Missing required parameter: 'input_file_id'.")
    batch = {
        "id": f"batch_{rand(24)}", "object": "batch", "endpoint": body.get("endpoint"), "errors": None,
        "input_file_id": body["input_file_id"], "completion_window": body.get("completion_window", "24h"),
        "status": "validating", "output_file_id": None, "error_file_id": None, "created_at": now(),
        "in_progress_at": None, "expires_at": now() + 86400, "finalizing_at": None, "completed_at": None,
        "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": body.get("metadata"),
    }  # fmt: skip
    with req.state.lock:
        req.state.openai_batches[batch["id"]] = {
            "batch": batch, "ready_after": _int_header(req, "X-Fake-Ready-After"),
            "usage": req.headers.get("X-Fake-Batch-Usage", "").lower() != "none"}
    return json_response(batch)


def _int_header(req: Request, name: str) -> int:
    try:
        return max(0, int(req.headers.get(name) or 0))
    except ValueError:
        return 0


def openai_get_batch(req: Request) -> Response:
    """GET /v1/batches/{id}: in_progress, then completed with its output file (and usage, model)."""
    with req.state.lock:
        entry = req.state.openai_batches.get(req.params["id"])
        if entry is None:
            raise BadRequest(404, f"No batch found with id '{req.params['id']}'.")
        batch = entry["batch"]
        total = len(FAKE_BATCH_REQUESTS)
        if entry["ready_after"] > 0:
            entry["ready_after"] -= 1
            batch.update(status="in_progress", in_progress_at=batch["in_progress_at"] or now(),
                         request_counts={"total": total, "completed": 0, "failed": 0})
        elif batch["status"] != "completed":
            file_id = f"file-{rand(22)}"
            lines = [{"id": f"batch_req_{rand(24)}", "custom_id": cid, "response": {
                "status_code": 200, "request_id": f"req_{rand_hex(32)}", "body": {
                    "id": f"chatcmpl-{rand(24)}", "object": "chat.completion", "created": now(),
                    "model": FAKE_BATCH_MODEL, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant", "content": "".join(reply_pieces(DEFAULT_COMPLETION_TOKENS))}}],
                    "usage": openai_usage(prompt, DEFAULT_COMPLETION_TOKENS)}}, "error": None}
                for cid, prompt in FAKE_BATCH_REQUESTS]  # fmt: skip
            req.state.openai_files[file_id] = "".join(json.dumps(line) + "\n" for line in lines).encode()
            batch.update(status="completed", output_file_id=file_id, finalizing_at=now(), completed_at=now(),
                         in_progress_at=batch["in_progress_at"] or now(),
                         request_counts={"total": total, "completed": total, "failed": 0})
            if entry["usage"]:
                prompt = sum(p for _, p in FAKE_BATCH_REQUESTS)
                batch.update(model=FAKE_BATCH_MODEL, usage={
                    "input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": total * DEFAULT_COMPLETION_TOKENS,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": prompt + total * DEFAULT_COMPLETION_TOKENS})
        return json_response(batch)


def openai_file_content(req: Request) -> Response:
    with req.state.lock:
        content = req.state.openai_files.get(req.params["id"])
    if content is None:
        raise BadRequest(404, f"No such File object: {req.params['id']}")
    return Response(200, content, content_type="application/jsonl")


VENDOR = "openai"
ERROR = openai_error


def request_id() -> tuple[str, str] | None:
    """The header this vendor names its request id in, with a fresh id."""
    return "x-request-id", f"req_{rand_hex(32)}"

ROUTES: list[Route] = [
    route("POST", r"/v1/chat/completions", VENDOR, openai_chat_completions),
    route("POST", r"/v1/responses", VENDOR, openai_responses),
    route("POST", r"/v1/embeddings", VENDOR, openai_embeddings),
    route("POST", r"/v1/audio/(transcriptions|translations)", VENDOR, openai_transcriptions),
    route("POST", r"/v1/audio/speech", VENDOR, openai_speech),
    route("POST", r"/v1/images/generations", VENDOR, openai_images),
    route("POST", r"/v1/batches", VENDOR, openai_batches),
    route("GET", r"/v1/batches/(?P<id>[^/]+)", VENDOR, openai_get_batch),
    route("GET", r"/v1/files/(?P<id>[^/]+)/content", VENDOR, openai_file_content),
]
