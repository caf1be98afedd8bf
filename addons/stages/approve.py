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
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from mitmproxy import http

from ..call import Call, fail_closed, keyed_call, refuse
from ..money import from_nanos, plain
from ..runtime import Runtime
from ..store import KeyRecord, StoreUnavailable

log = logging.getLogger("spendgate")
POLL_INTERVAL = 0.1


class Approve:
    """Every ledger call here (adding the approval, polling it, deciding it, the key check and
    ``mark_forwarded`` at release) runs on the runtime's side pool, bounded by ``STORE_WAIT``:
    a lock held elsewhere delays the held call only, never the event loop. A hold the ledger
    cannot add is refused 503 ``store_unavailable``; a poll that does not answer is retried until
    the approval's deadline; a release the ledger cannot confirm is refused (fail closed)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.watchers: set[asyncio.Task] = set()

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        call = keyed_call(flow)
        if call is None or call.approval_rule is None:
            return None
        store = self.runtime.store
        policy = self.runtime.policy(call.key.policy)
        assert store is not None and policy is not None
        if call.mode == "report":
            return None  # never hold; record notes it (Call.report_note)
        approval_id = "apr_" + secrets.token_hex(6)
        timeout = policy.approval_timeout
        row = {
            "id": approval_id, "flow_id": flow.id, "key_id": call.key.id, "policy": call.policy,
            "vendor": call.vendor, "method": flow.request.method,
            "path": flow.request.path.split("?", 1)[0], "rule": call.approval_rule,
            "estimated_usd": plain(from_nanos(call.estimated_nanos)),
            "expires_at": (datetime.now(UTC) + timedelta(seconds=timeout)).isoformat(timespec="milliseconds"),
        }
        asyncio.get_running_loop()  # none: nothing could hold it; fail_closed refuses it (never sent)
        return self.hold(flow, call, row, timeout)

    @fail_closed
    async def hold(self, flow: http.HTTPFlow, call: Call, row: dict, timeout: float) -> None:
        store = self.runtime.store
        assert store is not None
        approval_id = row["id"]
        # Added late (after its call was refused for waiting too long): nobody is waiting on it.
        await self.runtime.offload(store.add_approval, row, side=True, late=lambda: self.runtime.submit(
            store.decide_approval, approval_id, "timeout", "gateway"))
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
        except Exception:  # never leave the agent waiting on a held flow
            log.exception("spendgate: approval %s watcher failed; refusing the request", approval_id)
            if flow.response is None:
                refuse(flow, "internal_error", "the gateway could not check this request; it was not sent")
            flow.resume()
        finally:
            call.held_seconds = time.perf_counter() - held_at  # /metrics keeps it out of the latency

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.runtime.offload(fn, *args, side=True)

    async def _decide(self, approval_id: str, status: str, by: str) -> bool | None:
        """Write a refusal's decision (a kill, a timeout): True, False if it was decided already,
        None if the ledger did not answer in time (the call is refused all the same; the write
        still lands when the ledger is back)."""
        store = self.runtime.store
        assert store is not None
        try:
            return await self._db(store.decide_approval, approval_id, status, by)
        except StoreUnavailable:
            return None

    async def _watch(self, flow: http.HTTPFlow, call: Call, approval_id: str, timeout: float) -> None:
        store = self.runtime.store
        assert store is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            if flow.error is not None:  # killed in mitmweb: a human said no
                await self._decide(approval_id, "denied", "mitmweb")
                # mitmproxy would drop the agent's connection only once it gave up itself; answer it
                # now instead (the flow is still waiting on its resume event, mitmproxy#8045)
                flow.error, flow.live = None, True
                refuse(flow, "approval_denied", f"approval {approval_id} was denied (killed in mitmweb)")
                flow.intercepted = True  # so that resume() below releases the waiting hook
                break
            try:
                status = await self._db(store.approval_status, approval_id)
            except StoreUnavailable:
                status = None  # not known this time: asked again at the next poll, until the deadline
            if not flow.intercepted:  # resumed in mitmweb
                try:
                    if status is None:
                        status = await self._db(store.approval_status, approval_id)
                    if status == "pending" and not await self._db(store.decide_approval, approval_id,
                                                                  "approved", "mitmweb"):
                        status = await self._db(store.approval_status, approval_id)  # decided meanwhile
                    elif status == "pending":
                        status = "approved"
                except StoreUnavailable:
                    refuse(flow, "store_unavailable", f"approval {approval_id} was resumed in mitmweb but "
                           "the ledger cannot record it; the request was not sent")
                    return
                if status != "approved":
                    refuse(flow, "approval_denied", f"approval {approval_id} was {status}")
                    return
                await self.release(flow, call)
                return
            if status == "approved":
                await self.release(flow, call)
                break
            if status == "denied":
                refuse(flow, "approval_denied", f"approval {approval_id} was denied")
                break
            if asyncio.get_running_loop().time() >= deadline:
                if await self._decide(approval_id, "timeout", "gateway") is False:
                    continue  # answered at the last moment: the next poll reads the answer
                refuse(flow, "approval_timeout", f"nobody answered approval {approval_id} in {timeout:g}s")
                break
        flow.resume()

    async def release(self, flow: http.HTTPFlow, call: Call) -> None:
        """Approved: check the key once more, then mark the hold forwarded (a crash from here on
        must count it). Neither confirmed by the ledger in time: refused 503, never sent."""
        store = self.runtime.store
        assert store is not None
        try:
            key = await self._db(store.get_key, call.key.id) if call.key is not None else None
            self.check_key(flow, call, key)
            if flow.response is None and call.reservation is not None:
                await self._db(store.mark_forwarded, call.reservation)
        except StoreUnavailable:
            call.mode = "enforce"
            refuse(flow, "store_unavailable", f"approval {call.approval_id} was given but the ledger "
                   "cannot confirm the key or the hold; the request was not sent")

    def check_key(self, flow: http.HTTPFlow, call: Call, key: KeyRecord | None) -> None:
        """At release, the key must still be good: a revoke or an expiry while the request waited
        for a human wins over the approval. (Its budget hold was taken before it was held.)"""
        state = key.state() if key is not None else "revoked"
        if state != "active":
            call.mode = "enforce"
            refuse(flow, state, f"vault key {call.key_id} is {state}; approval {call.approval_id} "
                   "was given while it was active")

    def done(self) -> None:
        for task in self.watchers:
            task.cancel()
