"""What the pipeline learns about one request, carried in ``flow.metadata["spendgate"]``.

Stages fill a :class:`Call` in order; ``record`` turns it into a ledger row and a
flow comment. A stage says no in one of two ways:

- ``refuse()``: always, whatever the policy's mode. For what is not the policy's to waive:
  identity (no key, unknown, expired, revoked, a real key), transport (plain http, a spoofed
  host), a vault key that would leak to the vendor, a vendor without credentials, an internal
  error, and a human's answer to an approval.
- ``apply_verdicts()``: the policy's verdicts (``policy.Deny`` values from ``policy.decide`` and
  the stateful checks). The call's ``mode`` decides what a Deny does: ``enforce`` refuses at the
  first one, and the checks after it do not run (pass a generator: it is not resumed);
  ``report`` runs every check and records every Deny as ``would_deny``.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from mitmproxy import http
from mitmproxy.net.http.status_codes import RESPONSES as _REASONS
from mitmproxy.utils.strutils import always_bytes

from .money import from_nanos, plain
from .policy import Approve, Deny, Verdict
from .store import KeyRecord, Precheck, Reservation, StoreUnavailable
from .vendors.base import Cost, Estimate, RequestView, StreamMeter

log = logging.getLogger("spendgate")

METADATA_KEY = "spendgate"

# Refusal codes (SPEC §4) → HTTP status.
STATUS: dict[str, int] = {
    "missing_vault_key": 401,
    "unknown_key": 401,
    "ambiguous_vault_key": 401,  # several different vault keys in one request
    "expired": 401,
    "revoked": 401,
    "raw_credential": 403,
    "vendor_not_allowed": 403,
    "endpoint_not_allowed": 403,
    "egress_denied": 403,
    "host_mismatch": 403,
    "insecure_scheme": 403,
    "vault_key_leak": 403,  # a vault key in the URL or body would reach the vendor
    "approval_denied": 403,
    "approval_timeout": 403,
    "model_not_allowed": 403,  # stages/models.py
    "output_limit_exceeded": 403,
    "tool_not_allowed": 403,  # stages/tools.py (MCP: a JSON-RPC error with this in error.data.code)
    "malformed_request": 400,  # a body in a Content-Encoding the gateway does not decode
    "body_too_large": 413,  # a decoded request body over spendgate_inflate_limit
    "request_over_limit": 402,
    "cap_exhausted": 402,
    "unpriceable": 402,
    "rate_limited": 429,
    "loop_detected": 429,
    "upstream_unreachable": 502,
    "upstream_timeout": 504,
    "internal_error": 503,
    "circuit_open": 503,  # stages/circuit.py, with Retry-After
    "store_unavailable": 503,  # the ledger database cannot be reached: fail closed
}


@dataclass
class Call:
    vendor: str | None = None
    host: str | None = None  # the vendor host of the tunnel (before any upstream override)
    key: KeyRecord | None = None
    policy: str | None = None
    mode: str = "enforce"  # enforce | report: what apply_verdicts does with a Deny
    decision: str = "allow"  # allow | deny | would_deny
    reason: str | None = None  # the refusal code; in report mode the first would-deny's
    message: str | None = None
    would_deny: list[Deny] = field(default_factory=list)  # report mode: every policy Deny, in order
    approval_rule: str | None = None
    approval_id: str | None = None
    view: RequestView | None = None  # the request as the budget stage estimated it
    estimate: Estimate | None = None
    estimated_nanos: int = 0
    reservation: Reservation | None = None
    scopes: list[str] = field(default_factory=list)  # budget scopes this call counts against
    cost: Cost | None = None
    stream_meter: StreamMeter | None = None
    meter_failed: bool = False
    budget_left_nanos: int | None = None
    # PostgreSQL: what authorize's round trip read (the key's row, the rate limit, the room left),
    # which the budget stage reuses; and a key state not "active" that a round trip found
    precheck: Precheck | None = None
    key_refused: str | None = None
    request_id: str | None = None
    wire_ref: str | None = None
    model: str | None = None  # the model an LLM request names
    tool: str | None = None  # the MCP tool(s) a tools/call names (comma-separated in a batch)
    notes: list[str] = field(default_factory=list)  # what a stage changed (a clamp, a filtered tool list)
    started: float = field(default_factory=time.perf_counter)
    held_seconds: float = 0.0  # time held for a human's answer (approve:), not the gateway's latency
    recorded: bool = False

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None

    def report_note(self) -> str:
        """Report mode: what enforce mode would have done, for the ledger's ``note``."""
        parts = [f"{d.code} ({d.message})" for d in self.would_deny]
        if self.mode == "report" and self.approval_rule and self.decision != "deny":
            parts.append(f"approval_required ({self.approval_rule!r} would hold it for a human)")
        return "would deny: " + "; ".join(parts) if parts else ""

    def summary(self) -> dict[str, Any]:
        """A plain, secret-free dict: what saved flows (``-w``) and copies carry."""
        return {
            "vendor": self.vendor,
            "host": self.host,
            "key_id": self.key_id,
            "policy": self.policy,
            "labels": dict(self.key.labels) if self.key else {},
            "decision": self.decision,
            "reason": self.reason,
            "estimated_usd": plain(from_nanos(self.estimated_nanos)),
            "cost_usd": plain(self.cost.usd) if self.cost and self.cost.usd is not None else None,
            "cost_status": self.cost.status if self.cost else None,
        }

    # mitmproxy deep-copies metadata to save or copy a flow (tnetstring can only hold
    # plain values), so a copy of a Call is its summary.
    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        return self.summary()


def get_call(flow: http.HTTPFlow) -> Call | None:
    call = flow.metadata.get(METADATA_KEY)
    return call if isinstance(call, Call) else None


def keyed_call(flow: http.HTTPFlow) -> Call | None:
    """The flow's Call if identify accepted its key and no stage has refused it yet:
    the guard every policy stage starts with (like blocklist.py's ``if flow.response``)."""
    call = get_call(flow)
    if call is None or call.key is None or flow.response is not None:
        return None
    return call


def error_body(code: str, message: str, call: Call | None) -> bytes:
    """Stripe-shaped, so vendor SDKs surface the message."""
    return json.dumps({
        "error": {
            "type": "spendgate_error",
            "code": code,
            "message": message,
            "key_id": call.key_id if call else None,
            "policy": call.policy if call else None,
        }
    }).encode()


def refuse(flow: http.HTTPFlow, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    """Refuse ``flow`` with ``code`` (SPEC §4) now, whatever the mode: the request is stopped."""
    call = get_call(flow)
    if call is not None:
        call.decision, call.reason, call.message = "deny", code, message
    flow.response = refusal(
        STATUS[code],
        error_body(code, message, call),
        {"Content-Type": "application/json", "X-Spendgate-Reason": code, **(headers or {})},
    )


_SET_BY_CONTENT = frozenset({"content-encoding", "transfer-encoding", "content-length"})


def refusal(status: int, body: bytes, headers: dict[str, str]) -> http.Response:
    """``http.Response.make(status, body, headers)``, the same response (``tests/test_replay_fast.py``
    compares them), without the type check of every field mitmproxy's dataclass makes in debug
    mode (~60 µs): the fields here are built from known types. Headers that change what setting
    the body does (an encoding, a length) go through ``Response.make`` itself."""
    if any(k.lower() in _SET_BY_CONTENT for k in headers):
        return http.Response.make(status, body, headers)
    h = object.__new__(http.Headers)
    h.fields = (*((always_bytes(k, "utf-8", "surrogateescape"), always_bytes(v, "utf-8", "surrogateescape"))
                  for k, v in headers.items()), (b"content-length", str(len(body)).encode()))
    data = object.__new__(http.ResponseData)
    data.__dict__.update(http_version=b"HTTP/1.1", headers=h, content=body, trailers=None,
                         timestamp_start=time.time(), timestamp_end=time.time(), status_code=status,
                         reason=_REASONS.get(status, "").encode())
    resp = object.__new__(http.Response)
    resp.data = data
    return resp


def apply_verdicts(flow: http.HTTPFlow, call: Call, verdicts: Iterable[Verdict | None]) -> None:
    """Apply a stage's policy verdicts, in order, under ``call.mode``.

    ``enforce``: the first :class:`~spendgate.policy.Deny` refuses the flow and iteration stops
    (a generator of checks is not resumed, so the later checks do not run or count).
    ``report``: every verdict is taken; each Deny is kept in ``call.would_deny``, the first one
    is the call's reason, and the request goes on. An ``Approve`` names the rule that holds the
    request (the approve stage acts on it); ``Allow`` and ``None`` say nothing.
    """
    for verdict in verdicts:
        if isinstance(verdict, Approve):
            call.approval_rule = verdict.rule
        elif isinstance(verdict, Deny):
            if call.mode != "report":
                headers = {} if verdict.retry_after is None else {
                    "Retry-After": str(math.ceil(verdict.retry_after))}
                refuse(flow, verdict.code, verdict.message, headers)
                return
            call.would_deny.append(verdict)
            if call.decision == "allow":
                call.decision, call.reason, call.message = "would_deny", verdict.code, verdict.message


def usd(nanos: int | None) -> Decimal | None:
    return None if nanos is None else from_nanos(nanos)


def fail_closed(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a request-phase hook: any exception refuses the request (503 internal_error).

    mitmproxy logs an addon's exception and carries on with the flow; for a gateway
    that would mean forwarding a request some check never finished on.
    """

    def _refuse(self: Any, flow: http.HTTPFlow) -> None:
        if isinstance(sys.exception(), StoreUnavailable):  # logged once per outage by the store
            refuse(flow, "store_unavailable",
                   "the spendgate ledger cannot be reached; the request was not sent")
            return
        log.exception("spendgate: %s.%s failed; refusing the request",
                      type(self).__name__, hook.__name__)
        refuse(flow, "internal_error", "the gateway could not check this request; it was not sent")

    if inspect.iscoroutinefunction(hook):
        @functools.wraps(hook)
        async def async_wrapper(self: Any, flow: http.HTTPFlow, *args: Any) -> None:
            try:
                await hook(self, flow, *args)
            except Exception:
                _refuse(self, flow)

        return async_wrapper

    @functools.wraps(hook)
    def wrapper(self: Any, flow: http.HTTPFlow) -> Any:
        try:
            return hook(self, flow)  # (a hook may return an awaitable; mitmproxy awaits it)
        except Exception:
            _refuse(self, flow)
            return None

    return wrapper
