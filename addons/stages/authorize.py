"""Stage 3, authorize: may this key call this vendor endpoint, at this rate?

Rules are ``METHOD /path`` patterns matched on the decoded path (see
``policy.path_segments``); deny wins over allow and approve; no match is refused.
Rate limits are per key and per gateway process (GCRA: O(1) memory per key).
"""

from __future__ import annotations

import math
import time

from mitmproxy import http

from ..call import fail_closed, keyed_call, refuse
from ..policy import Rate, UnsafePath, first_match, path_segments
from ..runtime import Runtime


class RateLimiter:
    """Generic cell rate algorithm: ``rate.limit`` requests per ``rate.period``, bursts allowed."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}  # key id → theoretical arrival time

    def hit(self, key_id: str, rate: Rate, now: float | None = None) -> float:
        """0 if allowed (and counted), else the seconds to wait."""
        now = time.monotonic() if now is None else now
        interval = rate.period / rate.limit
        tat = max(self._tat.get(key_id, now), now)
        wait = tat - now - (rate.period - interval)
        if wait > 0:
            return wait
        self._tat[key_id] = tat + interval
        return 0.0


class Authorize:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.limiter = RateLimiter()

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        call = keyed_call(flow)
        if call is None:
            return
        policy = self.runtime.policy(call.key.policy)
        if policy is None:
            refuse(flow, "vendor_not_allowed", f"policy {call.key.policy!r} no longer exists")
            return
        call.mode = self.runtime.state.config.policy_mode(call.key.policy)  # type: ignore[union-attr]
        rules = policy.vendors.get(call.vendor or "")
        if rules is None:
            if refuse(flow, "vendor_not_allowed", f"policy {call.policy!r} does not allow {call.vendor}"):
                return
        else:
            method, path = flow.request.method.upper(), flow.request.path.split("?", 1)[0]
            what = f"{method} {path}"
            try:
                segments = path_segments(path)
            except UnsafePath as e:
                refuse(flow, "endpoint_not_allowed", f"{what}: {e}")
                return
            if rule := first_match(rules.deny, method, segments):
                stopped = refuse(flow, "endpoint_not_allowed", f"{what} is denied by {rule.text!r}")
            elif rule := first_match(rules.approve, method, segments):
                call.approval_rule, stopped = rule.text, False
            elif first_match(rules.allow, method, segments):
                stopped = False
            else:
                stopped = refuse(flow, "endpoint_not_allowed",
                                 f"{what} is not allowed by policy {call.policy!r}")
            if stopped:
                return
        if policy.rate is not None:
            wait = self.limiter.hit(call.key.id, policy.rate)
            if wait > 0:
                refuse(flow, "rate_limited",
                       f"key {call.key.id} is over its rate of {policy.rate.text}",
                       {"Retry-After": str(math.ceil(wait))})
