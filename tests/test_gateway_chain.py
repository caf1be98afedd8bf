"""gateway.Chain: one mitmproxy addon that calls the stages' hooks as mitmproxy would call them
as separate addons (order, awaitables, errors), driven through mitmproxy's own dispatch."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from mitmproxy import exceptions, hooks
from mitmproxy.proxy.layers.http import _hooks as http_hooks
from mitmproxy.test import taddons, tflow

from spendgate.gateway import Chain, make_addons, members
from spendgate.runtime import Runtime


class Member:
    """Records every call into a shared journal; ``mode`` says how its hooks behave."""

    def __init__(self, name: str, journal: list[str], mode: str = "sync") -> None:
        self.name, self.journal, self.mode = name, journal, mode

    def _call(self, hook: str) -> Any:
        if self.mode == "raise":
            self.journal.append(f"{self.name}.{hook} raises")
            raise RuntimeError(f"{self.name} broke")
        if self.mode == "async":
            async def later() -> None:
                self.journal.append(f"{self.name}.{hook} starts")
                await asyncio.sleep(0.01)  # a member after this one must wait for it
                self.journal.append(f"{self.name}.{hook} ends")
            return later()
        if self.mode == "async-raise":
            async def broken() -> None:
                self.journal.append(f"{self.name}.{hook} starts")
                raise RuntimeError(f"{self.name} broke later")
            return broken()
        self.journal.append(f"{self.name}.{hook}")
        return "not awaitable"  # ignored, as mitmproxy ignores it

    def request(self, flow: Any) -> Any:
        return self._call("request")

    def response(self, flow: Any) -> Any:
        return self._call("response")


class OnlyConfigure:
    def __init__(self, journal: list[str], fail: bool = False) -> None:
        self.journal, self.fail = journal, fail

    def configure(self, updated: set[str]) -> None:
        self.journal.append("configure")
        if self.fail:
            raise exceptions.OptionsError("bad option")


CASES = [
    # (members' modes, what the journal must read after the request hook)
    (["sync", "sync", "sync"], ["a.request", "b.request", "c.request"]),
    (["sync", "async", "sync"], ["a.request", "b.request starts", "b.request ends", "c.request"]),
    (["async", "async", "sync"],
     ["a.request starts", "a.request ends", "b.request starts", "b.request ends", "c.request"]),
    (["raise", "sync", "sync"], ["a.request raises", "b.request", "c.request"]),
    (["sync", "async-raise", "sync"], ["a.request", "b.request starts", "c.request"]),
    (["sync", "sync", "raise"], ["a.request", "b.request", "c.request raises"]),
]


@pytest.mark.parametrize(("modes", "expected"), CASES, ids=["-".join(m) for m, _ in CASES])
def test_chain_calls_members_in_order_through_mitmproxy(modes: list[str], expected: list[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    journal: list[str] = []
    chain = Chain(*(Member(n, journal, m) for n, m in zip("abc", modes, strict=True)))
    caplog.set_level(logging.ERROR, "spendgate")

    async def main() -> None:
        with taddons.context(chain) as tctx:
            await tctx.master.addons.handle_lifecycle(http_hooks.HttpRequestHook(tflow.tflow()))

    asyncio.run(main())
    assert journal == expected
    failed = [m for m in modes if "raise" in m]
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == len(failed)


def test_a_sync_chain_returns_none_not_a_coroutine() -> None:
    journal: list[str] = []
    chain = Chain(Member("a", journal), Member("b", journal))
    assert chain.request(tflow.tflow()) is None  # type: ignore[attr-defined]
    assert journal == ["a.request", "b.request"]


def test_only_the_hooks_members_have_and_every_one_of_them() -> None:
    journal: list[str] = []
    chain = Chain(Member("a", journal), OnlyConfigure(journal))
    assert {n for n in hooks.all_hooks if hasattr(chain, n)} == {"request", "response", "configure"}
    assert not hasattr(chain, "addons")  # mitmproxy would otherwise walk the members a second time


def test_a_lifecycle_error_propagates() -> None:
    journal: list[str] = []
    chain = Chain(OnlyConfigure(journal, fail=True), OnlyConfigure(journal))
    with pytest.raises(exceptions.OptionsError):
        chain.configure(set())  # type: ignore[attr-defined]
    assert journal == ["configure"]


def test_make_addons_is_the_runtime_then_one_chain_of_every_stage() -> None:
    addons = make_addons()
    assert isinstance(addons[0], Runtime) and len(addons) == 2
    assert members(addons) == [addons[0], *addons[1]]
    names = [type(m).__name__ for m in addons[1]]
    assert names == ["Metrics", "Admin", "ReconcileTask", "Egress", "ReplayGuard", "QueryKeyIn", "Identify", "Authorize",
                     "Models", "Tools", "Budget", "Approve", "Circuit", "Swap", "QueryKeyOut", "Meter", "Scrub", "Record",
                     "Console", "Capture"]
    assert all(getattr(m, "runtime", addons[0]) is addons[0] for m in addons[1])
    assert {type(m).__name__ for m in addons[1]} >= set(gateway_stage_classes())


def gateway_stage_classes() -> list[str]:
    """Every addon class gateway.py imports from spendgate: each must be in the chain."""
    import spendgate.gateway as gw

    return [n for n, v in vars(gw).items() if isinstance(v, type) and v.__module__.startswith("spendgate.")
            and n not in ("Chain", "Runtime") and any(hasattr(v, h) for h in hooks.all_hooks)]


def test_flow_comments_are_built_only_where_someone_can_see_them(tmp_path: Any) -> None:
    """A plain mitmdump shows comments nowhere (skip them: ~20 µs a request); mitmdump -w saves
    them; any other master (mitmweb, the console, tests, spendgate replay) may show them."""
    from mitmproxy import options
    from mitmproxy.tools.dump import DumpMaster

    from spendgate.capture import Capture
    from spendgate.stages.record import _comments_shown

    async def main() -> list[bool]:
        seen = []
        with taddons.context():
            seen.append(_comments_shown())
        m = DumpMaster(options.Options(), loop=asyncio.get_running_loop(), with_termlog=False)
        seen.append(_comments_shown())
        m.options.update(save_stream_file=str(tmp_path / "flows.mitm"))
        seen.append(_comments_shown())
        m.options.update(save_stream_file=None)
        seen.append(_comments_shown())
        m.addons.add(Capture(Runtime()))
        m.options.update(spendgate_capture=str(tmp_path / "capture"))
        seen.append(_comments_shown())
        m.options.update(spendgate_capture="")
        seen.append(_comments_shown())
        return seen

    assert asyncio.run(main()) == [True, False, True, False, True, False]


def test_every_member_runs_its_done_even_when_mitmproxy_does_not_await_it() -> None:
    """mitmproxy calls ``done`` synchronously when it removes a reloaded script: the members after
    an async one still run (their sync part), and awaiting the result runs the async parts."""
    journal: list[str] = []

    class AsyncDone:
        async def done(self) -> None:
            journal.append("async done")

    class SyncDone:
        def done(self) -> None:
            journal.append("sync done")

    chain = Chain(AsyncDone(), SyncDone())
    res = chain.done()  # type: ignore[attr-defined]
    assert journal == ["sync done"] and res is not None
    asyncio.run(res)
    assert journal == ["sync done", "async done"]
