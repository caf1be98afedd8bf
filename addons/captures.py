"""Reading captured traffic: mitmproxy flow files (``spendgate run --capture``, ``mitmdump -w``,
mitmweb's save, older mitmproxy versions through mitmproxy's own format migrations) and HAR files.

Flow files are read as mitmproxy's ``FlowReader`` reads them (the same states, mitmproxy's
``from_state`` for requests, responses and errors, mitmproxy's migrations for other format
versions) with three savings, all measured on replay's benchmark: each flow is read with one
``read`` and parsed by a tnetstring parser that walks offsets instead of copying what is left of
the data at every element; a flow of the current format is not migrated (a no-op there); and its
client and server connections, which replay never uses (each replayed request gets its own
tunnel), are kept as bytes and parsed, by mitmproxy, only if something reads them
(:class:`CapturedFlow`). Flows in any other format version go through mitmproxy's own
``migrate_flow`` and ``Flow.from_state`` whole.

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

from mitmproxy import connection, http, version
from mitmproxy import flow as mflow
from mitmproxy.io import compat
from mitmproxy.io.har import request_to_flow
from mitmproxy.utils.strutils import always_bytes

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
        offset = 0
        while True:
            try:
                raw = read_tnetstring(f)
            except (ValueError, IndexError, TypeError) as e:
                self.problems.append(Problem(f"{path}@{offset}", "corrupt or truncated flow file at this byte "
                                             f"offset ({type(e).__name__}: {e}); the flows before it were read"))
                return
            if raw is None:
                return  # the end
            source = f"{path}@{offset}"
            end = f.tell()
            self.bytes_read += end - offset
            offset = end
            try:
                flow = load_flow(raw)
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


# --------------------------------------------------------------------------- flow files


def read_tnetstring(f: Any) -> bytes | None:
    """The next tnetstring of a file (its payload and type tag), None at the end of the file;
    ValueError if it is corrupt or cut short. (As ``tnetstring.load`` reads it, in one read.)"""
    c = f.read(1)
    if c == b"":
        return None
    prefix = b""
    while c.isdigit():
        prefix += c
        if len(prefix) > 12:
            raise ValueError("not a tnetstring: absurdly large length prefix")
        c = f.read(1)
    if c != b":" or not prefix:
        raise ValueError("not a tnetstring: missing or invalid length prefix")
    size = int(prefix) + 1
    raw = f.read(size)
    if len(raw) != size:
        raise ValueError(f"not a tnetstring: {len(raw)} of {size} bytes (truncated)")
    return raw


def parse_tnetstring(data: bytes, i: int, limit: int) -> tuple[Any, int]:
    """The value of the tnetstring at ``data[i:]`` (ending by ``limit``) and where it ends. The values
    ``mitmproxy.io.tnetstring`` gives (bytes, str, int, float, bool, None, list, dict), found by
    offsets into one buffer instead of a new view of the rest of the data at every element."""
    colon = data.find(b":", i, min(i + 13, limit))
    if colon <= i:
        raise ValueError(f"not a tnetstring: missing or invalid length prefix at {i}")
    start = colon + 1
    end = start + int(data[i:colon])
    if end < start or end >= limit:
        raise ValueError(f"not a tnetstring: invalid length prefix at {i}")
    tag = data[end]
    if tag == 44:  # ,
        return data[start:end], end + 1
    if tag == 125:  # }
        d = {}
        j = start
        while j < end:
            key, j = parse_tnetstring(data, j, end)
            if j >= end:
                raise ValueError("not a tnetstring: a dict key without a value")
            d[key], j = parse_tnetstring(data, j, end)
        return d, end + 1
    if tag == 59:  # ;
        return data[start:end].decode("utf8"), end + 1
    if tag == 93:  # ]
        items = []
        j = start
        while j < end:
            item, j = parse_tnetstring(data, j, end)
            items.append(item)
        return items, end + 1
    if tag == 126:  # ~
        if end != start:
            raise ValueError("not a tnetstring: invalid null literal")
        return None, end + 1
    if tag == 35:  # #
        return int(data[start:end]), end + 1
    if tag == 94:  # ^
        return float(data[start:end]), end + 1
    if tag == 33:  # !
        if data[start:end] not in (b"true", b"false"):
            raise ValueError("not a tnetstring: invalid boolean literal")
        return data[start:end] == b"true", end + 1
    raise ValueError(f"unknown type tag: {tag}")


LAZY = ("client_conn", "server_conn")  # kept as bytes until read (replay never reads them)


def load_flow(raw: bytes) -> mflow.Flow:
    """A flow from one flow file entry (:func:`read_tnetstring`), as ``FlowReader`` reads it."""
    if raw[-1:] != b"}":
        raise ValueError(f"not a flow: type tag {raw[-1:]!r}")
    state: dict[Any, Any] = {}
    lazy: dict[str, bytes] = {}
    j, end = 0, len(raw) - 1
    while j < end:
        key, j = parse_tnetstring(raw, j, end)
        if j >= end:
            raise ValueError("not a tnetstring: a dict key without a value")
        if key in LAZY:
            at = j
            _, j = _skip(raw, j, end)
            lazy[key] = raw[at:j]
        else:
            state[key], j = parse_tnetstring(raw, j, end)
    if (state.get("version") == CapturedFlow.FORMAT == version.FLOW_FORMAT_VERSION
            and state.get("type") == "http" and len(lazy) == 2):
        flow = CapturedFlow(lazy["client_conn"], lazy["server_conn"])
        flow.set_state(state)
        return flow
    for key, value in lazy.items():  # another version or flow type: mitmproxy's reader, whole
        state[key] = parse_tnetstring(value, 0, len(value))[0]
    return mflow.Flow.from_state(compat.migrate_flow(state))


def _skip(data: bytes, i: int, limit: int) -> tuple[None, int]:
    colon = data.find(b":", i, min(i + 13, limit))
    if colon <= i:
        raise ValueError(f"not a tnetstring: missing or invalid length prefix at {i}")
    end = colon + 1 + int(data[i:colon])
    if end <= colon or end >= limit:
        raise ValueError(f"not a tnetstring: invalid length prefix at {i}")
    return None, end + 1


class CapturedFlow(http.HTTPFlow):
    """An HTTP flow read from a flow file of the current format: everything as mitmproxy's reader
    sets it, except that the client and server connections are parsed (by mitmproxy's
    ``from_state``) the first time they are read. ``type`` is ``http``; its state, copies and
    saved form are an ``HTTPFlow``'s."""

    FORMAT = 21  # the flow format version this reads without migrating (mitmproxy 12)

    def __init__(self, client_conn: bytes, server_conn: bytes) -> None:
        # Flow.__init__'s fields without its uuid4 id (set_state sets them all from the capture)
        self.__dict__.update(id="", client_conn=_LAZY_CLIENT, server_conn=_LAZY_SERVER, live=False,
                             timestamp_created=0.0, intercepted=False, _resume_event=None, _backup=None,
                             marked="", is_replay=None, metadata={}, comment="")
        self._conn_states: dict[str, bytes] = {"client_conn": client_conn, "server_conn": server_conn}

    def _conn(self, name: str) -> Any:
        raw = self._conn_states.pop(name, None)
        if raw is not None:  # first read: parsed now
            state = parse_tnetstring(raw, 0, len(raw))[0]
            self.__dict__[name] = (connection.Client if name == "client_conn" else connection.Server).from_state(state)
        return self.__dict__[name]

    def _set_conn(self, name: str, value: Any) -> None:
        self.__dict__.get("_conn_states", {}).pop(name, None)
        self.__dict__[name] = value

    @property  # type: ignore[override]
    def client_conn(self) -> connection.Client:
        return self._conn("client_conn")

    @client_conn.setter
    def client_conn(self, value: connection.Client) -> None:
        self._set_conn("client_conn", value)

    @property  # type: ignore[override]
    def server_conn(self) -> connection.Server:
        return self._conn("server_conn")

    @server_conn.setter
    def server_conn(self, value: connection.Server) -> None:
        self._set_conn("server_conn", value)

    def set_state(self, state: dict[str, Any]) -> None:
        """``HTTPFlow.set_state`` and ``Flow.set_state`` for a state without its connections."""
        self.request = _message(http.Request, http.RequestData, state.pop("request"), _REQUEST)
        self.response = _message(http.Response, http.ResponseData, r, _RESPONSE) if (r := state.pop("response")) else None
        self.websocket = http.WebSocketData.from_state(w) if (w := state.pop("websocket")) else None
        if state.pop("version") != self.FORMAT or state.pop("type") != "http":
            raise ValueError("not a current HTTP flow")
        self.id = state.pop("id")
        error = state.pop("error")
        self.error = mflow.Error.from_state(error) if error else None
        self.intercepted = state.pop("intercepted")
        self.is_replay = state.pop("is_replay")
        self.marked = state.pop("marked")
        self.metadata = state.pop("metadata")
        self.comment = state.pop("comment")
        self.timestamp_created = state.pop("timestamp_created")
        self._backup = state.pop("backup", None)
        if state:
            raise ValueError(f"unknown flow fields: {', '.join(map(str, state))}")


CapturedFlow.type = "http"  # (Flow.__init_subclass__ named it after the class)

# The fields of a request's and a response's state, and the types mitmproxy's reader accepts
# for each without converting anything (bytes where it wants bytes, no str to encode). A state
# exactly like this becomes the message mitmproxy's ``from_state`` would build, without its
# per-field type-check machinery; any other state goes through ``from_state`` itself.
_NONE = type(None)
_COMMON = {"http_version": (bytes,), "headers": (list,), "content": (bytes, _NONE), "trailers": (list, _NONE),
           "timestamp_start": (float, int), "timestamp_end": (float, int, _NONE)}
_REQUEST = {**_COMMON, "host": (str,), "port": (int,), "method": (bytes,), "scheme": (bytes,),
            "authority": (bytes,), "path": (bytes,)}
_RESPONSE = {**_COMMON, "status_code": (int,), "reason": (bytes,)}


def _message[M: (http.Request, http.Response)](cls: type[M], data_cls: type, state: Any,
                                               types: dict[str, tuple[type, ...]]) -> M:
    if (not isinstance(state, dict) or state.keys() != types.keys()
            or any(type(state[k]) not in t for k, t in types.items())):
        return cls.from_state(state)
    fields = {name: state[name] for name in data_cls.__dataclass_fields__}  # (in the dataclass's order)
    fields["headers"] = _headers(state["headers"])
    if state["trailers"] is not None:
        fields["trailers"] = http.Headers(state["trailers"])
    data = object.__new__(data_cls)
    data.__dict__.update(fields)
    message = object.__new__(cls)
    message.data = data
    return message


def _headers(items: list[Any]) -> ReadHeaders:
    """``ReadHeaders(items)``: the same fields, checked the same way (every field a name and a
    value, both bytes; anything else is left to mitmproxy's constructor, which raises), without
    the constructor's generic keyword handling."""
    fields = tuple(tuple(i) for i in items)  # (as MultiDict's constructor)
    for f in fields:
        if len(f) != 2 or type(f[0]) is not bytes or type(f[1]) is not bytes:
            return ReadHeaders(items)
    headers = object.__new__(ReadHeaders)
    headers.fields = fields
    return headers


class ReadHeaders(http.Headers):
    """The headers of a replayed flow: mitmproxy's ``Headers``, whose lookups by name (``get``,
    ``in``, ``[name]``, ``get_all``: the stages make about a dozen per request) give the same
    values in one pass over the fields, instead of through ``Mapping``'s and ``MultiDict``'s
    layers (``tests/test_replay_fast.py`` compares them)."""

    def get_all(self, name: str | bytes) -> list[str]:
        key = (name if type(name) is bytes else always_bytes(name, "utf-8", "surrogateescape")).lower()
        return [v.decode("utf-8", "surrogateescape") for k, v in self.fields if k.lower() == key]

    def __getitem__(self, name: str | bytes) -> str:
        values = self.get_all(name)
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def get(self, name: str | bytes, default: Any = None) -> Any:  # type: ignore[override]
        values = self.get_all(name)
        return ", ".join(values) if values else default

    def __contains__(self, name: object) -> bool:
        key = (name if type(name) is bytes else always_bytes(name, "utf-8", "surrogateescape")).lower()  # type: ignore[arg-type]
        return any(k.lower() == key for k, _ in self.fields)


_LAZY_CLIENT = connection.Client(peername=("", 0), sockname=("", 0))  # placeholders until parsed
_LAZY_SERVER = connection.Server(address=None)
