"""Postmark: api.postmarkapp.com, server token in ``X-Postmark-Server-Token``; cost per email."""

from __future__ import annotations

import re

from .base import Vendor

VENDOR = Vendor(
    name="postmark",
    hosts=("api.postmarkapp.com",),
    key_headers=("x-postmark-server-token", "x-postmark-account-token"),
    # Postmark tokens are UUIDs.
    real_key=re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"),
    credential_headers=lambda c: {"x-postmark-server-token": c["secret"]},
)
