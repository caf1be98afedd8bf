"""Fake Postmark: send one email or a batch."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from fakes.base import JSON, BadRequest, Request, Response, Route, json_response, route


def postmark_error(status: int, message: str | None = None, **_: Any) -> JSON:
    codes = {401: (10, "Bad or missing API token"), 422: (300, "Invalid email request")}
    code, default = codes.get(status, (status, "Postmark error"))
    return {"ErrorCode": code, "Message": message or default}


def _postmark_receipt(email: Any) -> JSON:
    if not isinstance(email, dict) or not email.get("To"):
        return {"ErrorCode": 300, "Message": "Invalid 'To' address: ''."}
    return {
        "To": email["To"],
        "SubmittedAt": datetime.now(UTC).isoformat(timespec="microseconds"),
        "MessageID": str(uuid.uuid4()),
        "ErrorCode": 0,
        "Message": "OK",
    }


def postmark_send(req: Request) -> Response:
    receipt = _postmark_receipt(req.json())
    return json_response(receipt, 200 if receipt["ErrorCode"] == 0 else 422)


def postmark_batch(req: Request) -> Response:
    emails = req.json()
    if not isinstance(emails, list):
        raise BadRequest(422, "The batch body must be an array of messages.")
    return json_response([_postmark_receipt(email) for email in emails])


VENDOR = "postmark"
ERROR = postmark_error


def request_id() -> tuple[str, str] | None:
    return None  # no request id header


ROUTES: list[Route] = [
    route("POST", r"/email", VENDOR, postmark_send),
    route("POST", r"/email/batch", VENDOR, postmark_batch),
]
