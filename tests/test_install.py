"""What users install is what is tested.

* The suite itself imports mechlib from the wheel built from this tree (``make test`` installs it
  in ``build/site`` and runs pytest with the checkout off ``sys.path``).
* The wheel and the sdist ship every file of ``mechlib/`` and ``data/``, and, installed into a
  fresh target outside the source tree, import every module, load an embedded model and run a verb.
* A notebook's Colab cell works in a bare kernel: a fresh virtual environment with only torch,
  ipykernel and nbclient installs mechlib from a git URL (a local copy of this tree, through
  ``git+file://localhost/...``) and the embedded model, then runs the opening cells of the
  factual-recall notebook through the model load and its first verb.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import nbformat
import pytest

import mechlib

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("mechlib", "data")  # data/ ships as the package mechlib.data


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _tree_files() -> list[str]:
    """The files of this checkout a user would get from git: tracked, plus new ones not ignored."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = _run(["git", "-C", ROOT, "ls-files", "-co", "--exclude-standard"]).stdout.split("\n")
        return sorted(f for f in out if f and (ROOT / f).is_file())
    skip = {"__pycache__", ".venv", "build", "reports", ".git", ".pytest_cache"}
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                  if p.is_file() and not skip & set(p.relative_to(ROOT).parts) and not p.name.endswith(".pyc"))


def _shipped(files: list[str]) -> set[str]:
    """Where each file of mechlib/ and data/ lands in an installed package."""
    out = set()
    for f in files:
        top, _, rest = f.partition("/")
        if top == "mechlib":
            out.add(f)
        elif top == "data":
            out.add(f"mechlib/data/{rest}")
    return out


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A clean copy of this tree (what `git clone` gives, uncommitted work included), itself a git
    repository with one commit so pip can install it from a git URL."""
    dest = tmp_path_factory.mktemp("checkout") / "mechlib"
    for f in _tree_files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    git = ["git", "-C", dest, "-c", "user.email=ci@mechlib", "-c", "user.name=ci"]
    _run([*git, "init", "-q"])
    _run([*git, "add", "-A"])
    _run([*git, "commit", "-qm", "snapshot of the tree under test"])
    return dest


@pytest.fixture(scope="module")
def dists(checkout, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, checkout])
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", out, checkout])
    return {"wheel": next(out.glob("mechlib-*.whl")), "sdist": next(out.glob("mechlib-*.tar.gz"))}


def test_the_suite_imports_the_installed_package():
    """`make test` runs the suite against the wheel in build/site, never the checkout."""
    site = os.environ.get("MECHLIB_INSTALLED")
    if not site:
        pytest.skip("run through `make test`, which installs the wheel and sets MECHLIB_INSTALLED")
    here = Path(mechlib.__file__).resolve()
    assert here.is_relative_to(Path(site).resolve()), f"mechlib was imported from {here}, not the wheel in {site}"
    assert not here.is_relative_to(ROOT / "mechlib"), "the suite imported the checkout"
    assert (here.parent / "data" / "ioi.json").is_file()


def test_wheel_and_sdist_ship_every_file(dists):
    want = _shipped(_tree_files())
    assert "mechlib/data/ioi.json" in want and "mechlib/interventions/__init__.py" in want
    with zipfile.ZipFile(dists["wheel"]) as z:
        have = {n for n in z.namelist() if not n.startswith("mechlib-")}
    assert sorted(want - have) == [], "the wheel lacks these files"
    assert sorted(n for n in have - want if "__pycache__" not in n) == [], "the wheel has files the tree lacks"
    with tarfile.open(dists["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    tree = {f for f in _tree_files() if f.split("/")[0] in SHIPPED}
    assert sorted(tree - names) == [], "the sdist lacks these files"
    assert {"pyproject.toml", "setup.py", "README.md"} <= names


_SMOKE = textwrap.dedent("""
    import importlib, json, os, pkgutil, sys
    from pathlib import Path
    import mechlib
    site = Path(sys.argv[1]).resolve()
    assert Path(mechlib.__file__).resolve().is_relative_to(site), mechlib.__file__
    mods = [m.name for m in pkgutil.walk_packages(mechlib.__path__, "mechlib.")]
    for name in mods:
        if name != "mechlib.__main__":
            importlib.import_module(name)
    out = {"modules": mods}
    if sys.argv[2] == "full":
        model = mechlib.load_model(device="cpu")
        ioi = mechlib.tasks.ioi(model, n=2, seed=0)
        r = mechlib.activation_patching(model, ioi, mechlib.metrics.logit_diff(ioi), site="head_out")
        out["shape"] = list(r.values.shape)
        out["clean"] = float(mechlib.metrics.evaluate(model, ioi, mechlib.metrics.logit_diff(ioi)).mean())
    print(json.dumps(out))
""")


@pytest.mark.embedded
@pytest.mark.parametrize("kind", ["wheel", "sdist"])
def test_installed_package_works_outside_the_tree(kind, dists, tmp_path):
    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", site,
          dists[kind]])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("MECHLIB_INSTALLED", None)
    # -P: the working directory is not put on sys.path, so only the installed copy can be imported
    out = _run([sys.executable, "-P", "-c", _SMOKE, site, "full" if kind == "wheel" else "import"],
               cwd=elsewhere, env=env, timeout=600)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    expected = {f"mechlib.{p.relative_to(ROOT / 'mechlib').with_suffix('').as_posix().replace('/', '.')}"
                for p in (ROOT / "mechlib").rglob("*.py") if p.name != "__init__.py"}
    expected |= {f"mechlib.{p.parent.relative_to(ROOT / 'mechlib').as_posix().replace('/', '.')}"
                 for p in (ROOT / "mechlib").rglob("__init__.py") if p.parent != ROOT / "mechlib"}
    assert expected - {"mechlib.data"} <= set(res["modules"]), sorted(expected - set(res["modules"]))
    if kind == "wheel":
        assert res["shape"] == [30, 9] and res["clean"] > 1.0, res
        # the command-line tool works from the installed package too
        doc = _run([sys.executable, "-P", "-m", "mechlib", "doctor", "--json"], cwd=elsewhere, env=env)
        report = json.loads(doc.stdout)
        assert any(c["what"] == "mechlib" and str(site) in c["detail"] for c in report["checks"]), report
        models = json.loads(_run([sys.executable, "-P", "-m", "mechlib", "models", "list", "--json"],
                                 cwd=elsewhere, env=env).stdout)
        assert {m["name"] for m in models} == {"smollm2-135m", "gemma-3-270m"}


def _link_preinstalled(dist_name: str, target: Path, skip: set[str]) -> None:
    """Make ``dist_name`` and what it requires importable from ``target`` by linking their files from
    this environment (how a Colab image has torch preinstalled), without installing anything else."""
    todo, seen = [dist_name], set()
    while todo:
        name = todo.pop()
        key = name.lower().replace("_", "-")
        if key in seen or key in skip:
            continue
        seen.add(key)
        dist = importlib.metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops - {"bin", "__pycache__"}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (target / top).exists():
                (target / top).symlink_to(src)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(req.split(";")[0].split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip())


@pytest.mark.notebook
def test_colab_cell_in_a_bare_kernel(checkout, tmp_path):
    """A fresh virtual environment with only torch, ipykernel and nbclient: a notebook's first cell
    installs mechlib from a git URL and the embedded model, and its opening cells run through the
    model load and the first verb (notebook 06: it needs only SmolLM2)."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    cache = tmp_path / "mechlib-cache"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MECHLIB_INSTALLED", "VIRTUAL_ENV")}
    env.update(MECHLIB_REPO_URL=f"file://localhost{checkout}", MECHLIB_CACHE=str(cache), MECHLIB_STATIC_VIEWS="1",
               JUPYTER_PATH=str(venv / "share" / "jupyter"), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}",
               PIP_NO_COMPILE="1")  # no .pyc for the thousands of files installed: a CPU-minute, and Python compiles what it imports

    def in_venv(*args, **kw):  # run in the fresh environment, away from the checkout
        return _run([py, *args], cwd=tmp_path, env=env, **kw)

    purelib = Path(in_venv("-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    pre = tmp_path / "preinstalled"
    pre.mkdir()
    have = {d.metadata["Name"].lower() for d in importlib.metadata.distributions(path=[str(purelib)])}
    _link_preinstalled("torch", pre, skip=have)
    (purelib / "_preinstalled.pth").write_text(str(pre) + "\n")
    in_venv("-m", "pip", "install", "-q", "--disable-pip-version-check", "ipykernel", "nbclient", timeout=600)
    in_venv("-m", "ipykernel", "install", "--sys-prefix", "--name", "python3")
    before = in_venv("-c", "import importlib.util as u; print(u.find_spec('mechlib'), u.find_spec('torch') is not None)")
    assert before.stdout.split() == ["None", "True"], before.stdout

    nb = nbformat.read(ROOT / "notebooks" / "06_factual_recall.ipynb", as_version=4)
    cells, upto = [], None
    for i, c in enumerate(nb.cells):
        cells.append(c)
        if "first-verb" in c.metadata.get("tags", []):
            upto = i
            break
    assert upto is not None, "tag the notebook's first-verb cell"
    nb.cells = cells
    nbformat.write(nb, tmp_path / "opening.ipynb")
    driver = textwrap.dedent("""
        import sys, nbformat
        from nbclient import NotebookClient
        nb = nbformat.read(sys.argv[1], as_version=4)
        NotebookClient(nb, kernel_name="python3", timeout=1200, resources={"metadata": {"path": sys.argv[2]}}).execute()
        nbformat.write(nb, sys.argv[1])
    """)
    in_venv("-c", driver, tmp_path / "opening.ipynb", tmp_path, timeout=1500)
    done = nbformat.read(tmp_path / "opening.ipynb", as_version=4)
    errors = [o for c in done.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == []
    text = "".join(o.get("text", "") for c in done.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "sum of terms" in text and "top-1 accuracy" in text, text[-2000:]
    where = in_venv("-c", "import mechlib; print(mechlib.__file__)").stdout.strip()
    assert Path(where).is_relative_to(venv), f"mechlib should be installed in the fresh venv, found {where}"
    assert any(cache.glob("smollm2-135m-*/mechlib-manifest.json")), "the Colab cell did not build the model cache"
