"""``python -m spendgate.launch mitmdump|mitmweb ARGS``: mitmproxy with every log line as JSON.

``spendgate run --log-format json`` starts mitmproxy through here, so that its own first lines
(printed before the spendgate addon loads, e.g. "failed to listen on …" when a port is taken)
are JSON lines like the rest (jsonlog.py) instead of plain text.
"""

from __future__ import annotations

import sys

from mitmproxy.addons import termlog
from mitmproxy.tools import main as tools

from .jsonlog import JsonLines


def main(argv: list[str]) -> int | None:
    tool, *args = argv
    if tool not in ("mitmdump", "mitmweb"):
        raise SystemExit(f"usage: python -m spendgate.launch mitmdump|mitmweb [ARGS]: not {tool!r}")
    start = termlog.TermLogHandler.__init__

    def json_handler(self: termlog.TermLogHandler, out: object = None) -> None:
        start(self, out)  # type: ignore[arg-type]
        self.setFormatter(JsonLines())

    termlog.TermLogHandler.__init__ = json_handler  # type: ignore[method-assign]
    sys.argv = [tool, *args]
    return getattr(tools, tool)(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
