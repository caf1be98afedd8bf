"""The gateway's own reconciliation (``--reconcile-every SECONDS``, off by default), and the
estimate drift on ``/metrics``.

Every SECONDS the gateway does what ``spendgate reconcile`` does (``reconcile.run``: at most
:data:`BATCH` calls of the last :data:`reconcile.DEFAULT_SINCE`), with the credentials of the
policy file in force, in a worker thread: the vendors' answers and the ledger's transactions never
wait on mitmproxy's event loop. Off or on, the drift the ``reconciliations`` record shows (any
replica's runs and the CLI's) is read in that thread about once a minute and served from memory:

- ``spendgate_reconciled_calls_total{vendor}``: calls whose cost was settled later;
- ``spendgate_estimate_drift_usd{vendor}``: the sum of (final − counted) over them: negative when
  the estimates over-counted, positive when they under-counted.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mitmproxy import ctx, exceptions

from . import reconcile
from .metrics import _escape, decimal_str
from .runtime import Runtime
from .store import StoreUnavailable

log = logging.getLogger("spendgate")

BATCH = 200  # calls per background run (the CLI takes --limit)
DRIFT_EVERY = 60.0  # seconds between reads of the drift when reconciliation is off


class ReconcileTask:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._task: asyncio.Task | None = None
        self._lines: list[str] = []
        runtime.metric_sources.append(self.metric_lines)

    def load(self, loader: Any) -> None:
        loader.add_option(
            "spendgate_reconcile_every", int, 0,
            "Seconds between the gateway's own reconcile runs (what `spendgate reconcile` does: costs "
            "that arrive later, settled later); 0 (the default) leaves it to the CLI.",
        )

    def configure(self, updated: set[str]) -> None:
        if "spendgate_reconcile_every" in updated and ctx.options.spendgate_reconcile_every < 0:
            raise exceptions.OptionsError("spendgate_reconcile_every must be 0 (off) or a number of seconds")

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _loop(self) -> None:
        first = True
        while True:
            every = int(getattr(ctx.options, "spendgate_reconcile_every", 0) or 0)
            if not first:
                await asyncio.sleep(every if every > 0 else DRIFT_EVERY)
            try:
                await asyncio.to_thread(self.tick, every > 0 and not first)
            except StoreUnavailable:
                pass  # the store logs an outage once; the next tick retries
            except Exception:
                log.exception("spendgate: background reconcile failed")
            first = False

    def tick(self, run: bool) -> None:
        """One run (when asked) and a fresh drift; in a worker thread."""
        store, state = self.runtime.store, self.runtime.state
        if store is None or store.dialect == "memory":
            return
        if run and state is not None:
            ctx_ = reconcile.context_of(state.config, state.credentials, state.prices)
            result = reconcile.run(store, ctx_, limit=BATCH, by=f"gateway {store.replica}")
            summary = result.summary()
            for outcome in result.outcomes:
                if outcome.result in ("reconciled", "error"):
                    (log.info if outcome.result == "reconciled" else log.warning)("spendgate: %s", outcome.line())
            if summary.get("reconciled") or summary.get("error"):
                log.info("spendgate: reconcile: %d calls settled later (delta $%s), %d errors, %d pending",
                         summary.get("reconciled", 0), summary["delta_usd"], summary.get("error", 0),
                         summary.get("pending", 0))
        self._lines = self._render(reconcile.drift(store))

    @staticmethod
    def _render(rows: list[tuple[str, int, int]]) -> list[str]:
        out = ["# HELP spendgate_reconciled_calls_total Calls whose cost was settled later (spendgate "
               "reconcile), by vendor, from the ledger.", "# TYPE spendgate_reconciled_calls_total counter"]
        out += [f'spendgate_reconciled_calls_total{{vendor="{_escape(v)}"}} {n}' for v, n, _ in rows]
        out += ["# HELP spendgate_estimate_drift_usd Sum of (final cost - counted estimate) over reconciled "
                "calls, by vendor: negative when estimates over-counted.", "# TYPE spendgate_estimate_drift_usd gauge"]
        out += [f'spendgate_estimate_drift_usd{{vendor="{_escape(v)}"}} {decimal_str(d, 9)}' for v, _, d in rows]
        return out

    def metric_lines(self) -> list[str]:
        return self._lines or self._render([])
