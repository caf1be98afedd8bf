"""OpenAI: api.openai.com, key as Bearer; cost = token usage × per-model prices."""

from __future__ import annotations

import re

from .base import Vendor, bearer

VENDOR = Vendor(
    name="openai",
    hosts=("api.openai.com",),
    key_headers=("authorization",),
    real_key=re.compile(r"^sk-(?!ant-)[A-Za-z0-9_-]{8,}"),
    credential_headers=lambda c: {"authorization": bearer(c["secret"])},
)
