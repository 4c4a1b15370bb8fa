"""JupyterLab in a real browser: the live experience, not the HTML export.

tests/test_notebooks.py checks the static reports in Chromium; this test checks what a user sees in
JupyterLab. It starts the venv's JupyterLab (127.0.0.1, a free port, a random token, a temporary
root, and its own config/runtime/data/IPython dirs so the user's are neither read nor written),
opens a small notebook in headless Chromium driven by playwright, runs it through the Run menu,
and checks that

- the kernel is the venv's Python and imports the same mechlib as this test (the installed wheel
  under ``make test``);
- ``attention_explorer`` renders as ipywidgets (not its static fallback) and choosing another head
  in its dropdown redraws the figure (and choosing the first head again gives the first figure back);
- a circuitsvis ``attention_view`` renders (React mounts its canvases) with no request leaving
  127.0.0.1: mechlib inlines the bundle, so it works offline;
- ``circuit_diagram`` is an inline ``<svg>``;
- the page logs no JavaScript error (uncaught exceptions and console errors).

Screenshots go to ``reports/jupyterlab-*.png``.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import nbformat
import pytest

import mechlib
from conftest import chromium
from mechlib.results import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
MARK = "MECHLIB-KERNEL:"  # prefix of the first cell's printed line (not in any cell's source as a whole)

CELLS = [
    # which Python and which mechlib the kernel runs (compared with this process's)
    "import json, sys\nimport mechlib\n"
    "print('MECHLIB-' + 'KERNEL:' + json.dumps({'prefix': sys.prefix, 'mechlib': mechlib.__file__}))",
    "model = mechlib.tiny_model('llama', seed=0)\n"
    "prompts = ['When Mary and John went to the store, John gave a drink to', 'The capital of France is']",
    "explorer = mechlib.viz.attention_explorer(model, prompts)\nexplorer",
    "mechlib.viz.attention_view(model, prompts[0], 1)",
    "heads = ((0, 1), (1, 2))\n"
    "circuit = mechlib.Circuit(\n"
    "    heads=heads, classes={(0, 1): 's-inhibition', (1, 2): 'name mover'},\n"
    "    scores={h: 1.0 for h in heads}, zscores={h: 5.0 for h in heads},\n"
    "    edges=(('L0H1', 'L1H2', 0.4), ('L1H2', 'logits', 0.8)), task='demo', model='tiny llama',\n"
    "    n_layers=2, n_heads=4, metadata=dict(stages=['name mover', 's-inhibition']))\n"
    "mechlib.viz.circuit_diagram(circuit)",
]
EXPLORER, VIEW, DIAGRAM = 2, 3, 4  # cell indices


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


@contextlib.contextmanager
def _jupyterlab(root: Path, home: Path, *, start_timeout: float = 90.0):
    """A JupyterLab server on 127.0.0.1 serving ``root``; yields ``(base_url, token, log_path)``.

    Its config, runtime, data and IPython dirs live under ``home``: the user's settings,
    workspaces, notebook signatures and kernel connection files are not touched. Kernelspecs are
    still found in the venv (``sys.prefix/share/jupyter/kernels``: ``make setup`` installs
    ``python3`` there with the venv's interpreter). Always stopped: SIGTERM to its process group
    (JupyterLab shuts its kernels down), SIGKILL to whatever is left, kernels included (they run
    in their own sessions)."""
    import psutil

    port, token = _free_port(), secrets.token_hex(24)
    dirs = {k: home / k.lower() for k in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    # no "get Jupyter news?" prompt over the notebook (and no request for the feed)
    notif = dirs["JUPYTER_CONFIG_DIR"] / "lab/user-settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings"
    notif.parent.mkdir(parents=True)
    notif.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {k: v for k, v in os.environ.items()
           # the live widgets are under test (MECHLIB_STATIC_VIEWS would select the static fallback);
           # the kernel picks its own inline matplotlib backend; extra Jupyter paths could put
           # another python3 kernelspec ahead of the venv's
           if k not in ("MECHLIB_STATIC_VIEWS", "MPLBACKEND", "JUPYTER_PATH", "JUPYTER_CONFIG_PATH")}
    env.update({k: str(v) for k, v in dirs.items()})
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           # offline and quiet: no announcements, update checks or PyPI extension manager
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root; Jupyter refuses root without it
    log = home / "jupyterlab.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    family: list = []
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited with code {proc.returncode} before answering:\n{_tail(log)}")
            try:
                with _NO_PROXY.open(f"{base}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer /api/status within {start_timeout:.0f} s:\n{_tail(log)}")
            time.sleep(0.25)
        yield base, token, log
    finally:
        with contextlib.suppress(psutil.Error):
            family = psutil.Process(proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        _, alive = psutil.wait_procs(family, timeout=10)
        for p in alive:  # a kernel JupyterLab did not stop
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)


def _save_screenshot(png: bytes, name: str) -> Path:
    REPORTS.mkdir(exist_ok=True)
    path = REPORTS / name
    atomic_write_bytes(path, png)
    return path


def _write_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in CELLS])
    # a kernelspec, so JupyterLab starts python3 without asking
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


# 'done' when every code cell shows an execution count; 'stopped' when Run All stopped at an error
# (some cells numbered, none pending, the rest not run)
_RUN_DONE = """(n) => {
  const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')];
  const prompts = cells.map(c => ((c.querySelector('.jp-InputPrompt') || {}).textContent || '').trim());
  const ran = prompts.filter(p => /\\[\\d+\\]/.test(p)).length;
  if (cells.length === n && ran === n) return 'done';
  return ran > 0 && !prompts.some(p => p.includes('*')) ? 'stopped' : false;
}"""

# the notebook's kernel is attached and idle (before it attaches, the indicator says "idle" while
# the toolbar says "No Kernel", and Run All would ask which kernel to start)
_KERNEL_READY = """(name) => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const kernel = panel && panel.querySelector('[data-jp-item-name="kernelName"]');
  const status = document.querySelector('.jp-Notebook-ExecutionIndicator');
  return !!kernel && kernel.textContent.trim() === name && !!status && status.dataset.status === 'idle';
}"""

# the explorer's figure: the <img> inside its ipywidgets Output ('' while it is being redrawn)
_IMG_SRC = "(el) => { const i = el.querySelector('.widget-output img'); return i ? i.getAttribute('src') || '' : ''; }"


def _python3_kernelspec(base: str, token: str) -> dict:
    """The server's ``python3`` kernelspec, checked to start this venv's interpreter."""
    with _NO_PROXY.open(f"{base}/api/kernelspecs?token={token}", timeout=10) as r:
        specs = json.load(r)["kernelspecs"]
    assert "python3" in specs, f"JupyterLab has no python3 kernel (make setup installs it): {list(specs)}"
    spec = specs["python3"]["spec"]
    exe = Path(shutil.which(spec["argv"][0]) or spec["argv"][0]).resolve()
    assert exe.is_relative_to(Path(sys.prefix).resolve()) or exe == Path(sys.executable).resolve(), \
        f"the python3 kernelspec starts {spec['argv'][0]}, not this venv's Python ({sys.executable})"
    return spec


@pytest.mark.notebook
@pytest.mark.timeout(300)
def test_jupyterlab_runs_widgets_circuitsvis_and_diagrams_in_chromium(tmp_path):
    exe = chromium()
    try:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: it is in the dev extras (pip install -e '.[dev]')")
    root = tmp_path / "root"
    root.mkdir()
    _write_notebook(root / "live.ipynb")
    (REPORTS / "jupyterlab-failed.png").unlink(missing_ok=True)
    t0 = time.monotonic()
    times = {}
    with _jupyterlab(root, tmp_path / "jupyter") as (base, token, log), sync_playwright() as p:
        times["server up"] = time.monotonic() - t0
        spec = _python3_kernelspec(base, token)
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            requests, errors = [], []
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            # every console error counts: JupyterLab 4.6 logs none on this page, so nothing is filtered
            page.on("console", lambda m: errors.append(f"console.error: {m.text} ({m.location.get('url', '')})")
                    if m.type == "error" else None)

            def fail(what: str):
                """Fail with what went wrong and what the page shows (screenshot, errors, server log)."""
                shot = _save_screenshot(page.screenshot(), "jupyterlab-failed.png")
                outputs = "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())
                pytest.fail(f"{what}\nscreenshot: {shot}\nJavaScript errors: {errors}\n"
                            f"outputs:\n{outputs[-3000:]}\n--- JupyterLab log ---\n{_tail(log)}")

            def wait(what: str, js: str, arg=None, timeout: float = 60_000):
                try:
                    return page.wait_for_function(js, arg=arg, timeout=timeout).json_value()
                except PlaywrightTimeout:
                    pass
                fail(f"{what} (waited {timeout / 1000:.0f} s)")

            page.goto(f"{base}/lab/tree/live.ipynb?token={token}")
            cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell")
            wait("the notebook did not open", f"() => document.querySelectorAll("
                 f"'.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell').length === {len(CELLS)}")
            wait(f"the {spec['display_name']!r} kernel did not start", _KERNEL_READY, spec["display_name"], 90_000)
            times["kernel ready"] = time.monotonic() - t0
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            state = wait("Run All Cells did not finish", _RUN_DONE, len(CELLS), 120_000)
            if state != "done":
                fail(f"Run All Cells stopped at an error (prompts {cells.locator('.jp-InputPrompt').all_inner_texts()})")
            times["cells ran"] = time.monotonic() - t0

            # the kernel is the venv's Python with the same mechlib as this test
            out0 = cells.nth(0).locator(".jp-OutputArea-output").inner_text()
            line = next((ln for ln in out0.splitlines() if ln.startswith(MARK)), None)
            assert line, f"the first cell printed no {MARK} line: {out0!r}"
            kernel = json.loads(line[len(MARK):])
            assert Path(kernel["prefix"]).resolve() == Path(sys.prefix).resolve(), \
                f"the python3 kernel runs {kernel['prefix']}, not this venv ({sys.prefix})"
            assert Path(kernel["mechlib"]).resolve() == Path(mechlib.__file__).resolve(), \
                f"the kernel imports mechlib from {kernel['mechlib']}, this test from {mechlib.__file__}"

            # --- the explorer is an ipywidgets panel: three dropdowns above an Output with the figure
            explorer = cells.nth(EXPLORER).locator(".jp-Cell-outputArea")
            explorer.scroll_into_view_if_needed()
            if explorer.locator("figure.mechlib-explorer").count():
                fail("the explorer shows its static fallback, not the ipywidgets panel")
            el = explorer.element_handle()
            wait("the explorer rendered no ipywidgets panel", "(el) => !!el.querySelector('.jupyter-widgets.widget-vbox')", el)
            labels = [t.strip() for t in explorer.locator(".widget-dropdown label").all_inner_texts()]
            assert labels == ["prompt", "layer", "head"], f"explorer dropdowns: {labels}"
            first = wait("the explorer's widget shows no figure", _IMG_SRC, el)
            assert first.startswith("data:image/png;base64,"), f"explorer figure: {first[:80]!r}"
            _save_screenshot(explorer.screenshot(), "jupyterlab-explorer.png")
            head = explorer.locator(".widget-dropdown", has=page.locator("label", has_text=re.compile(r"^head$"))).locator("select")
            assert head.locator("option").all_inner_texts() == ["H0", "H1", "H2", "H3"]
            assert head.locator("option:checked").inner_text() == "H0"
            head.select_option(label="H2")
            second = wait("choosing head H2 did not redraw the explorer's figure",
                          f"([el, old]) => {{ const s = ({_IMG_SRC})(el); return s && s !== old ? s : false; }}", [el, first], 30_000)
            assert second.startswith("data:image/png;base64,")
            _save_screenshot(explorer.screenshot(), "jupyterlab-explorer-head2.png")
            # back to H0: the first figure again (the redraw follows the selection, deterministically)
            head.select_option(label="H0")
            wait("choosing H0 again did not redraw the first figure", f"([el, old]) => ({_IMG_SRC})(el) === old", [el, first], 30_000)

            # --- circuitsvis: React mounted the attention view (a canvas per head) into its container
            view = cells.nth(VIEW).locator(".jp-Cell-outputArea")
            view.scroll_into_view_if_needed()
            n_canvas = wait("the circuitsvis view did not render (no canvas in its container)",
                            "(el) => { const c = el.querySelector(\"div[id^='circuits-vis-']\");"
                            " const n = c ? c.querySelectorAll('canvas').length : 0; return n > 0 ? n : false; }",
                            view.element_handle())
            container = view.locator("div[id^='circuits-vis-']").first
            assert n_canvas >= 4, f"circuitsvis drew {n_canvas} canvases for 4 heads"
            assert all(f"L1H{h}" in container.inner_text() for h in range(4)), "circuitsvis view lacks head names"
            box = container.locator("canvas").first.bounding_box()
            assert box and box["width"] > 0 and box["height"] > 0, f"circuitsvis canvas not laid out: {box}"
            # the view is taller than the window: grow the window for its screenshot (an element
            # screenshot of a scrolled notebook would show the toolbar over the clipped part)
            height = view.bounding_box()["height"]
            page.set_viewport_size({"width": 1400, "height": int(min(height + 400, 4000))})
            view.scroll_into_view_if_needed()
            _save_screenshot(view.screenshot(), "jupyterlab-attention-view.png")
            page.set_viewport_size({"width": 1400, "height": 1000})

            # --- the circuit diagram is an inline SVG naming its heads
            diagram = cells.nth(DIAGRAM).locator(".jp-Cell-outputArea")
            diagram.scroll_into_view_if_needed()
            svg = diagram.locator("svg")
            assert svg.count() >= 1, "the circuit diagram's output holds no <svg>"
            svg_text = svg.first.inner_html()
            assert all(s in svg_text for s in ("L0H1", "L1H2", "logits")), svg_text[:500]
            _save_screenshot(diagram.screenshot(), "jupyterlab-circuit-diagram.png")
            _save_screenshot(page.screenshot(), "jupyterlab-notebook.png")

            # --- nothing left this machine, and no JavaScript error
            outside = sorted({u for u in requests
                              if urlsplit(u).scheme not in ("data", "blob") and urlsplit(u).hostname != "127.0.0.1"})
            assert outside == [], f"the page requested non-local URLs: {outside}"
            assert errors == [], "JavaScript errors in JupyterLab:\n" + "\n".join(errors)
            times["checked"] = time.monotonic() - t0
        finally:
            browser.close()
    times["shut down"] = time.monotonic() - t0
    print("JupyterLab test, seconds since start: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
