"""The user's own model, offline: a local Hugging Face folder, a ``.gguf`` file (or its byte-split
parts), or an already-loaded ``PreTrainedModel`` with its tokenizer.

* A folder (``save_pretrained`` output, a fine-tune, a snapshot copied from elsewhere) loads with
  ``local_files_only=True``: nothing is fetched.
* A GGUF file is dequantized once into mechlib's float32 safetensors cache
  (:mod:`mechlib.models.cache`, keyed by the file's path, size and mtime; the manifest records its
  sha256); parts given as a list are joined in order first. llama.cpp's ``gguf-split`` shards
  (each part a GGUF file of its own) are refused with the command that merges them.
* An already-loaded model is wrapped as it is (its device placement kept); a GGUF-loaded model's
  missing ``config.architectures`` is set from its class.

Every path checks the architecture against what TransformerLens 4.3 can bridge and that the
tokenizer fits the model, and says what to do when not.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from mechlib.models import cache
from mechlib.models._common import ModelLoadError, boot, cache_dir

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin", "tf_model.h5", "flax_model.msgpack")
_GGUF_MAGIC = b"GGUF"


def local_tokenizer(tok):
    """The tokenizer, reloadable from disk: TransformerLens re-reads a tokenizer from its
    ``name_or_path`` (to add BOS), which must then be a local folder, never a hub id."""
    src = getattr(tok, "name_or_path", "") or ""
    if src and Path(src).is_dir() and any((Path(src) / f).is_file()
                                          for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return tok
    tmp = Path(tempfile.mkdtemp(prefix="tok-", dir=_ensure(cache_dir())))
    try:
        tok.save_pretrained(str(tmp))
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(tmp.iterdir()))).hexdigest()[:16]
        dest = cache_dir() / f"tokenizer-{digest}"
        if not dest.exists():
            try:
                os.replace(tmp, dest)
            except OSError:
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from transformers import AutoTokenizer

    out = AutoTokenizer.from_pretrained(str(dest), local_files_only=True)
    out.padding_side = getattr(tok, "padding_side", out.padding_side)
    return out


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _is_vlm(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def from_pretrained_model(hf, tokenizer, *, name: Optional[str] = None, device: Optional[str],
                          dtype: torch.dtype):
    """Wrap an already-loaded Hugging Face model (and its tokenizer) as a bridge."""
    from transformers import PreTrainedModel

    if not isinstance(hf, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel, got {type(hf).__name__}")
    if tokenizer is None:
        raise ValueError("an already-loaded model needs its tokenizer: load_model(hf_model, tokenizer=tok)")
    impl = getattr(hf.config, "_attn_implementation", None)
    if impl not in (None, "eager"):
        try:
            hf.set_attn_implementation("eager")
        except Exception:  # noqa: BLE001 - old transformers or a custom class
            warnings.warn(f"mechlib: the model uses attn_implementation={impl!r}; attention patterns need "
                          "'eager' (load it with attn_implementation='eager')")
    if getattr(hf, "hf_quantizer", None) is not None and getattr(hf.config, "quantization_config", None) is not None \
            and getattr(hf.config.quantization_config, "quant_method", None) == "gguf":
        hf.hf_quantizer = None  # dequantized on load: the marker only stops saving
    hf.eval()
    name = name or getattr(hf.config, "_name_or_path", "") or type(hf).__name__
    return boot(_boot_name(name), hf, local_tokenizer(tokenizer), device=device, dtype=dtype)


def _boot_name(name: str) -> str:
    """A name TL will not try to resolve on the hub (a local path's folder name)."""
    p = Path(str(name))
    return p.name if p.exists() else str(name)


def from_directory(path: Union[str, Path], *, device: Optional[str], dtype: torch.dtype, device_map=None,
                   tokenizer=None):
    """A local Hugging Face folder (config.json + weights + tokenizer), loaded without the hub."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return from_gguf(ggufs[0], device=device, dtype=dtype, device_map=device_map)
        raise ModelLoadError(f"{path} is not a Hugging Face model folder: it has no config.json"
                             + (f" (and {len(ggufs)} .gguf files: pass one of them)" if ggufs else
                                " (save a model with model.save_pretrained(folder), or pass a .gguf file)"))
    if not any(any(path.glob(pat)) for pat in _WEIGHT_PATTERNS):
        raise ModelLoadError(f"{path} has a config.json but no weights (model.safetensors, "
                             "pytorch_model.bin, or their shards): copy the weight files into it, or "
                             "save the model again with model.save_pretrained(folder)")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if _is_vlm(config):
        from transformers import AutoModelForImageTextToText as Auto
    else:
        Auto = AutoModelForCausalLM
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = Auto.from_pretrained(str(path), local_files_only=True, attn_implementation="eager",
                                      dtype=dtype, device_map=device_map)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"transformers could not load the model in {path} ({type(e).__name__}: {e})") from e
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"{path} has no usable tokenizer files ({type(e).__name__}: {e}); save the "
                                 "tokenizer there too (tok.save_pretrained(folder)) or pass tokenizer=") from e
    return from_pretrained_model(hf, tokenizer, name=path.name, device=None if device_map else device, dtype=dtype)


def _gguf_cache_path(files: Sequence[Path]) -> Path:
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return cache_dir() / f"gguf-{files[0].name.split('.gguf')[0][:48]}-{h.hexdigest()[:16]}-float32"


def from_gguf(paths: Union[str, Path, Sequence[Union[str, Path]]], *, device: Optional[str], dtype: torch.dtype,
              device_map=None):
    """A GGUF file, or the ordered byte-split parts of one, through mechlib's safetensors cache."""
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise ValueError("no GGUF file given")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"GGUF file {f} does not exist")
    with open(files[0], "rb") as fh:
        if fh.read(4) != _GGUF_MAGIC:
            raise ModelLoadError(f"{files[0]} is not a GGUF file (it does not start with 'GGUF')")
    for f in files[1:]:
        with open(f, "rb") as fh:
            if fh.read(4) == _GGUF_MAGIC:
                raise ModelLoadError(
                    f"{f} is a GGUF file of its own: these look like llama.cpp gguf-split shards, which "
                    "transformers cannot read. Merge them first: llama-gguf-split --merge first-shard.gguf "
                    "merged.gguf, then load_model('merged.gguf')")
    dest = _gguf_cache_path(files)

    def build(p: Path) -> None:
        from mechlib.models._common import file_sha256

        if len(files) == 1:
            cache.from_gguf(p, files[0], source={"source": str(files[0]), "source_sha256": file_sha256(files[0])})
            return
        joined = p.parent / f"{p.name}.joining" / files[0].name.split(".gguf")[0]
        joined = joined.with_suffix(".gguf")
        try:
            cache.concatenate(files, joined)
            cache.from_gguf(p, joined, source={"source": [str(f) for f in files],
                                              "source_sha256": file_sha256(joined)})
        finally:
            if joined.exists():
                joined.unlink()
            if joined.parent.exists():
                joined.parent.rmdir()

    hf, tok = cache.load(dest, build, dtype, device_map=device_map, what="GGUF")
    return boot(files[0].name.split(".gguf")[0], hf, tok, device=None if device_map else device, dtype=dtype)
