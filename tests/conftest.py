"""Shared fixtures: tiny random models (fast, offline) and the embedded SmolLM2-135M (real)."""

import os
import shutil

import pytest
import torch

import mechlib

# Under pytest-xdist (`make test` runs JOBS workers) each worker takes its share of the cores, and so
# do the processes it starts (notebook kernels, the fresh virtual environments of the install tests):
# two workers of two threads each on a 2-core machine would fight over the cores.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    torch.set_num_threads(int(_THREADS))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _THREADS


@pytest.fixture(scope="session")
def tiny_llama():
    return mechlib.tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_gpt2():
    return mechlib.tiny_model("gpt2", seed=0)


@pytest.fixture(scope="session")
def tiny_llava():
    return mechlib.tiny_model("llava", seed=0)


@pytest.fixture(scope="session")
def model():
    """The embedded model. `make test` builds its cache first; a missing install is a failure."""
    return mechlib.load_model(device="cpu")


@pytest.fixture(scope="session")
def gemma():
    """The second embedded model, Gemma 3 270M (built into the cache by `make`)."""
    return mechlib.load_model("gemma-3-270m", device="cpu")


@pytest.fixture(scope="session")
def ioi_set(model):
    return mechlib.tasks.ioi(model, n=24, seed=0)


def weights_snapshot(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_weights_equal(m, snap):
    now = m.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"weight {k} changed"


def chromium() -> str:
    """Debian's chromium for the browser tests: missing is a failure (``make setup`` installs it)
    unless ``MECHLIB_SKIP_BROWSER`` is set."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("MECHLIB_SKIP_BROWSER"):
            pytest.skip("no chromium and MECHLIB_SKIP_BROWSER is set")
        pytest.fail("chromium is not installed: `make setup` installs it with apt-get "
                    "(or set MECHLIB_SKIP_BROWSER=1 to skip this check)")
    return exe
