"""Stage 3b, models: which model an LLM request may name, and how much output it may ask for.

Runs after authorize (the endpoint is allowed) and before budget, so a clamped request is
estimated and reserved at its new limit. Only for vendors with an ``llm`` shape
(``vendors/_models.py``) and a policy that sets ``models:`` or ``max_output_tokens:``.

- ``models: {allow: [...], deny: [...]}``: globs (``gpt-4o*``, ``claude-*-haiku-*``), matched
  without regard to case on the model the request names (JSON body, multipart form, or the
  path for Gemini). Deny wins; a non-empty allow list must match. A request that names no
  model is left to the endpoint rules (the vendor refuses it anyway); one that names it
  ambiguously (twice, or not as a string) is refused.
- ``max_output_tokens: N``: a request asking for more than N output tokens, or for no limit
  where the provider's default (the model's maximum) is larger, is refused with 403
  ``output_limit_exceeded``; with ``clamp: true`` its limit is rewritten to N before it is
  forwarded (a missing limit is added), and the vendor sees N.

In report-only mode nothing is rewritten: an over-limit request is recorded as
``would_deny output_limit_exceeded`` (with or without ``clamp``) and forwarded as sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from fnmatch import fnmatchcase

from mitmproxy import http

from ..call import Call, apply_verdicts, fail_closed, keyed_call
from ..policy import Deny, NameRules, VendorRules, Verdict
from ..runtime import Runtime
from ..vendors import REGISTRY
from ..vendors._models import Ambiguous, LLMShape
from ..vendors.base import RequestView
from .budget import request_view


def name_allowed(name: str, rules: NameRules) -> tuple[bool, str]:
    """(allowed, why) for ``name`` under allow/deny globs (case-insensitive; deny wins)."""
    low = name.lower()
    if deny := next((g for g in rules.deny if fnmatchcase(low, g.lower())), None):
        return False, f"denied by {deny!r}"
    if rules.allow and not any(fnmatchcase(low, g.lower()) for g in rules.allow):
        return False, f"not in allow {rules.allow}"
    return True, ""


class Models:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        call = keyed_call(flow)
        if call is None:
            return
        vendor = REGISTRY.get(call.vendor or "")
        if vendor is None or vendor.llm is None:
            return
        policy = self.runtime.policy(call.key.policy)
        rules = policy.vendors.get(vendor.name) if policy else None
        governed = rules is not None and (rules.models is not None or rules.max_output_tokens is not None)
        view = request_view(flow)
        try:
            model = vendor.llm.model(view)
        except Ambiguous as e:
            model, ambiguous = None, str(e)
        else:
            ambiguous = None
        call.model = model[:200] if model else None  # the ledger's model column, with or without rules
        if not governed:
            return
        assert rules is not None
        apply_verdicts(flow, call, self.checks(flow, call, vendor.name, vendor.llm, rules, view, model, ambiguous))

    def checks(self, flow: http.HTTPFlow, call: Call, vendor: str, shape: LLMShape, rules: VendorRules,
               view: RequestView, model: str | None, ambiguous: str | None) -> Iterator[Verdict | None]:
        if ambiguous:
            yield Deny("model_not_allowed", f"{vendor}: {ambiguous}", "models")
            return
        if rules.models is not None and model is not None:
            ok, why = name_allowed(model, rules.models)
            if not ok:
                yield Deny("model_not_allowed",
                           f"model {model!r} is {why} in policy {call.policy!r} for {vendor}", "models")
        ceiling = rules.max_output_tokens
        if ceiling is None or not shape.applies(view):
            return
        try:
            limits = shape.limits(view)
        except Ambiguous as e:
            yield Deny("output_limit_exceeded", f"{vendor}: {e}", "max_output_tokens")
            return
        if limits:
            asked = max(lim.value for lim in limits)
            what = ", ".join(f"{'.'.join(lim.path)}={lim.value}" for lim in limits)
        else:
            state = self.runtime.state
            assert state is not None
            asked = shape.default_output(view, state.prices.table(REGISTRY[vendor]))
            what = (f"no output limit (the provider's default for {model or 'this model'} is "
                    f"{asked if asked is not None else 'unknown'} tokens)")
        if asked is not None and asked <= ceiling:
            return
        if rules.clamp and call.mode != "report":
            try:
                flow.request.content = shape.clamped(view, ceiling)
            except Ambiguous as e:
                yield Deny("output_limit_exceeded", f"{vendor}: {e}; cannot clamp to {ceiling}", "clamp")
                return
            call.notes.append(f"clamped {what} to {ceiling}")
            return
        yield Deny("output_limit_exceeded",
                   f"{what} is over max_output_tokens {ceiling} in policy {call.policy!r}"
                   + (" (clamp would set it to the ceiling)" if rules.clamp else ""),
                   f"max_output_tokens: {ceiling}")
