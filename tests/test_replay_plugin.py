"""The pytest plugin ``spendgate.testing``, used from a test file in a temporary project (pytester)."""

from __future__ import annotations

import json
import shutil
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from mitmproxy import io

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "tests" / "flows" / "demo.mitm"
EXAMPLE = (ROOT / "policies" / "example.yaml").read_text()


def test_registered_as_a_pytest11_entry_point() -> None:
    assert [e.value for e in entry_points(group="pytest11") if e.name == "spendgate"] == ["spendgate.testing"]


def big_capture(path: Path, copies: int) -> int:
    """The demo capture repeated ``copies`` times, a minute apart, each copy by its own keys."""
    with DEMO.open("rb") as f:
        flows = list(io.FlowReader(f).stream())
    n = 0
    with path.open("wb") as out:
        w = io.FlowWriter(out)
        for i in range(copies):
            for fl in flows:
                c = fl.copy()
                c.request.timestamp_start += 60 * i  # type: ignore[attr-defined]
                meta = c.metadata.get("spendgate")
                if meta and meta.get("key_id"):
                    meta["key_id"] = f"{meta['key_id']}-{i}"
                w.add(c)
                n += 1
    return n


def test_the_fixture_and_its_assertions(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", policy=EXAMPLE, tight=EXAMPLE.replace("max_request_usd: 200", "max_request_usd: 15"))
    (pytester.path / "captures").mkdir()
    n = big_capture(pytester.path / "captures" / "week.mitm", 20)
    assert n == 320
    pytester.makepyfile(test_policy="""
        import json, time

        def test_policy_as_captured(spendgate_replay):
            t, c = time.perf_counter(), time.process_time()
            import spendgate.replay  # (once per session: mitmproxy and the gateway's modules)
            imported = time.perf_counter() - t, time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            calls = spendgate_replay("policy.yaml", "captures")
            took = time.perf_counter() - t, time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            spendgate_replay("policy.yaml", "captures")
            again = time.perf_counter() - t, time.process_time() - c
            open("timing.json", "w").write(json.dumps(
                {"flows": len(calls), "import": imported, "first": took, "second": again}))
            assert len(calls) == 320
            calls.where(path="/v1/payment_methods/*").assert_refused("endpoint_not_allowed")
            calls.where(vendor="openai", key="key_9f5d2bab981d-3").assert_allowed()
            calls.where(vendor="anthropic").assert_allowed().assert_cost_at_most("0.01")
            calls.assert_unchanged()

        def test_tighter(spendgate_replay):
            calls = spendgate_replay("tight.yaml", "captures/week.mitm")
            assert calls.summary.newly_refused == 60
            calls.changed.assert_refused("request_over_limit")

        def test_diff(spendgate_replay):
            calls = spendgate_replay("tight.yaml", "captures", old="policy.yaml")
            assert len(calls.changed) == 60

        def test_fails_listing_the_calls(spendgate_replay):
            spendgate_replay("tight.yaml", "captures").where(path="/v1/payment_intents").assert_allowed()

        def test_fails_on_cost(spendgate_replay):
            spendgate_replay("policy.yaml", "captures").where(vendor="stripe").assert_cost_at_most(1)

        def test_fails_when_nothing_matches(spendgate_replay):
            spendgate_replay("policy.yaml", "captures").where(path="/nothing").assert_refused()
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, failed=3)
    result.stdout.fnmatch_lines([
        "*calls would be refused:*",
        "*#1 POST api.stripe.com/v1/payment_intents (key key_13d3366d503c-0): then allow $20.00, now deny request_over_limit $0*",
        "*these calls cost $*, over $1; the most expensive:*",
        "*no replayed call matches*",
    ])
    timing = json.loads((pytester.path / "timing.json").read_text())
    print("spendgate_replay: imports {:.2f} s ({:.2f} s CPU); {} flows in {:.2f} s ({:.2f} s CPU), "
          "again in {:.2f} s ({:.2f} s CPU)".format(*timing["import"], timing["flows"], *timing["first"],
                                                     *timing["second"]))
    # The target is under a second (README: the figures on this machine); the bound is loose for shared CI.
    assert timing["first"][0] < 10.0


def test_relative_paths_resolve_from_the_rootdir(pytester: pytest.Pytester) -> None:
    pytester.makefile(".yaml", policy=EXAMPLE)
    pytester.makeini("[pytest]\n")
    sub = pytester.mkdir("sub")
    shutil.copy(DEMO, pytester.path / "demo.mitm")
    (sub / "test_sub.py").write_text(
        "import os\n"
        "def test_it(spendgate_replay):\n"
        "    os.chdir(os.path.dirname(__file__))\n"
        "    assert len(spendgate_replay('policy.yaml', 'demo.mitm')) == 16\n")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
