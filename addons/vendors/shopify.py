"""Shopify Admin API: {shop}.myshopify.com, token in ``X-Shopify-Access-Token``."""

from __future__ import annotations

import re

from .base import Vendor

VENDOR = Vendor(
    name="shopify",
    hosts=("*.myshopify.com",),
    key_headers=("x-shopify-access-token",),
    real_key=re.compile(r"^shp(at|ca|pa|ss)_[A-Za-z0-9]{8,}"),
    credential_headers=lambda c: {"x-shopify-access-token": c["secret"]},
)
