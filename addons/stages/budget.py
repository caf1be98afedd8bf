"""Budget: estimate the call before it is forwarded, and hold the money.

The estimate comes from the vendor module (``estimate(request)``). Every budget
scope that applies (SPEC §3: per key, per key per day, per policy per day and per
month; a key's own ``cap_usd`` narrows ``key_usd``; ``per_label`` caps per label value)
gets the estimate reserved in one atomic store transaction; the meter stage settles it
to the parsed cost. Days and calendar months are those of the file's ``timezone:`` (UTC
unless it says otherwise).

The loop breaker refuses the same priced request (method, path, body) from one key
more than ``loop.repeats`` times within ``loop.window``, unless it repeats an
Idempotency-Key already seen (the vendor dedupes those, so they cost nothing).

Both the loop breaker and the holds live in the store: per process on SQLite, across the fleet
on PostgreSQL, asked in one call (``store.admit``: one round trip on PostgreSQL).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from mitmproxy import http

from .. import clock
from ..call import Call, apply_verdicts, fail_closed, keyed_call, refuse
from ..money import Unpriceable, fmt_usd, from_nanos, to_nanos
from ..policy import Config, Deny, Policy, VendorRules
from ..runtime import STORE_WAIT, Runtime
from ..store import Admission, KeyRecord, LoopCheck
from ..store.limits import LoopBreaker, fingerprint  # noqa: F401  (LoopBreaker: re-exported)
from ..vendors import REGISTRY
from ..vendors.base import Estimate, Prices, RequestView


def header_dict(headers: http.Headers) -> dict[str, str]:
    """Lower-case name → value, as ``{k.lower(): v for k, v in headers.items()}`` gives it (repeated
    headers joined with ", ", values decoded as mitmproxy decodes them), in one pass over the raw
    fields, at a tenth of the cost."""
    out: dict[str, str] = {}
    for k, v in headers.fields:
        name, value = k.decode("latin-1").lower(), v.decode("utf-8", "surrogateescape")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def request_view(flow: http.HTTPFlow) -> RequestView:
    req = flow.request
    path, _, query = req.path.partition("?")
    return RequestView(
        method=req.method.upper(), path=path, query=query, host=req.host,
        headers=header_dict(req.headers),
        body=req.get_content(strict=False) or b"",
    )


UNCAPPED = 2**62  # nanos: a scope counted (a label total another policy caps) but not capped here


def label_periods(config: Config | None) -> dict[str, tuple[bool, bool]]:
    """Label name → (a daily cap, a monthly cap) declared by any policy of the file."""
    out: dict[str, tuple[bool, bool]] = {}
    for pol in config.policies.values() if config else ():
        for name, caps in pol.budget.per_label.items():
            daily, monthly = out.get(name, (False, False))
            out[name] = (daily or caps.daily_usd is not None, monthly or caps.monthly_usd is not None)
    return out


def budget_caps(policy_name: str, policy: Policy, key: KeyRecord, at: datetime,
                labels: dict[str, tuple[bool, bool]] | None = None) -> dict[str, int]:
    """Scope name → cap in nano-dollars, for every cap that applies to this key.

    ``labels`` (:func:`label_periods`): a label total any policy caps is counted for every key
    carrying the label, uncapped where this policy sets no cap for it, so the team's total is
    the same whichever of its agents spent."""
    b = policy.budget
    caps = {}
    day = at.date().isoformat()  # YYYY-MM-DD (a tenth of the cost of f"{at:%Y-%m-%d}")
    key_total = [c for c in (b.key_usd, key.cap_usd) if c is not None]
    if key_total:
        caps[f"key:{key.id}"] = to_nanos(min(key_total))
    if b.key_daily_usd is not None:
        caps[f"key:{key.id}:day:{day}"] = to_nanos(b.key_daily_usd)
    if b.policy_daily_usd is not None:
        caps[f"policy:{policy_name}:day:{day}"] = to_nanos(b.policy_daily_usd)
    if b.policy_monthly_usd is not None:
        caps[f"policy:{policy_name}:month:{day[:7]}"] = to_nanos(b.policy_monthly_usd)
    for name, (daily, monthly) in (labels if labels is not None else label_periods_of(policy)).items():
        if (value := key.labels.get(name)) is None:
            continue  # one cap per distinct label value, across policies; keys without it are not capped
        scope = f"label:{name}={quote(value, safe='')}"
        mine = b.per_label.get(name)
        if daily:
            cap = mine.daily_usd if mine else None
            caps[f"{scope}:day:{day}"] = UNCAPPED if cap is None else to_nanos(cap)
        if monthly:
            cap = mine.monthly_usd if mine else None
            caps[f"{scope}:month:{day[:7]}"] = UNCAPPED if cap is None else to_nanos(cap)
    return caps


def label_periods_of(policy: Policy) -> dict[str, tuple[bool, bool]]:
    return {n: (c.daily_usd is not None, c.monthly_usd is not None) for n, c in policy.budget.per_label.items()}


def with_default(estimate: Estimate, rules: VendorRules | None) -> Estimate | None:
    """A request that moves money without saying how much: hold the policy's
    ``default_estimate_usd``, else its ``max_request_usd``; ``None`` when neither is set
    (the call is refused 402 ``unpriceable``: it is never forwarded on a $0 hold)."""
    default = rules and (rules.default_estimate_usd or rules.max_request_usd)
    if not default:
        return None
    return Estimate(
        usd=default, moves_money=estimate.moves_money, currency=estimate.currency, amount=estimate.amount,
        basis=f"{estimate.basis or 'no amount in the request'}; policy default {fmt_usd(default)}",
    )


def unpriceable_message(vendor: str, policy: str, estimate: Estimate) -> str:
    return (f"{estimate.basis or 'this call moves money but its amount is unknown'}; set "
            f"policies.{policy}.vendors.{vendor}.default_estimate_usd (or max_request_usd) "
            "to hold that amount for such calls")


def until_denied(call: Call, verdicts: Iterator[Deny | None]) -> list[Deny | None]:
    """Run the checks as ``apply_verdicts`` would (enforce mode stops at the first Deny, so later
    checks neither run nor count), collecting the verdicts for it to apply."""
    out: list[Deny | None] = []
    for verdict in verdicts:
        out.append(verdict)
        if isinstance(verdict, Deny) and call.mode != "report":
            break
    return out


def call_caps(call: Call, policy: Policy, config: Config | None) -> dict[str, int]:
    """The budget scopes (scope → cap) of this call, now (days in the policy file's zone)."""
    assert call.key is not None and call.policy is not None
    zone = config.timezone if config else UTC
    return budget_caps(call.policy, policy, call.key, clock.now().astimezone(zone), label_periods(config))


def refuse_inactive_key(flow: http.HTTPFlow, call: Call) -> bool:
    """Refuse the call (whatever the mode) if a round trip found its key no longer active: a
    revoke committed after this replica's key cache answered (PostgreSQL)."""
    state = call.key_refused
    if state is None:
        return False
    if state == "unknown":
        refuse(flow, "unknown_key", "this vault key is not known to the gateway")
    else:
        refuse(flow, state, f"vault key {call.key_id} is {state}")
    return True


@dataclass(frozen=True)
class AdmitAsk:
    """What :meth:`Budget.checks` yields, with ``ask=True``, for its driver to await
    (``store.admit_async``) and send back as the :class:`Admission`."""

    nanos: int
    caps: dict[str, int]
    hold: dict[str, Any] | None
    forwarded: bool
    loop: LoopCheck | None
    hold_if_looped: bool
    key: KeyRecord | None


class _WouldWait(Exception):
    """The store cannot answer without waiting: run the checks on the pool instead."""


class Budget:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """The checks touch the database (the loop breaker, the hold): under mitmproxy they run on
        the runtime's pool, bounded by ``STORE_WAIT`` (then 503 ``store_unavailable``)."""
        call = keyed_call(flow)
        if call is None:
            return None
        if self.runtime.offload_inline:  # (replay's in-memory ledger never waits: no coroutine)
            apply_verdicts(flow, call, self.verdicts(flow, call))
            return None
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no event loop (in-process tests): run them here
            verdicts = self.verdicts(flow, call)
            if not refuse_inactive_key(flow, call):
                apply_verdicts(flow, call, verdicts)
            return None
        store = self.runtime.store
        if (store is not None and (store.dialect != "postgres" or call.precheck is not None)
                and not self.runtime.offload_inline):
            # SQLite: answered here when its write lock is free this instant (a worker thread's hop
            # costs more than the hold); else everything runs again on the pool, where it may wait.
            # PostgreSQL: answered here when authorize's round trip already read what a read needs.
            try:
                verdicts = self.verdicts(flow, call, at_once=True)
            except _WouldWait:
                pass
            else:
                if not refuse_inactive_key(flow, call):
                    apply_verdicts(flow, call, verdicts)
                return None
        if store is not None and store.dialect == "postgres":
            return self.request_async(flow)
        return self.request_offloaded(flow)

    @fail_closed
    async def request_async(self, flow: http.HTTPFlow) -> None:
        """PostgreSQL: the checks run here, on the event loop; their one round trip (the key's row,
        the loop breaker, the hold) is awaited on the loop's own connection (``admit_async``): no
        worker thread. Refused 503 ``store_unavailable`` past ``STORE_WAIT`` (a hold made after
        that is given back by the store)."""
        call = keyed_call(flow)
        assert call is not None and call.key is not None
        store, state = self.runtime.store, self.runtime.state
        policy = self.runtime.policy(call.key.policy)
        verdicts: list[Deny | None] = []
        if store is not None and state is not None and policy is not None:
            gen = self.checks(flow, call, state.prices, policy, ask=True)
            answer: Any = None
            try:
                while True:
                    verdict = gen.send(answer)
                    answer = None
                    if isinstance(verdict, AdmitAsk):
                        answer = await store.admit_async(
                            verdict.nanos, verdict.caps, verdict.hold, verdict.forwarded, loop=verdict.loop,
                            hold_if_looped=verdict.hold_if_looped, key=verdict.key, timeout=STORE_WAIT)
                        continue
                    verdicts.append(verdict)  # as until_denied: enforce mode stops at the first Deny
                    if isinstance(verdict, Deny) and call.mode != "report":
                        break
            except StopIteration:
                pass
        if not refuse_inactive_key(flow, call):
            apply_verdicts(flow, call, verdicts)

    @fail_closed
    async def request_offloaded(self, flow: http.HTTPFlow) -> None:
        call = keyed_call(flow)
        assert call is not None
        verdicts = await self.runtime.offload(self.verdicts, flow, call, late=lambda: self.release_late(call))
        if not refuse_inactive_key(flow, call):
            apply_verdicts(flow, call, verdicts)

    def verdicts(self, flow: http.HTTPFlow, call: Call, at_once: bool = False) -> list[Deny | None]:
        """The checks' verdicts; ``at_once``: raise :class:`_WouldWait` (nothing held, nothing
        counted) rather than wait for the store."""
        assert call.key is not None
        state = self.runtime.state
        policy = self.runtime.policy(call.key.policy)
        if state is None or policy is None:
            return []
        return until_denied(call, self.checks(flow, call, state.prices, policy, at_once))

    def release_late(self, call: Call) -> None:
        """A hold made after its call was refused for taking too long: give it back."""
        res, call.reservation = call.reservation, None
        if res is not None and self.runtime.store is not None:
            self.runtime.store.settle(res, 0)

    def checks(self, flow: http.HTTPFlow, call: Call, prices: Prices, policy: Policy,
               at_once: bool = False, ask: bool = False) -> Generator[Any, Any, None]:
        """Price, per-request limit, loop breaker, then the hold (verdicts; see ``call.apply_verdicts``)."""
        assert call.key is not None
        vendor = REGISTRY[call.vendor or ""]
        rules = policy.vendors.get(vendor.name)
        view = call.view = request_view(flow)  # the meter stage reads it again
        fx_missing = False
        try:
            estimate = vendor.estimate(view, prices)
        except Unpriceable as e:
            fx_missing = True
            estimate = call.estimate = Estimate(usd=None, moves_money=True, currency=e.currency, basis=str(e))
            yield Deny("unpriceable", str(e))
        if estimate.usd is None:
            held = with_default(estimate, rules)
            if held is None:
                call.estimate = estimate
                if not fx_missing:
                    yield Deny("unpriceable", unpriceable_message(vendor.name, call.key.policy, estimate),
                               "default_estimate_usd: not set")
                held = Estimate(usd=Decimal(0), moves_money=True, basis=estimate.basis)  # report mode goes on
            estimate = held
        elif estimate.open_context:  # context the estimate cannot see: the policy's default bounds it
            floor = with_default(estimate, rules)
            if floor is None:
                yield Deny("unpriceable", unpriceable_message(vendor.name, call.key.policy, estimate),
                           "default_estimate_usd: not set")
            elif floor.usd is not None and floor.usd > estimate.usd:
                estimate = floor
        call.estimate = estimate
        call.estimated_nanos = nanos = to_nanos(estimate.usd)

        cap = rules.max_request_usd if rules else None
        if cap is not None and estimate.usd > cap:
            yield Deny("request_over_limit",
                       f"estimated {fmt_usd(estimate.usd)} is over max_request_usd {fmt_usd(cap)}",
                       f"max_request_usd: {cap}")

        loop = None
        if view.method != "GET" and (estimate.moves_money or nanos > 0):
            loop = LoopCheck(fingerprint(call.key.id.encode(), view.method.encode(),
                                         view.path.encode(errors="surrogateescape"), view.body),
                             view.headers.get("idempotency-key"), policy.loop.repeats, policy.loop.window)
        yield from self.admit(call, policy, nanos, flow, loop, at_once, ask)

    def admit(self, call: Call, policy: Policy, nanos: int, flow: http.HTTPFlow,
              loop: LoopCheck | None, at_once: bool = False, ask: bool = False) -> Generator[Any, Any, None]:
        """The loop breaker, then the hold: one store call (one round trip on PostgreSQL, which also
        reads the key's row, unless authorize's round trip did). ``ask``: yield an :class:`AdmitAsk`
        and take the :class:`Admission` sent back (see :meth:`request_async`) instead of calling."""
        assert call.key is not None and call.policy is not None
        store = self.runtime.store
        assert store is not None
        state = self.runtime.state
        caps = call_caps(call, policy, state.config if state else None)
        hold = None
        if nanos > 0:
            req = flow.request
            hold = {  # what a recovered hold's ledger row says, should this gateway die mid-call
                "flow_id": flow.id, "key_id": call.key.id, "policy": call.policy,
                "labels": call.key.labels_json, "vendor": call.vendor, "method": req.method,
                "host": call.host or req.host, "path": req.path.split("?", 1)[0][:2000],
                "currency": call.estimate.currency if call.estimate else None,
            }
        report = call.mode == "report"
        # A call waiting for an approval is not forwarded yet: if this gateway dies before the
        # approval, its hold is released, not counted. In report mode a loop still holds.
        forwarded = call.approval_rule is None or report
        pre = call.precheck
        key = call.key if store.keys_cached and pre is None else None  # revoke: see Store.keys_cached
        if nanos == 0 and loop is None and pre is not None and pre.caps == caps:
            adm = Admission(left_nanos=pre.left_nanos)  # read in authorize's round trip
        elif at_once:
            maybe = store.admit_now(nanos, caps, hold, forwarded, loop=loop, hold_if_looped=report, key=key)
            if maybe is None:
                raise _WouldWait
            adm = maybe
        elif ask:
            adm = yield AdmitAsk(nanos, caps, hold, forwarded, loop, report, key)
        else:
            adm = store.admit(nanos, caps, hold, forwarded, loop=loop, hold_if_looped=report, key=key)
        if adm.key_state not in (None, "active"):
            call.key_refused = adm.key_state
            return
        if adm.reservation is not None:
            call.reservation = adm.reservation
        if adm.looped:
            assert loop is not None
            yield Deny("loop_detected",
                       f"the same request was sent {loop.repeats} times within "
                       f"{loop.window}s; send an Idempotency-Key to retry safely",
                       f"loop: {loop.repeats} in {loop.window}s")
            if not report:
                return
        call.scopes = list(caps)
        call.budget_left_nanos = adm.left_nanos
        if call.budget_left_nanos is not None and call.budget_left_nanos > UNCAPPED // 2:
            call.budget_left_nanos = None  # only uncapped label totals apply: no budget to show
        if adm.refused is not None:
            e = adm.refused
            # In report-only mode the call goes on without a hold; its cost is still counted
            # when it is settled.
            yield Deny("cap_exhausted",
                       f"estimated {fmt_usd(from_nanos(nanos))} does not fit in {e.scope}: "
                       f"{fmt_usd(from_nanos(max(0, e.cap_nanos - e.used_nanos)))} left of "
                       f"{fmt_usd(from_nanos(e.cap_nanos))}",
                       e.scope)
            return
        yield None
