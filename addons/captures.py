"""Reading captured traffic: mitmproxy flow files (``spendgate run --capture``, ``mitmdump -w``,
mitmweb's save, older mitmproxy versions through mitmproxy's own format migrations) and HAR files.

Reading never raises on bad input. Each entry is an :class:`Entry`: a request to replay, or a
reason it is skipped (a TCP/UDP/DNS flow, a websocket, a tunnel, a HAR entry that is not a
request). A file that cannot be read further is a :class:`Problem` naming the file and the byte
offset (flow files) or the entry (HAR); the entries before it are kept.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import heapq
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import flow as mflow
from mitmproxy import http
from mitmproxy.io import compat, tnetstring
from mitmproxy.io.har import request_to_flow

FLOW_SUFFIXES = (".mitm", ".flows", ".flow", ".dump")
HAR_SUFFIXES = (".har",)


@dataclass
class Problem:
    source: str  # file, with the offset or entry
    message: str

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


@dataclass
class Entry:
    source: str  # "file#offset" or "file#entry N"
    time: float  # when the request started (epoch seconds)
    flow: http.HTTPFlow | None = None
    skip: str | None = None  # why it is not replayed
    kind: str = "http"


@dataclass
class Reader:
    """Streams entries from many files, merged by request time; collects problems."""

    paths: list[Path]
    problems: list[Problem] = field(default_factory=list)
    bytes_total: int = 0
    bytes_read: int = 0

    @classmethod
    def of(cls, inputs: Iterable[str | os.PathLike[str]]) -> Reader:
        paths: list[Path] = []
        problems: list[Problem] = []
        for raw in inputs:
            p = Path(raw)
            if p.is_dir():
                found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FLOW_SUFFIXES + HAR_SUFFIXES)
                if not found:
                    problems.append(Problem(str(p), "no flow files (*.mitm, *.flows, *.har) in this directory"))
                paths += found
            elif p.is_file():
                paths.append(p)
            else:
                problems.append(Problem(str(p), "no such file or directory"))
        reader = cls(paths, problems)
        reader.bytes_total = sum(p.stat().st_size for p in paths)
        return reader

    def __iter__(self) -> Iterator[Entry]:
        # Each file is in capture order; files are merged by request time (k-way, one entry per
        # file in memory), so rotated captures and several gateways' files interleave correctly.
        return heapq.merge(*(self._read(p) for p in self.paths), key=lambda e: e.time)

    def _read(self, path: Path) -> Iterator[Entry]:
        try:
            with path.open("rb") as f:
                head = f.read(4)
                f.seek(0)
                if head.lstrip(b"\xef\xbb\xbf")[:1] == b"{" or path.suffix.lower() in HAR_SUFFIXES:
                    yield from self._har(path, f.read())
                else:
                    yield from self._flows(path, f)
        except OSError as e:
            self.problems.append(Problem(str(path), f"cannot read: {e.strerror}"))

    def _flows(self, path: Path, f: Any) -> Iterator[Entry]:
        while True:
            offset = f.tell()
            try:
                data = tnetstring.load(f)
            except (ValueError, IndexError, TypeError) as e:
                if str(e) == "not a tnetstring: empty file":
                    self.bytes_read += f.tell() - offset
                    return  # the end
                self.problems.append(Problem(f"{path}@{offset}", "corrupt or truncated flow file at this byte "
                                             f"offset ({type(e).__name__}: {e}); the flows before it were read"))
                return
            self.bytes_read += f.tell() - offset
            source = f"{path}@{offset}"
            try:
                if not isinstance(data, dict):
                    raise ValueError(f"not a flow: {type(data).__name__}")
                flow = mflow.Flow.from_state(compat.migrate_flow(data))
            except Exception as e:  # (mitmproxy raises ValueError, KeyError, TypeError on odd states)
                self.problems.append(Problem(source, f"unreadable flow ({type(e).__name__}: {e}); skipped"))
                continue
            yield entry_of(flow, source)

    def _har(self, path: Path, raw: bytes) -> Iterator[Entry]:
        self.bytes_read += len(raw)
        try:
            entries = json.loads(raw.decode("utf-8-sig"))["log"]["entries"]
            if not isinstance(entries, list):
                raise TypeError("log.entries is not a list")
        except (ValueError, KeyError, TypeError) as e:
            self.problems.append(Problem(str(path), f"not a HAR file ({type(e).__name__}: {e})"))
            return
        for i, item in enumerate(entries):
            source = f"{path}#entry {i}"
            try:
                flow = har_flow(item)
            except Exception as e:
                self.problems.append(Problem(source, f"unreadable HAR entry ({type(e).__name__}: {e}); skipped"))
                continue
            yield entry_of(flow, source)


def entry_of(flow: mflow.Flow, source: str) -> Entry:
    start = getattr(getattr(flow, "request", None), "timestamp_start", None) or flow.timestamp_created
    if not isinstance(flow, http.HTTPFlow):
        return Entry(source, start, None, f"{flow.type} flow", flow.type)
    if flow.websocket is not None:
        return Entry(source, start, None, "websocket", "websocket")
    if flow.request.method.upper() == "CONNECT":
        return Entry(source, start, None, "tunnel (CONNECT)", "connect")
    return Entry(source, start, flow)


def har_flow(item: dict[str, Any]) -> http.HTTPFlow:
    """One HAR entry as a flow (mitmproxy's reader), plus what it leaves out: a base64 request
    body, and no response when the entry has none (status 0: blocked, failed, cancelled)."""
    req = item.get("request") or {}
    item = {**item, "request": {**req, "httpVersion": req.get("httpVersion", "HTTP/1.1")}}
    resp = item.get("response") or {}
    item["response"] = {"status": 0, "httpVersion": "HTTP/1.1", "headers": [], "content": {}, **resp}
    item.setdefault("time", 0)
    post = req.get("postData") or {}
    flow = request_to_flow(item)
    if post.get("encoding") == "base64" and isinstance(post.get("text"), str):
        with contextlib.suppress(binascii.Error, ValueError):  # else: keep the text as given
            flow.request.content = base64.b64decode(post["text"])
    if not resp or not resp.get("status"):
        flow.response = None
    return flow
