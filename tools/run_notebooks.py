"""Execute notebooks headless and write executed copies + HTML exports + an index page.

    python tools/run_notebooks.py notebooks reports [--only 00_quickstart]

Each notebook runs top to bottom in a fresh kernel with the repo root on the path; the first
error stops that notebook and makes the command exit non-zero (the others still run).
"""

from __future__ import annotations

import argparse
import html
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def run(nb_path: Path, out_dir: Path, timeout: int = 1800) -> tuple[bool, float, str]:
    nb = nbformat.read(nb_path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(nb_path.parent)}})
    t0 = time.perf_counter()
    ok, err = True, ""
    try:
        client.execute()
    except CellExecutionError as e:
        ok, err = False, str(e)[-3000:]
    secs = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / nb_path.name)
    try:
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nb)
        (out_dir / (nb_path.stem + ".html")).write_text(body, encoding="utf-8")
    except Exception as e:  # an export problem must not hide the execution result
        print(f"  (HTML export of {nb_path.name} failed: {e})")
    return ok, secs, err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    books = sorted(args.src.glob("*.ipynb"))
    if args.only:
        books = [b for b in books if any(b.stem.startswith(o) for o in args.only)]
    rows, failed = [], 0
    for nb in books:
        print(f"running {nb.name} ...", flush=True)
        ok, secs, err = run(nb, args.out)
        print(f"  {'ok' if ok else 'FAILED'} in {secs:.0f} s", flush=True)
        if not ok:
            failed += 1
            print(err)
        rows.append((nb.stem, ok, secs))
    items = "\n".join(
        f"<li><a href='{html.escape(s)}.html'>{html.escape(s)}</a> — "
        f"{'ok' if ok else '<b>FAILED</b>'}, {secs:.0f} s</li>" for s, ok, secs in rows)
    (args.out / "index.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>mechlib notebooks</title>"
        f"<h1>mechlib notebooks (executed)</h1><ul>{items}</ul>", encoding="utf-8")
    print(f"wrote {args.out}/index.html; {len(rows) - failed} ok, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
