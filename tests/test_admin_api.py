"""Admin API end to end: a real mitmdump with the admin listener, driven over HTTP.

Every response the tests get is validated against ``docs/openapi.yaml`` (status
documented for the operation, body valid against its schema), and the last test
checks that every documented response was seen at least once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from harness import ROOT, Gateway, free_port, start_gateway
from mitmproxy import exceptions
from mitmproxy.test import taddons
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from fakes import FakeVendors
from spendgate.admin import ROUTES, Admin, is_loopback, parse_listen, resolve_token, token_ref
from spendgate.metrics import Metrics
from spendgate.runtime import Runtime

ADMIN_TOKEN = "adm_" + secrets.token_urlsafe(24)
STRIPE = "https://api.stripe.com"

# --------------------------------------------------------------------------- the OpenAPI document

SPEC: dict[str, Any] = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
SPEC_URI = "urn:spendgate:openapi"
REGISTRY = Registry().with_resource(SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012))
METHODS = ("get", "post", "put", "patch", "delete")

seen: set[tuple[str, str, str]] = set()  # (method, path template, status) validated so far


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _template(path: str) -> str:
    """The spec's path for a concrete path; literal paths win over templated ones."""
    if path in SPEC["paths"]:
        return path
    for template in SPEC["paths"]:
        if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path):
            return template
    raise AssertionError(f"{path} is not in docs/openapi.yaml")


def check(method: str, url: str, r: httpx.Response) -> None:
    """Fail unless ``r`` is a documented response of the operation, with a valid body."""
    path = httpx.URL(url).path
    template = _template(path)
    op = SPEC["paths"][template].get(method.lower())
    assert op is not None, f"{method} {template} is not documented"
    status = str(r.status_code)
    assert status in op["responses"], f"{method} {template} answered {status}, not documented: {r.text}"
    response = op["responses"][status]
    ptr = ["paths", template, method.lower(), "responses", status]
    if "$ref" in response:
        ptr = response["$ref"].removeprefix("#/").split("/")
        response = SPEC["components"]["responses"][ptr[-1]]
    content = response.get("content")
    if not content:
        assert r.content == b"", f"{method} {template} {status} should have no body"
    else:
        (media, body), = content.items()
        assert r.headers["content-type"] == media
        if media == "application/json":
            ref = f"{SPEC_URI}#/{_pointer(*ptr, 'content', media, 'schema')}"
            jsonschema.Draft202012Validator({"$ref": ref}, registry=REGISTRY).validate(r.json())
    for name, header in response.get("headers", {}).items():
        assert name.lower() in r.headers, f"{method} {template} {status}: no {name} header"
        if "const" in header.get("schema", {}):
            assert r.headers[name] == header["schema"]["const"]
    seen.add((method.lower(), template, status))


# --------------------------------------------------------------------------- fixtures


@dataclass
class AdminApi:
    url: str
    gw: Gateway

    def __call__(self, method: str, path: str, token: str | None = ADMIN_TOKEN, **kw: Any) -> httpx.Response:
        headers = kw.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        # Straight to the listener (trust_env=False: no HTTPS_PROXY from other tests).
        r = httpx.request(method, self.url + path, headers=headers, timeout=10, trust_env=False, **kw)
        check(method, self.url + path, r)
        return r

    def issue(self, **body: Any) -> dict[str, Any]:
        r = self("POST", "/v1/keys", json={"policy": "billing", **body})
        assert r.status_code == 201, r.text
        return r.json()


def wait_for_log(gw: Gateway, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in gw.log.read_text():
        assert gw.proc is not None and gw.proc.poll() is None, gw.log.read_text()
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{gw.log.read_text()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory, fakes: FakeVendors, certs: Path) -> Iterator[AdminApi]:
    port = free_port()
    gw = start_gateway(tmp_path_factory.mktemp("admin"), fakes, certs,
                       extra=("--set", f"spendgate_admin_listen=127.0.0.1:{port}"),
                       env={"SPENDGATE_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        wait_for_log(gw, "admin API listening")
        yield AdminApi(f"http://127.0.0.1:{port}", gw)
    finally:
        gw.stop()
    assert ADMIN_TOKEN not in gw.log.read_text(), "the admin token was logged"


def stripe_pi(gw: Gateway, token: str) -> httpx.Response:
    with gw.client() as c:
        return c.post(f"{STRIPE}/v1/payment_intents", headers={"X-Vault-Key": token},
                      data={"amount": "2000", "currency": "usd"})


# --------------------------------------------------------------------------- keys


def test_issue_use_revoke_round_trip(admin: AdminApi) -> None:
    key = admin.issue(ttl="10m", labels={"run": "rt"})
    assert key["token"].startswith("vk_") and key["state"] == "active" and key["labels"] == {"run": "rt"}
    n = len(admin.gw.fakes.requests())
    r = stripe_pi(admin.gw, key["token"])
    assert r.status_code == 200, r.text
    assert len(admin.gw.fakes.requests()) == n + 1  # it reached the (fake) vendor

    shown = admin("GET", f"/v1/keys/{key['id']}").json()
    assert shown == {k: v for k, v in key.items() if k != "token"}  # never the token again

    assert admin("DELETE", f"/v1/keys/{key['id']}").status_code == 204
    r = stripe_pi(admin.gw, key["token"])
    assert r.status_code == 401 and r.headers["x-spendgate-reason"] == "revoked"
    assert r.json()["error"]["code"] == "revoked"
    assert len(admin.gw.fakes.requests()) == n + 1  # the refused one never left
    assert admin("GET", f"/v1/keys/{key['id']}").json()["state"] == "revoked"
    assert admin("DELETE", f"/v1/keys/{key['id']}").status_code == 204  # idempotent


def test_issued_key_defaults_ttl_from_policy_and_keeps_cap(admin: AdminApi) -> None:
    def lifetime(key: dict) -> float:
        return (datetime.fromisoformat(key["expires_at"]) - datetime.fromisoformat(key["created_at"])).total_seconds()

    key = admin.issue(cap_usd="12.50")
    assert key["cap_usd"] == "12.50"
    assert lifetime(key) == 3600  # "billing" says no ttl: the policy default, 1h
    key = admin.issue(ttl=90, cap_usd=1e2)  # JSON numbers work too; money never via float
    assert (key["cap_usd"], lifetime(key)) == ("100.0", 90)
    assert lifetime(admin.issue(ttl="2d")) == 2 * 86400


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"policy": "nope"}, "policy", "no policy 'nope'"),
    ({"policy": "billing", "cap_usd": "600"}, "cap_usd", "would widen policy 'billing''s key_usd 500"),
    ({"policy": "billing", "cap_usd": "-1"}, "cap_usd", ">= 0"),
    ({"policy": "billing", "cap_usd": "lots"}, "cap_usd", "not an amount"),
    ({"policy": "billing", "ttl": "soon"}, "ttl", "not a duration"),
    ({"policy": "billing", "ttl": 0}, "ttl", "positive"),
    ({"policy": "billing", "labels": {"run": 42}}, "labels", "strings"),
    ({"policy": "billing", "cap": "5"}, "cap", "unknown field(s) cap"),
    ({}, "policy", "policy name is required"),
])
def test_issue_rules_are_400(admin: AdminApi, body: dict, param: str, words: str) -> None:
    before = len(admin("GET", "/v1/keys", params={"all": "true"}).json()["keys"])
    r = admin("POST", "/v1/keys", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("invalid_request", param)
    assert words in err["message"]
    assert len(admin("GET", "/v1/keys", params={"all": "true"}).json()["keys"]) == before


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b""])
def test_issue_needs_a_json_object(admin: AdminApi, body: bytes) -> None:
    r = admin("POST", "/v1/keys", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


def test_cli_and_api_apply_the_same_cap_rule(admin: AdminApi) -> None:
    api = admin("POST", "/v1/keys", json={"policy": "billing", "cap_usd": "600"}).json()["error"]["message"]
    cli = admin.gw.cli("keys", "issue", "--policy", "billing", "--cap-usd", "600", check=False)
    assert cli.returncode != 0 and api in " ".join(cli.stderr.split())


def test_list_keys_filters_by_label_and_state(admin: AdminApi) -> None:
    a = admin.issue(labels={"team": "list", "n": "1"})
    b = admin.issue(labels={"team": "list", "n": "2"})
    admin("DELETE", f"/v1/keys/{b['id']}")
    ids = [k["id"] for k in admin("GET", "/v1/keys", params={"label": "team=list"}).json()["keys"]]
    assert ids == [a["id"]]
    ids = [k["id"] for k in admin("GET", "/v1/keys", params={"label": "team=list", "all": "1"}).json()["keys"]]
    assert ids == [a["id"], b["id"]]
    ids = [k["id"] for k in admin("GET", "/v1/keys?label=team=list&label=n=2&all=yes").json()["keys"]]
    assert ids == [b["id"]]
    assert admin("GET", "/v1/keys", params={"label": "novalue"}).status_code == 400


def test_revoke_by_labels(admin: AdminApi) -> None:
    a = admin.issue(labels={"run": "77", "agent": "x"})
    b = admin.issue(labels={"run": "77"})
    c = admin.issue(labels={"run": "78"})
    r = admin("POST", "/v1/keys/revoke", json={"labels": {"run": "77"}})
    assert r.status_code == 200 and sorted(r.json()["revoked"]) == sorted([a["id"], b["id"]])
    assert stripe_pi(admin.gw, a["token"]).status_code == 401
    assert stripe_pi(admin.gw, c["token"]).status_code == 200
    assert admin("POST", "/v1/keys/revoke", json={"labels": {"run": "77"}}).json() == {"revoked": []}


@pytest.mark.parametrize("body", [{"labels": {}}, {}, {"labels": ["run=1"]}, {"labels": {"run": 1}},
                                  {"labels": {"run": "1"}, "all": True}])
def test_revoke_by_labels_refuses_empty_or_odd_selectors(admin: AdminApi, body: dict) -> None:
    active = len(admin("GET", "/v1/keys").json()["keys"])
    r = admin("POST", "/v1/keys/revoke", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    assert len(admin("GET", "/v1/keys").json()["keys"]) == active  # nothing was revoked


def test_unknown_key_is_404(admin: AdminApi) -> None:
    for method in ("GET", "DELETE"):
        r = admin(method, "/v1/keys/key_doesnotexist")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# --------------------------------------------------------------------------- usage


def test_usage_report_as_json(admin: AdminApi) -> None:
    key = admin.issue(policy="llm", labels={"run": "usage-1"})
    rows_before = len(admin.gw.calls())
    with admin.gw.client() as c:
        r = c.post("https://api.openai.com/v1/chat/completions", headers={"X-Vault-Key": key["token"]},
                   json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    ledger = admin.gw.last_call(rows_before)
    assert ledger["cost_status"] == "parsed" and ledger["cost_nanos"] > 0
    body = admin("GET", "/v1/usage", params={"by": "key"}).json()
    assert body["by"] == "key" and body["since"] is None
    row = next(r for r in body["rows"] if r["group"] == key["id"])
    assert (row["calls"], row["allowed"], row["refused"], row["unknown"]) == (1, 1, 0, 0)
    # exact, and written as a plain decimal (never 2.85E-7)
    assert Decimal(row["spend_usd"]) == Decimal(row["parsed_usd"]) == Decimal(ledger["cost_usd"])
    assert "E" not in row["spend_usd"]

    by_label = admin("GET", "/v1/usage", params={"by": "label:run", "since": "1h"}).json()
    assert next(r for r in by_label["rows"] if r["group"] == "usage-1")["calls"] == 1
    assert admin("GET", "/v1/usage", params={"since": "2000-01-01", "by": "vendor"}).json()["rows"]


@pytest.mark.parametrize("params", [{"by": "colour"}, {"since": "last tuesday"}, {"by": "label:a b"}])
def test_usage_bad_parameters_are_400(admin: AdminApi, params: dict) -> None:
    r = admin("GET", "/v1/usage", params=params)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


# --------------------------------------------------------------------------- approvals


def _held(admin: AdminApi, key_id: str) -> dict:
    deadline = time.monotonic() + 2.5  # the policy's approval_timeout is 3s
    while time.monotonic() < deadline:
        for a in admin("GET", "/v1/approvals").json()["approvals"]:
            if a["key_id"] == key_id:
                return a
        time.sleep(0.05)
    raise AssertionError("the transfer was not held for approval")


def _transfer(gw: Gateway, token: str) -> httpx.Response:
    with gw.client() as c:
        return c.post(f"{STRIPE}/v1/transfers", headers={"X-Vault-Key": token},
                      data={"amount": "1100", "currency": "usd", "destination": "acct_1"})


@pytest.mark.parametrize(("action", "status", "code"), [("approve", 200, None), ("deny", 403, "approval_denied")])
def test_approvals_decided_through_the_api(admin: AdminApi, action: str, status: int, code: str | None) -> None:
    key = admin.issue()
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_transfer, admin.gw, key["token"])
        held = _held(admin, key["id"])
        assert (held["status"], held["method"], held["path"]) == ("pending", "POST", "/v1/transfers")
        r = admin("POST", f"/v1/approvals/{held['id']}/{action}")
        decided = "approved" if action == "approve" else "denied"
        assert r.status_code == 200 and r.json() == {"id": held["id"], "status": decided, "decided_by": "admin-api"}
        resp = pending.result(timeout=10)
    assert resp.status_code == status, resp.text
    if code:
        assert resp.headers["x-spendgate-reason"] == code
    everything = admin("GET", "/v1/approvals", params={"status": "all"}).json()["approvals"]
    row = next(a for a in everything if a["id"] == held["id"])
    assert (row["status"], row["decided_by"]) == (decided, "admin-api")
    assert held["id"] in [a["id"] for a in admin("GET", "/v1/approvals", params={"status": decided}).json()["approvals"]]
    for again in ("approve", "deny"):  # a decision is final
        r = admin("POST", f"/v1/approvals/{held['id']}/{again}")
        assert r.status_code == 409
        assert r.json()["error"] | {"message": ""} == {"type": "spendgate_error", "code": "not_pending",
                                                       "message": "", "status": decided}


def test_approval_errors(admin: AdminApi) -> None:
    for action in ("approve", "deny"):
        r = admin("POST", f"/v1/approvals/apr_nope/{action}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = admin("GET", "/v1/approvals", params={"status": "maybe"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "status"


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("path", ["/v1/keys", "/v1/keys/key_x", "/v1/usage", "/v1/approvals", "/v1/nothing"])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", f"Basic {ADMIN_TOKEN}", "Bearer", ADMIN_TOKEN,
                                  f"Bearer {ADMIN_TOKEN}x", f"Bearer {ADMIN_TOKEN[:-1]}"],
                         ids=["none", "wrong", "basic", "bearer-empty", "no-scheme", "token+x", "token-1"])  # the same ids in every xdist worker (and no token in them)
def test_401_without_the_admin_token(admin: AdminApi, path: str, auth: str | None) -> None:
    headers = {"Authorization": auth} if auth is not None else {}
    r = httpx.get(admin.url + path, headers=headers, trust_env=False)
    if path != "/v1/nothing":  # undocumented on purpose: an anonymous caller learns no routes
        check("GET", admin.url + path, r)
    assert r.status_code == 401
    assert r.json() == {"error": {"type": "spendgate_error", "code": "unauthorized",
                                  "message": r.json()["error"]["message"]}}
    assert r.headers["www-authenticate"] == 'Bearer realm="spendgate-admin"'


def test_writes_need_the_token_too(admin: AdminApi) -> None:
    before = len(admin("GET", "/v1/keys", params={"all": "1"}).json()["keys"])
    assert admin("POST", "/v1/keys", token=None, json={"policy": "billing"}).status_code == 401
    assert admin("POST", "/v1/keys/revoke", token="nope", json={"labels": {"run": "1"}}).status_code == 401
    assert admin("DELETE", "/v1/keys/key_x", token=None).status_code == 401
    assert admin("POST", "/v1/approvals/apr_x/approve", token=None).status_code == 401
    assert admin("POST", "/v1/approvals/apr_x/deny", token="nope").status_code == 401
    assert len(admin("GET", "/v1/keys", params={"all": "1"}).json()["keys"]) == before


def test_unknown_route_and_method(admin: AdminApi) -> None:
    r = httpx.get(admin.url + "/v1/nothing", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, trust_env=False)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.put(admin.url + "/v1/keys", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, trust_env=False)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# --------------------------------------------------------------------------- agents cannot reach it


def test_agent_cannot_reach_admin_port_through_the_proxy(admin: AdminApi) -> None:
    port = httpx.URL(admin.url).port
    before = len(admin("GET", "/v1/keys", params={"all": "1"}).json()["keys"])
    rows = len(admin.gw.calls())
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # even an agent that somehow has the token
    with httpx.Client(proxy=admin.gw.proxy, trust_env=False) as c:  # plain-HTTP proxy request
        r = c.post(f"http://127.0.0.1:{port}/v1/keys", headers=auth, json={"policy": "billing"})
    assert r.status_code == 403 and r.headers["x-spendgate-reason"] == "egress_denied"
    for target in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):  # a CONNECT tunnel
        with socket.create_connection(("127.0.0.1", admin.gw.port), timeout=10) as s:
            s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = s.recv(4096).decode()
        assert head.startswith("HTTP/1.1 403") and "egress_denied" in head, head
    assert len(admin("GET", "/v1/keys", params={"all": "1"}).json()["keys"]) == before
    new = admin.gw.calls(at_least=rows + 4)[rows:]
    assert [(c["decision"], c["reason"]) for c in new] == [("deny", "egress_denied")] * 4


# --------------------------------------------------------------------------- start-up (fail closed)


def _start_and_wait_exit(tmp: Path, fakes: FakeVendors, certs: Path, *extra: str, env: dict) -> str:
    try:
        gw = start_gateway(tmp, fakes, certs, extra=extra, env=env)
    except RuntimeError as e:  # exited before the proxy came up
        return str(e)
    try:
        assert gw.proc is not None
        assert gw.proc.wait(15) == 1
    finally:
        gw.stop()
    return gw.log.read_text()


def test_admin_listener_refuses_to_start_without_a_token(tmp_path: Path, fakes: FakeVendors, certs: Path) -> None:
    port = free_port()
    log = _start_and_wait_exit(tmp_path / "a", fakes, certs, "--set", f"spendgate_admin_listen=127.0.0.1:{port}",
                               env={"SPENDGATE_ADMIN_TOKEN": ""})
    assert "admin API NOT started" in log and "SPENDGATE_ADMIN_TOKEN" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False)


# In process (mitmproxy's addon test context, no subprocess): fast enough to try every case.


def _admin() -> Admin:
    runtime = Runtime()
    return Admin(runtime, Metrics(runtime))


def test_inline_admin_token_is_refused_and_not_echoed() -> None:
    async def main() -> None:
        admin = _admin()
        with taddons.context(admin) as tctx:
            with pytest.raises(exceptions.OptionsError) as e:
                tctx.configure(admin, spendgate_admin_token="hunter2hunter2")
            assert "env:NAME or file:PATH" in str(e.value) and "hunter2" not in str(e.value)
            with pytest.raises(exceptions.OptionsError):
                tctx.configure(admin, spendgate_admin_listen="8082")

    asyncio.run(main())


@pytest.mark.parametrize(("options", "level"), [
    ({}, logging.WARNING),  # the defaults: the gateway runs, only the admin API is off
    ({"spendgate_admin_listen": "127.0.0.1:1"}, logging.ERROR),  # asked for: mitmproxy exits at start-up
    ({"spendgate_admin_token": "env:SPENDGATE_TEST_NO_SUCH_VAR"}, logging.ERROR),
])
def test_no_token_no_listener(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                              options: dict, level: int) -> None:
    monkeypatch.delenv("SPENDGATE_ADMIN_TOKEN", raising=False)

    async def main() -> None:
        admin = _admin()
        with taddons.context(admin) as tctx:
            if options:
                tctx.configure(admin, **options)
            admin.configure({"spendgate_admin_listen", "spendgate_admin_token"})  # as at start-up
            admin.running()
            assert admin.server is None
            await admin.done()

    with caplog.at_level(logging.INFO, logger="spendgate"):
        asyncio.run(main())
    (record,) = [r for r in caplog.records if "admin API NOT started" in r.getMessage()]
    assert record.levelno == level


def test_listener_starts_moves_and_stops_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPENDGATE_ADMIN_TOKEN", "tok-in-process-" + "0" * 24)
    first, second = free_port(), free_port()
    auth = {"Authorization": "Bearer tok-in-process-" + "0" * 24}

    async def main() -> None:
        admin = _admin()  # its runtime has no policy or ledger yet
        with taddons.context(admin) as tctx:
            tctx.configure(admin, spendgate_admin_listen=f"127.0.0.1:{first}")
            admin.running()
            async with httpx.AsyncClient(trust_env=False) as c:
                url = f"http://127.0.0.1:{first}/v1/keys"
                r = await c.post(url, headers=auth, json={"policy": "billing"})
                check("POST", url, r)
                assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            tctx.configure(admin, spendgate_admin_listen=f"127.0.0.1:{second}")  # e.g. from mitmweb
            async with httpx.AsyncClient(trust_env=False) as c:
                with pytest.raises(httpx.ConnectError):
                    await c.get(f"http://127.0.0.1:{first}/metrics")
                assert (await c.get(f"http://127.0.0.1:{second}/metrics")).status_code == 200
            tctx.configure(admin, spendgate_admin_listen="")
            assert admin.server is None
            tctx.configure(admin, spendgate_admin_listen=f"127.0.0.1:{second}")
            await admin.done()
            async with httpx.AsyncClient(trust_env=False) as c:
                with pytest.raises(httpx.ConnectError):
                    await c.get(f"http://127.0.0.1:{second}/metrics")

    asyncio.run(main())


# --------------------------------------------------------------------------- options (unit)


def test_parse_listen() -> None:
    assert parse_listen("") is None
    assert parse_listen("127.0.0.1:8082") == ("127.0.0.1", 8082)
    assert parse_listen("[::1]:9") == ("::1", 9)
    for bad in ("8082", ":8082", "127.0.0.1:", "127.0.0.1:x", "127.0.0.1:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_loopback_decides_metrics_auth() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.5.0.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "admin.internal"]))


def test_token_is_a_reference(tmp_path: Path) -> None:
    assert token_ref("") == "env:SPENDGATE_ADMIN_TOKEN"
    assert token_ref("file:/run/secrets/admin") == "file:/run/secrets/admin"
    for bad in ("s3cret-value", "env:", "vault:x"):
        with pytest.raises(ValueError) as e:
            token_ref(bad)
        assert "s3cret" not in str(e.value)  # a token pasted inline is never echoed
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert resolve_token(f"file:{f}") == "from-file"
    assert resolve_token(f"file:{tmp_path / 'missing'}") is None
    assert resolve_token("env:T", {"T": "from-env"}) == "from-env"
    assert resolve_token("env:T", {"T": ""}) is None
    assert resolve_token("env:T", {}) is None


# --------------------------------------------------------------------------- the document itself


def test_openapi_document_is_sound() -> None:
    assert SPEC["openapi"].startswith("3.1")
    for schema in SPEC["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)
    refs = re.findall(r"\$ref: \"?#/([^\"}\s,]+)", (ROOT / "docs" / "openapi.yaml").read_text())
    for ref in refs:
        node: Any = SPEC
        for part in ref.split("/"):
            node = node[part]


def test_openapi_paths_match_the_routes() -> None:
    from spendgate.admin import Handler

    def implemented(handler: type, method: str) -> bool:
        return getattr(handler, method) is not getattr(Handler, method)

    documented = {(m, t) for t, item in SPEC["paths"].items() for m in METHODS if m in item}
    for method, template in documented:
        sample = re.sub(r"\{[^}]+\}", "x1", template)
        handlers = [h for pattern, h in ROUTES if re.fullmatch(pattern, sample)]
        assert handlers and implemented(handlers[0], method), f"{method} {template} is documented, not served"
    served = set()
    for pattern, handler in ROUTES:
        for method in METHODS:
            if implemented(handler, method):
                served.add((method, _template(re.sub(r"\(\[\^/\]\+\)", "x1", pattern)
                                              .replace("(approve|deny)", "approve"))))
    assert served <= documented


def test_every_documented_response_was_seen(request: pytest.FixtureRequest) -> None:
    ran = {item.originalname for item in request.session.items if item.module is sys.modules[__name__]}
    if ran != {name for name in globals() if name.startswith("test_")}:
        pytest.skip("needs the whole module")
    documented = {(m, t, s) for t, item in SPEC["paths"].items() for m in METHODS if m in item
                  for s in item[m]["responses"]}
    missing = documented - seen
    # /metrics is checked in test_metrics.py (its 401 only exists off loopback)
    missing = {x for x in missing if x[1] != "/metrics"}
    assert not missing, f"documented but never seen: {sorted(missing)}"
