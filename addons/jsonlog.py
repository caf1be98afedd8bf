"""``--log-format json``: every line the gateway prints is one JSON object.

mitmproxy prints its log through its TermLog handler (``[12:00:00.000] message``). In JSON
mode that handler gets a JSON formatter: spendgate's decision lines (already JSON) are printed
as they are, anything else (mitmproxy's own lines, mitmweb's login URL, warnings) becomes
``{"ts", "level", "logger", "message"}``. mitmdump's per-flow lines (``flow_detail``) are turned
off by the runtime, since the decision lines say the same without secrets.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from mitmproxy.addons.termlog import TermLogHandler


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.name == "spendgate" and msg.startswith("{"):
            return msg  # a decision line (record.decision_line), already one JSON object
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": msg,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


_saved: dict[int, logging.Formatter | None] = {}


def use_json(on: bool) -> None:
    """Switch mitmproxy's terminal log handlers to JSON lines (or back)."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, TermLogHandler):
            continue
        if on and not isinstance(handler.formatter, JsonLines):
            _saved[id(handler)] = handler.formatter
            handler.setFormatter(JsonLines())
        elif not on and isinstance(handler.formatter, JsonLines):
            handler.formatter = _saved.pop(id(handler), None)
