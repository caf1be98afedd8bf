"""Stage 3c, tools: what an agent may do on an MCP server (``kind: mcp`` vendors).

Runs after models and before budget. A POST to an MCP server carries one JSON-RPC message or a
batch; every ``tools/call`` in it is checked against the policy's ``tools:`` for that server:

    tools: {allow: [search_*], deny: [delete_*], approve: [send_email], rate: {search_web: 10/minute}}

deny wins, then approve (the whole request waits for a human, as an ``approve:`` endpoint rule
does), then a non-empty allow must match; ``rate`` is per key and per tool (GCRA; per process on
SQLite, across the fleet on PostgreSQL).
Refusals are verdicts like every policy check (report-only mode records ``would_deny``). The
tool names go in the ledger's ``tool`` column, allowed or refused.

The agent speaks JSON-RPC, so every refusal of an MCP request (a tool, but also a cap, a key,
an approval, an open circuit) is answered as a JSON-RPC error for each request in the body:
``{"jsonrpc": "2.0", "id": …, "error": {"code": -32001, "message": …, "data": {"type":
"spendgate_error", "code": "tool_not_allowed", …}}}``, with the refusal's HTTP status (403, 402,
429…), ``X-Spendgate-Reason`` and ``Retry-After`` kept (MCP clients read a JSON-RPC error at a
non-2xx status). ``tools/list`` answers are filtered to the tools the key may call (allowed or
approvable), so an agent is never offered a tool it would be refused; in report-only mode they
are left whole. ``initialize``, ``ping``, notifications, responses, GET streams and session
headers pass untouched.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Iterator
from fnmatch import fnmatchcase
from typing import Any

from mitmproxy import http

from ..call import Call, apply_verdicts, fail_closed, get_call, keyed_call
from ..policy import Approve, Deny, Rate, ToolRules, Verdict
from ..runtime import Runtime
from ..vendors._mcp import NotJsonRpc, lists_tools, messages, tool_calls
from ..vendors._sse import SSEParser
from .authorize import RateLimiter

RPC_ERROR = -32001  # JSON-RPC "server error" range: a spendgate refusal; the reason is in data.code


def _match(name: str, globs: list[str]) -> str | None:
    return next((g for g in globs if fnmatchcase(name, g)), None)


def tool_verdict(name: str, rules: ToolRules) -> Verdict | None:
    """deny wins, then approve, then a non-empty allow must match."""
    if rule := _match(name, rules.deny):
        return Deny("tool_not_allowed", f"tool {name!r} is denied by {rule!r}", f"tools.deny: {rule}")
    if rule := _match(name, rules.approve):
        return Approve(f"tools.approve: {rule}")
    if rules.allow and not _match(name, rules.allow):
        return Deny("tool_not_allowed", f"tool {name!r} is not in tools.allow {rules.allow}")
    return None


def listable(name: str, rules: ToolRules) -> bool:
    """May ``tools/list`` show this tool (it can be called, perhaps after an approval)?"""
    if _match(name, rules.deny):
        return False
    return not rules.allow or bool(_match(name, rules.allow) or _match(name, rules.approve))


def rpc_errors(msgs: list[dict[str, Any]], body: bytes) -> bytes | None:
    """A JSON-RPC error for each request in ``msgs`` carrying the refusal in ``body``."""
    try:
        err = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    requests = [m for m in msgs if "method" in m and "id" in m]
    if not requests:
        return None
    out = [{"jsonrpc": "2.0", "id": m["id"],
            "error": {"code": RPC_ERROR, "message": err.get("message") or "refused by spendgate",
                      "data": {"type": "spendgate_error", "code": err.get("code"), "key_id": err.get("key_id"),
                               "policy": err.get("policy")}}} for m in requests]
    return json.dumps(out if len(msgs) > 1 else out[0]).encode()


def filter_tool_list(obj: Any, rules: ToolRules) -> tuple[Any, int]:
    """``obj`` (a message or a batch) with ``result.tools`` filtered; and how many were hidden."""
    hidden = 0
    for m in obj if isinstance(obj, list) else [obj]:
        result = m.get("result") if isinstance(m, dict) else None
        tools = result.get("tools") if isinstance(result, dict) else None
        if isinstance(tools, list):
            kept = [t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)
                    and listable(t["name"], rules)]
            hidden += len(tools) - len(kept)
            result["tools"] = kept
    return obj, hidden


class Tools:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limiter = RateLimiter()

    def _mcp(self, call: Call | None) -> bool:
        state = self.runtime.state
        vc = state.config.vendors.get(call.vendor or "") if state and call else None
        return vc is not None and vc.kind == "mcp"

    def _rules(self, call: Call) -> ToolRules | None:
        policy = self.runtime.policy(call.policy or "")
        rules = policy.vendors.get(call.vendor or "") if policy else None
        return rules.tools if rules else None

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        call = keyed_call(flow)
        if call is None or not self._mcp(call) or flow.request.method.upper() != "POST":
            return
        rules = self._rules(call)
        try:
            msgs = messages(flow.request.get_content(strict=False) or b"")
            calls = tool_calls(msgs)
        except NotJsonRpc as e:
            if rules is not None:
                apply_verdicts(flow, call, [Deny("tool_not_allowed", f"{call.vendor}: {e}", "tools")])
            return
        if calls:
            call.tool = ",".join(dict.fromkeys(name for _, name in calls))[:500]
        if rules is not None and calls:
            names = [name for _, name in calls]
            store = self.runtime.store
            if store is not None and store.keys_cached and self._rated(rules, names):
                # PostgreSQL: the tool's rate is the fleet's (a round trip), counted off the event loop
                return self._request_offloaded(flow, call, rules, names)
            apply_verdicts(flow, call, self.checks(call, rules, names))
        return None

    @staticmethod
    def _rated(rules: ToolRules, names: list[str]) -> bool:
        return any(fnmatchcase(name, glob) for name in names for glob in rules.rate)

    @fail_closed
    async def _request_offloaded(self, flow: http.HTTPFlow, call: Call, rules: ToolRules, names: list[str]) -> None:
        verdicts = await self.runtime.offload(list, self.checks(call, rules, names))
        apply_verdicts(flow, call, verdicts)

    def checks(self, call: Call, rules: ToolRules, names: list[str]) -> Iterator[Verdict | None]:
        assert call.key is not None
        for name in names:
            yield tool_verdict(name, rules)
        for name in names:
            for glob, rate in rules.rate.items():
                if fnmatchcase(name, glob):
                    wait = self._hit(f"{call.key.id}\0tool\0{glob}", rate)
                    if wait > 0:
                        yield Deny("rate_limited", f"key {call.key.id} is over its rate of {rate.text} for "
                                   f"tool {name!r}", f"tools.rate: {glob}", retry_after=wait)

    def _hit(self, name: str, rate: Rate) -> float:
        """Per process on SQLite; on PostgreSQL the key's rate for the tool across every replica."""
        store = self.runtime.store
        if store is not None and store.keys_cached:
            return store.rate_hit(name.replace("\0", ":"), rate.limit, rate.period)  # (no NUL in PostgreSQL text)
        return self.limiter.hit(name, rate)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is None or not self._mcp(call) or call.key is None:
            return
        if self._rules(call) is not None and self._lists_tools(flow):
            flow.response.stream = False  # filtered before the agent sees it (bounded by body_size_limit)

    def _lists_tools(self, flow: http.HTTPFlow) -> bool:
        try:
            return lists_tools(messages(flow.request.get_content(strict=False) or b""))
        except NotJsonRpc:
            return False

    def response(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        resp = flow.response
        if call is None or resp is None or not self._mcp(call) or flow.request.method.upper() != "POST":
            return
        try:
            msgs = messages(flow.request.get_content(strict=False) or b"")
        except NotJsonRpc:
            msgs = []
        if "X-Spendgate-Reason" in resp.headers:  # refused by any stage: answer in JSON-RPC
            if (body := rpc_errors(msgs, resp.content or b"")) is not None:
                resp.content = body
            return
        rules = self._rules(call) if call.key else None
        if rules is None or call.mode == "report" or not lists_tools(msgs) or resp.stream or not (200 <= resp.status_code < 300):
            return
        ctype = resp.headers.get("content-type", "")
        if "text/event-stream" in ctype:
            resp.content, hidden = self._filter_sse(resp.content or b"", rules)
        else:
            try:
                obj, hidden = filter_tool_list(json.loads(resp.content or b"null"), rules)
            except ValueError:
                return
            if hidden:
                resp.content = json.dumps(obj).encode()
        if hidden:
            call.notes.append(f"tools/list: {hidden} tool(s) hidden by policy")

    @staticmethod
    def _filter_sse(body: bytes, rules: ToolRules) -> tuple[bytes, int]:
        """Filter the tool lists in an SSE body. Each ``data:`` line holding a whole JSON message
        (what MCP servers send) is rewritten in place, so ``id:``/``event:``/``retry:`` lines stay;
        an event whose JSON spans several data lines makes the whole body be re-serialised."""
        lines, hidden = body.splitlines(keepends=True), 0
        for i, line in enumerate(lines):
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            try:
                obj = json.loads(payload)
            except ValueError:
                if payload:
                    return Tools._filter_sse_events(body, rules)
                continue
            obj, n = filter_tool_list(obj, rules)
            if n:
                hidden += n
                end = line[len(line.rstrip(b"\r\n")):]
                lines[i] = b"data: " + json.dumps(obj).encode() + end
        return b"".join(lines), hidden

    @staticmethod
    def _filter_sse_events(body: bytes, rules: ToolRules) -> tuple[bytes, int]:
        parser = SSEParser()
        out, hidden = [], 0
        for event in [*parser.feed(body), *parser.close()]:
            obj = event.json()
            data = event.data
            if obj is not None:
                obj, n = filter_tool_list(obj, rules)
                if n:
                    hidden += n
                    data = json.dumps(obj)
            head = f"event: {event.name}\n" if event.name else ""
            out.append(head + "".join(f"data: {line}\n" for line in data.split("\n")) + "\n")
        return "".join(out).encode(), hidden
