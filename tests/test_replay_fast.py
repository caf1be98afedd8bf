"""Replay's fast path decides exactly as mitmproxy's own dispatch does.

``spendgate replay`` (``Replay(fast=True)``, the default) calls the hooks through the pipeline's
own dispatcher and runs the ledger work in the hook; ``Replay(fast=False)`` sends every hook
through a real in-process mitmproxy ``Master`` (``AddonManager.trigger_event``, the ``update``
event after each hook, the stages' worker threads). The same captures go through both, under
policies that exercise every stateful part (per-request limits, caps, rate limits, the loop
breaker, approvals, report mode, models), and every call's decision, reason, cost, cost status,
status and note must be the same.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, http, io

from spendgate.captures import ReadHeaders
from spendgate.gateway import make_addons
from spendgate.pipeline import Pipeline, response, vendor_flow
from spendgate.replay import Replay, key_headers, prepare, replay_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "tests" / "flows" / "demo.mitm"
EXAMPLE = (ROOT / "policies" / "example.yaml").read_text()


def capture(path: Path, copies: int, *, strip: bool = False, gap: float = 7.0) -> Path:
    """The demo capture (real SDK traffic through a real gateway) ``copies`` times, ``gap`` seconds
    apart, each copy by its own keys (half of them the same key, so caps and rates bite).
    ``strip``: as a plain ``mitmdump -w`` would have saved it (no spendgate metadata)."""
    with DEMO.open("rb") as f:
        flows = list(io.FlowReader(f).stream())
    with path.open("wb") as out:
        w = io.FlowWriter(out)
        for i in range(copies):
            for fl in flows:
                c = fl.copy()
                c.request.timestamp_start += gap * i  # type: ignore[attr-defined]
                meta = c.metadata.get("spendgate")
                if strip:
                    c.metadata.pop("spendgate", None)
                elif meta and meta.get("key_id"):
                    meta["key_id"] = f"{meta['key_id']}-{i % 3 if i % 2 else 0}"
                w.add(c)
    return path


def rows(candidate: Path, inputs: list[Path], *, fast: bool, **kw: Any) -> list[tuple[Any, ...]]:
    with Replay(candidate, fast=fast, **kw) as r:
        out = [(row.n, row.key, row.method, row.host, row.path, row.then.public(), row.now.public())
               for row in r.run(inputs)]
        out.append(("summary", r.summary.public()))
    return out


POLICIES = {
    "as captured": EXAMPLE,
    "tighter": EXAMPLE.replace("max_request_usd: 200", "max_request_usd: 15"),
    "caps, rate and loop": EXAMPLE.replace(
        "budget: {key_usd: 500, key_daily_usd: 200, policy_daily_usd: 2000, policy_monthly_usd: 20000}",
        "budget: {key_usd: 40, key_daily_usd: 30, policy_daily_usd: 60}").replace(
        "rate: 60/minute", "rate: 3/minute").replace("loop: {repeats: 3, window: 10m}", "loop: {repeats: 2, window: 10m}"),
    "approvals": EXAMPLE.replace('approve: ["POST /v1/refunds"]', 'approve: ["POST /v1/payment_intents"]'),
    "report mode": EXAMPLE.replace("max_request_usd: 200", "max_request_usd: 15").replace(
        "policies:\n", "mode: report\npolicies:\n", 1),
    "models": EXAMPLE.replace('models: {allow: ["gpt-4o-mini*", "gpt-4.1-*", "text-embedding-3-*"], deny: ["*-pro*"]}',
                              'models: {allow: ["gpt-3*"]}').replace("max_output_tokens: 1024", "max_output_tokens: 10"),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_the_fast_path_decides_as_mitmproxy_dispatch_does(tmp_path: Path, name: str) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICIES[name])
    inputs = [capture(tmp_path / "week.mitm", 12)]
    fast, reference = rows(policy, inputs, fast=True), rows(policy, inputs, fast=False)
    assert len(fast) == 12 * 16 + 1
    assert fast == reference


def test_the_fast_path_with_diff_and_traffic_from_elsewhere(tmp_path: Path) -> None:
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(EXAMPLE)
    new.write_text(POLICIES["caps, rate and loop"])
    inputs = [capture(tmp_path / "week.mitm", 6)]
    assert rows(new, inputs, fast=True, old=old) == rows(new, inputs, fast=False, old=old)
    # a plain mitmdump capture: "then" comes from the baseline pipeline, keys from the credentials
    plain = [capture(tmp_path / "plain.mitm", 6, strip=True)]
    fast = rows(new, plain, fast=True, policy="billing-agent")
    assert fast == rows(new, plain, fast=False, policy="billing-agent")
    assert {r[6]["decision"] for r in fast[:-1]} >= {"allow", "deny"}


def test_the_fast_path_is_what_replay_uses() -> None:
    assert Replay.__init__.__kwdefaults__["fast"] is True


class Boom:
    """An addon before the chain: its request handler raises (mitmproxy logs it and carries on),
    its response handler halts the event (no later addon sees the response)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.seen.append("requestheaders")
        raise ValueError("boom")

    def response(self, flow: http.HTTPFlow) -> None:
        self.seen.append("response")
        if flow.request.path.endswith("halt"):
            raise exceptions.AddonHalt()


@pytest.mark.parametrize("path", ["/v1/payment_intents/pi_1", "/v1/payment_intents/halt"])
def test_addon_errors_and_halts_as_in_mitmproxy(tmp_path: Path, path: str, caplog: pytest.LogCaptureFixture) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(EXAMPLE.replace('"GET /v1/payment_intents/*"', '"GET /v1/payment_intents/**"'))
    policy = replay_config(policy, tmp_path / "run")  # stand-in credentials
    seen = []
    for fast in (True, False):
        addons = make_addons()
        boom = Boom()
        addons.insert(1, boom)
        with caplog.at_level(logging.ERROR), Pipeline(policy, ":memory:", addons=addons, fast=fast) as p:
            token = p.issue_key("billing-agent")
            out = p.run(vendor_flow("GET", f"https://api.stripe.com{path}", {"X-Vault-Key": token}),
                        response(200, b'{"id": "pi_1", "object": "payment_intent", "amount": 100}'))
            seen.append((boom.seen, out.status, out.decision, out.reason, out.refused,
                         [r.getMessage() for r in caplog.records if "Addon error: boom" in r.getMessage()]))
            caplog.clear()
    assert seen[0] == seen[1]
    assert seen[0][1] == 200 and not seen[0][4]
    assert seen[0][2] == (None if path.endswith("halt") else "allow")  # halted: record never saw the response
    assert seen[0][5] == ["Addon error: boom"]


def odd_flows() -> list[Any]:
    """Flows of every kind a capture may hold, in the current format."""
    from mitmproxy.test import tflow

    backed_up = tflow.tflow(resp=True)
    backed_up.backup()
    backed_up.request.path = "/changed"
    errored = tflow.tflow(err=True)
    errored.server_conn.certificate_list = tflow.tserver_conn().certificate_list
    with DEMO.open("rb") as f:
        demo = list(io.FlowReader(f).stream())
    return [*demo, tflow.tflow(), tflow.tflow(resp=True), errored, backed_up, tflow.tflow(ws=True, resp=True),
            tflow.ttcpflow(), tflow.tudpflow(), tflow.tdnsflow(resp=True)]


def test_the_reader_reads_what_mitmproxy_reads(tmp_path: Path) -> None:
    import copy

    from mitmproxy.io import tnetstring

    from spendgate.captures import CapturedFlow, load_flow, read_tnetstring

    path = tmp_path / "all.mitm"
    with path.open("wb") as f:
        w = io.FlowWriter(f)
        for fl in odd_flows():
            w.add(fl)
        old = odd_flows()[0].get_state()  # and one in mitmproxy 8's format, migrated by mitmproxy
        old["version"] = 18
        for conn in ("client_conn", "server_conn"):
            c = old[conn]
            c.pop("state", None)
            c["tls_established"] = True
            c["cipher_name"] = c.pop("cipher", None)
        old["client_conn"]["address"] = old["client_conn"].pop("peername")
        old["client_conn"]["tls_extensions"] = []
        s = old["server_conn"]
        s["ip_address"], s["source_address"], s["via2"] = s.pop("peername"), s.pop("sockname"), s.pop("via")
        tnetstring.dump(old, f)
    with path.open("rb") as f:
        theirs = list(io.FlowReader(f).stream())
    ours = []
    with path.open("rb") as f:
        while (raw := read_tnetstring(f)) is not None:
            ours.append(load_flow(raw))
    assert len(ours) == len(theirs) == len(odd_flows()) + 1
    assert [type(fl).__mro__[1 if isinstance(fl, CapturedFlow) else 0] for fl in ours] == [type(fl) for fl in theirs]
    current_http = [fl for fl in ours if isinstance(fl, CapturedFlow)]
    assert len(current_http) == 16 + 5  # the old one was migrated by mitmproxy into a plain HTTPFlow
    assert all(fl.type == "http" and "client_conn" in fl._conn_states for fl in current_http)  # not parsed yet
    deep = copy.deepcopy(ours[1])  # (unparsed connections travel with a deep copy)
    assert "client_conn" in deep._conn_states
    assert deep.client_conn.get_state() == theirs[1].client_conn.get_state()
    ours[2].server_conn = theirs[2].server_conn  # set before ever read: the captured bytes are dropped
    assert ours[2].server_conn is theirs[2].server_conn and "server_conn" not in ours[2]._conn_states
    assert [fl.get_state() for fl in ours] == [fl.get_state() for fl in theirs]  # (parses them)
    assert [set(fl.__dict__) - {"_conn_states"} for fl in ours] == [set(fl.__dict__) for fl in theirs]  # every field
    assert ours[0].client_conn is ours[0].client_conn and not ours[0]._conn_states
    copies = [fl.copy() for fl in ours]  # (a copy has new ids: mitmproxy's Serializable.copy)
    assert [type(c) for c in copies] == [type(fl) for fl in theirs]
    assert [_no_ids(c.get_state()) for c in copies] == [_no_ids(fl.get_state()) for fl in theirs]


def _no_ids(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: _no_ids(v) for k, v in state.items() if k != "id"}
    if isinstance(state, list | tuple):
        return [_no_ids(v) for v in state]
    return state


def test_a_damaged_flow_file_is_a_problem_never_a_crash(tmp_path: Path) -> None:
    from spendgate.captures import Reader

    data = DEMO.read_bytes()
    whole = list(Reader.of([DEMO]))
    assert len(whole) == 16
    for cut in range(1, len(data), 997):  # cut anywhere
        path = tmp_path / "cut.mitm"
        path.write_bytes(data[:cut])
        reader = Reader.of([path])
        entries = list(reader)
        assert len(reader.problems) == 1 and len(entries) < 16
        assert [e.flow.get_state() for e in entries if e.flow] == [e.flow.get_state() for e in whole[:len(entries)]]
    for at in range(5, len(data), 1009):  # a byte changed anywhere: reported or read, never raised
        path = tmp_path / "flip.mitm"
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:])
        reader = Reader.of([path])
        entries = list(reader)
        assert reader.problems or len(entries) == 16


def test_a_replay_that_cannot_start_leaves_nothing_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import tempfile

    import spendgate.replay
    from spendgate.policy import ConfigError

    loops: list[asyncio.AbstractEventLoop] = []
    dirs: list[tempfile.TemporaryDirectory[str]] = []
    new_loop, new_dir = asyncio.new_event_loop, tempfile.TemporaryDirectory
    monkeypatch.setattr(spendgate.replay.asyncio, "new_event_loop", lambda: loops.append(new_loop()) or loops[-1])
    monkeypatch.setattr(spendgate.replay.tempfile, "TemporaryDirectory",
                        lambda **kw: dirs.append(new_dir(**kw)) or dirs[-1])
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(EXAMPLE)
    bad.write_text(EXAMPLE.replace("max_request_usd: 200", "max_request_usd: lots"))
    with pytest.raises(ConfigError, match="max_request_usd"):
        Replay(good, old=bad)  # the candidate's side is up when the old policy fails
    assert loops and all(loop.is_closed() for loop in loops)
    assert dirs and not any(Path(d.name).exists() for d in dirs)


def prepare_by_setters(captured: http.HTTPFlow, host: str, token: str) -> http.Request:
    """What replay's ``prepare`` must give: the captured request copied, its key headers dropped,
    then mitmproxy's own setters (the code ``prepare`` replaced, which did exactly this)."""
    req = copy.copy(captured.request)
    req.data = copy.copy(captured.request.data)
    req.data.headers = http.Headers(tuple(
        (k, v) for k, v in captured.request.headers.fields
        if k.decode("latin-1").lower() not in key_headers() and not v.startswith(b"spendgate:")))
    req.headers["X-Vault-Key"] = token
    req.scheme, req.port = "https", 443
    req.host = host
    if req.is_http2 or req.is_http3:
        req.authority = host
    elif "host" not in req.headers:
        req.headers.insert(0, "Host", host)
    return req


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/2.0", "HTTP/3", "HTTP/1.0"])
@pytest.mark.parametrize("headers", [
    [],
    [("Host", "api.stripe.com")],
    [("host", "evil.example:8443"), ("Accept", "*/*"), ("HOST", "again.example")],
    [("Authorization", "Bearer spendgate:key_1:0"), ("X-Vault-Key", "vk_x"), ("Content-Type", "application/json"),
     ("X-Api-Key", "sk-real"), ("X-Other", "spendgate:key_2:0"), ("x-goog-api-key", "g"), ("Accept", "a")],
    [("X-Vault-Key", "vk_1"), ("Host", "api.openai.com"), ("X-Vault-Key", "vk_2"), ("Ünïcode", "välue")],
])
@pytest.mark.parametrize("authority", ["", "api.stripe.com:443"])
@pytest.mark.parametrize("host", ["api.stripe.com", "bücher.example"])
def test_prepare_gives_the_request_mitmproxys_setters_give(version: str, headers: list[tuple[str, str]],
                                                          authority: str, host: str) -> None:
    req = http.Request.make("POST", "http://127.0.0.1:8080/v1/x?q=1", b"body")
    req.http_version = version
    req.authority = authority
    req.headers.fields = tuple((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
    captured = http.HTTPFlow(vendor_flow("GET", "https://x.example/").client_conn,
                             vendor_flow("GET", "https://x.example/").server_conn)
    captured.request = req
    before = captured.request.get_state()
    flow = prepare(captured, host, "vk_replay_token")
    assert flow.request.get_state() == prepare_by_setters(captured, host, "vk_replay_token").get_state()
    assert captured.request.get_state() == before  # the captured flow is not changed
    assert flow.client_conn.sni == host and flow.server_conn.address == (host, 443)
    again = prepare(captured, host, "t")
    assert flow.client_conn is not again.client_conn and flow.id != again.id  # each its own copy and id
    made = http.HTTPFlow(flow.client_conn, flow.server_conn)  # what it stands for
    made.request = flow.request
    assert set(flow.__dict__) == set(made.__dict__) and not flow.metadata and flow.metadata is not again.metadata
    assert _no_ids(flow.get_state()) == _no_ids({**made.get_state(), "timestamp_created": flow.timestamp_created})


@pytest.mark.parametrize("fields", [
    (),
    ((b"Host", b"a"), (b"content-type", b"application/json"), (b"X-A", b"1"), (b"x-a", b"2"), (b"X-\xc3\xa9", b"\xff\xfe")),
    ((b"CONTENT-ENCODING", b"gzip"), (b"Connection", b"keep-alive, Upgrade"), (b"Upgrade", b"")),
])
def test_read_headers_look_up_as_mitmproxys_headers_do(fields: tuple[tuple[bytes, bytes], ...]) -> None:
    fast, ref = ReadHeaders(fields), http.Headers(fields)
    assert isinstance(fast, http.Headers)
    for name in ["host", "HOST", b"host", "content-type", "x-a", b"X-A", "x-é", "X-\udcc3\udca9",
                 "content-encoding", "connection", "upgrade", "missing", b"missing", ""]:
        assert (name in fast) == (name in ref), name
        assert fast.get(name) == ref.get(name) and fast.get(name, "d") == ref.get(name, "d"), name
        assert fast.get_all(name) == ref.get_all(name), name
        got = [fast[name]] if name in ref else []
        assert got == ([ref[name]] if name in ref else []), name
        if name not in ref:
            with pytest.raises(KeyError):
                fast[name]
    fast["X-New"] = "v"
    ref["X-New"] = "v"
    assert fast.fields == ref.fields and fast.get("x-new") == "v"


def test_price_lookups_are_remembered_per_table() -> None:
    from decimal import Decimal

    from spendgate.vendors import _llm
    from spendgate.vendors.base import Prices
    from spendgate.vendors.openai import VENDOR

    shipped = Prices().table(VENDOR)
    model = next(iter(shipped["models"]))
    x = Decimal(1)
    first = _llm.lookup(shipped, model, x, x)
    assert _llm.lookup(Prices().table(VENDOR), model, x, x) is first  # (a new merge, the same rows)
    assert _llm.lookup(shipped, model, x, x) == _llm._lookup(shipped, model, x, x)
    assert _llm.lookup(shipped, model, x, Decimal(3)) == _llm._lookup(shipped, model, x, Decimal(3)) != first
    # a policy's prices: override: its own rates, never the shipped ones remembered
    over = Prices(overrides={"openai": {"models": {model: {"input": 123, "output": 456}}}}).table(VENDOR)
    rates = _llm.lookup(over, model, x, x)
    assert (rates.input, rates.output) == (Decimal(123), Decimal(456)) and rates == _llm._lookup(over, model, x, x)
    fallback = Prices(overrides={"openai": {"fallback": {"input": 9999, "output": 9999}}}).table(VENDOR)
    unknown = _llm.lookup(fallback, "no-such-model", x, x)
    assert unknown.input == Decimal(9999) and unknown != _llm.lookup(shipped, "no-such-model", x, x)
    assert _llm.lookup(shipped, None, x, x) == _llm._lookup(shipped, None, x, x)


def test_endpoint_decisions_are_remembered_per_config(tmp_path: Path) -> None:
    from spendgate.policy import _decide, decide, load_config

    loose = load_config(tmp_path.joinpath("a.yaml").write_text(EXAMPLE) and tmp_path / "a.yaml")
    tight_text = EXAMPLE.replace('"POST /v1/payment_intents",', "").replace('"POST /v1/payment_intents", ', "")
    assert tight_text != EXAMPLE
    tight = load_config(tmp_path.joinpath("b.yaml").write_text(tight_text) and tmp_path / "b.yaml")
    cases = [("billing-agent", "stripe", m, p) for m in ("POST", "GET", "post", "DELETE")
             for p in ("/v1/payment_intents", "/v1/payment_intents?x=1", "/v1/payment_intents/pi_1",
                       "/v1/%70ayment_methods/pm_1", "/v1/../v1/refunds", "/v1/refunds")]
    cases += [("no-such-policy", "stripe", "GET", "/"), ("billing-agent", "no-such-vendor", "GET", "/")]
    for _ in range(2):  # (the second time from memory)
        for config in (loose, tight):
            assert [decide(config, *c) for c in cases] == [_decide(config, *c) for c in cases]
    assert decide(loose, *cases[0]) != decide(tight, *cases[0])  # the same request, each config's own verdict


@pytest.mark.parametrize("status", [400, 402, 403, 429, 503, 599])
@pytest.mark.parametrize("headers", [
    {"Content-Type": "application/json", "X-Spendgate-Reason": "cap_exhausted"},
    {"Content-Type": "application/json", "X-Spendgate-Reason": "rate_limited", "Retry-After": "3", "X-Ü": "välue"},
    {"Content-Type": "application/json", "Content-Length": "1"},  # (these go through Response.make itself)
    {"transfer-encoding": "chunked"},
    {"Content-Encoding": "gzip"},
])
def test_a_refusal_is_the_response_mitmproxy_makes(status: int, headers: dict[str, str]) -> None:
    from spendgate.call import refusal

    body = '{"error": {"message": "nö"}}'.encode()
    ours, theirs = refusal(status, body, headers).get_state(), http.Response.make(status, body, headers).get_state()
    assert {k: v for k, v in ours.items() if not k.startswith("timestamp")} == \
        {k: v for k, v in theirs.items() if not k.startswith("timestamp")}
    assert list(ours) == list(theirs) and all(isinstance(ours[k], float) for k in ("timestamp_start", "timestamp_end"))
