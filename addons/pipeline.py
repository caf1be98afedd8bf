"""The gateway in process: flows through the real addon list, with no network.

:class:`Pipeline` builds the addons of ``spendgate.gateway`` (or a list you give), adds them to a
real mitmproxy :class:`~mitmproxy.master.Master` (its :class:`~mitmproxy.addonmanager.AddonManager`
loads and configures them exactly as ``mitmdump -s addons/gateway.py`` does), and pushes each flow
through mitmproxy's own dispatch (``AddonManager.handle_lifecycle``) in the order mitmproxy's HTTP
layer emits the hooks:

    http_connect (the CONNECT of the tunnel) → requestheaders → request
      → refused by an addon: responseheaders → response
      → forwarded:           responseheaders → (streamed body, if an addon asked) → response
      → vendor never answers: error

The vendor is replaced by the response you give (an :class:`~mitmproxy.http.Response`, or a
function of the request as it would go on the wire, real credential included); nothing is sent.
``spendgate replay`` runs captured traffic through it, and the tests drive every stage with it.

``fast=True`` (what ``spendgate replay`` uses) keeps every addon, stage and hook order and only
changes how the hooks are called: once the addons are loaded and configured through the
AddonManager, each hook is dispatched through a list of the addons' handlers in the order
``AddonManager.trigger_event`` walks them (taken once from the manager: its addon chain, each
addon's children), with the same isolation (an addon's exception is logged and the next addon
runs; ``AddonHalt`` ends the event), no ``update`` event (nothing displays the flows), and the
ledger work the stages would hand to a worker thread run in the hook (the in-memory ledger never
blocks). ``tests/test_replay_fast.py`` replays the same captures both ways and compares every
decision, reason and cost.

What it does not do: open sockets, resolve DNS for vendor hosts (egress does resolve the
non-vendor hosts it is asked about, as it does in production), or fire ``running`` (so no policy
file watcher and no admin listener run). Hooks run on the pipeline's own event loop; one pipeline
at a time per thread (mitmproxy's ``ctx`` is global).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import types
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from mitmproxy import addonmanager, exceptions, hooks, http, log, master, options
from mitmproxy.addons import core, proxyserver
from mitmproxy.flow import Error
from mitmproxy.proxy.layers.http import _hooks as http_hooks
from mitmproxy.test import tflow

from . import wire
from .call import Call, get_call
from .runtime import Runtime

Responder = http.Response | Callable[[http.Request], http.Response]
NO_RESPONSE = "no response given to the pipeline"


@dataclass
class Outcome:
    """What happened to one flow, as an agent and the vendor would have seen it. (With
    ``Pipeline(fast=True)`` and a response given as a value, ``forwarded`` is the flow's request
    itself, without the credential the wire would carry.)"""

    flow: http.HTTPFlow
    row: dict[str, Any] | None = None  # the ledger row recorded for it (None: not a vendor call)
    call: Call | None = None
    forwarded: http.Request | None = None  # the request as it went on the wire (real credential in)
    tunnel: http.HTTPFlow | None = None  # the CONNECT flow, when the tunnel itself was refused

    @property
    def status(self) -> int | None:
        """The status the agent got (the ledger's status for an upstream error)."""
        if self.flow.response is not None:
            return self.flow.response.status_code
        return self.row["status"] if self.row else None

    @property
    def reason(self) -> str | None:
        """``X-Spendgate-Reason`` of a refusal, else the ledger's reason (report mode, errors)."""
        resp = self.flow.response
        if resp is not None and "X-Spendgate-Reason" in resp.headers:
            return resp.headers["X-Spendgate-Reason"]
        return self.row["reason"] if self.row else None

    @property
    def decision(self) -> str | None:
        return self.row["decision"] if self.row else None

    @property
    def cost_usd(self) -> Decimal | None:
        value = self.row.get("cost_usd") if self.row else None
        return Decimal(value) if value is not None else None

    @property
    def refused(self) -> bool:
        return self.forwarded is None


def vendor_flow(method: str, url: str, headers: dict[str, str] | Iterable[tuple[str, str]] = (),
                body: bytes | str = b"", *, sni: str | None = None, http_version: str = "HTTP/1.1",
                tls: bool = True) -> http.HTTPFlow:
    """A flow as mitmproxy builds it for a request inside a CONNECT tunnel to the URL's host:
    TLS established with the agent, SNI the host (or ``sni``), a live flow."""
    items = headers.items() if isinstance(headers, dict) else headers
    req = http.Request.make(method, url, body)
    req.http_version = http_version
    fields = tuple((k.encode(), v.encode()) for k, v in items)
    if http_version.startswith("HTTP/1") and not any(k.lower() == b"host" for k, _ in fields):
        fields = ((b"Host", (req.host if req.port == 443 else f"{req.host}:{req.port}").encode()), *fields)
    req.headers.fields = fields  # (after the URL: its setter would rewrite a Host header given)
    flow = tflow.tflow(req=req)
    flow.client_conn.sni = req.host if sni is None else sni
    if not tls:
        flow.client_conn.timestamp_tls_setup = None
        flow.client_conn.sni = None
    return flow


def response(status: int = 200, body: bytes | str = b"", headers: dict[str, str] | None = None) -> http.Response:
    """A vendor response (JSON content type unless given)."""
    return http.Response.make(status, body, {"Content-Type": "application/json", **(headers or {})})


class Pipeline:
    """``with Pipeline(config, db) as p: out = p.run(vendor_flow(...), response(...))``"""

    def __init__(self, config: str | Path, db: str | Path, *, addons: list[Any] | None = None,
                 updates: bool = True, fast: bool = False, loop: asyncio.AbstractEventLoop | None = None,
                 **opts: Any) -> None:
        self.updates = updates and not fast  # False: no ``update`` event after each hook (nothing shows flows)
        self.fast = fast  # hooks through this pipeline's own dispatch (see the module's docstring)
        self._handlers: dict[str, tuple[tuple[Callable[..., Any], ...], ...] | None] = {}
        if addons is None:
            from .gateway import make_addons

            addons = make_addons()
        self.addons = addons
        runtime = next((a for a in addons if isinstance(a, Runtime)), None)
        if runtime is None:
            raise ValueError("the addon list has no Runtime")
        self.runtime: Runtime = runtime
        self.rows: dict[str, tuple[dict[str, Any], Call]] = {}  # flow id → (ledger row, call)
        self.runtime.on_record.append(self._recorded)
        self._own_loop = loop is None
        self.loop = asyncio.new_event_loop() if loop is None else loop  # (several pipelines may share one)
        self.master = master.Master(options.Options(), event_loop=self.loop)
        self.manager: addonmanager.AddonManager = self.master.addons
        self.manager.add(core.Core())
        # The proxy server's and the terminal log's options (stream_large_bodies, store_streamed_bodies,
        # body_size_limit, termlog_verbosity, …) exist as in mitmdump, with their defaults; the
        # server and the terminal log themselves are not loaded.
        loader = addonmanager.Loader(self.master)
        proxyserver.Proxyserver().load(loader)
        loader.add_option("termlog_verbosity", str, "info", "Log verbosity.", choices=log.LogLevels)  # as termlog
        # As mitmdump does with its command line: options set first (those the addons add are
        # deferred until they exist), then the addons loaded and configured with them.
        self.master.options.update_defer(
            spendgate_config=str(config), spendgate_db=str(db), spendgate_admin_listen="", **opts)
        self.manager.add(*addons)
        self.master.options.deferred.pop("spendgate_admin_listen", None)  # (an addon list without the admin API)
        if unknown := sorted(self.master.options.deferred):
            raise KeyError(f"unknown mitmproxy option(s): {', '.join(unknown)}")
        # What mitmproxy's script loader does once a script's addons are registered: configure
        # each with every option (an addon registered before its options were set sees them here).
        every = set(self.master.options.keys())
        for addon in addons:
            self.manager.invoke_addon_sync(addon, hooks.ConfigureHook(every))
        if self.runtime.state is None or self.runtime.store is None:
            raise RuntimeError("the pipeline's Runtime did not load its policy")
        if fast:
            self.runtime.offload_inline = self.runtime.store.dialect == "memory"
        self._closed = False
        # Answers a held request at once (True: approve, False: deny); None: it waits for an answer
        # from the ledger (spendgate approve/deny, the store's decide_approval) or its timeout.
        self.on_hold: Callable[[http.HTTPFlow, Call], bool] | None = None

    def _recorded(self, row: dict[str, Any], call: Call) -> None:
        self.rows[row["flow_id"]] = (row, call)

    # -- keys ----------------------------------------------------------------------------------
    def issue_key(self, policy: str, ttl_seconds: int | None = 3600, **kw: Any) -> str:
        """A vault key for ``policy`` in the pipeline's ledger (``labels=``, ``cap_usd=``)."""
        assert self.runtime.store is not None
        return self.runtime.store.issue_key(policy, ttl_seconds, **kw)[1]

    # -- running flows -------------------------------------------------------------------------
    def run(self, flow: http.HTTPFlow, respond: Responder | None = None, *, error: str | None = None,
            sent: bool = True, connect: bool = True, chunk: int = 0) -> Outcome:
        """Push ``flow`` through the pipeline; see :meth:`arun`."""
        return self.loop.run_until_complete(
            self.arun(flow, respond, error=error, sent=sent, connect=connect, chunk=chunk))

    async def arun(self, flow: http.HTTPFlow, respond: Responder | None = None, *, error: str | None = None,
                   sent: bool = True, connect: bool = True, chunk: int = 0) -> Outcome:
        """Push ``flow`` through the hooks; the vendor answers with ``respond`` if the request is
        forwarded. ``error`` instead: the vendor never answered (``sent``: after the request went
        out). ``connect``: first the CONNECT of the flow's tunnel (HTTPS flows). ``chunk``: feed a
        streamed response body to the stream function in pieces of this size (0: one piece).
        A forwarded request with neither ``respond`` nor ``error`` ends as an upstream error
        before anything was sent."""
        if connect and flow.client_conn.tls_established:
            tunnel = connect_flow(flow)
            await self._hook(http_hooks.HttpConnectHook, tunnel)
            if tunnel.response is not None and tunnel.response.status_code != 200:
                return self._outcome(flow, tunnel=tunnel, src=tunnel)
        await self._hook(http_hooks.HttpRequestHeadersHook, flow)
        flow.request.timestamp_end = flow.request.timestamp_end or time.time()
        await self._hook(http_hooks.HttpRequestHook, flow)
        if flow.intercepted:  # held (approve): wait as mitmproxy does, until resumed or killed
            call = get_call(flow)
            if self.on_hold is not None and call is not None and call.approval_id is not None:
                if self.on_hold(flow, call):
                    flow.resume()  # as resuming it in mitmweb does: approved
                else:
                    assert self.runtime.store is not None
                    self.runtime.store.decide_approval(call.approval_id, "denied", "pipeline")
            await flow.wait_for_resume()
        if flow.error is not None:  # killed while held
            await self._hook(http_hooks.HttpErrorHook, flow)
            return self._outcome(flow)
        if flow.response is not None:  # an addon answered: mitmproxy emulates responseheaders
            flow.response.timestamp_start = time.time()
            await self._hook(http_hooks.HttpResponseHeadersHook, flow)
            await self._hook(http_hooks.HttpResponseHook, flow)
            return self._outcome(flow)
        if self.fast and not callable(respond):
            # (fast: nobody looks at the bytes that would go out, only at whether they would)
            forwarded = flow.request
        else:  # a detached copy: later hooks (and wire.forget) must not change what we saw go out
            forwarded = _detached(wire.with_credentials(flow.request))
        if error is not None or respond is None:
            if not sent or error is None:
                flow.server_conn.timestamp_tcp_setup = None
            flow.error = Error(error or NO_RESPONSE)
            await self._hook(http_hooks.HttpErrorHook, flow)
            return self._outcome(flow, forwarded=forwarded)
        resp = respond(forwarded) if callable(respond) else _detached(respond)
        body = resp.raw_content or b""
        resp.data.content = None  # only the head has arrived at responseheaders
        resp.timestamp_start = time.time()
        flow.response = resp
        await self._hook(http_hooks.HttpResponseHeadersHook, flow)
        if flow.response.stream:
            out = bytearray()
            pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
            for piece in [*pieces, b""]:
                if callable(flow.response.stream):
                    got = flow.response.stream(piece)
                    out += got if isinstance(got, bytes) else b"".join(got)
                else:
                    out += piece
            if self.master.options.store_streamed_bodies:
                flow.response.data.content = bytes(out)
        else:
            flow.response.data.content = body
        flow.response.timestamp_end = time.time()
        await self._hook(http_hooks.HttpResponseHook, flow)
        return self._outcome(flow, forwarded=forwarded)

    async def _hook(self, hook: type[hooks.Hook], flow: http.HTTPFlow) -> None:
        """As mitmproxy's proxy server does: the hook, then ``update`` (for UIs) unless turned off."""
        if self.fast:
            try:
                handlers = self._handlers[hook.name]
            except KeyError:
                handlers = self._handlers[hook.name] = self._collect(hook.name)
            if handlers is not None:
                pending = _fire(handlers, (flow,), 0, 0)
                if pending is not None:
                    await pending
                return
        event = hook(flow)
        if self.updates:
            await self.manager.handle_lifecycle(event)
        else:
            await self.manager.trigger_event(event)

    def _collect(self, name: str) -> tuple[tuple[Callable[..., Any], ...], ...] | None:
        """Every handler of hook ``name``, grouped by top-level addon, in the order
        ``AddonManager.trigger_event`` calls them (``invoke_addon``: the addon, then its children).
        None (dispatch through the manager) if an addon has a non-callable attribute of that name
        that mitmproxy would report as an error."""
        groups = []
        for top in self.manager.chain:
            fns = []
            for a in addonmanager.traverse([top]):
                fn = getattr(a, name, None)
                if not fn or isinstance(fn, types.ModuleType):
                    continue
                if not callable(fn):
                    return None
                fns.append(fn)
            if fns:
                groups.append(tuple(fns))
        return tuple(groups)

    def _outcome(self, flow: http.HTTPFlow, *, forwarded: http.Request | None = None,
                 tunnel: http.HTTPFlow | None = None, src: http.HTTPFlow | None = None) -> Outcome:
        row, call = self.rows.pop((src or flow).id, (None, None))
        return Outcome(flow, row, call or get_call(src or flow), forwarded, tunnel)

    # -- the ledger ----------------------------------------------------------------------------
    def flush(self) -> None:
        assert self.runtime.store is not None
        self.runtime.store.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.loop.run_until_complete(self.manager.trigger_event(hooks.DoneHook()))
        finally:
            self.master._legacy_log_events.uninstall()
            if self._own_loop:
                self.loop.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_addon_log = logging.getLogger(addonmanager.__name__)


def _fire(groups: tuple[tuple[Callable[..., Any], ...], ...], args: tuple[Any, ...], g0: int,
          f0: int) -> Awaitable[None] | None:
    """Call the handlers from ``groups[g0][f0]`` on, as ``AddonManager.trigger_event`` does (an
    awaitable awaited before the next handler; an exception logged, and the rest of that addon
    skipped; ``AddonHalt`` ends the event). Synchronously, until a handler returns an awaitable:
    then a coroutine that awaits it and carries on."""
    for g in range(g0, len(groups)):
        fns = groups[g]
        for f in range(f0 if g == g0 else 0, len(fns)):
            try:
                res = fns[f](*args)
            except exceptions.AddonHalt:
                return None
            except exceptions.OptionsError:
                raise
            except Exception as e:
                _addon_error(e)
                break
            if res is not None and inspect.isawaitable(res):
                return _fire_rest(res, groups, args, g, f)
    return None


async def _fire_rest(res: Awaitable[Any], groups: tuple[tuple[Callable[..., Any], ...], ...],
                     args: tuple[Any, ...], g: int, f: int) -> None:
    try:
        await res
    except exceptions.AddonHalt:
        return
    except exceptions.OptionsError:
        raise
    except Exception as e:
        _addon_error(e)
        rest = _fire(groups, args, g + 1, 0)
    else:
        rest = _fire(groups, args, g, f + 1)
    if rest is not None:
        await rest


def _addon_error(e: Exception) -> None:
    _addon_log.error(f"Addon error: {e}", exc_info=e)  # as mitmproxy's safecall logs it


def connect_flow(flow: http.HTTPFlow) -> http.HTTPFlow:
    """The CONNECT request that opened ``flow``'s tunnel, as mitmproxy hands it to http_connect."""
    req = http.Request(
        host=flow.request.host, port=flow.request.port, method=b"CONNECT", scheme=b"", authority=
        f"{flow.request.host}:{flow.request.port}".encode(), path=b"", http_version=b"HTTP/1.1",
        headers=http.Headers(), content=b"", trailers=None, timestamp_start=time.time(), timestamp_end=time.time())
    tunnel = http.HTTPFlow(flow.client_conn, flow.server_conn)
    tunnel.request = req
    return tunnel


def _detached[M: (http.Request, http.Response)](message: M) -> M:
    """A copy whose head and body can change without changing ``message`` (a tenth of the cost of
    ``message.copy()``, which re-validates every field)."""
    out = object.__new__(type(message))  # (copy.copy of these plain objects, without its dispatch)
    out.__dict__.update(message.__dict__)
    out.data = data = object.__new__(type(message.data))
    data.__dict__.update(message.data.__dict__)
    data.headers = headers = object.__new__(type(message.headers))  # (its class: the fields are checked)
    headers.__dict__.update(message.headers.__dict__)
    return out


__all__ = ["NO_RESPONSE", "Outcome", "Pipeline", "Responder", "connect_flow", "response", "vendor_flow"]
