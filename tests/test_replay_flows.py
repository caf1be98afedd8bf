"""Captured flows (``tests/flows/*.mitm``, written by ``mitmdump -w``) replayed through the addons.

``tests/flows/demo.mitm`` is ``data/demo/flows.mitm`` from ``./scripts/demo``: real SDK
traffic through a real gateway against the fake vendors (saved with
``store_streamed_bodies=true`` so streamed responses can be re-metered). Loaded flows are not live
(``live=False``); each is replayed through the real pipeline in process (``spendgate.pipeline``,
mitmproxy's own hook dispatch, the captured response in place of the vendor) with a fresh vault
key, and must reach the decision and the cost recorded when it was captured. To
regenerate: ``./scripts/demo && cp data/demo/flows.mitm tests/flows/demo.mitm``.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

from mitmproxy import io
from mitmproxy.http import HTTPFlow

from spendgate.pipeline import Pipeline
from spendgate.wire import PREFIX

FLOWS = Path(__file__).parent / "flows"
ROOT = Path(__file__).resolve().parents[1]
# Decisions that depend on the key's state or the agent's header, not on the request itself.
KEY_STATE = {"missing_vault_key", "unknown_key", "expired", "revoked", "raw_credential"}


def load(name: str) -> list[HTTPFlow]:
    with open(FLOWS / name, "rb") as f:
        return [fl for fl in io.FlowReader(f).stream() if isinstance(fl, HTTPFlow)]


def test_captured_flows_hold_no_secrets() -> None:
    raw = (FLOWS / "demo.mitm").read_bytes()
    assert b"vk_" not in raw, "a vault key was saved in a flow file"
    flows = load("demo.mitm")
    assert flows and all(not f.live for f in flows)
    forwarded = [f for f in flows if f.metadata["spendgate"]["decision"] == "allow"]
    assert forwarded, "the capture should include forwarded calls"
    for f in forwarded:
        creds = [v for k, v in f.request.headers.items()
                 if k.lower() in ("authorization", "x-api-key", "x-postmark-server-token")]
        assert creds and all(PREFIX in v for v in creds), "a forwarded flow shows only the placeholder"


def test_replay_reaches_the_captured_decisions_and_costs(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline((ROOT / "policies" / "example.yaml").read_text(), store_streamed_bodies=True)
    assert p.runtime.state is not None
    tokens = {name: p.issue_key(name) for name in p.runtime.state.config.policies}
    checked = 0
    for captured in load("demo.mitm"):
        seen = captured.metadata["spendgate"]
        if seen["reason"] in KEY_STATE:
            continue
        flow = captured.copy()
        flow.response, flow.metadata = None, {}
        flow.request.scheme, flow.request.host, flow.request.port = "https", seen["host"], 443
        for name in ("authorization", "x-api-key", "x-postmark-server-token"):
            flow.request.headers.pop(name, None)
        flow.request.headers["X-Vault-Key"] = tokens[seen["policy"]]
        out = p.run(flow, captured.response, chunk=13)  # a streamed body is fed in pieces
        assert out.row is not None, (flow.request.path, seen)
        assert (out.decision, out.reason) == (seen["decision"], seen["reason"]), flow.request.path
        if seen["decision"] == "deny":
            assert out.forwarded is None and out.flow.response is not None
            assert out.flow.response.headers["X-Spendgate-Reason"] == seen["reason"]
        else:
            assert out.forwarded is not None, out.reason
            assert out.row["cost_status"] == seen["cost_status"]
            assert out.cost_usd == Decimal(seen["cost_usd"]), (flow.request.path, out.row)
        checked += 1
    assert checked >= 10
