"""Shared helpers for the vendor tests: the fixture corpus, request parsing, chunked feeding.

The corpus is ``tests/fixtures/vendors`` (a copy of the team's ``../shared/fixtures/vendors``,
with its ``SOURCES.md``), so every clone, CI's included, runs the cost tests against it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from spendgate.vendors.base import Cost, Estimate, Prices, RequestView, ResponseView, Vendor

FIXTURES = Path(__file__).parent / "fixtures" / "vendors"

needs_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"vendor fixture corpus not found at {FIXTURES}",
)


def fixture_path(vendor: str, name: str) -> Path:
    return FIXTURES / vendor / name


def raw(vendor: str, name: str) -> bytes:
    return fixture_path(vendor, name).read_bytes()


def load_json(vendor: str, name: str) -> Any:
    return json.loads(raw(vendor, name))


def parse_request(text: bytes) -> RequestView:
    """An HTTP/1.1 request as text (request line, headers, blank line, body) → RequestView.

    The fixture files end with a newline after the body that is not part of it.
    """
    crlf, lf = text.find(b"\r\n\r\n"), text.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):  # a CRLF head: the body (multipart, binary) is kept as is
        head, body = text[:crlf].replace(b"\r\n", b"\n"), text[crlf + 4:].removesuffix(b"\n")
    else:
        head, _, body = text.partition(b"\n\n")
        body = body.rstrip(b"\n")
    lines = head.decode().split("\n")
    method, target, _version = lines[0].split(" ", 2)
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RequestView(method, path, query, headers, body, headers.get("host", ""))


def load_response(vendor: str, name: str) -> ResponseView:
    """An HTTP/1.1 response as text (status line, headers, blank line, body) → ResponseView."""
    text = raw(vendor, name).replace(b"\r\n", b"\n")
    head, _, body = text.partition(b"\n\n")
    lines = head.decode().split("\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name_, _, value = line.partition(":")
        headers[name_.strip().lower()] = value.strip()
    return ResponseView(status, headers, body.rstrip(b"\n"))


def load_request(vendor: str, name: str) -> RequestView:
    return parse_request(raw(vendor, name))


def json_request(path: str, body: Any, method: str = "POST") -> RequestView:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return RequestView(method, path, "", {"content-type": "application/json"}, data)


def cost_of(vendor: Vendor, req: RequestView, body: bytes, prices: Prices | None = None,
            status: int = 200, estimate: Estimate | None = None) -> Cost:
    prices = prices or Prices()
    est = estimate if estimate is not None else vendor.estimate(req, prices)
    return vendor.cost(req, ResponseView(status, {"content-type": "application/json"}, body), prices, est)


def splits(data: bytes, how: str, seed: int = 0) -> Iterator[bytes]:
    """``data`` cut into chunks: "whole", "bytes" (one by one), "7" (every 7), "random"."""
    if how == "whole":
        yield data
    elif how == "bytes":
        for i in range(len(data)):
            yield data[i : i + 1]
    elif how == "random":
        rng = random.Random(seed)
        i = 0
        while i < len(data):
            step = rng.randint(1, 40)
            yield data[i : i + step]
            i += step
    else:
        step = int(how)
        for i in range(0, len(data), step):
            yield data[i : i + step]


SPLITS = ("whole", "7", "random", "bytes")


def stream_cost(vendor: Vendor, req: RequestView, data: bytes, how: str = "whole",
                prices: Prices | None = None, estimate: Estimate | None = None, seed: int = 0) -> Cost:
    prices = prices or Prices()
    est = estimate if estimate is not None else vendor.estimate(req, prices)
    meter = vendor.stream_meter(req, prices, est)
    assert meter is not None, "expected a stream meter for this request"
    for chunk in splits(data, how, seed):
        meter.feed(chunk)
    return meter.finish()


def per_million(tokens: int, rate: Any) -> Decimal:
    """``tokens`` × a table rate (USD per 1M tokens), exactly."""
    return Decimal(tokens) * Decimal(repr(rate) if isinstance(rate, float) else str(rate)) / 1_000_000


def rate(table: Mapping[str, Any], *keys: str) -> Decimal:
    """A rate from a (nested) price table as an exact Decimal."""
    value: Any = table
    for key in keys:
        value = value[key]
    return Decimal(repr(value) if isinstance(value, float) else str(value))
