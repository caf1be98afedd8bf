"""An in-process gateway for table tests: the real addon list under ``taddons``, flows from ``tflow``.

``Pipeline(tmp_path, policy_yaml)`` loads the policy, opens a ledger and issues keys;
``run(flow_or_request)`` drives the request hooks in order and returns the flow (a refusal
sets ``flow.response``); ``respond(flow, status, body)`` drives the response hooks as if the
vendor answered.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mitmproxy import http
from mitmproxy.test import taddons, tflow

from spendgate.call import Call, get_call
from spendgate.gateway import make_addons


def make_flow(method: str, url: str, *, headers: dict[str, str] | None = None,
              body: bytes | str | dict | list = b"") -> http.HTTPFlow:
    """A flow as the proxy sees it inside a TLS tunnel to the URL's host."""
    if isinstance(body, dict | list):
        body = json.dumps(body)
        headers = {"Content-Type": "application/json", **(headers or {})}
    if isinstance(body, str):
        body = body.encode()
    flow = tflow.tflow()
    flow.request = http.Request.make(method, url, body, headers or {})
    flow.client_conn.timestamp_tls_setup = 946681201
    flow.client_conn.sni = flow.request.host
    return flow


class Pipeline:
    def __init__(self, tmp: Path, policy: str, env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.config = tmp / "policy.yaml"
        self.config.write_text(policy)
        self.db = str(tmp / "ledger.db")
        self.env = env or {}
        self.addons = make_addons()
        self.runtime = self.addons[0]
        self.stages = self.addons[1:]

    @contextmanager
    def running(self) -> Iterator[Pipeline]:
        # what the addons read before the first explicit configure
        saved = {k: os.environ.get(k) for k in ("SPENDGATE_CONFIG", "SPENDGATE_DB", *self.env)}
        os.environ.update({"SPENDGATE_CONFIG": str(self.config), "SPENDGATE_DB": self.db, **self.env})
        try:
            with taddons.context(*self.addons) as tctx:
                tctx.configure(self.runtime, spendgate_config=str(self.config), spendgate_db=self.db)
                yield self
                self.runtime.store.flush()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def token(self, policy: str, **kw: Any) -> str:
        return self.runtime.store.issue_key(policy, 3600, **kw)[1]

    def run(self, flow: http.HTTPFlow) -> http.HTTPFlow:
        for stage in self.stages:
            if hasattr(stage, "requestheaders"):
                stage.requestheaders(flow)
        for stage in self.stages:
            if hasattr(stage, "request"):
                stage.request(flow)
        if flow.response is not None:  # refused: mitmproxy answers at once, through the response hooks
            for stage in self.stages:
                if hasattr(stage, "response"):
                    stage.response(flow)
        return flow

    def respond(self, flow: http.HTTPFlow, status: int = 200, body: bytes | dict | list = b"",
                headers: dict[str, str] | None = None, chunk: int = 0) -> http.HTTPFlow:
        """Answer ``flow`` as the vendor would (``chunk``: feed a streamed body in pieces)."""
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        flow.response = http.Response.make(status, body, headers or {})
        for stage in self.stages:
            if hasattr(stage, "responseheaders"):
                stage.responseheaders(flow)
        if callable(flow.response.stream):
            out = b""
            step = chunk or 7
            for i in range(0, len(body), step):
                out += flow.response.stream(body[i:i + step])
            flow.response.content = out  # what the agent received
            flow.response.stream = False
        for stage in self.stages:
            if hasattr(stage, "response"):
                stage.response(flow)
        return flow

    def fail(self, flow: http.HTTPFlow, msg: str = "Connection reset by peer", sent: bool = True) -> http.HTTPFlow:
        """The vendor never answered (``sent``: the request went out first)."""
        from mitmproxy import flow as mflow

        if sent:
            flow.server_conn.timestamp_tcp_setup = 1.0
            flow.request.timestamp_end = 1.0
        else:
            flow.server_conn.timestamp_tcp_setup = None
        flow.error = mflow.Error(msg)
        for stage in self.stages:
            if hasattr(stage, "error"):
                stage.error(flow)
        return flow

    def call(self, flow: http.HTTPFlow) -> Call:
        call = get_call(flow)
        assert call is not None
        return call

    def rows(self) -> list[dict[str, Any]]:
        import sqlite3

        self.runtime.store.flush()
        conn = sqlite3.connect(self.db)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY id")]
        finally:
            conn.close()


def reason(flow: http.HTTPFlow) -> str | None:
    return flow.response.headers.get("X-Spendgate-Reason") if flow.response is not None else None
