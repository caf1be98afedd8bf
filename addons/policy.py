"""The policy file: pydantic models of the YAML, path rules, loading with line numbers, and the
policy verdict.

No mitmproxy imports: the CLI (`spendgate check`) and the gateway share this module.
The format is versioned (``version: 1``), as smokescreen's ACLs are.

**Verdicts are values.** :func:`decide` is a pure function of the loaded :class:`Config` and
one request (policy name, vendor, method, path); it returns :class:`Allow`, :class:`Deny`
(code, message, the rule that decided) or :class:`Approve` (the ``approve:`` rule that holds
the request). Checks that need state (the rate limiter, the loop breaker, the budget holds)
live in their stages and return :class:`Deny` values too. No check refuses anything itself:
the stages hand their verdicts to ``call.apply_verdicts``, which is the one place the policy's
``mode`` acts (``enforce``: the first Deny refuses the request and the later checks do not run;
``report``: every check runs and every Deny is recorded as ``would_deny``). What is always
enforced (identity, transport, vault-key leaks, internal errors) never goes through a verdict:
stages call ``call.refuse`` for those.

**Adding a rule kind** (say ``max_body_bytes`` per vendor):

1. add the field to its model below (:class:`VendorRules` or :class:`Policy`), with a validator
   that raises ``ValueError`` on bad input: the loader then reports file, line and field;
2. if it depends only on the request, check it in :func:`decide` (return a :class:`Deny` with
   a SPEC §4 code, a message naming the request and the rule, and ``rule=`` the policy text);
   if it needs state, write a small check in the stage that owns that state, returning
   ``Deny | None``, and yield it from the stage's checks (the mode is applied for you);
3. add rows to the table in ``tests/test_verdicts.py`` (a YAML snippet × a request → the
   verdict), and, for a stateful check, a row to ``tests/test_report_mode.py``;
4. a new code needs its HTTP status in ``call.STATUS`` and a line in the README's table.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .hosts import HostPattern
from .hosts import host_matches as host_matches
from .hosts import is_internal as is_internal
from .vendors import BUILT_IN, REGISTRY
from .vendors._declared import build as build_declared
from .vendors.base import Vendor

# --------------------------------------------------------------------------- values


_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|h|d)\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = 3650 * 86400  # ten years: beyond that a TTL or window means "never", say so instead


def parse_duration(value: Any) -> int:
    """``"90s"``, ``"10m"``, ``"1h"``, ``"7d"`` or a number of seconds → seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 10m, 1h or 7d")
    if isinstance(value, int):
        seconds = value
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"{value!r} is not a duration like 30s, 10m, 1h or 7d")
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > MAX_DURATION:
        raise ValueError("a duration must be at most 3650d")
    return seconds


Duration = Annotated[int, BeforeValidator(parse_duration)]


def _money(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float, str, Decimal)):
        raise ValueError("expected an amount in USD, e.g. 50 or 12.5")
    try:
        d = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{value!r} is not an amount in USD, e.g. 50 or 12.5") from None
    if not d.is_finite() or d < 0:
        raise ValueError("an amount must be a non-negative number")
    return d


Usd = Annotated[Decimal, BeforeValidator(_money)]


def _secret_ref(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^(env|file):\S+$", value):
        raise ValueError(
            "credentials must be a reference, env:NAME or file:PATH; inline secrets are not allowed"
        )
    return value


SecretRef = Annotated[str, BeforeValidator(_secret_ref)]


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)\s*$")


@dataclass(frozen=True)
class Rate:
    """``60/minute``: at most ``limit`` requests per ``period`` seconds, per key."""

    limit: int
    period: int
    text: str

    @classmethod
    def parse(cls, value: Any) -> Rate:
        if isinstance(value, Rate):
            return value
        m = _RATE.match(str(value))
        if not m or int(m.group(1)) <= 0:
            raise ValueError(f"{value!r} is not a rate like 60/minute (second|minute|hour|day)")
        period = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}[m.group(2)]
        return cls(int(m.group(1)), period, f"{m.group(1)}/{m.group(2)}")


RateValue = Annotated[Rate, BeforeValidator(Rate.parse)]


# --------------------------------------------------------------------------- path rules


class UnsafePath(ValueError):
    """A request path that could mean different things to us and to the vendor."""


def path_segments(path: str) -> tuple[str, ...]:
    """Split a request path (no query) into decoded segments, the way a vendor will read it.

    Rules match decoded segments so ``/v1/%70ayment_methods`` cannot slip past a deny
    on ``/v1/payment_methods``. Paths whose meaning is ambiguous are refused outright:
    dot segments, an encoded slash or backslash, or a NUL byte.
    """
    segments = []
    for raw in path.split("/"):
        if raw == "":
            continue  # "//" and a trailing "/" are read as one separator
        seg = unquote(raw)
        if seg in (".", "..") or "/" in seg or "\\" in seg or "\x00" in seg:
            raise UnsafePath(f"ambiguous path segment {raw!r}")
        segments.append(seg)
    return tuple(segments)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


@dataclass(frozen=True)
class Rule:
    """``METHOD /path`` with ``*`` (one segment) and a trailing ``**`` (any rest)."""

    method: str | None  # None = any method
    segments: tuple[str, ...]
    text: str

    @classmethod
    def parse(cls, value: Any) -> Rule:
        if isinstance(value, Rule):
            return value
        if not isinstance(value, str):
            raise ValueError("a rule is a string like 'POST /v1/charges'")
        parts = value.split()
        if len(parts) != 2 or not parts[1].startswith("/"):
            raise ValueError(f"{value!r} is not 'METHOD /path' (e.g. 'GET /v1/charges/*')")
        method, path = parts
        if not (method == "*" or method.upper() in HTTP_METHODS):
            raise ValueError(f"{method!r} is not an HTTP method or * (one of {', '.join(HTTP_METHODS)})")
        segments = tuple(s for s in path.split("/") if s)
        for i, seg in enumerate(segments):
            if seg == "**" and i != len(segments) - 1:
                raise ValueError(f"{value!r}: ** may only be the last path segment")
            if "*" in seg and seg not in ("*", "**"):
                raise ValueError(f"{value!r}: * must be a whole path segment")
        return cls(None if method == "*" else method.upper(), segments, value)

    def matches(self, method: str, segments: tuple[str, ...]) -> bool:
        if self.method is not None and self.method != method:
            return False
        pattern = self.segments
        if pattern and pattern[-1] == "**":
            head = pattern[:-1]
            if len(segments) < len(head):
                return False
            segments = segments[: len(head)]
            pattern = head
        if len(pattern) != len(segments):
            return False
        return all(p == "*" or p == s for p, s in zip(pattern, segments, strict=True))


RuleValue = Annotated[Rule, BeforeValidator(Rule.parse)]


def first_match(rules: Iterable[Rule], method: str, segments: tuple[str, ...]) -> Rule | None:
    return next((r for r in rules if r.matches(method, segments)), None)


# --------------------------------------------------------------------------- models


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class BasicAuth(_Model):
    user: str = "{secret}"
    password: str = ""


class Credential(_Model):
    """Where a declared vendor's real key goes: one of a header (with a ``format``), a query
    parameter, or Basic auth (``{secret}`` is replaced by the key)."""

    header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    format: str = "{secret}"
    query: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    basic: BasicAuth | None = None

    @model_validator(mode="after")
    def _one_place(self) -> Credential:
        if sum(x is not None for x in (self.header, self.query, self.basic)) != 1:
            raise ValueError("give exactly one of header, query or basic")
        if "{secret}" not in self.format:
            raise ValueError("format must contain {secret}, e.g. 'Bearer {secret}'")
        if self.header and self.header.lower() in ("host", "content-length", "x-vault-key", "transfer-encoding"):
            raise ValueError(f"{self.header} cannot carry a credential")
        return self


class ReportedPrice(_Model):
    """A cost the vendor reports: ``path`` of a JSON field, or ``name`` of a header, × ``unit``."""

    path: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]{1,64}$")
    unit: Usd = Decimal(1)
    currency: str = Field(default="USD", pattern=r"^[A-Za-z]{3}$")


class DeclaredPrice(_Model):
    """``price:`` of a declared HTTP vendor (``vendors/_declared.py``)."""

    per_call_usd: dict[str, Usd] = Field(default_factory=dict)  # "METHOD /path" → USD
    response_field: ReportedPrice | None = None
    response_header: ReportedPrice | None = None

    @field_validator("per_call_usd")
    @classmethod
    def _rules(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        for text in v:
            Rule.parse(text)
        return v

    @model_validator(mode="after")
    def _fields(self) -> DeclaredPrice:
        if self.response_field is not None and not self.response_field.path:
            raise ValueError("response_field needs path: (a JSON field, e.g. data.credits_used)")
        if self.response_header is not None and not self.response_header.name:
            raise ValueError("response_header needs name: (a response header)")
        return self


class ToolPrice(_Model):
    per_call_usd: Usd = Decimal(0)


def _host(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"(\*\.)?[a-z0-9]([a-z0-9.-]*[a-z0-9])?", value.lower()):
        raise ValueError(f"{value!r} is not a host name (api.example.com or *.example.com)")
    return value.lower()


HostName = Annotated[str, BeforeValidator(_host)]


def _regex(value: Any) -> str:
    try:
        re.compile(str(value))
    except re.error as e:
        raise ValueError(f"not a regular expression: {e}") from None
    return str(value)


class VendorConfig(_Model):
    """``vendors.<name>``: where the real credential comes from, and where to send traffic.

    A name that is not a built-in vendor declares one (``vendors/_declared.py``): ``hosts``,
    and optionally ``kind``/``compatible``, ``credential``, ``raw_credential``, ``price``, ``tools``.
    """

    secret: SecretRef | None = None
    account_sid: SecretRef | None = None
    upstream: str | None = None  # e.g. http://127.0.0.1:9001 for a mock or staging server
    hosts: list[HostName] | None = Field(default=None, min_length=1)
    kind: Literal["http", "mcp"] | None = None
    compatible: Literal["openai", "anthropic"] | None = None
    credential: Credential | None = None
    raw_credential: Annotated[str, BeforeValidator(_regex)] | None = None
    price: DeclaredPrice | None = None
    tools: dict[str, ToolPrice] | None = None  # kind mcp: per-tool prices (names or globs)

    # The hosts this credential may be sent to. Required where a vendor is any subdomain (Shopify:
    # one shop's token must not go to another *.myshopify.com); see stages/identify.py.
    credential_hosts: list[str] = Field(default_factory=list)

    @field_validator("credential_hosts")
    @classmethod
    def _credential_hosts(cls, v: list[str]) -> list[str]:
        out = [h.strip().lower().rstrip(".") for h in v]
        if bad := [h for h in out if not h or "*" in h or "/" in h or ":" in h]:
            raise ValueError(f"credential_hosts are exact host names (no wildcard, scheme or port): {bad[0]!r}")
        return out

    @model_validator(mode="after")
    def _declaration(self) -> VendorConfig:
        if self.compatible and self.kind == "mcp":
            raise ValueError("a vendor is either kind: mcp or compatible: openai|anthropic")
        if self.tools is not None and self.kind != "mcp":
            raise ValueError("tools: (per-tool prices) needs kind: mcp")
        if self.price is not None and (self.compatible or self.kind == "mcp"):
            raise ValueError("price: is for kind http; give an LLM's token table under the top-level "
                             "prices:, an MCP server's under tools:")
        return self

    def declared(self) -> bool:
        return self.hosts is not None

    def spec(self) -> dict[str, Any]:
        """The declaration as the plain dict ``vendors/_declared.build`` reads."""
        return self.model_dump(mode="json", exclude_none=True,
                               exclude={"secret", "account_sid", "upstream", "credential_hosts"})

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("upstream must be an http:// or https:// URL with a host")
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
        if parts.path not in ("", "/"):
            raise ValueError("upstream is scheme://host[:port] only, without a path")
        return v


def _glob(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a name or a glob like 'gpt-4o*'")
    return value.strip()


Glob = Annotated[str, BeforeValidator(_glob)]


class NameRules(_Model):
    """``models:`` (and MCP ``tools:``): globs on a name; deny wins; a non-empty allow must match."""

    allow: list[Glob] = Field(default_factory=list)
    deny: list[Glob] = Field(default_factory=list)


class ToolRules(_Model):
    """``tools:`` of an MCP server in a policy: which tools a key may call (globs on the tool
    name; deny wins; a non-empty allow must match; approve holds the call for a human), and
    per-tool rates (``rate: {web_search: 10/minute}``, per key)."""

    allow: list[Glob] = Field(default_factory=list)
    deny: list[Glob] = Field(default_factory=list)
    approve: list[Glob] = Field(default_factory=list)
    rate: dict[str, RateValue] = Field(default_factory=dict)


class VendorRules(_Model):
    """``policies.<p>.vendors.<name>``: which endpoints a key may call, and per-request limits."""

    allow: list[RuleValue] = Field(default_factory=list)
    deny: list[RuleValue] = Field(default_factory=list)
    approve: list[RuleValue] = Field(default_factory=list)
    max_request_usd: Usd | None = None
    # Used when a call moves money but its request says no amount (confirm, invoice pay).
    default_estimate_usd: Usd | None = None
    # LLM vendors (stages/models.py): which models, and a ceiling on output tokens per request.
    models: NameRules | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=10_000_000)
    clamp: bool = False  # rewrite a larger (or missing) limit to max_output_tokens instead of refusing
    tools: ToolRules | None = None  # MCP servers (stages/tools.py)

    @model_validator(mode="after")
    def _clamp_needs_ceiling(self) -> VendorRules:
        if self.clamp and self.max_output_tokens is None:
            raise ValueError("clamp: true needs max_output_tokens: N")
        return self


class LabelCaps(_Model):
    """``budget.per_label.<label>``: caps shared by every key carrying the same value of that label."""

    daily_usd: Usd | None = None
    monthly_usd: Usd | None = None

    @model_validator(mode="after")
    def _some(self) -> LabelCaps:
        if self.daily_usd is None and self.monthly_usd is None:
            raise ValueError("give daily_usd and/or monthly_usd")
        return self


class BudgetCaps(_Model):
    """``budget:``: USD caps; the budget stage reserves every one that applies."""

    key_usd: Usd | None = None
    key_daily_usd: Usd | None = None
    policy_daily_usd: Usd | None = None
    policy_monthly_usd: Usd | None = None
    # {team: {daily_usd: 100}}: each distinct value of a key's `team` label gets its own cap,
    # shared by every key (of any policy) with that value; keys without the label are not capped by it
    per_label: dict[str, LabelCaps] = Field(default_factory=dict)

    @field_validator("per_label")
    @classmethod
    def _label_names(cls, v: dict[str, LabelCaps]) -> dict[str, LabelCaps]:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise ValueError(f"{name!r} is not a label name (letters, digits, _ . -)")
        return v


class LoopRule(_Model):
    """``loop:``: the same money-moving request repeated ``repeats`` times within ``window`` is
    refused (the budget stage's ``LoopBreaker`` keeps the count)."""

    repeats: int = Field(default=3, ge=2)
    window: Duration = 600


class CircuitRule(_Model):
    """``circuit:`` (stages/circuit.py): ``failures`` consecutive upstream failures within
    ``window`` pause a policy's calls to a vendor for ``cooldown``; ``circuit: off`` disables it."""

    enabled: bool = True
    failures: int = Field(default=5, ge=1, le=10_000)
    window: Duration = 60
    cooldown: Duration = 30


def _circuit(value: Any) -> Any:
    if value is False or value == "off":
        return {"enabled": False}
    if value is True or value == "on":
        return {}
    return value


class Policy(_Model):
    vendors: dict[str, VendorRules] = Field(default_factory=dict)
    budget: BudgetCaps = BudgetCaps()
    rate: RateValue | None = None
    ttl: Duration = 3600
    mode: Literal["enforce", "report"] | None = None  # None: the file's global mode
    loop: LoopRule = LoopRule()
    approval_timeout: Duration = 300
    circuit: Annotated[CircuitRule, BeforeValidator(_circuit)] = CircuitRule()



class StaticKey(_Model):
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    token_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    policy: str
    labels: dict[str, str] = Field(default_factory=dict)
    cap_usd: Usd | None = None


HostPatternValue = Annotated[HostPattern, BeforeValidator(HostPattern.parse)]


class EgressRules(_Model):
    """Non-vendor hosts. ``allow``/``deny`` take host names, ``*.domain`` and IPs/CIDRs, parsed
    here, once per load (see ``hosts``): a malformed entry is an error with file, line and field."""

    default: Literal["allow", "deny"] = "allow"
    allow: list[HostPatternValue] = Field(default_factory=list)
    deny: list[HostPatternValue] = Field(default_factory=list)


def _zone(value: Any) -> ZoneInfo:
    if isinstance(value, ZoneInfo):
        return value
    try:
        return ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not a time zone this system knows (an IANA name like "
                         "Europe/Paris or America/New_York; pip install tzdata where there is no zone database)") from None


class Config(_Model):
    _declared: dict[str, Vendor] = PrivateAttr(default_factory=dict)  # built in _cross_references
    version: Literal[1]
    vendors: dict[str, VendorConfig] = Field(default_factory=dict)
    fx: dict[str, Usd] = Field(default_factory=dict)
    prices: dict[str, dict[str, Any]] = Field(default_factory=dict)
    policies: dict[str, Policy] = Field(default_factory=dict)
    keys: list[StaticKey] = Field(default_factory=list)
    egress: EgressRules = EgressRules()
    mode: Literal["enforce", "report"] = "enforce"
    # The zone budget days and months are counted in (an IANA name, e.g. Europe/Paris); months are
    # calendar months there. The ledger's timestamps stay UTC.
    timezone: Annotated[ZoneInfo, BeforeValidator(_zone)] = ZoneInfo("UTC")


    @field_validator("fx")
    @classmethod
    def _fx(cls, v: dict[str, Decimal]) -> dict[str, Decimal]:
        return {k.upper(): rate for k, rate in v.items()}

    @model_validator(mode="after")
    def _cross_references(self) -> Config:
        errors: list[tuple[tuple[Any, ...], str]] = []
        self._declared = _declare(self.vendors, errors)
        known = ", ".join(sorted(REGISTRY))
        for name, vc in self.vendors.items():
            vendor = self.vendor(name)
            if vendor is None:
                continue  # (reported by _declare)
            for fld in vendor.credential_fields:
                if getattr(vc, fld) is None:
                    errors.append((("vendors", name, fld), f"{name} needs {fld}: env:NAME or file:PATH"))
        for name in self.prices:
            if self.vendor(name) is None:
                errors.append((("prices", name), f"unknown vendor {name!r} (known: {known}, or one declared "
                                                 "under vendors: with hosts:)"))
        for pname, pol in self.policies.items():
            for vname, rules in pol.vendors.items():
                vendor = self.vendor(vname)
                if vendor is None and vname not in self.vendors:
                    errors.append((("policies", pname, "vendors", vname), unknown_vendor(vname, self.vendors)))
                    continue
                if vname not in self.vendors:
                    errors.append(
                        (("policies", pname, "vendors", vname),
                         f"vendor {vname!r} has no credentials under the top-level vendors:")
                    )
                for fld in ("models", "max_output_tokens"):
                    if getattr(rules, fld) is not None and vendor is not None and vendor.llm is None:
                        errors.append((("policies", pname, "vendors", vname, fld),
                                       f"{vname} is not an LLM vendor: {fld} applies to model providers only"))
                vc = self.vendors.get(vname)
                if rules.tools is not None and (vc is None or vc.kind != "mcp"):
                    errors.append((("policies", pname, "vendors", vname, "tools"),
                                   f"{vname} is not an MCP server: tools: needs kind: mcp under vendors:"))
        seen: set[str] = set()
        for i, key in enumerate(self.keys):
            if key.policy not in self.policies:
                errors.append((("keys", i, "policy"), f"no policy named {key.policy!r}"))
            if key.id in seen:
                errors.append((("keys", i, "id"), f"duplicate key id {key.id!r}"))
            seen.add(key.id)
        if errors:
            raise _CrossErrors(errors)
        return self

    def vendor(self, name: str) -> Vendor | None:
        """A built-in vendor, or one this file declares."""
        return REGISTRY.get(name) if name in BUILT_IN else self.declared_vendors.get(name)

    @property
    def declared_vendors(self) -> dict[str, Vendor]:
        """The vendors this file declares (``vendors.<name>.hosts``), built."""
        return getattr(self, "_declared", None) or {}

    def policy_mode(self, policy: str) -> str:
        """``enforce`` or ``report``; a policy that no longer exists is enforced (nothing to report)."""
        pol = self.policies.get(policy)
        return "enforce" if pol is None else pol.mode or self.mode


def _declare(vendors: Mapping[str, VendorConfig], errors: list[tuple[tuple[Any, ...], str]]) -> dict[str, Vendor]:
    """Build the declared vendors; a built-in name with a declaration, an unknown name without
    one, or a host that another vendor already serves, is an error."""
    out: dict[str, Vendor] = {}
    hosts: dict[str, str] = {}
    for name, vc in vendors.items():
        if name in BUILT_IN:
            extra = [f for f in ("hosts", "kind", "compatible", "credential", "raw_credential", "price", "tools")
                     if getattr(vc, f) is not None]
            if extra:
                errors.append((("vendors", name, extra[0]),
                               f"{name} is built in; {extra[0]}: is for vendors declared under another name"))
            continue
        if not vc.declared():
            errors.append((("vendors", name), f"unknown vendor {name!r} (known: {', '.join(sorted(BUILT_IN))}); "
                                              "to declare one, give its hosts:"))
            continue
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,40}", name):
            errors.append((("vendors", name), "a declared vendor's name is lower-case letters, digits, - and _"))
            continue
        for host in vc.hosts or ():
            owner = next((v.name for v in BUILT_IN.values() if v.serves(host.removeprefix("*."))), None)
            owner = owner or hosts.get(host)
            if owner:
                errors.append((("vendors", name, "hosts"), f"{host} is already served by {owner}"))
            hosts[host] = name
        try:
            out[name] = build_declared(name, vc.spec())
        except Exception as e:  # a declaration the builder cannot use: say so, never half-load it
            errors.append((("vendors", name), f"cannot build this vendor: {e}"))
    return out


class _CrossErrors(ValueError):
    def __init__(self, errors: list[tuple[tuple[Any, ...], str]]) -> None:
        super().__init__("; ".join(m for _, m in errors))
        self.errors = errors


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field or '(file)'}: {self.message}"


class ConfigError(Exception):
    """A policy file that cannot be used; ``problems`` says where and why."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Follow ``loc`` through the composed YAML tree; the line of the deepest node found."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    node, line = v, k.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _dotted(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_config(text: str, filename: str = "<policy>") -> Config:
    """Parse and validate policy YAML; raises :class:`ConfigError` listing every problem."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise ConfigError(
            [Problem(filename, mark.line + 1 if mark else None, "", f"invalid YAML: {e.problem}")]
        ) from None
    except yaml.YAMLError as e:  # e.g. a control character (ReaderError)
        raise ConfigError([Problem(filename, None, "", f"invalid YAML: {e}")]) from None
    except RecursionError:
        raise ConfigError([Problem(filename, None, "", "invalid YAML: nested too deeply")]) from None
    except (ValueError, TypeError, AttributeError) as e:  # yaml's constructors on `!!int x` and the like
        raise ConfigError([Problem(filename, None, "", f"invalid YAML value: {e}")]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem(filename, 1, "", "expected a mapping with version: 1")])
    try:
        return Config.model_validate(data)
    except RecursionError:
        raise ConfigError([Problem(filename, None, "", "nested too deeply")]) from None
    except ValidationError as e:
        problems = []
        # The cross-reference checks run on the validated model, i.e. only when every field is
        # valid: run them on the raw data too, so one `check` reports both kinds at once.
        for loc, msg in _raw_cross_references(data):
            problems.append(Problem(filename, _line_of(node, loc), _dotted(loc), msg))
        for err in e.errors():
            ctx_err = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_err, _CrossErrors):
                problems += [
                    p for loc, msg in ctx_err.errors
                    if (p := Problem(filename, _line_of(node, loc), _dotted(loc), msg)) not in problems
                ]
                continue
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check the spelling)"
            problems.append(Problem(filename, _line_of(node, loc), _dotted(loc), msg))
        raise ConfigError(problems) from None


def _raw_cross_references(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    """Config._cross_references' vendor and key checks, tolerant of a file with other errors."""
    out: list[tuple[tuple[Any, ...], str]] = []
    vendors = data.get("vendors") if isinstance(data.get("vendors"), dict) else {}
    for name, vc in vendors.items():
        if name in REGISTRY and isinstance(vc, dict):
            for fld in REGISTRY[name].credential_fields:
                if vc.get(fld) is None:
                    out.append((("vendors", name, fld), f"{name} needs {fld}: env:NAME or file:PATH"))
    policies = data.get("policies") if isinstance(data.get("policies"), dict) else {}
    for pname, pol in policies.items():
        pvendors = pol.get("vendors") if isinstance(pol, dict) else None
        for vname in pvendors if isinstance(pvendors, dict) else ():
            if isinstance(vname, str) and vname not in vendors:
                out.append((("policies", pname, "vendors", vname),
                            f"vendor {vname!r} has no credentials under the top-level vendors:"
                            if vname in REGISTRY else unknown_vendor(vname, vendors)))
    keys = data.get("keys") if isinstance(data.get("keys"), list) else []
    for i, key in enumerate(keys):
        if isinstance(key, dict) and isinstance(key.get("policy"), str) and key["policy"] not in policies:
            out.append((("keys", i, "policy"), f"no policy named {key['policy']!r}"))
    return out


def unknown_vendor(name: str, declared: Mapping[str, Any]) -> str:
    """A policy names a vendor that is neither built in nor declared: say so, with the likely one."""
    names = sorted({*REGISTRY, *(n for n in declared if isinstance(n, str))})
    close = difflib.get_close_matches(name, names, n=1)
    return (f"unknown vendor {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f": known: {', '.join(sorted(REGISTRY))}, or one declared under vendors: with hosts:")


def locate(filename: str, loc: tuple[Any, ...]) -> int | None:
    """The line of ``loc`` (e.g. ``("vendors", "stripe", "secret")``) in a policy file, if readable."""
    try:
        return _line_of(yaml.compose(Path(filename).read_text()), loc)
    except (OSError, yaml.YAMLError, RecursionError, ValueError):
        return None


def load_config(path: str | os.PathLike[str]) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([Problem(str(path), None, "", f"cannot read: {e.strerror}")]) from None
    return parse_config(text, str(path))


def read_secret(ref: str, environ: Mapping[str, str] | None = None,
                base: Path | None = None) -> tuple[str | None, str]:
    """Read an ``env:NAME`` or ``file:PATH`` reference: (the value, "") or (None, why not).

    A file's text is stripped; an empty value counts as missing. A relative PATH is relative to
    ``base`` (the policy file's directory, so it means one file from any working directory).
    One reader for the vendor credentials and the admin token, so both mean the same thing by
    a reference.
    """
    kind, _, target = ref.partition(":")
    if kind == "env":
        value = (os.environ if environ is None else environ).get(target)
        return (value, "") if value else (None, f"environment variable {target} is not set")
    if base is not None and not Path(target).is_absolute():
        target = str(base / target)
    try:
        value = Path(target).read_text().strip()
    except OSError as e:
        return None, f"cannot read {target}: {e.strerror}"
    except UnicodeDecodeError:
        return None, f"{target} is not a text file"
    return (value, "") if value else (None, f"{target} is empty")


def resolve_credentials(
    config: Config, filename: str = "<policy>", environ: Mapping[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """Read every ``env:``/``file:`` credential; raises :class:`ConfigError` naming what is missing.

    The values are returned, never logged: callers keep them in memory only.
    """
    environ = os.environ if environ is None else environ
    base = Path(filename).resolve().parent if not filename.startswith("<") else None
    out: dict[str, dict[str, str]] = {}
    problems: list[Problem] = []
    for name, vc in config.vendors.items():
        creds: dict[str, str] = {}
        vendor = config.vendor(name)
        for fld in vendor.credential_fields if vendor else ():
            value, missing = read_secret(getattr(vc, fld), environ, base)
            if not value:
                problems.append(Problem(filename, locate(filename, ("vendors", name, fld)),
                                        f"vendors.{name}.{fld}", missing))
            else:
                creds[fld] = value
        out[name] = creds
    if problems:
        raise ConfigError(problems)
    return out


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class Allow:
    """The request may go on; ``rule`` is the ``allow:`` rule that matched."""

    rule: str | None = None


@dataclass(frozen=True)
class Deny:
    """The policy refuses the request (in report mode: would refuse it)."""

    code: str  # a SPEC §4 refusal code (call.STATUS maps it to an HTTP status)
    message: str  # for the agent, the ledger and the log: no secrets
    rule: str | None = None  # the policy text that decided (None: no rule matched)
    retry_after: float | None = None  # seconds, for rate_limited


@dataclass(frozen=True)
class Approve:
    """The request waits for a human (``approve:`` rule ``rule``)."""

    rule: str


Verdict = Allow | Deny | Approve


def decide(config: Config, policy: str, vendor: str, method: str, path: str) -> Verdict:
    """May a key of ``policy`` call ``method path`` on ``vendor``? The rules only, no state.

    ``path`` is the request path as sent (a query is ignored); it is matched decoded (see
    :func:`path_segments`) and an ambiguous path is refused. Deny wins over approve and allow;
    a request no rule matches is refused.

    Remembered per config object (a reloaded or another policy file is another object) and
    (policy, vendor, method, path): the verdict depends on nothing else.
    """
    memo = _decided.get(id(config))
    if memo is None or memo[0] is not config:
        if len(_decided) >= 8:
            _decided.clear()
        memo = _decided[id(config)] = (config, {})  # (holding the config: its id is not reused while here)
    key = (policy, vendor, method, path.split("?", 1)[0])
    verdict = memo[1].get(key)
    if verdict is None:
        verdict = _decide(config, policy, vendor, method, path)
        if len(memo[1]) >= 4096:
            memo[1].clear()
        memo[1][key] = verdict
    return verdict


_decided: dict[int, tuple[Config, dict[tuple[str, str, str, str], Verdict]]] = {}


def _decide(config: Config, policy: str, vendor: str, method: str, path: str) -> Verdict:
    pol = config.policies.get(policy)
    if pol is None:
        return Deny("vendor_not_allowed", f"policy {policy!r} no longer exists")
    rules = pol.vendors.get(vendor)
    if rules is None:
        return Deny("vendor_not_allowed", f"policy {policy!r} does not allow {vendor}")
    method, path = method.upper(), path.split("?", 1)[0]
    what = f"{method} {path}"
    try:
        segments = path_segments(path)
    except UnsafePath as e:
        return Deny("endpoint_not_allowed", f"{what}: {e}")
    if rule := first_match(rules.deny, method, segments):
        return Deny("endpoint_not_allowed", f"{what} is denied by {rule.text!r}", rule.text)
    if rule := first_match(rules.approve, method, segments):
        return Approve(rule.text)
    if rule := first_match(rules.allow, method, segments):
        return Allow(rule.text)
    return Deny("endpoint_not_allowed", f"{what} is not allowed by policy {policy!r}")


# --------------------------------------------------------------------------- egress
# (the matching itself is ``hosts``; re-exported here for the egress stage)
