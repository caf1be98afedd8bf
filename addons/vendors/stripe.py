"""Stripe: api.stripe.com, key as Bearer (or Basic user), money in minor units."""

from __future__ import annotations

import re

from .base import Vendor, bearer

VENDOR = Vendor(
    name="stripe",
    hosts=("api.stripe.com", "files.stripe.com"),
    key_headers=("authorization",),
    real_key=re.compile(r"^(sk|rk)_(live|test)_[A-Za-z0-9]"),
    credential_headers=lambda c: {"authorization": bearer(c["secret"])},
)
