"""Replay captured traffic against a policy: which calls it would refuse, and what they would cost.

Every captured request runs through the real pipeline in process (``spendgate.pipeline``: the
addons of ``gateway.py``, mitmproxy's hook dispatch), in captured order, against a throwaway
ledger (``:memory:``), with the gateway's clock set to the time each request was captured, so
rate limits, the loop breaker, daily caps and key lifetimes act as they would have. Nothing is
sent anywhere: the captured response stands in for the vendor and is priced by today's vendor
modules.

Keys. A flow captured by spendgate names its vault key (id, policy, labels; never the token):
each captured key becomes one synthetic key of the same policy with the same labels (and, for a
static key of the policy file, its ``cap_usd``), so per-key budgets are simulated. A flow from
elsewhere (``mitmdump -w``, a browser's HAR) has no vault key: each distinct credential it
carries becomes one synthetic key of ``--policy`` (default: the file's only policy).

"Then" is what the capture says happened (spendgate's decision, reason and cost, saved with
each flow). For a capture from elsewhere, "then" is the traffic as it went: allowed, priced
by the same vendor modules (through a policy that allows everything). ``--diff OLD NEW`` runs
both policies instead. Refusals about identity (no key, unknown/expired/revoked key, a real
key, a spoofed host, plain http, a vault key in the body, egress) are not policy decisions
and are kept as captured.

What cannot be replayed is reported, counted and skipped, never a crash: TCP/UDP/DNS flows,
websockets, tunnels, non-vendor hosts, unreadable entries, corrupt files (named with the
offset). A request with no captured response (the vendor never answered, or spendgate
refused it then) that the policy now allows is counted at its estimate, flagged. A streamed
(SSE) response is re-metered from its body when the gateway kept it (``store_streamed_bodies``,
which ``--capture`` turns on); without it, it is counted at the estimate, flagged.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from mitmproxy import http

from . import clock
from .captures import Entry, Problem, Reader, ReadHeaders
from .gateway import members
from .pipeline import Outcome, Pipeline
from .policy import Config
from .policy import load_config as _load_config
from .runtime import Runtime
from .stages.record import Record
from .vendors import BUILT_IN, REGISTRY, vendor_for_host

# Refusals that are not policy decisions: kept as captured, never replayed.
IDENTITY = frozenset({"missing_vault_key", "unknown_key", "ambiguous_vault_key", "expired", "revoked",
                      "raw_credential", "host_mismatch", "insecure_scheme", "vault_key_leak", "egress_denied"})


def key_headers() -> frozenset[str]:
    """Every header where an agent may put a key: the built-in vendors' and the declared ones'."""
    vendors = tuple(REGISTRY.values())
    if _key_headers[0] != vendors:
        _key_headers[:] = [vendors, frozenset({"x-vault-key", "authorization"}).union(*(v.key_headers for v in vendors))]
    return _key_headers[1]


_key_headers: list[Any] = [(), frozenset()]  # (for the registry's vendors, their key headers)
NOT_FORWARDED = "not forwarded when captured"
NO_RESPONSE = "no response was captured"
BASELINE_POLICY = "captured"
BATCH = 64  # entries replayed per pass of the event loop


@dataclass(frozen=True)
class Decision:
    decision: str  # allow | deny | would_deny | (skipped: "-")
    reason: str | None = None
    cost: Decimal = Decimal(0)  # USD counted against budgets: the cost, else the estimate
    cost_status: str | None = None
    status: int | None = None
    note: str = ""

    @property
    def refused(self) -> bool:
        return self.decision == "deny"

    def public(self) -> dict[str, Any]:
        return {"decision": self.decision, "reason": self.reason, "cost_usd": str(self.cost),
                "cost_status": self.cost_status, "status": self.status, "note": self.note}


@dataclass
class Row:
    n: int
    source: str
    time: float
    key: str
    method: str
    host: str
    path: str
    then: Decision
    now: Decision

    @property
    def changed(self) -> bool:
        return (self.then.decision, self.then.reason) != (self.now.decision, self.now.reason)

    @property
    def newly_refused(self) -> bool:
        return self.now.refused and not self.then.refused

    @property
    def newly_allowed(self) -> bool:
        return self.then.refused and not self.now.refused

    def public(self) -> dict[str, Any]:
        return {"n": self.n, "time": clock_iso(self.time), "key": self.key, "method": self.method,
                "host": self.host, "path": self.path, "source": self.source, "changed": self.changed,
                "then": self.then.public(), "now": self.now.public()}


def money(usd: Decimal) -> str:
    """$1,034.12; amounts under a cent keep their digits ($0.0000085)."""
    if usd == 0 or abs(usd) >= Decimal("0.01"):
        return f"${usd:,.2f}"
    return f"${usd.normalize():f}"


def clock_iso(t: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


@dataclass
class Summary:
    replayed: int = 0
    changed: int = 0
    newly_refused: int = 0
    newly_refused_usd: Decimal = Decimal(0)
    newly_allowed: int = 0
    newly_allowed_usd: Decimal = Decimal(0)
    spend_then: Decimal = Decimal(0)
    spend_now: Decimal = Decimal(0)
    flagged: int = 0  # calls counted at an estimate (no response, unknown cost)
    skipped: Counter[str] = field(default_factory=Counter)
    problems: list[Problem] = field(default_factory=list)

    def add(self, row: Row) -> None:
        self.replayed += 1
        self.changed += row.changed
        if row.newly_refused:
            self.newly_refused += 1
            self.newly_refused_usd += row.then.cost
        if row.newly_allowed:
            self.newly_allowed += 1
            self.newly_allowed_usd += row.now.cost
        self.spend_then += row.then.cost
        self.spend_now += row.now.cost
        self.flagged += row.now.cost_status in ("unknown", "estimated")

    def line(self) -> str:
        calls = "call" if self.newly_refused == 1 else "calls"
        return (f"would newly refuse {self.newly_refused} {calls} worth {money(self.newly_refused_usd)}; "
                f"would newly allow {self.newly_allowed}; "
                f"spend {money(self.spend_then)} → {money(self.spend_now)}")

    def public(self) -> dict[str, Any]:
        return {"replayed": self.replayed, "changed": self.changed,
                "newly_refused": self.newly_refused, "newly_refused_usd": str(self.newly_refused_usd),
                "newly_allowed": self.newly_allowed, "newly_allowed_usd": str(self.newly_allowed_usd),
                "spend_then_usd": str(self.spend_then), "spend_now_usd": str(self.spend_now),
                "flagged": self.flagged, "skipped": dict(self.skipped),
                "problems": [str(p) for p in self.problems], "summary": self.line()}


# --------------------------------------------------------------------------- policies


_configs: dict[tuple[str, float], Config] = {}


def load_config(path: str | os.PathLike[str]) -> Config:
    """The policy file, validated (file:line errors); parsed once per file version."""
    try:
        key = (str(Path(path).resolve()), Path(path).stat().st_mtime)
    except OSError:
        return _load_config(path)  # (its ConfigError names the file)
    if key not in _configs:
        if len(_configs) > 8:
            _configs.clear()
        _configs[key] = _load_config(path)
    return _configs[key]


# libyaml's safe loader and dumper where PyYAML was built with it (the same values, ~10× faster)
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def replay_config(source: str | os.PathLike[str], directory: Path, *, baseline: bool = False) -> Path:
    """A copy of the policy file for replay: credentials replaced by stand-ins (replay needs no real
    key and sends nothing), upstreams dropped. ``baseline``: one policy that allows everything,
    with no cap, rate or loop limit, in report mode (what a capture from elsewhere went through:
    nothing refused, every call priced)."""
    config = load_config(source)  # the user's file, validated with its own file:line errors (cached)
    data = yaml.load(Path(source).read_text(), Loader=_YAML_LOADER) or {}  # (already validated above)
    vendors = data.setdefault("vendors", {})
    if baseline:  # every vendor: traffic from elsewhere is priced whoever it went to
        for name in BUILT_IN:
            vendors.setdefault(name, {})
    for name, vc in vendors.items():
        vendor = config.vendor(name) or BUILT_IN.get(name)  # a built-in, or one the file declares
        for fld in vendor.credential_fields if vendor else ("secret",):
            vc[fld] = f"env:SPENDGATE_REPLAY_{name.upper()}_{fld.upper()}"
            os.environ.setdefault(f"SPENDGATE_REPLAY_{name.upper()}_{fld.upper()}",
                                  "AC" + "0" * 32 if fld == "account_sid" else "replay-stand-in")
        vc.pop("upstream", None)
    if baseline:
        data["policies"] = {BASELINE_POLICY: {
            "vendors": {name: {"allow": ["* /**"]} for name in vendors},
            "loop": {"repeats": 1_000_000_000, "window": "1s"}, "mode": "report"}}
        data["keys"] = []
        data.pop("mode", None)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / ("baseline.yaml" if baseline else f"policy-{hashlib.sha256(str(source).encode()).hexdigest()[:8]}.yaml")
    out.write_text(yaml.dump(data, Dumper=_YAML_DUMPER, sort_keys=False))
    return out


def replay_addons() -> list[object]:
    """The gateway's addons (``gateway.make_addons``) without those that only show or export what
    happened and decide nothing: the metrics, the admin API, mitmweb's view of the vendor host,
    the capture. (``tests/test_replay_fast.py`` checks that replay decides as the whole list does.)"""
    from .admin import Admin
    from .capture import Capture
    from .console import Console
    from .gateway import Chain, make_addons
    from .metrics import Metrics

    runtime, *rest = make_addons()
    assert isinstance(runtime, Runtime)
    shown = (Metrics, Admin, Console, Capture)
    runtime.on_record = [f for f in runtime.on_record if not isinstance(getattr(f, "__self__", None), shown)]
    return [runtime, *(Chain(*(m for m in a.members if not isinstance(m, shown))) if isinstance(a, Chain) else a
                       for a in rest)]


class Side:
    """One policy's pipeline, its synthetic keys, and how it decides a captured entry."""

    def __init__(self, policy_file: str | os.PathLike[str], directory: Path, *, default_policy: str | None,
                 baseline: bool = False, fast: bool = True, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config: Config = load_config(policy_file)  # (cached: validated once per file)
        self.pipeline = Pipeline(replay_config(policy_file, directory, baseline=baseline), ":memory:",
                                 addons=replay_addons() if fast else None, termlog_verbosity="error",
                                 store_streamed_bodies=True, fast=fast, loop=loop)
        if fast:  # nothing shows a replayed flow's comment
            for member in members(self.pipeline.addons):
                if isinstance(member, Record):
                    member.comments = False
        store = self.pipeline.runtime.store
        store.keep_calls = False  # type: ignore[union-attr]  (rows are read from the outcome)
        self.baseline = baseline
        self.default_policy = BASELINE_POLICY if baseline else default_policy
        self.tokens: dict[str, str] = {}

    def token(self, ident: str, policy: str | None, labels: dict[str, str]) -> str | None:
        if self.baseline:
            policy = BASELINE_POLICY
        if ident not in self.tokens:
            if policy is None:
                return None
            static = next((k for k in self.config.keys if k.id == ident), None)
            store = self.pipeline.runtime.store
            assert store is not None
            self.tokens[ident] = store.issue_key(policy, None, cap_usd=static.cap_usd if static else None,
                                                 labels=labels)[1]
        return self.tokens[ident]

    async def adecide(self, entry: Entry, who: Who) -> Decision:
        captured = entry.flow
        assert captured is not None
        policy = who.policy if who.policy is not None else self.default_policy
        token = self.token(who.ident, policy, who.labels)
        if token is None:
            return Decision("-", None, note="no policy for this key: pass --policy NAME")
        flow = prepare(captured, who.host, token)
        meta = captured_meta(captured)
        denied_then = (meta or {}).get("reason") in ("approval_denied", "approval_timeout")
        self.pipeline.on_hold = _deny if denied_then else _approve  # answered as it was then
        refused_then = captured_refused(captured, meta)
        vendor_resp = None if refused_then else captured.response  # the vendor's answer, if captured
        if vendor_resp is not None:
            out = await self.pipeline.arun(flow, vendor_resp, chunk=65536, connect=False)
            note = streamed_note(vendor_resp)
        else:
            # Nothing to price: counted at the estimate if it would go out now (flagged).
            why = NOT_FORWARDED if refused_then else NO_RESPONSE
            out = await self.pipeline.arun(flow, error=why, sent=True, connect=False)
            note = why
        decided = decision_of(out, note if out.forwarded is not None else "")
        if self.baseline and decided.decision == "would_deny":  # it went through: that is what happened
            decided = Decision("allow", None, decided.cost, decided.cost_status, decided.status, decided.note)
        if vendor_resp is None and decided.reason in ("upstream_unreachable", "upstream_timeout"):
            decided = Decision(decided.decision, None, decided.cost, decided.cost_status, None, note)
        if out.call is not None and out.call.approval_id is not None and decided.decision == "allow":
            return Decision("allow", "approval_required", decided.cost, decided.cost_status, decided.status,
                            "held for approval; replayed as approved")
        return decided

    def close(self) -> None:
        self.pipeline.close()


@dataclass(frozen=True)
class Who:
    ident: str  # the captured key id, or a hash of the credential the request carried
    policy: str | None
    labels: dict[str, str]
    host: str
    key: str  # how the row shows it


def who_of(flow: http.HTTPFlow, meta: dict[str, Any] | None) -> Who:
    if meta and meta.get("key_id"):
        return Who(meta["key_id"], meta.get("policy"), dict(meta.get("labels") or {}),
                   meta.get("host") or flow.request.host, meta["key_id"])
    host = (meta or {}).get("host") or flow.request.pretty_host
    creds = sorted(v for k, v in flow.request.headers.items(multi=True) if k.lower() in key_headers())
    digest = hashlib.sha256("\n".join(creds).encode(errors="surrogateescape")).hexdigest()[:12]
    return Who(f"cred:{digest}", None, {"replayed_from": f"cred:{digest}"} if creds else {}, host,
               f"cred:{digest}" if creds else "(no key)")


def captured_meta(flow: http.HTTPFlow) -> dict[str, Any] | None:
    meta = flow.metadata.get("spendgate")
    return meta if isinstance(meta, dict) and "decision" in meta else None


def _approve(_flow: http.HTTPFlow, _call: object) -> bool:
    return True


def _deny(_flow: http.HTTPFlow, _call: object) -> bool:
    return False


_NO_META: Any = object()


def captured_refused(flow: http.HTTPFlow, meta: dict[str, Any] | None = _NO_META) -> bool:
    """Did spendgate refuse it then? (``meta``: its :func:`captured_meta`, if already read.)"""
    if meta is _NO_META:
        meta = captured_meta(flow)
    if meta is not None:
        return meta.get("decision") == "deny"
    return flow.response is not None and "X-Spendgate-Reason" in flow.response.headers


def vendor_response(flow: http.HTTPFlow) -> http.Response | None:
    """The vendor's answer, if the capture has one (not spendgate's refusal)."""
    resp = flow.response
    if resp is None or captured_refused(flow):
        return None
    return resp


def streamed_note(resp: http.Response) -> str:
    if not resp.raw_content and "text/event-stream" in resp.headers.get("content-type", ""):
        return "streamed body not captured (store_streamed_bodies was off): counted at the estimate"
    return ""


def prepare(captured: http.HTTPFlow, host: str, token: str) -> http.HTTPFlow:
    """A live flow of the captured request inside a tunnel to ``host``, carrying ``token``: the
    request as copying it and setting ``scheme``, ``port``, ``host`` (which updates the Host header
    and the authority), ``X-Vault-Key`` and, for HTTP/1 without one, ``Host`` through mitmproxy's
    setters gives it (``tests/test_replay.py`` compares the two), built in one pass over the
    headers instead of a scan per setter."""
    src = captured.request
    data = _shallow(src.data)
    slots = key_headers()
    host_value = host.encode("utf-8", "surrogateescape")  # (as Headers encodes a str value)
    fields: list[tuple[bytes, bytes]] = []
    has_host = False
    for k, v in src.data.headers.fields:
        if k.decode("latin-1").lower() in slots or v.startswith(b"spendgate:"):
            continue
        if k.lower() == b"host":  # the first Host header gets the tunnel's host; repeats are dropped
            if has_host:
                continue
            has_host, v = True, host_value
        fields.append((k, v))
    fields.append((b"X-Vault-Key", token.encode("utf-8", "surrogateescape")))
    h2 = data.http_version in (b"HTTP/2.0", b"HTTP/3")
    if not h2 and not has_host:
        fields.insert(0, (b"Host", host_value))
    headers = object.__new__(ReadHeaders)
    headers.fields = tuple(fields)
    data.headers = headers
    data.scheme, data.port, data.host = b"https", 443, host
    if h2 or data.authority:
        try:
            data.authority = host.encode("idna", "strict")
        except UnicodeError:
            data.authority = host.encode("utf8", "surrogateescape")
    req = _shallow(src)
    req.data = data
    client, server, blank = _tunnels.get(host) or _tunnel(host)
    # HTTPFlow(copy of client, copy of server) (as requests on one kept-alive tunnel), with an id
    # from a counter instead of a uuid4 (unique in the process, which is all its users need)
    flow = _shallow(blank)
    flow.id = f"replay-{next(_flow_ids)}"
    flow.timestamp_created = time.time()
    flow.metadata = {}
    flow.client_conn, flow.server_conn = _shallow(client), _shallow(server)
    flow.request = req
    return flow


def _shallow[T](obj: T) -> T:
    """``copy.copy`` of a plain object (no ``__copy__``, no ``__reduce__`` of its own), without
    the copy module's dispatch."""
    out = object.__new__(type(obj))
    out.__dict__.update(obj.__dict__)
    return out


_tunnels: dict[str, tuple[Any, Any, http.HTTPFlow]] = {}
_flow_ids = itertools.count(1)


def _tunnel(host: str) -> tuple[Any, Any, http.HTTPFlow]:
    """The connections of a TLS tunnel to ``host`` (the agent's, SNI the host; the vendor's), and
    a flow of them as ``HTTPFlow(client, server)`` makes it (each replayed flow is a copy)."""
    from mitmproxy.test import tflow

    c = tflow.tclient_conn()
    c.sni = host
    s = tflow.tserver_conn()
    s.address = (host, 443)
    if len(_tunnels) > 1000:
        _tunnels.clear()
    _tunnels[host] = c, s, http.HTTPFlow(c, s)
    return _tunnels[host]


def decision_of(out: Outcome, note: str = "") -> Decision:
    row = out.row
    if row is None:
        return Decision("-", None, note="not recorded (not a vendor call)")
    cost = Decimal(0)
    if row["decision"] != "deny":
        if row.get("cost_usd") is not None:
            cost = Decimal(row["cost_usd"])
        elif row.get("cost_status") == "unknown":
            cost = Decimal(row.get("estimated_usd") or 0)  # what the gateway counts against budgets
    return Decision(row["decision"], row["reason"], cost, row.get("cost_status"), row.get("status"),
                    note or (row.get("note") or "" if row.get("cost_status") in ("unknown", "estimated") else ""))


def then_of(flow: http.HTTPFlow, meta: dict[str, Any]) -> Decision:
    cost = Decimal(0)
    if meta.get("decision") != "deny":
        if meta.get("cost_usd") is not None:
            cost = Decimal(meta["cost_usd"])
        elif meta.get("cost_status") == "unknown":
            cost = Decimal(meta.get("estimated_usd") or 0)
    status = flow.response.status_code if flow.response is not None else None
    reason = meta.get("reason")
    if reason is None and "approval: " in (flow.comment or ""):
        reason = "approval_required"  # held, and approved
    return Decision(meta.get("decision") or "allow", reason, cost, meta.get("cost_status"), status)


# --------------------------------------------------------------------------- the replay


class Replay:
    """``Replay(candidate).run(paths)`` yields one :class:`Row` per replayed request; ``summary``
    counts them (and what was skipped). ``old``: compare with that policy instead of the capture."""

    def __init__(self, candidate: str | os.PathLike[str], *, old: str | os.PathLike[str] | None = None,
                 policy: str | None = None, workdir: str | os.PathLike[str] | None = None,
                 fast: bool = True) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="spendgate-replay-") if workdir is None else None
        self.dir = Path(workdir) if workdir is not None else Path(self._tmp.name)  # type: ignore[union-attr]
        cfg = load_config(candidate)
        if policy is not None and policy not in cfg.policies:
            raise ValueError(f"--policy {policy!r} is not in {candidate} (it has: {', '.join(cfg.policies)})")
        self.default_policy = policy or (next(iter(cfg.policies)) if len(cfg.policies) == 1 else None)
        self.candidate = candidate
        self.old = old
        self.fast = fast  # False: every hook through mitmproxy's AddonManager (the reference path)
        self.loop = asyncio.new_event_loop()  # every side's pipeline runs on it
        try:
            self.now = Side(candidate, self.dir / "now", default_policy=self.default_policy, fast=fast,
                            loop=self.loop)
            self.then: Side | None = (Side(old, self.dir / "then", default_policy=self.default_policy, fast=fast,
                                           loop=self.loop)
                                      if old is not None else None)
        except BaseException:  # (e.g. an invalid --diff OLD): nothing left running
            if hasattr(self, "now"):
                self.now.close()
            self.loop.close()
            if self._tmp is not None:
                self._tmp.cleanup()
            raise
        self._baseline: Side | None = None
        self.summary = Summary()
        self.reader: Reader | None = None
        self._vendor_hosts: dict[str, bool] = {}

    def baseline(self) -> Side:
        if self._baseline is None:
            self._baseline = Side(self.candidate, self.dir / "baseline", default_policy=None, baseline=True,
                                  fast=self.fast, loop=self.loop)
        return self._baseline

    def run(self, inputs: Iterable[str | os.PathLike[str]]) -> Iterator[Row]:
        self.reader = Reader.of(inputs)
        self.summary.problems = self.reader.problems
        entries = iter(self.reader)
        try:
            # Entries are read a batch at a time and replayed in one pass of the event loop (a
            # hook that waits for nothing does not go through the loop at all), in order.
            while batch := list(itertools.islice(entries, BATCH)):
                rows = self.loop.run_until_complete(self._replay(batch))
                for row in rows:
                    self.summary.add(row)
                    yield row
        finally:
            clock.set_time(None)

    async def _replay(self, batch: list[Entry]) -> list[Row]:
        rows = []
        for entry in batch:
            row = await self.one(entry, self.summary.replayed + len(rows) + 1)
            if row is not None:
                rows.append(row)
        return rows

    async def one(self, entry: Entry, n: int) -> Row | None:
        if entry.flow is None:
            self.summary.skipped[entry.skip or "unreadable"] += 1
            return None
        flow = entry.flow
        meta = captured_meta(flow)
        who = who_of(flow, meta)
        if who.host not in self._vendor_hosts:
            self._vendor_hosts[who.host] = vendor_for_host(who.host) is not None
        if not self._vendor_hosts[who.host]:
            self.summary.skipped["not a vendor host"] += 1
            return None
        clock.set_time(entry.time)
        path = flow.request.path.split("?", 1)[0]
        if meta is not None and meta.get("reason") in IDENTITY:
            kept = then_of(flow, meta)
            now = Decision(kept.decision, kept.reason, kept.cost, kept.cost_status, kept.status,
                           "identity refusal: kept as captured")
            return Row(n, entry.source, entry.time, who.key, flow.request.method, who.host, path, kept, now)
        now = await self.now.adecide(entry, who)
        if now.decision == "-":
            self.summary.skipped[now.note] += 1
            return None
        if self.then is not None:
            then = await self.then.adecide(entry, who)
        elif meta is not None:
            then = then_of(flow, meta)
        else:
            then = await self.baseline().adecide(entry, who)
        return Row(n, entry.source, entry.time, who.key, flow.request.method, who.host, path, then, now)

    def close(self) -> None:
        try:
            for side in (self.now, self.then, self._baseline):
                if side is not None:
                    side.close()
        finally:
            self.loop.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Replay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
