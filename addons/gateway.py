"""The spendgate pipeline: every addon, in the order a request meets them.

    mitmdump -s addons/gateway.py --set spendgate_config=policies/example.yaml

agent ─CONNECT─▶ egress ▶ identify ▶ authorize ▶ models ▶ tools ▶ budget ▶ approve ▶ circuit ▶ swap ▶ vendor
vendor ─response─▶ meter (cost, settle) ▶ scrub (secrets out) ▶ record (ledger, comment) ─▶ agent

mitmproxy loads two addon objects: the :class:`~spendgate.runtime.Runtime` (options, policy,
ledger) and one :class:`Chain` that calls the stages' hooks in the order listed here. Each stage
stays its own class, with its own hooks and tests; the chain only dispatches. (mitmproxy walks
every addon object on every event, about eight per request, at ~1.5 µs per object and event: the
twenty objects this used to be cost ~240 µs of CPU per request before any of them did anything.)
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

try:
    import spendgate  # noqa: F401  (installed: pip install -e .)
except ImportError:  # loaded with -s from a checkout without installing: map ./addons to spendgate
    import importlib.util

    _here = Path(__file__).resolve().parent
    _spec = importlib.util.spec_from_file_location(
        "spendgate", _here / "__init__.py", submodule_search_locations=[str(_here)]
    )
    assert _spec and _spec.loader
    sys.modules["spendgate"] = _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)

import mitmproxy.proxy.layers  # noqa: E402, F401  (defines the proxy's hooks: all_hooks then lists every one)
import mitmproxy.proxy.server_hooks  # noqa: E402, F401
from mitmproxy import exceptions, hooks  # noqa: E402

from spendgate.admin import Admin  # noqa: E402
from spendgate.capture import Capture  # noqa: E402
from spendgate.console import Console, ReplayGuard  # noqa: E402
from spendgate.metrics import Metrics  # noqa: E402
from spendgate.reconcile_task import ReconcileTask  # noqa: E402
from spendgate.runtime import Runtime  # noqa: E402
from spendgate.stages.approve import Approve  # noqa: E402
from spendgate.stages.authorize import Authorize  # noqa: E402
from spendgate.stages.budget import Budget  # noqa: E402
from spendgate.stages.circuit import Circuit  # noqa: E402
from spendgate.stages.egress import Egress  # noqa: E402
from spendgate.stages.identify import Identify  # noqa: E402
from spendgate.stages.meter import Meter  # noqa: E402
from spendgate.stages.models import Models  # noqa: E402
from spendgate.stages.querykey import QueryKeyIn, QueryKeyOut  # noqa: E402
from spendgate.stages.record import Record  # noqa: E402
from spendgate.stages.scrub import Scrub  # noqa: E402
from spendgate.stages.swap import Swap  # noqa: E402
from spendgate.stages.tools import Tools  # noqa: E402

log = logging.getLogger("spendgate")

# Hooks whose errors propagate (start-up and shutdown: an invalid option must stop mitmproxy).
# Every other hook is isolated per member, as mitmproxy isolates addons: a member that raises is
# logged and the next member still runs (a meter bug must not keep record from writing the row).
LIFECYCLE = frozenset({"load", "configure", "running", "done"})


class Chain:
    """One mitmproxy addon that calls its members' hooks in order, as mitmproxy would call them
    as separate addons: the same order, the same arguments, an awaitable a member returns awaited
    before the next member runs, an exception in a per-flow hook logged and the rest still run.

    Every mitmproxy hook any member defines is dispatched (the chain builds one dispatcher per hook
    name at construction), so a hook added to a stage later is never silently skipped. A hook
    that runs synchronously all the way returns ``None``: no coroutine per event.
    """

    def __init__(self, *members: object) -> None:
        self.members: tuple[object, ...] = members  # (not "addons": mitmproxy would walk them itself)
        for name in hooks.all_hooks:
            fns = [fn for m in members if callable(fn := getattr(m, name, None))]
            if fns:
                setattr(self, name, _dispatcher(name, fns))

    def __iter__(self) -> Any:
        return iter(self.members)

    def __repr__(self) -> str:
        return f"Chain({', '.join(type(m).__name__ for m in self.members)})"


def _dispatcher(name: str, fns: Sequence[Callable[..., Any]]) -> Callable[..., Awaitable[None] | None]:
    if name in LIFECYCLE:
        def lifecycle(*args: Any) -> Awaitable[None] | None:
            # Every member runs now, its awaitable (Admin's async done) awaited after: mitmproxy
            # also calls these synchronously (removing a reloaded script calls done without
            # awaiting), and a member must not miss its done because one before it was async.
            pending = [res for fn in fns if (res := fn(*args)) is not None and inspect.isawaitable(res)]
            return _await_all(pending) if pending else None

        lifecycle.__name__ = name
        return lifecycle

    def hook(*args: Any) -> Awaitable[None] | None:
        return _run(fns, 0, args, True)

    hook.__name__ = name
    return hook


async def _await_all(pending: list[Awaitable[Any]]) -> None:
    for res in pending:
        await res


def _run(fns: Sequence[Callable[..., Any]], start: int, args: tuple[Any, ...],
         isolate: bool) -> Awaitable[None] | None:
    """Call ``fns[start:]`` in order; at the first that returns an awaitable, hand the rest to a
    coroutine that awaits it first."""
    for i in range(start, len(fns)):
        fn = fns[i]
        if isolate:
            try:
                res = fn(*args)
            except exceptions.AddonHalt:
                raise
            except Exception:
                _failed(fn)
                continue
        else:
            res = fn(*args)
        if res is not None and inspect.isawaitable(res):
            return _resume(res, fns, i, args, isolate)
    return None


async def _resume(res: Any, fns: Sequence[Callable[..., Any]], i: int, args: tuple[Any, ...],
                  isolate: bool) -> None:
    if isolate:
        try:
            await res
        except exceptions.AddonHalt:
            raise
        except Exception:
            _failed(fns[i])
    else:
        await res
    rest = _run(fns, i + 1, args, isolate)
    if rest is not None:
        await rest


def _failed(fn: Callable[..., Any]) -> None:
    owner = getattr(fn, "__self__", None)
    log.exception("spendgate: %s.%s failed", type(owner).__name__ if owner else "?",
                  getattr(fn, "__name__", "hook"))


def members(addons: Iterable[object]) -> list[object]:
    """Every addon of a list like :func:`make_addons`' one, each chain's members in its place: to
    find one by type (``next(a for a in members(addons) if isinstance(a, Metrics))``)."""
    return [m for a in addons for m in (a.members if isinstance(a, Chain) else (a,))]


def make_addons() -> list[object]:
    """What mitmproxy loads: the Runtime first (``addons[0]``), then the chain of the rest."""
    runtime = Runtime()
    metrics = Metrics(runtime)
    return [
        runtime,
        Chain(
            metrics,
            Admin(runtime, metrics),
            ReconcileTask(runtime),  # off the event loop: costs settled later, the drift on /metrics
            Egress(runtime),
            ReplayGuard(runtime),
            QueryKeyIn(),
            Identify(runtime),
            Authorize(runtime),
            Models(runtime),
            Tools(runtime),
            Budget(runtime),
            Approve(runtime),
            Circuit(runtime),
            Swap(runtime),
            QueryKeyOut(),
            Meter(runtime),
            Scrub(runtime),
            Record(runtime),
            Console(),  # shows the call under the vendor host the agent asked for
            Capture(runtime),  # last: saves the flow as the agent got it, with the decision and cost
        ),
    ]


addons = make_addons()
