"""mitmweb as the live console, against a real mitmweb through its HTTP API and websocket: no
vault key ever (even while a body uploads), replays refused and recorded, a killed approval
answered at once, the comment column, vendor hosts instead of upstream overrides."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from harness import REAL_CREDENTIALS, SECRET_VALUES, Gateway, free_port, in_background, start_gateway
from tornado.websocket import websocket_connect

from fakes import FakeVendors

STRIPE = "https://api.stripe.com"
WEB_TOKEN = "console-web-token"
XSRF = {"X-XSRFToken": "t", "Cookie": "_mitmproxy_xsrf=t"}  # tornado's check: a cookie and a header that agree


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory, fakes: FakeVendors, certs: Path) -> Iterator[Gateway]:
    port = free_port()
    gw = start_gateway(tmp_path_factory.mktemp("console"), fakes, certs, tool="mitmweb",
                       extra=("--set", f"web_port={port}", "--set", f"web_password={WEB_TOKEN}"))  # fmt: skip
    gw.web = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield gw
    gw.stop()


def ui(web: Gateway) -> httpx.Client:
    return httpx.Client(base_url=f"http://{web.web}", params={"token": WEB_TOKEN}, timeout=10)  # type: ignore[attr-defined]


class Updates:
    """Every message mitmweb's /updates websocket sends, collected in a thread."""

    def __init__(self, web: Gateway) -> None:
        self.url = f"ws://{web.web}/updates?token={WEB_TOKEN}"  # type: ignore[attr-defined]
        self.messages: list[str] = []
        self.stop = threading.Event()
        self.connected = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()
        assert self.connected.wait(10), "no websocket connection to mitmweb"

    async def _run(self) -> None:
        conn = await websocket_connect(self.url)
        self.connected.set()
        while not self.stop.is_set():
            try:
                msg = await asyncio.wait_for(conn.read_message(), 0.2)
            except TimeoutError:
                continue
            if msg is None:
                return
            self.messages.append(msg if isinstance(msg, str) else msg.decode())
        conn.close()

    def close(self) -> str:
        self.stop.set()
        self.thread.join(5)
        return "\n".join(self.messages)



def slow_body(first: bytes, rest: bytes, pause: float) -> Iterator[bytes]:
    yield first
    time.sleep(pause)
    yield rest


def test_no_key_in_mitmweb_while_the_body_is_still_uploading(web: Gateway) -> None:
    _, token = web.issue("billing")
    real = REAL_CREDENTIALS["STRIPE_SECRET_KEY"]  # a real key an agent wrongly holds

    def upload(key: str, marker: str) -> httpx.Response:
        with web.client() as c:
            return c.post(STRIPE + "/v1/payment_intents", headers={"Authorization": f"Bearer {key}",
                          "Content-Type": "application/x-www-form-urlencoded", "X-Marker": marker},
                          content=slow_body(b"amount=100&", b"currency=usd", 1.5))  # fmt: skip

    updates = Updates(web)
    calls = [in_background(upload, token, "vault"), in_background(upload, real, "real")]
    polls, seen_uploading = [], set()
    with ui(web) as c:
        while any(t.is_alive() for t, _ in calls):
            body = c.get("/flows").text
            polls.append(body + c.get("/flows/dump").content.decode("utf-8", "replace"))
            for f in json.loads(body):
                marker = next((v for k, v in f["request"]["headers"] if k.lower() == "x-marker"), None)
                if marker and f.get("response") is None:
                    seen_uploading.add(marker)
            time.sleep(0.05)
    pushed = updates.close()
    for t, out in calls:
        t.join()
        assert "error" not in out, out.get("error")
    assert [out["result"].status_code for _, out in calls] == [200, 403]  # raw_credential for the real key
    assert seen_uploading == {"vault", "real"}, "the polls never caught the uploads: the test proves nothing"
    assert '"flows/add"' in pushed and "X-Marker" in pushed
    everything = "".join(polls) + pushed
    assert token not in everything, "mitmweb showed the vault key"
    assert real not in everything, "mitmweb showed the real key the agent sent"
    assert not any(s in everything for s in SECRET_VALUES)


def test_a_replay_from_mitmweb_is_refused_and_recorded(web: Gateway) -> None:
    key_id, token = web.issue("billing")
    with web.client() as c:
        r = c.post(STRIPE + "/v1/payment_intents", headers={"Authorization": f"Bearer {token}"},
                   data={"amount": "4200", "currency": "usd", "confirm": "true", "payment_method": "pm_card_visa"})
    assert r.status_code == 200
    rows_before = len(web.calls())
    assert web.calls()[-1]["cost_usd"] in ("42", "42.00")  # the $42 charge, parsed
    web.cli("keys", "revoke", key_id)
    sent_before = len(web.fakes.requests())
    with ui(web) as c:
        flow = next(f for f in c.get("/flows").json() if key_id in f["comment"])
        assert c.post(f"/flows/{flow['id']}/replay", headers=XSRF).status_code == 200
        for _ in range(100):
            replayed = next(f for f in c.get("/flows").json() if f["id"] == flow["id"])
            if replayed.get("response") and "missing_vault_key" in replayed["comment"]:
                break
            time.sleep(0.05)
    assert replayed["response"]["status_code"] == 401, replayed
    assert "missing_vault_key" in replayed["comment"] and key_id in replayed["comment"]
    assert replayed["request"]["host"] == "api.stripe.com"
    assert len(web.fakes.requests()) == sent_before, "a replay reached the vendor"
    row = web.calls(at_least=rows_before + 1)[-1]
    assert (row["decision"], row["reason"], row["key_id"], row["status"]) == ("deny", "missing_vault_key", key_id, 401)


def held_transfer(web: Gateway, token: str) -> tuple[threading.Thread, dict, dict]:
    def transfer() -> httpx.Response:
        with web.client() as c:
            return c.post(STRIPE + "/v1/transfers", headers={"X-Vault-Key": token},
                          data={"amount": "4200", "currency": "usd", "destination": "acct_kill"})

    thread, out = in_background(transfer)
    with ui(web) as c:
        for _ in range(100):
            held = next((f for f in c.get("/flows").json()
                         if f["request"]["path"] == "/v1/transfers" and f["intercepted"]), None)
            if held:
                return thread, out, held
            time.sleep(0.05)
    raise AssertionError("the transfer was not held")


def test_killing_a_held_approval_in_mitmweb_answers_approval_denied_at_once(web: Gateway) -> None:
    key_id, token = web.issue("held")  # approval_timeout: 60s
    rows_before = len(web.calls())
    n = len(web.fakes.requests())
    thread, out, held = held_transfer(web, token)
    with ui(web) as c:
        killed_at = time.monotonic()
        assert c.post(f"/flows/{held['id']}/kill", headers=XSRF).status_code == 200
        thread.join(5)
        waited = time.monotonic() - killed_at
        assert not thread.is_alive(), "the agent is still waiting after the kill"
        assert "error" not in out, out.get("error")
        r = out["result"]
        assert (r.status_code, r.headers["x-spendgate-reason"]) == (403, "approval_denied")
        assert waited < 2, f"the agent waited {waited:.1f} s"
        flow = next(f for f in c.get("/flows").json() if f["id"] == held["id"])
    assert "approval_denied" in flow["comment"] and "HELD" not in flow["comment"]
    row = web.calls(at_least=rows_before + 1)[-1]
    assert (row["decision"], row["reason"], row["key_id"]) == ("deny", "approval_denied", key_id)
    assert not [x for x in web.fakes.requests()[n:] if x["path"] == "/v1/transfers"]
    approvals = json.loads(web.cli("approvals", "list", "--all", "--json").stdout)
    assert next(a for a in approvals if a["key_id"] == key_id)["status"] == "denied"


def test_the_flow_list_shows_the_comment_column_and_the_vendor_host(web: Gateway) -> None:
    key_id, token = web.issue("billing")
    with web.client() as c:
        assert c.get(STRIPE + "/v1/payment_intents/pi_host", headers={"X-Vault-Key": token}).status_code in (200, 404)
        assert c.post(STRIPE + "/v1/payment_intents", headers={"X-Vault-Key": token}, data={
            "amount": "700", "currency": "usd", "confirm": "true", "payment_method": "pm_card_visa"}).status_code == 200
        assert c.get(STRIPE + "/v1/customers", headers={"X-Vault-Key": token}).status_code == 403
    with ui(web) as c:
        options = c.get("/options").json()
        assert "comment" in options["web_columns"]["value"]
        flows = [f for f in c.get("/flows").json() if key_id in f["comment"]]
        flow = next(f for f in flows if f["request"]["path"] == "/v1/payment_intents/pi_host")
    assert flow["comment"].startswith(f"allow · stripe · {key_id}"), flow["comment"]
    # decision, reason, vendor, key, cost: what each row says in the comment column
    charge = next(f for f in flows if f["request"]["path"] == "/v1/payment_intents")["comment"]
    assert charge.startswith(f"allow · stripe · {key_id}") and "cost $7" in charge, charge
    refused = next(f for f in flows if f["request"]["path"] == "/v1/customers")["comment"]
    assert refused.startswith(f"DENY · endpoint_not_allowed · stripe · {key_id}"), refused
    assert (flow["request"]["host"], flow["request"]["pretty_host"], flow["request"]["port"]) == \
        ("api.stripe.com", "api.stripe.com", 443)  # not the upstream override the fakes listen on
    assert flow["server_conn"]["address"][1] == int(web.fakes.url.rsplit(":", 1)[1])  # where it really went
