"""An empty piece of a streamed response is not its end.

mitmproxy calls a ``response.stream`` callable with each piece of the body and, once the
message is complete, with ``b""``. Over HTTP/2 an upstream may also send an empty DATA frame in
the middle of a stream (legal, and used as padding or a keep-alive); mitmproxy passes it on as
``b""`` too, indistinguishable from the end. The gateway's stream callable (scrub, then meter)
holds back the tail of what it has read, so a secret cut across two pieces is still found, and
flushes that tail at the end: an empty frame mid-stream would flush half a secret to the agent,
and the rest would follow unscrubbed.

So :func:`install` wraps mitmproxy's streamed-response state (``HttpStream``) to drop an empty
``ResponseData`` before it reaches a callable ``response.stream``; it carries nothing, and the
HTTP/2 layer has already acknowledged its flow-control window. Only the end of the message calls
the callable with ``b""``. Like :mod:`wire`, the wrap is proved at start-up on mitmproxy's own
class (:func:`install` raises, and the gateway does not start, if the state it wraps is missing).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.proxy.layers.http import ResponseData

_installed = False


def _wrap(orig: Callable[[Any, Any], Iterator[Any]]) -> Callable[[Any, Any], Iterator[Any]]:
    @functools.wraps(orig)
    def state_stream_response_body(self: Any, event: Any) -> Iterator[Any]:
        if type(event) is ResponseData and not event.data and callable(self.flow.response.stream):
            return iter(())  # an empty frame mid-stream: nothing to pass on, and not the end
        return orig(self, event)

    state_stream_response_body.__wrapped__ = orig  # type: ignore[attr-defined]
    return state_stream_response_body


def install() -> None:
    """Wrap ``HttpStream.state_stream_response_body`` (idempotent). Raises RuntimeError if this
    mitmproxy has no such state: a stream's end could then not be told from an empty frame."""
    global _installed
    if _installed:
        return
    stream_cls = getattr(http_layer, "HttpStream", None)
    orig = getattr(stream_cls, "state_stream_response_body", None)
    if stream_cls is None or not callable(orig):
        raise RuntimeError("this mitmproxy has no HttpStream.state_stream_response_body; spendgate cannot "
                           "tell an empty HTTP/2 frame from the end of a streamed response")
    stream_cls.state_stream_response_body = _wrap(orig)  # type: ignore[method-assign]
    _installed = True
