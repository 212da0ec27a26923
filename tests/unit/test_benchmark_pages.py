"""Each benchmark page's results section is what its results.json renders to now: a page cannot show numbers
its results file does not hold, or miss a rerun."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.pages import BEGIN, END, PAGES_DIR, RENDERERS, rendered, stale_pages


def test_no_benchmark_page_is_stale() -> None:
    assert stale_pages() == [], "run python -m benchmarks.pages and commit the pages"


def test_a_changed_result_makes_its_page_stale_and_a_rewrite_shows_it(tmp_path: Path) -> None:
    copy = tmp_path / "benchmarks"
    shutil.copytree(PAGES_DIR, copy)
    results = copy / "load" / "results.json"
    results.write_text(results.read_text().replace('"devices": 32', '"devices": 33', 1))
    assert stale_pages(copy) == ["load"]
    readme = copy / "load" / "README.md"
    fresh = rendered("load", readme.read_text(), copy / "load")
    assert "| 33 |" in fresh.split(BEGIN)[1].split(END)[0]


def test_a_page_without_its_markers_says_what_to_add() -> None:
    with pytest.raises(ValueError, match="has no generated section"):
        rendered("load", "# Load benchmark\n", PAGES_DIR / "load")
    assert set(RENDERERS) == {p.name for p in PAGES_DIR.iterdir() if (p / "README.md").is_file()}
