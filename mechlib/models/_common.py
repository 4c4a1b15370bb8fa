"""Shared by every loader: errors, device/dtype, the cache folder, and booting a bridge."""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from mechlib.numerics import HALF


class ModelLoadError(RuntimeError):
    """A model file or folder is missing, truncated, corrupt or not a model mechlib can boot."""


class ModelNotAvailableOffline(RuntimeError):
    """A hub model was requested but cannot be downloaded from this machine."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(table)} or a torch.dtype")
    return table[dtype]


def cache_dir() -> Path:
    """Where mechlib keeps converted weights: ``$MECHLIB_CACHE`` or ``~/.cache/mechlib``."""
    if os.environ.get("MECHLIB_CACHE"):
        return Path(os.environ["MECHLIB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mechlib"


def file_sha256(path: Path, *, head_tail: Optional[int] = None) -> str:
    """sha256 of a file, or of its first and last ``head_tail`` bytes plus its size (fast check)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if head_tail is None or size <= 2 * head_tail:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        else:
            h.update(f.read(head_tail))
            f.seek(size - head_tail)
            h.update(f.read(head_tail))
            h.update(str(size).encode())
    return h.hexdigest()


@contextlib.contextmanager
def no_processor_autoload():
    """Stop TransformerLens' boot from fetching a VLM processor by model name.

    For multimodal configs TL 4.3 calls ``AutoProcessor.from_pretrained(model_name)`` (hub retries
    for minutes offline) and, when that fails, **pip-installs torchvision on the fly**, which
    replaces a CPU torch with a multi-GB CUDA build. mechlib loads processors itself.
    """
    from transformer_lens.model_bridge.sources.transformers import source

    original = source.load_modality_processor
    source.load_modality_processor = lambda *a, **k: None
    try:
        yield
    finally:
        source.load_modality_processor = original


def supported_architectures() -> list[str]:
    """The Hugging Face architecture names TransformerLens 4.3 can bridge."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return sorted(SUPPORTED_ARCHITECTURES)


def prepare_hf_model(hf, tokenizer=None):
    """Make an already-loaded Hugging Face model bootable by TransformerLens.

    A model loaded from GGUF has no ``config.architectures`` (TL reads the architecture from it):
    set it from the model's class. Checks the architecture is one TL supports and that the
    tokenizer fits the model's vocabulary.
    """
    cfg = hf.config
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(hf).__name__]
    supported = set(supported_architectures())
    if not any(a in supported for a in cfg.architectures):
        causal = [a for a in sorted(supported) if a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))]
        raise ModelLoadError(
            f"TransformerLens 4.3 cannot bridge architecture {cfg.architectures} (model_type "
            f"{getattr(cfg, 'model_type', '?')!r}). Supported language-model architectures include: "
            f"{', '.join(causal)}")
    if tokenizer is not None:
        emb = hf.get_input_embeddings()
        n_rows = int(emb.weight.shape[0]) if emb is not None else None
        ids = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None]
        if n_rows is not None and (len(tokenizer) > n_rows or any(i >= n_rows for i in ids)):
            raise ModelLoadError(
                f"the tokenizer does not fit this model: it has {len(tokenizer)} tokens (special ids "
                f"{ids}) but the model's embedding has {n_rows} rows. Pass the tokenizer saved with "
                "this model (same folder / same GGUF file).")
    return hf


def boot(name: str, hf_model, tokenizer, *, device: Optional[str], dtype: torch.dtype):
    """Wrap a loaded HF model in a TransformerBridge (no hub call), on ``device``, in eval mode."""
    import logging

    from transformer_lens.model_bridge import TransformerBridge

    prepare_hf_model(hf_model, tokenizer)
    # the bridge takes the dtype as given: weights in another one would run in theirs under its label.
    # Cast as from_pretrained(dtype=) loads: the parameters (when the model's main dtype differs; a
    # quantized model as it is), not the buffers (rotary inv_freq stays float32)
    if getattr(hf_model, "dtype", dtype) != dtype and getattr(hf_model, "hf_quantizer", None) is None:
        keep = set(getattr(hf_model, "_keep_in_fp32_modules", None) or ())
        for pname, p in hf_model.named_parameters():
            if p.is_floating_point() and not any(k in pname.split(".") for k in keep):
                p.data = p.data.to(dtype)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # TL logs alias deprecations through the root logger
    try:
        with warnings.catch_warnings(), no_processor_autoload():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype)
    finally:
        root.setLevel(level)
    on_map = getattr(hf_model, "hf_device_map", None)
    if device is not None and not on_map and torch.device(device) != torch.device(bridge.cfg.device):
        bridge = bridge.to(device)
    bridge.eval()
    check_runs_in_dtype(bridge, name)
    return bridge


def check_runs_in_dtype(bridge, name: str) -> None:
    """A half-precision bridge runs one short forward at load, so that an attention bridge that
    mixes float32 into its half-precision path (TransformerLens 4.3 applies OLMo-2's rotary
    embedding in float32 and never casts back) fails here with the fix, not inside a verb."""
    if bridge.cfg.dtype not in HALF:
        return
    try:
        with torch.no_grad():
            bridge(torch.zeros(1, 2, dtype=torch.long, device=bridge.cfg.device))
    except RuntimeError as e:
        if "type" not in str(e).lower():  # a dtype mismatch ("expected scalar type Float but found BFloat16")
            raise
        raise ModelLoadError(
            f"{name} does not run in {bridge.cfg.dtype} under TransformerLens's bridge ({e}): load it in "
            "float32 (dtype='float32')") from e
