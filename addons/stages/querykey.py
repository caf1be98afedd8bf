"""Keys in the URL (Gemini's ``?key=``, a declared vendor's ``credential: {query: …}``).

A vendor lists the query parameters that carry a key and the key header each stands for
(``Vendor.key_query``). Two small addons around the pipeline:

- :class:`QueryKeyIn` (``requestheaders``, before identify): each such parameter is taken out
  of the URL and added as its header, so identify reads it like any key slot (a vault key, a
  real key refused as ``raw_credential``, two different keys ``ambiguous_vault_key``) and
  redacts it. The key is out of the flow before any other hook sees the URL: not in mitmweb,
  saved flows, logs or the ledger.
- :class:`QueryKeyOut` (``request``, after swap): if the agent sent its key in the URL (or the
  vendor takes it there only, ``query_only``), the swap's placeholder moves from the header to
  the URL (``?key=spendgate:<key id>:<ref>``) and ``wire`` writes the real key into the request
  target only in the bytes sent upstream. A key sent in the header goes out in the header.
"""

from __future__ import annotations

from urllib.parse import unquote_plus

from mitmproxy import http

from .. import wire
from ..call import fail_closed, get_call
from ..vendors import REGISTRY, vendor_for_host

METADATA_KEY = "spendgate_query_keys"  # the parameters the agent's key came in (plain strings)


def take_query_keys(path: str, params: dict[str, str]) -> tuple[str, list[tuple[str, str, str]]]:
    """``path`` without the key parameters, and (param, header, value) for each one found."""
    base, sep, query = path.partition("?")
    if not sep:
        return path, []
    kept, found = [], []
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        param = unquote_plus(name)
        if param in params:
            found.append((param, params[param], unquote_plus(value)))
        else:
            kept.append(pair)
    if not found:
        return path, []
    return base + ("?" + "&".join(kept) if kept else ""), found


class QueryKeyIn:
    @fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        vendor = vendor_for_host(flow.request.host)
        if vendor is None or not vendor.key_query:
            return
        path, found = take_query_keys(flow.request.path, dict(vendor.key_query))
        if not found:
            return
        flow.request.path = path
        for _, header, value in found:
            flow.request.headers.add(header, value)
        flow.metadata[METADATA_KEY] = sorted({param for param, _, _ in found})


class QueryKeyOut:
    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        call = get_call(flow)
        if flow.response is not None or call is None or call.wire_ref is None:
            return
        vendor = REGISTRY.get(call.vendor or "")
        if vendor is None or not vendor.key_query:
            return
        params = list(vendor.key_query) if vendor.query_only else list(flow.metadata.get(METADATA_KEY) or ())
        add = []
        for param in params:
            header = vendor.key_query[param]
            placeholder = flow.request.headers.get(header)
            if placeholder is None or not wire.move_to_query(call.wire_ref, header, param):
                continue
            del flow.request.headers[header]
            add.append(f"{param}={placeholder}")
        if add:
            sep = "&" if "?" in flow.request.path else "?"
            flow.request.path = flow.request.path + sep + "&".join(add)
