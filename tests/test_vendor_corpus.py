"""Every file of the shared fixture corpus is exercised by some vendor test."""

from __future__ import annotations

from pathlib import Path

from vendor_fixtures import FIXTURES, needs_fixtures

TESTS = Path(__file__).parent


@needs_fixtures
def test_every_fixture_is_used_by_a_vendor_test() -> None:
    sources = "\n".join(p.read_text() for p in TESTS.glob("test_vendor_*.py"))
    files = sorted(p for p in FIXTURES.rglob("*") if p.is_file() and p.name != "SOURCES.md")
    assert len(files) >= 90  # the corpus as described in SOURCES.md
    unused = [str(p.relative_to(FIXTURES)) for p in files if f'"{p.name}"' not in sources]
    assert not unused, f"fixtures no test reads: {unused}"
