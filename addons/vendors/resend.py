"""Resend: api.resend.com, key as Bearer; cost per email accepted."""

from __future__ import annotations

import re

from .base import Vendor, bearer

VENDOR = Vendor(
    name="resend",
    hosts=("api.resend.com",),
    key_headers=("authorization",),
    real_key=re.compile(r"^re_[A-Za-z0-9_]{8,}"),
    credential_headers=lambda c: {"authorization": bearer(c["secret"])},
)
