"""A float32 safetensors cache of converted weights, with integrity checks.

Dequantizing a GGUF file through ``transformers`` takes tens of seconds (Gemma 3 270M: about 30 s
on this project's 2-core machine, with its header parsed once instead of three times); the
converted weights are written once to a folder

    <name>/model.safetensors   config.json   tokenizer files   mechlib-manifest.json

atomically (a temp folder renamed into place), and later loads read it in about a second. The
manifest records the weights' size, mtime and sha256 (full, and of the first/last 4 MiB): every
load checks size and the quick hash; a weights file touched since the manifest was written gets
the full hash, so corruption anywhere is caught. A bad cache is rebuilt, never trusted.
``transformers`` refuses ``save_pretrained`` on a GGUF-loaded model, so the state dict is written
with safetensors directly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from mechlib.models._common import ModelLoadError, file_sha256

QUICK = 4 << 20  # bytes hashed at each end of the weights file on every load
MANIFEST = "mechlib-manifest.json"


def is_valid(path: Path, *, full: bool = False) -> bool:
    """True when ``path`` holds a complete cache whose weights match the manifest."""
    weights = path / "model.safetensors"
    try:
        meta = json.loads((path / MANIFEST).read_text())
        st = weights.stat()
        if st.st_size != meta["size"]:
            return False
        full = full or st.st_mtime_ns != meta.get("mtime_ns")
        if file_sha256(weights, head_tail=QUICK) != meta["quick_sha256"]:
            return False
        if full and file_sha256(weights) != meta["sha256"]:
            return False
        return all((path / f).is_file() for f in meta["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def _plain_config(hf):
    """The model's config as a plain (non-quantized) checkpoint config with its architecture set."""
    cfg = hf.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(hf).__name__]
    return cfg


def write(dest: Path, hf, tokenizer, source: dict) -> None:
    """Write ``hf``'s weights (float, safetensors), config and tokenizer to ``dest`` atomically."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    hf.hf_quantizer = None
    cfg = _plain_config(hf)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    state = {k: v.detach().contiguous() for k, v in hf.state_dict().items() if k not in tied}
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        weights = tmp / "model.safetensors"
        save_file(state, str(weights), metadata={"format": "pt"})
        cfg.to_json_file(str(tmp / "config.json"))
        tokenizer.save_pretrained(str(tmp))
        files = sorted(p.name for p in tmp.iterdir())
        meta = {
            **source,
            "architecture": cfg.architectures[0],
            "dtype": str(next(iter(state.values())).dtype),
            "size": weights.stat().st_size,
            "sha256": file_sha256(weights),
            "quick_sha256": file_sha256(weights, head_tail=QUICK),
            "mtime_ns": weights.stat().st_mtime_ns,
            "files": files,
            "seconds_to_build": round(time.perf_counter() - t0, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=1))
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not is_valid(dest):  # lost a race with another process that failed
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read(path: Path, dtype: torch.dtype, *, device_map=None):
    """``(hf_model, tokenizer)`` from a cache folder: no random init; weights assigned from the file."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with no_init_weights():
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    state = load_file(str(path / "model.safetensors"))
    if dtype != torch.float32:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ModelLoadError(f"cache at {path} does not match the model: missing={missing}, unexpected={unexpected}")
    hf.tie_weights()
    hf.eval()
    if device_map is not None:
        from accelerate import dispatch_model

        hf = dispatch_model(hf, device_map=device_map)
    return hf, _tokenizer(path)


def _tokenizer(path: Path):
    """The saved tokenizer, already set to prepend its BOS token when it has one — what
    TransformerLens' boot makes of it (``get_tokenizer_with_bos``), which otherwise loads the whole
    tokenizer a second time to set that flag (≈ 4 s for Gemma 3's 262k vocabulary). A tokenizer
    that cannot take the flag (TL keeps it as it is then) is loaded as saved."""
    from transformers import AutoTokenizer

    config = path / "tokenizer_config.json"
    bos = json.loads(config.read_text()).get("bos_token") if config.is_file() else None
    if bos:
        try:
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True, add_bos_token=True)
        except ValueError:  # e.g. a special token TemplateProcessing cannot express (TL falls back too)
            pass
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def ensure(path: Path, build: Callable[[Path], None], *, verify: bool = False,
           what: str = "model") -> Path:
    """A valid cache at ``path``: checked, and (re)built with ``build(path)`` when missing or bad."""
    import warnings

    if not is_valid(path, full=verify):
        if path.exists():
            warnings.warn(f"mechlib: the {what} cache at {path} is incomplete or corrupt; rebuilding it")
        build(path)
    return path


def load(path: Path, build: Callable[[Path], None], dtype: torch.dtype, *, device_map=None,
         what: str = "model"):
    """``(hf_model, tokenizer)`` from a cache, building it first if needed; a cache that passed the
    quick check but fails to load is rebuilt once."""
    import warnings

    ensure(path, build, what=what)
    try:
        return read(path, dtype, device_map=device_map)
    except Exception as e:
        warnings.warn(f"mechlib: the {what} cache at {path} failed to load ({e}); rebuilding it")
        build(path)
        return read(path, dtype, device_map=device_map)


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file's header three times — for the config, the tokenizer and the
    weights — and each parse reads the vocabulary element by element (Gemma 3's 262k entries: ~10 s).
    Inside the block each file is parsed once (its reader is only read from; ``gguf.GGUFReader``, which
    transformers imports at each call, is restored on exit)."""
    import gguf as gguf_lib

    real = gguf_lib.GGUFReader
    readers: dict = {}

    def reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    gguf_lib.GGUFReader = reader
    try:
        yield
    finally:
        gguf_lib.GGUFReader = real


def from_gguf(dest: Path, gguf: Path, *, source: dict, error_hint: str = "") -> None:
    """Dequantize one GGUF file with ``transformers`` and write the cache at ``dest``."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with warnings.catch_warnings(), _gguf_parsed_once():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      attn_implementation="eager", dtype=torch.float32)
    except Exception as e:  # gguf raises a zoo of types on bad files
        raise ModelLoadError(
            f"Could not read the GGUF file {gguf} ({type(e).__name__}: {e}). It is probably corrupt "
            f"or of an architecture transformers cannot dequantize.{' ' + error_hint if error_hint else ''}"
        ) from e
    write(dest, hf, tok, source)


def concatenate(parts: list[Path], dest: Path, expected_sha256: Optional[str] = None) -> Path:
    """Join byte-split parts of one file in order into ``dest`` (atomically), checking its sha256."""
    import hashlib

    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=sum(p.stat().st_size for p in parts), unit="B",
                                               unit_scale=True, desc=f"joining {dest.name}") as bar:
            for p in parts:
                with open(p, "rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
        if expected_sha256 is not None and h.hexdigest() != expected_sha256:
            raise ModelLoadError(
                f"the parts {[str(p) for p in parts]} joined give sha256 {h.hexdigest()}, not the "
                f"declared {expected_sha256}: a part is missing, truncated or corrupt")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest
