"""Interventions that edit attention patterns (``hook_pattern``): ACT's calibration, VAR's
redistribution, and steering chosen heads onto given tokens (Merullo et al.'s repair)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.sites import check_layer

from mechlib.interventions._common import (_check_pattern_editable, _editing_patterns,
                                           _heads_by_layer, _move_mass)


ACT_VARIANTS = ("paper", "code")


def act_sinks(sub: Tensor, *, epsilon: float, min_queries: int = 1,
              sink_positions: Optional[Sequence[int]] = None, lengths: Optional[Tensor] = None,
              variant: str = "paper") -> Tensor:
    """ACT's sinks of patterns ``sub`` ``[b, h, q, k]`` → bool ``[b, h, k]``: keys whose α_k (mean
    attention from the real queries ``t ≥ k``, ``t = k`` included) exceeds ``epsilon`` — an absolute
    rule, so late keys (the answer row's own key among them) can be sinks — with at least
    ``min_queries`` such queries; or the fixed ``sink_positions``. The initial sink is excluded:
    position 0 (``variant="paper"``), or the *first flagged* key (``variant="code"``, the authors'
    ``indices[1:]``; the same when position 0 is flagged). ``lengths`` ``[b]`` (right padding)
    keeps padding queries and keys out."""
    if variant not in ACT_VARIANTS:
        raise ValueError(f"variant={variant!r}: choose 'paper' or 'code'")
    b, h, Q, K = sub.shape
    if sink_positions is not None:
        sink = torch.zeros(K, dtype=torch.bool, device=sub.device)
        sink[list(sink_positions)] = True
        return sink.expand(b, h, K)
    t = torch.arange(Q, device=sub.device)
    n_real = torch.full((b,), Q, device=sub.device) if lengths is None else lengths.to(sub.device)
    valid = (t[None, :, None] >= t[None, None, :K]) & (t[None, :, None] < n_real[:, None, None])  # [b, q, k]
    n = valid.sum(1)  # [b, k] queries per key (0 on padding keys)
    alpha = (sub * valid[:, None].to(sub.dtype)).sum(-2) / n.clamp(min=1)[:, None]  # [b, h, k]
    sink = (alpha > epsilon) & (n[:, None] >= max(min_queries, 1))
    if variant == "paper":
        sink[..., 0] = False
    else:
        first = sink.int().argmax(-1, keepdim=True)  # the first flagged key (0 when none is flagged)
        sink = sink.scatter(-1, first, False)
    return sink


def act_calibrate(sub: Tensor, sink: Tensor, beta: float) -> Tensor:
    """Scale the attention on ``sink`` keys (``[b, h, k]``) by ``beta`` in every query row and give
    the removed mass to the other keys of each row, proportionally to their attention (the first
    token included). Row 0 keeps its single key, as the authors reset it."""
    sink = sink[..., None, :]  # broadcast over queries
    out = _move_mass(sub, sub * sink * (1 - beta), ~sink)
    out[..., 0, :] = sub[..., 0, :]
    return out


@contextmanager
def calibrate_attention(
    model,
    heads: Sequence[tuple[int, int]],
    *,
    beta: float = 0.4,
    epsilon: float = 0.1,
    sink_positions: Optional[Sequence[int]] = None,
    min_queries: int = 1,
    variant: str = "paper",
    lengths: Optional[Tensor] = None,
) -> Iterator[dict[str, int]]:
    """ACT (Yu et al. 2024): in each chosen head, multiply the attention on the sink tokens found
    in this input by ``beta`` and give the removed mass to the remaining tokens (the first token
    included), proportionally to their attention.

    ====================  ================================  ==============================  ================
    choice                paper                             released code (GATECH-EIC/ACT)  mechlib default
    ====================  ================================  ==============================  ================
    sink rule             α_k > ε, α_k = mean attention     same (column sum / (T − k))      same
                          from queries t ≥ k (t = k in)
    ε, β                  0.1 (calibration.sh), 0.4         0.1, 0.4                         0.1, 0.4
    initial sink          excluded (the first token)        ``indices[1:]``: the first       ``variant=
                                                            flagged key is dropped           "paper"|"code"``
    late keys             flagged (≥ 1 query)               flagged                          ``min_queries=1``
    where mass goes       non-sink keys incl. the first     same                             same
    ====================  ================================  ==============================  ================

    ``min_queries`` > 1 is mechlib's optional guard (α_k of the last few keys rests on one or two
    queries); ``sink_positions`` fixes the sinks instead. Pass the prompts' ``lengths`` for
    right-padded batches so padding rows do not count as queries.
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if variant not in ACT_VARIANTS:
        raise ValueError(f"variant={variant!r}: choose 'paper' or 'code'")
    by_layer = _heads_by_layer(model, heads)
    _check_pattern_editable(model, list(by_layer))

    def edit(A, hook, hs):
        A = A.clone()
        sub = A[:, hs]  # [b, h, q, k]
        if lengths is not None and A.shape[0] % len(lengths):
            raise ValueError(f"lengths has {len(lengths)} entries; this forward has batch {A.shape[0]}")
        lens = None if lengths is None else lengths.repeat(A.shape[0] // len(lengths))
        sink = act_sinks(sub, epsilon=epsilon, min_queries=min_queries, sink_positions=sink_positions, lengths=lens,
                         variant=variant)
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
