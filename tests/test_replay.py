"""spendgate replay, in process: captured traffic against candidate policies.

``tests/flows/demo.mitm`` is real SDK traffic captured through a real gateway (see
test_replay_flows.py); the other captures are built here, one oddity each."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner
from mitmproxy import http, io
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from spendgate.cli import main
from spendgate.replay import Replay, Row

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "tests" / "flows" / "demo.mitm"
EXAMPLE = (ROOT / "policies" / "example.yaml").read_text()


def policy(tmp_path: Path, text: str, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def replay(candidate: Path, *inputs: Path, old: Path | None = None, **kw: object) -> tuple[list[Row], Replay]:
    with Replay(candidate, old=old, **kw) as r:  # type: ignore[arg-type]
        rows = list(r.run(inputs))
    return rows, r


def test_the_capture_replays_unchanged_under_its_own_policy(tmp_path: Path) -> None:
    rows, r = replay(policy(tmp_path, EXAMPLE), DEMO)
    assert len(rows) == 16 and not [row for row in rows if row.changed]
    assert all(row.now.cost == row.then.cost for row in rows), [(r.then, r.now) for r in rows if r.now.cost != r.then.cost]
    assert r.summary.line() == "would newly refuse 0 calls worth $0.00; would newly allow 0; spend $46.26 → $46.26"


def test_a_tighter_policy(tmp_path: Path) -> None:
    tight = policy(tmp_path, EXAMPLE.replace("max_request_usd: 200", "max_request_usd: 15"))
    rows, r = replay(tight, DEMO)
    changed = [(row.n, row.then.decision, row.now.decision, row.now.reason, row.then.cost) for row in rows if row.changed]
    assert changed == [
        (1, "allow", "deny", "request_over_limit", Decimal("20.00")),
        (2, "allow", "deny", "request_over_limit", Decimal("16.2000")),
        (4, "allow", "deny", "request_over_limit", Decimal("0")),  # a confirm: default_estimate_usd 50 > 15
    ]
    assert r.summary.line() == "would newly refuse 3 calls worth $36.20; would newly allow 0; spend $46.26 → $10.06"


def test_a_looser_policy(tmp_path: Path) -> None:
    loose = policy(tmp_path, EXAMPLE.replace('"GET /v1/payment_intents/*",', '"GET /v1/payment_intents/*", "GET /v1/customers",')
                   .replace("max_request_usd: 200", "max_request_usd: 2000")
                   .replace("key_usd: 500, key_daily_usd: 200", "key_usd: 5000, key_daily_usd: 2000"))
    rows, r = replay(loose, DEMO)
    changed = {row.n: row for row in rows if row.changed}
    assert sorted(changed) == [5, 7]
    assert (changed[7].then.reason, changed[7].now.decision) == ("endpoint_not_allowed", "allow")
    assert (changed[5].then.reason, changed[5].now.decision) == ("request_over_limit", "allow")
    # nothing was sent then, so nothing can be priced: counted at the estimate, flagged
    assert changed[5].now.cost == Decimal(500) and changed[5].now.cost_status == "unknown"
    assert r.summary.newly_allowed == 2 and r.summary.newly_refused == 0
    assert r.summary.spend_now == r.summary.spend_then + Decimal(500)


def test_diff_of_a_policy_with_itself_changes_nothing(tmp_path: Path) -> None:
    a, b = policy(tmp_path, EXAMPLE, "a.yaml"), policy(tmp_path, EXAMPLE, "b.yaml")
    rows, r = replay(b, DEMO, old=a)
    assert len(rows) == 16 and r.summary.changed == 0


def test_diff_two_policies(tmp_path: Path) -> None:
    a = policy(tmp_path, EXAMPLE, "a.yaml")
    b = policy(tmp_path, EXAMPLE.replace("max_request_usd: 200", "max_request_usd: 15"), "b.yaml")
    _, r = replay(b, DEMO, old=a)
    assert r.summary.line() == "would newly refuse 3 calls worth $36.20; would newly allow 0; spend $46.26 → $10.06"


# --------------------------------------------------------------------------- the command


def test_cli_table_json_csv_and_exit_codes(tmp_path: Path) -> None:
    tight = policy(tmp_path, EXAMPLE.replace("max_request_usd: 200", "max_request_usd: 15"))
    same = policy(tmp_path, EXAMPLE, "same.yaml")
    run = CliRunner().invoke
    out = run(main, ["replay", str(DEMO), "--config", str(tight)])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:4] == ["#", "TIME", "(UTC)", "KEY"]
    marked = [line for line in lines if line.startswith("*")]
    assert len(marked) == 3 and all("request_over_limit" in line for line in marked)
    assert "would newly refuse 3 calls worth $36.20; would newly allow 0; spend $46.26 → $10.06" in out.output

    doc = json.loads(run(main, ["replay", str(DEMO), "--config", str(tight), "--json"]).output)
    assert len(doc["rows"]) == 16 and doc["summary"]["newly_refused"] == 3
    assert [r["n"] for r in doc["rows"] if r["changed"]] == [1, 2, 4]

    csv_out = run(main, ["replay", str(DEMO), "--config", str(tight), "--csv", "--only-changed"]).output
    assert csv_out.splitlines()[0].startswith("n,time,key,method,host,path,changed")
    assert [line.split(",")[0] for line in csv_out.splitlines()[1:4]] == ["1", "2", "4"]

    assert run(main, ["replay", str(DEMO), "--config", str(tight), "--fail-on", "new-refusals"]).exit_code == 1
    assert run(main, ["replay", str(DEMO), "--config", str(tight), "--fail-on", "any-change"]).exit_code == 1
    assert run(main, ["replay", str(DEMO), "--config", str(same), "--fail-on", "any-change"]).exit_code == 0
    assert run(main, ["replay", str(DEMO), "--diff", str(same), str(tight), "--fail-on", "new-refusals"]).exit_code == 1


def test_cli_names_the_line_of_a_bad_policy(tmp_path: Path) -> None:
    bad = policy(tmp_path, EXAMPLE.replace("max_request_usd: 200", "max_request_usd: lots"))
    out = CliRunner().invoke(main, ["replay", str(DEMO), "--config", str(bad)])
    assert out.exit_code == 1 and "max_request_usd" in out.output and f"{bad}:" in out.output


# --------------------------------------------------------------------------- captures built here

SIMPLE = """\
version: 1
vendors:
  stripe: {secret: env:NOT_SET_IN_CI}
  openai: {secret: env:NOT_SET_EITHER}
policies:
  pay:
    vendors:
      stripe: {allow: ["POST /v1/payment_intents", "GET /v1/payment_intents/*"], max_request_usd: 100}
      openai: {allow: ["POST /v1/chat/completions"]}
    budget: {key_usd: 500}
    rate: RATE
"""


def captured(method: str, url: str, body: str = "", resp: http.Response | None = None, *, at: float,
             key: str | None = "key_a", headers: dict[str, str] | None = None,
             then: dict | None = None) -> http.HTTPFlow:
    """A flow as spendgate's capture saves it (placeholder credential, decision in metadata)."""
    req = http.Request.make(method, url, body, {"Authorization": f"spendgate:{key}:0123", **(headers or {})})
    req.timestamp_start = at
    flow = tflow.tflow(req=req, resp=resp if resp is not None else False)
    if key is not None:
        flow.metadata["spendgate"] = {"vendor": "stripe", "host": req.host, "key_id": key, "policy": "pay",
                                      "labels": {"team": "t"}, "decision": "allow", "reason": None,
                                      "estimated_usd": "0", "cost_usd": None, "cost_status": None, **(then or {})}
    return flow


def intent(cents: int) -> http.Response:
    return http.Response.make(200, json.dumps({"id": "pi_1", "object": "payment_intent", "amount": cents,
                                               "amount_received": cents, "currency": "usd", "status": "succeeded"}),
                              {"Content-Type": "application/json"})


def write(path: Path, flows: list) -> Path:
    with path.open("wb") as f:
        w = io.FlowWriter(f)
        for fl in flows:
            w.add(fl)
    return path


@pytest.mark.parametrize(("gap", "expected"), [
    (40.0, ["allow", "allow", "allow"]),  # 2/minute is one per 30 s: spaced 40 s apart, all pass
    (0.5, ["allow", "allow", "deny"]),  # a burst of 2, then refused
])
def test_rate_limits_see_the_captured_times(tmp_path: Path, gap: float, expected: list[str]) -> None:
    flows = [captured("GET", "https://api.stripe.com/v1/payment_intents/pi_1", resp=intent(0), at=1_700_000_000 + i * gap)
             for i in range(3)]
    rows, _ = replay(policy(tmp_path, SIMPLE.replace("RATE", "2/minute")), write(tmp_path / "c.mitm", flows))
    assert [r.now.decision for r in rows] == expected


def test_budgets_are_per_captured_key(tmp_path: Path) -> None:
    t = 1_700_000_000
    flows = [captured("POST", "https://api.stripe.com/v1/payment_intents", f"amount={9000 + i}&currency=usd",
                      intent(9000 + i), at=t + i, key=key) for i, key in enumerate(["key_a"] * 5 + ["key_b"] * 5)]
    rows, r = replay(policy(tmp_path, SIMPLE.replace("RATE", "100/second")), write(tmp_path / "c.mitm", flows))
    # key_usd 500: five $90 calls fit per key; each captured key is its own synthetic key
    assert [row.now.decision for row in rows] == ["allow"] * 10
    assert {row.key for row in rows} == {"key_a", "key_b"}
    flows = [captured("POST", "https://api.stripe.com/v1/payment_intents", f"amount={9000 + i}&currency=usd",
                      intent(9000 + i), at=t + i) for i in range(7)]
    rows, _ = replay(policy(tmp_path, SIMPLE.replace("RATE", "100/second")), write(tmp_path / "d.mitm", flows))
    assert [row.now.reason for row in rows][5:] == ["cap_exhausted", "cap_exhausted"]


def test_odd_entries_are_counted_and_skipped_never_a_crash(tmp_path: Path) -> None:
    t = 1_700_000_000
    sse = (b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[]}\n\n'
           b'data: {"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[],'
           b'"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}\n\ndata: [DONE]\n\n')
    chat = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
                       "stream": True, "stream_options": {"include_usage": True}})
    h2 = captured("GET", "https://api.stripe.com/v1/payment_intents/pi_2", resp=intent(0), at=t + 6)
    h2.request.http_version = "HTTP/2"
    h2.request.headers.pop("host", None)
    gz = captured("POST", "https://api.stripe.com/v1/payment_intents", "amount=100&currency=usd", intent(100), at=t + 7)
    gz.response.headers["Content-Encoding"] = "gzip"  # type: ignore[union-attr]
    gz.response.raw_content = b"\x1f\x8b not really gzip"  # type: ignore[union-attr]
    flows = [
        tflow.ttcpflow(),
        tflow.tflow(ws=True, resp=True),
        captured("GET", "https://example.com/", resp=http.Response.make(200, b"hi"), at=t + 1, key=None),
        captured("POST", "https://api.stripe.com/v1/payment_intents", "amount=500&currency=usd", None, at=t + 2,
                 then={"reason": "upstream_unreachable"}),  # the vendor never answered
        captured("POST", "https://api.stripe.com/v1/payment_intents", "amount=700&currency=usd",
                 http.Response.make(200, b'{"id": "pi_1", "object": "payment_int'), at=t + 3),  # truncated
        captured("POST", "https://api.stripe.com/v1/payment_intents", "amount=800&currency=usd",
                 http.Response.make(200, b"\xff\xfe\x00\x01"), at=t + 4),  # not text
        captured("POST", "https://api.openai.com/v1/chat/completions", chat,
                 http.Response.make(200, sse, {"Content-Type": "text/event-stream"}), at=t + 5),
        captured("POST", "https://api.openai.com/v1/chat/completions", chat,
                 http.Response.make(200, b"", {"Content-Type": "text/event-stream"}), at=t + 5.5),  # body not kept
        h2, gz,
    ]
    for f in flows[3:]:
        if isinstance(f, http.HTTPFlow) and f.metadata.get("spendgate"):
            f.metadata["spendgate"]["host"] = f.request.host
    path = write(tmp_path / "odd.mitm", flows)
    with path.open("ab") as f:
        good = f.tell()
        f.write(b"12345:garbage")  # a torn write at the end
    rows, r = replay(policy(tmp_path, SIMPLE.replace("RATE", "100/second")), path)
    assert dict(r.summary.skipped) == {"tcp flow": 1, "websocket": 1, "not a vendor host": 1}
    assert len(r.summary.problems) == 1
    assert str(r.summary.problems[0]).startswith(f"{path}@{good}: corrupt or truncated flow file at this byte offset")
    by_path = [(row.method, row.path, row.now.decision, row.now.cost_status, row.now.cost) for row in rows]
    # no response: counted at the estimate ($5), flagged, as the gateway counts a lost answer
    assert by_path[0] == ("POST", "/v1/payment_intents", "allow", "unknown", Decimal(5))
    assert rows[0].now.note == "no response was captured" and rows[0].now.reason is None
    assert by_path[1][2:4] == ("allow", "unknown") and by_path[2][2:4] == ("allow", "unknown")
    assert by_path[3][2:4] == ("allow", "parsed") and by_path[3][4] == Decimal("0.000075")  # 10 in + 5 out, gpt-4o
    assert by_path[4][3] in ("estimated", "unknown") and "streamed body not captured" in rows[4].now.note
    assert by_path[5][:3] == ("GET", "/v1/payment_intents/pi_2", "allow")  # HTTP/2
    assert by_path[6][2:4] == ("allow", "unknown")  # undecodable gzip
    assert r.summary.replayed == 7


def test_a_missing_input_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    _, r = replay(policy(tmp_path, SIMPLE.replace("RATE", "1/second")), tmp_path / "nope.mitm", tmp_path)
    assert [p.message for p in r.summary.problems] == [
        "no such file or directory", "no flow files (*.mitm, *.flows, *.har) in this directory"]


def test_flow_files_of_older_mitmproxy_versions(tmp_path: Path) -> None:
    """A flow in mitmproxy 8's format (flow format 18): read through mitmproxy's own migrations."""
    flow = captured("POST", "https://api.stripe.com/v1/payment_intents", "amount=1000&currency=usd", intent(1000),
                    at=1_700_000_000, then={"cost_usd": "10", "cost_status": "parsed"})
    state = flow.get_state()
    state["version"] = 18
    for conn in ("client_conn", "server_conn"):
        c = state[conn]
        c.pop("state", None)
        c["tls_established"] = True
        c["cipher_name"] = c.pop("cipher", None)
    c = state["client_conn"]
    c["address"] = c.pop("peername")
    c["tls_extensions"] = []
    s = state["server_conn"]
    s["ip_address"], s["source_address"], s["via2"] = s.pop("peername"), s.pop("sockname"), s.pop("via")
    path = tmp_path / "old.mitm"
    with path.open("wb") as f:
        tnetstring.dump(state, f)
    rows, r = replay(policy(tmp_path, SIMPLE.replace("RATE", "1/second")), path)
    assert not r.summary.problems
    assert [(row.now.decision, row.now.cost, row.then.cost) for row in rows] == [("allow", Decimal(10), Decimal(10))]


def test_har(tmp_path: Path) -> None:
    """A HAR export (no spendgate in the way): "then" is the traffic as it went, priced now."""
    body = json.dumps({"id": "pi_1", "object": "payment_intent", "amount": 25000, "amount_received": 25000,
                       "currency": "usd", "status": "succeeded"}).encode()

    def entry(i: int, url: str, post: dict | None, content: dict, status: int = 200) -> dict:
        req = {"method": "POST" if post else "GET", "url": url, "httpVersion": "HTTP/1.1",
               "headers": [{"name": "Authorization", "value": "Bearer sk_test_fromthebrowser"}],
               **({"postData": post} if post else {})}
        return {"startedDateTime": f"2024-05-01T10:00:0{i}.000Z", "time": 12, "request": req,
                "response": {"status": status, "httpVersion": "HTTP/1.1", "headers": [
                    {"name": "Content-Type", "value": "application/json"}], "content": content}}

    har = {"log": {"version": "1.2", "entries": [
        entry(0, "https://api.stripe.com/v1/payment_intents",
              {"mimeType": "application/x-www-form-urlencoded", "text": "amount=25000&currency=usd"},
              {"mimeType": "application/json", "text": base64.b64encode(body).decode(), "encoding": "base64"}),
        entry(1, "https://api.stripe.com/v1/payment_intents",
              {"mimeType": "application/x-www-form-urlencoded",
               "text": base64.b64encode(b"amount=5000&currency=usd").decode(), "encoding": "base64"},
              {}, status=0),  # never answered
        {"startedDateTime": "2024-05-01T10:00:02.000Z", "request": "not a request"},
        entry(3, "https://api.stripe.com/v1/refunds", {"mimeType": "x", "text": "payment_intent=pi_1"},
              {"text": "{}"}),
    ]}}
    path = tmp_path / "browser.har"
    path.write_text(json.dumps(har))
    rows, r = replay(policy(tmp_path, SIMPLE.replace("RATE", "100/second")), path)
    assert len(r.summary.problems) == 1 and "#entry 2" in str(r.summary.problems[0])
    assert [(row.then.decision, row.now.decision, row.now.reason) for row in rows] == [
        ("allow", "deny", "request_over_limit"),  # $250 > max_request_usd 100
        ("allow", "allow", None),
        ("allow", "deny", "endpoint_not_allowed"),
    ]
    assert rows[0].then.cost == Decimal(250) and rows[0].newly_refused
    assert rows[1].now.cost == Decimal(50)  # no response: counted at the estimate from the base64 body
    assert {row.key for row in rows} == {rows[0].key} and rows[0].key.startswith("cred:")


def test_a_corrupt_har_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.har"
    path.write_text('{"log": {"entries": [')
    _, r = replay(policy(tmp_path, SIMPLE.replace("RATE", "1/second")), path)
    assert len(r.summary.problems) == 1 and str(r.summary.problems[0]).startswith(f"{path}: not a HAR file")


replay_fixture: Callable[..., object] | None = None  # (the pytest plugin is tested in test_replay_plugin.py)
