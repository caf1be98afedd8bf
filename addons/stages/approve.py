"""Approve: hold a request that matches an ``approve:`` rule until a human decides.

Authorize names the rule (``policy.decide`` returned ``Approve``). In report mode nothing is
held: the ledger's note says the request would have waited for a human. A human's answer
(denied, or nobody in time) is not the policy's to waive, so it refuses in any mode.

The flow is intercepted the mitmproxy way, so mitmweb shows it as intercepted and
*resuming it there approves it*. From a shell, ``spendgate approve ID`` /
``spendgate deny ID`` (or the admin API) write the decision to the ledger, which a
watcher task polls. A hold nobody answers is refused after the policy's
``approval_timeout``. The wait is always bounded: mitmproxy does not tell addons
when an intercepted flow is killed (mitmproxy#8045), so the watcher notices it and answers
the agent ``approval_denied`` at once (recorded like any denial).

An agent cannot approve its own request: decisions come only from mitmweb and the
admin listener (both on loopback, which the egress stage refuses to agents) or from
the CLI with access to the ledger file.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import UTC, datetime, timedelta

from mitmproxy import http

from ..call import Call, fail_closed, keyed_call, refuse
from ..money import from_nanos, plain
from ..runtime import Runtime

log = logging.getLogger("spendgate")
POLL_INTERVAL = 0.1


class Approve:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.watchers: set[asyncio.Task] = set()

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        call = keyed_call(flow)
        if call is None or call.approval_rule is None:
            return
        store = self.runtime.store
        policy = self.runtime.policy(call.key.policy)
        assert store is not None and policy is not None
        if call.mode == "report":
            return  # never hold; record notes it (Call.report_note)
        approval_id = "apr_" + secrets.token_hex(6)
        timeout = policy.approval_timeout
        store.add_approval({
            "id": approval_id, "flow_id": flow.id, "key_id": call.key.id, "policy": call.policy,
            "vendor": call.vendor, "method": flow.request.method,
            "path": flow.request.path.split("?", 1)[0], "rule": call.approval_rule,
            "estimated_usd": plain(from_nanos(call.estimated_nanos)),
            "expires_at": (datetime.now(UTC) + timedelta(seconds=timeout)).isoformat(timespec="milliseconds"),
        })
        call.approval_id = approval_id
        flow.comment = (f"HELD for approval ({call.approval_rule}): resume here, or "
                        f"`spendgate approve {approval_id}` / `spendgate deny {approval_id}`")
        flow.intercept()
        task = asyncio.get_running_loop().create_task(self.watch(flow, call, approval_id, timeout))
        self.watchers.add(task)
        task.add_done_callback(self.watchers.discard)
        log.info("spendgate: held %s %s for approval %s", flow.request.method, flow.request.path, approval_id)

    async def watch(self, flow: http.HTTPFlow, call: Call, approval_id: str, timeout: float) -> None:
        held_at = time.perf_counter()
        try:
            await self._watch(flow, call, approval_id, timeout)
        finally:
            call.held_seconds = time.perf_counter() - held_at  # /metrics keeps it out of the latency

    async def _watch(self, flow: http.HTTPFlow, call: Call, approval_id: str, timeout: float) -> None:
        store = self.runtime.store
        assert store is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            if flow.error is not None:  # killed in mitmweb: a human said no
                store.decide_approval(approval_id, "denied", "mitmweb")
                # mitmproxy would drop the agent's connection only once it gave up itself; answer it
                # now instead (the flow is still waiting on its resume event, mitmproxy#8045)
                flow.error, flow.live = None, True
                refuse(flow, "approval_denied", f"approval {approval_id} was denied (killed in mitmweb)")
                flow.intercepted = True  # so that resume() below releases the waiting hook
                break
            status = store.approval_status(approval_id)
            if not flow.intercepted:  # resumed in mitmweb
                if status == "pending":
                    store.decide_approval(approval_id, "approved", "mitmweb")
                elif status != "approved":
                    refuse(flow, "approval_denied", f"approval {approval_id} was {status}")
                    return
                self.release(flow, call)
                return
            if status == "approved":
                self.release(flow, call)
                break
            if status == "denied":
                refuse(flow, "approval_denied", f"approval {approval_id} was denied")
                break
            if asyncio.get_running_loop().time() >= deadline:
                store.decide_approval(approval_id, "timeout", "gateway")
                refuse(flow, "approval_timeout", f"nobody answered approval {approval_id} in {timeout:g}s")
                break
        flow.resume()

    def release(self, flow: http.HTTPFlow, call: Call) -> None:
        """Approved: check the key once more, then mark the hold forwarded (a crash from here on
        must count it)."""
        self.check_key(flow, call)
        store = self.runtime.store
        if flow.response is None and call.reservation is not None and store is not None:
            store.mark_forwarded(call.reservation)

    def check_key(self, flow: http.HTTPFlow, call: Call) -> None:
        """At release, the key must still be good: a revoke or an expiry while the request waited
        for a human wins over the approval. (Its budget hold was taken before it was held.)"""
        store = self.runtime.store
        key = store.get_key(call.key.id) if store is not None and call.key is not None else None
        state = key.state() if key is not None else "revoked"
        if state != "active":
            call.mode = "enforce"
            refuse(flow, state, f"vault key {call.key_id} is {state}; approval {call.approval_id} "
                   "was given while it was active")

    def done(self) -> None:
        for task in self.watchers:
            task.cancel()
