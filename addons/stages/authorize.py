"""Authorize: may this key call this vendor endpoint, at this rate?

The endpoint rules are ``policy.decide`` (pure, table-tested in ``tests/test_verdicts.py``):
``METHOD /path`` patterns matched on the decoded path; deny wins over approve and allow; no
match is refused. Rate limits are per key (GCRA: O(1) memory per key), kept by the store: per
gateway process on SQLite, across the fleet on PostgreSQL (``store.rate_hit``).
Both are verdicts: the policy's mode decides whether they refuse (see ``call.apply_verdicts``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator

from mitmproxy import http

from .. import clock
from ..call import Call, apply_verdicts, fail_closed, keyed_call
from ..policy import Config, Deny, Rate, Verdict, decide
from ..runtime import STORE_WAIT, Runtime
from ..store import RateCheck
from .budget import call_caps, refuse_inactive_key, until_denied


class RateLimiter:
    """Generic cell rate algorithm: ``rate.limit`` requests per ``rate.period``, bursts allowed."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}  # key id → theoretical arrival time

    def hit(self, key_id: str, rate: Rate, now: float | None = None) -> float:
        """0 if allowed (and counted), else the seconds to wait."""
        now = clock.monotonic() if now is None else now
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
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        call = keyed_call(flow)
        if call is None:
            return None
        state = self.runtime.state
        assert state is not None
        call.mode = state.config.policy_mode(call.key.policy)
        policy, store = state.config.policies.get(call.key.policy), self.runtime.store
        if policy is not None and policy.rate is not None and store is not None and store.dialect == "postgres":
            try:  # the fleet-wide rate limit is a database round trip: never a blocking wait on the loop
                asyncio.get_running_loop()
                return self.request_offloaded(flow)
            except RuntimeError:  # no event loop (in-process tests)
                pass
        verdicts = until_denied(call, self.checks(flow, call, state.config))
        if not refuse_inactive_key(flow, call):
            apply_verdicts(flow, call, verdicts)
        return None

    @fail_closed
    async def request_offloaded(self, flow: http.HTTPFlow) -> None:
        call = keyed_call(flow)
        state, store = self.runtime.state, self.runtime.store
        assert call is not None and call.key is not None and state is not None and store is not None
        policy = state.config.policies.get(call.key.policy)
        if store.keys_cached and policy is not None and policy.rate is not None and not self.runtime.offload_inline:
            # PostgreSQL: the one round trip (key row, rate limit, room left) awaited on the event
            # loop (its socket), not on a worker thread: unless the endpoint rule already refuses.
            first = decide(state.config, call.key.policy, call.vendor or "", flow.request.method, flow.request.path)
            if not (isinstance(first, Deny) and call.mode != "report"):
                rate = RateCheck(call.key.id, policy.rate.limit, policy.rate.period)
                call.precheck = await store.precheck_async(call.key, rate, call_caps(call, policy, state.config),
                                                           STORE_WAIT)
            verdicts = until_denied(call, self.checks(flow, call, state.config))
        else:
            verdicts = await self.runtime.offload(until_denied, call, self.checks(flow, call, state.config))
        if not refuse_inactive_key(flow, call):
            apply_verdicts(flow, call, verdicts)

    def checks(self, flow: http.HTTPFlow, call: Call, config: Config) -> Iterator[Verdict | None]:
        """The endpoint rules, then the rate limit (counted only if enforce mode got that far)."""
        assert call.key is not None
        yield decide(config, call.key.policy, call.vendor or "", flow.request.method, flow.request.path)
        policy = config.policies.get(call.key.policy)
        store = self.runtime.store
        if policy is not None and policy.rate is not None and store is not None:
            if store.keys_cached:
                # One round trip: the key's row (a revoke is refused on the next request, whatever
                # the cache said), the rate limit, and the room left, which the budget stage reuses
                # (asked already if request_offloaded awaited it).
                pre = call.precheck
                if pre is None:
                    rate = RateCheck(call.key.id, policy.rate.limit, policy.rate.period)
                    pre = call.precheck = store.precheck(call.key, rate, call_caps(call, policy, config))
                if pre.key_state != "active":
                    call.key_refused = pre.key_state
                    return
                wait = pre.wait
            else:
                wait = store.rate_hit(call.key.id, policy.rate.limit, policy.rate.period)
            if wait > 0:
                yield Deny("rate_limited", f"key {call.key.id} is over its rate of {policy.rate.text}",
                           f"rate: {policy.rate.text}", retry_after=wait)
