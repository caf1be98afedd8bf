"""Offline fake vendor APIs for tests, the demo and the benchmark: one local plain-HTTP server
impersonating Stripe, OpenAI, Anthropic, Twilio, Resend, Postmark and Shopify with
real-shaped responses. NOT part of spendgate: this package lives beside the tests and is
never in the wheel or the Docker image. One module per vendor (as ``spendgate.vendors``),
the server in ``fakes.server``.

It is the ``upstream`` of every vendor in tests and in the offline demo: the proxy in
front of it rewrites the host, so routing is by method + path only (the vendors' paths
do not collide). The vendors' official Python SDKs work against it unchanged.

    python -m fakes --port 9100 [--host 127.0.0.1]      # from the repository root

or, in tests::

    with FakeVendors().start() as fake:
        OpenAI(base_url=fake.url + "/v1", api_key="x")...
        fake.requests()  # what the "vendor" saw, oldest first

Test controls (request headers, and two control paths that are never recorded):

- ``X-Fake-Delay: <seconds>``  sleep before answering (slow vendor / timeouts).
- ``X-Fake-Status: <code>``    answer with that status and the vendor's error JSON shape;
  no state changes. Forced errors say ``x-should-retry: false`` / ``Stripe-Should-Retry:
  false`` so the SDKs do not retry them.
- ``X-Fake-Body: malformed``   200 with the first half of the normal body (truncated
  JSON, or a stream cut mid-way). State changes as for a normal answer.
- ``GET /__requests`` recorded requests as JSON (oldest first); ``DELETE /__requests``
  clears them; ``GET /__health`` answers ``{"ok": true}``.

Credentials are never validated, only recorded. Token counts are deterministic and the
same streamed or not: prompt/input tokens are a function of the text length of the
request, completion/output tokens are ``min(limit, 12)`` per choice (limit =
max_completion_tokens / max_tokens / max_output_tokens, if given).
"""

from fakes.base import prompt_tokens
from fakes.server import FakeVendors, free_port, main
from fakes.shopify import shopify_decimal
from fakes.stripe import stripe_params
from fakes.twilio import sms_segments

__all__ = ["FakeVendors", "free_port", "main", "prompt_tokens", "shopify_decimal", "sms_segments", "stripe_params"]
