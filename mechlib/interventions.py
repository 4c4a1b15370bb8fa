"""Interventions the papers propose, as context managers that restore the model on exit.

* :func:`ablate_massive` — Sun et al.: set massive activations (given dims at given positions) to
  zero or to their mean, in the residual stream.
* :func:`calibrate_attention` — ACT (Yu et al. 2024): in chosen heads, scale down the attention
  on non-initial sink tokens (found per input: α_k > ε) and give the removed mass to the other
  tokens, proportionally to their attention.
* :func:`scale_heads` — VHR (vision-aware head reinforcement) and head ablation: multiply chosen
  heads' outputs (``hook_z``) by a factor.
* :func:`steer_attention` — the circuit-repair intervention of Merullo et al. (2024): make chosen
  heads attend, at the answer position, to given tokens (e.g. the wrong colour options, as IOI's
  S-inhibition heads attend to the repeated name).
* :func:`steer_residual` — VISTA's steering vector (activation addition in the residual stream).
* :func:`redistribute_attention` — VAR (Kang et al. 2025): in chosen heads, move a share ``p`` of
  the attention on sink tokens to the non-sink tokens of a span (the image; a context passage in
  the text analogue), proportionally to their attention.

Attention edits go through ``hook_pattern``, which only changes the output on bridges that
re-implement attention (Llama/GPT-2-style ``PositionEmbeddingsAttentionBridge`` /
``JointQKVAttentionBridge``); on HF-delegating bridges the edit would be silently dropped, so
these raise :class:`UnsupportedBridgeError` instead.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.sites import check_head, check_layer

_REIMPLEMENTED = ("PositionEmbeddingsAttentionBridge", "JointQKVAttentionBridge")


class UnsupportedBridgeError(TypeError):
    """The bridge delegates attention to HF code, so pattern edits would not reach the output."""


def _check_pattern_editable(model, layers: Sequence[int]) -> None:
    for l in layers:
        kind = type(model.blocks[l].attn).__name__
        if kind not in _REIMPLEMENTED:
            raise UnsupportedBridgeError(
                f"layer {l} uses {kind}, which runs HF's attention and fires hook_pattern after the "
                f"fact: an attention edit would be silently discarded. Supported: {_REIMPLEMENTED}")


def _heads_by_layer(model, heads: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    if not heads:
        raise ValueError("heads is empty: give (layer, head) pairs")
    for l, h in heads:
        out.setdefault(check_layer(model, l), []).append(check_head(model, "head_out", h))
    return out


@contextmanager
def _editing_patterns(model, by_layer: dict[int, list[int]], edit) -> Iterator[dict[str, int]]:
    """Attach ``edit(pattern, hook, heads)`` at each layer's ``hook_pattern`` for its heads."""
    hk = [(f"blocks.{l}.attn.hook_pattern", lambda A, hook, hs=hs: edit(A, hook, hs))
          for l, hs in by_layer.items()]
    with hooks.attach(model, hk, must_fire=False) as fired:
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


@contextmanager
def calibrate_attention(
    model,
    heads: Sequence[tuple[int, int]],
    *,
    beta: float = 0.4,
    epsilon: float = 0.3,
    sink_positions: Optional[Sequence[int]] = None,
    min_queries: int = 4,
) -> Iterator[dict[str, int]]:
    """ACT: in each chosen head, multiply the attention on non-initial sink tokens by ``beta`` and
    give the removed mass to the remaining tokens (the first token included), proportionally.

    Sinks are found per input and head, as in ACT's input-adaptive calibration: key positions
    ``k ≥ 1`` with α_k (mean attention from queries ``t ≥ k``) above ``epsilon`` and at least
    ``min_queries`` queries after them; or fixed ``sink_positions``.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    by_layer = _heads_by_layer(model, heads)
    _check_pattern_editable(model, list(by_layer))

    def edit(A, hook, hs):
        A = A.clone()
        sub = A[:, hs]  # [b, h, q, k]
        Q = sub.shape[-2]
        if sink_positions is not None:
            sink = torch.zeros(Q, dtype=torch.bool, device=A.device)
            sink[list(sink_positions)] = True
            sink = sink.expand(*sub.shape[:2], Q)
        else:
            t = torch.arange(Q, device=A.device)
            valid = (t[:, None] >= t[None, :]).to(sub.dtype)  # [q, k]
            n = valid.sum(0).clamp(min=1)
            alpha = (sub * valid).sum(-2) / n  # [b, h, k]
            sink = (alpha > epsilon) & (n >= min_queries)
            sink[..., 0] = False
        sink = sink[..., None, :]  # broadcast over queries
        take = sub * sink * (1 - beta)
        A[:, hs] = _move_mass(sub, take, ~sink)
        return A

    with _editing_patterns(model, by_layer, edit) as fired:
        yield fired


@contextmanager
def redistribute_attention(
    model,
    heads: Sequence[tuple[int, int]],
    *,
    span: tuple[int, int],
    sink_positions: Sequence[int],
    p: float = 0.6,
    queries: Optional[tuple[int, int]] = None,
) -> Iterator[dict[str, int]]:
    """VAR: in each chosen head, take a share ``p`` of the attention on ``sink_positions`` and give
    it to the non-sink positions inside ``span = (start, end)`` (end exclusive), proportionally to
    their attention. ``queries`` restricts the edit to query rows ``[start, end)`` (default all).
    """
    if not 0 <= p <= 1:
        raise ValueError(f"p={p} must be in [0, 1]")
    start, end = span
    if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end <= start:
        raise ValueError(f"span={span} must be (start, end) with 0 <= start < end")
    if not sink_positions:
        raise ValueError("sink_positions is empty")
    by_layer = _heads_by_layer(model, heads)
    _check_pattern_editable(model, list(by_layer))

    def edit(A, hook, hs):
        K = A.shape[-1]
        if end > K or max(sink_positions) >= K:
            raise IndexError(f"span {span} / sink positions {list(sink_positions)} exceed the "
                             f"{K} tokens of this input")
        A = A.clone()
        sub = A[:, hs]
        sink = torch.zeros(K, dtype=torch.bool, device=A.device)
        sink[list(sink_positions)] = True
        rec = torch.zeros(K, dtype=torch.bool, device=A.device)
        rec[start:end] = True
        rec &= ~sink
        take = sub * sink * p
        new = _move_mass(sub, take, rec)
        if queries is not None:
            rows = torch.zeros(A.shape[-2], dtype=torch.bool, device=A.device)
            rows[queries[0]:queries[1]] = True
            new = torch.where(rows[:, None], new, sub)
        A[:, hs] = new
        return A

    with _editing_patterns(model, by_layer, edit) as fired:
        yield fired


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
def ablate_sink_values(
    model, *, positions: Sequence[int] = (0,), layers: Optional[Sequence[int]] = None
) -> Iterator[dict[str, int]]:
    """Zero the value vectors of the sink tokens (``hook_v`` at ``positions``) in ``layers``.

    The attention pattern is untouched, so heads keep attending to the sink but receive nothing
    from it: Gu et al.'s test of "the sink is a key bias, not information".
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else [check_layer(model, l) for l in layers]
    pos = list(positions)
    if not pos:
        raise ValueError("positions is empty")

    def edit(v, hook):
        if max(pos) >= v.shape[1]:
            raise IndexError(f"sink positions {pos} exceed the {v.shape[1]} tokens of this input")
        v = v.clone()
        v[:, pos] = 0.0
        return v

    hk = [(f"blocks.{l}.attn.hook_v", edit) for l in layers]
    with hooks.attach(model, hk, must_fire=False) as fired:
        yield fired


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
    pos = slice(None) if positions is None else list(positions)

    def edit(z, hook, hs):
        z = z.clone()
        sub = z[:, pos]
        sub[:, :, hs] = sub[:, :, hs] * alpha
        z[:, pos] = sub
        return z

    hk = [(f"blocks.{l}.attn.hook_z", lambda z, hook, hs=hs: edit(z, hook, hs)) for l, hs in by_layer.items()]
    with hooks.attach(model, hk, must_fire=False) as fired:
        yield fired


@contextmanager
def steer_attention(
    model,
    heads: Sequence[tuple[int, int]],
    keys: Tensor,
    *,
    query_pos: Tensor,
    weight: float = 1.0,
) -> Iterator[dict[str, int]]:
    """At each prompt's ``query_pos``, move a share ``weight`` of the chosen heads' attention onto
    the key positions in ``keys`` (spread evenly over them); the rest keeps its pattern.

    Args:
        keys: ``[batch, pos]`` bool mask of the key positions to attend to, per prompt.
        query_pos: ``[batch]`` the query position edited in each prompt (e.g. ``contrast.last_pos``).
        weight: 1.0 replaces the attention row; 0 changes nothing.

    Forwards must have the same batch as ``keys`` (a multiple of it, for stacked copies).
    """
    if not 0 <= weight <= 1:
        raise ValueError(f"weight={weight} must be in [0, 1]")
    if keys.ndim != 2 or keys.dtype != torch.bool:
        raise ValueError(f"keys must be a [batch, pos] bool mask, got {keys.dtype} {tuple(keys.shape)}")
    if query_pos.shape != (keys.shape[0],):
        raise ValueError(f"query_pos has shape {tuple(query_pos.shape)}; need [{keys.shape[0]}] (one per prompt)")
    empty = (~keys.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"keys selects no position for prompt(s) {empty}")
    bad = [i for i in range(len(query_pos)) if not keys[i, int(query_pos[i]) + 1:].logical_not().all()]
    if bad:
        raise ValueError(f"prompt(s) {bad}: keys after the query position cannot be attended (causal mask)")
    by_layer = _heads_by_layer(model, heads)
    _check_pattern_editable(model, list(by_layer))

    def edit(A, hook, hs):
        b, _, Q, K = A.shape
        if b % keys.shape[0] or (K < keys.shape[1] and keys[:, K:].any()):
            raise ValueError(f"steer_attention was set up for {keys.shape[0]} prompts of "
                             f"{keys.shape[1]} tokens; this forward has batch {b}, {K} tokens")
        m = keys[:, :K].to(A.device).repeat(b // keys.shape[0], 1).to(A.dtype)  # [b, K]
        if K > keys.shape[1]:
            m = torch.nn.functional.pad(m, (0, K - keys.shape[1]))
        target = m / m.sum(-1, keepdim=True)
        rows = torch.arange(b, device=A.device)
        qp = query_pos.to(A.device).repeat(b // keys.shape[0])
        A = A.clone()
        for h in hs:
            A[rows, h, qp] = (1 - weight) * A[rows, h, qp] + weight * target
        return A

    with _editing_patterns(model, by_layer, edit) as fired:
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
