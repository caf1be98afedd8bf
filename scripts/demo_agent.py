"""A sample agent: the vendors' own SDKs, a vault key, and HTTPS_PROXY. Nothing else.

Run by scripts/demo.py with only HTTPS_PROXY, SSL_CERT_FILE/REQUESTS_CA_BUNDLE and the
vault keys in its environment.
"""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import stripe
from anthropic import Anthropic
from openai import OpenAI
from twilio.rest import Client as Twilio

warnings.simplefilter("ignore", DeprecationWarning)  # SDK notices about model names
BILLING, SUPPORT = os.environ["BILLING_KEY"], os.environ["SUPPORT_KEY"]
stripe.ca_bundle_path = os.environ["SSL_CERT_FILE"]  # stripe-python pins its own CA bundle


def refusal(e: Exception) -> tuple[str, str]:
    """The gateway's refusal code and message, as each SDK surfaces them (without the SDK's own
    "Error code: 403 - {...}" wrapping)."""
    headers = getattr(e, "headers", None) or getattr(getattr(e, "response", None), "headers", None) or {}
    body = getattr(e, "body", None)
    if isinstance(e, httpx.HTTPStatusError):
        body = e.response.json()
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    code = headers.get("x-spendgate-reason") or getattr(getattr(e, "error", None), "code", None) or ""
    msg = getattr(e, "user_message", None) or (body.get("message") if isinstance(body, dict) else None) or str(e)
    return code or (body.get("code", "") if isinstance(body, dict) else ""), str(msg)


def step(what: str, call: Callable[[], Any]) -> None:
    try:
        result = call()
        print(f"  ✔ {what}: {result}")
    except Exception as e:  # the SDKs surface the gateway's message
        code, msg = refusal(e)
        print(f"  ✘ {what}: refused [{code}] {msg}")


stripe_client = stripe.StripeClient(BILLING, max_network_retries=0)
pi = stripe_client.v1.payment_intents
def usd(value: str | None) -> str:
    """A header's USD amount as money: cents from a cent up, the significant digits below."""
    if value is None:
        return "?"
    amount = Decimal(value)
    return f"${amount:.2f}" if amount >= Decimal("0.01") or amount == 0 else f"${amount.normalize():f}"


def spent(obj: Any) -> str:
    """What the gateway told the agent: cost of this call and budget left."""
    h = obj.last_response.headers
    return (f"{obj.status}, cost {usd(h.get('x-spendgate-cost-usd'))}, "
            f"budget left {usd(h.get('x-spendgate-budget-remaining-usd'))}")


step("Stripe: charge $20.00", lambda: spent(pi.create(params={
    "amount": 2000, "currency": "usd", "confirm": True, "payment_method": "pm_card_visa"})))
step("Stripe: charge €15.00 (fx)", lambda: spent(pi.create(params={
    "amount": 1500, "currency": "eur", "confirm": True, "payment_method": "pm_card_visa"})))
step("Stripe: charge ¥1500 (zero-decimal)", lambda: spent(pi.create(params={
    "amount": 1500, "currency": "jpy", "confirm": True, "payment_method": "pm_card_visa"})))
step("Stripe: 3-D Secure card (requires_action: nothing moved)", lambda: spent(pi.create(params={
    "amount": 3000, "currency": "usd", "confirm": True, "payment_method": "pm_card_threeDSecure2Required"})))
step("Stripe: charge $500 (over max_request_usd 200)", lambda: pi.create(params={"amount": 50000, "currency": "usd"}))
step("Stripe: charge in CHF (no fx rate)", lambda: pi.create(params={"amount": 1000, "currency": "chf"}))
step("Stripe: list customers (not allowed)", lambda: stripe_client.v1.customers.list())
step("Stripe: attach a payment method (denied)", lambda: stripe_client.v1.payment_methods.attach(
    "pm_1", params={"customer": "cus_1"}))

llm = OpenAI(api_key=SUPPORT, max_retries=0)
def llm_cost(raw: Any) -> str:
    usage = raw.parse().usage
    return (f"{usage.prompt_tokens} in / {usage.completion_tokens} out tokens, "
            f"cost {usd(raw.headers.get('x-spendgate-cost-usd'))}")


step("OpenAI: chat completion", lambda: llm_cost(llm.chat.completions.with_raw_response.create(
    model="gpt-4o-mini", max_tokens=20, messages=[{"role": "user", "content": "Say hi"}])))
def streamed() -> str:
    chunks = list(llm.chat.completions.create(
        model="gpt-4o-mini", max_tokens=20, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Say hi"}]))
    usage = chunks[-1].usage
    return (f"{len(chunks)} chunks, {usage.prompt_tokens} in / {usage.completion_tokens} out tokens "
            "(priced when the stream ends: see the ledger below)")


step("OpenAI: the same, streamed", streamed)
step("OpenAI: a model the policy does not allow", lambda: llm.chat.completions.create(
    model="o1-pro", max_tokens=20, messages=[{"role": "user", "content": "Say hi"}]))
step("Anthropic: message", lambda: (lambda raw: f"{raw.parse().usage.output_tokens} out tokens, cost "
                                    f"{usd(raw.headers.get('x-spendgate-cost-usd'))}")(
    Anthropic(api_key=SUPPORT, max_retries=0).messages.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hi"}])))
def mcp_tools() -> str:
    """An MCP server through the gateway, with the official MCP SDK: list, a priced call, a refused one."""
    import asyncio

    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.exceptions import MCPError

    async def main() -> str:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {SUPPORT}"}, timeout=15)
        async with http, Client(streamable_http_client("https://mcp.docs.example/mcp", http_client=http)) as c:
            listed = [t.name for t in (await c.list_tools()).tools]
            await c.call_tool("web_search", {"q": "spendgate"})
            try:
                await c.call_tool("delete_index", {})
                refused = "delete_index ran!"
            except MCPError as e:
                refused = f"delete_index refused [{(e.error.data or {}).get('code')}]"
        return f"tools offered {listed}; web_search called; {refused}"

    return asyncio.run(main())


step("MCP: tools/list, a priced tools/call, a denied one", mcp_tools)
step("Twilio: SMS (price not known yet: estimated)", lambda: Twilio("AC" + "0" * 32, SUPPORT).messages.create(
    to="+15551230000", from_="+15559870000", body="Your order shipped").status)
step("OpenAI with the billing key (vendor not in its policy)", lambda: OpenAI(api_key=BILLING, max_retries=0)
     .chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]))
step("OpenAI with a real key instead of a vault key", lambda: OpenAI(api_key="sk-proj-" + "a" * 40, max_retries=0)
     .chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]))
step("Stripe with no key at all", lambda: httpx.get("https://api.stripe.com/v1/payment_intents/pi_1",
                                                   proxy=os.environ["HTTPS_PROXY"]).raise_for_status())

print("  … an operator revokes the billing key:")
out = subprocess.run([os.environ["SPENDGATE"], "keys", "revoke", os.environ["BILLING_KEY_ID"],
                      "--db", os.environ["SPENDGATE_DB"]], capture_output=True, text=True, check=True)
print(f"    $ spendgate keys revoke {os.environ['BILLING_KEY_ID']}\n    {out.stdout.strip()}")
step("Stripe: charge $20.00 again (revoked key)", lambda: pi.create(params={"amount": 2000, "currency": "usd"}))
