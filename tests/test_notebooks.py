"""Every notebook executes top to bottom on the embedded model (its own asserts are the checks),
and the HTML reports work offline in a real browser (headless Chromium)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

import mechlib
from conftest import chromium

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from run_notebooks import WIDGET_VIEW, declared_parameters, offline_html, run, write_index  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
QUICKSTART = next(p for p in NOTEBOOKS if p.stem.startswith("00_quickstart"))
PAPERS = [p for p in NOTEBOOKS if p != QUICKSTART]  # one per paper: each has the paper's own setting
DETERMINISM = next(p for p in NOTEBOOKS if p.stem.startswith("06_"))  # the fastest full analysis


@pytest.fixture(scope="session")
def reports(tmp_path_factory):
    """Where the notebooks' runs go: one folder for all of `make test`'s xdist workers (the base
    temporary folder's parent is theirs in common), so a notebook runs once (``run_once``)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "reports"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("reports")


def run_once(nb: Path, reports: Path) -> tuple:
    """Execute ``nb`` into ``reports`` once per test session, whichever worker and test comes first
    (the notebook's own test or one that reads its report); the others wait for it and share the
    outcome ``(ok, seconds, error)``."""
    from filelock import FileLock

    done = reports / (nb.stem + ".outcome.json")
    with FileLock(str(reports / (nb.stem + ".lock"))):
        if not done.exists():
            done.write_text(json.dumps(list(run(nb, reports))))
        return tuple(json.loads(done.read_text()))


@pytest.mark.notebook
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(nb, reports):
    ok, secs, err = run_once(nb, reports)
    print(f"{nb.name}: {secs:.0f} s")
    assert ok, err


def test_there_are_notebooks():
    assert QUICKSTART.exists() and len(NOTEBOOKS) >= 9


def test_every_paper_notebook_has_the_papers_setting():
    """SETTING="paper" switches to the paper's model, data, sizes and decoding; STANDIN="tiny" runs
    that branch on tiny random stand-ins and the test fixtures (below)."""
    for p in PAPERS:
        assert {"SETTING", "STANDIN"} <= declared_parameters(p), f"{p.name}: declare SETTING and STANDIN"


def test_papermill_reads_every_parameter():
    """papermill (what `-p NAME VALUE` and Colab users' tools go through) drops a parameter line it cannot
    parse — e.g. a '=' inside its comment — with only a log warning; every assigned name must reach it."""
    from papermill.translators import PythonTranslator

    for p in NOTEBOOKS:
        cell = next(c for c in nbformat.read(p, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        seen = {q.name for q in PythonTranslator.inspect(cell)}
        assert seen == declared_parameters(p), f"{p.name}: papermill cannot read {declared_parameters(p) - seen}"


@pytest.mark.notebook
@pytest.mark.parametrize("nb", PAPERS, ids=[p.stem for p in PAPERS])
def test_paper_setting_runs_on_standins(nb, tmp_path):
    """Every line of the paper's setting runs (`make notebooks SETTING=paper STANDIN=tiny`): the paper's
    model replaced by a tiny random one of its architecture, its data by the fixtures. The numbers
    mean nothing and the findings are not asserted there."""
    ok, secs, err = run(nb, tmp_path, parameters={"SETTING": "paper", "STANDIN": "tiny"})
    print(f"{nb.name} (paper setting, stand-ins): {secs:.0f} s")
    assert ok, err


def test_notebooks_have_colab_and_parameters_cells():
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "MECHLIB_REPO_URL" in code[0].source, f"{p.name}: first code cell must install mechlib on Colab"
        assert "parameters" in code[1].metadata.get("tags", []), f"{p.name}: second code cell must be the parameters"
        assert all(c.get("outputs", []) == [] for c in code), f"{p.name}: commit notebooks without outputs"
        assert all(c.get("execution_count") is None for c in code), f"{p.name}: commit notebooks unexecuted"
        # papermill needs the kernel's language to inject parameters (make notebooks MODEL=...)
        assert nb.metadata.get("kernelspec", {}).get("language") == "python", f"{p.name}: no kernelspec"


def test_every_notebook_is_paired_with_its_jupytext_source():
    """notebooks/*.py (py:percent) and notebooks/*.ipynb hold the same cells: a pair that drifts
    (one edited without `make sync`) fails here."""
    import jupytext

    assert {p.stem for p in NOTEBOOKS} == {p.stem for p in (ROOT / "notebooks").glob("*.py")}
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        src = jupytext.read(p.with_suffix(".py"))
        assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in src.cells], \
            f"{p.name} and {p.stem}.py differ: run `make sync`"
        assert [c.metadata.get("tags", []) for c in nb.cells] == [c.metadata.get("tags", []) for c in src.cells]
        assert len({c["id"] for c in nb.cells}) == len(nb.cells), f"{p.name}: duplicate cell ids"


def test_notebooks_end_with_their_report_card_and_findings():
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "report_card(" in code, f"{p.name}: end with viz.report_card(...) (the gallery reads it)"
        assert "assert " in code, f"{p.name}: assert on the notebook's own findings"
        assert any("key-figure" in c.metadata.get("tags", []) for c in nb.cells), f"{p.name}: tag its key figure"


def test_offline_html_drops_cdn_scripts_and_widget_views(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x")])
    nb.cells[0].outputs = [nbformat.v4.new_output("display_data", data={
        WIDGET_VIEW: {"model_id": "abc", "version_major": 2, "version_minor": 0},
        "text/html": "<p id='fallback'>static</p>", "text/plain": "w"})]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    page = offline_html(nb)
    assert "id='fallback'" in page or 'id="fallback"' in page
    assert not re.search(r"<script[^>]+src=[\"']https?://", page), "external script left in the report"
    assert "unpkg.com" not in page
    (tmp_path / "a.html").write_text(page)
    card = mechlib.viz.report_card(paper="P", finding="F <b>", status="partly", model="M")
    nb.cells[0].outputs.append(nbformat.v4.new_output("display_data", data=card._repr_mimebundle_()))
    nb.cells[0].metadata["tags"] = ["key-figure"]
    nb.cells[0].outputs.append(nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="}))
    nbformat.write(nb, tmp_path / "a.ipynb")
    write_index(tmp_path, {"a": (True, 3.0)})
    index = (tmp_path / "index.html").read_text()
    assert "a.html" in index and "3 s" in index and "partly" in index and "F &lt;b&gt;" in index
    assert "data:image/png;base64,iVBORw0KGgo=" in index


_PROBE = """<script>window.__errs=[];
window.addEventListener('error', function (e) { var t = e.target || {};
  window.__errs.push(e.message ? 'js: ' + e.message : 'load: ' + (t.src || t.href || t.tagName)); }, true);
window.addEventListener('unhandledrejection', function (e) { window.__errs.push('rejection: ' + e.reason); });
</script>"""
_REPORT = """<script>setTimeout(function () {
  document.documentElement.setAttribute('data-js-errors', JSON.stringify(window.__errs)); }, 1500);</script>"""


@pytest.mark.notebook
def test_quickstart_report_renders_offline_in_chromium(reports, tmp_path):
    ok, _, err = run_once(QUICKSTART, reports)  # already run when the notebook's own test came first
    assert ok, err
    page = reports / (QUICKSTART.stem + ".html")
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]+src=[\"']https?://", html), "the report loads a script from the network"
    head = html.index("<head>") + len("<head>")
    body = html.rindex("</body>")
    probe = tmp_path / "probe.html"
    probe.write_text(html[:head] + _PROBE + html[head:body] + _REPORT + html[body:], encoding="utf-8")
    out = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--virtual-time-budget=8000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=180)
    dom = out.stdout
    assert out.returncode == 0 and dom, out.stderr[-2000:]
    m = re.search(r'data-js-errors="([^"]*)"', dom)
    assert m, "the page's scripts did not run to the end"
    errors = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert errors == [], errors
    # circuitsvis mounted its React view inside its container (the raw export has it empty)
    views = re.findall(r'<div id="circuits-vis-[^"]+"[^>]*>(.*?)</div>', dom, re.S)
    assert views and all(v.strip() for v in views), "circuitsvis container is empty: the view did not render"
    # explorers render as static figures in the report
    assert "mechlib-explorer" in dom and "data:image/png;base64" in dom


def _text_outputs(path: Path) -> list[str]:
    """Each code cell's printed text (stdout joined: how it is chunked depends on timing) and its
    displayed text; progress bars on stderr are left out."""
    nb = nbformat.read(path, as_version=4)
    out = []
    for cell in nb.cells:
        outs = cell.get("outputs", [])
        out.append("".join(o["text"] for o in outs if o.get("output_type") == "stream" and o.get("name") == "stdout"))
        out += [o["data"].get("text/plain", "") for o in outs if "data" in o]
    return out


@pytest.mark.notebook
def test_notebook_is_deterministic(reports, tmp_path):
    """Seeded: a second run of a notebook prints the same numbers (06: the fastest full analysis)."""
    nb = DETERMINISM
    ok, _, err = run_once(nb, reports)  # the notebook's own run when it came first
    assert ok, err
    first = reports / nb.name
    ok, _, err = run(nb, tmp_path)
    assert ok, err
    a, b = _text_outputs(first), _text_outputs(tmp_path / nb.name)
    assert sum(map(len, a)) > 500 and a == b
