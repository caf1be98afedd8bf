"""Write policies/demo.yaml from policies/example.yaml: the same file with every vendor sent to the
offline fake vendors (``upstream: "http://127.0.0.1:9100"``) and a DEMO header.

    python scripts/demo_policy.py        # after editing policies/example.yaml

tests/test_cli_onboarding.py fails when demo.yaml is not what this writes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKES = '"http://127.0.0.1:9100"'
HEADER = """\
# DEMO policy: every vendor is sent to the OFFLINE FAKE vendors on 127.0.0.1:9100
# (python -m fakes), never to a real API. For trying spendgate only (README "Run it",
# ./scripts/demo); give it fake secrets (eval "$(python -m fakes --env)").
# Generated from policies/example.yaml by scripts/demo_policy.py: edit that file, then run this.
version: 1

"""
DROPPED_COMMENTS = ("  # Each vendor's traffic", "  # optional `upstream", "  # real key at a plain")


def render(example: str) -> str:
    start = example.index("vendors:\n")
    end = example.index("\n\n", start)
    lines = example[start:end].splitlines()
    out = ["vendors:", "  # `upstream:` sends a vendor's traffic to another server: here the fakes, in plain HTTP",
           "  # on loopback. Never give this file real keys."]
    for i, line in enumerate(lines[1:], 1):
        if line.startswith(DROPPED_COMMENTS):
            continue
        if m := re.match(r"^(  [\w-]+:\s+\{)(.*)\}$", line):  # a one-line vendor
            line = f"{m[1]}{m[2]}, upstream: {FAKES}}}"
        out.append(line)
        if line.startswith("    ") and (i + 1 == len(lines) or not lines[i + 1].startswith("    ")):
            out.append(f"    upstream: {FAKES}")  # the end of a block vendor
    return HEADER + "\n".join(out) + example[end:]


def main() -> int:
    example = (ROOT / "policies" / "example.yaml").read_text()
    (ROOT / "policies" / "demo.yaml").write_text(render(example))
    print("wrote policies/demo.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
