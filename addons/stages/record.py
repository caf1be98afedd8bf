"""Record: one ledger row per request, a one-line flow comment, a mark on refusals.

Runs last, for every outcome: ``response`` (allowed, or refused by a stage),
``error`` (the vendor never answered) and ``http_connect`` (a refused tunnel).
The row holds no secrets and no bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable

from mitmproxy import ctx, http

from .. import clock, wire
from ..call import STATUS, Call, get_call
from ..canonical import escape
from ..money import fmt_usd, from_nanos, plain, to_nanos
from ..runtime import Runtime

log = logging.getLogger("spendgate")

REFUSED_MARK = ":no_entry:"
COMMIT_WAIT = 5.0  # seconds an answer waits, at most, for its ledger row to be committed
MONEY_COMMIT_WAIT = 60.0  # ... when money may have moved: held through a ledger outage, not sent unrecorded


def commit_wait(call: Call, ledger_up: bool) -> float:
    """How long this call's answer may wait for its row. A call that may have moved money (it was
    forwarded with a price) is held up to :data:`MONEY_COMMIT_WAIT`, through a ledger outage
    (disk full, database down); a refusal or a free read waits :data:`COMMIT_WAIT`, and not at
    all while the ledger is known to be down or the call was refused for it (its row stays queued
    and is committed later)."""
    moved = call.decision != "deny" and (call.estimated_nanos > 0 or bool(call.cost and call.cost.usd))
    if moved:
        return MONEY_COMMIT_WAIT
    if not ledger_up or call.reason == "store_unavailable":  # refused *because* the ledger is stuck
        return 0.0
    return COMMIT_WAIT


def ledger_row(flow: http.HTTPFlow, call: Call, status: int | None) -> dict:
    req = flow.request
    cost = call.cost
    return {
        "ts": clock.now().isoformat(timespec="milliseconds"),
        "flow_id": flow.id,
        "key_id": call.key_id,
        "policy": call.policy,
        "labels": call.key.labels_json if call.key else "{}",
        "vendor": call.vendor,
        "method": req.method,
        "host": call.host or req.host,
        "path": req.path.split("?", 1)[0][:2000],
        "status": status,
        "decision": call.decision,
        "reason": call.reason,
        "estimated_usd": plain(from_nanos(call.estimated_nanos)),
        "estimated_nanos": call.estimated_nanos,
        "cost_usd": plain(cost.usd) if cost and cost.usd is not None else None,
        "cost_nanos": to_nanos(cost.usd) if cost and cost.usd is not None else None,
        "cost_status": cost.status if cost else ("zero" if call.decision == "deny" else None),
        "flagged": int(bool(cost and cost.status in ("unknown", "estimated"))),
        "note": note(call)[:500],
        "currency": (cost.currency if cost else None) or (call.estimate.currency if call.estimate else None),
        "amount": plain(cost.amount) if cost and cost.amount is not None else None,
        "request_id": call.request_id,
        "latency_ms": round((time.perf_counter() - call.started) * 1000, 3),
        "model": call.model,
        "tool": call.tool,
        "object_id": cost.object_id if cost else None,
        # where a later reconcile must correct the counters (only a cost that may still change needs it)
        "scopes": json.dumps(call.scopes) if cost and cost.status in ("estimated", "unknown") else None,
    }


def note(call: Call) -> str:
    """The cost's note, or the refusal's message; in report mode, every would-deny reason first."""
    notes = "".join(f"{n} · " for n in call.notes)  # what a stage changed (a clamp, a filtered list)
    if report := call.report_note():
        return notes + (f"{report} · {call.cost.note}" if call.cost and call.cost.note else report)
    return notes + (call.cost.note if call.cost else call.message or "")


def comment(call: Call, flow: http.HTTPFlow) -> str:
    labels = ",".join(f"{k}={v}" for k, v in (call.key.labels if call.key else {}).items())
    who = f"{call.key_id or 'no key'}" + (f" ({labels})" if labels else "")
    parts = [call.decision.upper() if call.decision != "allow" else "allow"]
    if call.would_deny and call.decision == "would_deny":
        parts.append("+".join(d.code for d in call.would_deny))
    elif call.reason:
        parts.append(call.reason)
    parts += [call.vendor or flow.request.host, who]
    if call.cost and call.cost.usd is not None:
        parts.append(f"cost {fmt_usd(call.cost.usd)} {call.cost.status}")
    elif call.estimated_nanos:
        parts.append(f"est {fmt_usd(from_nanos(call.estimated_nanos))}")
    if call.budget_left_nanos is not None:
        parts.append(f"budget left {fmt_usd(from_nanos(call.budget_left_nanos))}")
    if call.approval_rule:
        parts.append(f"approval: {call.approval_rule}")
    parts += call.notes
    return " · ".join(parts)


def timed_out(flow: http.HTTPFlow, msg: str) -> bool:
    """Did the vendor take too long? mitmproxy 12 has no per-request upstream read timeout: a silent
    vendor is cut by ``tcp_timeout`` (inactivity of the agent's connection), which mitmproxy reports
    as "Client disconnected." once nothing moved for that long. A connect timeout says "timed out"."""
    low = msg.lower()
    if "timeout" in low or "timed out" in low:
        return True
    waiting_since = (flow.response.timestamp_start if flow.response is not None else None) \
        or flow.request.timestamp_end
    if not msg.startswith("Client disconnected") or waiting_since is None:
        return False
    return time.time() - waiting_since >= getattr(ctx.options, "tcp_timeout", 600) - 0.1


class Record:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.log_decisions = True
        self.json_logs = False
        self.comments = True

    def configure(self, updated: set[str]) -> None:
        # mitmproxy turns every log record into an event for every addon (and a self-pipe write),
        # shown or not: log decisions only where someone reads them (the terminal at info, mitmweb).
        verbosity = getattr(ctx.options, "termlog_verbosity", "info")
        shown = logging.getLevelName(verbosity.upper())
        self.log_decisions = not isinstance(shown, int) or shown <= logging.INFO or _has_event_log()
        self.json_logs = getattr(ctx.options, "spendgate_log_format", "text") == "json"
        self.comments = _comments_shown()

    # Each hook returns what ``record`` returns: mitmproxy awaits it before the answer goes out.
    def http_connect(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        if flow.response is not None and flow.response.status_code != 200:
            return self.record(flow, flow.response.status_code)
        return None

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        return self.record(flow, flow.response.status_code if flow.response else None)

    def error(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        call = get_call(flow)
        if call is None or call.recorded:
            return None
        msg = flow.error.msg if flow.error else ""
        if call.decision == "allow":
            call.reason = "upstream_timeout" if timed_out(flow, msg) else "upstream_unreachable"
            call.message = msg
        return self.record(flow, STATUS.get(call.reason or "", 502))

    def record(self, flow: http.HTTPFlow, status: int | None) -> Awaitable[None] | None:
        """Commit the ledger row, or queue it and return an awaitable that resolves once it is committed."""
        call = get_call(flow)
        if call is None or call.recorded:
            return None
        call.recorded = True
        wire.forget(call.wire_ref)
        store = self.runtime.store
        assert store is not None
        row = ledger_row(flow, call, status)
        wait = commit_wait(call, store.available)
        answer = None
        # Committed here when the ledger can do it at once (SQLite's write lock free this instant):
        # the answer then needs no round trip through the writer thread. Else queued, and the
        # answer waits for the writer's commit.
        if not (wait and store.record_call_now(row)):
            give_up = None if wait == MONEY_COMMIT_WAIT else (lambda: not store.available)
            on_commit, answer = commit_waiter(wait, give_up) if wait else (None, None)
            store.record_call(row, on_commit)
        for listener in self.runtime.on_record:
            try:
                listener(row, call)
            except Exception:
                log.exception("spendgate: record listener failed")
        if self.comments:
            flow.comment = comment(call, flow)
        if call.decision != "allow":
            flow.marked = REFUSED_MARK
        if self.log_decisions:
            log.info(decision_line(row, self.json_logs))
        return answer


def _has_event_log() -> bool:
    """Is mitmweb's (or mitmproxy console's) event log loaded?"""
    try:
        return ctx.master.addons.get("eventstore") is not None
    except AttributeError:  # no master (unit tests)
        return False


def _comments_shown() -> bool:
    """Can anyone see a flow comment? mitmweb and the console show them, saved flows (``-w``,
    ``spendgate_capture``) keep them, and so does any master that is not a plain mitmdump (tests,
    ``spendgate replay``). A mitmdump that saves nothing shows them nowhere, and building one
    costs ~20 µs per request."""
    try:
        master = ctx.master
    except AttributeError:  # no master (unit tests)
        return True
    from mitmproxy.tools.dump import DumpMaster

    if not isinstance(master, DumpMaster) or _has_event_log() or master.addons.get("view") is not None:
        return True
    return bool(getattr(ctx.options, "save_stream_file", None) or getattr(ctx.options, "spendgate_capture", None))


def commit_waiter(timeout: float = COMMIT_WAIT, give_up: Callable[[], bool] | None = None,
                  ) -> tuple[Callable[[], None] | None, Awaitable[None] | None]:
    """A callback for the ledger's writer thread, and an awaitable it resolves; (None, None)
    outside an event loop.

    The hooks return the awaitable, so mitmproxy sends the answer (a response, a refusal, the
    502 of a failed upstream) only after the call's row is in the ledger: a kill -9 loses no
    answered call. (Used when the row could not be committed on the loop at once: the commit
    then runs in the ledger's writer, group commit: a thread for SQLite, a task on this loop for
    PostgreSQL, which calls it on the loop's own thread.)
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None, None
    done: asyncio.Future[None] = loop.create_future()
    loop_thread = threading.get_ident()

    def resolve() -> None:
        if not done.done():
            done.set_result(None)

    def on_commit() -> None:
        # On the loop's own thread (an in-memory ledger commits inside record_call): resolved
        # now, so the hook's await returns without a trip through the loop.
        if threading.get_ident() == loop_thread:
            resolve()
        else:
            loop.call_soon_threadsafe(resolve)

    return on_commit, _wait(done, timeout, give_up)


async def _wait(done: asyncio.Future[None], timeout: float, give_up: Callable[[], bool] | None) -> None:
    """Until the row is committed, or ``timeout``; or, for an answer that moved no money, until the
    ledger is known to be down (``give_up``): its row stays queued and is committed later."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not done.done():
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            log.error("spendgate: the ledger did not commit within %ss; answering anyway (the row stays queued)",
                      timeout)
            return
        if give_up is not None and give_up():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), min(left, 0.05 if give_up else left))


LOG_FIELDS = ("ts", "decision", "reason", "vendor", "method", "host", "path", "status", "key_id",
              "policy", "estimated_usd", "cost_usd", "cost_status", "request_id", "latency_ms")


def decision_line(row: dict, as_json: bool) -> str:
    """One line per decision, from the ledger row (so it holds no secrets and no bodies)."""
    if as_json:
        return json.dumps({"event": "spendgate.decision", **{k: row.get(k) for k in LOG_FIELDS}})
    cost = f" cost={row['cost_usd']}({row['cost_status']})" if row.get("cost_usd") is not None else ""
    return (f"spendgate: {row['decision']} {row['reason'] or '-'} {row['vendor'] or row['host']} "
            f"{escape(row['method'])} {escape(row['path'])} key={row['key_id'] or '-'} status={row['status']}{cost}")
