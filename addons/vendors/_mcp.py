"""MCP servers (Model Context Protocol over streamable HTTP, JSON-RPC 2.0): reading and pricing.

A declared ``kind: mcp`` vendor (see ``_declared``) gets a :class:`Vendor` from
:func:`mcp_vendor`. Pure functions over JSON-RPC messages; the policy side (which tools a
key may call, ``tools/list`` filtering, JSON-RPC refusals) is ``stages/tools.py``.

- A POST body is one JSON-RPC message or a batch (a JSON array). Only ``tools/call``
  requests cost anything; ``initialize``, ``ping``, notifications, responses and every other
  method are free and pass untouched.
- Price of a tool call: the server's own figure when its result carries one in ``_meta``
  (``"cost_usd": 0.002``, or ``"cost": {"amount": 2, "currency": "EUR"}`` converted with
  ``fx:``, or ``"cost": 0.002`` in USD), else the declared ``tools: {<name or glob>:
  {per_call_usd: X}}`` (exact name first, then globs in order; a tool with no price is free,
  and the note says so). The estimate before the call is the declared price.
- Answers come as ``application/json`` (one message or an array) or as an SSE stream of
  messages (metered event by event). A JSON-RPC ``error`` answer costs nothing; a result with
  ``isError: true`` (the tool ran and failed) costs its price. A call whose answer is missing
  (cut stream) is counted at its price, flagged ``estimated``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from fnmatch import fnmatchcase
from typing import Any

from ..money import Unpriceable, parse_decimal, to_usd
from ._sse import Event, EventMeter
from .base import Cost, Estimate, Prices, RequestView, ResponseView, StreamMeter, Vendor


class NotJsonRpc(ValueError):
    """A body that is not readable as JSON-RPC (the tools stage refuses it where tools are governed)."""


def _no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise NotJsonRpc(f"the JSON-RPC message gives {k!r} twice")
        out[k] = v
    return out


def messages(body: bytes) -> list[dict[str, Any]]:
    """The JSON-RPC messages of a POST body (a batch flattened); raises :class:`NotJsonRpc`."""
    if not body.strip():
        return []
    try:
        data = json.loads(body, object_pairs_hook=_no_dupes)
    except NotJsonRpc:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise NotJsonRpc(f"not JSON ({type(e).__name__})") from None
    items = data if isinstance(data, list) else [data]
    if not all(isinstance(m, dict) for m in items):
        raise NotJsonRpc("a JSON-RPC message is not an object")
    return items


def tool_calls(msgs: Iterable[Mapping[str, Any]]) -> list[tuple[Any, str]]:
    """(id, tool name) of every ``tools/call`` request; a name that is not a string raises."""
    out = []
    for m in msgs:
        if m.get("method") != "tools/call":
            continue
        params = m.get("params")
        name = params.get("name") if isinstance(params, Mapping) else None
        if not isinstance(name, str) or not name:
            raise NotJsonRpc("tools/call without a tool name")
        out.append((m.get("id"), name))
    return out


def lists_tools(msgs: Iterable[Mapping[str, Any]]) -> bool:
    return any(m.get("method") == "tools/list" for m in msgs)


def _req_messages(req: RequestView) -> list[dict[str, Any]]:
    if req.method.upper() != "POST":
        return []
    try:
        return messages(req.body)
    except NotJsonRpc:
        return []


def tool_price(table: Mapping[str, Any], tool: str) -> tuple[Decimal, str] | None:
    """(USD per call, the entry that priced it) from ``tools:``; exact name, then globs."""
    tools = table.get("tools")
    tools = tools if isinstance(tools, Mapping) else {}
    entry_key = tool if tool in tools else next((k for k in tools if fnmatchcase(tool, str(k))), None)
    if entry_key is None:
        return None
    entry = tools[entry_key]
    usd = parse_decimal(entry.get("per_call_usd") if isinstance(entry, Mapping) else entry)
    return (usd, str(entry_key)) if usd is not None and usd >= 0 else None


def meta_cost(result: Any, prices: Prices) -> Cost | None:
    """The cost a tool result reports in ``_meta``, if any (see the module doc)."""
    meta = result.get("_meta") if isinstance(result, Mapping) else None
    if not isinstance(meta, Mapping):
        return None
    if "cost_usd" in meta:
        usd = parse_decimal(meta["cost_usd"])
        if usd is None or usd < 0:
            return Cost("unknown", None, note=f"_meta.cost_usd is not an amount: {str(meta['cost_usd'])[:40]!r}")
        return Cost("parsed", usd, "USD", usd, "reported by the server (_meta.cost_usd)")
    cost = meta.get("cost")
    if cost is None:
        return None
    amount, currency = (cost.get("amount"), str(cost.get("currency") or "USD").upper()) if isinstance(
        cost, Mapping) else (cost, "USD")
    value = parse_decimal(amount)
    if value is None or value < 0:
        return Cost("unknown", None, note=f"_meta.cost is not an amount: {str(cost)[:40]!r}")
    try:
        usd = to_usd(value, currency, prices.fx)
    except Unpriceable as e:
        return Cost("unknown", None, currency, value, str(e))
    return Cost("parsed", usd, currency, value, f"reported by the server (_meta.cost {value} {currency})")


def _price_calls(calls: list[tuple[Any, str]], answers: Mapping[Any, Mapping[str, Any]],
                 table: Mapping[str, Any], prices: Prices, complete: bool) -> Cost:
    """Sum the cost of each call from its answer (or its price when the answer is missing)."""
    total, notes, status, unknown = Decimal(0), [], "parsed", False
    for rid, tool in calls:
        declared = tool_price(table, tool)
        price = declared[0] if declared else Decimal(0)
        answer = answers.get(_id(rid))
        if answer is None:
            total += price
            status = "estimated"
            notes.append(f"{tool}: no answer{'' if complete else ' (stream cut)'}, counted at ${price}")
            continue
        if "error" in answer:
            notes.append(f"{tool}: JSON-RPC error, not billed")
            continue
        reported = meta_cost(answer.get("result"), prices)
        if reported is not None and reported.usd is not None:
            total += reported.usd
            notes.append(f"{tool}: ${reported.usd} {reported.note}")
        elif reported is not None:
            total += price
            unknown = True
            notes.append(f"{tool}: {reported.note}; counted at ${price}")
        elif declared:
            total += price
            notes.append(f"{tool}: ${price} per call ({declared[1]!r})")
        else:
            notes.append(f"{tool}: no price declared, free")
    if unknown:
        status = "estimated"
    return Cost(status, total, "USD", total, "; ".join(notes)[:480])


def _id(rid: Any) -> str:
    return json.dumps(rid, sort_keys=True)


def _answers(msgs: Iterable[Any]) -> dict[str, Mapping[str, Any]]:
    return {_id(m.get("id")): m for m in msgs if isinstance(m, Mapping) and ("result" in m or "error" in m)}


def _sse_messages(body: bytes) -> list[Any]:
    from ._sse import SSEParser

    parser = SSEParser()
    return [e.json() for e in [*parser.feed(body), *parser.close()]]


class _Meter(EventMeter):
    """An SSE answer to a POST: collects the answers to its tool calls, event by event."""

    def __init__(self, calls: list[tuple[Any, str]], table: Mapping[str, Any], prices: Prices) -> None:
        super().__init__()
        self._calls, self._table, self._prices = calls, table, prices
        self._wanted = {_id(rid) for rid, _ in calls}
        self._answers: dict[str, Mapping[str, Any]] = {}

    def _on(self, event: Event) -> None:
        obj = event.json()
        for m in obj if isinstance(obj, list) else [obj]:
            if isinstance(m, Mapping) and _id(m.get("id")) in self._wanted and ("result" in m or "error" in m):
                self._answers[_id(m.get("id"))] = {k: m[k] for k in ("result", "error") if k in m}

    def _finish(self) -> Cost:
        return _price_calls(self._calls, self._answers, self._table, self._prices, not self._broken)


class _Free:
    """Streams that carry no tool answer (a GET event stream, initialize over SSE): free, streamed."""

    def feed(self, chunk: bytes) -> None:
        pass

    def finish(self) -> Cost:
        return Cost("zero", Decimal(0), note="MCP stream without tool calls")


def mcp_vendor(name: str, hosts: tuple[str, ...], raw: str, key_headers: tuple[str, ...],
               credential: Callable[[Mapping[str, str]], dict[str, str]], prices: Mapping[str, Any],
               key_query: Mapping[str, str]) -> Vendor:
    vendor: Vendor

    def estimator(req: RequestView, p: Prices) -> Estimate:
        calls = tool_calls(_req_messages(req)) if req.method.upper() == "POST" else []
        if not calls:
            return Estimate(usd=Decimal(0), basis="no tool call")
        table = p.table(vendor)
        usd, parts = Decimal(0), []
        for _, tool in calls:
            found = tool_price(table, tool)
            usd += found[0] if found else 0
            parts.append(f"{tool} ${found[0]}" if found else f"{tool} (no price declared)")
        return Estimate(usd=usd, moves_money=usd > 0, currency="USD", amount=usd, basis="; ".join(parts))

    def parser(req: RequestView, resp: ResponseView, p: Prices, estimate: Estimate) -> Cost:
        try:
            calls = tool_calls(_req_messages(req))
        except NotJsonRpc:
            calls = []
        if not calls:
            return Cost("zero", Decimal(0), note="no tool call")
        if resp.body.lstrip().startswith((b"data:", b"event:", b"id:", b":")):
            found = _sse_messages(resp.body)
        else:
            obj = resp.json
            found = obj if isinstance(obj, list) else [obj]
        return _price_calls(calls, _answers(found), p.table(vendor), p, True)

    def stream_meter(req: RequestView, p: Prices, estimate: Estimate) -> StreamMeter | None:
        msgs = _req_messages(req)
        if lists_tools(msgs):
            return None  # buffered: the tools stage filters the list before the agent sees it
        try:
            calls = tool_calls(msgs)
        except NotJsonRpc:
            calls = []
        return _Meter(calls, p.table(vendor), p) if calls else _Free()

    vendor = Vendor(
        name=name, hosts=hosts, key_headers=key_headers, real_key=re.compile(raw),
        credential_headers=credential, estimator=estimator, parser=parser, stream_meter=stream_meter,
        prices=prices, key_query=key_query, query_only=bool(key_query),
        # Only tools/call is ever billed, and the estimator prices every one (a tool without a
        # declared price is free): every other message is free by protocol.
        free=("* /**",),
    )
    return vendor
