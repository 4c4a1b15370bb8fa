"""What differs between architectures, read once per model into one small description.

Every verb that depends on the shape of a transformer block — the norm's form, post-norms,
parallel blocks, rotary embeddings per layer, sliding windows, soft-capping — asks
:func:`describe` instead of testing model names. Adding a family is adding what it differs in
here (usually nothing: the description is read off the Hugging Face config and the bridge's
components), never an ``if`` in a verb.

=====================  ======================================================================
field                   read from
=====================  ======================================================================
``norm``                TL's ``cfg.normalization_type`` (``"RMS"`` or ``"LN"``)
``norm_offset``         Gemma's RMSNorm multiplies by ``1 + w`` (``cfg.rmsnorm_uses_offset``)
``pre_norm``            the block has ``ln1`` before attention (OLMo-2 has only post-norms)
``post_norms``          ``ln1_post``/``ln2_post`` after attention/MLP (Gemma 2/3, OLMo-2)
``parallel``            attention and MLP read the same residual (GPT-NeoX/Pythia, Phi-2, GPT-J)
``rotary``              RoPE; the per-layer frequencies come from the layer's own cos/sin
``windows``             per-layer sliding window (``None`` = global); Gemma 2/3 local layers
``attn_softcap``        Gemma 2's tanh cap on attention scores
``logit_softcap``       Gemma 2's tanh cap on the output logits
``qk_norm``             norms on queries/keys (Qwen3, Gemma 3, OLMo-2)
``pattern_editable``    the bridge re-implements attention, so ``hook_pattern`` edits reach the output
=====================  ======================================================================
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Optional

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Arch:
    """How one model's blocks are built (see the module docstring for each field)."""

    family: str
    norm: str
    norm_offset: float
    pre_norm: bool
    post_norms: bool
    parallel: bool
    rotary: bool
    windows: tuple[Optional[int], ...]
    attn_softcap: Optional[float]
    logit_softcap: Optional[float]
    qk_norm: bool
    pattern_editable: bool
    attention_bridge: str
    n_heads: int
    n_kv_heads: int

    def to_dict(self) -> dict:
        return asdict(self)


def text_config(model):
    """The Hugging Face config of the language model (the text tower of a VLM)."""
    cfg = getattr(getattr(model, "original_model", None), "config", None)
    if cfg is None:
        return None
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else getattr(cfg, "text_config", cfg)


def _pattern_editable(attn) -> bool:
    from transformer_lens.model_bridge.generalized_components.joint_qkv_attention import JointQKVAttentionBridge
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    return isinstance(attn, (JointQKVAttentionBridge, PositionEmbeddingsAttentionBridge))


def _windows(hf_cfg, n_layers: int) -> tuple[Optional[int], ...]:
    window = getattr(hf_cfg, "sliding_window", None)
    types = getattr(hf_cfg, "layer_types", None)
    if not window:
        return (None,) * n_layers
    if types:
        return tuple(window if "sliding" in str(t) else None for t in types[:n_layers])
    if getattr(hf_cfg, "use_sliding_window", True) is False:  # Qwen2 declares a window it does not use
        return (None,) * n_layers
    return (int(window),) * n_layers


def describe(model) -> Arch:
    """The :class:`Arch` of a TransformerBridge (cached per model object)."""
    hit = _CACHE.get(model)
    if hit is not None:
        return hit
    cfg = model.cfg
    hf_cfg = text_config(model)
    block = model.blocks[0]
    subs = dict(block.named_children())
    attn = block.attn
    softcap = lambda v: float(v) if v not in (None, 0) and float(v) > 0 else None  # noqa: E731
    out = Arch(
        family=str(getattr(hf_cfg, "model_type", None) or getattr(cfg, "architecture", None) or "unknown"),
        norm="RMS" if str(getattr(cfg, "normalization_type", "LN")).startswith("RMS") else "LN",
        norm_offset=1.0 if getattr(cfg, "rmsnorm_uses_offset", False) else 0.0,
        pre_norm="ln1" in subs,
        post_norms="ln1_post" in subs or "ln2_post" in subs,
        parallel=type(block).__name__.startswith("Parallel") or bool(getattr(cfg, "parallel_attn_mlp", False)),
        rotary=getattr(cfg, "positional_embedding_type", None) == "rotary",
        windows=_windows(hf_cfg, int(cfg.n_layers)),
        attn_softcap=softcap(getattr(getattr(attn, "original_component", None), "attn_logit_softcapping", None)
                             or getattr(hf_cfg, "attn_logit_softcapping", None)),
        logit_softcap=softcap(getattr(cfg, "output_logits_soft_cap", None)),
        qk_norm="q_norm" in dict(attn.named_children()),
        pattern_editable=_pattern_editable(attn),
        attention_bridge=type(attn).__name__,
        n_heads=int(cfg.n_heads),
        n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads),
    )
    _CACHE[model] = out
    return out


def block_device(model, layer: int):
    """The device of block ``layer``'s weights (blocks may live on different devices under a
    ``device_map``)."""
    import torch

    p = next(model.blocks[layer].parameters(), None)
    return p.device if p is not None else torch.device(model.cfg.device)


def output_device(model):
    """The device of the unembedding (where logits are produced)."""
    import torch

    p = next(model.unembed.parameters(), None)
    return p.device if p is not None else torch.device(model.cfg.device)
