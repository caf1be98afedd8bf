"""Anthropic: api.anthropic.com, key in ``x-api-key``; cost = token usage × per-model prices."""

from __future__ import annotations

import re

from .base import Vendor

VENDOR = Vendor(
    name="anthropic",
    hosts=("api.anthropic.com",),
    key_headers=("x-api-key", "authorization"),
    real_key=re.compile(r"^sk-ant-[A-Za-z0-9_-]{8,}"),
    credential_headers=lambda c: {"x-api-key": c["secret"]},
)
