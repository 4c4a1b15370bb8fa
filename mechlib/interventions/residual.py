"""Interventions that edit the residual stream: Sun et al.'s massive-activation ablation and
activation-addition steering (VISTA)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.provenance import records
from mechlib.results import Result
from mechlib.sites import check_layer


def massive_positions(h: Tensor, dims: Sequence[int], lengths: Optional[Tensor] = None) -> Tensor:
    """Sun et al.'s edited positions per input: ``[b, 2]`` = (0, the position of the largest
    |activation| in ``dims``), found in the residual ``h`` ``[b, pos, d]`` over real tokens; when that
    largest entry is at position 0 the second column repeats 0."""
    mag = h[..., list(dims)].abs().amax(-1)  # [b, pos]
    if lengths is not None:
        real = torch.arange(h.shape[1], device=h.device)[None] < lengths.to(h.device)[:, None]
        mag = mag.masked_fill(~real, -1.0)
    return torch.stack([torch.zeros_like(mag[:, 0], dtype=torch.long), mag.argmax(-1)], 1)


@contextmanager
def ablate_massive(
    model,
    dims: Sequence[int],
    *,
    layer: Optional[int] = None,
    layers: Optional[Sequence[int]] = None,
    positions: Union[str, Sequence[int], None] = "paper",
    mode: str = "zero",
    values: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
) -> Iterator[dict[str, int]]:
    """Sun et al. (2024): set the massive activations (``dims``) to zero or to their mean, in the
    residual stream after block ``layer`` — where they appear — and let later layers run freely.

    ==================  =================================  ==================================  ======================
    choice              paper                              released code (massive-activations)  mechlib
    ==================  =================================  ==================================  ======================
    edited layer        where they emerge (one layer)      output of ``layers[layer_id-1]``     ``layer=`` (required;
                                                           (README: ``--layer_id 2``)           ``layers=`` edits several,
                                                                                                a stronger variant)
    positions           the start token and the first      token 0 + the largest activation's   ``positions="paper"``
                        delimiter                          position when not 0, per input       (or explicit positions)
    mean values         per position                       hard-coded per position              ``values`` ``[2, dims]``
                                                                                                (first, delimiter) or
                                                                                                ``[dims]``; see
                                                                                                :func:`~mechlib.analyses.sinks.massive_means`
    ==================  =================================  ==================================  ======================

    Args:
        layer: the block whose output (``hook_resid_post``) is edited, e.g.
            ``massive_activations(model, prompts).first_layer()``.
        layers: instead of ``layer``, edit several layers' outputs (stronger: later layers cannot
            rebuild the activations).
        positions: ``"paper"`` (0 and each input's largest-activation position, found at the edited
            layer), explicit positions shared by the batch, or ``None`` (all).
        mode: ``"zero"`` or ``"mean"``; ``values`` are the means: ``[len(dims)]``, or one row per
            position kind (``[2, len(dims)]`` for ``"paper"``: first token, delimiter; or
            ``[len(positions), len(dims)]``).
        lengths: the prompts' lengths for right-padded batches (``"paper"`` positions are found
            among real tokens).
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode={mode!r}: choose 'zero' or 'mean'")
    if mode == "mean" and (values is None or values.shape[-1] != len(dims)):
        raise ValueError("mode='mean' needs values with one mean per dim (last axis); see massive_means()")
    d_model = model.cfg.d_model
    bad = [d for d in dims if not 0 <= d < d_model]
    if bad or not dims:
        raise ValueError(f"dims {list(dims) or '[]'} must be non-empty and within 0..{d_model - 1}")
    if (layer is None) == (layers is None):
        raise ValueError("give layer= (Sun et al. edit the one layer where massive activations appear, e.g. "
                         "massive_activations(model, prompts).first_layer()) or layers= (several), not both")
    edit_layers = [check_layer(model, layer)] if layers is None else [check_layer(model, l) for l in layers]
    if isinstance(positions, str) and positions != "paper":
        raise ValueError(f"positions={positions!r}: 'paper', a list of positions, or None")
    n_kinds = 2 if positions == "paper" else (None if positions is None else len(positions))
    if mode == "mean" and values.ndim == 2 and values.shape[0] != n_kinds:
        raise ValueError(f"values has {values.shape[0]} rows; give one per position kind ({n_kinds}) or a single row")
    d_idx = torch.tensor(list(dims))

    def edit(h, hook):
        h = h.clone()
        di = d_idx.to(h.device)
        fill = torch.zeros(len(dims), dtype=h.dtype, device=h.device) if mode == "zero" else values.to(h.device, h.dtype)
        if positions is None:
            h[..., di] = fill if fill.ndim == 1 else fill[0]
            return h
        if positions == "paper":
            if lengths is not None and h.shape[0] % len(lengths):
                raise ValueError(f"lengths has {len(lengths)} entries; this forward has batch {h.shape[0]}")
            lens = None if lengths is None else lengths.repeat(h.shape[0] // len(lengths))
            pos = massive_positions(h, dims, lens)  # [b, 2]
        else:
            if max(positions) >= h.shape[1]:
                raise IndexError(f"positions {list(positions)} exceed the {h.shape[1]} tokens of this input")
            pos = torch.tensor(list(positions), device=h.device).expand(h.shape[0], -1)
        rows = torch.arange(h.shape[0], device=h.device)
        for k in reversed(range(pos.shape[1])):  # kind 0 (the first token) last, so it wins a tie
            row_fill = fill if fill.ndim == 1 else fill[k]
            sel = h[rows, pos[:, k]]
            sel[:, di] = row_fill
            h[rows, pos[:, k]] = sel
        return h

    hk = [(f"blocks.{l}.hook_resid_post", edit) for l in edit_layers]
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
    ``layer`` (``hook_resid_post``), at ``positions`` (default all): plain activation addition
    with one fixed vector, un-normalised. This is not VISTA's edit — :func:`vista` steers each
    prompt with its own vector and keeps each token's norm (the paper), or edits the MLP output
    (the released code).
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


# --- VISTA: visual steering vector (Li et al., ICML 2025) ----------------------------------------


@dataclass(frozen=True, repr=False)
class SteeringVectors(Result):
    """VISTA's per-input steering vectors. ``vectors`` ``[prompt, layer, d_model]``: v^l = h^l(with the
    image/context) − h^l(without), at the last token of each layer's output; ``values[layer]`` /
    ``per_prompt[prompt, layer]``: their norms."""

    vectors: Optional[Tensor] = None


@records
def steering_vectors(model, prompts, *, span=None, extras: Optional[dict] = None,
                     batch_size: Optional[int] = None) -> SteeringVectors:
    """Per-input VSVs (VISTA, ``obtain_vsv`` with one positive/negative pair): for each prompt and
    layer, the difference of the layer's output (``hook_resid_post``) at the last token with the
    image (or context ``span``) and with it removed: v, the paper's vector.

    The released code does not return exactly v for one pair: ``obtain_vsv`` fits a rank-1 PCA
    (``myutils.PCA``) to the pair's difference flattened over layers and returns
    ``components_ + mean_``. Centring a single row leaves a zero matrix, whose SVD on the CPU gives
    the unit vector e₀ as the component, so the code's vector is v + e₀ (+1 in dimension 0 of the
    first layer's vector). mechlib follows the paper (v); the two differ by a unit bump, negligible
    when ‖v‖ ≫ 1."""
    from mechlib.tasks.contrast import ContrastSet, PromptBatch

    contrast = prompts if isinstance(prompts, ContrastSet) else None
    batch = PromptBatch.from_prompts(model, prompts, extras=extras)
    removed = batch.span_positions(model, span, contrast)
    wo = batch.without(model, removed, drop_extras=span == "image")
    names = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]

    def last_states(pb) -> Tensor:  # [b, layer, d] at each prompt's last token
        out = []
        for sub in pb.batches(batch_size):
            _, acts = hooks.run_with_cache(model, sub.tokens, names, extras=sub.extras)
            out.append(torch.stack([sub.at_last(acts[n]).float().cpu() for n in names], 1))
        return torch.cat(out)

    v = last_states(batch) - last_states(wo)
    norms = v.norm(dim=-1)
    return SteeringVectors(values=norms.mean(0), axis_names=("layer",), per_prompt=norms, vectors=v,
                           labels={"layer": [f"L{l}" for l in range(model.cfg.n_layers)]},
                           metadata=dict(method="vista_vsv", n_prompts=len(batch),
                                         span="image" if span == "image" else "context", title="‖VSV‖ per layer"))


VISTA_VARIANTS = ("paper", "code")


@contextmanager
def vista(
    model,
    vsv: SteeringVectors,
    *,
    lam: float = 0.17,
    variant: str = "paper",
    layers: Optional[Sequence[int]] = None,
) -> Iterator[dict[str, int]]:
    """VISTA's steering (Li et al. 2025, "The Hidden Life of Tokens"): every forward inside the block
    is steered, row by row, with that prompt's own vector.

    ==============  ================================  ===================================  ===================
    choice          paper                             released code (LzVv123456/VISTA)     mechlib
    ==============  ================================  ===================================  ===================
    vector          v^l = h^l(image) − h^l(no image),  ``obtain_vsv``: v + e₀ (rank-1 PCA    :func:`steering_vectors`:
                    last token, per input, each layer  of one centred pair is degenerate:  v, the paper's
                                                       a unit vector e₀ is added)
    edited state    layer output h (residual)          MLP output m                         ``variant``
    injection       h̃ = h + λv, rescaled to ‖h‖       m̃ = ‖m‖·norm(norm(m) + λ(1 +         ``"paper"`` / ``"code"``
                                                       max(0, cos(m, −v)))·norm(v))
    where           every layer, every position        every layer, every position          ``layers`` (default all)
    λ               0.17 LLaVA-1.5 (0.10 MiniGPT-4,    0.17 CHAIR, 0.01 POPE, 0.1 MMHal     ``lam=0.17``
                    0.12 Shikra, 0.01 POPE)
    ==============  ================================  ===================================  ===================

    The paper's edit preserves each token's norm (tested); λ is not transferable between variants.
    Forwards must have the prompts' batch (a multiple of it, copy-major).
    """
    if variant not in VISTA_VARIANTS:
        raise ValueError(f"variant={variant!r}: choose 'paper' (residual, norm-preserving) or 'code' (MLP output)")
    if vsv.vectors is None:
        raise ValueError("vsv has no vectors: build it with steering_vectors(model, prompts, span=...)")
    P, L, d = vsv.vectors.shape
    if L != model.cfg.n_layers or d != model.cfg.d_model:
        raise ValueError(f"the vectors are [{P}, {L}, {d}] but this model has {model.cfg.n_layers} layers, d_model "
                         f"{model.cfg.d_model}: they were made on another model")
    layers = list(range(L)) if layers is None else [check_layer(model, l) for l in layers]
    V = vsv.vectors

    def rows(x, layer):
        if x.shape[0] % P:
            raise ValueError(f"the vectors were made for {P} prompts; this forward has batch {x.shape[0]}")
        return V[:, layer].repeat(x.shape[0] // P, 1).to(x.device, torch.float32)[:, None, :]  # [b, 1, d]

    def paper(h, hook, layer):
        v = rows(h, layer)
        hf = h.float()
        steered = hf + lam * v
        out = steered * (hf.norm(dim=-1, keepdim=True) / steered.norm(dim=-1, keepdim=True).clamp(min=1e-12))
        return out.to(h.dtype)

    def code(m, hook, layer):
        v = rows(m, layer)
        mf = m.float()
        unit = lambda x: x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # noqa: E731
        cos = (unit(mf) * unit(-v)).sum(-1, keepdim=True)
        out = unit(unit(mf) + lam * (1 + cos.clamp(min=0)) * unit(v)) * mf.norm(dim=-1, keepdim=True)
        return out.to(m.dtype)

    site, fn = ("hook_resid_post", paper) if variant == "paper" else ("hook_mlp_out", code)
    hk = [(f"blocks.{l}.{site}", lambda x, hook, l=l: fn(x, hook, l)) for l in layers]
    with hooks.attach(model, hk, must_fire=False) as fired:
        yield fired
