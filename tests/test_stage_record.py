"""meter and record, in process: the ledger row of every outcome, costs from responses (whole and
streamed), the headers the agent gets back."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import pytest
from inprocess import SECRET_VALUES, intent, response, stripe_post, vendor_flow

from spendgate.pipeline import Pipeline

FIXTURES = Path(__file__).parent / "fixtures" / "vendors"
CHAT = json.dumps({"model": "gpt-4o", "stream": True, "max_tokens": 100,
                   "messages": [{"role": "user", "content": "hi"}]})


def ledger(p: Pipeline) -> list[dict]:
    p.flush()
    conn = sqlite3.connect(p.runtime.store.path)  # type: ignore[union-attr]
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY id")]
    finally:
        conn.close()


def test_allowed_call_row(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing", labels={"team": "pay", "run": "r1"})
    out = p.run(stripe_post(token, "/v1/payment_intents?expand[]=x", "amount=1234&currency=usd"), intent(1234))
    assert out.row is not None and out.call is not None
    assert {k: out.row[k] for k in ("key_id", "policy", "labels", "vendor", "method", "host", "path", "status",
                                    "decision", "reason", "estimated_usd", "cost_usd", "cost_status", "flagged",
                                    "currency", "request_id")} == {
        "key_id": out.call.key_id, "policy": "billing", "labels": '{"run": "r1", "team": "pay"}',
        "vendor": "stripe", "method": "POST", "host": "api.stripe.com", "path": "/v1/payment_intents",
        "status": 200, "decision": "allow", "reason": None, "estimated_usd": "12.34", "cost_usd": "12.34",
        "cost_status": "parsed", "flagged": 0, "currency": "USD", "request_id": "req_123"}
    assert out.flow.response is not None
    assert out.flow.response.headers["X-Spendgate-Cost-Usd"] == "12.34"
    assert Decimal(out.flow.response.headers["X-Spendgate-Budget-Remaining-Usd"]) == Decimal("437.66")  # daily 450
    assert "allow" in out.flow.comment and not out.flow.marked
    stored = ledger(p)
    assert len(stored) == 1 and {k: stored[0][k] for k in out.row} == out.row  # the row that was committed


def test_refused_call_row(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing")
    out = p.run(stripe_post(token, "/v1/charges"), intent(1))
    assert out.row is not None
    assert (out.row["decision"], out.row["reason"], out.row["status"], out.row["cost_status"], out.row["cost_usd"]) \
        == ("deny", "endpoint_not_allowed", 403, "zero", None)
    assert out.flow.marked and "DENY" in out.flow.comment


@pytest.mark.parametrize(("body", "status"), [
    (b"not json at all", 200),
    (b'{"id": "pi_1", "object": "payment_intent", "status": "succeeded"', 200),  # truncated
    (b"\xff\xfe\x00garbage", 200),
])
def test_unparseable_responses_are_unknown_flagged_and_counted_at_the_estimate(
        pipeline: Callable[..., Pipeline], body: bytes, status: int) -> None:
    p = pipeline()
    token = p.issue_key("billing", cap_usd=Decimal("300"))
    out = p.run(stripe_post(token, body="amount=20000&currency=usd"), response(status, body))
    assert out.status == status and out.flow.response is not None and out.flow.response.content == body
    assert out.row is not None and (out.row["cost_status"], out.row["flagged"], out.row["cost_usd"]) == ("unknown", 1, None)
    over = p.run(stripe_post(token, body="amount=15000&currency=usd"), intent(15000))
    assert over.reason == "cap_exhausted", "the unknown cost counted at its $200 estimate"


def test_vendor_error_costs_nothing(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing")
    out = p.run(stripe_post(token), response(402, json.dumps({"error": {"type": "card_error", "code": "card_declined"}})))
    assert out.status == 402 and out.row is not None
    assert (out.row["decision"], out.row["cost_status"], Decimal(out.row["cost_usd"])) == ("allow", "zero", 0)


@pytest.mark.parametrize(("error", "sent", "reason", "status"), [
    ("Connection refused", False, "upstream_unreachable", 502),
    ("connect timed out", False, "upstream_timeout", 504),
    ("Connection reset by peer", True, "upstream_unreachable", 502),
])
def test_upstream_errors(pipeline: Callable[..., Pipeline], error: str, sent: bool, reason: str, status: int) -> None:
    p = pipeline()
    token = p.issue_key("billing")
    out = p.run(stripe_post(token), error=error, sent=sent)
    assert out.row is not None
    assert (out.row["decision"], out.row["reason"], out.row["status"]) == ("allow", reason, status)
    assert out.row["cost_status"] == ("unknown" if sent else "zero")


@pytest.mark.parametrize("chunk", [0, 1, 7, 4096])
def test_streamed_response_is_metered_in_pieces_and_passed_unchanged(pipeline: Callable[..., Pipeline],
                                                                     chunk: int) -> None:
    p = pipeline(store_streamed_bodies=True)
    token = p.issue_key("everything")
    body = (FIXTURES / "openai" / "chat_stream_n3_choices.sse").read_bytes()
    out = p.run(vendor_flow("POST", "https://api.openai.com/v1/chat/completions",
                            {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, CHAT),
                response(200, body, {"Content-Type": "text/event-stream"}), chunk=chunk)
    assert out.flow.response is not None and out.flow.response.content == body
    assert out.row is not None and (out.row["cost_status"], out.cost_usd) == ("parsed", Decimal("0.0006175"))


def test_rows_hold_no_secret_and_no_body(pipeline: Callable[..., Pipeline]) -> None:
    p = pipeline()
    token = p.issue_key("billing")
    p.run(stripe_post(token, body="amount=999&currency=usd&description=PRIVATE-BODY"), intent(999))
    p.run(stripe_post(token, "/v1/charges", "description=PRIVATE-BODY"), intent(1))
    text = json.dumps(ledger(p))
    assert token not in text and "vk_" not in text and "PRIVATE-BODY" not in text
    assert not any(s in text for s in SECRET_VALUES)


def test_how_long_an_answer_waits_for_its_row() -> None:
    """README "Failure behaviour": an answer that may have moved money waits up to 60 s for its row
    (through a ledger outage: held, never delivered unrecorded); any other answer up to 5 s, and not
    at all while the ledger is known down or when it was refused because of it."""
    from spendgate.call import Call
    from spendgate.stages.record import COMMIT_WAIT, MONEY_COMMIT_WAIT, commit_wait
    from spendgate.vendors.base import Cost

    assert (MONEY_COMMIT_WAIT, COMMIT_WAIT) == (60.0, 5.0)
    paid = Call(decision="allow", estimated_nanos=20 * 10**9)
    assert commit_wait(paid, True) == commit_wait(paid, False) == 60.0  # through an outage
    billed = Call(decision="allow", cost=Cost("parsed", Decimal("0.002")))  # an LLM call: priced after
    assert commit_wait(billed, False) == 60.0
    read = Call(decision="allow")
    assert (commit_wait(read, True), commit_wait(read, False)) == (5.0, 0.0)
    refused = Call(decision="deny", reason="store_unavailable", estimated_nanos=20 * 10**9)
    assert commit_wait(refused, True) == 0.0  # nothing moved: never held for a stuck ledger
    assert commit_wait(Call(decision="deny", reason="cap_exhausted", estimated_nanos=1), True) == 5.0


@pytest.mark.parametrize("lock_held", [False, True], ids=["lock_free", "lock_held_elsewhere"])
def test_an_answer_leaves_only_once_its_row_and_settle_are_committed(
        pipeline: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch, lock_held: bool) -> None:
    """The zero ``kill -9`` window, both ways a row is written: committed on the event loop with the
    call's settle (the write lock free), or by the writer thread once another process releases the
    lock (the answer waits). The member after Record (Capture) sees the answer only once the
    row is in the file."""
    import threading

    from spendgate.capture import Capture

    seen: list[tuple] = []
    path: list[str] = []

    def after_record(self: Capture, flow: object) -> None:
        conn = sqlite3.connect(path[0])
        seen.append((conn.execute("SELECT count(*), max(cost_usd) FROM calls").fetchone(),
                     conn.execute("SELECT count(*) FROM reservations").fetchone()[0]))
        conn.close()

    monkeypatch.setattr(Capture, "response", after_record)
    p = pipeline()
    path.append(p.runtime.store.path)  # type: ignore[union-attr]
    token = p.issue_key("billing")
    other = sqlite3.connect(path[0], isolation_level=None, check_same_thread=False)
    if lock_held:  # held while the vendor answers: the hold is taken, the row's commit must wait
        def respond(req: object) -> object:
            other.execute("BEGIN IMMEDIATE")
            threading.Timer(0.3, other.execute, ("COMMIT",)).start()
            return intent(1234)
        out = p.run(stripe_post(token, body="amount=1234&currency=usd"), respond)  # type: ignore[arg-type]
    else:
        out = p.run(stripe_post(token, body="amount=1234&currency=usd"), intent(1234))
    assert out.status == 200
    assert seen[0][0] == (1, "12.34")  # the row was committed before the answer left
    if not lock_held:
        assert seen == [((1, "12.34"), 0)]  # and its settle, in the same transaction
    p.flush()
    other.close()
