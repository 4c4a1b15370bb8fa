"""Execute notebooks headless (papermill) and write executed copies + offline HTML + a gallery.

    python tools/run_notebooks.py notebooks reports [--only 00_quickstart] [-p MODEL gemma-3-270m]
    python tools/run_notebooks.py notebooks reports -p SETTING paper -p STANDIN tiny   # the papers' settings on stand-ins

Each notebook runs top to bottom in a fresh kernel; parameters given with ``-p NAME VALUE`` are
injected after the cell tagged ``parameters`` (papermill) and recorded in the executed notebook's
metadata; a notebook whose parameters cell does not declare an injected parameter (the quickstart
has no paper setting) is skipped, not run with a parameter it would ignore. The first error stops that notebook and makes the command exit non-zero (the others
still run). There is no widget frontend here, so mechlib's explorers render their static figures
(``MECHLIB_STATIC_VIEWS``, set for the kernel only). The HTML pages are self-contained and work
offline: no CDN scripts (require.js, MathJax, the widget manager), and outputs keep their static
fallbacks instead of widget views. ``index.html`` is a gallery: per notebook its paper, one line of
finding, whether it reproduced, the run time and its key figure. Files are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import html
import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat

from mechlib.results import atomic_write_bytes
from mechlib.viz import REPORT_MIME

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def offline_html(nb) -> str:
    """HTML export with no external scripts: widget views give way to their static fallbacks."""
    from nbconvert import HTMLExporter

    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if WIDGET_VIEW in data and len(data) > 1:
                del data[WIDGET_VIEW]
    exporter = HTMLExporter()
    body, _ = exporter.from_notebook_node(nb)
    for url in (exporter.require_js_url, exporter.mathjax_url):
        body = re.sub(r'<script src="%s">\s*</script>' % re.escape(url), "", body)
    return body


@contextlib.contextmanager
def _kernel_env(**extra):
    """Environment variables for the kernel started inside the block, restored afterwards."""
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(nb_path: Path, out_dir: Path, timeout: int = 1800, parameters: dict | None = None) -> tuple[bool, float, str]:
    """Execute one notebook; write ``out_dir/<name>.ipynb`` and ``.html``. ``(ok, seconds, error)``."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    t0 = time.perf_counter()
    ok, err = True, ""
    with _kernel_env(MECHLIB_STATIC_VIEWS="1"):
        try:
            nb = pm.execute_notebook(str(nb_path), None, parameters=parameters or {}, kernel_name="python3",
                                     language="python", cwd=str(nb_path.parent), progress_bar=False,
                                     execution_timeout=timeout)
        except PapermillExecutionError as e:
            ok, err = False, str(e)[-3000:]
            nb = getattr(e, "nb", None)
        except Exception as e:  # noqa: BLE001 - a notebook papermill cannot even start is a failure, not a crash
            ok, err, nb = False, f"{type(e).__name__}: {e}", None
    secs = time.perf_counter() - t0
    if nb is None:  # papermill keeps the partly executed notebook on the exception only in newer versions
        nb = nbformat.read(nb_path, as_version=4)
    nb.metadata.setdefault("mechlib", {})["seconds"] = round(secs, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / nb_path.name, nbformat.writes(nb).encode())
    try:
        atomic_write_bytes(out_dir / (nb_path.stem + ".html"), offline_html(nb).encode())
    except Exception as e:  # an export problem must not hide the execution result
        print(f"  (HTML export of {nb_path.name} failed: {e})")
    return ok, secs, err


def report_of(nb) -> tuple[dict, str]:
    """The notebook's own summary (``viz.report_card`` output) and its key figure (a PNG, base64)."""
    summary, figure = {}, ""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if REPORT_MIME in data:
                summary = data[REPORT_MIME] if isinstance(data[REPORT_MIME], dict) else json.loads(data[REPORT_MIME])
            if not figure and "key-figure" in cell.get("metadata", {}).get("tags", []) and "image/png" in data:
                figure = data["image/png"]
    return summary, figure


_STATUS_COLOURS = {"reproduced": "#2e7d32", "partly": "#ef6c00", "not reproduced": "#c62828"}


def write_index(out_dir: Path, status: dict[str, tuple[bool, float]]) -> None:
    """``index.html``: a gallery of every report in ``out_dir`` (status and time for those run now)."""
    cards = []
    for page in sorted(p for p in out_dir.glob("*.html") if p.name != "index.html"):
        ok, secs = status.get(page.stem, (None, None))
        summary, figure = {}, ""
        nb_file = page.with_suffix(".ipynb")
        if nb_file.exists():
            nb = nbformat.read(nb_file, as_version=4)
            summary, figure = report_of(nb)
            secs = secs if secs is not None else nb.metadata.get("mechlib", {}).get("seconds")
        verdict = summary.get("status", "")
        run_note = "" if ok is None else ("" if ok else " — <b>FAILED</b>")
        colour = _STATUS_COLOURS.get(verdict, "#555")
        img = (f"<img alt='key figure' src='data:image/png;base64,{figure}'>" if figure else "")
        cards.append(
            "<div class='card'>"
            f"<h2><a href='{html.escape(page.name)}'>{html.escape(page.stem)}</a> "
            f"<small>(<a href='{html.escape(page.stem)}.ipynb'>ipynb</a>)</small></h2>"
            f"<p class='paper'>{html.escape(summary.get('paper', ''))}</p>"
            f"<p><b style='color:{colour}'>{html.escape(verdict)}</b> {html.escape(summary.get('finding', ''))}</p>"
            f"<p class='meta'>{html.escape(summary.get('model', ''))}"
            f"{f' · {secs:.0f} s' if secs else ''}{run_note}</p>{img}</div>")
    style = ("body{font-family:sans-serif;margin:2em;background:#fafafa}.grid{display:grid;grid-template-columns:"
             "repeat(auto-fill,minmax(360px,1fr));gap:1em}.card{background:#fff;border:1px solid #ddd;border-radius:6px;"
             "padding:1em}.card img{max-width:100%;border-top:1px solid #eee;margin-top:.5em}.paper{color:#333;"
             "font-style:italic}.meta{color:#777;font-size:90%}h2{font-size:110%;margin:0 0 .3em}")
    atomic_write_bytes(out_dir / "index.html", (
        f"<!doctype html><meta charset='utf-8'><title>mechlib notebooks</title><style>{style}</style>"
        "<h1>mechlib notebooks</h1><p>Each notebook reproduces one paper's analysis on the embedded models and "
        "ends with its paper | ours table. Verdicts are the notebooks' own.</p>"
        f"<div class='grid'>{''.join(cards)}</div>").encode())


def declared_parameters(nb_path: Path) -> set[str]:
    """The names the notebook's ``parameters`` cell assigns."""
    import ast

    nb = nbformat.read(nb_path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", []):
            tree = ast.parse(cell.source)
            return {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
    return set()


def _parse_params(pairs) -> dict:
    out = {}
    for name, value in pairs or []:
        try:
            out[name] = json.loads(value)
        except ValueError:
            out[name] = value
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                    help="inject a parameter (after the notebook's parameters cell), e.g. -p MODEL gemma-3-270m")
    args = ap.parse_args(argv)
    params = _parse_params(args.parameter)
    books = sorted(args.src.glob("*.ipynb"))
    if args.only:
        books = [b for b in books if any(b.stem.startswith(o) for o in args.only)]
    status, failed = {}, 0
    for nb in books:
        missing = sorted(set(params) - declared_parameters(nb))
        if missing:
            print(f"skipping {nb.name}: its parameters cell has no {', '.join(missing)}", flush=True)
            continue
        print(f"running {nb.name} {params or ''}...", flush=True)
        ok, secs, err = run(nb, args.out, parameters=params)
        print(f"  {'ok' if ok else 'FAILED'} in {secs:.0f} s", flush=True)
        if not ok:
            failed += 1
            print(err)
        status[nb.stem] = (ok, secs)
    args.out.mkdir(parents=True, exist_ok=True)
    write_index(args.out, status)
    print(f"wrote {args.out}/index.html; {len(status) - failed} ok, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
