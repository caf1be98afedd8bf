"""A streamed answer skips the secret regex only for chunks that cannot hold a secret.

``StreamScrubber`` runs the secret pattern only when its buffer holds one of
``secret_literals`` (the credential values, each vendor pattern's literals, each secret field's
name). These tests check the literals against generated matches of every pattern, and that a
scrubber with the shortcut sends exactly what one without it sends, on generated streams with
secrets anywhere (split across chunks too).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate.stages.scrub import (
    PATTERN_LITERALS,
    PATTERNS,
    SECRET_FIELDS,
    StreamScrubber,
    secret_literals,
    secret_pattern,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CREDENTIALS = {"openai": {"secret": "sk-proj-REALkeyNOTaTEST0001"}, "stripe": {"secret": "sk_test_51REALstripeKEY0000"},
               "twilio": {"account_sid": "AC0123456789", "secret": "twilioAuthToken99"}, "resend": {"secret": "short"}}


def test_every_vendor_pattern_has_its_literals() -> None:
    assert set(PATTERN_LITERALS) == set(PATTERNS)


@pytest.mark.parametrize("vendor", sorted(PATTERNS))
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_every_match_of_a_pattern_holds_one_of_its_literals(vendor: str, data: st.DataObject) -> None:
    match = data.draw(st.from_regex(re.compile(PATTERNS[vendor].encode()), fullmatch=True))
    assert any(lit in match for lit in PATTERN_LITERALS[vendor]), match


PIECES = st.sampled_from([
    b"data: {\"x\": 1}\n\n", b"hello ", b"\n", b"sk-", b"sk-ant-", b"re_", b"shp", b"_test_", b"k_live_",
    b"sk-proj-REALkeyNOTaTEST0001", b"sk_test_51REALstripeKEY0000", b"twilioAuthToken99", b"AC0123456789",
    b'"secret": "abc"', b'"secret":', b'"ApiTokens": ["a", "b"]', b"x" * 600, b"abcdefghijklmnopqrstuvwxyz0123",
    b"sk-abcdefghijklmnopqrstuvwxyz", b"re_abcdefghijklmnopq", b"shpat_abcdefghijklmnopq", b"rk_live_abcdefghijkl",
])


@SETTINGS
@given(st.sampled_from(["openai", "anthropic", "stripe", "twilio", "postmark", "resend", "shopify", "gemini"]),
       st.lists(PIECES, max_size=30), st.data())
def test_the_shortcut_sends_the_same_bytes(vendor: str, pieces: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    # b"" is the end of the stream (mitmproxy's last call): only there
    chunks = [c for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True) if (c := stream[a:b])] + [b""]
    pattern = secret_pattern(vendor, CREDENTIALS)
    literals = secret_literals(vendor, CREDENTIALS)
    assert literals is not None
    outs = []
    for lits in (None, literals):
        scrubber = StreamScrubber(pattern, None, None, None, lits)
        sent = b"".join(b"".join(scrubber(chunk)) for chunk in chunks)
        outs.append((sent, scrubber.count))
    assert outs[0] == outs[1]
    for creds in CREDENTIALS.values():
        for field, value in creds.items():
            if field != "account_sid" and len(value) >= 8:
                assert value.encode() not in outs[1][0]


def test_secret_fields_are_literals() -> None:
    literals = secret_literals("twilio", {})
    assert literals is not None
    assert all(b'"' + f.encode() + b'":' in literals for f in SECRET_FIELDS["twilio"])
