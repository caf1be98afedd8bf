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
def test_the_copy_holds_the_teams_corpus() -> None:
    """tests/fixtures/vendors holds a copy of ../shared/fixtures/vendors (where both exist, the same
    files, byte for byte), plus fixtures added since; SOURCES.md keeps the team's text as its head."""
    def tree(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    ours, theirs = tree(FIXTURES), tree(SHARED_CORPUS)
    assert sorted(set(theirs) - set(ours)) == []
    assert ours["SOURCES.md"].startswith(theirs["SOURCES.md"].rstrip(b"\n"))
    assert [name for name in theirs if name != "SOURCES.md" and ours[name] != theirs[name]] == []


def test_every_fixture_has_a_source() -> None:
    sources = (FIXTURES / "SOURCES.md").read_text()
    files = sorted(p.name for p in FIXTURES.rglob("*") if p.is_file() and p.name != "SOURCES.md")
    # a request beside its response may be cited as "(+ .request.json)"
    cited = [n for n in files if n in sources or n.replace(".request.", ".") in sources]
    assert sorted(set(files) - set(cited)) == []
