"""Vendors declared in the policy file, without code: ``vendors: {<name>: {hosts: [...], ...}}``.

:func:`build` turns one declaration (a plain dict, validated by ``policy.VendorConfig``) into a
:class:`Vendor`; the runtime registers it next to the built-ins while that policy file is in
force, so every stage (key slots, rules, caps, swap, ledger, metrics, mitmweb) treats it like
one. Three kinds:

- ``kind: http`` (the default): any HTTP API. The credential goes where ``credential:`` says:
  a header with a ``format`` (``{header: Authorization, format: "Bearer {secret}"}``), a query
  parameter (``{query: api_key}``: on the wire only, see ``stages/querykey.py``) or Basic auth
  (``{basic: {user: "{secret}", password: ""}}``). The agent's vault key is read from
  X-Vault-Key, Authorization, that header or that query parameter. ``raw_credential:`` is the
  pattern of a real key (an agent sending one is refused). ``price:`` says what a call costs:

  - ``per_call_usd: {"METHOD /path": usd, ...}``: the first matching rule prices the call
    (the estimate before it, and the cost of a 2xx answer);
  - ``response_field: {path: data.credits_used, unit: 0.001, currency: USD}``: the cost is that
    JSON field of the response × ``unit`` in ``currency`` (``fx:`` converts);
  - ``response_header: {name: x-request-cost, unit: 1, currency: USD}``: likewise from a header.

  A response that should carry its cost but does not (or carries junk) is ``unknown``, counted
  at the estimate; a non-2xx answer costs nothing.
- ``kind: mcp``: a Model Context Protocol server (streamable HTTP, JSON-RPC 2.0): see
  ``_mcp.py``; ``tools: {<tool or glob>: {per_call_usd: X}}`` prices its tool calls.
- ``compatible: openai`` / ``compatible: anthropic``: an LLM API speaking OpenAI's (or
  Anthropic's Messages) API, priced from the top-level ``prices: {<name>: {models: …}}`` token
  table, see ``_compatible.py``. The default credential is ``Authorization: Bearer`` (OpenAI
  style) or ``x-api-key`` (Anthropic style).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from ..money import Unpriceable, parse_decimal, to_usd
from .base import NO_COST, Cost, Estimate, Prices, RequestView, ResponseView, Vendor

_NEVER = r"(?!)"  # a raw_credential pattern that matches nothing


def _default_credential(spec: Mapping[str, Any]) -> dict[str, Any]:
    if spec.get("compatible") == "anthropic":
        return {"header": "x-api-key", "format": "{secret}"}
    return {"header": "Authorization", "format": "Bearer {secret}"}


def _placement(spec: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """(the header holding the real key in the flow, the query parameter it moves to, if any)."""
    cred = spec.get("credential") or _default_credential(spec)
    if cred.get("query"):
        return f"x-spendgate-query-{cred['query'].lower()}", {cred["query"]: f"x-spendgate-query-{cred['query'].lower()}"}
    if cred.get("basic") is not None:
        return "authorization", {}
    return str(cred.get("header") or "Authorization").lower(), {}


def credential_headers(spec: Mapping[str, Any]):  # noqa: ANN201  (a closure over the declaration)
    cred = spec.get("credential") or _default_credential(spec)
    header, _ = _placement(spec)

    def make(creds: Mapping[str, str]) -> dict[str, str]:
        secret = creds["secret"]
        if cred.get("query"):
            return {header: secret}
        if (basic := cred.get("basic")) is not None:
            user = str(basic.get("user", "{secret}")).replace("{secret}", secret)
            password = str(basic.get("password", "")).replace("{secret}", secret)
            return {header: "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
        return {header: str(cred.get("format") or "{secret}").replace("{secret}", secret)}

    return make


# --- pricing: kind http -----------------------------------------------------------------------


def _rules(table: Mapping[str, Any]) -> list[tuple[Any, Decimal]]:
    from ..policy import Rule  # (policy imports the vendors package; rules parse lazily)

    out = []
    per_call = table.get("per_call_usd")
    for text, usd in (per_call.items() if isinstance(per_call, Mapping) else ()):
        value = parse_decimal(usd)
        if value is not None and value >= 0:
            out.append((Rule.parse(text), value))
    return out


def _rule_price(req: RequestView, table: Mapping[str, Any]) -> tuple[str, Decimal] | None:
    from ..policy import UnsafePath, path_segments

    try:
        segments = path_segments(req.path)
    except UnsafePath:
        return None
    for rule, usd in _rules(table):
        if rule.matches(req.method.upper(), segments):
            return rule.text, usd
    return None


def _dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(obj, Mapping):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def _reported(amount: object, spec: Mapping[str, Any], prices: Prices, where: str) -> Cost:
    value = parse_decimal(amount)
    if value is None or value < 0:
        return Cost("unknown", None, note=f"{where}: no usable amount ({str(amount)[:40]!r})")
    unit = parse_decimal(spec.get("unit", 1)) or Decimal(1)
    currency = str(spec.get("currency") or "USD").upper()
    total = value * unit
    try:
        usd = to_usd(total, currency, prices.fx)
    except Unpriceable as e:
        return Cost("unknown", None, currency, total, note=str(e))
    return Cost("parsed", usd, currency, total, f"{where} = {value} × {unit} {currency}")


def _estimate_from(req: RequestView, table: Mapping[str, Any]) -> Estimate:
    found = _rule_price(req, table)
    if found is not None:
        rule, usd = found
        # (a matching rule prices the call, $0 included: it is not "unpriced")
        return Estimate(usd=usd, moves_money=True, currency="USD", amount=usd,
                        basis=f"per_call_usd {rule!r}: ${usd}")
    if table.get("response_field") or table.get("response_header"):
        # priced by the answer: the policy's default_estimate_usd (else max_request_usd) holds it
        return Estimate(usd=None, moves_money=True, basis="priced from the response; no per_call_usd rule")
    return NO_COST


def _http_cost(req: RequestView, resp: ResponseView, table: Mapping[str, Any], prices: Prices,
               estimate: Estimate) -> Cost:
    if isinstance(field := table.get("response_field"), Mapping) and field.get("path"):
        return _reported(_dig(resp.json, str(field["path"])), field, prices, f"response field {field['path']}")
    if isinstance(hdr := table.get("response_header"), Mapping) and hdr.get("name"):
        name = str(hdr["name"]).lower()
        return _reported(resp.headers.get(name), hdr, prices, f"response header {name}")
    found = _rule_price(req, table)
    if found is None:
        return Cost("zero", Decimal(0), note="no per_call_usd rule matches: not billed")
    rule, usd = found
    return Cost("parsed", usd, "USD", usd, f"declared price per call ({rule!r})")


# --- the builder --------------------------------------------------------------------------------


def build(name: str, spec: Mapping[str, Any]) -> Vendor:
    """The :class:`Vendor` a ``vendors.<name>`` declaration describes (``hosts`` present)."""
    hosts = tuple(str(h).lower() for h in spec["hosts"])
    header, key_query = _placement(spec)
    raw = spec.get("raw_credential") or _NEVER
    key_headers = tuple(dict.fromkeys((header, "authorization")))
    price = spec.get("price") or {}
    if spec.get("compatible") == "openai":
        from ._compatible import openai_compatible

        return openai_compatible(name, hosts, raw, price, key_headers=key_headers,
                                 credential=credential_headers(spec))
    if spec.get("compatible") == "anthropic":
        from ._compatible import anthropic_compatible

        return anthropic_compatible(name, hosts, raw, price, key_headers, credential_headers(spec))
    if spec.get("kind") == "mcp":
        from ._mcp import mcp_vendor

        return mcp_vendor(name, hosts, raw, key_headers, credential_headers(spec),
                          {"tools": spec.get("tools") or {}}, key_query)

    def estimator(req: RequestView, prices: Prices) -> Estimate:
        return _estimate_from(req, prices.table(vendor))

    def parser(req: RequestView, resp: ResponseView, prices: Prices, estimate: Estimate) -> Cost:
        return _http_cost(req, resp, prices.table(vendor), prices, estimate)

    vendor = Vendor(
        name=name, hosts=hosts, key_headers=key_headers, real_key=re.compile(raw),
        credential_headers=credential_headers(spec), estimator=estimator, parser=parser,
        prices=dict(price), key_query=key_query, query_only=bool(key_query), reads_free=False,
    )
    return vendor
