"""Interventions that edit head outputs (``hook_z``): scaling chosen heads (ablation, the static
VHR ablation) and VHR itself."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib import hooks, layout
from mechlib.interventions._common import _heads_by_layer, _positions_mask
from mechlib.results import Result
from mechlib.sites import check_layer


@contextmanager
def scale_heads(
    model,
    heads: Sequence[tuple[int, int]],
    alpha: float,
    *,
    positions: Optional[Sequence[int]] = None,
) -> Iterator[dict[str, int]]:
    """Multiply the outputs (``hook_z``) of ``heads`` by ``alpha`` while active.

    ``alpha > 1`` reinforces the heads (VHR), ``0`` ablates them, ``1`` changes nothing.
    ``positions`` restricts the scaling to those query positions (default all).

    Example:
        >>> with mechlib.interventions.scale_heads(model, [(23, 3)], 2.0):   # doctest: +SKIP
        ...     logits = model(tokens)
    """
    by_layer = _heads_by_layer(model, heads)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha} must be finite")

    def edit(z, hook, hs):  # z [b, pos, head, d_head]
        f = torch.ones(z.shape[0], z.shape[1], z.shape[2], dtype=z.dtype, device=z.device)
        at = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device) if positions is None else \
            _positions_mask(positions, layout.view(z.shape[0], q=z.shape[1], device=z.device).qpos)
        f[:, :, hs] = torch.where(at[..., None], torch.tensor(float(alpha), dtype=z.dtype, device=z.device), f[:, :, hs])
        return z * f[..., None]

    hk = [(f"blocks.{l}.attn.hook_z", lambda z, hook, hs=hs: edit(z, hook, hs)) for l, hs in by_layer.items()]
    with layout.editing(model, "scale_heads"), hooks.attach(model, hk, must_fire=False) as fired:
        yield fired


# --- VHR: vision-aware head reinforcement (He et al., ACL 2025) ----------------------------------


def vhr_layers(model) -> list[int]:
    """The paper's reinforced layers: the second layer (index 1) and the last 14 of LLaVA-1.5's 32
    — on a model of another depth, layer 1 and the same fraction (14/32) of the last layers."""
    L = model.cfg.n_layers
    n_last = 14 if L == 32 else max(1, round(14 * L / 32))
    return sorted({min(1, L - 1)} | set(range(max(L - n_last, 0), L)))


@dataclass(frozen=True, repr=False)
class VHRSelection(Result):
    """The heads VHR reinforces, per prompt. ``values[layer, head]``: the share of prompts whose
    selection includes the head; ``per_prompt[prompt, layer, head]``: 1 where selected. ``vhd``
    ``[prompt, layer, head]``: VHD measured during selection (earlier reinforced layers already
    applied; outliers zeroed; NaN outside the reinforced layers). ``logits`` ``[prompt, vocab]``:
    the reinforced model's next-token logits at each prompt's last token (the first generation
    step)."""

    vhd: Optional[Tensor] = None
    logits: Optional[Tensor] = None

    def heads(self, prompt: int) -> list[tuple[int, int]]:
        """The ``(layer, head)`` pairs reinforced for one prompt."""
        return [tuple(x) for x in self.per_prompt[prompt].nonzero().tolist()]


def _vhr_select(vhd: Tensor, ta: Tensor, outliers: bool) -> tuple[Tensor, Tensor]:
    """Algorithm 1's per-layer selection for ``[b, H]`` scores: zero the outliers (VHD and TA both
    above their mean + std over the layer's heads), then keep the heads above the layer's median."""
    if outliers:
        hi_v = vhd > vhd.mean(-1, keepdim=True) + vhd.std(-1, keepdim=True)
        hi_t = ta > ta.mean(-1, keepdim=True) + ta.std(-1, keepdim=True)
        vhd = torch.where(hi_v & hi_t, torch.zeros_like(vhd), vhd)
    return vhd > vhd.median(-1, keepdim=True).values, vhd


@contextmanager
def vhr(
    model,
    prompts,
    *,
    span=None,
    alpha: float = 2.0,
    layers: Union[str, Sequence[int]] = "paper",
    outliers: bool = True,
    extras: Optional[dict] = None,
    batch_size: Optional[int] = None,
) -> Iterator[VHRSelection]:
    """VHR (He et al. 2025, "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
    Divergence", Algorithm 1): per prompt and per layer, reinforce the heads whose output depends
    most on the image (VHD above the layer's median), layer by layer with the earlier layers already
    reinforced; forwards inside the block keep those heads (fixed at the first generation step).

    ======================  ===============================  ==============================  =====================
    choice                  paper                            released code                   mechlib
    ======================  ===============================  ==============================  =====================
    VHD                     ‖A(with image) − A(without)‖₂    (not public; a third-party      same: ``hook_z`` (the
                            per head, before W_O, at the     port reports squared L2)         head output before
                            current query                                                     W_O) at the last token
    layers                  layer 1 + the last 14 (LLaVA)    —                               ``layers="paper"``:
                                                                                              :func:`vhr_layers`
    order                   layer by layer, earlier layers   —                               same, in one forward of
                            already reinforced                                                the with/without pairs
    outliers                VHD = 0 where VHD > μ+σ and      —                               ``outliers=True``
                            TA = ‖A(no image)‖² > μ+σ
    selection               VHD > median of the layer        —                               same (top half)
    reinforcement           Ã = α·A, α = 2                   —                               ``alpha=2``
    heads fixed             at the first generation step     —                               on entering the block
    ======================  ===============================  ==============================  =====================

    The static-head variant (one global top-k for every prompt — the paper's ablation, which loses
    about 70% of the gain) is :func:`scale_heads`.

    Args:
        prompts: strings, a :class:`~mechlib.tasks.contrast.PromptBatch` or a ContrastSet (its
            clean prompts and, by default, its ``spans``).
        span: what is removed for the "without" run: ``"image"`` on a VLM (its image tokens and
            ``pixel_values``), or a context span ``(start, end)`` / one per prompt (text analogue).
        layers: ``"paper"`` or explicit layers.
        extras: forward inputs of the prompts (``pixel_values``).
        batch_size: prompts per selection forward (default all); the selection does not depend on it.

    Yields:
        :class:`VHRSelection`. Forwards inside the block must have the prompts' batch (rows in the
        same order; they may be longer, e.g. during generation); each row gets its own heads.

    Example:
        >>> qa = mechlib.tasks.context_qa(model, n=16)                       # doctest: +SKIP
        >>> with mechlib.vhr(model, qa) as sel:
        ...     logits = model(qa.clean_tokens)
    """
    from mechlib.tasks.contrast import ContrastSet, PromptBatch, _pad_id

    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha} must be finite")
    contrast = prompts if isinstance(prompts, ContrastSet) else None
    batch = PromptBatch.from_prompts(model, prompts, extras=extras)
    removed = batch.span_positions(model, span, contrast)
    wo = batch.without(model, removed, drop_extras=span == "image")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    chosen = vhr_layers(model) if layers == "paper" else sorted({check_layer(model, l) for l in layers})
    B = len(batch)
    pad_id = _pad_id(model)
    selected = torch.zeros(B, L, H)
    vhd_all = torch.full((B, L, H), float("nan"))
    first_step = []
    size = B if batch_size is None else batch_size
    for s0 in range(0, B, size):
        rows_b = slice(s0, min(s0 + size, B))
        w_tok, o_tok = batch.tokens[rows_b], wo.tokens[rows_b]
        b = w_tok.shape[0]
        width = max(w_tok.shape[1], o_tok.shape[1])
        tokens = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad_id) for t in (w_tok, o_tok)])
        last = torch.cat([batch.lengths[rows_b] - 1, wo.lengths[rows_b] - 1])
        # pixel_values belong to the with-image rows (the others have no image tokens)
        extras_b = {k: v[rows_b] for k, v in batch.extras.items()}

        def select_and_scale(z, hook, layer, b=b, last=last, rows_b=rows_b):
            rows = torch.arange(2 * b, device=z.device)
            at_last = z[rows, last.to(z.device)].float()  # [2b, H, d]
            zw, zo = at_last[:b], at_last[b:]
            sel, v = _vhr_select((zw - zo).norm(dim=-1), zo.pow(2).sum(-1), outliers)
            selected[rows_b, layer], vhd_all[rows_b, layer] = sel.float().cpu(), v.cpu()
            factor = torch.where(sel, torch.tensor(alpha, device=z.device), torch.tensor(1.0, device=z.device))
            return z * factor.repeat(2, 1).to(z.dtype)[:, None, :, None]

        hk = [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: select_and_scale(z, hook, l)) for l in chosen]
        with torch.no_grad():
            logits = hooks.forward(model, tokens, hooks=hk, extras=extras_b)
        first_step.append(logits[torch.arange(b), (batch.lengths[rows_b] - 1).to(logits.device)].float().cpu())
    first_step = torch.cat(first_step)
    sel = VHRSelection(
        values=selected.mean(0), axis_names=("layer", "head"),
        labels={"layer": [f"L{l}" for l in range(L)], "head": [f"H{h}" for h in range(H)]},
        per_prompt=selected, vhd=vhd_all, logits=first_step,
        metadata=dict(method="vhr", alpha=alpha, layers=chosen, outliers=outliers, n_prompts=B,
                      span="image" if span == "image" else "context", title="VHR: share of prompts reinforcing each head"))
    with reinforce_heads(model, selected.bool(), alpha, prompts=(batch.tokens, batch.lengths)):
        yield sel


@contextmanager
def reinforce_heads(model, mask: Tensor, alpha: float, *, prompts=None) -> Iterator[dict[str, int]]:
    """Scale each row's own heads: ``mask[prompt, layer, head]`` (bool) marks the heads multiplied by
    ``alpha`` (``hook_z``, all positions) in the rows of prompt ``prompt`` — stacked copies of the
    prompts (copy-major), or :func:`mechlib.generate`'s rows, which :mod:`mechlib.layout` maps to
    their prompts. ``prompts`` (``(tokens, lengths)`` of the prompts the mask was chosen for) lets
    generation check it runs on those prompts."""
    if mask.ndim != 3 or mask.shape[1:] != (model.cfg.n_layers, model.cfg.n_heads):
        raise ValueError(f"mask must be [prompt, {model.cfg.n_layers}, {model.cfg.n_heads}], got {tuple(mask.shape)}")
    P = mask.shape[0]

    def edit(z, hook, layer):
        v = layout.view(z.shape[0], q=z.shape[1], n_prompts=P, prompts=prompts, device=mask.device,
                        what="the heads VHR chose")
        f = torch.where(mask[v.rows, layer], alpha, 1.0).to(z.device, z.dtype)  # [b, H]
        return z * f[:, None, :, None]

    layers = [l for l in range(model.cfg.n_layers) if bool(mask[:, l].any())]
    hk = [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: edit(z, hook, l)) for l in layers]
    with layout.editing(model, "reinforce_heads"), hooks.attach(model, hk, must_fire=False) as fired:
        yield fired
