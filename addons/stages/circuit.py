"""Stage 5b, circuit: stop sending to a vendor that keeps failing, per policy and vendor.

``circuit: {failures: 5, window: 60s, cooldown: 30s}`` on a policy (these are the defaults; ``circuit:
off`` turns it off). ``failures`` consecutive upstream failures (a 5xx answer, a reset or a lost
answer, a timeout, an unreachable vendor) within ``window`` open the circuit for that policy and
vendor: calls get 503 ``circuit_open`` with ``Retry-After`` and never reach the vendor. After
``cooldown`` one call is let through (half-open): its success closes the circuit, its failure
opens it for another cooldown; the others keep getting ``circuit_open`` meanwhile. Any answer
below 500 counts as a success (the vendor is up; a 4xx is the agent's problem).

Runs after approve, just before swap, so only calls that would really be sent open or probe it
(an earlier refusal releases its budget hold as usual). A refusal is a verdict: report-only mode
records ``would_deny circuit_open`` and forwards the call. State is per gateway process, in
memory; opening and closing are logged, each open circuit is the gauge
``spendgate_circuit_open{policy,vendor}`` in ``/metrics``, and the flow that opened it says so in
its mitmweb comment and ledger note.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from mitmproxy import http

from .. import clock
from ..call import Call, apply_verdicts, fail_closed, get_call, keyed_call
from ..policy import CircuitRule, Deny
from ..runtime import Runtime

log = logging.getLogger("spendgate")

PROBE_KEY = "spendgate_circuit_probe"  # flow.metadata: this flow is the half-open probe


@dataclass
class Breaker:
    failures: int = 0  # consecutive, within the window
    first_failure: float = 0.0
    opened_at: float | None = None  # None: closed
    probing: str | None = None  # the flow id of the half-open probe in flight

    def state(self, now: float, rule: CircuitRule) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if now - self.opened_at >= rule.cooldown else "open"


class Circuit:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.breakers: dict[tuple[str, str], Breaker] = {}
        runtime.metric_sources.append(self.metric_lines)

    def _rule(self, call: Call | None) -> CircuitRule | None:
        policy = self.runtime.policy(call.policy or "") if call else None
        rule = policy.circuit if policy else None
        return rule if rule is not None and rule.enabled else None

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        call = keyed_call(flow)
        rule = self._rule(call)
        if call is None or rule is None:
            return
        breaker = self.breakers.get((call.policy or "", call.vendor or ""))
        if breaker is None or breaker.opened_at is None:
            return
        now = clock.monotonic()
        state = breaker.state(now, rule)
        if state == "half-open" and breaker.probing is None:
            breaker.probing = flow.id  # one call goes through to test the vendor
            flow.metadata[PROBE_KEY] = True
            return
        wait = max(1.0, rule.cooldown - (now - breaker.opened_at)) if state == "open" else 1.0
        apply_verdicts(flow, call, [Deny(
            "circuit_open",
            f"{call.vendor} failed {breaker.failures} times in a row for policy {call.policy!r}; "
            f"calls are paused for {math.ceil(wait)}s",
            "circuit", retry_after=wait)])

    def response(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or flow.response is None or "X-Spendgate-Reason" in flow.response.headers:
            return  # refused by the gateway: the vendor was not asked
        self._outcome(flow, call, failed=flow.response.status_code >= 500,
                      what=f"HTTP {flow.response.status_code}")

    def error(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if call is None or call.decision == "deny":
            return
        self._outcome(flow, call, failed=True, what=flow.error.msg if flow.error else "no answer")

    def _outcome(self, flow: http.HTTPFlow, call: Call, failed: bool, what: str) -> None:
        rule = self._rule(call)
        if rule is None or call.key is None or call.decision == "deny":
            return
        key = (call.policy or "", call.vendor or "")
        breaker = self.breakers.setdefault(key, Breaker())
        probe = flow.metadata.pop(PROBE_KEY, False)
        if probe and breaker.probing == flow.id:
            breaker.probing = None
        now = clock.monotonic()
        if not failed:
            if breaker.opened_at is not None and probe:
                log.warning("spendgate: circuit for %s/%s closed (the probe succeeded)", *key)
                call.notes.append("circuit closed: the probe succeeded")
            if probe or breaker.opened_at is None:
                self.breakers[key] = Breaker()
            return
        if probe:
            breaker.opened_at = now  # the probe failed: open for another cooldown
            call.notes.append(f"circuit reopened for {rule.cooldown}s: the probe failed ({what[:60]})")
            log.warning("spendgate: circuit for %s/%s reopened: the probe failed (%s)", *key, what)
            return
        if breaker.opened_at is not None:
            return  # already open (a call that was in flight when it opened)
        if breaker.failures == 0 or now - breaker.first_failure > rule.window:
            breaker.failures, breaker.first_failure = 0, now
        breaker.failures += 1
        if breaker.failures >= rule.failures:
            breaker.opened_at = now
            call.notes.append(f"circuit opened for {rule.cooldown}s after {breaker.failures} failures")
            log.warning("spendgate: circuit for %s/%s opened after %d consecutive failures (last: %s)",
                        *key, breaker.failures, what)

    def metric_lines(self) -> list[str]:
        now = clock.monotonic()
        lines = ["# HELP spendgate_circuit_open 1 while calls of a policy to a vendor are paused "
                 "(circuit open or half-open).", "# TYPE spendgate_circuit_open gauge"]
        for (policy, vendor), breaker in sorted(self.breakers.items()):
            rule = self._rule_of(policy)
            is_open = int(rule is not None and breaker.state(now, rule) != "closed")
            lines.append(f'spendgate_circuit_open{{policy="{policy}",vendor="{vendor}"}} {is_open}')
        return lines

    def _rule_of(self, policy: str) -> CircuitRule | None:
        pol = self.runtime.policy(policy)
        return pol.circuit if pol and pol.circuit.enabled else None
