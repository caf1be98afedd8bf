"""The in-process gateway for stage tests: a policy and the ``gateway`` fixture's helpers.

Tests get a fresh :class:`spendgate.pipeline.Pipeline` (its own Runtime, addons, ledger) from
the ``pipeline`` fixture in ``conftest.py``; nothing is shared between tests, so no test reads
counters before and after. Assertions are on what an agent and a vendor would observe: the status,
``X-Spendgate-Reason``, the ledger row, the request that would have been forwarded.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from harness import REAL_CREDENTIALS, SECRET_VALUES

from spendgate.pipeline import Outcome, response, vendor_flow

__all__ = ["POLICY", "REAL_CREDENTIALS", "SECRET_VALUES", "assert_clean", "basic", "intent", "response",
           "stripe_post", "vendor_flow"]

# Vendors go to their real hosts (no upstream:) except postmark, which goes to a staging URL.
POLICY = """\
version: 1
vendors:
  stripe:    {secret: env:STRIPE_SECRET_KEY}
  openai:    {secret: env:OPENAI_API_KEY}
  anthropic: {secret: env:ANTHROPIC_API_KEY}
  twilio:    {account_sid: env:TWILIO_ACCOUNT_SID, secret: env:TWILIO_AUTH_TOKEN}
  resend:    {secret: env:RESEND_API_KEY}
  postmark:  {secret: env:POSTMARK_SERVER_TOKEN, upstream: "http://127.0.0.1:9"}
  shopify:   {secret: env:SHOPIFY_ACCESS_TOKEN, credential_hosts: [shop-1.myshopify.com]}
fx: {EUR: 1.08}
policies:
  billing:
    vendors:
      stripe:
        allow: ["POST /v1/payment_intents", "GET /v1/payment_intents/*", "POST /v1/payment_intents/*/confirm",
                "GET /v1/customers/**"]
        deny: ["* /v1/payment_methods/**", "GET /v1/customers/*/secrets"]
        approve: ["POST /v1/transfers"]
        max_request_usd: 200
        default_estimate_usd: 25
    budget: {key_usd: 500, key_daily_usd: 450, policy_daily_usd: 600}
    loop: {repeats: 3, window: 10m}
  everything:
    vendors:
      stripe: {allow: ["* /**"]}
      openai: {allow: ["* /**"]}
      anthropic: {allow: ["* /**"]}
      twilio: {allow: ["* /**"]}
      resend: {allow: ["* /**"]}
      postmark: {allow: ["* /**"]}
      shopify: {allow: ["* /**"]}
  limited:
    vendors:
      stripe: {allow: ["GET /v1/payment_intents/*"]}
    rate: 2/minute
  shadow:
    mode: report
    vendors:
      stripe: {allow: ["GET /v1/payment_intents/*"]}
egress: {default: allow, allow: [], deny: []}
"""


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def intent(amount: int, currency: str = "usd", status: str = "succeeded") -> Any:
    """A Stripe payment intent response."""
    return response(200, json.dumps({"id": "pi_1", "object": "payment_intent", "amount": amount,
                                     "amount_received": amount if status == "succeeded" else 0,
                                     "currency": currency, "status": status}), {"Request-Id": "req_123"})


def stripe_post(token: str, path: str = "/v1/payment_intents", body: str = "amount=1000&currency=usd",
                **headers: str) -> Any:
    return vendor_flow("POST", f"https://api.stripe.com{path}",
                       {"Authorization": f"Bearer {token}", **headers}, body)


def assert_clean(out: Outcome) -> None:
    """No vault key and no real credential anywhere a person can see the flow (mitmweb, saved
    flows) or in its ledger row."""
    flow = out.flow
    seen = [flow.request.path, *flow.request.headers.values(), flow.request.get_text(strict=False) or ""]
    if flow.response is not None:
        seen += [*flow.response.headers.values(), flow.response.get_text(strict=False) or ""]
    seen.append(json.dumps(out.row))
    for text in seen:
        assert "vk_" not in text.replace("vk_[redacted]", ""), text
        for secret in SECRET_VALUES:
            assert secret not in text, text
