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

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sse_reference import ReferenceSSEParser

from spendgate.vendors._sse import SSEParser

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
