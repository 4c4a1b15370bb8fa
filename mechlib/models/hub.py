"""Models by hub name (the papers' models on a machine with hub access).

Offline, with nothing in the local Hugging Face cache, a hub name fails fast with
:class:`ModelNotAvailableOffline` instead of hanging on retries.
"""

from __future__ import annotations

import os
import socket
import warnings
from typing import Any

from mechlib.models._common import ModelNotAvailableOffline, check_runs_in_dtype, no_processor_autoload

# Short names for the papers' models; anything else is passed to TransformerLens as is.
HUB_ALIASES = {
    "gpt2-small": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
}

# The tiny random family standing in for a model (load_model(name, standin="tiny")): the first
# pattern found in the model's (hub) name decides.
STANDIN_FAMILIES = (("llava", "llava"), ("gemma-3", "gemma3"), ("gemma3", "gemma3"), ("gemma-2", "gemma2"),
                    ("gemma2", "gemma2"), ("qwen3", "qwen3"), ("qwen", "qwen2"), ("mistral", "mistral"),
                    ("phi-3", "phi3"), ("olmo-2", "olmo2"), ("pythia", "neox"), ("neox", "neox"), ("gpt2", "gpt2"),
                    ("llama", "llama"), ("smollm", "llama"))


def standin_family(name: str) -> str:
    """The tiny family (``mechlib.models.FAMILIES``) of the architecture of model ``name``."""
    key = HUB_ALIASES.get(name.lower(), name).lower()
    for pattern, family in STANDIN_FAMILIES:
        if pattern in key:
            return family
    raise ValueError(f"no tiny stand-in is known for {name!r}: pass one of the families "
                     f"{sorted({f for _, f in STANDIN_FAMILIES})} to tiny_model, or a name containing "
                     f"{[p for p, _ in STANDIN_FAMILIES]}")


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def in_local_hub_cache(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except Exception:  # noqa: BLE001
        return False


def load(name: str, *, device, dtype, device_map, n_devices, boot_kwargs: dict[str, Any], embedded_names):
    from transformer_lens.model_bridge import TransformerBridge

    repo = HUB_ALIASES.get(name, name)
    if not in_local_hub_cache(repo) and not hub_reachable():
        raise ModelNotAvailableOffline(
            f"Model {name!r} (hub id {repo!r}) is not in the local Hugging Face cache and the hub cannot "
            f"be reached from this machine, so it cannot be downloaded here. Use an embedded model "
            f"instead (mechlib.load_model() or load_model({sorted(embedded_names)[0]!r}); embedded: "
            f"{', '.join(sorted(embedded_names))}), a local folder or .gguf file (load_model('path/to/model')), "
            f"or run on a machine with hub access (e.g. Colab) to use {name!r}.")
    kwargs: dict[str, Any] = dict(dtype=dtype, **boot_kwargs)
    if device_map is not None or n_devices is not None:
        kwargs.update(device_map=device_map, n_devices=n_devices)
    else:
        kwargs["device"] = device
    with no_processor_autoload():
        bridge = TransformerBridge.boot_transformers(repo, **kwargs)
    if getattr(bridge.cfg, "is_multimodal", False):
        from transformers import AutoProcessor

        try:  # never pip-installs anything, unlike TL's own fallback
            bridge.processor = AutoProcessor.from_pretrained(repo)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"mechlib: no processor for {repo!r} ({e}); build pixel_values yourself")
    bridge.eval()
    check_runs_in_dtype(bridge, repo)
    return bridge
