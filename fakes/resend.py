"""Fake Resend: send one email or a batch."""

from __future__ import annotations

import uuid
from typing import Any

from fakes.base import JSON, BadRequest, Request, Response, Route, json_response, route


def resend_error(status: int, message: str | None = None, **extra: Any) -> JSON:
    names = {
        400: "validation_error",
        401: "missing_api_key",
        403: "invalid_api_key",
        404: "not_found",
        422: "validation_error",
        429: "rate_limit_exceeded",
    }
    name = extra.get("name") or names.get(status, "application_error")
    return {"name": name, "message": message or name.replace("_", " "), "statusCode": status}


def _resend_email(email: Any) -> None:
    if not isinstance(email, dict) or not email.get("from"):
        raise BadRequest(422, "Missing `from` field.", name="missing_required_field")
    if not email.get("to"):
        raise BadRequest(422, "Missing `to` field.", name="missing_required_field")


def resend_send(req: Request) -> Response:
    email = req.json()
    _resend_email(email)
    return json_response({"id": str(uuid.uuid4())})


def resend_batch(req: Request) -> Response:
    emails = req.json()
    if not isinstance(emails, list):
        raise BadRequest(422, "The batch body must be an array of emails.", name="validation_error")
    for email in emails:
        _resend_email(email)
    return json_response({"data": [{"id": str(uuid.uuid4())} for _ in emails]})


VENDOR = "resend"
ERROR = resend_error


def request_id() -> tuple[str, str] | None:
    return None  # no request id header


ROUTES: list[Route] = [
    route("POST", r"/emails", VENDOR, resend_send),
    route("POST", r"/emails/batch", VENDOR, resend_batch),
]
