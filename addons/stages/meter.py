"""Meter: the real cost of the call, from the vendor's response; settle the hold.

Streamed (SSE) responses are priced chunk by chunk through ``flow.response.stream``
(set in ``responseheaders``), so the stream reaches the agent unbuffered. A body that
can't be parsed is recorded as ``cost_status=unknown``, flagged, and passed through
untouched; the hold is then settled at the estimate, never at $0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal

from mitmproxy import http

from .. import bodies
from ..call import Call, get_call
from ..money import fmt_usd, from_nanos, plain, to_nanos
from ..runtime import Runtime
from ..vendors import REGISTRY
from ..vendors.base import Cost, ResponseView, StreamMeter
from .budget import header_dict, request_view

log = logging.getLogger("spendgate")

REQUEST_ID_HEADERS = ("request-id", "x-request-id", "twilio-request-id", "x-amzn-requestid")


def _streamer(meter: StreamMeter, call: Call) -> Callable[[bytes], bytes]:
    def stream(chunk: bytes) -> bytes:
        try:
            meter.feed(chunk)
        except Exception:  # never break the agent's stream over metering
            log.exception("spendgate: stream meter failed")
            call.meter_failed = True
        return chunk

    return stream


class Meter:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or call.decision == "deny" or flow.response is None or call.key is None:
            return
        if "text/event-stream" not in flow.response.headers.get("content-type", ""):
            return
        state = self.runtime.state
        assert state is not None
        vendor = REGISTRY[call.vendor or ""]
        try:
            meter = vendor.stream_meter(call.view or request_view(flow), state.prices, call.estimate)
        except Exception:
            log.exception("spendgate: %s stream_meter failed", vendor.name)
            meter = None
        if meter is not None:
            call.stream_meter = meter
            flow.response.stream = _streamer(meter, call)

    def response(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is None or call.key is None:
            return
        if call.decision == "deny":
            self.release(call)  # refused after the hold was taken (e.g. approval denied)
            return
        resp = flow.response
        headers = header_dict(resp.headers)
        for name in REQUEST_ID_HEADERS:
            if value := headers.get(name):
                call.request_id = value[:200]
                break
        call.cost = self.parse(flow, call, headers)
        vendor = REGISTRY.get(call.vendor or "")
        if flow.request.method in ("GET", "HEAD") and call.cost.usd and (vendor is None or vendor.reads_free):
            # Reading a message or a list shows prices billed by the calls that created
            # them; counting them again would charge an agent for polling.
            call.cost = Cost("zero", Decimal(0), call.cost.currency, call.cost.amount,
                             note=f"read: shows ${call.cost.usd} billed earlier; not counted again")
        self.settle(call, call.cost)
        if not resp.stream:  # a streamed response's headers are already on their way
            if call.cost.usd is not None:
                resp.headers["X-Spendgate-Cost-Usd"] = plain(call.cost.usd)
            if call.budget_left_nanos is not None:
                resp.headers["X-Spendgate-Budget-Remaining-Usd"] = plain(from_nanos(call.budget_left_nanos))

    def parse(self, flow: http.HTTPFlow, call: Call, headers: dict[str, str]) -> Cost:
        state = self.runtime.state
        assert state is not None and flow.response is not None
        vendor = REGISTRY[call.vendor or ""]
        meter = call.stream_meter
        try:
            if meter is not None:
                if call.meter_failed:
                    return Cost("unknown", None, note="stream meter failed")
                return meter.finish()
            try:  # bounded: a gzip bomb from upstream is not inflated past the limit
                body = bodies.content(flow.response, self.runtime.inflate_limit)
            except ValueError as e:
                return Cost("unknown", None, note=f"response body not priced: {e}"[:300])
            resp = ResponseView(flow.response.status_code, headers, body)
            return vendor.cost(call.view or request_view(flow), resp, state.prices, call.estimate)
        except Exception as e:  # a vendor parser bug must not break the response
            log.exception("spendgate: %s cost parser failed", vendor.name)
            return Cost("unknown", None, note=f"cost parser error: {type(e).__name__}")

    def settle(self, call: Call, cost: Cost) -> None:
        """Replace the hold by the real cost; an unknown cost counts at the estimate."""
        store = self.runtime.store
        assert store is not None
        actual = to_nanos(cost.usd) if cost.usd is not None else call.estimated_nanos
        if call.reservation is not None:
            store.settle(call.reservation, actual)
            if call.budget_left_nanos is not None:
                call.budget_left_nanos += call.reservation.nanos - actual
            call.reservation = None
        elif call.scopes and actual > 0:
            store.add_usage(actual, call.scopes)
        if cost.status == "unknown":
            log.warning("spendgate: cost unknown for %s (%s); counted at the estimate %s",
                        call.vendor, cost.note, fmt_usd(from_nanos(call.estimated_nanos)))

    def release(self, call: Call) -> None:
        if call.reservation is not None and self.runtime.store is not None:
            self.runtime.store.settle(call.reservation, 0)
            call.reservation = None

    def error(self, flow: http.HTTPFlow) -> None:
        """The vendor never answered (refused, reset, timed out)."""
        call = get_call(flow)
        if call is None or call.key is None:
            return
        if call.decision == "deny":
            self.release(call)
            return
        sent = flow.server_conn.timestamp_tcp_setup is not None and flow.request.timestamp_end is not None
        if not sent:
            # Nothing reached the vendor: release the hold entirely.
            call.cost = Cost("zero", Decimal(0), note="upstream unreachable; nothing sent")
            self.release(call)
            return
        # The request went out and the answer was lost: the vendor may have acted on it.
        # Count it at the estimate (flagged) rather than let a retry loop overshoot the cap.
        call.cost = Cost("unknown", None, note="response lost after the request was sent")
        self.settle(call, call.cost)
