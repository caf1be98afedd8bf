"""The spendgate pipeline: every addon, in the order a request meets them.

    mitmdump -s addons/gateway.py --set spendgate_config=policies/example.yaml

agent ─CONNECT─▶ egress ▶ identify ▶ authorize ▶ models ▶ tools ▶ budget ▶ approve ▶ circuit ▶ swap ▶ vendor
vendor ─response─▶ meter (cost, settle) ▶ scrub (secrets out) ▶ record (ledger, comment) ─▶ agent
"""

from __future__ import annotations

import sys
from pathlib import Path

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

from spendgate.admin import Admin  # noqa: E402
from spendgate.capture import Capture  # noqa: E402
from spendgate.console import Console, ReplayGuard  # noqa: E402
from spendgate.metrics import Metrics  # noqa: E402
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


def make_addons() -> list[object]:
    runtime = Runtime()
    metrics = Metrics(runtime)
    return [
        runtime,
        metrics,
        Admin(runtime, metrics),
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
    ]


addons = make_addons()
