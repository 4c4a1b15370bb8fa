"""Execute notebooks headless and write executed copies + offline HTML exports + an index page.

    python tools/run_notebooks.py notebooks reports [--only 00_quickstart]

Each notebook runs top to bottom in a fresh kernel; the first error stops that notebook and makes
the command exit non-zero (the others still run). There is no widget frontend here, so mechlib's
explorers render their static figures (``MECHLIB_STATIC_VIEWS``). The HTML pages are
self-contained and work offline: no CDN scripts (require.js, MathJax, the widget manager), and
outputs keep their static fallbacks instead of widget views. Files are written atomically.
"""

from __future__ import annotations

import argparse
import copy
import html
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mechlib.results import atomic_write_bytes  # noqa: E402

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


def run(nb_path: Path, out_dir: Path, timeout: int = 1800) -> tuple[bool, float, str]:
    nb = nbformat.read(nb_path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(nb_path.parent)}})
    t0 = time.perf_counter()
    ok, err = True, ""
    try:
        client.execute(env={**os.environ, "MECHLIB_STATIC_VIEWS": "1"})  # the kernel's environment only
    except CellExecutionError as e:
        ok, err = False, str(e)[-3000:]
    secs = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / nb_path.name, nbformat.writes(nb).encode())
    try:
        atomic_write_bytes(out_dir / (nb_path.stem + ".html"), offline_html(nb).encode())
    except Exception as e:  # an export problem must not hide the execution result
        print(f"  (HTML export of {nb_path.name} failed: {e})")
    return ok, secs, err


def write_index(out_dir: Path, status: dict[str, tuple[bool, float]]) -> None:
    """index.html listing every report in ``out_dir`` (status and time for those run now)."""
    items = []
    for page in sorted(p for p in out_dir.glob("*.html") if p.name != "index.html"):
        ok, secs = status.get(page.stem, (None, None))
        note = "" if ok is None else (f" — ok, {secs:.0f} s" if ok else f" — <b>FAILED</b> after {secs:.0f} s")
        items.append(f"<li><a href='{html.escape(page.name)}'>{html.escape(page.stem)}</a>"
                     f" (<a href='{html.escape(page.stem)}.ipynb'>ipynb</a>){note}</li>")
    atomic_write_bytes(out_dir / "index.html", (
        "<!doctype html><meta charset='utf-8'><title>mechlib notebooks</title>"
        "<h1>mechlib notebooks (executed on the embedded model)</h1>"
        f"<ul>{''.join(items)}</ul>").encode())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    books = sorted(args.src.glob("*.ipynb"))
    if args.only:
        books = [b for b in books if any(b.stem.startswith(o) for o in args.only)]
    status, failed = {}, 0
    for nb in books:
        print(f"running {nb.name} ...", flush=True)
        ok, secs, err = run(nb, args.out)
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
