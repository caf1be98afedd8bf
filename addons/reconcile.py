"""Reconciliation: costs that arrive later are settled later.

Some costs are not final when the call is answered: Twilio sets a message's price after it is
sent, an ACH PaymentIntent stays ``processing`` for days, a batch bills as it runs. The gateway
records those ``estimated`` (a rate table, the amount committed) or ``unknown`` (the policy's
default hold) and names the vendor's object (``calls.object_id``). This module revisits them:

- each vendor module says how (``Vendor.reconciler``, pure: which GET to make, what its answer
  means; ``vendors/base.py``); this module does the I/O: a GET straight to the vendor (or the
  policy's ``upstream:``), never through a proxy in the environment, never following a redirect,
  with the vendor's real credential in memory only, a timeout and a bounded body;
- a final figure (parsed, or zero) replaces the row's cost and corrects every budget scope the
  call counted in, in ONE store transaction that also records what changed
  (``reconciliations``: from → to status, old and new cost, the delta, when, what answered);
- anything else leaves the row as it is, with the reason, row by row: one vendor down or one
  malformed answer never stops the run.

Used by ``spendgate reconcile`` and, when ``--reconcile-every`` is set, by the gateway's own
background task (a worker thread: never on mitmproxy's event loop).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from .money import fmt_usd, from_nanos, plain, to_nanos
from .reports import _since
from .store import Reconciliation, Store, StoreUnavailable
from .vendors import REGISTRY
from .vendors.base import Cost, Fetch, LedgerCall, Pending, Prices, ResponseView, Vendor

log = logging.getLogger("spendgate")

TIMEOUT = 10.0  # seconds for each GET
MAX_STEPS = 3  # GETs per row at most (a batch: the batch, then its results)
DEFAULT_SINCE = "30d"
DEFAULT_LIMIT = 1000

# (url, headers, timeout, max_bytes) → the answer; raises OSError when the vendor cannot be reached.
Getter = Callable[[str, Mapping[str, str], float, int], ResponseView]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as it is (a 3xx), never followed: urllib would carry the
    credential header to wherever it points."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


class TooLarge(Exception):
    pass


def http_get(url: str, headers: Mapping[str, str], timeout: float, max_bytes: int) -> ResponseView:
    """GET ``url`` straight (no proxy from the environment, no redirect), at most ``max_bytes``."""
    req = urllib.request.Request(url, headers={"accept": "application/json", **headers}, method="GET")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            status, got, body = resp.status, resp.headers, resp.read(max_bytes + 1)
    except urllib.error.HTTPError as e:  # 4xx/5xx/3xx: an answer all the same
        status, got, body = e.code, e.headers, e.read(64 << 10)
    if len(body) > max_bytes:
        raise TooLarge(f"answer larger than {max_bytes} bytes")
    return ResponseView(status, {k.lower(): v for k, v in (got or {}).items()}, body)


@dataclass
class Outcome:
    """What became of one row."""

    call_id: int
    vendor: str
    object_id: str
    result: str  # reconciled | would_reconcile | pending | error | changed (another run got there first)
    from_status: str
    old_usd: str
    to_status: str | None = None
    new_usd: str | None = None
    delta_usd: str | None = None
    why: str = ""
    source: str = ""

    def line(self) -> str:
        head = f"call {self.call_id} {self.vendor} {self.object_id}: "
        if self.result in ("reconciled", "would_reconcile"):
            sign = "+" if Decimal(self.delta_usd or 0) >= 0 else "-"
            verb = "reconciled" if self.result == "reconciled" else "would reconcile"
            return (f"{head}{verb} {self.from_status} {fmt_usd(Decimal(self.old_usd))} → {self.to_status} "
                    f"{fmt_usd(Decimal(self.new_usd or 0))} ({sign}{fmt_usd(abs(Decimal(self.delta_usd or 0)))}) "
                    f"· {self.why}")[:400]
        return f"{head}{self.result}: {self.why}"[:400]


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    not_reconcilable: int = 0  # estimated/unknown rows with nothing to ask about (no object id)
    dry_run: bool = False

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.result] = counts.get(o.result, 0) + 1
        delta = sum((Decimal(o.delta_usd) for o in self.outcomes
                     if o.delta_usd is not None and o.result in ("reconciled", "would_reconcile")), Decimal(0))
        return {"examined": len(self.outcomes), **counts, "delta_usd": plain(delta),
                "still_estimated_without_object": self.not_reconcilable, "dry_run": self.dry_run}

    def as_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "calls": [asdict(o) for o in self.outcomes]}


_COLS = ("id, ts, vendor, host, method, path, cost_status, cost_nanos, estimated_nanos, object_id, scopes, "
         "model, note, key_id, policy")


def candidates(store: Store, since: str | None, limit: int) -> tuple[list[tuple[Any, ...]], int]:
    """Rows whose cost is not final and that name a vendor object, oldest first; and how many
    more are not final but name none (nothing to ask a vendor about)."""
    start = _since(since)
    where = "cost_status IN ('estimated', 'unknown') AND decision != 'deny'" + (" AND ts >= ?" if start else "")
    params = (start,) if start else ()
    rows = store.read(f"SELECT {_COLS} FROM calls WHERE {where} AND object_id IS NOT NULL "
                      f"ORDER BY id LIMIT {int(limit)}", params)
    (none,) = store.read(f"SELECT count(*) FROM calls WHERE {where} AND object_id IS NULL", params)[0]
    return rows, int(none or 0)


@dataclass(frozen=True)
class Context:
    """What a run needs from the policy file: credentials (memory only), upstreams, prices."""

    credentials: Mapping[str, Mapping[str, str]]
    upstreams: Mapping[str, str | None]
    prices: Prices
    config: Any = None  # policy.Config: the budget scopes of rows recorded before scopes were


def context_of(config: Any, credentials: Mapping[str, Mapping[str, str]], prices: Prices) -> Context:
    return Context(credentials, {name: vc.upstream for name, vc in config.vendors.items()}, prices, config)


def _scopes(store: Store, ctx: Context, raw: str | None, ts: str, key_id: str | None,
            policy: str | None) -> tuple[str, ...] | None:
    """The budget scopes the call counted in: recorded with the row, else (an older row) those its
    key and policy give at its time; None when neither can tell."""
    if raw is not None:
        try:
            scopes = json.loads(raw)
        except ValueError:
            return None
        return tuple(str(s) for s in scopes) if isinstance(scopes, list) else None
    if ctx.config is None or not key_id or not policy or policy not in ctx.config.policies:
        return None
    from .stages.budget import budget_caps, label_periods

    key = store.get_key(key_id)
    if key is None:
        return None
    at = datetime.fromisoformat(ts).astimezone(ctx.config.timezone)
    return tuple(budget_caps(policy, ctx.config.policies[policy], key, at, label_periods(ctx.config)))


def _base_url(vendor: Vendor, ctx: Context, host: str) -> str:
    upstream = ctx.upstreams.get(vendor.name)
    return upstream.rstrip("/") if upstream else f"https://{host}"


def reconcile_row(row: tuple[Any, ...], store: Store, ctx: Context, get: Getter, timeout: float,
                  dry_run: bool, by: str) -> Outcome:
    (cid, ts, vname, host, method, path, status, cost_nanos, est_nanos, object_id, raw_scopes, model, note,
     key_id, policy) = row
    counted = int(cost_nanos if cost_nanos is not None else est_nanos or 0)
    out = Outcome(int(cid), str(vname), str(object_id), "pending", str(status), plain(from_nanos(counted)))
    vendor = REGISTRY.get(str(vname or ""))
    creds = ctx.credentials.get(str(vname or ""))
    if vendor is None or vendor.reconciler is None:
        out.why = f"{vname} costs are not reconciled"
        return out
    if not creds:
        out.why = f"no credentials for {vname} in the policy file"
        return out
    if not vendor.serves(str(host or "")):
        out.why = f"host {host!r} is not {vendor.name}'s"
        return out
    call = LedgerCall(int(cid), vendor.name, str(method), str(host), str(path), str(object_id), str(status),
                      from_nanos(counted), model, note or "")
    answers: list[ResponseView] = []
    step: Fetch | Cost | Pending = vendor.reconcile(call, answers, ctx.prices)
    while isinstance(step, Fetch):
        if len(answers) >= MAX_STEPS:
            step = Pending(f"more than {MAX_STEPS} reads needed")
            break
        target = step.host or str(host)
        if not vendor.serves(target):
            step = Pending(f"refused to send the {vendor.name} credential to {target!r}")
            break
        out.source = f"GET {step.path[:250]}"
        url = _base_url(vendor, ctx, target) + vendor.rewrite_path(step.path, creds)
        headers = {**step.headers, **vendor.credential_headers(creds)}
        try:
            answers.append(get(url, headers, timeout, step.max_bytes))
        except (OSError, TooLarge, ValueError) as e:  # unreachable, timed out, refused, too big
            out.result, out.why = "error", f"{_base_url(vendor, ctx, target)}: {_reason(e)}"
            return out
        step = vendor.reconcile(call, answers, ctx.prices)
    if isinstance(step, Pending):
        out.why = step.why[:300]
        return out
    assert isinstance(step, Cost) and step.usd is not None
    new = to_nanos(step.usd)
    scopes = _scopes(store, ctx, raw_scopes, str(ts), key_id, policy)
    if scopes is None:
        out.why = "the budget scopes it counted in are unknown (its key or policy is gone)"
        return out
    new_usd = plain(from_nanos(new))
    out.to_status, out.new_usd, out.delta_usd = step.status, new_usd, plain(from_nanos(new - counted))
    out.why = step.note[:300]
    if dry_run:
        out.result = "would_reconcile"
        return out
    fix = Reconciliation(
        call_id=int(cid), vendor=vendor.name, object_id=str(object_id), from_status=str(status),
        to_status=step.status, old_nanos=counted, new_nanos=new, new_usd=new_usd,
        currency=step.currency, amount=plain(step.amount) if step.amount is not None else None,
        note=step.note, scopes=scopes, source=f"{vendor.name} {out.source}", by=by)
    out.result = "reconciled" if store.reconcile_call(fix) else "changed"
    if out.result == "changed":
        out.why = "the row changed meanwhile (another run reconciled it); nothing done"
    return out


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError):
        return f"cannot reach it ({e.reason})"[:200]
    return f"{type(e).__name__}: {e}"[:200]


def run(store: Store, ctx: Context, since: str | None = DEFAULT_SINCE, dry_run: bool = False,
        limit: int = DEFAULT_LIMIT, get: Getter = http_get, timeout: float = TIMEOUT, by: str = "cli") -> Run:
    """Revisit every not-final row with a vendor object since ``since``; one row's failure (the
    vendor down, a malformed answer, a bug) is reported on that row and the run goes on."""
    rows, none = candidates(store, since, limit)
    result = Run(not_reconcilable=none, dry_run=dry_run)
    for row in rows:
        try:
            outcome = reconcile_row(row, store, ctx, get, timeout, dry_run, by)
        except StoreUnavailable:
            raise  # the ledger is gone: nothing else can be settled either
        except Exception as e:
            log.exception("spendgate: reconciling call %s failed", row[0])
            counted = row[7] if row[7] is not None else row[8] or 0
            outcome = Outcome(int(row[0]), str(row[2]), str(row[9]), "error", str(row[6]),
                              plain(from_nanos(int(counted))), why=f"internal error: {type(e).__name__}")
        result.outcomes.append(outcome)
    return result


def drift(store: Store) -> list[tuple[str, int, int]]:
    """(vendor, reconciled calls, sum of deltas in nanos) from the ``reconciliations`` record."""
    rows = store.read("SELECT vendor, count(*), sum(delta_nanos) FROM reconciliations GROUP BY vendor ORDER BY vendor")
    return [(str(v), int(n), int(d or 0)) for v, n, d in rows]
