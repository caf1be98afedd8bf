"""No paid call escapes a hold (issue 11 item 1), through the real addons in process.

A non-read to an endpoint a vendor module neither prices nor lists as free "moves money,
amount unknown": the policy's ``default_estimate_usd`` (else ``max_request_usd``) is held,
and without either the call is refused 402 ``unpriceable`` naming the field to set. Its
response is never settled at $0. Hypothesis draws endpoints nobody listed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.test import taddons, tflow

from spendgate.call import Call, get_call
from spendgate.gateway import make_addons
from spendgate.vendors import REGISTRY
from spendgate.vendors.base import READS, Prices, RequestView

HOSTS = {"stripe": "api.stripe.com", "openai": "api.openai.com", "anthropic": "api.anthropic.com",
         "twilio": "api.twilio.com", "resend": "api.resend.com", "postmark": "api.postmarkapp.com",
         "shopify": "shop.myshopify.com"}
EXTRA_HOSTS = {"twilio": ["verify.twilio.com", "studio.twilio.com"]}
KEY_HEADER = {"anthropic": "x-api-key", "postmark": "x-postmark-server-token",
              "shopify": "x-shopify-access-token"}
CREDS = {"SG_T_STRIPE": "sk_test_x", "SG_T_OPENAI": "sk-proj-x", "SG_T_ANTHROPIC": "sk-ant-x",
         "SG_T_SID": "AC1", "SG_T_TWILIO": "x", "SG_T_RESEND": "re_x", "SG_T_POSTMARK": "x",
         "SG_T_SHOPIFY": "shpat_x"}


def policy_yaml() -> str:
    vendors = {
        "stripe": {"secret": "env:SG_T_STRIPE"}, "openai": {"secret": "env:SG_T_OPENAI"},
        "anthropic": {"secret": "env:SG_T_ANTHROPIC"},
        "twilio": {"account_sid": "env:SG_T_SID", "secret": "env:SG_T_TWILIO"},
        "resend": {"secret": "env:SG_T_RESEND"}, "postmark": {"secret": "env:SG_T_POSTMARK"},
        "shopify": {"secret": "env:SG_T_SHOPIFY", "credential_hosts": ["shop.myshopify.com"]},
    }
    every = {"allow": ["* /**"]}

    def policy(extra: dict[str, Any]) -> dict[str, Any]:
        return {"vendors": {name: {**every, **extra} for name in vendors},
                "budget": {"key_usd": 100000}, "loop": {"repeats": 100000, "window": "1s"}}

    return json.dumps({  # JSON is YAML
        "version": 1, "vendors": vendors, "fx": {"EUR": 1.08},
        "policies": {"held": policy({"default_estimate_usd": 2}),
                     "capped": policy({"max_request_usd": 5}),
                     "bare": policy({})},
    })


@dataclass
class Pipeline:
    stages: list[Any]
    tokens: dict[str, str]

    def request(self, policy: str, vendor: str, method: str, path: str, body: bytes = b"",
                host: str | None = None) -> tuple[http.HTTPFlow, Call]:
        host = host or HOSTS[vendor]
        header = KEY_HEADER.get(vendor, "authorization")
        headers = {"Host": host, "Content-Type": "application/json", "X-Vault-Key": self.tokens[policy]}
        flow = tflow.tflow(req=http.Request.make(method, f"https://{host}{path}", body, headers))
        flow.client_conn.sni = host
        flow.request.headers.pop(header, None)
        for stage in self.stages:
            if hasattr(stage, "request") and flow.response is None:
                stage.request(flow)
        call = get_call(flow)
        assert call is not None
        return flow, call

    def respond(self, flow: http.HTTPFlow, status: int, body: bytes) -> Call:
        flow.response = http.Response.make(status, body, {"Content-Type": "application/json"})
        for stage in self.stages:
            if hasattr(stage, "responseheaders"):
                stage.responseheaders(flow)
        for stage in self.stages:
            if hasattr(stage, "response"):
                stage.response(flow)
        call = get_call(flow)
        assert call is not None
        return call


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    tmp = tmp_path_factory.mktemp("unpriced")
    config, db = tmp / "policy.yaml", tmp / "ledger.db"
    config.write_text(policy_yaml())
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**CREDS, "SPENDGATE_CONFIG": str(config), "SPENDGATE_DB": str(db)}.items():
            mp.setenv(k, v)
        addons = make_addons()
        runtime, stages = addons[0], addons[1:]
        with taddons.context(*addons) as tctx:
            if "spendgate_admin_listen" in tctx.options:
                tctx.options.update(spendgate_admin_listen="")
            tctx.configure(runtime, spendgate_config=str(config), spendgate_db=str(db))
            tokens = {p: runtime.store.issue_key(p, 3600)[1] for p in ("held", "capped", "bare")}
            yield Pipeline(stages, tokens)
            runtime.store.flush()


# Endpoints nobody priced or listed: each of these is a real paid API the modules do not model.
UNPRICED = [
    ("stripe", "POST", "/v1/identity/verification_sessions", None),
    ("stripe", "POST", "/v1/issuing/cards", None),
    ("openai", "POST", "/v1/containers", None),
    ("openai", "POST", "/v1/threads/thread_1/runs", None),
    ("twilio", "POST", "/2010-04-01/Accounts/AC1/IncomingPhoneNumbers.json", None),
    ("twilio", "POST", "/v2/Flows/FW1/Executions", "studio.twilio.com"),
    ("shopify", "POST", "/admin/api/2025-07/recurring_application_charges/1/usage_charges.json", None),
    ("resend", "POST", "/brand-new-paid-thing", None),
]


@pytest.mark.parametrize(("vendor", "method", "path", "host"), UNPRICED)
def test_an_unpriced_call_holds_the_policy_default_and_never_settles_at_zero(
        pipeline: Pipeline, vendor: str, method: str, path: str, host: str | None) -> None:
    flow, call = pipeline.request("held", vendor, method, path, b"{}", host)
    assert flow.response is None, flow.response and flow.response.text
    assert call.reservation is not None and call.estimated_nanos == 2 * 10**9
    assert "amount unknown" in call.estimate.basis
    call = pipeline.respond(flow, 200, b'{"id": "x_1", "object": "thing", "status": "ok"}')
    assert call.cost is not None and call.cost.status == "unknown"
    assert flow.response.headers.get("X-Spendgate-Cost-Usd") is None  # not $0


@pytest.mark.parametrize(("vendor", "method", "path", "host"), UNPRICED[:3])
def test_max_request_usd_is_the_fallback_hold(pipeline: Pipeline, vendor: str, method: str, path: str,
                                              host: str | None) -> None:
    flow, call = pipeline.request("capped", vendor, method, path, b"{}", host)
    assert flow.response is None
    assert call.estimated_nanos == 5 * 10**9 and call.reservation is not None


@pytest.mark.parametrize(("vendor", "method", "path", "host"), UNPRICED)
def test_without_a_default_an_unpriced_call_is_refused_402_naming_the_field(
        pipeline: Pipeline, vendor: str, method: str, path: str, host: str | None) -> None:
    flow, call = pipeline.request("bare", vendor, method, path, b"{}", host)
    assert flow.response is not None and flow.response.status_code == 402
    error = json.loads(flow.response.content)["error"]
    assert error["code"] == "unpriceable"
    assert f"policies.bare.vendors.{vendor}.default_estimate_usd" in error["message"]


@pytest.mark.parametrize(("vendor", "path"), [
    ("openai", "/v1/moderations"), ("openai", "/v1/files"), ("anthropic", "/v1/messages/count_tokens"),
    ("stripe", "/v1/customers"), ("twilio", "/2010-04-01/Accounts/AC1/Messages/SM1.json"),
    ("postmark", "/templates"), ("resend", "/domains"),
])
def test_listed_free_endpoints_pass_without_a_default(pipeline: Pipeline, vendor: str, path: str) -> None:
    flow, call = pipeline.request("bare", vendor, "POST", path, b"{}")
    assert flow.response is None and call.estimated_nanos == 0


# --- the property ---------------------------------------------------------------------------

PREFIXES = {"stripe": ["/v1"], "openai": ["/v1"], "anthropic": ["/v1"],
            "twilio": ["/2010-04-01/Accounts/AC1", "/v2/Services/VA1", "/v1"],
            "resend": [""], "postmark": [""], "shopify": ["/admin/api/2025-07", "/admin"]}
SEGMENT = st.text("abcdefghijklmnopqrstuvwxyz_-.ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=12)
NON_READS = st.sampled_from(["POST", "PUT", "PATCH", "DELETE"])
PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


@st.composite
def endpoints(draw: st.DrawFn, vendors: tuple[str, ...] = tuple(sorted(REGISTRY))) -> tuple[str, str, str]:
    vendor = draw(st.sampled_from(vendors))
    prefix = draw(st.sampled_from(PREFIXES.get(vendor, ["/v1", "/v1beta", "/api/v1", ""])))
    segments = draw(st.lists(SEGMENT.filter(lambda s: s not in (".", "..")), min_size=1, max_size=4))
    return vendor, draw(NON_READS), prefix + "/" + "/".join(segments)


@PROPERTY
@given(endpoint=endpoints(), body=st.sampled_from([b"", b"{}", b'{"amount": 100}', b"amount=100"]))
def test_every_non_read_is_free_listed_or_moves_money(endpoint: tuple[str, str, str], body: bytes) -> None:
    """No module lets a non-read through on a $0 "moves no money" estimate unless it lists it."""
    vendor, method, path = endpoint
    req = RequestView(method, path, "", {}, body)
    est = REGISTRY[vendor].estimate(req, Prices())
    assert est.moves_money or REGISTRY[vendor].is_free(req), (vendor, method, path, est)


@PROPERTY
@given(endpoint=endpoints(tuple(sorted(HOSTS))), status=st.sampled_from([200, 201, 202]),
       response=st.sampled_from([b"", b"{}", b"not json", b'{"id": "x", "status": "succeeded"}',
                                 b'{"object": "list", "data": []}', b'{"data": {}}']))
def test_an_unknown_paid_endpoint_yields_a_nonzero_hold_or_a_402(
        pipeline: Pipeline, endpoint: tuple[str, str, str], status: int, response: bytes) -> None:
    vendor, method, path = endpoint
    assume(method not in READS)
    assume(REGISTRY[vendor].unpriced(RequestView(method, path, "", {}, b"{}"), Prices()))
    flow, call = pipeline.request("bare", vendor, method, path, b"{}")
    assert flow.response is not None and flow.response.status_code == 402
    assert call.reason == "unpriceable"
    flow, call = pipeline.request("held", vendor, method, path, b"{}")
    assert flow.response is None and call.reservation is not None and call.reservation.nanos > 0
    call = pipeline.respond(flow, status, response)
    assert call.cost is not None and call.cost.status != "zero", call.cost

