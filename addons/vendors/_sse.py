"""Incremental Server-Sent Events parsing with bounded memory.

The gateway sees a streamed response as arbitrary byte chunks: a chunk may end
inside a line or inside a UTF-8 character. :class:`SSEParser` keeps only the
partial line and the data of the event being built, so a meter never holds the
whole stream. A line longer than ``max_line`` (an OpenAI ``response.completed``
event repeats the whole output text) keeps only its last ``tail`` bytes: usage
sits at the end of those objects, and :func:`find_object` can still dig it out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .base import Cost, plausible

MAX_LINE = 1 << 20  # 1 MiB: larger lines are cut to their tail
TAIL = 64 << 10  # what is kept of an over-long line


@dataclass(frozen=True)
class Event:
    """One dispatched SSE event: its ``event:`` name ("" if none) and joined ``data:``."""

    name: str
    data: str
    truncated: bool = False  # the data lost its head (over-long line)

    def json(self) -> Any:
        """The data as JSON, or ``None`` when it is not (``[DONE]``, a cut line, junk)."""
        if self.truncated:
            return None
        try:
            return json.loads(self.data)
        except ValueError:
            return None


class SSEParser:
    """Feed bytes, get complete events. Handles LF, CRLF and lone CR line ends."""

    def __init__(self, max_line: int = MAX_LINE, tail: int = TAIL) -> None:
        self._max_line = max_line
        self._tail = tail
        self._line = bytearray()
        self._line_cut = False
        self._after_cr = False  # the previous chunk ended in CR: skip a leading LF
        self._name = ""
        self._data: list[str] = []
        self._data_len = 0
        self._data_cut = False

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        start = 0
        if self._after_cr and chunk[:1] == b"\n":
            start = 1
        self._after_cr = False
        n = len(chunk)
        while start < n:
            end = _line_end(chunk, start)
            if end < 0:
                self._append(chunk[start:])
                break
            self._append(chunk[start:end])
            self._end_line(events)
            if chunk[end] == 0x0D:  # CR: a following LF belongs to the same line end
                if end + 1 < n:
                    start = end + 2 if chunk[end + 1] == 0x0A else end + 1
                else:
                    self._after_cr = True
                    start = n
            else:
                start = end + 1
        return events

    def close(self) -> list[Event]:
        """End of stream: flush an unterminated last line and event (be lenient)."""
        events: list[Event] = []
        if self._line or self._line_cut:
            self._end_line(events)
        self._dispatch(events)
        return events

    def _append(self, piece: bytes) -> None:
        self._line += piece
        if len(self._line) > self._max_line:
            del self._line[: len(self._line) - self._tail]
            self._line_cut = True

    def _end_line(self, events: list[Event]) -> None:
        raw, cut = bytes(self._line), self._line_cut
        self._line.clear()
        self._line_cut = False
        if not raw and not cut:
            self._dispatch(events)
            return
        # Line ends are ASCII, so a complete line holds complete UTF-8 characters
        # (except at the head of a cut line, hence "replace").
        line = raw.decode("utf-8", errors="replace")
        if cut:
            # A cut line lost its field name; it can only be the data line of a big event.
            self._add_data(line, cut=True)
            return
        if line.startswith(":"):
            return  # comment / keep-alive
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "data":
            self._add_data(value, cut=False)

    def _add_data(self, value: str, cut: bool) -> None:
        self._data.append(value)
        self._data_len += len(value)
        self._data_cut = self._data_cut or cut
        if self._data_len > self._max_line:  # many data lines in one event: keep the tail
            joined = "\n".join(self._data)[-self._tail :]
            self._data = [joined]
            self._data_len = len(joined)
            self._data_cut = True

    def _dispatch(self, events: list[Event]) -> None:
        if self._data:
            events.append(Event(self._name, "\n".join(self._data), self._data_cut))
        self._name = ""
        self._data = []
        self._data_len = 0
        self._data_cut = False


def _line_end(chunk: bytes, start: int) -> int:
    lf = chunk.find(b"\n", start)
    cr = chunk.find(b"\r", start, lf if lf >= 0 else len(chunk))
    return cr if cr >= 0 else lf


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
