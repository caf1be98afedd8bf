"""The fake vendors' HTTP server: routes a request to its vendor module by method + path,
records it, applies the test controls (``X-Fake-*``) and answers in the vendor's shape."""

from __future__ import annotations

import argparse
import copy
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

from fakes import anthropic, compatible, gemini, mcp, openai, postmark, resend, shopify, stripe, twilio
from fakes.base import JSON, BadRequest, Request, Response, Route, State, generic_error, json_response
from fakes.stripe import STRIPE_API_VERSION


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for the fakes, a gateway, an admin listener):
    the one copy tests, ``scripts/demo`` and ``scripts/bench`` use."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

RECORDED_BODY_BYTES = 4096

# First match wins: Stripe's catch-all for /v1/ must come after OpenAI's and Anthropic's /v1/ paths.
VENDORS = (openai, anthropic, gemini, compatible, mcp, stripe, twilio, resend, postmark, shopify)
ROUTES: list[Route] = [r for vendor in VENDORS for r in vendor.ROUTES]
VENDOR_ERRORS: dict[str, Callable[..., JSON]] = {v.VENDOR: v.ERROR for v in VENDORS}
_REQUEST_IDS: dict[str, Callable[[], tuple[str, str] | None]] = {v.VENDOR: v.request_id for v in VENDORS}


def error_response(
    vendor: str | None, status: int, message: str | None = None, **extra: Any
) -> Response:
    builder = VENDOR_ERRORS.get(vendor or "", generic_error)
    return json_response(builder(status, message, **extra), status)


def request_id_header(vendor: str | None) -> tuple[str, str] | None:
    make = _REQUEST_IDS.get(vendor or "")
    return make() if make else None


def find_route(method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    for route in ROUTES:
        if route.method in (method, "*") and (m := route.pattern.fullmatch(path)):
            return route, m.groupdict()
    return None


def vendor_of(path: str) -> str | None:
    """The vendor owning ``path`` whatever the method (to shape 404s and forced errors)."""
    for route in ROUTES:
        if route.pattern.fullmatch(path):
            return route.vendor
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    state: State
    verbose: bool


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else small header/body writes wait ~40 ms for delayed ACKs
    server: _Server

    def version_string(self) -> str:
        return "spendgate-fakes/1.0"

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:
            # The client went away mid-request or between two requests on a kept-alive connection
            # (a test that cuts its connection, a gateway that resets one): there is no one left to
            # answer. Anything else still reaches socketserver's handle_error and is printed.
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    # -- request

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        body = self._read_body()
        state = self.server.state
        if url.path in ("/__requests", "/__health"):
            self._send(self._control(url.path))
            return
        found = find_route(self.command, url.path)
        vendor = found[0].vendor if found else vendor_of(url.path)
        with state.lock:
            state.requests.append({
                "time": time.time(), "vendor": vendor, "method": self.command,
                "path": url.path, "query": url.query,
                "headers": [[k, v] for k, v in self.headers.items()],
                "body_length": len(body),
                "body": body[:RECORDED_BODY_BYTES].decode("utf-8", "replace"),
            })  # fmt: skip
        delay = _number(self.headers.get("X-Fake-Delay"))
        if delay:
            time.sleep(delay)
        response = self._respond(found, vendor, url.path, url.query, body)
        rid = request_id_header(vendor)
        if rid and rid[0] not in response.headers:
            response.headers[rid[0]] = rid[1]
        if vendor == "stripe":
            version = self.headers.get("Stripe-Version", STRIPE_API_VERSION)
            response.headers.setdefault("Stripe-Version", version)
        if self.headers.get("X-Fake-Body", "").lower() == "malformed":
            response = _truncated(response)
        self._send(response)

    def _respond(
        self, found: tuple[Route, dict[str, str]] | None, vendor: str | None, path: str,
        query: str, body: bytes,
    ) -> Response:  # fmt: skip
        forced = _number(self.headers.get("X-Fake-Status"))
        if forced:
            response = error_response(vendor, int(forced))
            response.headers["x-should-retry"] = "false"
            if vendor == "stripe":
                response.headers["Stripe-Should-Retry"] = "false"
            return response
        if found is None:
            return error_response(vendor, 404, f"fake vendors: no route for {self.command} {path}")
        route, params = found
        req = Request(self.command, path, query, self.headers, body, params, self.server.state)
        try:
            return route.handler(req)
        except BadRequest as exc:
            return error_response(vendor, exc.status, exc.message, **exc.extra)
        except ValueError as exc:  # JSON / form / number parsing
            return error_response(vendor, 400, f"Could not parse the request body: {exc}")
        except Exception as exc:  # a bug in the fake: say so loudly, answer like the vendor
            traceback.print_exc()
            return error_response(vendor, 500, f"fake vendors crashed: {exc!r}")

    def _control(self, path: str) -> Response:
        state = self.server.state
        if path == "/__health":
            return json_response({"ok": True})
        with state.lock:
            if self.command == "DELETE":
                cleared = len(state.requests)
                state.requests.clear()
                return json_response({"cleared": cleared})
            return json_response(state.requests)

    # -- response

    def _send(self, response: Response) -> None:
        chunked = response.events is not None and self.request_version == "HTTP/1.1"
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                for event in response.events or []:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.write(b"0\r\n\r\n")
            else:
                payload = b"".join(response.events) if response.events is not None else response.body
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _truncated(response: Response) -> Response:
    """The first half of the body (a cut event stream stays an event stream)."""
    whole = b"".join(response.events) if response.events is not None else response.body
    cut = whole[: max(1, len(whole) // 2)]
    events = None if response.events is None else [cut]
    return Response(200, cut, response.content_type, response.headers, events)


class FakeVendors:
    """The fake vendors server, in a daemon thread. ``start()`` returns ``self``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False):
        self.host = host
        self.port = port
        self.verbose = verbose
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._state = State()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        server = _Server((self.host, self.port), _Handler)
        server.state = self._state
        server.verbose = self.verbose
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"fake-vendors:{self.port}", daemon=True,
        )  # fmt: skip
        self._thread.start()
        return self

    def requests(self) -> list[JSON]:
        with self._state.lock:
            return copy.deepcopy(self._state.requests)

    def clear(self) -> None:
        with self._state.lock:
            self._state.requests.clear()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self if self._server else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Fake values for the secrets policies/demo.yaml references: the fakes accept any key.
FAKE_SECRETS = {
    "STRIPE_SECRET_KEY": "sk_test_FAKE_for_the_offline_fakes",
    "OPENAI_API_KEY": "sk-FAKE-for-the-offline-fakes",
    "ANTHROPIC_API_KEY": "sk-ant-FAKE-for-the-offline-fakes",
    "TWILIO_ACCOUNT_SID": "AC" + "0" * 32,
    "TWILIO_AUTH_TOKEN": "FAKE_for_the_offline_fakes",
    "RESEND_API_KEY": "re_FAKE_for_the_offline_fakes",
    "POSTMARK_SERVER_TOKEN": "FAKE-for-the-offline-fakes",
    "SHOPIFY_ACCESS_TOKEN": "shpat_FAKE_for_the_offline_fakes",
    "GEMINI_API_KEY": "FAKE-gemini-for-the-offline-fakes",
    "OPENROUTER_API_KEY": "sk-or-FAKE-for-the-offline-fakes",
    "DOCS_MCP_TOKEN": "FAKE-docs-mcp-for-the-offline-fakes",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fakes",
        description="OFFLINE FAKE Stripe/OpenAI/Anthropic/Twilio/Resend/Postmark/Shopify APIs, for trying "
                    "spendgate and for its tests (policies/demo.yaml points every vendor here). "
                    "Nothing here is a real API.",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument("--env", action="store_true",
                        help="print fake values for the secrets policies/demo.yaml reads (export lines) and exit")
    args = parser.parse_args(argv)
    if args.env:
        print("# FAKE secrets for policies/demo.yaml and the offline fakes: never real keys")
        for name, value in FAKE_SECRETS.items():
            print(f"export {name}={value}")
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    fake = FakeVendors(args.host, args.port, verbose=args.verbose).start()
    print(f"fake vendors listening on {fake.url} (OFFLINE FAKES for trying spendgate: not real APIs; "
          "Ctrl-C stops them)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        fake.stop()
    return 0
