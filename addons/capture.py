"""Capture: the traffic the gateway handles, as rotating mitmproxy flow files for ``spendgate replay``.

    spendgate run --capture data/capture            # or: --set spendgate_capture=data/capture

Every HTTP flow is appended, when it ends (``response`` or ``error``), to
``DIR/capture-<UTC start>-<n>.mitm``: a plain mitmproxy flow file (``mitmproxy -r``, mitmweb's
open, ``spendgate replay``). A file is closed and a new one started when it reaches
``spendgate_capture_max_size`` or ``spendgate_capture_max_age``; only the newest
``spendgate_capture_keep`` files are kept (0: all). Each flow carries spendgate's decision,
reason and cost (``metadata["spendgate"]``), which replay reads as "then".

What is never in a capture, by construction:

- a vault key: identify takes every key slot out of the flow before any decision; the capture
  also masks anything shaped like a vault key (``vk_…``) anywhere in the saved flow;
- a real credential: the swap stage writes only a placeholder (``spendgate:<key id>:<ref>``) into
  the flow, the real value exists only in the bytes sent upstream (``wire.py``); the capture also
  replaces any value of the loaded credentials found in the saved flow (an echo in a response);
- ``spendgate_capture_bodies=false`` (``--capture-no-bodies``): no request or response body at all
  (replay then cannot price or estimate from them: it shows the decisions only);
- ``spendgate_capture_redact`` (``--capture-redact NAME``, repeatable): the value of every JSON
  key, form or query field and header named NAME is replaced (strings by ``x`` of the same
  length, so token estimates stay close; numbers by 0). Bodies the capture cannot decode
  (an unknown or broken ``Content-Encoding``) are dropped rather than saved unchecked.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.io import tnetstring
from mitmproxy.net import encoding
from mitmproxy.utils import human

from .policy import parse_duration
from .runtime import Runtime

log = logging.getLogger("spendgate")

PREFIX = "capture-"
SUFFIX = ".mitm"
_VAULT_KEY = re.compile(rb"vk_[A-Za-z0-9_-]{16,}")
MASK = b"vk_[redacted]"
CREDENTIAL_MASK = b"spendgate-redacted"


class Capture:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.dir: Path | None = None
        self.max_size = 100 * 1024 * 1024
        self.max_age = 3600.0
        self.keep = 48
        self.bodies = True
        self.redact: frozenset[str] = frozenset()
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._opened = 0.0
        self._seq = 0
        self.written = 0

    def load(self, loader: Loader) -> None:
        loader.add_option("spendgate_capture", str, "",
                          "Write the flows the gateway handles to rotating flow files in this directory.")
        loader.add_option("spendgate_capture_max_size", str, "100m", "Start a new capture file at this size.")
        loader.add_option("spendgate_capture_max_age", str, "1h", "Start a new capture file after this long.")
        loader.add_option("spendgate_capture_keep", int, 48, "Capture files kept (the newest; 0 keeps all).")
        loader.add_option("spendgate_capture_bodies", bool, True,
                          "Keep request and response bodies in captures (replay needs them to price).")
        loader.add_option("spendgate_capture_redact", Sequence[str], [],  # type: ignore[arg-type]
                          "JSON keys, form/query fields and headers whose values captures mask.")

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("spendgate_capture") for name in updated):
            return
        opts = ctx.options
        try:
            self.max_size = human.parse_size(opts.spendgate_capture_max_size) or 0
            self.max_age = parse_duration(opts.spendgate_capture_max_age)
        except ValueError as e:
            raise exceptions.OptionsError(f"spendgate_capture: {e}") from None
        if self.max_size <= 0:
            raise exceptions.OptionsError("spendgate_capture_max_size must be positive")
        if opts.spendgate_capture_keep < 0:
            raise exceptions.OptionsError("spendgate_capture_keep must be 0 (all) or more")
        self.keep = opts.spendgate_capture_keep
        self.bodies = opts.spendgate_capture_bodies
        self.redact = frozenset(n.lower() for n in opts.spendgate_capture_redact)
        directory = Path(opts.spendgate_capture) if opts.spendgate_capture else None
        if directory != self.dir:
            self._close()
            self.dir = directory
            if directory is not None:
                try:
                    directory.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise exceptions.OptionsError(
                        f"spendgate_capture: cannot create {directory}: {e.strerror}") from None
                log.info("spendgate: capturing flows to %s", directory)

    # -- hooks ---------------------------------------------------------------------------------
    def response(self, flow: http.HTTPFlow) -> None:
        self.save(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.save(flow)

    def done(self) -> None:
        self._close()

    # -- writing -------------------------------------------------------------------------------
    def save(self, flow: http.HTTPFlow) -> None:
        if self.dir is None or flow.request.method == "CONNECT" or flow.websocket is not None:
            return
        try:
            state = self.sanitize(flow.get_state())
            f = self._current()
            tnetstring.dump(state, f)
            f.flush()
            self.written += 1
        except Exception:  # the capture must never break the traffic
            log.exception("spendgate: could not write flow %s to the capture", flow.id)

    def sanitize(self, state: dict[str, Any]) -> dict[str, Any]:
        state["backup"] = None  # (an edited flow's original: never saved)
        secrets = self._secrets()
        for part in ("request", "response"):
            msg = state.get(part)
            if not msg:
                continue
            msg["headers"] = tuple(self._header(n, v, secrets) for n, v in msg["headers"])
            if part == "request":
                msg["path"] = self._path_of(msg["path"], secrets)
                if msg.get("authority"):
                    msg["authority"] = _scrub(msg["authority"], secrets)
            msg["content"] = self._body(msg, secrets) if self.bodies else (b"" if msg.get("content") else msg.get("content"))
            if msg.get("trailers"):
                msg["trailers"] = tuple(self._header(n, v, secrets) for n, v in msg["trailers"])
        if state.get("comment"):
            state["comment"] = _scrub(state["comment"].encode(), secrets).decode(errors="replace")
        return state

    def _secrets(self) -> list[bytes]:
        state = self.runtime.state
        if state is None:
            return []
        return sorted({v.encode() for creds in state.credentials.values() for v in creds.values() if len(v) >= 8},
                      key=len, reverse=True)

    def _header(self, name: bytes, value: bytes, secrets: list[bytes]) -> tuple[bytes, bytes]:
        if name.decode("latin-1").lower() in self.redact:
            return name, b"[redacted]"
        return name, _scrub(value, secrets)

    def _path_of(self, path: bytes, secrets: list[bytes]) -> bytes:
        path = _scrub(path, secrets)
        if self.redact and b"?" in path:
            base, _, query = path.partition(b"?")
            fields = parse_qsl(query.decode(errors="surrogateescape"), keep_blank_values=True)
            if any(_field(k) in self.redact for k, _ in fields):
                fields = [(k, "x" * len(v) if _field(k) in self.redact else v) for k, v in fields]
                path = base + b"?" + urlencode(fields).encode(errors="surrogateescape")
        return path

    def _body(self, msg: dict[str, Any], secrets: list[bytes]) -> bytes | None:
        raw = msg.get("content")
        if not raw:
            return raw
        headers = {n.decode("latin-1").lower(): v.decode("latin-1") for n, v in msg["headers"]}
        coding = headers.get("content-encoding", "").strip().lower()
        if coding and coding != "identity":
            try:
                body = encoding.decode(raw, coding)
            except ValueError:
                return b""  # cannot check it: not saved
        else:
            body = raw
        assert isinstance(body, bytes)
        clean = _scrub(body, secrets)
        if self.redact:
            clean = self._redact_body(clean, headers.get("content-type", ""))
        if clean == body:
            return raw
        if coding and coding != "identity":
            try:
                return encoding.encode(clean, coding)
            except ValueError:
                return b""
        return clean

    def _redact_body(self, body: bytes, ctype: str) -> bytes:
        if "json" in ctype or body[:1] in (b"{", b"["):
            try:
                data = json.loads(body)
            except ValueError:
                pass
            else:
                out = _redact_json(data, self.redact)
                return json.dumps(out).encode() if out != data else body
        if "x-www-form-urlencoded" in ctype:
            fields = parse_qsl(body.decode(errors="surrogateescape"), keep_blank_values=True)
            if any(_field(k) in self.redact for k, _ in fields):
                return urlencode([(k, "x" * len(v) if _field(k) in self.redact else v) for k, v in fields]).encode(
                    errors="surrogateescape")
        return body

    # -- files ---------------------------------------------------------------------------------
    def _current(self) -> IO[bytes]:
        now = time.time()
        f = self._file
        if f is not None and (f.tell() >= self.max_size or now - self._opened >= self.max_age):
            self._close()
            f = None
        if f is None:
            assert self.dir is not None
            self._seq += 1
            stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
            self._path = self.dir / f"{PREFIX}{stamp}-{self._seq:06d}{SUFFIX}"
            f = self._file = self._path.open("ab")
            self._opened = now
            self._prune()
        return f

    def _prune(self) -> None:
        if not self.keep or self.dir is None:
            return
        files = sorted(self.dir.glob(f"{PREFIX}*{SUFFIX}"))
        for old in files[: max(0, len(files) - self.keep)]:
            if old != self._path:
                old.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def files(self) -> list[Path]:
        return sorted(self.dir.glob(f"{PREFIX}*{SUFFIX}")) if self.dir else []


def _field(name: str) -> str:
    """``metadata[email]`` (Stripe's form style) → ``email``; others lower-cased as they are."""
    name = name.lower()
    return name[name.rfind("[") + 1:-1] if name.endswith("]") and "[" in name else name


def _scrub(value: bytes, secrets: Iterable[bytes]) -> bytes:
    if b"vk_" in value:
        value = _VAULT_KEY.sub(MASK, value)
    for s in secrets:
        if s in value:
            value = value.replace(s, CREDENTIAL_MASK)
    return value


def _redact_json(data: Any, names: frozenset[str]) -> Any:
    if isinstance(data, dict):
        return {k: (_masked(v) if isinstance(k, str) and k.lower() in names else _redact_json(v, names))
                for k, v in data.items()}
    if isinstance(data, list):
        return [_redact_json(v, names) for v in data]
    return data


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return "x" * len(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        return 0
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    return None
