"""README's result tables are generated from results/ (harness.readme) and must match them."""

from __future__ import annotations

import pytest

from harness.readme import ROOT, main, render


def test_readme_matches_results():
    assert main(["--check"]) == 0, "README.md is stale: run `python -m harness.readme`"


def test_stale_table_is_detected(tmp_path):
    stale = tmp_path / "README.md"
    stale.write_text((ROOT / "README.md").read_text().replace("| dense | joint |", "| dense | joint (edited) |"))
    assert main(["--check", "--readme", str(stale)]) == 1


def test_missing_markers_are_named():
    with pytest.raises(ValueError, match="parity:begin"):
        render("no markers here", ROOT / "results")
