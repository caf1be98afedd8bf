"""The first addon: options, the policy file (with reload), the ledger.

Every stage holds a reference to the one :class:`Runtime` and reads
``runtime.state`` (an immutable snapshot swapped whole on reload), so a request
never sees half of an old policy and half of a new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.net.http.http1 import expected_http_body_size
from mitmproxy.utils import human

from . import jsonlog, streamends, wire
from .bodies import DEFAULT_BODY_SIZE_LIMIT, DEFAULT_INFLATE_LIMIT
from .paths import config_path, db_path
from .policy import Config, ConfigError, Policy, load_config, resolve_credentials
from .store import (
    DEFAULT_LEASE,
    KeyRecord,
    SchemaError,
    Store,
    StoreUnavailable,
    default_replica,
    open_store,
    redact_url,
)
from .vendors import install_declared
from .vendors.base import Prices

log = logging.getLogger("spendgate")

RELOAD_INTERVAL = 0.5  # seconds between checks of the policy file's mtime
STORE_WAIT = 2.0  # seconds a call waits for its budget hold; then it is refused 503 store_unavailable


@dataclass(frozen=True)
class State:
    """A loaded policy file: validated config, resolved credentials, prices."""

    config: Config
    credentials: dict[str, dict[str, str]]  # vendor → field → real value (memory only)
    prices: Prices
    path: str
    mtime: float


def load_state(path: str) -> State:
    config = load_config(path)
    creds = resolve_credentials(config, path)
    prices = Prices(fx=dict(config.fx), overrides=dict(config.prices))
    return State(config, creds, prices, path, Path(path).stat().st_mtime)


def static_keys(config: Config) -> list[KeyRecord]:
    return [
        KeyRecord(id=k.id, policy=k.policy, token_sha256=k.token_sha256, labels=dict(k.labels),
                  cap_usd=k.cap_usd, source="static")
        for k in config.keys
    ]


class Runtime:
    def __init__(self) -> None:
        self.state: State | None = None
        self.store: Store | None = None
        # Called with (ledger row, call) for every recorded request: metrics, structured logs.
        self.on_record: list[Callable[[dict[str, Any], Any], None]] = []
        # Extra /metrics lines (text format) from stages that keep their own state (the circuit breaker).
        self.metric_sources: list[Callable[[], list[str]]] = []
        self._db: str | None = None
        self._watch: asyncio.Task | None = None
        self._tend: asyncio.Task | None = None
        # Database work a request waits for (budget holds, the loop breaker) runs here, never on
        # mitmproxy's event loop: a lock held elsewhere delays that call only.
        self._db_pool: ThreadPoolExecutor | None = None
        # True: that work runs in the hook itself (the in-process pipeline of ``spendgate replay``
        # on its in-memory ledger, which never blocks: a worker thread would only add hops).
        self.offload_inline = False
        self._side_pool: ThreadPoolExecutor | None = None  # the admin API and approvals (Runtime.offload)
        self.stream_responses_over: int | None = None  # stream_large_bodies, applied to responses only
        self._taking_stream_option = False
        self._running = False  # mitmproxy's running hook was called (start-up is over)
        self._static_unsynced = False  # a reload's static keys are not in the ledger yet (retried by tend)
        self.inflate_limit = DEFAULT_INFLATE_LIMIT  # spendgate_inflate_limit, parsed (bytes)

    def policy(self, name: str) -> Policy | None:
        """The named policy in the policy file now in force (None if it was removed)."""
        return self.state.config.policies.get(name) if self.state else None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "spendgate_config", str, "",
            "Spendgate policy file (default: $SPENDGATE_CONFIG, else policies/spendgate.yaml).",
        )
        loader.add_option(
            "spendgate_db", str, "",
            "Spendgate ledger: a SQLite file or a postgresql:// URL "
            "(default: $SPENDGATE_DB, else data/spendgate.db).",
        )
        loader.add_option(
            "spendgate_replica", str, "",
            "This gateway's name in a fleet (default: the hostname).",
        )
        loader.add_option(
            "spendgate_lease", str, str(int(DEFAULT_LEASE)),
            "Seconds a silent gateway's budget holds are kept before a live one recovers them.",
        )
        loader.add_option(
            "spendgate_log_format", str, "text",
            "One log line per decision: 'text' or 'json' (no secrets, no bodies).",
        )
        loader.add_option(
            "spendgate_inflate_limit", str, "32m",
            "Largest decoded (inflated) request or response body the gateway reads; a request over it "
            "is refused (413 body_too_large), a response over it is not priced (cost unknown).",
        )
        wire.install()
        streamends.install()  # an empty HTTP/2 frame mid-stream must not flush what scrub holds back

    def configure(self, updated: set[str]) -> None:
        if ctx.options.spendgate_log_format not in ("text", "json"):
            raise exceptions.OptionsError("spendgate_log_format must be 'text' or 'json'")
        if "spendgate_log_format" in updated:
            self._log_format(ctx.options.spendgate_log_format == "json")
        if "spendgate_config" in updated or self.state is None:
            path = config_path(ctx.options.spendgate_config)
            try:
                self._install(load_state(path))
            except ConfigError as e:
                if self.state is None:
                    # No policy at all: never run as a plain proxy without the pipeline.
                    # (mitmproxy's errorcheck exits with status 1 on errors logged at start-up.)
                    self._cannot_start(f"spendgate: invalid policy, not starting\n{e}")
                    return
                log.error("spendgate: %s rejected, keeping the last good policy:\n%s", path, e)
        if "spendgate_db" in updated or self.store is None:
            db = db_path(ctx.options.spendgate_db)
            if db != self._db:
                if self.store is not None:
                    self.store.close()
                self.store = None
                try:
                    lease = float(ctx.options.spendgate_lease)
                    if lease <= 0:
                        raise ValueError
                except ValueError:
                    raise exceptions.OptionsError(
                        f"spendgate_lease must be a number of seconds > 0, not {ctx.options.spendgate_lease!r}"
                    ) from None
                try:
                    store = open_store(db, replica=ctx.options.spendgate_replica or default_replica(),
                                       lease=lease)
                    store.check_writable()
                except (SchemaError, StoreUnavailable) as e:
                    self._cannot_start(f"spendgate: {e}, not starting")
                    return
                self.store, self._db = store, db
                log.info("spendgate: ledger %s (replica %s)", redact_url(db), store.replica)
                self.tend()  # register this gateway, recover the holds of dead ones
            if self.state:
                self.store.sync_static_keys(static_keys(self.state.config))
        # HTTP/3 stays off: the credential swap is proven at start-up for HTTP/1 and HTTP/2 only
        # (wire.self_test); with QUIC off mitmproxy never speaks HTTP/3 to a client or a vendor.
        if getattr(ctx.options, "http3", False):
            ctx.options.http3 = False
            log.info("spendgate: HTTP/3 (QUIC) is off: the credential swap is proven for HTTP/1 and HTTP/2")
        self.inflate_limit = human.parse_size(ctx.options.spendgate_inflate_limit) or DEFAULT_INFLATE_LIMIT
        # A bound on raw bodies too: mitmproxy's default is none at all.
        if getattr(ctx.options, "body_size_limit", "") is None:
            ctx.options.body_size_limit = DEFAULT_BODY_SIZE_LIMIT
        # Lazy: with "eager", mitmproxy dials the vendor at CONNECT time, before any policy ran.
        if getattr(ctx.options, "connection_strategy", "lazy") != "lazy":
            ctx.options.connection_strategy = "lazy"
        # mitmproxy streams a request over stream_large_bodies upstream *before* the request hook,
        # i.e. before any check, unswapped, to the real vendor host. So the gateway takes the option
        # over and applies it to responses only (responseheaders); requests are always read whole
        # (bounded by body_size_limit).
        if "stream_large_bodies" in updated and not self._taking_stream_option:
            limit = getattr(ctx.options, "stream_large_bodies", None)
            self.stream_responses_over = human.parse_size(limit) if limit else None
            if limit:
                self._taking_stream_option = True
                try:
                    ctx.options.stream_large_bodies = None
                finally:
                    self._taking_stream_option = False

    def _cannot_start(self, message: str) -> None:
        """No policy or no ledger: log why, in one line a user can act on, and stop. Under
        mitmdump at start-up the error alone stops it (its errorcheck exits with status 1 on any
        error logged before it runs; raising would add mitmproxy's "error in script" traceback);
        otherwise (mitmweb, an option changed at run time, the in-process pipeline) the option is
        refused with OptionsError."""
        log.critical("%s", message)
        if self._running or ctx.master.addons.get("errorcheck") is None:
            raise exceptions.OptionsError(message)

    def _log_format(self, as_json: bool) -> None:
        """JSON mode: every printed line is JSON (jsonlog.py); mitmdump's per-flow lines are off.
        ``spendgate run --log-format json`` starts mitmproxy quiet (so its first lines, printed
        before this addon loads, are not plain text) and names the verbosity to restore here."""
        jsonlog.use_json(as_json)
        if not as_json:
            return
        if getattr(ctx.options, "flow_detail", 0):
            ctx.options.flow_detail = 0
        verbosity = os.environ.pop("SPENDGATE_TERMLOG_VERBOSITY", None)
        if verbosity and hasattr(ctx.options, "termlog_verbosity"):
            ctx.options.termlog_verbosity = verbosity

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Stream a response larger than stream_large_bodies to the agent (it is then not priced)."""
        limit, resp = self.stream_responses_over, flow.response
        if limit is None or resp is None or resp.stream:
            return
        try:
            size = expected_http_body_size(flow.request, resp)
        except ValueError:
            return
        if size is not None and size > limit:
            resp.stream = True

    def _install(self, state: State) -> None:
        install_declared(state.config.declared_vendors)  # vendors the file declares (hosts:)
        self.state = state
        if self.store is not None:
            if self._running:  # a reload: the ledger write (a lock may hold it) off the event loop
                self.submit(self._sync_static_keys)
            else:
                self.store.sync_static_keys(static_keys(state.config))
        log.info(
            "spendgate: policy %s loaded (%d policies, vendors: %s)",
            state.path, len(state.config.policies), ", ".join(state.config.vendors) or "none",
        )

    def _sync_static_keys(self) -> None:
        """The policy file's static keys into the ledger, from the policy in force when it runs
        (so two quick reloads cannot apply an older file last)."""
        store, state = self.store, self.state
        if store is None or state is None:
            return
        try:
            store.sync_static_keys(static_keys(state.config))
            self._static_unsynced = False
        except Exception as e:  # a lock held past the busy timeout, an outage: the heartbeat retries
            if not self._static_unsynced:
                log.warning("spendgate: the policy's static keys could not be written to the ledger "
                            "(%s); retrying with the heartbeat", e)
            self._static_unsynced = True

    def running(self) -> None:
        self._running = True
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_policy())
        if self._tend is None:
            self._tend = asyncio.get_running_loop().create_task(self._tend_loop())

    def tend(self) -> None:
        """Heartbeat this gateway's lease and recover the holds of dead gateways (any backend):
        a forwarded hold becomes spend at its estimate (flagged row), one never sent is released."""
        store = self.store
        if store is None:
            return
        if self._static_unsynced:
            self._sync_static_keys()
        try:
            store.heartbeat()
            counted, released = store.recover_holds()
        except StoreUnavailable:
            return  # logged once by the store; the next beat retries
        if counted or released:
            log.warning("spendgate: recovered the holds of a stopped gateway: %d counted at their "
                        "estimate (flagged rows), %d released (never sent)", counted, released)

    def _pool(self, side: bool) -> ThreadPoolExecutor:
        if side:
            if self._side_pool is None:
                self._side_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spendgate-db-side")
            return self._side_pool
        if self._db_pool is None:
            self._db_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="spendgate-db")
        return self._db_pool

    async def offload(self, fn: Callable[..., Any], *args: Any,
                      late: Callable[[], None] | None = None, wait: float = STORE_WAIT,
                      side: bool = False) -> Any:
        """Run ``fn(*args)`` on the database pool; after ``wait`` (:data:`STORE_WAIT`) seconds give
        up with :class:`StoreUnavailable` (the call fails closed, 503) and, once ``fn`` does
        finish, run ``late`` (on the event loop: queue work, never wait) to undo what it did for a
        call already refused. ``side=True``: the side pool (the admin API, approvals), so that work
        stuck on a lock there never takes a thread an agent's budget hold needs."""
        if self.offload_inline:
            return fn(*args)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool(side), fn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), wait)
        except TimeoutError:
            if self.store is not None and self.store.available:
                log.error("spendgate: the ledger did not answer within %gs; refusing the call "
                          "(503 store_unavailable)", wait)
            if late is not None:
                fut.add_done_callback(lambda _: late())
            raise StoreUnavailable(f"the ledger did not answer within {wait:g}s") from None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the side pool and forget it (errors are logged): ledger work a
        call no longer waits for (an approval decided after its call was answered)."""
        def run() -> None:
            try:
                fn(*args)
            except StoreUnavailable:
                pass  # logged once per outage by the store
            except Exception:
                log.exception("spendgate: background ledger work failed")

        self._pool(True).submit(run)

    async def _tend_loop(self) -> None:
        """Every third of the lease, in a worker thread (never a database wait on the event loop)."""
        while True:
            store = self.store
            await asyncio.sleep(max(0.1, (store.lease if store else DEFAULT_LEASE) / 3))
            try:
                await asyncio.to_thread(self.tend)
            except Exception:
                log.exception("spendgate: heartbeat failed")

    async def _watch_policy(self) -> None:
        """Reload the policy file when it changes; an invalid file keeps the old policy."""
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            self.check_reload()

    def check_reload(self) -> None:
        state = self.state
        if state is None:
            return
        try:
            mtime = Path(state.path).stat().st_mtime
        except OSError:
            return
        if mtime == state.mtime:
            return
        try:
            self._install(load_state(state.path))
        except ConfigError as e:
            # Remember the mtime so the same bad file is reported once, not every tick.
            self.state = State(state.config, state.credentials, state.prices, state.path, mtime)
            log.error("spendgate: %s rejected, keeping the last good policy:\n%s", state.path, e)
        except Exception as e:  # a loader bug must not end the watcher (and with it every later reload)
            self.state = State(state.config, state.credentials, state.prices, state.path, mtime)
            log.error("spendgate: %s could not be loaded (%s: %s), keeping the last good policy",
                      state.path, type(e).__name__, e)

    def done(self) -> None:
        install_declared({})  # the declared vendors go with the policy file that declared them
        for task in (self._watch, self._tend):
            if task is not None:
                task.cancel()
        for pool in (self._db_pool, self._side_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        self._db_pool = self._side_pool = None
        if self.store is not None:
            self.store.close()
