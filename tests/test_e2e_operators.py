"""End to end, operators: mitmweb never shows the real key, approvals, report-only mode, logs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import SECRET_VALUES, Gateway, free_port, in_background, start_gateway

from fakes import FakeVendors

STRIPE = "https://api.stripe.com"
WEB_TOKEN = "test-web-token"


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, fakes: FakeVendors, certs: Path) -> Iterator[Gateway]:
    port = free_port()
    gw = start_gateway(tmp_path_factory.mktemp("web"), fakes, certs, tool="mitmweb",
                       extra=("--set", f"web_port={port}", "--set", f"web_password={WEB_TOKEN}",
                              "--set", "spendgate_log_format=json"))
    gw.web = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield gw
    gw.stop()



def test_mitmweb_api_never_shows_the_real_credential_even_in_flight(web: Gateway) -> None:
    _, token = web.issue("billing")

    def slow_call() -> httpx.Response:
        with web.client() as c:
            return c.get(STRIPE + "/v1/payment_intents/pi_slow",
                         headers={"Authorization": f"Bearer {token}", "X-Fake-Delay": "1.5"})

    thread, out = in_background(slow_call)
    polls: list[str] = []
    seen_in_flight = False
    with httpx.Client(base_url=web.web, params={"token": WEB_TOKEN}) as ui:  # type: ignore[attr-defined]
        while thread.is_alive():
            body = ui.get("/flows").text
            polls.append(body)
            flows = json.loads(body)
            live = [f for f in flows if f["request"]["path"].endswith("pi_slow") and not f.get("response")]
            seen_in_flight = seen_in_flight or bool(live)
            time.sleep(0.05)
        dump = ui.get("/flows/dump").content
    thread.join()
    assert "error" not in out, out.get("error")
    assert seen_in_flight, "the poll never caught the request in flight: the test proves nothing"
    everything = "".join(polls)
    for secret in SECRET_VALUES:
        assert secret not in everything, "mitmweb's API showed a real credential"
        assert secret.encode() not in dump, "a flow saved from mitmweb holds a real credential"
    assert "spendgate:key_" in everything
    assert token not in everything and token.encode() not in dump, "the vault key is shown"


def test_mitmweb_comments_and_marks(web: Gateway) -> None:
    key_id, token = web.issue("billing", "--label", "agent=ui")
    with web.client() as c:
        c.get(STRIPE + "/v1/customers", headers={"X-Vault-Key": token})
    with httpx.Client(base_url=web.web, params={"token": WEB_TOKEN}) as ui:  # type: ignore[attr-defined]
        flows = ui.get("/flows").json()
    refused = next(f for f in flows if f["request"]["path"] == "/v1/customers")
    assert refused["marked"]
    assert "endpoint_not_allowed" in refused["comment"] and key_id in refused["comment"]
    assert "agent=ui" in refused["comment"]


def test_agent_cannot_reach_mitmweb_through_the_proxy(web: Gateway) -> None:
    port = web.web.rsplit(":", 1)[1]  # type: ignore[attr-defined]
    with httpx.Client(proxy=web.proxy) as c:
        r = c.get(f"http://127.0.0.1:{port}/flows?token={WEB_TOKEN}")
    assert r.status_code == 403 and r.headers["x-spendgate-reason"] == "egress_denied"
    with httpx.Client(proxy=web.proxy) as c:
        r = c.get(f"http://localhost:{port}/flows?token={WEB_TOKEN}")
    assert r.status_code == 403


def test_approval_resumed_in_mitmweb_is_forwarded_once(web: Gateway) -> None:
    _, token = web.issue("billing")
    n = len(web.fakes.requests())

    def transfer() -> httpx.Response:
        with web.client() as c:
            return c.post(STRIPE + "/v1/transfers", headers={"X-Vault-Key": token},
                          data={"amount": "4200", "currency": "usd", "destination": "acct_ui"})

    thread, out = in_background(transfer)
    with httpx.Client(base_url=web.web, params={"token": WEB_TOKEN}) as ui:  # type: ignore[attr-defined]
        held = None
        for _ in range(60):
            held = next((f for f in ui.get("/flows").json()
                         if f["request"]["path"] == "/v1/transfers" and f["intercepted"]), None)
            if held:
                break
            time.sleep(0.05)
        assert held, "the held request is not shown as intercepted in mitmweb"
        assert "HELD for approval" in held["comment"]
        # tornado's XSRF check: a cookie and a header that agree (what mitmweb's UI sends)
        r = ui.post(f"/flows/{held['id']}/resume", headers={"X-XSRFToken": "t", "Cookie": "_mitmproxy_xsrf=t"})
        assert r.status_code == 200, r.text
    thread.join(10)
    assert out["result"].status_code == 200, out["result"].text
    sent = [r for r in web.fakes.requests()[n:] if r["path"] == "/v1/transfers"]
    assert len(sent) == 1


def test_decision_log_lines_are_json_without_secrets(web: Gateway) -> None:
    lines = [json.loads(line[line.index("{"):]) for line in web.log.read_text().splitlines()
             if '"event": "spendgate.decision"' in line]
    assert lines and {"decision", "reason", "vendor", "status", "key_id"} <= set(lines[0])
    text = web.log.read_text()
    for secret in SECRET_VALUES:
        assert secret not in text


# --------------------------------------------------------------------------- approvals from a shell


def start_transfer(gateway: Gateway, token: str, amount: str) -> tuple[threading.Thread, dict]:
    def transfer() -> httpx.Response:
        with gateway.client() as c:
            return c.post(STRIPE + "/v1/transfers", headers={"X-Vault-Key": token},
                          data={"amount": amount, "currency": "usd", "destination": "acct_1"})

    return in_background(transfer)


def pending(gateway: Gateway, amount_usd: str) -> dict:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = json.loads(gateway.cli("approvals", "list", "--json").stdout)
        mine = [r for r in rows if r["estimated_usd"] == amount_usd]
        if mine:
            return mine[0]
        time.sleep(0.05)
    raise AssertionError("no pending approval appeared")


@pytest.mark.parametrize("command, usd", [(("approvals", "approve"), 11), (("approve",), 14)])  # and its alias
def test_approve_from_the_cli_forwards_once(gateway: Gateway, command: tuple[str, ...], usd: int) -> None:
    _, token = gateway.issue("held")
    n = len(gateway.fakes.requests())
    thread, out = start_transfer(gateway, token, f"{usd}00")
    held = pending(gateway, str(usd))
    assert len(gateway.fakes.requests()) == n, "nothing is sent while held"
    assert gateway.cli(*command, held["id"]).stdout.strip() == f"{held['id']}: approved"
    thread.join(10)
    assert out["result"].status_code == 200
    assert [r["path"] for r in gateway.fakes.requests()[n:]] == ["/v1/transfers"]


@pytest.mark.parametrize("command, usd", [(("approvals", "deny"), 12), (("deny",), 15)])  # and its alias
def test_deny_from_the_cli(gateway: Gateway, command: tuple[str, ...], usd: int) -> None:
    _, token = gateway.issue("held")
    n = len(gateway.fakes.requests())
    thread, out = start_transfer(gateway, token, f"{usd}00")
    held = pending(gateway, str(usd))
    gateway.cli(*command, held["id"])
    thread.join(10)
    r = out["result"]
    assert r.status_code == 403 and r.headers["x-spendgate-reason"] == "approval_denied"
    assert len(gateway.fakes.requests()) == n
    again = gateway.cli("approve", held["id"], check=False)
    assert again.returncode != 0 and "denied" in again.stderr


def test_unanswered_approval_times_out(gateway: Gateway) -> None:
    _, token = gateway.issue("billing")  # the test policy's approval_timeout is 3s
    n = len(gateway.fakes.requests())
    started = time.monotonic()
    thread, out = start_transfer(gateway, token, "1300")
    thread.join(10)
    elapsed = time.monotonic() - started
    r = out["result"]
    assert r.status_code == 403 and r.headers["x-spendgate-reason"] == "approval_timeout"
    assert 2.9 <= elapsed < 5
    assert len(gateway.fakes.requests()) == n


# --------------------------------------------------------------------------- report-only mode


def test_report_only_mode_forwards_and_records_would_deny(gateway: Gateway) -> None:
    from harness import REAL_CREDENTIALS

    _, token = gateway.issue("shadow")
    n, rows = len(gateway.fakes.requests()), len(gateway.calls())
    with gateway.client() as c:
        r = c.post(STRIPE + "/v1/payment_intents", headers={"X-Vault-Key": token},
                   data={"amount": "1000", "currency": "usd", "confirm": "true", "payment_method": "pm_card_visa"})
    assert r.status_code == 200 and "x-spendgate-reason" not in r.headers
    sent = gateway.fakes.requests()[n:]
    assert len(sent) == 1
    assert dict((k.lower(), v) for k, v in sent[0]["headers"])["authorization"] == \
        f"Bearer {REAL_CREDENTIALS['STRIPE_SECRET_KEY']}"
    row = gateway.last_call(rows)
    assert (row["decision"], row["reason"]) == ("would_deny", "endpoint_not_allowed")
    assert row["cost_status"] == "parsed" and row["cost_usd"] == "10.00"
    # identity failures are never report-only
    with gateway.client() as c:
        r = c.post(STRIPE + "/v1/payment_intents", data={"amount": "1000", "currency": "usd"})
    assert r.status_code == 401
