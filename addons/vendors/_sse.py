"""Incremental Server-Sent Events parsing with bounded memory.

The gateway sees a streamed response as arbitrary byte chunks: a chunk may end
inside a line or inside a UTF-8 character. :class:`SSEParser` keeps only the
partial line and the data of the event being built, so a meter never holds the
whole stream. A line longer than ``max_line`` (an OpenAI ``response.completed``
event repeats the whole output text) keeps only its last ``tail`` bytes: usage
sits at the end of those objects, and :func:`find_object` can still dig it out.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from .base import Cost, plausible

MAX_LINE = 1 << 20  # 1 MiB: larger lines are cut to their tail
TAIL = 64 << 10  # what is kept of an over-long line


class Event:
    """One dispatched SSE event: its ``event:`` name ("" if none) and joined ``data:`` lines.

    ``raw`` is the data as received (UTF-8 bytes); ``data`` decodes it on first use, so a meter
    can look at ``raw`` with :func:`only` and skip an event without decoding or parsing it.
    """

    __slots__ = ("_text", "name", "raw", "truncated")

    def __init__(self, name: str, data: str, truncated: bool = False) -> None:
        self.name = name
        self.raw = data.encode("utf-8", "surrogatepass")
        self.truncated = truncated  # the data lost its head (over-long line)
        self._text: str | None = data

    @classmethod
    def of(cls, name: str, raw: bytes, truncated: bool = False) -> Event:
        event = cls.__new__(cls)
        event.name, event.raw, event.truncated, event._text = name, raw, truncated, None
        return event

    @property
    def data(self) -> str:
        if self._text is None:
            # Line ends are ASCII, so decoding the joined lines equals joining the decoded lines.
            self._text = self.raw.decode("utf-8", "replace")
        return self._text

    def json(self) -> Any:
        """The data as JSON, or ``None`` when it is not (``[DONE]``, a cut line, junk)."""
        if self.truncated:
            return None
        try:
            return json.loads(self.data)
        except ValueError:
            return None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.name, self.data, self.truncated) == (other.name, other.data, other.truncated)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Event({self.name!r}, {self.data!r}, truncated={self.truncated})"


class SSEParser:
    """Feed bytes, get complete events. Handles LF, CRLF and lone CR line ends.

    A chunk is split on its line ends at once (``bytes.split``), not scanned line by line; lines
    and data stay bytes until a meter asks for ``Event.data``. CR line ends (rare) are first
    rewritten to LF, the CR of a CRLF split across chunks included.
    """

    def __init__(self, max_line: int = MAX_LINE, tail: int = TAIL) -> None:
        self._max_line = max_line
        self._tail = tail
        self._line = bytearray()  # the unterminated last line of the chunks so far
        self._line_cut = False
        self._after_cr = False  # the previous chunk ended in CR: skip a leading LF
        self._name = ""
        self._data: list[bytes] = []
        self._data_len = 0  # bytes, an upper bound of the characters
        self._data_cut = False
        self._text: list[str] | None = None  # the data as text, once it may exceed max_line

    def feed(self, chunk: bytes) -> list[Event]:
        # The usual chunk: one whole `data: …` event (OpenAI, Gemini), nothing pending.
        n = len(chunk) - 2
        if (chunk[:6] == b"data: " and chunk.find(b"\n") == n and chunk[n:] == b"\n\n" and n <= self._max_line
                and not self._data and not self._line and not self._after_cr and self._text is None
                and chunk.find(b"\r") < 0 and not self._line_cut):
            name, self._name = self._name, ""
            return [Event.of(name, chunk[6:n])]
        if self._after_cr:
            self._after_cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if chunk.find(b"\r") >= 0:  # not `in`: bytes.__contains__ tries an int first (a TypeError built and dropped)
            self._after_cr = chunk[-1:] == b"\r"
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        first = chunk.find(b"\n")
        events: list[Event] = []
        if first < 0:
            if chunk:
                self._append(chunk)
            return events
        start = 0
        if self._line or self._line_cut:  # the head of the first line came with earlier chunks
            self._append(chunk[:first])
            line, cut = bytes(self._line), self._line_cut
            self._line.clear()
            self._line_cut = False
            self._end_line(line, cut, events)
            start = first + 1
        last = chunk.rfind(b"\n")
        if start <= last:
            max_line = self._max_line
            for line in chunk[start:last].split(b"\n"):
                if not line:
                    self._dispatch(events)
                elif len(line) > max_line:
                    self._end_line(line[len(line) - self._tail:], True, events)
                elif line[:5] == b"data:" and self._text is None:
                    value = line[6:] if line[5:6] == b" " else line[5:]
                    self._data.append(value)
                    self._data_len += len(value)
                    if self._data_len > max_line:
                        self._to_text()
                else:
                    self._end_line(line, False, events)
        if last + 1 < len(chunk):
            self._append(chunk[last + 1:])
        return events

    def close(self) -> list[Event]:
        """End of stream: flush an unterminated last line and event (be lenient)."""
        events: list[Event] = []
        if self._line or self._line_cut:
            line, cut = bytes(self._line), self._line_cut
            self._line.clear()
            self._line_cut = False
            self._end_line(line, cut, events)
        self._dispatch(events)
        return events

    def _append(self, piece: bytes) -> None:
        self._line += piece
        if len(self._line) > self._max_line:
            del self._line[: len(self._line) - self._tail]
            self._line_cut = True

    def _end_line(self, line: bytes, cut: bool, events: list[Event]) -> None:
        if not line and not cut:
            self._dispatch(events)
        elif cut:
            # A cut line lost its field name; it can only be the data line of a big event.
            self._add_data(line, cut=True)
        elif line[:1] == b":":
            return  # comment / keep-alive
        else:
            field, _, value = line.partition(b":")
            if value[:1] == b" ":
                value = value[1:]
            if field == b"event":
                self._name = value.decode("utf-8", "replace")
            elif field == b"data":
                self._add_data(value, cut=False)

    def _add_data(self, value: bytes, cut: bool) -> None:
        self._data_cut = self._data_cut or cut
        if self._text is None:
            self._data.append(value)
            self._data_len += len(value)
            if self._data_len > self._max_line:
                self._to_text()
        else:
            self._add_text(value.decode("utf-8", "replace"))

    def _to_text(self) -> None:
        """The data may exceed max_line: from now on count characters, as the cut is defined on
        text (up to here no cut was due: characters <= bytes <= max_line)."""
        self._text = []
        self._data_len = 0
        for value in self._data:
            self._add_text(value.decode("utf-8", "replace"))
        self._data = []

    def _add_text(self, value: str) -> None:
        assert self._text is not None
        self._text.append(value)
        self._data_len += len(value)
        if self._data_len > self._max_line:  # many data lines in one event: keep the tail
            joined = "\n".join(self._text)[-self._tail:]
            self._text = [joined]
            self._data_len = len(joined)
            self._data_cut = True

    def _dispatch(self, events: list[Event]) -> None:
        if self._text is not None:
            events.append(Event(self._name, "\n".join(self._text), self._data_cut))
            self._text = None
        elif self._data:
            data = self._data
            events.append(Event.of(self._name, data[0] if len(data) == 1 else b"\n".join(data), self._data_cut))
        self._name = ""
        self._data = []
        self._data_len = 0
        self._data_cut = False


Keys = tuple[tuple[bytes, tuple[bytes, ...]], ...]


def quiet(raw: bytes, always: tuple[bytes, ...], keys: Keys) -> bool:
    r"""Whether parsing the JSON text ``raw`` can be skipped: it holds none of ``always`` (a type
    name, ``\u``), and every ``"key"`` of ``keys`` (the key in quotes) is followed by one of its
    forms (a colon and a value, e.g. ``b':null'``): then every member of those names, at any
    depth, holds only null or what the meter already has, and the event changes nothing.

    Every occurrence is checked, overlapping ones too. A key written with an escape
    (``"\u0075sage"``) is not seen: callers put ``\u`` in ``always``. ``bytes.find``, not ``in``
    (``bytes.__contains__`` tries the argument as an int first and builds a TypeError), and not a
    regex (sre tries every alternative at every position: 4-20 times slower here)."""
    for text in always:
        if raw.find(text) >= 0:
            return False
    for quoted, forms in keys:
        i = raw.find(quoted)
        while i >= 0:
            if not raw.startswith(forms, i + len(quoted)):
                return False
            i = raw.find(quoted, i + 1)
    return True


@functools.lru_cache(maxsize=256)
def forms_of(value: str | None) -> tuple[bytes, ...]:
    """The ways ``: value`` is written by JSON encoders (no space, one space after the colon)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return (b":" + text, b": " + text)


NULL = forms_of(None)


def find_object(text: str, key: str) -> dict[str, Any] | None:
    """The JSON object that is the value of the last ``"key":`` in ``text``.

    For the tail of a cut event: ``{"type":"response.completed",...,"usage":{...}}``
    whose head is gone can still give its usage.
    """
    decoder = json.JSONDecoder()
    needle = f'"{key}"'
    pos = text.rfind(needle)
    while pos >= 0:
        i = pos + len(needle)
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        if i < len(text) and text[i] == ":":
            i += 1
            while i < len(text) and text[i] in " \t\r\n":
                i += 1
            try:
                value, _ = decoder.raw_decode(text, i)
            except ValueError:
                value = None
            if isinstance(value, dict):
                return value
        pos = text.rfind(needle, 0, pos)
    return None


class EventMeter:
    """Base of the LLM stream meters: splits the byte stream into events for ``_on``.

    Keeps O(1) state: the parser's partial line plus whatever ``_on`` chooses to keep.
    A bug in ``_on`` marks the meter broken instead of breaking the agent's stream.
    """

    def __init__(self) -> None:
        self._parser = SSEParser()
        self._broken: str | None = None

    def feed(self, chunk: bytes) -> None:
        if self._broken:
            return
        try:
            for event in self._parser.feed(bytes(chunk)):
                self._on(event)
        except Exception as e:
            self._broken = type(e).__name__

    def _on(self, event: Event) -> None:
        raise NotImplementedError

    def finish(self) -> Cost:
        """The stream's cost: the parser's last events, then ``_finish``. Never raises: a bug in a
        meter is a cost of unknown, not a broken answer."""
        try:
            if not self._broken:
                for event in self._parser.close():
                    self._on(event)
            return plausible(self._finish())
        except Exception as e:
            return Cost("unknown", None, note=f"stream meter error: {type(e).__name__}")

    def _finish(self) -> Cost:
        raise NotImplementedError
