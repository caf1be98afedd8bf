"""Egress: decide at CONNECT time what happens to each tunnel.

Vendor hosts are intercepted (TLS terminated with our CA) so the later stages can
see the request. Other hosts follow ``egress:``: tunnelled untouched, without
interception, or refused. Loopback, link-local (cloud metadata) and private
addresses are refused unless listed, so an agent can't reach the gateway's admin
side or the metadata service through the proxy. A host name is resolved here and
the tunnel is pinned to the address that was checked (no DNS rebinding).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable

from mitmproxy import http, tls

from ..call import Call, fail_closed, refuse
from ..policy import host_matches, is_internal
from ..runtime import Runtime
from ..vendors import vendor_for_host


class Egress:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @fail_closed
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response or vendor_for_host(flow.request.host):
            return
        await self.check(flow)

    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        # Plain-HTTP proxy requests ("GET http://host/…") never went through CONNECT.
        # (Plain HTTP inside a CONNECT tunnel is checked again: harmless.)
        # Synchronous, returning the check only when there is one: most requests are inside a
        # vendor tunnel, and an async hook costs every one of them a coroutine.
        if flow.response or flow.client_conn.tls_established or flow.request.method == "CONNECT":
            return None
        if vendor_for_host(flow.request.host):
            return None
        return self.checked(flow)

    @fail_closed
    async def checked(self, flow: http.HTTPFlow) -> None:
        await self.check(flow)

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        address = data.context.server.address
        if address and not vendor_for_host(address[0]):
            data.ignore_connection = True  # not a vendor: tunnel the bytes untouched

    async def check(self, flow: http.HTTPFlow) -> None:
        state = self.runtime.state
        assert state is not None
        rules = state.config.egress
        host = flow.request.host
        flow.metadata["spendgate"] = Call()
        if host_matches(host, rules.deny):
            refuse(flow, "egress_denied", f"{host} is denied by the egress policy")
            return
        listed = host_matches(host, rules.allow)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, flow.request.port, type=socket.SOCK_STREAM
            )
        except (OSError, UnicodeError):
            refuse(flow, "egress_denied", f"{host} does not resolve")
            return
        addresses = [info[4][0] for info in infos]
        internal = [a for a in addresses if is_internal(a)]
        if internal and not (listed or any(host_matches(a, rules.allow) for a in internal)):
            refuse(flow, "egress_denied",
                   f"{host} is an internal address ({internal[0]}); list it under egress.allow to reach it")
            return
        if not listed and rules.default == "deny":
            refuse(flow, "egress_denied", f"{host} is not in egress.allow (egress default: deny)")
            return
        del flow.metadata["spendgate"]  # allowed: nothing to record
        # Pin the connection to the address we checked; keep the Host header as sent.
        host_header = flow.request.headers.get("host")
        flow.request.host = addresses[0]
        if host_header is not None:
            flow.request.headers["host"] = host_header
