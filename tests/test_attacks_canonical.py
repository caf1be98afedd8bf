"""One canonical request, as properties (in process, through the real addon list).

For any spelling of a vendor path that the gateway accepts, every vendor estimator and cost
parser sees the identical canonical path, and that path is what the vendor receives and the
ledger records; a spelling it refuses is never estimated. Companion of ``test_attacks.py``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess import POLICY, response, vendor_flow

from spendgate.canonical import Ambiguous, canonical_path, canonical_target
from spendgate.pipeline import Pipeline
from spendgate.policy import UnsafePath, path_segments
from spendgate.vendors.base import Vendor

# (host, canonical path, method, body, key header)
ENDPOINTS = [
    ("api.stripe.com", "/v1/payment_intents", "POST", "amount=100&currency=usd&description={n}", "X-Vault-Key"),
    ("api.stripe.com", "/v1/payment_intents/pi_1/confirm", "POST", "description={n}", "X-Vault-Key"),
    ("api.resend.com", "/emails/batch", "POST",
     '[{{"from": "a@example.com", "to": ["b{n}@example.com"], "subject": "s", "text": "t"}}]', "X-Vault-Key"),
    ("api.resend.com", "/emails", "POST",
     '{{"from": "a@example.com", "to": "b{n}@example.com", "subject": "s", "text": "t"}}', "X-Vault-Key"),
    ("api.openai.com", "/v1/chat/completions", "POST",
     '{{"model": "gpt-4o-mini", "messages": [{{"role": "user", "content": "{n}"}}]}}', "X-Vault-Key"),
    ("api.anthropic.com", "/v1/messages", "POST",
     '{{"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{{"role": "user", "content": "{n}"}}]}}',
     "X-Vault-Key"),
    ("api.postmarkapp.com", "/email/batch", "POST",
     '[{{"From": "a@example.com", "To": "b{n}@example.com", "Subject": "s", "TextBody": "t"}}]', "X-Vault-Key"),
]
# inprocess.POLICY, with a default hold for calls whose amount the request does not say (confirm)
ALL_WITH_DEFAULT = POLICY.replace('{allow: ["* /**"]}', '{allow: ["* /**"], default_estimate_usd: 1}')
UNRESERVED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


@st.composite
def spellings(draw: st.DrawFn, path: str) -> str:
    """``path`` spelled another way a vendor would read as the same: escapes of unreserved
    characters (either hex case), doubled slashes, a trailing slash."""
    out = []
    for seg in path.strip("/").split("/"):
        chars = []
        for ch in seg:
            if ch in UNRESERVED and draw(st.integers(0, 4)) == 0:
                code = f"{ord(ch):02x}"
                chars.append("%" + (code.upper() if draw(st.booleans()) else code))
            else:
                chars.append(ch)
        out.append("/" * draw(st.integers(1, 3)) + "".join(chars))
    return "".join(out) + ("/" if draw(st.booleans()) else "")


@st.composite
def cases(draw: st.DrawFn) -> tuple[Any, str, bool]:
    endpoint = draw(st.sampled_from(ENDPOINTS))
    spelled = draw(spellings(endpoint[1]))
    injected = False
    if draw(st.integers(0, 5)) == 0:  # now and then something (usually) ambiguous in it
        bad = draw(st.sampled_from(["/..", "/%2e%2E", "/.", "/a%2Fb", "/a%5cb", "/%zz", "#frag", "/a%00"]))
        cut = draw(st.integers(1, len(spelled)))
        spelled, injected = spelled[:cut] + bad + spelled[cut:], True
    return endpoint, spelled, injected


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, str, str]]]:
    """(what, vendor, path) for every call of a vendor's estimator and cost parser."""
    calls: list[tuple[str, str, str]] = []
    estimate, cost = Vendor.estimate, Vendor.cost

    def spy_estimate(self: Vendor, req: Any, *a: Any, **kw: Any) -> Any:
        calls.append(("estimate", self.name, req.path))
        return estimate(self, req, *a, **kw)

    def spy_cost(self: Vendor, req: Any, *a: Any, **kw: Any) -> Any:
        calls.append(("cost", self.name, req.path))
        return cost(self, req, *a, **kw)

    monkeypatch.setattr(Vendor, "estimate", spy_estimate)
    monkeypatch.setattr(Vendor, "cost", spy_cost)
    yield calls


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_every_estimator_sees_the_canonical_path_the_vendor_receives(
        pipeline: Callable[..., Pipeline], seen: list[tuple[str, str, str]], case: tuple[Any, str, bool]) -> None:
    (host, path, method, body, header), spelled, injected = case
    p = _shared(pipeline)
    n = next(_counter)
    seen.clear()
    out = p.run(vendor_flow(method, f"https://{host}{spelled}", {header: p.token}, body.format(n=n)),
                response(200, json.dumps({"id": "x"})))
    try:
        expected = canonical_target(spelled)
    except Ambiguous:
        expected = None
    if expected is None:
        assert (out.status, out.reason) == (403, "endpoint_not_allowed"), (spelled, out.reason)
        assert seen == [] and out.forwarded is None
        return
    assert {s[2] for s in seen} == {expected}, (spelled, seen)  # every estimate and cost parse
    assert out.row is not None and out.row["path"] == expected
    if not injected:  # a mere respelling is the endpoint itself, priced and forwarded as such
        assert expected == path, (spelled, expected)
        assert out.reason is None, (spelled, out.reason)
        assert {s[0] for s in seen} == {"estimate", "cost"}, (spelled, seen)
    if out.reason is None:
        assert out.forwarded is not None and out.forwarded.path == expected
    else:
        pytest.fail(f"{spelled!r} was refused: {out.reason}")


_counter = itertools.count()
_pipelines: dict[int, Pipeline] = {}


def _shared(make: Callable[..., Pipeline]) -> Pipeline:
    """One pipeline for all examples of a test run (Hypothesis calls the test many times)."""
    key = id(make)
    if key not in _pipelines:
        _pipelines.clear()
        p = make(ALL_WITH_DEFAULT)
        p.token = p.issue_key("everything")  # type: ignore[attr-defined]
        _pipelines[key] = p
    return _pipelines[key]


@given(st.text(alphabet="/%.aA1_-~2fFeE5cC#?:@", max_size=40))
def test_canonical_form_is_a_fixpoint_and_keeps_the_rules_segments(text: str) -> None:
    """Canonicalising twice changes nothing, and the rules match the canonical path exactly as
    they match the spelling (so checking the canonical form loses no deny)."""
    target = "/" + text
    try:
        canon = canonical_target(target)
    except Ambiguous:
        return
    assert canonical_target(canon) == canon
    path = target.split("?", 1)[0]
    try:
        expected = path_segments(path)
    except UnsafePath:
        pytest.fail(f"{target!r} is refused by the rules but accepted as canonical {canon!r}")
    assert path_segments(canon.split("?", 1)[0]) == expected
    assert canonical_path(canon.split("?", 1)[0]) == canon.split("?", 1)[0]
