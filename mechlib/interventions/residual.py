"""Interventions that edit the residual stream: Sun et al.'s massive-activation ablation and
activation-addition steering (VISTA)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.sites import check_layer


@contextmanager
def ablate_massive(
    model,
    dims: Sequence[int],
    *,
    positions: Union[Sequence[int], None] = (0,),
    layers: Optional[Sequence[int]] = None,
    mode: str = "zero",
    values: Optional[Tensor] = None,
) -> Iterator[dict[str, int]]:
    """Set residual-stream entries ``dims`` at ``positions`` (None: all) to zero or to ``values``.

    Args:
        layers: the ``resid_post`` layers to edit (default all; Sun et al. edit where massive
            activations appear, and later layers carry them on).
        mode: ``"zero"`` or ``"mean"``; then ``values`` are the means to write: ``[len(dims)]``
            for every edited layer, or ``[len(layers), len(dims)]`` one row per layer (massive
            entries change size across layers).
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode={mode!r}: choose 'zero' or 'mean'")
    if mode == "mean" and (values is None or values.shape[-1] != len(dims)):
        raise ValueError("mode='mean' needs values with one mean per dim (last axis)")
    d_model = model.cfg.d_model
    bad = [d for d in dims if not 0 <= d < d_model]
    if bad or not dims:
        raise ValueError(f"dims {list(dims) or '[]'} must be non-empty and within 0..{d_model - 1}")
    layers = list(range(model.cfg.n_layers)) if layers is None else [check_layer(model, l) for l in layers]
    if mode == "mean" and values.ndim == 2 and values.shape[0] != len(layers):
        raise ValueError(f"values has {values.shape[0]} rows but {len(layers)} layers are edited")
    d_idx = torch.tensor(list(dims))

    def edit(h, hook, row):
        h = h.clone()
        pos = slice(None) if positions is None else list(positions)
        if mode == "zero":
            fill = torch.zeros(len(dims), dtype=h.dtype, device=h.device)
        else:
            fill = (values[row] if values.ndim == 2 else values).to(h.device, h.dtype)
        sel = h[:, pos]
        sel[..., d_idx.to(h.device)] = fill
        h[:, pos] = sel
        return h

    hk = [(f"blocks.{l}.hook_resid_post", lambda h, hook, i=i: edit(h, hook, i)) for i, l in enumerate(layers)]
    with hooks.attach(model, hk, must_fire=False) as fired:
        yield fired


@contextmanager
def steer_residual(
    model,
    vectors: dict[int, Tensor],
    *,
    scale: float = 1.0,
    positions: Optional[Sequence[int]] = None,
) -> Iterator[dict[str, int]]:
    """Add ``scale * vectors[layer]`` (``[d_model]``) to the residual stream after each block
    ``layer`` (``hook_resid_post``), at ``positions`` (default all) — VISTA's visual steering
    vector, or any activation-addition steering.
    """
    if not vectors:
        raise ValueError("vectors is empty: give {layer: [d_model] tensor}")
    d = model.cfg.d_model
    for l, v in vectors.items():
        check_layer(model, l)
        if v.shape != (d,):
            raise ValueError(f"vectors[{l}] has shape {tuple(v.shape)}; need [{d}] (d_model)")
    pos = slice(None) if positions is None else list(positions)

    def edit(x, hook, v):
        x = x.clone()
        x[:, pos] = x[:, pos] + scale * v.to(x.device, x.dtype)
        return x

    hk = [(f"blocks.{l}.hook_resid_post", lambda x, hook, v=v: edit(x, hook, v)) for l, v in vectors.items()]
    with hooks.attach(model, hk, must_fire=False) as fired:
        yield fired
