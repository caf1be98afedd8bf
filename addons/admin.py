"""The admin listener: an HTTP API for orchestrators, and Prometheus ``/metrics``.

Keys (issue, show, list, revoke, revoke by label), usage (the spend report as JSON)
and approvals (list, approve, deny), on a port of its own, in mitmproxy's process and
event loop. It is served by tornado, which mitmproxy already ships (mitmweb is built
on it), so there is no second server framework. ``docs/openapi.yaml`` describes it.

Security:

- Bound to loopback by default (``spendgate_admin_listen``, "" turns it off). Agents
  cannot reach it through the proxy: the egress stage refuses loopback and private
  addresses.
- Every request needs ``Authorization: Bearer <admin token>``, compared in constant
  time. The token is given as a reference, ``env:NAME`` or ``file:PATH`` (default
  ``env:SPENDGATE_ADMIN_TOKEN``), never inline, and is read on every request, so a
  rotated token file takes effect at once.
- Without a token the listener does not start at all (fail closed).
- ``/metrics`` needs no token only while the listener is bound to loopback (what a
  local Prometheus or sidecar scrapes); bound elsewhere it needs the token too.

Every store call runs on the runtime's side pool, never on the event loop (mitmproxy's, which
serves the agents too): a ledger whose lock is held elsewhere answers the admin call 503
``store_unavailable`` after ``STORE_WAIT`` (the spend report: ``REPORT_WAIT``) while agents
keep being served.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any

import tornado.web
from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader
from tornado.httpserver import HTTPServer

from . import reports
from .keys import IssueError, issue_key, key_spec, parse_labels
from .metrics import CONTENT_TYPE, Metrics
from .policy import read_secret
from .runtime import STORE_WAIT, Runtime
from .store import KeyRecord, StoreUnavailable

log = logging.getLogger("spendgate")

DEFAULT_LISTEN = "127.0.0.1:8082"
DEFAULT_TOKEN_ENV = "SPENDGATE_ADMIN_TOKEN"
DECIDED_BY = "admin-api"
MAX_BODY = 64 * 1024  # requests are a few hundred bytes; refuse anything big before reading it
APPROVAL_STATUSES = ("pending", "approved", "denied", "timeout", "all")
REPORT_WAIT = 30.0  # seconds the spend report may take (a scan of the whole ledger); then 503


# --------------------------------------------------------------------------- options


def parse_listen(value: str) -> tuple[str, int] | None:
    """``"127.0.0.1:8082"``, ``"[::1]:8082"`` → (host, port); ``""`` → None (disabled)."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        # A host is required: exposing the admin API on every interface must be spelled out.
        raise ValueError(f"spendgate_admin_listen {value!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_ref(value: str) -> str:
    """The admin token's reference; never the token itself (it would sit in argv and logs)."""
    ref = value or f"env:{DEFAULT_TOKEN_ENV}"
    kind, sep, target = ref.partition(":")
    if kind not in ("env", "file") or not sep or not target:
        # Don't echo the value: it may well be the secret someone pasted inline.
        raise ValueError("spendgate_admin_token must be a reference, env:NAME or file:PATH, "
                         "never the token itself")
    return ref


MIN_TOKEN_LENGTH = 32  # an admin token shorter than this is refused (the listener does not start)


def resolve_token(ref: str, environ: Mapping[str, str] | None = None) -> str | None:
    """Read the token as vendor keys are read (``policy.read_secret``); None if unset/empty."""
    return read_secret(ref, environ)[0]


# --------------------------------------------------------------------------- HTTP


class ApiError(tornado.web.HTTPError):
    """An error answered as ``{"error": {"type": "spendgate_error", "code", "message", ...}}``."""

    def __init__(self, http_status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(http_status)
        self.code, self.message, self.extra = code, message, extra


DEFAULT_CODES = {400: "invalid_request", 401: "unauthorized", 404: "not_found",
                 405: "method_not_allowed", 413: "too_large"}


class Handler(tornado.web.RequestHandler):
    admin: Admin

    def initialize(self, admin: Admin) -> None:
        self.admin = admin

    def set_default_headers(self) -> None:
        self.clear_header("Server")
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")  # responses may carry a token

    def prepare(self) -> None:
        self.admin.check_host(self.request.host)
        self.admin.authorize(self.request.headers.get("Authorization"))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            code, message, extra = exc.code, exc.message, exc.extra
        else:  # tornado's own (405, …) or an unexpected exception (logged by tornado; no details out)
            code = DEFAULT_CODES.get(status_code, "internal_error")
            message, extra = (self._reason if status_code < 500 else "internal error"), {}
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="spendgate-admin"')
        self.finish(json.dumps(
            {"error": {"type": "spendgate_error", "code": code, "message": message, **extra}}
        ))

    def reply(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(obj))

    def body(self, fields: tuple[str, ...]) -> dict[str, Any]:
        try:
            data = json.loads(self.request.body or b"null")
        except ValueError:
            raise ApiError(400, "invalid_request", "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_request", "the body must be a JSON object")
        # Unknown fields are refused: a typo like "cap" must not silently issue an uncapped key.
        if unknown := sorted(set(data) - set(fields)):
            raise ApiError(400, "invalid_request",
                           f"unknown field(s) {', '.join(unknown)}; expected {', '.join(fields)}",
                           param=unknown[0])
        return data

    @property
    def store(self) -> Any:
        store = self.admin.runtime.store
        if store is None:
            raise ApiError(503, "unavailable", "the ledger is not open yet")
        return store

    async def db(self, fn: Callable[..., Any], *args: Any, wait: float = STORE_WAIT,
                 late: Callable[[], None] | None = None) -> Any:
        """``fn(*args)`` off the event loop; 503 ``store_unavailable`` if the ledger does not
        answer within ``wait`` seconds (``late`` then undoes what it did once it finishes)."""
        try:
            return await self.admin.runtime.offload(fn, *args, wait=wait, side=True, late=late)
        except StoreUnavailable as e:
            raise ApiError(503, "store_unavailable", f"{e}: the change may still be applied when it "
                           "answers (a key issued that late is revoked at once); check, then retry") from None


def _plain(usd: str | None) -> str | None:
    """A decimal string without exponent: str(Decimal) writes 0.0000001 as 1E-7."""
    return None if usd is None else f"{Decimal(usd):f}"


def _label_pairs(pairs: list[str]) -> dict[str, str]:
    try:
        return parse_labels(pairs)
    except ValueError as e:
        raise ApiError(400, "invalid_request", f"label {e}", param="label") from None


class KeysHandler(Handler):
    async def get(self) -> None:
        show_all = self.get_query_argument("all", "false").lower() in ("1", "true", "yes")
        labels = _label_pairs(self.get_query_arguments("label"))
        keys = [k.public() for k in await self.db(self.store.list_keys)
                if (show_all or k.state() == "active")
                and all(k.labels.get(n) == v for n, v in labels.items())]
        self.reply({"keys": keys})

    async def post(self) -> None:
        data = self.body(("policy", "ttl", "cap_usd", "labels"))
        state = self.admin.runtime.state
        if state is None:
            raise ApiError(503, "unavailable", "no policy is loaded")
        args = (data.get("policy"), data.get("ttl"), data.get("cap_usd"), data.get("labels"))
        try:  # the rules first (no database): a bad request is a 400 whatever the ledger's state
            key_spec(state.config, *args)
        except IssueError as e:
            raise ApiError(400, "invalid_request", e.message, param=e.param) from None
        store, issued = self.store, []

        def issue() -> tuple[KeyRecord, str]:
            issued.append(out := issue_key(store, state.config, *args))
            return out

        def revoke_late() -> None:  # issued after the caller was told 503: nobody holds its token
            if issued:
                self.admin.runtime.submit(store.revoke, issued[0][0].id)

        rec, token = await self.db(issue, late=revoke_late)
        log.info("spendgate: admin API issued %s (policy %s, labels %s)", rec.id, rec.policy, rec.labels)
        self.set_header("Location", f"/v1/keys/{rec.id}")
        self.reply({"token": token, **rec.public()}, 201)


class RevokeByLabelsHandler(Handler):
    async def post(self) -> None:
        labels = self.body(("labels",)).get("labels")
        # {} would match every key: revoking everything must not be one typo away.
        if not isinstance(labels, dict) or not labels or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ApiError(400, "invalid_request", "labels must be a non-empty object of strings",
                           param="labels")
        revoked = await self.db(self.store.revoke_by_labels, labels)
        log.info("spendgate: admin API revoked %d key(s) with labels %s", len(revoked), labels)
        self.reply({"revoked": revoked})


class KeyHandler(Handler):
    async def get(self, key_id: str) -> None:
        rec = await self.db(self.store.get_key, key_id)
        if rec is None:
            raise ApiError(404, "not_found", f"no key {key_id!r}")
        self.reply(rec.public())

    async def delete(self, key_id: str) -> None:
        # The gateway reads the keys table on every request: the very next one is refused. (A 503
        # here may still revoke it once the ledger answers: a revoke is safe to repeat.)
        if not await self.db(self.store.revoke, key_id):
            raise ApiError(404, "not_found", f"no key {key_id!r}")
        log.info("spendgate: admin API revoked %s", key_id)
        self.set_status(204)
        self.finish()


class UsageHandler(Handler):
    async def get(self) -> None:
        by = self.get_query_argument("by", "key")
        since = self.get_query_argument("since", None) or None
        try:
            rows = await self.db(reports.spend, self.store, by, since, wait=REPORT_WAIT)
        except ValueError as e:
            raise ApiError(400, "invalid_request", str(e)) from None
        # The report names its first column after `by`; the API calls it "group" so the
        # row shape is the same whatever the grouping.
        usd = ("spend_usd", "parsed_usd", "reconciled_usd", "estimated_usd")
        self.reply({"by": by, "since": since, "rows": [
            {"group": r.pop(by), **r, **{k: _plain(r[k]) for k in usd}} for r in rows
        ]})


class ApprovalsHandler(Handler):
    async def get(self) -> None:
        status = self.get_query_argument("status", "pending")
        if status not in APPROVAL_STATUSES:
            raise ApiError(400, "invalid_request",
                           f"status {status!r}: use {', '.join(APPROVAL_STATUSES)}", param="status")
        rows = await self.db(self.store.list_approvals, None if status == "all" else status)
        self.reply({"approvals": [{**r, "estimated_usd": _plain(r["estimated_usd"])} for r in rows]})


class DecideHandler(Handler):
    async def post(self, approval_id: str, action: str) -> None:
        status = "approved" if action == "approve" else "denied"
        if not await self.db(self.store.decide_approval, approval_id, status, DECIDED_BY):
            current = await self.db(self.store.approval_status, approval_id)
            if current is None:
                raise ApiError(404, "not_found", f"no approval {approval_id!r}")
            raise ApiError(409, "not_pending", f"approval {approval_id} is already {current}",
                           status=current)
        log.info("spendgate: admin API %s %s", status, approval_id)
        self.reply({"id": approval_id, "status": status, "decided_by": DECIDED_BY})


class MetricsHandler(Handler):
    def prepare(self) -> None:
        if not self.admin.metrics_open:
            super().prepare()
        else:
            self.admin.check_host(self.request.host)

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(self.admin.metrics.render())


class NotFoundHandler(Handler):
    def prepare(self) -> None:
        super().prepare()  # authenticate first: an anonymous caller learns nothing about routes
        raise ApiError(404, "not_found", f"no route {self.request.method} {self.request.path}")


ROUTES: list[tuple[str, type[Handler]]] = [
    (r"/v1/keys", KeysHandler),
    (r"/v1/keys/revoke", RevokeByLabelsHandler),  # before /v1/keys/{id}: routes match in order
    (r"/v1/keys/([^/]+)", KeyHandler),
    (r"/v1/usage", UsageHandler),
    (r"/v1/approvals", ApprovalsHandler),
    (r"/v1/approvals/([^/]+)/(approve|deny)", DecideHandler),
    (r"/metrics", MetricsHandler),
]


def _access_log(handler: tornado.web.RequestHandler) -> None:
    req, status = handler.request, handler.get_status()
    # Scrapes and API calls every few seconds would drown the proxy's own log: debug only;
    # refusals (401s included) are worth seeing.
    log.log(logging.INFO if status >= 400 else logging.DEBUG, "spendgate: admin API %s %s %s %d",
            req.remote_ip, req.method, req.path, status)


# --------------------------------------------------------------------------- the addon


class Admin:
    def __init__(self, runtime: Runtime, metrics: Metrics) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.listen: tuple[str, int] | None = None
        self.token_ref = f"env:{DEFAULT_TOKEN_ENV}"
        self.explicit = False  # did the operator ask for the admin API (vs the defaults)?
        self.server: HTTPServer | None = None
        self.is_running = False
        self._warned_token = False

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "spendgate_admin_listen", str, DEFAULT_LISTEN,
            'Admin API and /metrics listen address, HOST:PORT ("" disables it).',
        )
        loader.add_option(
            "spendgate_admin_token", str, "",
            f"Admin API bearer token as a reference, env:NAME or file:PATH, never inline "
            f"(default: env:{DEFAULT_TOKEN_ENV}).",
        )

    def configure(self, updated: set[str]) -> None:
        if not updated & {"spendgate_admin_listen", "spendgate_admin_token"}:
            return
        try:
            listen = parse_listen(ctx.options.spendgate_admin_listen)
            ref = token_ref(ctx.options.spendgate_admin_token)
        except ValueError as e:
            raise exceptions.OptionsError(f"spendgate: {e}") from None
        changed = (listen, ref) != (self.listen, self.token_ref)
        self.listen, self.token_ref = listen, ref
        self.explicit = bool(ctx.options.spendgate_admin_token) or (
            ctx.options.spendgate_admin_listen != DEFAULT_LISTEN
        )
        if changed and self.is_running:  # changed at run time (e.g. mitmweb's options editor)
            self._stop()
            self._start()

    def running(self) -> None:
        self.is_running = True
        if self.server is None:
            self._start()

    async def done(self) -> None:
        server = self._stop()
        if server is not None:
            await server.close_all_connections()

    @property
    def metrics_open(self) -> bool:
        return self.listen is not None and is_loopback(self.listen[0])

    def check_host(self, host_header: str | None) -> None:
        """Answer only requests addressed to this listener (DNS rebinding: a web page whose name
        now resolves to 127.0.0.1 sends its own name as Host). Accepted: the listen host, an IP
        literal (it cannot be rebound), ``localhost`` and this machine's host name."""
        host = (host_header or "").strip().lower()
        if host.startswith("["):
            host = host[1:host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
        try:
            ipaddress.ip_address(host)
            return
        except ValueError:
            pass
        allowed = {"localhost", socket.gethostname().lower()}
        if self.listen is not None:
            allowed.add(self.listen[0].lower())
        if host not in allowed:
            raise ApiError(421, "misdirected_request",
                           f"this admin listener does not answer for Host {host_header!r}")

    def authorize(self, header: str | None) -> None:
        """Raise a 401 :class:`ApiError` unless ``header`` carries the admin token."""
        token = resolve_token(self.token_ref)
        if token is None:
            # The token went away after start-up (file deleted, emptied): refuse everything.
            if not self._warned_token:
                log.error("spendgate: admin token %s is no longer readable; refusing admin requests",
                          self.token_ref)
                self._warned_token = True
            raise ApiError(401, "unauthorized", "the gateway has no admin token configured")
        self._warned_token = False
        if len(token) < MIN_TOKEN_LENGTH:  # rotated to a guessable one after start-up
            raise ApiError(401, "unauthorized", f"the gateway's admin token is shorter than {MIN_TOKEN_LENGTH} characters")
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "unauthorized", "send the admin token as Authorization: Bearer <token>")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "unauthorized", "the admin token is not valid")

    def app(self) -> tornado.web.Application:
        args = {"admin": self}
        return tornado.web.Application(
            [(path, handler, args) for path, handler in ROUTES],
            default_handler_class=NotFoundHandler, default_handler_args=args,
            log_function=_access_log, compress_response=False,
        )

    def _start(self) -> None:
        if self.listen is None:
            log.info("spendgate: admin API off (spendgate_admin_listen is empty)")
            return
        host, port = self.listen
        if resolve_token(self.token_ref) is None:
            # Fail closed: no token, no listener. An error (mitmproxy exits at start-up) when
            # the operator asked for the API; a warning when it is only the default.
            log.log(
                logging.ERROR if self.explicit else logging.WARNING,
                "spendgate: admin API NOT started on %s:%d: no admin token (%s is unset, empty or "
                "unreadable). Set %s, or --set spendgate_admin_token=env:NAME|file:PATH; "
                "--set spendgate_admin_listen= turns the admin API off.",
                host, port, self.token_ref, DEFAULT_TOKEN_ENV,
            )
            return
        if len(token := resolve_token(self.token_ref) or "") < MIN_TOKEN_LENGTH:
            log.log(logging.ERROR if self.explicit else logging.WARNING,
                    "spendgate: admin API NOT started on %s:%d: the admin token (%s) has %d characters; "
                    "at least %d are required (e.g. openssl rand -hex 32)",
                    host, port, self.token_ref, len(token), MIN_TOKEN_LENGTH)
            return
        try:
            self.server = self.app().listen(port, host, max_body_size=MAX_BODY)
        except OSError as e:
            log.error("spendgate: admin API cannot listen on %s:%d: %s", host, port, e.strerror or e)
            return
        if not is_loopback(host):
            log.warning("spendgate: admin API listens on %s, not loopback: it is plain HTTP, so put "
                        "TLS in front of it; /metrics needs the admin token there", host)
        log.info("spendgate: admin API listening at http://%s:%d (/metrics %s)",
                 f"[{host}]" if ":" in host else host, port,
                 "open on loopback" if self.metrics_open else "needs the admin token")

    def _stop(self) -> HTTPServer | None:
        server, self.server = self.server, None
        if server is not None:
            server.stop()
        return server
