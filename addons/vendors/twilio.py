"""Twilio: Basic auth AccountSid:AuthToken; the account SID is also in the URL path."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping

from .base import Vendor

_ACCOUNT_PATH = re.compile(r"^(/\d{4}-\d{2}-\d{2}/Accounts/)([^/]+)")


def _basic(creds: Mapping[str, str]) -> dict[str, str]:
    pair = f"{creds['account_sid']}:{creds['secret']}".encode()
    return {"authorization": "Basic " + base64.b64encode(pair).decode()}


def rewrite_path(path: str, creds: Mapping[str, str]) -> str:
    """Put the real account SID in ``/2010-04-01/Accounts/{Sid}/…`` (agents may send any)."""
    return _ACCOUNT_PATH.sub(lambda m: m.group(1) + creds["account_sid"], path, count=1)


VENDOR = Vendor(
    name="twilio",
    hosts=("api.twilio.com", "*.twilio.com"),
    key_headers=("authorization",),
    # An auth token or API-key secret: 32 hex characters.
    real_key=re.compile(r"^[0-9a-fA-F]{32}$"),
    credential_fields=("account_sid", "secret"),
    credential_headers=_basic,
    rewrite_path=rewrite_path,
)
