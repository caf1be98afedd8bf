"""Fake Google Gemini API: generateContent, streamGenerateContent (``alt=sse`` events, or one
JSON array without it) and countTokens, with real-shaped ``usageMetadata``.

The key may come in ``x-goog-api-key`` or ``?key=`` (recorded either way, never checked).
Models whose name contains ``2.5`` or ``3`` "think": 5 ``thoughtsTokenCount`` per answer. A
request naming ``cachedContent`` gets half its prompt reported as ``cachedContentTokenCount``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from fakes.base import (
    DEFAULT_COMPLETION_TOKENS,
    JSON,
    BadRequest,
    Request,
    Response,
    Route,
    completion_tokens,
    json_response,
    rand,
    reply_pieces,
    route,
    sse_event,
    sse_response,
    text_tokens,
)

VENDOR = "gemini"
THOUGHTS = 5


def gemini_error(status: int, message: str | None = None, **_: Any) -> JSON:
    kinds = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
             429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
    return {"error": {"code": status, "message": message or "Internal error encountered.",
                      "status": kinds.get(status, "INTERNAL")}}


ERROR = gemini_error


def request_id() -> tuple[str, str] | None:
    return None


def _texts(contents: Any) -> str:
    out: list[str] = []
    for item in contents if isinstance(contents, list) else [contents]:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for part in item.get("parts") or []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    out.append(part["text"])
    return " ".join(out)


def _usage(body: JSON, model: str, output: int) -> JSON:
    prompt = 3 + text_tokens(_texts(body.get("contents"))) + text_tokens(
        _texts(body.get("systemInstruction") or body.get("system_instruction")))
    thinks = THOUGHTS if ("2.5" in model or model.startswith("gemini-3")) else 0
    usage: JSON = {"promptTokenCount": prompt, "candidatesTokenCount": output,
                   "totalTokenCount": prompt + output + thinks,
                   "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}]}
    if thinks:
        usage["thoughtsTokenCount"] = thinks
    if body.get("cachedContent"):
        usage["cachedContentTokenCount"] = prompt // 2
    return usage


def _body(req: Request) -> JSON:
    body = req.json()
    if not isinstance(body, dict) or not body.get("contents"):
        raise BadRequest(400, "* GenerateContentRequest.contents: contents is not specified")
    return body


def _candidate(text: str, finish: str | None) -> JSON:
    cand: JSON = {"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}
    if finish:
        cand["finishReason"] = finish
    return cand


def _answer(req: Request, stream: bool) -> Response:
    body = _body(req)
    model = req.params["model"]
    config = body.get("generationConfig") or {}
    output = completion_tokens(config.get("maxOutputTokens"))
    finish = "MAX_TOKENS" if output < DEFAULT_COMPLETION_TOKENS else "STOP"
    usage = _usage(body, model, output)
    head = {"modelVersion": model, "responseId": rand(22)}
    pieces = reply_pieces(output)
    if not stream:
        return json_response({"candidates": [_candidate("".join(pieces), finish)], "usageMetadata": usage, **head})
    chunks = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        running = {**usage, "candidatesTokenCount": i + 1,
                   "totalTokenCount": usage["totalTokenCount"] - output + i + 1}
        if not last:
            running.pop("thoughtsTokenCount", None)
        chunks.append({"candidates": [_candidate(piece, finish if last else None)],
                       "usageMetadata": usage if last else running, **head})
    if parse_qs(req.query).get("alt") == ["sse"]:
        return sse_response([sse_event(c) for c in chunks])
    return Response(200, json.dumps(chunks).encode())


def generate(req: Request) -> Response:
    return _answer(req, stream=False)


def stream_generate(req: Request) -> Response:
    return _answer(req, stream=True)


def count_tokens(req: Request) -> Response:
    body = req.json() if req.body else {}
    return json_response({"totalTokens": 3 + text_tokens(_texts((body or {}).get("contents")))})


MODEL = r"/v1(?:beta)?/models/(?P<model>[^/:]+)"
ROUTES: list[Route] = [
    route("POST", MODEL + r":generateContent", VENDOR, generate),
    route("POST", MODEL + r":streamGenerateContent", VENDOR, stream_generate),
    route("POST", MODEL + r":countTokens", VENDOR, count_tokens),
]
