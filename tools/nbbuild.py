"""Helpers to write notebooks from Python source (cells separated explicitly), used to author
the notebooks in notebooks/. Run: python tools/nbbuild.py  (rewrites notebooks from tools/nb_src)."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]


def build(src: Path, dest: Path) -> None:
    """``src`` is a .py file whose cells start with ``# %% [markdown]`` or ``# %%`` lines."""
    cells, kind, buf = [], None, []

    def flush():
        if kind is None:
            return
        text = "\n".join(buf).strip("\n")
        if kind == "md":
            text = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in text.splitlines())
            cells.append(new_markdown_cell(text))
        else:
            cell = new_code_cell(text)
            if text.startswith("# parameters"):
                cell.metadata["tags"] = ["parameters"]
            cells.append(cell)

    for line in src.read_text().splitlines():
        if line.startswith("# %% [markdown]"):
            flush(); kind, buf = "md", []
        elif line.startswith("# %%"):
            flush(); kind, buf = "code", []
        else:
            buf.append(line)
    flush()
    for i, cell in enumerate(cells):  # stable ids: rebuilding an unchanged source changes nothing
        cell["id"] = f"c{i:02d}"
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, dest)


if __name__ == "__main__":
    srcs = sorted((ROOT / "tools" / "nb_src").glob("*.py"))
    only = sys.argv[1:]
    for s in srcs:
        if only and not any(s.stem.startswith(o) for o in only):
            continue
        build(s, ROOT / "notebooks" / (s.stem + ".ipynb"))
        print("wrote", s.stem + ".ipynb")
