"""The shared SSE parser: any split, any line ending, bounded memory."""

from __future__ import annotations

import pytest
from vendor_fixtures import SPLITS, splits

from spendgate.vendors._sse import Event, SSEParser, find_object

STREAM = (
    b"event: message_start\n"
    b'data: {"a": 1}\n'
    b"\n"
    b": keep-alive comment\n"
    b"data: line one\n"
    b"data: line two\n"
    b"\n"
    b"data:no-space \xe2\x82\xac\n"  # a euro sign: three UTF-8 bytes a split may cut
    b"\n"
)
EXPECTED = [Event("message_start", '{"a": 1}'), Event("", "line one\nline two"), Event("", "no-space €")]


def parse(data: bytes, how: str, seed: int = 0) -> list[Event]:
    parser = SSEParser()
    events: list[Event] = []
    for chunk in splits(data, how, seed):
        events += parser.feed(chunk)
    return events + parser.close()


@pytest.mark.parametrize("how", SPLITS)
@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_events_in_any_split_and_line_ending(how: str, newline: bytes) -> None:
    assert parse(STREAM.replace(b"\n", newline), how) == EXPECTED


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_of_crlf(seed: int) -> None:
    assert parse(STREAM.replace(b"\n", b"\r\n"), "random", seed) == EXPECTED


def test_unterminated_last_event_is_flushed_on_close() -> None:
    assert parse(b'data: {"usage": 1}', "7") == [Event("", '{"usage": 1}')]


def test_event_json_and_done() -> None:
    assert Event("", '{"x": [1]}').json() == {"x": [1]}
    assert Event("", "[DONE]").json() is None
    assert Event("", '{"x": 1}', truncated=True).json() is None


def test_over_long_line_keeps_only_its_tail() -> None:
    parser = SSEParser(max_line=1000, tail=100)
    head = b'data: {"type": "response.completed", "output": "' + b"x" * 5000
    tail = b'", "usage": {"input_tokens": 3, "output_tokens": 4}}\n\n'
    events: list[Event] = []
    for chunk in splits(head + tail, "7"):
        events += parser.feed(chunk)
        assert len(parser._line) <= 1000  # bounded, whatever the line length
    [event] = events
    assert event.truncated and event.json() is None
    assert find_object(event.data, "usage") == {"input_tokens": 3, "output_tokens": 4}


def test_find_object_takes_the_last_complete_value() -> None:
    text = '"usage": null, "x": {"usage": {"a": 1}}, "usage" : {"b": 2}}'
    assert find_object(text, "usage") == {"b": 2}
    assert find_object('"usage": {"b": 2', "usage") is None
