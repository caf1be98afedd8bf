"""What a vendor module provides, and the plain values it works with.

A vendor module is pure: it takes plain strings, dicts and bytes and returns
plain values. No mitmproxy, no store, no I/O. Each module defines ``VENDOR``,
an instance of :class:`Vendor`; the registry in ``__init__`` finds it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from email.parser import BytesParser
from email.policy import HTTP
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import parse_qs

import yaml

from ..hosts import normalize, wildcard_matches
from ..money import Unpriceable

CostStatus = Literal["parsed", "estimated", "zero", "unknown"]

PRICES_DIR = Path(__file__).resolve().parent.parent / "prices"


@dataclass(frozen=True)
class RequestView:
    """The parts of an HTTP request a vendor module may look at."""

    method: str
    path: str  # without the query string
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    host: str = ""  # the vendor host the call goes to (one module may serve several)

    @cached_property
    def json(self) -> Any:
        """The body parsed as JSON, or ``None`` if it is not JSON."""
        try:
            return json.loads(self.body) if self.body else None
        except (ValueError, UnicodeDecodeError):
            return None

    @cached_property
    def multipart(self) -> dict[str, list[tuple[bytes, str | None]]]:
        """A ``multipart/form-data`` body: field name → [(payload, filename or None)]."""
        ctype = self.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return {}
        msg = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + ctype.encode("latin-1", "replace") + b"\r\n\r\n" + self.body)
        out: dict[str, list[tuple[bytes, str | None]]] = {}
        if not msg.is_multipart():
            return out
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if isinstance(name, str):
                payload = part.get_payload(decode=True)
                out.setdefault(name, []).append(
                    (payload if isinstance(payload, bytes) else b"", part.get_filename()))
        return out

    def param(self, name: str) -> str | None:
        """The last value of a form field, from a JSON object, a multipart or a url-encoded body."""
        data = self.json
        if isinstance(data, dict):
            value = data.get(name)
            return value if isinstance(value, str) else None if value is None else str(value)
        parts = self.multipart.get(name)
        if parts:
            return parts[-1][0].decode("utf-8", "replace").strip()
        values = self.form.get(name)
        return values[-1] if values else None

    @cached_property
    def form(self) -> dict[str, list[str]]:
        """The body parsed as ``application/x-www-form-urlencoded``."""
        try:
            return parse_qs(self.body.decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            return {}


@dataclass(frozen=True)
class ResponseView:
    """The parts of a vendor's (non-streamed) response a cost parser may look at.

    ``json`` is decoded once, on first use; ``None`` when the body is not JSON.
    """

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""

    @cached_property
    def json(self) -> Any:
        try:
            return json.loads(self.body) if self.body else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def error_label(self) -> str:
        """A short label for an error body, from whichever shape the vendor uses:
        ``{"error": {"decline_code"|"code"|"type"}}`` (Stripe, OpenAI, Anthropic),
        ``{"code"}`` (Twilio), ``{"ErrorCode"}`` (Postmark), ``{"name"}`` (Resend)."""
        obj = self.json
        if not isinstance(obj, dict):
            return "error"
        err = obj.get("error")
        if isinstance(err, Mapping):
            return str(err.get("decline_code") or err.get("code") or err.get("type") or "error")[:80]
        if "ErrorCode" in obj:
            return f"ErrorCode {obj.get('ErrorCode')}"[:80]
        for key in ("code", "name"):
            if obj.get(key) is not None and not isinstance(obj.get(key), (dict, list)):
                return str(obj[key])[:80]
        return "error"


@dataclass(frozen=True)
class Prices:
    """Rates in force: shipped tables, overridden by the policy's ``prices:``, plus ``fx:``."""

    fx: Mapping[str, Decimal] = field(default_factory=dict)
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def table(self, vendor: Vendor) -> dict[str, Any]:
        """The vendor's price table with the policy's overrides merged in."""
        return deep_merge(vendor.prices, self.overrides.get(vendor.name, {}))


@dataclass(frozen=True)
class Estimate:
    """What a request may cost, computed before it is forwarded.

    ``usd is None`` with ``moves_money`` means "this moves money but the
    request does not say how much" (e.g. confirming an existing
    PaymentIntent): the policy's ``default_estimate_usd`` is used instead.
    """

    usd: Decimal | None
    moves_money: bool = False
    currency: str | None = None
    amount: Decimal | None = None  # in the vendor's units (e.g. 15.00 EUR, 1500 JPY)
    basis: str = ""  # a short human explanation, shown in flow comments
    # The vendor adds input the request does not show (a stored conversation, a stored prompt):
    # the budget holds at least the policy's default_estimate_usd (else max_request_usd).
    open_context: bool = False


NO_COST = Estimate(usd=Decimal(0))

READS = frozenset({"GET", "HEAD", "OPTIONS"})


def endpoint_patterns(*lines: str) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """``"POST /v1/files/**"``-style lines (the policy's syntax: ``*`` one path segment,
    ``**`` any rest, ``*`` as method any method) compiled to (method, regex) pairs."""
    out = []
    for line in lines:
        method, _, path = line.partition(" ")
        parts = []
        for segment in path.strip().split("/"):
            if segment == "**":
                parts.append(".*")
            elif segment == "*":
                parts.append("[^/]+")
            else:  # "Keys*" matches "Keys" and "Keys.json"
                parts.append("[^/]*".join(re.escape(piece) for piece in segment.split("*")))
        regex = "/".join(parts).replace("/.*", "(?:/.*)?")  # "/x/**" matches "/x" too
        out.append((method.upper(), re.compile(regex + "/?", re.IGNORECASE)))
    return tuple(out)


@dataclass(frozen=True)
class Cost:
    """The cost parsed from a vendor's response."""

    status: CostStatus
    usd: Decimal | None  # None only when status == "unknown"
    currency: str | None = None
    amount: Decimal | None = None
    note: str = ""
    # The vendor's id of what the call created (a Twilio SM…/CA…, a Stripe pi_…, a batch), set when
    # the cost is not final yet: ``spendgate reconcile`` asks the vendor about it later.
    object_id: str | None = None


class StreamMeter(Protocol):
    """Prices a streamed (SSE) response chunk by chunk, without buffering it."""

    def feed(self, chunk: bytes) -> None: ...

    def finish(self) -> Cost: ...


@dataclass(frozen=True)
class LedgerCall:
    """A ledger row whose cost was not final (``estimated`` or ``unknown``), as a vendor's
    reconcile function sees it: plain values, no credential."""

    id: int
    vendor: str
    method: str
    host: str
    path: str  # the request path as sent to the vendor (no query)
    object_id: str  # what the call created (Cost.object_id at the time)
    cost_status: str  # "estimated" | "unknown"
    counted_usd: Decimal  # what the budgets counted: the cost, else the estimate
    model: str | None = None
    note: str = ""


@dataclass(frozen=True)
class Fetch:
    """A read a reconcile function wants made, with the vendor's real credential: ``GET path``
    (with its query) on the call's host, or on ``host`` when that is another host the vendor
    serves (a result file); never elsewhere. Its answer (a :class:`ResponseView`, at most
    ``max_bytes`` of body) is handed back on the next call."""

    path: str
    host: str | None = None
    max_bytes: int = 1 << 20
    headers: Mapping[str, str] = field(default_factory=dict)  # besides the credential (an API version)


@dataclass(frozen=True)
class Pending:
    """Not final yet (or not knowable): the row stays as it is; ``why`` says so in the report."""

    why: str


# reconcile(call, answers so far, prices): the next Fetch, the final Cost (parsed or zero), or
# Pending. Pure: the driver (addons/reconcile.py) does the HTTP, with the vendor's credential.
Reconciler = Callable[[LedgerCall, list[ResponseView], Prices], Fetch | Cost | Pending]


# No single call moves a billion dollars: a bigger number is a parsing accident.
MAX_PLAUSIBLE_USD = Decimal(10) ** 9

# cost(request, response, prices, estimate): called only for 2xx responses (see Vendor.cost).
CostParser = Callable[[RequestView, ResponseView, Prices, Estimate], Cost]
Estimator = Callable[[RequestView, Prices], Estimate]


def plausible(c: Cost) -> Cost:
    """``c`` if its USD is a plausible amount, else unknown: a cost is never negative."""
    if c.usd is not None and (not c.usd.is_finite() or c.usd < 0 or c.usd > MAX_PLAUSIBLE_USD):
        return Cost("unknown", None, note=f"implausible cost {c.usd}: {c.note}"[:300])
    return c


def _no_stream(req: RequestView, prices: Prices, estimate: Estimate) -> StreamMeter | None:
    return None


def _same_path(path: str, creds: Mapping[str, str]) -> str:
    return path


def _zero_estimate(req: RequestView, prices: Prices) -> Estimate:
    return NO_COST


def _unknown_cost(req: RequestView, resp: ResponseView, prices: Prices, estimate: Estimate) -> Cost:
    return Cost("unknown", None, note="no cost parser for this vendor")


@dataclass(frozen=True)
class Vendor:
    """One paid API: where it lives, where its SDK puts the key, and what its calls cost.

    A module gives its plain functions (``estimator``, ``parser``); the pipeline calls the
    methods :meth:`estimate` and :meth:`cost`, which add what every vendor shares: they
    never raise (except ``Unpriceable`` from an estimate), a non-2xx response is handled
    before the parser sees it, and a cost is never negative or absurd.
    """

    name: str
    hosts: tuple[str, ...]  # exact host names, or "*.example.com" for any subdomain
    key_headers: tuple[str, ...]  # lower-case headers where the vendor's SDK puts its key
    real_key: re.Pattern[str]  # what a real credential of this vendor looks like
    credential_headers: Callable[[Mapping[str, str]], dict[str, str]]
    credential_fields: tuple[str, ...] = ("secret",)  # fields required under vendors.<name>
    rewrite_path: Callable[[str, Mapping[str, str]], str] = _same_path
    estimator: Estimator = _zero_estimate
    parser: CostParser = _unknown_cost
    stream_meter: Callable[[RequestView, Prices, Estimate], StreamMeter | None] = _no_stream
    prices: Mapping[str, Any] = field(default_factory=dict)
    # Non-read endpoints that move no money, listed explicitly ("POST /v1/moderations").
    # A non-read the estimator does not price and this list does not name is "moves money,
    # amount unknown": the policy's default estimate is held, and its cost is unknown
    # (settled at that estimate), never $0.
    free: tuple[str, ...] = ()
    # A 5xx may still have acted (Stripe: "may or may not have succeeded"): the note for an
    # "unknown" cost; empty means a 5xx billed nothing.
    server_error_unknown: str = ""
    llm: Any = None  # an LLMShape (vendors/_models.py): where requests name a model and output limit
    # Query parameters that carry a key, and the key header each stands for (Gemini: ?key= is
    # x-goog-api-key). stages/querykey.py reads them as that header and, if the agent used the
    # query (or ``query_only``), puts the real key back in the URL on the wire only.
    key_query: Mapping[str, str] = field(default_factory=dict)
    query_only: bool = False
    # A GET only shows what earlier calls billed (the meter counts it $0, and it is free without
    # being listed). Declared vendors say False: a search API bills the GET itself.
    reads_free: bool = True
    # Costs that arrive later: asks the vendor for the final figure of a call recorded
    # ``estimated``/``unknown`` (see :class:`LedgerCall`, :meth:`reconcile`). None: this vendor's
    # costs are final when the call is made (or cannot be asked for later).
    reconciler: Reconciler | None = None

    @cached_property
    def _free(self) -> tuple[tuple[str, re.Pattern[str]], ...]:
        return endpoint_patterns(*self.free)

    def is_free(self, req: RequestView) -> bool:
        """A read, or a non-read listed in ``free``."""
        method = req.method.upper()
        if method in READS and self.reads_free:
            return True
        return any(m in ("*", method) and p.fullmatch(req.path) for m, p in self._free)

    def estimate(self, req: RequestView, prices: Prices) -> Estimate:
        """What ``req`` may cost. Raises only ``Unpriceable`` (the pipeline refuses with 402);
        junk in the request, or an endpoint neither priced nor listed as free, gives
        "moves money, amount unknown", so the policy's default estimate applies."""
        try:
            est = self.estimator(req, prices)
        except Unpriceable:
            raise
        except Exception as e:
            return Estimate(usd=None, moves_money=True, basis=f"request not readable ({type(e).__name__})")
        if est.moves_money or est.usd or self.is_free(req):
            return est
        return Estimate(usd=None, moves_money=True, basis=self._unpriced_basis(req))

    def unpriced(self, req: RequestView, prices: Prices) -> bool:
        """A non-read this module neither prices nor lists as free."""
        if self.is_free(req):
            return False
        try:
            est = self.estimator(req, prices)
        except Exception:
            return True
        return not (est.moves_money or est.usd)

    def _unpriced_basis(self, req: RequestView) -> str:
        return (f"{req.method.upper()} {req.path[:120]}: an endpoint {self.name} pricing does not know "
                "and does not list as free; moves money, amount unknown")

    def cost(self, req: RequestView, resp: ResponseView, prices: Prices, estimate: Estimate) -> Cost:
        """The cost of a non-streamed response: never raises, never negative or absurd."""
        if not resp.ok:
            if resp.status >= 500 and self.server_error_unknown:
                return Cost("unknown", None, note=f"HTTP {resp.status}: {self.server_error_unknown}")
            label = resp.error_label() if resp.status >= 400 else "nothing billed"
            return Cost("zero", Decimal(0), note=f"HTTP {resp.status}: {label}")
        try:
            cost = plausible(self.parser(req, resp, prices, estimate))
        except Exception as e:  # a parser must never break the response
            return Cost("unknown", None, note=f"cost parser error: {type(e).__name__}")
        if cost.status == "zero" and self.unpriced(req, prices):
            # Never $0 for an endpoint nobody priced: the hold (the policy's default) stands.
            return Cost("unknown", None, note=f"{self._unpriced_basis(req)}; counted at the estimate")
        return cost

    def reconcile(self, call: LedgerCall, answers: list[ResponseView], prices: Prices) -> Fetch | Cost | Pending:
        """The next step of settling ``call`` later. Never raises; a non-2xx answer, a cost that is
        not final (estimated, unknown) or not plausible (negative, absurd) leaves the row as it is."""
        if self.reconciler is None:
            return Pending(f"{self.name} costs are not reconciled")
        if answers and not answers[-1].ok:
            last = answers[-1]
            return Pending(f"HTTP {last.status}: {last.error_label() if last.status >= 400 else 'no answer'}")
        try:
            out = self.reconciler(call, answers, prices)
        except Exception as e:  # a reconcile function must never break the run
            return Pending(f"reconcile error: {type(e).__name__}")
        if isinstance(out, Cost):
            out = plausible(out)
            if out.status not in ("parsed", "zero") or out.usd is None:
                return Pending(out.note or f"still {out.status}")
        if not isinstance(out, Fetch | Cost | Pending):
            return Pending(f"reconcile returned {type(out).__name__}")
        return out

    def serves(self, host: str) -> bool:
        host = normalize(host)
        return any(wildcard_matches(host, pattern) for pattern in self.hosts)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def load_prices(name: str) -> dict[str, Any]:
    """Load ``prices/<name>.yaml``, a shipped price table (with its source and date)."""
    path = PRICES_DIR / f"{name}.yaml"
    if not path.exists():
        return {}
    with path.open() as f:
        return yaml.safe_load(f) or {}


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
