"""Captured flows (``tests/flows/*.mitm``, written by ``mitmdump -w``) replayed through the addons.

``tests/flows/demo.mitm`` is ``data/demo/flows.mitm`` from ``./scripts/demo``: real SDK
traffic through a real gateway against the fake vendors (saved with
``store_streamed_bodies=true`` so streamed responses can be re-metered). Loaded flows are not live
(``live=False``); each is replayed through the pipeline in-process with a fresh vault
key, and must reach the decision and the cost recorded when it was captured. To
regenerate: ``./scripts/demo && cp data/demo/flows.mitm tests/flows/demo.mitm``.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from mitmproxy import io
from mitmproxy.http import HTTPFlow
from mitmproxy.test import taddons

from spendgate.call import get_call
from spendgate.gateway import make_addons
from spendgate.wire import PREFIX

FLOWS = Path(__file__).parent / "flows"
ROOT = Path(__file__).resolve().parents[1]
# Decisions that depend on the key's state or the agent's header, not on the request itself.
KEY_STATE = {"missing_vault_key", "unknown_key", "expired", "revoked", "raw_credential"}
CREDS = {"STRIPE_SECRET_KEY": "x", "OPENAI_API_KEY": "x", "ANTHROPIC_API_KEY": "x", "TWILIO_ACCOUNT_SID": "AC1",
         "TWILIO_AUTH_TOKEN": "x", "RESEND_API_KEY": "x", "POSTMARK_SERVER_TOKEN": "x"}


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


def test_replay_reaches_the_captured_decisions_and_costs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    # what the addons load before the first explicit configure
    monkeypatch.setenv("SPENDGATE_CONFIG", str(ROOT / "policies" / "example.yaml"))
    monkeypatch.setenv("SPENDGATE_DB", str(tmp_path / "ledger.db"))
    flows = load("demo.mitm")
    addons = make_addons()
    runtime, stages = addons[0], addons[1:]
    checked = 0
    with taddons.context(*addons) as tctx:
        tctx.configure(runtime, spendgate_config=str(ROOT / "policies" / "example.yaml"),
                       spendgate_db=str(tmp_path / "ledger.db"))
        tokens = {p: runtime.store.issue_key(p, 3600)[1] for p in runtime.state.config.policies}
        for captured in flows:
            seen = captured.metadata["spendgate"]
            if seen["reason"] in KEY_STATE:
                continue
            flow = captured.copy()
            response, flow.response, flow.metadata = captured.response, None, {}
            flow.request.scheme, flow.request.host, flow.request.port = "https", seen["host"], 443
            for name in ("authorization", "x-api-key", "x-postmark-server-token"):
                flow.request.headers.pop(name, None)
            flow.request.headers["X-Vault-Key"] = tokens[seen["policy"]]
            for stage in stages:
                if hasattr(stage, "request"):
                    stage.request(flow)
            call = get_call(flow)
            assert call is not None
            if seen["decision"] == "deny":
                assert flow.response is not None
                assert flow.response.headers["X-Spendgate-Reason"] == seen["reason"]
            else:
                assert flow.response is None, flow.response and flow.response.text
                flow.response = response
                body = response.raw_content or b""
                for stage in stages:
                    if hasattr(stage, "responseheaders"):
                        stage.responseheaders(flow)
                if callable(flow.response.stream):  # SSE: feed the captured stream in pieces
                    for i in range(0, len(body), 13):
                        flow.response.stream(body[i:i + 13])
                for stage in stages:
                    if hasattr(stage, "response"):
                        stage.response(flow)
                assert call.cost is not None
                assert call.cost.status == seen["cost_status"]
                assert call.cost.usd == Decimal(seen["cost_usd"]), (flow.request.path, call.cost)
            checked += 1
    assert checked >= 10
