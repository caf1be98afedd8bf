"""The policy verdict as a table, like smokescreen's ``acl_test.go``: a YAML policy × a request → a verdict.

``policy.decide`` is pure (no mitmproxy, no state), so every row is one call. What the policy's
mode does with a Deny (refuse, or record ``would_deny``) is ``tests/test_report_mode.py``.
A new rule kind adds its rows here.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from spendgate.policy import Allow, Approve, Deny, Verdict, decide, parse_config

FILE = """\
version: 1
vendors:
  stripe: {{secret: env:STRIPE_SECRET_KEY}}
  openai: {{secret: env:OPENAI_API_KEY}}
policies:
  p:
    {policy}
"""

STRIPE = """vendors:
      stripe:
        allow: ["GET /v1/charges/*", "POST /v1/payment_intents", "* /v1/customers/**", "post /v1/refunds"]
        deny: ["* /v1/customers/*/sources/**"]
        approve: ["POST /v1/transfers", "* /v1/customers/*/tax_ids"]"""

NO_RULE = "endpoint_not_allowed"


def no_rule(method: str, path: str) -> Deny:
    return Deny(NO_RULE, f"{method} {path} is not allowed by policy 'p'")


def ambiguous(method: str, path: str, segment: str) -> Deny:
    return Deny(NO_RULE, f"{method} {path}: ambiguous path segment {segment!r}")


# (policy under `policies.p:`, vendor, method, path as sent, expected verdict)
CASES: list[tuple[str, str, str, str, str, Verdict]] = [
    ("exact allow", STRIPE, "stripe", "POST", "/v1/payment_intents", Allow("POST /v1/payment_intents")),
    ("one segment", STRIPE, "stripe", "GET", "/v1/charges/ch_1", Allow("GET /v1/charges/*")),
    ("* is one segment only", STRIPE, "stripe", "GET", "/v1/charges/ch_1/refunds",
     no_rule("GET", "/v1/charges/ch_1/refunds")),
    ("* needs a segment", STRIPE, "stripe", "GET", "/v1/charges", no_rule("GET", "/v1/charges")),
    ("trailing ** and any method", STRIPE, "stripe", "DELETE", "/v1/customers/cus_1",
     Allow("* /v1/customers/**")),
    ("** matches nothing too", STRIPE, "stripe", "GET", "/v1/customers", Allow("* /v1/customers/**")),
    ("method of the rule, any case", STRIPE, "stripe", "POST", "/v1/refunds", Allow("post /v1/refunds")),
    ("method of the request, any case", STRIPE, "stripe", "post", "/v1/payment_intents",
     Allow("POST /v1/payment_intents")),
    ("wrong method", STRIPE, "stripe", "GET", "/v1/payment_intents", no_rule("GET", "/v1/payment_intents")),
    ("the query is not the path", STRIPE, "stripe", "GET", "/v1/charges/ch_1?expand[]=customer",
     Allow("GET /v1/charges/*")),
    ("no rule matches", STRIPE, "stripe", "POST", "/v1/payouts", no_rule("POST", "/v1/payouts")),
    ("deny wins over allow", STRIPE, "stripe", "POST", "/v1/customers/cus_1/sources/src_1",
     Deny(NO_RULE, "POST /v1/customers/cus_1/sources/src_1 is denied by '* /v1/customers/*/sources/**'",
          "* /v1/customers/*/sources/**")),
    ("deny matched decoded", STRIPE, "stripe", "GET", "/v1/customers/cus_1/%73ources",
     Deny(NO_RULE, "GET /v1/customers/cus_1/%73ources is denied by '* /v1/customers/*/sources/**'",
          "* /v1/customers/*/sources/**")),
    ("approve", STRIPE, "stripe", "POST", "/v1/transfers", Approve("POST /v1/transfers")),
    ("approve wins over allow", STRIPE, "stripe", "GET", "/v1/customers/cus_1/tax_ids",
     Approve("* /v1/customers/*/tax_ids")),
    ("empty segments are one separator", STRIPE, "stripe", "GET", "//v1//charges/ch_1/",
     Allow("GET /v1/charges/*")),
    ("dot dot", STRIPE, "stripe", "GET", "/v1/charges/../customers", ambiguous("GET", "/v1/charges/../customers", "..")),
    ("encoded dot dot", STRIPE, "stripe", "GET", "/v1/%2e%2e/charges", ambiguous("GET", "/v1/%2e%2e/charges", "%2e%2e")),
    ("encoded slash", STRIPE, "stripe", "GET", "/v1/charges%2Fch_1", ambiguous("GET", "/v1/charges%2Fch_1", "charges%2Fch_1")),
    ("encoded backslash", STRIPE, "stripe", "GET", "/v1/charges/a%5cb", ambiguous("GET", "/v1/charges/a%5cb", "a%5cb")),
    ("NUL", STRIPE, "stripe", "GET", "/v1/charges/%00", ambiguous("GET", "/v1/charges/%00", "%00")),
    ("a vendor the policy does not list", STRIPE, "openai", "POST", "/v1/chat/completions",
     Deny("vendor_not_allowed", "policy 'p' does not allow openai")),
    ("a vendor with no rules allows nothing", "vendors: {openai: {}}", "openai", "POST", "/v1/chat/completions",
     no_rule("POST", "/v1/chat/completions")),
    ("report mode does not change the verdict", "mode: report\n    " + STRIPE, "stripe", "POST", "/v1/payouts",
     no_rule("POST", "/v1/payouts")),
]


@pytest.mark.parametrize(("policy", "vendor", "method", "path", "expected"),
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_decide(policy: str, vendor: str, method: str, path: str, expected: Verdict) -> None:
    config = parse_config(FILE.format(policy=policy))
    assert decide(config, "p", vendor, method, path) == expected


def test_a_policy_that_no_longer_exists_refuses_and_is_enforced() -> None:
    config = parse_config(FILE.format(policy="mode: report\n    " + STRIPE))
    assert decide(config, "gone", "stripe", "GET", "/v1/charges/ch_1") == \
        Deny("vendor_not_allowed", "policy 'gone' no longer exists")
    assert config.policy_mode("gone") == "enforce"
    assert config.policy_mode("p") == "report"


def test_the_policy_layer_imports_no_mitmproxy() -> None:
    code = ("import sys, spendgate.policy; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'mitmproxy'); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
