"""The fast SSE path agrees with the straightforward one, on streams nobody tuned it to.

The parser splits chunks with ``bytes.split`` and keeps bytes; the OpenAI, Anthropic and Gemini
meters skip the JSON parse of events that cannot change what they keep. The reference is the
parser as it was (``sse_reference.py``: line by line, every line decoded) feeding the same meters
with the skip switched off (every event parsed). Streams are generated: every line ending (LF,
CRLF, CR), ``data:`` with and without a space, multi-line data (indented JSON), comments,
``id:``/``retry:`` lines, non-ASCII text raw and ``\\u``-escaped, invalid UTF-8, keys and quotes
inside the content, usage in the last chunk, no usage, error events, the model changing or null,
truncated streams; cut into random chunks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sse_reference import ReferenceSSEParser
from vendor_fixtures import FIXTURES, json_request, parse_request

from spendgate.vendors import REGISTRY
from spendgate.vendors._sse import NULL, SSEParser, quiet
from spendgate.vendors.base import Cost, Prices, RequestView

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- byte streams ---------------------------------------------------------------------------------

TEXT = st.sampled_from(["", "hi", " word", "é€😀", 'say "usage": {"x": 1}', "\\u0075 \\", "\n", "data: x",
                        '"model":"gpt-x"', "\"error\"", "message_stop", '{"type": "error"}', "usageMetadata"])
LINE = st.one_of(
    st.builds(lambda t: b"data: " + t.encode(), TEXT),
    st.builds(lambda t: b"data:" + t.encode(), TEXT),
    st.builds(lambda t: b"data:  " + t.encode(), TEXT),
    st.sampled_from([b"data", b"data:", b"event: message_start", b"event:ping", b"event", b": keep-alive", b":",
                     b"id: 7", b"retry: 10", b"junk", b"data: \xe2\x82", b"data: \xac\xff ok", b"\xef\xbb\xbfdata: bom",
                     b"data: [DONE]", b"", b"", b""]),
    st.binary(max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b),
    st.builds(lambda n: b"data: " + b"x" * n, st.integers(30, 90)),  # over the small max_line below
)
ENDING = st.sampled_from([b"\n", b"\r\n", b"\r"])


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at random places (empty chunks too: mitmproxy ends a stream with one), or after
    each event (as a vendor flushes them: the parser's one-event-per-chunk path)."""
    if draw(st.booleans()):
        return [part + b"\n\n" for part in data.split(b"\n\n")[:-1]] + [data.split(b"\n\n")[-1]]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    pieces, last = [], 0
    for cut in cuts:
        pieces.append(data[last:cut])
        last = cut
    return [*pieces, data[last:]]


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    lines = draw(st.lists(st.tuples(LINE, ENDING), max_size=25))
    data = b"".join(line + end for line, end in lines)
    if draw(st.booleans()):  # truncated anywhere
        data = data[: draw(st.integers(0, len(data)))]
    return data


def events_of(parser: Any, chunks: list[bytes]) -> list[tuple[str, str, bool]]:
    out = []
    for chunk in chunks:
        out += parser.feed(chunk)
    out += parser.close()
    return [(e.name, e.data, e.truncated) for e in out]


@SETTINGS
@given(st.data(), streams(), st.sampled_from([(1 << 20, 64 << 10), (40, 10), (8, 3)]))
def test_parser_agrees_with_the_line_by_line_reference(data: st.DataObject, stream: bytes,
                                                       limits: tuple[int, int]) -> None:
    chunks = data.draw(chunked(stream))
    assert events_of(SSEParser(*limits), chunks) == events_of(ReferenceSSEParser(*limits), chunks)


@pytest.mark.parametrize("chunks", [
    [b"data: " + b"x" * 50 + b"\n\n"],  # one whole event per chunk (the fast path), over max_line
    [b"data: " + b"x" * 33 + b"\n\n"], [b"data: " + b"x" * 34 + b"\n\n"], [b"data: " + b"x" * 35 + b"\n\n"],
    [b"event: a\n", b"data: 1\n\n", b"data: 2\n\n"],  # a name pending from the chunk before
    [b"data: 1\r", b"\n\n", b"data: 2\n\n"],  # a CRLF split: the LF is not a second line end
    [b"data: 1\n", b"data: 2\n\n"],  # data pending: joined, not two events
    [b"data: 1\n\n\n"], [b"data: 1\n\ndata: 2\n\n"], [b"data:1\n\n"], [b"data: \n\n"],
])
def test_whole_event_chunks(chunks: list[bytes]) -> None:
    assert events_of(SSEParser(40, 10), chunks) == events_of(ReferenceSSEParser(40, 10), chunks)


@pytest.mark.parametrize("limits", [(40, 10), (100, 30)])
def test_many_data_lines_over_the_limit_are_cut_as_text(limits: tuple[int, int]) -> None:
    """The data of one event over max_line keeps its tail in characters (multi-byte text)."""
    stream = b"".join(b"data: " + "€é".encode() * (i % 9) + b"x\r\n" for i in range(40)) + b"\n"
    for size in (1, 3, 7, len(stream)):
        chunks = [stream[i: i + size] for i in range(0, len(stream), size)]
        assert events_of(SSEParser(*limits), chunks) == events_of(ReferenceSSEParser(*limits), chunks)


# --- quiet() ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "worth_parsing"), [
    (b'{"a":1}', False),
    (b'{"usage":null}', False),
    (b'{"usage": null,"x":{"usage":null}}', False),
    (b'{"usage":null,"x":{"usage":{"a":1}}}', True),  # nested: still not "only null"
    (b'{"usage" : null}', True),  # an unusual spacing: not recognised, so parsed
    (b'{"usage":{"prompt_tokens":1}}', True),
    (b'{"x":"\\"usage\\": 1"}', False),  # inside a string the quotes are escaped
    (b'{"x\\"usage":1}', True),  # an escaped quote then a real one: parsed, to be safe
    (b'{"us\\u0061ge":{"a":1}}', True),  # a key with an escape could be any key
    (b'{"type":"response.completed"}', True),
    (b'{"model":"m1","usage":null}', False),
    (b'{"model":"m10"}', True),
    (b'{"model":"m1\\"}', True),
    (b'{"model":null}', False),
])
def test_quiet(raw: bytes, worth_parsing: bool) -> None:
    keys = ((b'"usage"', NULL), (b'"model"', (*NULL, b':"m1"')))
    assert quiet(raw, (b"\\u", b'"response.completed"'), keys) is not worth_parsing


# --- meters: fast (skips events) vs reference (parses every event, reference parser) -------------


def reference_meter(vendor: str, req: RequestView, prices: Prices) -> Any:
    meter = REGISTRY[vendor].stream_meter(req, prices, REGISTRY[vendor].estimate(req, prices))
    assert meter is not None
    meter._parser = ReferenceSSEParser()
    meter._quiet = lambda *_: False
    return meter


def costs(vendor: str, req: RequestView, chunks: list[bytes]) -> tuple[Cost, Cost]:
    prices = Prices()
    fast = REGISTRY[vendor].stream_meter(req, prices, REGISTRY[vendor].estimate(req, prices))
    ref = reference_meter(vendor, req, prices)
    assert fast is not None
    for chunk in chunks:
        fast.feed(chunk)
        ref.feed(chunk)
    return fast.finish(), ref.finish()


ENCODINGS: list[Callable[[Any], str]] = [
    lambda o: json.dumps(o, separators=(",", ":"), ensure_ascii=False),  # OpenAI's own
    lambda o: json.dumps(o, ensure_ascii=False),  # ", " and ": "
    json.dumps,  # \u escapes for non-ASCII
    lambda o: json.dumps(o, indent=1),  # multi-line: one data line per line
    lambda o: json.dumps(o, separators=(" , ", " : ")),
    # every string's first letter as a \u escape: keys and type names the fast check cannot read
    lambda o: re.sub(r'"([a-z])', lambda m: f'"\\u{ord(m.group(1)):04x}', json.dumps(o)),
]


@st.composite
def sse_stream(draw: st.DrawFn, objects: list[Any]) -> bytes:
    """Objects as SSE events: each with its own encoding, ``data:`` spacing, event name, ending."""
    out = []
    for obj in objects:
        end = draw(ENDING)
        text = obj if isinstance(obj, str) else draw(st.sampled_from(ENCODINGS))(obj)
        prefix = draw(st.sampled_from([b"data: ", b"data:"]))
        lines = [prefix + line.encode() for line in text.split("\n")]
        if isinstance(obj, dict) and isinstance(obj.get("type"), str) and draw(st.booleans()):
            lines.insert(0, b"event: " + obj["type"].encode())
        if draw(st.integers(0, 9)) == 0:
            lines.insert(0, b": keep-alive")
        out.append(end.join(lines) + end + end)
    data = b"".join(out)
    if draw(st.integers(0, 4)) == 0:  # truncated stream
        data = data[: draw(st.integers(0, len(data)))]
    return data


MODEL = st.sampled_from(["gpt-4o-mini-2024-07-18", "gpt-4o", "o3-mini", "", None, 7, "gpt-4o\u00e9"])
USAGE = st.one_of(st.none(), st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 5000), "completion_tokens": st.integers(0, 5000)},
    optional={"prompt_tokens_details": st.fixed_dictionaries({"cached_tokens": st.integers(0, 100)}),
              "completion_tokens_details": st.just({"reasoning_tokens": 3})}))


@st.composite
def chat_chunk(draw: st.DrawFn, model: str) -> Any:
    kind = draw(st.sampled_from(["delta"] * 6 + ["finish", "usage", "error", "done", "model", "odd"]))
    head: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
                            "service_tier": draw(st.sampled_from(["default", "default", "flex", None])),
                            "system_fingerprint": "fp_1"}
    if draw(st.booleans()):
        head["usage"] = None  # stream_options.include_usage sends "usage": null on every chunk
    if kind == "delta":
        return {**head, "choices": [{"index": 0, "delta": {"content": draw(TEXT)}, "finish_reason": None}]}
    if kind == "finish":
        return {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    if kind == "usage":
        return {**head, "choices": [], "usage": draw(USAGE)}
    if kind == "error":
        return {"error": {"message": "overloaded", "type": "server_error", "code": draw(st.sampled_from([None, "x"]))}}
    if kind == "model":
        return {**head, "model": draw(MODEL), "choices": []}
    if kind == "odd":  # the keys the meter looks at, nested or null where it does not look
        return draw(st.sampled_from([{**head, "choices": [{"delta": {"usage": {"prompt_tokens": 9}}}]},
                                     {**head, "error": None, "choices": []}, {"model": None},
                                     {**head, "service_tier": "priority", "choices": []}, [1, 2], "junk"]))
    return "[DONE]"


CHAT = json_request("/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 50, "stream": True})


@SETTINGS
@given(st.data(), st.sampled_from(["gpt-4o-mini-2024-07-18", "gpt-4o"]))
def test_openai_chat_meter_agrees(data: st.DataObject, model: str) -> None:
    objects = data.draw(st.lists(chat_chunk(model), max_size=30))
    stream = data.draw(sse_stream(objects))
    fast, ref = costs("openai", CHAT, data.draw(chunked(stream)))
    assert fast == ref


GROQ = json_request("/openai/v1/chat/completions", {"model": "llama-3.3-70b-versatile", "max_tokens": 50,
                                                     "stream": True})


@SETTINGS
@given(st.data(), st.sampled_from(["llama-3.3-70b-versatile", "gpt-4o-mini-2024-07-18"]))
def test_openai_compatible_meter_agrees(data: st.DataObject, model: str) -> None:
    """groq: the OpenAI meter inside, plus the provider's own usage block read by a second parser."""
    objects = data.draw(st.lists(chat_chunk(model), max_size=30))
    stream = data.draw(sse_stream(objects))
    prices = Prices()
    vendor = REGISTRY["groq"]
    fast = vendor.stream_meter(GROQ, prices, vendor.estimate(GROQ, prices))
    ref = vendor.stream_meter(GROQ, prices, vendor.estimate(GROQ, prices))
    assert fast is not None and ref is not None
    for outer in (ref, ref._inner):
        outer._parser = ReferenceSSEParser()
        outer._quiet = lambda *_: False
    for chunk in data.draw(chunked(stream)):
        fast.feed(chunk)
        ref.feed(chunk)
    assert fast.finish() == ref.finish()


RESPONSES = json_request("/v1/responses", {"model": "gpt-4o", "max_output_tokens": 100, "stream": True})


@st.composite
def responses_event(draw: st.DrawFn) -> Any:
    response = {"id": "resp_1", "object": "response", "model": draw(MODEL), "status": "in_progress",
                "usage": None, "error": None, "service_tier": draw(st.sampled_from(["auto", "flex", None]))}
    kind = draw(st.sampled_from(["created", "delta", "delta", "delta", "item", "done", "error", "done-usage"]))
    if kind == "created":
        return {"type": draw(st.sampled_from(["response.created", "response.in_progress"])), "response": response}
    if kind == "delta":
        return {"type": "response.output_text.delta", "item_id": "msg_1", "delta": draw(TEXT)}
    if kind == "item":
        return {"type": "response.output_item.done", "item": {"type": draw(st.sampled_from(
            ["message", "web_search_call", "file_search_call", "code_interpreter_call"])), "id": "x",
            "container_id": draw(st.sampled_from(["c1", "c2"]))}}
    if kind == "error":
        return {"type": "error", "code": "server_error", "message": "boom"}
    usage = draw(st.one_of(st.none(), st.fixed_dictionaries(
        {"input_tokens": st.integers(0, 900), "output_tokens": st.integers(0, 900)})))
    return {"type": draw(st.sampled_from(["response.completed", "response.incomplete", "response.failed"])),
            "response": {**response, "status": "completed", "usage": usage}}


@SETTINGS
@given(st.data())
def test_openai_responses_meter_agrees(data: st.DataObject) -> None:
    stream = data.draw(sse_stream(data.draw(st.lists(responses_event(), max_size=25))))
    fast, ref = costs("openai", RESPONSES, data.draw(chunked(stream)))
    assert fast == ref


MESSAGES = json_request("/v1/messages", {"model": "claude-sonnet-4-5", "max_tokens": 200, "stream": True})


@st.composite
def anthropic_event(draw: st.DrawFn) -> Any:
    usage = st.fixed_dictionaries({}, optional={"input_tokens": st.integers(0, 900),
                                                "output_tokens": st.integers(0, 900),
                                                "cache_read_input_tokens": st.integers(0, 50)})
    kind = draw(st.sampled_from(["start", "delta", "delta", "delta", "ping", "mdelta", "stop", "error", "odd"]))
    if kind == "start":
        return {"type": "message_start", "message": {"id": "msg_1", "model": draw(MODEL), "usage": draw(usage)}}
    if kind == "delta":
        return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": draw(TEXT)}}
    if kind == "ping":
        return {"type": "ping"}
    if kind == "mdelta":
        return {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": draw(usage)}
    if kind == "stop":
        return {"type": "message_stop"}
    if kind == "error":
        return {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    return draw(st.sampled_from([{"delta": {"text": "message_stop"}}, {"type": None}, "junk"]))


@SETTINGS
@given(st.data())
def test_anthropic_meter_agrees(data: st.DataObject) -> None:
    stream = data.draw(sse_stream(data.draw(st.lists(anthropic_event(), max_size=25))))
    fast, ref = costs("anthropic", MESSAGES, data.draw(chunked(stream)))
    assert fast == ref


GEMINI = json_request("/v1beta/models/gemini-2.5-flash:streamGenerateContent", {"contents": []})


@st.composite
def gemini_chunk(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["text", "text", "usage", "error", "odd"]))
    version = draw(st.sampled_from(["gemini-2.5-flash", "gemini-2.5-flash", "gemini-2.5-pro", None, ""]))
    body: dict[str, Any] = {"candidates": [{"content": {"parts": [{"text": draw(TEXT)}]}}], "modelVersion": version}
    if kind == "usage":
        body["usageMetadata"] = {"promptTokenCount": draw(st.integers(0, 900)),
                                 "candidatesTokenCount": draw(st.integers(0, 900))}
    if kind == "error":
        return {"error": {"code": 503, "status": "UNAVAILABLE", "message": "overloaded"}}
    if kind == "odd":
        return draw(st.sampled_from([{**body, "error": None}, {**body, "usageMetadata": None}, [body], "junk"]))
    return body


@SETTINGS
@given(st.data())
def test_gemini_meter_agrees(data: st.DataObject) -> None:
    stream = data.draw(sse_stream(data.draw(st.lists(gemini_chunk(), max_size=25))))
    fast, ref = costs("gemini", GEMINI, data.draw(chunked(stream)))
    assert fast == ref


CORPUS = [(vendor, path.name) for vendor in ("openai", "anthropic") for path in sorted(
    (FIXTURES / vendor).glob("*.sse")) if path.name != "transcription_stream.sse"]
REQUEST = {"openai": parse_request((FIXTURES / "openai" / "chat_completion_stream.request.txt").read_bytes())
           if (FIXTURES / "openai").is_dir() else CHAT,
           "anthropic": MESSAGES}


@pytest.mark.parametrize(("vendor", "name"), CORPUS)
@pytest.mark.parametrize("size", [1, 5, 64, 1 << 20])
def test_recorded_streams_agree(vendor: str, name: str, size: int) -> None:
    stream = (FIXTURES / vendor / name).read_bytes()
    req = RESPONSES if name.startswith("responses") else REQUEST[vendor]
    chunks = [stream[i: i + size] for i in range(0, len(stream), size)]
    fast, ref = costs(vendor, req, chunks)
    assert fast == ref
    assert fast.usd is not None


def test_the_fast_meter_skips_the_content_chunks() -> None:
    """What makes it fast: of a chat stream with usage in the last chunk (as the benchmark's), only
    the first chunk and the usage chunk are parsed (this fails if the skip stops working)."""
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o-mini-2024-07-18",
            "service_tier": "default", "system_fingerprint": "fp"}
    chunks = [{**head, "choices": [{"index": 0, "delta": {"content": f" w{i}"}}], "usage": None} for i in range(18)]
    chunks.append({**head, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 16}})
    stream = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]
    parsed: list[str] = []
    meter = REGISTRY["openai"].stream_meter(CHAT, Prices(), REGISTRY["openai"].estimate(CHAT, Prices()))
    assert meter is not None
    on = meter._on

    def counting(event: Any) -> None:
        if not meter._quiet(event):
            parsed.append(event.data[:40])
        on(event)

    meter._on = counting
    for chunk in stream:
        meter.feed(chunk)
    assert meter.finish().note == "gpt-4o-mini: in 12, out 16"
    assert len(parsed) == 2, parsed
