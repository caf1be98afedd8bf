"""Swap: vault key out, real credential in (on the wire only, see ``wire.py``).

Every header that could carry a key is removed (X-Vault-Key, the vendor's key
headers, Authorization; identify already redacted a vault-key-shaped token anywhere
else), then the vendor's credential headers are set to a placeholder naming the key id. The
real values are registered with ``wire`` and replace the placeholder only in the
bytes sent upstream.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from mitmproxy import http

from .. import wire
from ..call import fail_closed, get_call, refuse
from ..runtime import Runtime
from ..vendors import REGISTRY, vendor_for_host
from .identify import VAULT_HEADER


class Swap:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if flow.response:
            return
        if call is None or call.key is None:
            # Defence in depth: nothing reaches a vendor without a checked key.
            if vendor_for_host(flow.request.host):
                refuse(flow, "internal_error", "the request was not checked; it was not sent")
            return
        state = self.runtime.state
        assert state is not None
        vendor = REGISTRY[call.vendor or ""]
        creds = state.credentials.get(vendor.name)
        if not creds:  # nothing to forward with, whatever the mode
            refuse(flow, "vendor_not_allowed", f"no credentials are configured for {vendor.name}")
            return
        real = vendor.credential_headers(creds)
        call.wire_ref, placeholder = wire.register(call.key.id, real)
        # identify already redacted every key the agent sent: drop those slots, then add the
        # placeholders (one pass over the fields; Headers.pop rescans them per name)
        drop = {n.lower().encode() for n in (VAULT_HEADER, "authorization", *vendor.key_headers, *real)}
        flow.request.headers.fields = tuple(
            f for f in flow.request.headers.fields if f[0].lower() not in drop
        ) + tuple((name.encode(), placeholder.encode()) for name in real)
        flow.request.path = vendor.rewrite_path(flow.request.path, creds)
        upstream = state.config.vendors[vendor.name].upstream
        if upstream:
            u = urlsplit(upstream)
            flow.request.scheme = u.scheme
            # port first, straight into the data: the host setter then updates Host/authority once
            flow.request.data.port = u.port or (443 if u.scheme == "https" else 80)
            flow.request.host = u.hostname or flow.request.host
