"""mitmweb as the gateway's live console: replays refused, the comment column, vendor hosts.

Two small addons at the two ends of the pipeline (``gateway.py``):

- :class:`ReplayGuard` (before identify): a flow the gateway already decided on, replayed from
  mitmweb (or ``mitmdump --client-replay``), is refused, 401 ``missing_vault_key``, recorded in
  the ledger under its key, never sent. The gateway took the agent's vault key out of the flow
  (and a placeholder that no longer resolves stands in for the real key), so nothing in it can be
  checked against the key's *current* state: the agent must send the request again. Without this
  guard a replayed flow whose vendor has an ``upstream:`` would go straight to that upstream,
  unchecked and unrecorded.
- :class:`Console` (last): adds mitmweb's ``comment`` column (decision, reason, vendor, key and
  labels, cost, budget left, written by ``record``) to the flow list, and once a call is answered
  shows it under the vendor host the agent asked for rather than the ``upstream:`` override it
  was sent to (also in flows saved with ``-w``). Outside mitmweb it only does the latter.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from mitmproxy import ctx, http

from .call import METADATA_KEY, Call, fail_closed, refuse
from .runtime import Runtime
from .vendors import vendor_for_host

log = logging.getLogger("spendgate")


class ReplayGuard:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.check(flow)

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        self.check(flow)

    def check(self, flow: http.HTTPFlow) -> None:
        if flow.is_replay != "request" or flow.response is not None:
            return
        seen = flow.metadata.get(METADATA_KEY)
        if seen is None:
            return  # not a flow the gateway decided on (identify treats it like any request)
        before = seen.summary() if isinstance(seen, Call) else dict(seen) if isinstance(seen, dict) else {}
        call = Call(vendor=before.get("vendor"), host=before.get("host"), policy=before.get("policy"))
        store = self.runtime.store
        if before.get("key_id") and store is not None:
            call.key = store.get_key(str(before["key_id"]))
        flow.metadata[METADATA_KEY] = call
        if call.host:  # the ledger and mitmweb show the vendor, not an upstream override
            flow.request.data.host = call.host
        log.info("spendgate: refused a replay of %s %s (key %s)", flow.request.method, flow.request.path,
                 call.key_id or before.get("key_id"))
        refuse(flow, "missing_vault_key",
               "a replayed flow is not sent: the gateway removed the agent's vault key from it, so it "
               "cannot be checked under the key's current state; the agent must send the request again")


class Console:
    def __init__(self) -> None:
        # flow id → what the agent asked for (scheme, host, port, authority, Host header), vendor calls only
        self._asked: dict[str, tuple[bytes, str, int, bytes, str | None]] = {}

    def configure(self, updated: set[str]) -> None:
        if "web_columns" in updated and hasattr(ctx.options, "web_columns"):
            columns: Sequence[str] = ctx.options.web_columns
            if "comment" not in columns:
                ctx.options.web_columns = [*columns, "comment"]

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        if flow.response is None and vendor_for_host(req.host):
            self._asked[flow.id] = (req.data.scheme, req.host, req.port, req.data.authority, req.headers.get("host"))

    def response(self, flow: http.HTTPFlow) -> None:
        self._restore(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._restore(flow)

    def _restore(self, flow: http.HTTPFlow) -> None:
        asked = self._asked.pop(flow.id, None)
        if asked is None:
            return
        scheme, host, port, authority, host_header = asked
        req = flow.request
        if (req.data.scheme, req.host, req.port) == (scheme, host, port):
            return
        req.data.scheme, req.data.host, req.data.port, req.data.authority = scheme, host, port, authority
        if host_header is not None and "host" in req.headers:
            req.headers["host"] = host_header
