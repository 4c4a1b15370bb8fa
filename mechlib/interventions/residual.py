"""Interventions that edit the residual stream: Sun et al.'s massive-activation ablation and
activation-addition steering (VISTA)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib import hooks, layout
from mechlib.interventions._common import _positions_mask
from mechlib.provenance import records
from mechlib.results import Result
from mechlib.sites import check_layer


def massive_positions(h: Tensor, dims: Sequence[int], lengths: Optional[Tensor] = None, *,
                      real: Optional[Tensor] = None) -> Tensor:
    """Sun et al.'s edited positions per input: ``[b, 2]`` = (the first token, the position of the
    largest |activation| in ``dims``), found in the residual ``h`` ``[b, pos, d]`` over real tokens
    (``lengths`` of right-padded prompts, or a ``real`` ``[b, pos]`` mask); when that largest entry
    is the first token the second column repeats it."""
    mag = h[..., list(dims)].abs().amax(-1)  # [b, pos]
    if real is None and lengths is not None:
        real = torch.arange(h.shape[1], device=h.device)[None] < lengths.to(h.device)[:, None]
    first = torch.zeros_like(mag[:, 0], dtype=torch.long)
    if real is not None:
        real = real.to(h.device)
        mag = mag.masked_fill(~real, -1.0)
        first = real.int().argmax(-1)  # the first real token (left padding)
    return torch.stack([first, mag.argmax(-1)], 1)


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
        v = layout.view(h.shape[0], q=h.shape[1], device=h.device)
        if positions == "paper":
            if v.generating:  # the prompt's tokens: in a cached step there are none (edited with the prompt)
                real = (v.qpos >= 0) & (v.qpos < v.prompt_len[:, None])
            elif lengths is not None:
                if h.shape[0] % len(lengths):
                    raise ValueError(f"lengths has {len(lengths)} entries; this forward has batch {h.shape[0]}")
                lens = lengths.repeat(h.shape[0] // len(lengths)).to(h.device)
                real = (v.qpos < lens[:, None])
            else:
                real = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
            ok = real.any(-1)  # rows with no prompt token here are left alone
            pos = massive_positions(h, dims, real=real)  # [b, 2]
            at = torch.stack([(torch.arange(h.shape[1], device=h.device)[None] == pos[:, k:k + 1]) & ok[:, None]
                              for k in range(2)])  # [2, b, pos]
        else:
            if not v.generating and max(positions) >= h.shape[1]:
                raise IndexError(f"positions {list(positions)} exceed the {h.shape[1]} tokens of this input")
            at = torch.stack([_positions_mask([p], v.qpos) for p in positions])  # [n, b, pos]
        for k in reversed(range(at.shape[0])):  # kind 0 (the first token) last, so it wins a tie
            row_fill = fill if fill.ndim == 1 else fill[k]
            sel = at[k]
            h[..., di] = torch.where(sel[..., None], row_fill.expand(*h.shape[:2], -1), h[..., di])
        return h

    hk = [(f"blocks.{l}.hook_resid_post", edit) for l in edit_layers]
    with layout.editing(model, "ablate_massive"), hooks.attach(model, hk, must_fire=False) as fired:
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

    def edit(x, hook, v):
        add = scale * v.to(x.device, x.dtype)
        if positions is None:
            return x + add
        at = _positions_mask(positions, layout.view(x.shape[0], q=x.shape[1], device=x.device).qpos)
        return x + at[..., None].to(x.dtype) * add

    hk = [(f"blocks.{l}.hook_resid_post", lambda x, hook, v=v: edit(x, hook, v)) for l, v in vectors.items()]
    with layout.editing(model, "steer_residual"), hooks.attach(model, hk, must_fire=False) as fired:
        yield fired


# --- VISTA: visual steering vector (Li et al., ICML 2025) ----------------------------------------


@dataclass(frozen=True, repr=False)
class SteeringVectors(Result):
    """VISTA's per-input steering vectors. ``vectors`` ``[prompt, layer, d_model]``: v^l = h^l(with the
    image/context) − h^l(without), at the last token of each layer's output; ``values[layer]`` /
    ``per_prompt[prompt, layer]``: their norms. ``prompt_tokens``/``prompt_lengths``: the prompts they
    were made for (generation checks it runs on them)."""

    vectors: Optional[Tensor] = None
    prompt_tokens: Optional[Tensor] = None
    prompt_lengths: Optional[Tensor] = None

    @property
    def prompts(self):
        return None if self.prompt_tokens is None else (self.prompt_tokens, self.prompt_lengths)


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
            acts = hooks.activations(model, sub.tokens, names, extras=sub.extras)
            out.append(torch.stack([sub.at_last(acts[n]).float().cpu() for n in names], 1))
        return torch.cat(out)

    v = last_states(batch) - last_states(wo)
    norms = v.norm(dim=-1)
    return SteeringVectors(values=norms.mean(0), axis_names=("layer",), per_prompt=norms, vectors=v,
                           prompt_tokens=batch.tokens.clone(), prompt_lengths=batch.lengths.clone(),
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
        v = layout.view(x.shape[0], q=x.shape[1], n_prompts=P, prompts=vsv.prompts, what="VISTA's vectors")
        return V[v.rows, layer].to(x.device, torch.float32)[:, None, :]  # [b, 1, d]

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
    with layout.editing(model, "vista"), hooks.attach(model, hk, must_fire=False) as fired:
        yield fired
