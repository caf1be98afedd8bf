"""The SSE parser as it was before the fast one (spendgate 2026-12, line by line, str per line):
the reference the fast parser and the fast meters are checked against (tests/test_sse_fast.py).

Kept verbatim apart from the names; do not optimise it: it is the straightforward reading of the
parsing rules, and the point is that the fast code agrees with it on any input and any split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_LINE = 1 << 20
TAIL = 64 << 10


@dataclass(frozen=True)
class RefEvent:
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


class ReferenceSSEParser:
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

    def feed(self, chunk: bytes) -> list[RefEvent]:
        events: list[RefEvent] = []
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

    def close(self) -> list[RefEvent]:
        """End of stream: flush an unterminated last line and event (be lenient)."""
        events: list[RefEvent] = []
        if self._line or self._line_cut:
            self._end_line(events)
        self._dispatch(events)
        return events

    def _append(self, piece: bytes) -> None:
        self._line += piece
        if len(self._line) > self._max_line:
            del self._line[: len(self._line) - self._tail]
            self._line_cut = True

    def _end_line(self, events: list[RefEvent]) -> None:
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

    def _dispatch(self, events: list[RefEvent]) -> None:
        if self._data:
            events.append(RefEvent(self._name, "\n".join(self._data), self._data_cut))
        self._name = ""
        self._data = []
        self._data_len = 0
        self._data_cut = False


def _line_end(chunk: bytes, start: int) -> int:
    lf = chunk.find(b"\n", start)
    cr = chunk.find(b"\r", start, lf if lf >= 0 else len(chunk))
    return cr if cr >= 0 else lf
