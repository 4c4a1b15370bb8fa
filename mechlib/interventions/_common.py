"""What every intervention shares: the error for edits a bridge cannot carry, head lists per
layer, and attaching attention-pattern edits."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor

from mechlib import hooks, layout
from mechlib.sites import check_head, check_layer


class UnsupportedBridgeError(TypeError):
    """The bridge cannot carry this edit (e.g. it delegates attention to HF code, so pattern edits
    would not reach the output); the message says which layer and why."""


def _check_pattern_editable(model, layers: Sequence[int]) -> None:
    from mechlib.arch import _pattern_editable

    for l in layers:
        if not _pattern_editable(model.blocks[l].attn):
            raise UnsupportedBridgeError(
                f"layer {l} uses {type(model.blocks[l].attn).__name__}, which runs HF's attention and fires "
                "hook_pattern after the fact: an attention edit would be silently discarded. Supported: bridges "
                "that re-implement attention (PositionEmbeddingsAttentionBridge, JointQKVAttentionBridge and "
                "their subclasses: Llama, Qwen, Gemma, Mistral, Phi-3, OLMo, GPT-2, Pythia ...)")


def _heads_by_layer(model, heads: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    if not heads:
        raise ValueError("heads is empty: give (layer, head) pairs")
    for l, h in heads:
        out.setdefault(check_layer(model, l), []).append(check_head(model, "head_out", h))
    return out


@contextmanager
def _editing_patterns(model, by_layer: dict[int, list[int]], edit, name: str, **supports) -> Iterator[dict[str, int]]:
    """Attach ``edit(pattern, hook, heads, layer)`` at each layer's ``hook_pattern`` for its heads,
    declared to :mod:`mechlib.layout` as the edit ``name`` (``supports``: what it can run on)."""
    hk = [(f"blocks.{l}.attn.hook_pattern", lambda A, hook, hs=hs, l=l: edit(A, hook, hs, l))
          for l, hs in by_layer.items()]
    with layout.editing(model, name, hooks=[n for n, _ in hk], **supports), \
            hooks.attach(model, hk, must_fire=False) as fired:
        yield fired


def _move_mass(A: Tensor, take: Tensor, recipients: Tensor) -> Tensor:
    """Remove ``take`` (same shape as A, ≥ 0) and add its row sum to ``recipients`` (bool mask over
    keys, broadcastable), proportionally to their current attention; rows whose recipients hold no
    attention keep the removed mass where it was."""
    rec = A * recipients
    rec_sum = rec.sum(-1, keepdim=True)
    moved = take.sum(-1, keepdim=True)
    ok = rec_sum > 1e-12
    out = A - take + torch.where(ok, rec / rec_sum.clamp(min=1e-12) * moved, torch.zeros_like(A))
    return torch.where(ok, out, A)


def _positions_mask(positions, pos: Tensor) -> Tensor:
    """``pos`` (prompt positions, any shape) ∈ ``positions`` (a list of prompt positions)."""
    positions = list(positions)
    if any(int(p) < 0 for p in positions):
        raise ValueError(f"positions {positions} must be prompt positions >= 0 (counted from each prompt's first "
                         "token; -1 is not 'the last one' here)")
    want = torch.as_tensor(positions, dtype=torch.long, device=pos.device)
    return (pos[..., None] == want).any(-1)
