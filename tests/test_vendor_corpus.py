"""Every file of the shared fixture corpus is exercised by some vendor test."""

from __future__ import annotations

from pathlib import Path

import pytest
from vendor_fixtures import FIXTURES, needs_fixtures

TESTS = Path(__file__).parent


@needs_fixtures
def test_every_fixture_is_used_by_a_vendor_test() -> None:
    sources = "\n".join(p.read_text() for p in TESTS.glob("test_vendor_*.py"))
    files = sorted(p for p in FIXTURES.rglob("*") if p.is_file() and p.name != "SOURCES.md")
    assert len(files) >= 90  # the corpus as described in SOURCES.md
    unused = [str(p.relative_to(FIXTURES)) for p in files if f'"{p.name}"' not in sources]
    assert not unused, f"fixtures no test reads: {unused}"


SHARED_CORPUS = TESTS.parent.parent / "shared" / "fixtures" / "vendors"


@pytest.mark.skipif(not SHARED_CORPUS.is_dir(), reason="the team's ../shared corpus is not beside this clone")
def test_the_copy_matches_the_teams_corpus() -> None:
    """tests/fixtures/vendors is a copy of ../shared/fixtures/vendors: where both exist, same files."""
    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    ours, theirs = tree(FIXTURES), tree(SHARED_CORPUS)
    assert sorted(ours) == sorted(theirs)
    assert [name for name in ours if ours[name] != theirs[name]] == []
