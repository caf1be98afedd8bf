"""What every fake vendor shares: the request/response values, the shared state, errors
raised by handlers, ids, and the deterministic token counts (see ``fakes`` for the rules)."""

from __future__ import annotations

import json
import math
import re
import secrets
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message
from typing import Any
from urllib.parse import parse_qsl

JSON = dict[str, Any]


DEFAULT_COMPLETION_TOKENS = 12


# The canned reply: one piece = one token = one stream delta.
REPLY_PIECES = (
    "Hello", " from", " the", " spendgate", " fake", " vendor", ":",
    " this", " reply", " is", " canned", ".",
)  # fmt: skip


assert len(REPLY_PIECES) == DEFAULT_COMPLETION_TOKENS


@dataclass
class State:
    """Everything the fake remembers; guarded by ``lock``."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    requests: list[JSON] = field(default_factory=list)
    payment_intents: dict[str, JSON] = field(default_factory=dict)
    refunded: dict[str, int] = field(default_factory=dict)  # payment_intent id -> amount
    customers: dict[str, JSON] = field(default_factory=dict)
    idempotency: dict[str, tuple[bytes, Response]] = field(default_factory=dict)
    twilio_messages: dict[str, JSON] = field(default_factory=dict)
    twilio_calls: dict[str, JSON] = field(default_factory=dict)
    twilio_price_after: dict[str, int] = field(default_factory=dict)  # SID → fetches before its price is set
    openai_batches: dict[str, JSON] = field(default_factory=dict)
    openai_files: dict[str, bytes] = field(default_factory=dict)
    anthropic_batches: dict[str, JSON] = field(default_factory=dict)
    counter: int = 0

    def next_number(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: Message
    body: bytes
    params: dict[str, str]  # named groups of the route's regex
    state: State

    def json(self) -> Any:
        return json.loads(self.body or b"null")

    def form(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key, value in parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True):
            out.setdefault(key, []).append(value)
        return out


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    events: list[bytes] | None = None  # an event stream, sent chunked, one chunk per event


class BadRequest(Exception):
    """A handler's way to answer with the vendor's 4xx error shape."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def json_response(obj: Any, status: int = 200, **headers: str) -> Response:
    return Response(status, json.dumps(obj).encode(), headers=dict(headers))


def sse_response(events: list[bytes]) -> Response:
    return Response(200, content_type="text/event-stream; charset=utf-8", events=events)


def sse_event(data: Any, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


def rand(n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def rand_hex(n: int) -> str:
    return secrets.token_hex((n + 1) // 2)[:n]


def now() -> int:
    return int(time.time())


def int_param(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadRequest(400, f"Invalid integer: {value}", param=name) from None


def text_of(value: Any) -> str:
    """All the text in a message content / input value, in order."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(text_of(v) for v in value)
    if isinstance(value, dict):
        if isinstance(value.get("text"), str):
            return value["text"]
        return text_of(value.get("content"))
    return ""


def text_tokens(text: str) -> int:
    """Deterministic stand-in for a tokenizer: one token per 4 characters."""
    return math.ceil(len(text) / 4)


def prompt_tokens(messages: Any, preamble: Any = None) -> int:
    """3 + per message (4 + its text tokens) + tokens of a system/instructions preamble."""
    items = messages if isinstance(messages, list) else [messages]
    total = 3 + text_tokens(text_of(preamble))
    for item in items:
        total += 4 + text_tokens(text_of(item))
    return total


def completion_tokens(limit: Any) -> int:
    if limit is None:
        return DEFAULT_COMPLETION_TOKENS
    return max(1, min(int_param(limit, "max_tokens"), DEFAULT_COMPLETION_TOKENS))


def reply_pieces(count: int) -> list[str]:
    return list(REPLY_PIECES[:count])


def generic_error(status: int, message: str | None = None, **_: Any) -> JSON:
    return {"error": {"type": "not_found" if status == 404 else "error", "message": message}}


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern[str]
    vendor: str
    handler: Callable[[Request], Response]


Handler = Callable[[Request], Response]


def route(method: str, regex: str, vendor: str, handler: Handler) -> Route:
    return Route(method, re.compile(regex), vendor, handler)


ID = r"(?P<id>[^/]+)"
