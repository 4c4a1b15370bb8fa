"""Every notebook executes top to bottom on the embedded model (its own asserts are the checks)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from run_notebooks import run  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb, tmp_path):
    ok, secs, err = run(nb, tmp_path)
    print(f"{nb.name}: {secs:.0f} s")
    assert ok, err


def test_there_are_notebooks():
    assert any(p.stem.startswith("00_quickstart") for p in NOTEBOOKS)
