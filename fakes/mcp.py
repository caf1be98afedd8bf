"""Fake MCP server (Model Context Protocol over streamable HTTP, JSON-RPC 2.0), small on purpose:
enough for the official ``mcp`` SDK's client to initialize, list tools and call them.

``POST /mcp`` answers JSON (one message, or an array for a batch); ``POST /mcp/sse`` answers the
same messages as an SSE stream. A body of notifications/responses only gets ``202 Accepted``.
``GET`` answers 405 (no server-initiated stream); ``DELETE`` ends the session.

Tools: ``web_search`` (no cost reported), ``paid_lookup`` (reports ``_meta.cost_usd`` 0.0042),
``eu_lookup`` (reports ``_meta.cost`` 2 EUR), ``delete_index``, ``send_email``, ``flaky``
(a result with ``isError: true``). An unknown tool is a JSON-RPC error -32602.
"""

from __future__ import annotations

import json
from typing import Any

from fakes.base import JSON, Request, Response, Route, json_response, rand_hex, route, sse_event, sse_response

VENDOR = "mcp"
PROTOCOL = "2025-06-18"
TOOLS = ["web_search", "paid_lookup", "eu_lookup", "delete_index", "send_email", "flaky"]


def mcp_error(status: int, message: str | None = None, **_: Any) -> JSON:
    return {"jsonrpc": "2.0", "id": None, "error": {"code": -32000, "message": message or f"HTTP {status}"}}


ERROR = mcp_error


def request_id() -> tuple[str, str] | None:
    return None


def _tool(name: str) -> JSON:
    return {"name": name, "description": f"the fake {name} tool",
            "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}}}


def _result(name: str, args: Any) -> JSON:
    text = f"{name}({json.dumps(args, sort_keys=True)}): ok"
    result: JSON = {"content": [{"type": "text", "text": text}], "isError": False}
    if name == "paid_lookup":
        result["_meta"] = {"cost_usd": 0.0042}
    elif name == "eu_lookup":
        result["_meta"] = {"cost": {"amount": 2, "currency": "EUR"}}
    elif name == "flaky":
        result["isError"] = True
    return result


def answer(msg: JSON) -> JSON | None:
    """The answer to one JSON-RPC message (None for a notification or a response)."""
    method, rid = msg.get("method"), msg.get("id")
    if method is None or "id" not in msg:
        return None
    params = msg.get("params") or {}
    if method == "initialize":
        result: JSON = {"protocolVersion": params.get("protocolVersion") or PROTOCOL,
                        "capabilities": {"tools": {"listChanged": False}},
                        "serverInfo": {"name": "spendgate-fake-mcp", "version": "1.0"}}
    elif method == "ping":
        result = {}
    elif method == "tools/list":
        result = {"tools": [_tool(t) for t in TOOLS]}
    elif method == "tools/call" and params.get("name") in TOOLS:
        result = _result(params["name"], params.get("arguments") or {})
    elif method == "tools/call":
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": f"Unknown tool: {params.get('name')}"}}
    else:
        return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": f"Method not found: {method}"}}
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def _post(req: Request, sse: bool) -> Response:
    body = json.loads(req.body or b"null")
    batch = isinstance(body, list)
    answers = [a for a in map(answer, body if batch else [body]) if a is not None]
    headers: dict[str, str] = {}
    if any(isinstance(m, dict) and m.get("method") == "initialize" for m in (body if batch else [body])):
        headers["Mcp-Session-Id"] = rand_hex(32)
    if not answers:
        return Response(202, b"", headers=headers)
    if sse:
        resp = sse_response([sse_event(a) for a in answers])
        resp.headers.update(headers)
        return resp
    return json_response(answers if batch else answers[0], **headers)


def post_json(req: Request) -> Response:
    return _post(req, sse=False)


def post_sse(req: Request) -> Response:
    return _post(req, sse=True)


def no_stream(req: Request) -> Response:
    return Response(405, b"", headers={"Allow": "POST, DELETE"})


def end_session(req: Request) -> Response:
    return Response(200, b"")


ROUTES: list[Route] = [
    route("POST", r"/mcp(/json)?", VENDOR, post_json),
    route("POST", r"/mcp/sse", VENDOR, post_sse),
    route("GET", r"/mcp(/sse|/json)?", VENDOR, no_stream),
    route("DELETE", r"/mcp(/sse|/json)?", VENDOR, end_session),
]
