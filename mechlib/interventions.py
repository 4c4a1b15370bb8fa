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
* :func:`position_invariant` — PINE (Wang et al. 2024): bidirectional attention between segments
  (options, documents) and each segment's position set by attention importance, not input order.

Attention edits go through ``hook_pattern``, which only changes the output on bridges that
re-implement attention (Llama/GPT-2-style ``PositionEmbeddingsAttentionBridge`` /
``JointQKVAttentionBridge``); on HF-delegating bridges the edit would be silently dropped, so
these raise :class:`UnsupportedBridgeError` instead.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib import hooks
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


def act_sinks(sub: Tensor, *, epsilon: float, min_queries: int = 4,
              sink_positions: Optional[Sequence[int]] = None, lengths: Optional[Tensor] = None) -> Tensor:
    """ACT's non-initial sinks of patterns ``sub`` ``[b, h, q, k]`` → bool ``[b, h, k]``: keys
    ``k ≥ 1`` whose α_k (mean attention from the real queries ``t ≥ k``) exceeds ``epsilon``, with
    at least ``min_queries`` such queries; or the fixed ``sink_positions``. ``lengths`` ``[b]``
    (right padding) keeps padding queries and keys out."""
    b, h, Q, K = sub.shape
    if sink_positions is not None:
        sink = torch.zeros(K, dtype=torch.bool, device=sub.device)
        sink[list(sink_positions)] = True
        return sink.expand(b, h, K)
    t = torch.arange(Q, device=sub.device)
    n_real = torch.full((b,), Q, device=sub.device) if lengths is None else lengths.to(sub.device)
    valid = (t[None, :, None] >= t[None, None, :K]) & (t[None, :, None] < n_real[:, None, None])  # [b, q, k]
    n = valid.sum(1).clamp(min=1)  # [b, k] queries per key
    alpha = (sub * valid[:, None].to(sub.dtype)).sum(-2) / n[:, None]  # [b, h, k]
    sink = (alpha > epsilon) & (n[:, None] >= min_queries)
    sink[..., 0] = False
    return sink


def act_calibrate(sub: Tensor, sink: Tensor, beta: float) -> Tensor:
    """Scale the attention on ``sink`` keys (``[b, h, k]``) by ``beta`` and give the removed mass
    to the other keys of each row, proportionally to their attention."""
    sink = sink[..., None, :]  # broadcast over queries
    return _move_mass(sub, sub * sink * (1 - beta), ~sink)


@contextmanager
def calibrate_attention(
    model,
    heads: Sequence[tuple[int, int]],
    *,
    beta: float = 0.4,
    epsilon: float = 0.1,
    sink_positions: Optional[Sequence[int]] = None,
    min_queries: int = 4,
    lengths: Optional[Tensor] = None,
) -> Iterator[dict[str, int]]:
    """ACT: in each chosen head, multiply the attention on non-initial sink tokens by ``beta`` and
    give the removed mass to the remaining tokens (the first token included), proportionally.

    Sinks are found per input and head, as in ACT's input-adaptive calibration: key positions
    ``k ≥ 1`` with α_k (mean attention from queries ``t ≥ k``) above ``epsilon`` and at least
    ``min_queries`` queries after them; or fixed ``sink_positions``. The defaults β = 0.4 and
    ε = 0.1 are those of the authors' calibration script (GATECH-EIC/ACT, ``scripts/calibration.sh``);
    ``min_queries`` is ours: α_k of the last few keys rests on one or two queries. Pass the
    prompts' ``lengths`` for right-padded batches so padding rows do not count as queries.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    by_layer = _heads_by_layer(model, heads)
    _check_pattern_editable(model, list(by_layer))

    def edit(A, hook, hs):
        A = A.clone()
        sub = A[:, hs]  # [b, h, q, k]
        if lengths is not None and A.shape[0] % len(lengths):
            raise ValueError(f"lengths has {len(lengths)} entries; this forward has batch {A.shape[0]}")
        lens = None if lengths is None else lengths.repeat(A.shape[0] // len(lengths))
        sink = act_sinks(sub, epsilon=epsilon, min_queries=min_queries, sink_positions=sink_positions, lengths=lens)
        A[:, hs] = act_calibrate(sub, sink, beta)
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


# --- PINE: position-invariant inference ----------------------------------------------------------


def rope_frequencies(cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary frequencies ``[rotary_dim / 2]`` of one layer, read off the cos/sin it applied
    (``[..., T, rotary_dim]``, rotate-half layout, positions ``0..T-1``): the angle at position 1.
    Works for any RoPE whose angle is linear in position — per-layer bases (Gemma 2/3 local and
    global layers), partial rotary (Pythia), frequency scaling (Llama 3, linear, YaRN's attention
    factor cancels in the angle) — and is checked at every position."""
    cos, sin = cos.reshape(-1, *cos.shape[-2:])[0].double(), sin.reshape(-1, *sin.shape[-2:])[0].double()
    T, rd = cos.shape
    if T < 2 or rd % 2:
        raise UnsupportedBridgeError(f"cannot read rotary frequencies from cos/sin of shape {tuple(cos.shape)}")
    half = rd // 2
    freq = torch.atan2(sin[1, :half], cos[1, :half])
    scale = cos[0, :half]
    angles = torch.arange(T, dtype=torch.float64)[:, None] * freq
    ok = (torch.allclose(cos[:, :half], scale * torch.cos(angles), atol=1e-4)
          and torch.allclose(sin[:, :half], scale * torch.sin(angles), atol=1e-4)
          and torch.allclose(cos[:, half:], cos[:, :half], atol=1e-6))
    if not ok:
        raise UnsupportedBridgeError("this model's rotary embedding is not rotate-half with angles linear in "
                                     "position (e.g. interleaved pairs or position-dependent scaling): "
                                     "position_invariant cannot re-position its keys")
    return freq.float()


def _rope_scores(qr: Tensor, kr: Tensor, shift: Tensor, inv_freq: Tensor) -> Tensor:
    """``score[h, i, j] = qr_i · R(shift[h, i, j]) kr_j`` for queries/keys already rotated at their
    standard positions (``[T, H, D]``); ``shift`` (integer, broadcastable to ``[H, T, T]``) is the
    change of the key's position relative to the query's. ``shift = 0`` gives the model's scores;
    ``shift = i - j`` gives the scores without position (un-rotated q·k). Only the first
    ``2 * len(inv_freq)`` dims rotate (partial rotary); the rest are position-free."""
    rd = 2 * inv_freq.numel()
    ang = shift.to(inv_freq.dtype)[..., None] * inv_freq  # [H, T, T, rd/2]
    cos, sin = torch.cos(ang).repeat(1, 1, 1, 2), torch.sin(ang).repeat(1, 1, 1, 2)
    kr_r, kr_p = kr[..., :rd], kr[..., rd:]
    half = rd // 2
    k_rh = torch.cat([-kr_r[..., half:], kr_r[..., :half]], dim=-1)  # rotate_half
    q = qr.permute(1, 0, 2)  # [H, T, D]
    rot = (q[..., :rd][:, :, None, :] * (kr_r.permute(1, 0, 2)[:, None] * cos + k_rh.permute(1, 0, 2)[:, None] * sin)).sum(-1)
    if kr_p.shape[-1] == 0:
        return rot
    return rot + q[..., rd:] @ kr_p.permute(1, 2, 0)


def _cap_and_mask(scores: Tensor, qpos: Tensor, kpos: Tensor, softcap: Optional[float], window: Optional[int]) -> Tensor:
    """The model's score post-processing: Gemma 2's tanh cap, then causal (and sliding-window) masking
    by positions (``qpos``/``kpos`` broadcastable to the scores)."""
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    hidden = kpos > qpos
    if window is not None:
        hidden = hidden | (qpos - kpos >= window)
    return scores.masked_fill(hidden, float("-inf"))


def _order_shift(importance: Tensor, lens: Tensor) -> Tensor:
    """``importance[..., n]`` → ``shift[..., n]``: docs sorted by importance (descending, stable);
    each doc moves back by the total length of the docs ranked before it."""
    order = torch.argsort(importance, dim=-1, descending=True, stable=True)
    before = torch.cumsum(lens[order], -1) - lens[order]
    return torch.empty_like(before).scatter_(-1, order, before)


def _pine_pattern(qr: Tensor, kr: Tensor, spans: Sequence[tuple[int, int]], scale: float,
                  inv_freq: Tensor, softcap: Optional[float] = None, window: Optional[int] = None) -> Tensor:
    """One prompt's attention pattern ``[H, T, T]`` under PINE (see :func:`position_invariant`)."""
    T, H, _ = qr.shape
    dev = qr.device
    s0, e = spans[0][0], spans[-1][1]
    lens = torch.tensor([b - a for a, b in spans], device=dev)
    pos = torch.arange(T, device=dev)
    doc = torch.full((T,), -1, dtype=torch.long, device=dev)
    base = pos.clone()  # each doc as if it were the last one before the suffix
    for m, (a, b) in enumerate(spans):
        doc[a:b] = m
        base[a:b] = e - (b - a) + torch.arange(b - a, device=dev)
    in_doc = doc >= 0
    # importance without position: softmax of q·k/√d over the docs' keys, mean per doc
    plain = _rope_scores(qr, kr[s0:e], (pos[:, None] - pos[None, s0:e]).expand(H, T, e - s0), inv_freq) * scale
    if softcap:
        plain = softcap * torch.tanh(plain / softcap)
    own = (doc[:, None] == doc[None, s0:e]) & in_doc[:, None]  # a doc query ignores its own doc
    w = torch.softmax(plain.masked_fill(own, float("-inf")), -1).nan_to_num(0.0)
    onehot = torch.nn.functional.one_hot(doc[s0:e], len(spans)).to(w.dtype)  # [e-s0, n]
    per_doc = (w @ onehot) / lens.to(w.dtype)  # [H, T, n]
    doc2doc = torch.stack([per_doc[:, a:b].sum(1) for a, b in spans], 1)  # [H, n, n]
    doc2doc = doc2doc + torch.diag(torch.full((len(spans),), float("inf"), device=dev))
    shift_rows = torch.zeros(H, T, len(spans), dtype=torch.long, device=dev)
    shift_rows[:, e:] = _order_shift(per_doc[:, e:], lens)
    shift_rows[:, in_doc] = _order_shift(doc2doc, lens)[:, doc[in_doc]]
    # key positions as seen from each query; queries sit at their base positions
    kpos = pos.expand(H, T, T).clone()
    d_shift = torch.gather(shift_rows, 2, doc.clamp(min=0)[None, None, :].expand(H, T, T))
    kpos = torch.where(in_doc[None, None, :], base[None, None, :] - d_shift, kpos)
    qpos = base[None, :, None]
    scores = _rope_scores(qr, kr, (pos[:, None] - pos[None, :]) + (kpos - qpos), inv_freq) * scale
    return torch.softmax(_cap_and_mask(scores, qpos, kpos, softcap, window), -1)


def _check_spans(spans, T: int, where: str) -> tuple[tuple[int, int], ...]:
    spans = tuple((int(a), int(b)) for a, b in spans)
    if not spans:
        raise ValueError(f"{where}: no segments; give at least one (start, end) span")
    for (a, b), nxt in zip(spans, spans[1:] + ((spans[-1][1], None),)):
        if not 1 <= a < b <= T:
            raise ValueError(f"{where}: segment ({a}, {b}) is out of range for {T} tokens "
                             "(need 1 <= start < end <= length; position 0 is BOS)")
        if nxt[0] != b:
            raise ValueError(f"{where}: segments {list(spans)} must be contiguous and in order "
                             "(each starts where the previous ends); put separators inside segments")
    return spans


@contextmanager
def position_invariant(
    model,
    segments,
    *,
    layers: Optional[Sequence[int]] = None,
) -> Iterator[dict[str, int]]:
    """PINE (Wang et al. 2024, "Eliminating Position Bias of Language Models: A Mechanistic
    Approach"): forwards inside the block treat the segments (options, documents) as unordered.

    In every head of the chosen layers (default all), following the paper's public code:

    * bidirectional attention between segments: a segment's tokens see all other segments (causal
      inside their own segment); the prefix and the suffix keep causal attention;
    * positions from importance, not input order: each query ranks the segments by its attention
      to them computed *without* position (q·k of un-rotated states, softmax over the segments'
      tokens, mean per segment; a segment's tokens rank the others by their summed attention and
      place themselves last), then lays them out before itself, most important closest. RoPE is
      re-applied with those positions.

    Hence swapping whole segments in the input leaves the output unchanged (up to float error and
    exact ties), and a single segment changes nothing.

    Args:
        segments: the ``(start, end)`` token spans (end exclusive) of the segments, contiguous and
            in input order: one list shared by the batch, one list per prompt, or a
            :class:`~mechlib.tasks.segments.SegmentedPrompts` (its ``segments``).
        layers: layers to edit (default all).

    Yields ``{hook name: times fired}``. Works on bridges that re-implement rotate-half RoPE
    attention (Llama, Qwen2, Mistral, SmolLM); otherwise :class:`UnsupportedBridgeError`.
    The cost is ``O(T² · d_head)`` per head and prompt on top of the forward.
    """
    from mechlib.arch import describe
    from mechlib.tasks.segments import SegmentedPrompts

    if isinstance(segments, SegmentedPrompts):
        segments = segments.segments
    segments = list(segments)
    if not segments:
        raise ValueError("segments is empty: give (start, end) spans")
    per_prompt = not isinstance(segments[0][0], (numbers.Integral, Tensor))
    layers = list(range(model.cfg.n_layers)) if layers is None else [check_layer(model, l) for l in layers]
    _check_pattern_editable(model, layers)
    arch = describe(model)
    if not arch.rotary:
        raise UnsupportedBridgeError(
            f"position_invariant re-positions keys by re-applying rotary embeddings; this model "
            f"({arch.family}) has positional_embedding_type={getattr(model.cfg, 'positional_embedding_type', None)!r}")
    if getattr(model.cfg, "rotary_adjacent_pairs", False) or getattr(model.cfg, "rotary_interleaved_cos_sin", False):
        raise UnsupportedBridgeError("position_invariant supports rotate-half RoPE, not adjacent-pair RoPE")
    own_rot = hasattr(model.blocks[layers[0]].attn, "hook_rot_q") and arch.attention_bridge == "PositionEmbeddingsAttentionBridge"
    store: dict[str, Tensor] = {}
    checked: set[int] = set()

    def keep(x, hook, key):
        store[key] = x
        return x

    def rotated(layer: int, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Queries and keys after RoPE, ``[b, T, heads, D]``."""
        if own_rot:
            return store.pop(f"q{layer}"), store.pop(f"k{layer}")
        q, k = store.pop(f"q{layer}"), store.pop(f"k{layer}")  # hook_q/hook_k: before RoPE
        rd = cos.shape[-1]
        c, s_ = cos.reshape(-1, *cos.shape[-2:])[:, :, None, :], sin.reshape(-1, *sin.shape[-2:])[:, :, None, :]

        def rot(x):
            xr, xp = x[..., :rd], x[..., rd:]
            rh = torch.cat([-xr[..., rd // 2:], xr[..., :rd // 2]], dim=-1)
            return torch.cat([xr * c + rh * s_, xp], dim=-1)

        return rot(q), rot(k)

    def edit(A, hook, layer):
        b, H, T, _ = A.shape
        cos, sin = store.pop(f"cos{layer}"), store.pop(f"sin{layer}")
        qr, kr = rotated(layer, cos, sin)
        kr = kr.repeat_interleave(H // kr.shape[2], dim=2)
        if per_prompt and len(segments) != b:
            raise ValueError(f"position_invariant got segments for {len(segments)} prompts; "
                             f"this forward has batch {b}")
        f = rope_frequencies(cos, sin).to(A.device)
        scale = float(getattr(model.blocks[layer].attn.original_component, "scaling", None) or model.cfg.d_head ** -0.5)
        cap, window = arch.attn_softcap, arch.windows[layer]
        if layer not in checked:  # prove the reconstruction is this model's attention before editing it
            pos = torch.arange(T, device=A.device)
            ref = torch.softmax(_cap_and_mask(_rope_scores(qr[0].float(), kr[0].float(), torch.zeros(1, 1, 1, dtype=torch.long,
                                                                                               device=A.device), f) * scale,
                                              pos[:, None], pos[None, :], cap, window), -1)
            err = float((ref - A[0].detach().float()).abs().max())
            if not err < 1e-4:
                raise UnsupportedBridgeError(
                    f"position_invariant could not reproduce layer {layer}'s attention from its rotated queries and "
                    f"keys ({arch.family}, {arch.attention_bridge}; max error {err:.2g}): editing it would be wrong")
            checked.add(layer)
        A = A.clone()
        for i in range(b):
            spans = _check_spans(segments[i] if per_prompt else segments, T, f"prompt {i}")
            A[i] = _pine_pattern(qr[i].float(), kr[i].float(), spans, scale, f, cap, window).to(A.dtype)
        return A

    qname, kname = ("hook_rot_q", "hook_rot_k") if own_rot else ("hook_q", "hook_k")
    hk = []
    for l in layers:
        hk += [(f"blocks.{l}.attn.{qname}", lambda x, hook, l=l: keep(x, hook, f"q{l}")),
               (f"blocks.{l}.attn.{kname}", lambda x, hook, l=l: keep(x, hook, f"k{l}")),
               (f"blocks.{l}.attn.hook_cos", lambda x, hook, l=l: keep(x, hook, f"cos{l}")),
               (f"blocks.{l}.attn.hook_sin", lambda x, hook, l=l: keep(x, hook, f"sin{l}")),
               (f"blocks.{l}.attn.hook_pattern", lambda A, hook, l=l: edit(A, hook, l))]
    try:
        with hooks.attach(model, hk, must_fire=False) as fired:
            yield fired
    finally:
        store.clear()
