"""The capture addon, in process: rotating flow files with no secret in them, readable by replay."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from inprocess import REAL_CREDENTIALS, SECRET_VALUES, basic, intent, response, stripe_post, vendor_flow
from mitmproxy import http, io

from spendgate.pipeline import Pipeline


def read(path: Path) -> list[http.HTTPFlow]:
    with path.open("rb") as f:
        return [fl for fl in io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]


def traffic(p: Pipeline) -> list[str]:
    """Calls that carry keys in every slot, allowed and refused, and a response echoing secrets."""
    token, other = p.issue_key("billing", labels={"team": "pay"}), p.issue_key("everything")
    echo = json.dumps({"echo": f"{REAL_CREDENTIALS['STRIPE_SECRET_KEY']} {token}", "id": "pi_1",
                       "object": "payment_intent", "amount": 100, "amount_received": 100, "currency": "usd",
                       "status": "succeeded"})
    p.run(stripe_post(token, body="amount=100&currency=usd&description=hello"), response(200, echo))
    p.run(stripe_post(token, "/v1/charges"), intent(1))  # refused
    p.run(stripe_post(token, body=f"amount=1&currency=usd&note={token}"), intent(1))  # vault_key_leak
    p.run(vendor_flow("GET", "https://api.twilio.com/2010-04-01/Accounts/ACx/Messages/SM1.json",
                      {"Authorization": basic("ACx", other)}), response(200, "{}"))
    p.run(vendor_flow("GET", "https://api.anthropic.com/v1/models", {"x-api-key": other, "X-Trace": f"t={other}"}),
          response(200, "{}"))
    p.run(vendor_flow("GET", "https://api.openai.com/v1/models",
                      {"Authorization": f"Bearer {REAL_CREDENTIALS['OPENAI_API_KEY']}"}), response(200, "{}"))
    return [token, other]


def test_no_vault_key_and_no_real_credential_in_a_capture(pipeline: Callable[..., Pipeline], tmp_path: Path) -> None:
    p = pipeline(spendgate_capture=str(tmp_path / "cap"))
    tokens = traffic(p)
    p.close()
    files = sorted((tmp_path / "cap").glob("capture-*.mitm"))
    assert len(files) == 1
    raw = files[0].read_bytes()
    assert not re.search(rb"vk_(?!\[redacted\])", raw), "a vault key in the capture"
    for secret in [*SECRET_VALUES, REAL_CREDENTIALS["TWILIO_ACCOUNT_SID"], *tokens]:
        assert secret.encode() not in raw, secret
    flows = read(files[0])
    assert len(flows) == 6
    meta = [f.metadata["spendgate"] for f in flows]
    assert [(m["decision"], m["reason"]) for m in meta] == [
        ("allow", None), ("deny", "endpoint_not_allowed"), ("deny", "vault_key_leak"), ("allow", None),
        ("allow", None), ("deny", "raw_credential")]
    assert meta[0]["labels"] == {"team": "pay"} and meta[0]["cost_usd"] == "1.00"
    assert flows[0].request.headers["authorization"].startswith("spendgate:")  # the placeholder
    assert flows[0].request.get_text() == "amount=100&currency=usd&description=hello"  # bodies kept
    # the echo: the scrub stage already took the real key out of the answer (capture masks what is left)
    echoed = flows[0].response.get_text()  # type: ignore[union-attr]
    assert "[scrubbed by spendgate]" in echoed or "spendgate-redacted" in echoed


def test_rotation_by_size_and_retention(pipeline: Callable[..., Pipeline], tmp_path: Path) -> None:
    p = pipeline(spendgate_capture=str(tmp_path / "cap"), spendgate_capture_max_size="1k", spendgate_capture_keep=3)
    token = p.issue_key("everything")
    for i in range(12):
        p.run(vendor_flow("GET", f"https://api.stripe.com/v1/payment_intents/pi_{i}",
                          {"Authorization": f"Bearer {token}"}), intent(0))
    p.close()
    files = sorted((tmp_path / "cap").glob("capture-*.mitm"))
    assert len(files) == 3, files  # the newest three; every flow is bigger than 1k: one file each
    assert [read(f)[0].request.path for f in files] == [f"/v1/payment_intents/pi_{i}" for i in (9, 10, 11)]


def test_rotation_by_age(pipeline: Callable[..., Pipeline], tmp_path: Path) -> None:
    import time

    p = pipeline(spendgate_capture=str(tmp_path / "cap"), spendgate_capture_max_age="1s", spendgate_capture_keep=0)
    token = p.issue_key("everything")
    for i in range(2):
        p.run(vendor_flow("GET", "https://api.stripe.com/v1/balance", {"Authorization": f"Bearer {token}"}),
              response(200, "{}"))
        if i == 0:
            time.sleep(1.1)
    p.close()
    assert len(list((tmp_path / "cap").glob("capture-*.mitm"))) == 2


def test_no_bodies(pipeline: Callable[..., Pipeline], tmp_path: Path) -> None:
    p = pipeline(spendgate_capture=str(tmp_path / "cap"), spendgate_capture_bodies=False)
    token = p.issue_key("billing")
    p.run(stripe_post(token, body="amount=100&currency=usd&description=private"), intent(100))
    p.close()
    (flow,) = read(next((tmp_path / "cap").glob("*.mitm")))
    assert flow.request.content == b"" and flow.response is not None and flow.response.content == b""
    assert flow.metadata["spendgate"]["cost_usd"] == "1.00"  # the decision and the cost are still there
    assert b"private" not in next((tmp_path / "cap").glob("*.mitm")).read_bytes()


def test_redacted_fields(pipeline: Callable[..., Pipeline], tmp_path: Path) -> None:
    p = pipeline(spendgate_capture=str(tmp_path / "cap"), spendgate_capture_redact=["content", "email", "x-user"])
    token = p.issue_key("everything")
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "my secret plan"}], "max_tokens": 5}
    p.run(vendor_flow("POST", "https://api.openai.com/v1/chat/completions?email=a@b.c",
                      {"Authorization": f"Bearer {token}", "X-User": "alice", "Content-Type": "application/json"},
                      json.dumps(chat)), response(200, json.dumps({"model": "gpt-4o", "choices": [
                          {"message": {"content": "the plan is"}}], "usage": {"prompt_tokens": 9, "completion_tokens": 3}})))
    p.run(stripe_post(token, body="amount=100&currency=usd&receipt_email=x@y.z&metadata[email]=q@r.s",
                      **{"Content-Type": "application/x-www-form-urlencoded"}), intent(100))
    p.close()
    path = next((tmp_path / "cap").glob("*.mitm"))
    raw = path.read_bytes()
    for private in (b"my secret plan", b"the plan is", b"alice", b"a@b.c", b"q@r.s"):
        assert private not in raw, private
    first, second = read(path)
    sent = json.loads(first.request.content or b"")
    assert sent["messages"][0]["content"] == "x" * len("my secret plan") and sent["model"] == "gpt-4o"
    assert first.request.headers["x-user"] == "[redacted]"
    assert b"receipt_email=x%40y.z" in (second.request.content or b"")  # not named: kept
