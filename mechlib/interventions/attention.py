"""Interventions that edit attention patterns (``hook_pattern``): ACT's calibration, VAR's
redistribution, and steering chosen heads onto given tokens (Merullo et al.'s repair)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from mechlib import hooks, layout
from mechlib.interventions._common import (
    _check_pattern_editable,
    _editing_patterns,
    _heads_by_layer,
    _move_mass,
    _positions_mask,
)
from mechlib.sites import check_layer

ACT_VARIANTS = ("paper", "code")


def act_sinks(sub: Tensor, *, epsilon: float, min_queries: int = 1,
              sink_positions: Optional[Sequence[int]] = None, lengths: Optional[Tensor] = None,
              variant: str = "paper", qpos: Optional[Tensor] = None, kpos: Optional[Tensor] = None) -> Tensor:
    """ACT's sinks of patterns ``sub`` ``[b, h, q, k]`` → bool ``[b, h, k]``: keys whose α_k (mean
    attention from the real queries ``t ≥ k``, ``t = k`` included) exceeds ``epsilon`` — an absolute
    rule, so late keys (the answer row's own key among them) can be sinks — with at least
    ``min_queries`` such queries; or the fixed ``sink_positions``. The initial sink is excluded:
    position 0 (``variant="paper"``), or the *first flagged* key (``variant="code"``, the authors'
    ``indices[1:]``; the same when position 0 is flagged). ``lengths`` ``[b]`` (right padding)
    keeps padding queries and keys out. ``qpos``/``kpos`` (``[b, q]``/``[b, k]``) are the prompt
    positions of the queries and keys (default ``0..``; negative on left padding, which never
    counts), from :func:`mechlib.layout.view`."""
    if variant not in ACT_VARIANTS:
        raise ValueError(f"variant={variant!r}: choose 'paper' or 'code'")
    b, h, Q, K = sub.shape
    dev = sub.device
    qpos = torch.arange(K - Q, K, device=dev).expand(b, Q) if qpos is None else qpos.to(dev)
    kpos = torch.arange(K, device=dev).expand(b, K) if kpos is None else kpos.to(dev)
    if sink_positions is not None:
        return _positions_mask(sink_positions, kpos)[:, None, :].expand(b, h, K)
    n_real = torch.full((b,), K, device=dev) if lengths is None else lengths.to(dev)
    valid = ((qpos[:, :, None] >= kpos[:, None, :]) & (qpos[:, :, None] < n_real[:, None, None])
             & (kpos[:, None, :] >= 0))  # [b, q, k]
    n = valid.sum(1)  # [b, k] queries per key (0 on padding keys)
    alpha = (sub * valid[:, None].to(sub.dtype)).sum(-2) / n.clamp(min=1)[:, None]  # [b, h, k]
    sink = (alpha > epsilon) & (n[:, None] >= max(min_queries, 1))
    if variant == "paper":
        sink &= (kpos != 0)[:, None, :]
    else:
        first = sink.int().argmax(-1, keepdim=True)  # the first flagged key (0 when none is flagged)
        sink = sink.scatter(-1, first, False)
    return sink


def act_calibrate(sub: Tensor, sink: Tensor, beta: float, *, keep_rows: Optional[Tensor] = None) -> Tensor:
    """Scale the attention on ``sink`` keys (``[b, h, k]``) by ``beta`` in every query row and give
    the removed mass to the other keys of each row, proportionally to their attention (the first
    token included). The first token's row keeps its single key, as the authors reset it
    (``keep_rows`` ``[b, q]``: the rows left as they are; default the first row)."""
    out = _move_mass(sub, sub * sink[..., None, :] * (1 - beta), ~sink[..., None, :])
    if keep_rows is None:
        out[..., 0, :] = sub[..., 0, :]
        return out
    return torch.where(keep_rows[:, None, :, None].to(sub.device), sub, out)


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
    generation            not defined (classification,      MT-Bench script: recomputed on   sinks found on the
                          multiple choice)                  each new row alone (α_k = that   prompt's rows at the
                                                            row's attention; its [0, 0] = 1  first step and kept;
                                                            reset hits the new row)          every new row is
                                                                                             calibrated with them
    ====================  ================================  ==============================  ================

    ``min_queries`` > 1 is mechlib's optional guard (α_k of the last few keys rests on one or two
    queries); ``sink_positions`` fixes the sinks instead. Pass the prompts' ``lengths`` for
    right-padded batches so padding rows do not count as queries. Inside :func:`mechlib.generate`
    the sinks come from the prompt (so decoding on a key/value cache equals recomputing the whole
    sequence: the prompt's calibrated rows are what the cache holds).
    """
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if variant not in ACT_VARIANTS:
        raise ValueError(f"variant={variant!r}: choose 'paper' or 'code'")
    by_layer = _heads_by_layer(model, heads)
    _check_pattern_editable(model, list(by_layer))

    state = object()  # this block's key in a generation's scratch space

    def edit(A, hook, hs, layer):
        b, _, Q, K = A.shape
        v = layout.view(b, q=Q, k=K, device=A.device)
        sub = A[:, hs]  # [b, h, q, k]
        if v.generating:  # sinks found on the prompt's rows (the first step) and kept for every new token
            d, key = v.decoding, (state, layer)
            if d.cached and d.step > 0:
                sink = torch.nn.functional.pad(d.state[key], (0, K - d.state[key].shape[-1]))
            else:
                sink = act_sinks(sub, epsilon=epsilon, min_queries=min_queries, sink_positions=sink_positions,
                                 lengths=v.prompt_len, variant=variant, qpos=v.qpos, kpos=v.kpos)
                d.state[key] = sink
        else:
            if lengths is not None and b % len(lengths):
                raise ValueError(f"lengths has {len(lengths)} entries; this forward has batch {b}")
            lens = None if lengths is None else lengths.repeat(b // len(lengths))
            sink = act_sinks(sub, epsilon=epsilon, min_queries=min_queries, sink_positions=sink_positions, lengths=lens,
                             variant=variant, qpos=v.qpos, kpos=v.kpos)
        A = A.clone()
        A[:, hs] = act_calibrate(sub, sink, beta, keep_rows=v.qpos == 0)
        return A

    with _editing_patterns(model, by_layer, edit, "calibrate_attention") as fired:
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
    variant: str = "paper",
) -> Iterator[dict[str, int]]:
    """VAR's redistribution with fixed heads and sinks (the static ablation of :func:`var`): in each
    chosen head, move a share of the attention on ``sink_positions`` to the non-sink positions
    inside ``span = (start, end)`` (end exclusive), proportionally to their attention — ``p`` with
    ``variant="paper"``, ``1 − p`` with ``"code"`` (the released code's semantics). ``queries``
    restricts the edit to query rows ``[start, end)`` (default all).

    ===============  ==================================  ===================================  ==================
    choice           paper (Kang et al. 2025)            released code (seilk/VisAttnSink)    mechlib (this
                                                                                              ablation)
    ===============  ==================================  ===================================  ==================
    heads            image-centric, per input and        ``HeadFork``: per (head, query),     fixed ``heads``
                     query (summ ≥ 0.2, sink share ≤ ρ)  every forward
    sink tokens      φ(x) ≥ τ = 20, per layer            ``DimProspector``, per layer from 2  fixed
                                                                                              ``sink_positions``
    receivers        the non-sink image tokens           same                                 non-sink tokens of
                                                                                              ``span``
    share moved      p = 0.6                             keeps p, moves 1 − p                 ``"paper"``: p;
                                                                                              ``"code"``: 1 − p
    rows             text queries after the image        same in prefill                      ``queries`` (default
                                                                                              all)
    ===============  ==================================  ===================================  ==================

    The paper's method is :func:`var`; this is its control with the heads and sinks held fixed.
    """
    if variant not in ("paper", "code"):
        raise ValueError(f"variant={variant!r}: choose 'paper' (p moved) or 'code' (1 - p moved)")
    if not 0 <= p <= 1:
        raise ValueError(f"p={p} must be in [0, 1]")
    start, end = span
    if not (isinstance(start, int) and isinstance(end, int)) or start < 0 or end <= start:
        raise ValueError(f"span={span} must be (start, end) with 0 <= start < end")
    if not sink_positions:
        raise ValueError("sink_positions is empty")
    by_layer = _heads_by_layer(model, heads)
    _check_pattern_editable(model, list(by_layer))

    share = p if variant == "paper" else 1 - p

    def edit(A, hook, hs, layer):
        b, _, Q, K = A.shape
        v = layout.view(b, q=Q, k=K, device=A.device)
        if not v.generating and (end > K or max(sink_positions) >= K):
            raise IndexError(f"span {span} / sink positions {list(sink_positions)} exceed the "
                             f"{K} tokens of this input")
        A = A.clone()
        sub = A[:, hs]
        sink = _positions_mask(sink_positions, v.kpos)  # [b, K]
        rec = (v.kpos >= start) & (v.kpos < end) & ~sink
        take = sub * sink[:, None, None, :] * share
        new = _move_mass(sub, take, rec[:, None, None, :])
        if queries is not None:
            rows = (v.qpos >= queries[0]) & (v.qpos < queries[1])  # [b, Q]
            new = torch.where(rows[:, None, :, None], new, sub)
        A[:, hs] = new
        return A

    with _editing_patterns(model, by_layer, edit, "redistribute_attention") as fired:
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

    P = keys.shape[0]

    def edit(A, hook, hs, layer):
        b, _, Q, K = A.shape
        v = layout.view(b, q=Q, k=K, n_prompts=P, device=A.device, what="steer_attention")
        if not v.generating and K < keys.shape[1] and keys[:, K:].any():
            raise ValueError(f"steer_attention was set up for {P} prompts of {keys.shape[1]} tokens; this "
                             f"forward has batch {b}, {K} tokens")
        qp = query_pos.to(A.device)[v.rows]
        if not v.generating and Q < K and bool((qp < K - Q).any()):  # a forward of positions K−Q.. only
            raise ValueError(f"steer_attention edits query position {int(qp.min())}, before the first position "
                             f"this forward recomputes ({K - Q}): evaluate from an earlier from_pos")
        m = v.gather(keys, v.kpos).to(A.dtype)  # [b, K]: the keys to attend to, per row
        target = m / m.sum(-1, keepdim=True).clamp(min=1e-12)
        at = (v.qpos == qp[:, None])[:, None, :, None]  # [b, 1, Q, 1]: the edited row
        A = A.clone()
        for h in hs:
            A[:, h] = torch.where(at[:, 0], (1 - weight) * A[:, h] + weight * target[:, None, :], A[:, h])
        return A

    with _editing_patterns(model, by_layer, edit, "steer_attention", suffix=True) as fired:
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

    def edit(x, hook):  # x [b, pos, kv_head, d_head]
        v = layout.view(x.shape[0], q=x.shape[1], device=x.device)
        if not v.generating and max(pos) >= x.shape[1]:
            raise IndexError(f"sink positions {pos} exceed the {x.shape[1]} tokens of this input")
        at = _positions_mask(pos, v.qpos)  # [b, pos]
        return x * (~at)[:, :, None, None].to(x.dtype)

    hk = [(f"blocks.{l}.attn.hook_v", edit) for l in layers]
    with layout.editing(model, "ablate_sink_values"), hooks.attach(model, hk, must_fire=False) as fired:
        yield fired


# --- VAR: visual attention redistribution (Kang et al., ICLR 2025) ------------------------------


def rms_sink_scores(h: Tensor, dims: Sequence[int]) -> Tensor:
    """VAR's sink score of every token ``[b, pos]``: max over ``dims`` of ``|h / rms(h)|`` (the block
    input, no norm weight, eps 1e-6, float32 — their ``DimProspector``)."""
    x = h.float()
    x = x * (x.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
    return x[..., list(dims)].abs().amax(-1)


@contextmanager
def var(
    model,
    prompts,
    *,
    dims: Sequence[int],
    span=None,
    tau: float = 20.0,
    rho: float = 0.5,
    summ: float = 0.2,
    p: float = 0.6,
    variant: str = "paper",
    layers: Optional[Sequence[int]] = None,
    extras: Optional[dict] = None,
) -> Iterator[dict]:
    """VAR (Kang et al. 2025, "See What You Are Told: Visual Attention Sink in Large Multimodal
    Models"), decided on the fly in every forward inside the block: in each layer, find the sink
    tokens (``max_{d ∈ dims} |RMSNorm(h)_d| > τ`` on the layer's input); in each head and query row
    after the image that attends to the image (Σ ≥ ``summ``) mostly outside the visual sinks
    (sink share ≤ ``rho``) — an image-centric row — move a share of the attention on all sink
    tokens (visual and text sinks, BOS included) to the non-sink image tokens, proportionally to
    their attention.

    ===============  ==================================  ===================================  ==================
    choice           paper                               released code (seilk/VisAttnSink)    mechlib
    ===============  ==================================  ===================================  ==================
    sink dims        the LLM's massive dims, hard-coded   ``[2533, 1415]`` (Llama-2-7B)        ``dims=`` (discover
                                                                                              them with
                                                                                              :func:`~mechlib.sink_dimensions`)
    sink tokens      φ(x) ≥ τ = 20, per layer            > 20, every layer from 2, per        per layer and
                                                         forward, in prefill only (generated  forward; in
                                                         tokens are never sinks)              ``generate``, found on
                                                                                              the prompt (a new
                                                                                              token never is one)
    heads            image-centric per head and query:   same, on the unedited attention     same
                     summ ≥ 0.2, sink share ≤ ρ = 0.5
    rows             text queries after the image         same in prefill; the new row when   rows after the image
                                                         decoding                             span
    p                the share **moved** (p = 0.6)        keeps p, moves 1 − p (0.4)           ``variant="paper"``
                                                                                              moves p; ``"code"``
                                                                                              moves 1 − p
    layers           2 .. L−2: the intended config        2 .. L−1 (``except_last_layer`` is   ``"paper"``: 2..L−2,
                     (``except_last_layer: 1``; not       overridden)                          ``"code"``: 2..L−1
                     stated in the paper text)
    ===============  ==================================  ===================================  ==================

    Args:
        prompts, span, extras: the prompts the forwards will run (rows in this order) and the
            "image": ``"image"`` on a VLM, or a context span per prompt (text analogue).
        dims: the sink dimensions. On small models mind τ: ``|h/rms(h)|`` is bounded by
            ``sqrt(d_model)`` (24 on SmolLM2-135M against 64 on Llama-2-7B).

    Yields a record ``{"sinks": {layer: [b, pos]}, "rows": {layer: [b, heads, pos]}}`` of the last
    forward's sink tokens and edited (image-centric) rows.
    """
    from mechlib.tasks.contrast import ContrastSet, PromptBatch

    if variant not in ("paper", "code"):
        raise ValueError(f"variant={variant!r}: choose 'paper' (p moved) or 'code' (1 - p moved)")
    if not 0 <= p <= 1:
        raise ValueError(f"p={p} must be in [0, 1]")
    if not dims:
        raise ValueError("dims is empty: pass the sink dimensions (mechlib.sink_dimensions(...).sink_dims)")
    contrast = prompts if isinstance(prompts, ContrastSet) else None
    batch = PromptBatch.from_prompts(model, prompts, extras=extras)
    image = torch.zeros(batch.tokens.shape, dtype=torch.bool)
    for i, pos in enumerate(batch.span_positions(model, span, contrast)):
        image[i, pos] = True
    after = image.int().cumsum(1).eq(image.sum(1, keepdim=True)) & ~image & batch.mask  # real rows after the image
    L = model.cfg.n_layers
    if layers is None:
        layers = list(range(2, L - 1)) if variant == "paper" else list(range(2, L))
    layers = [check_layer(model, l) for l in layers]
    if not layers:
        raise ValueError(f"VAR edits layers 2..L-2 (variant='paper') or 2..L-1 ('code'); this model has {L} layers, "
                         "so there is none to edit: pass layers= explicitly")
    _check_pattern_editable(model, layers)
    moved = p if variant == "paper" else 1 - p
    P = len(batch)
    record: dict = {"sinks": {}, "rows": {}}
    sinks_now: dict[int, Tensor] = {}
    state = object()  # this block's key in a generation's scratch space
    prompts = (batch.tokens, batch.lengths)

    def find_sinks(h, hook, layer):  # h [b, q, d]: the layer's input at this forward's positions
        v = layout.view(h.shape[0], q=h.shape[1], n_prompts=P, prompts=prompts, device=h.device, what="VAR")
        s = rms_sink_scores(h, dims) > tau  # [b, q]
        if v.generating:
            # as the released code: sinks are found on the prompt (prefill); a generated token never is one
            s &= (v.qpos >= 0) & (v.qpos < v.prompt_len[:, None])
            d, key = v.decoding, (state, layer)
            if d.cached and d.step > 0:
                s = torch.cat([d.state[key].to(s.device), s], 1)
            if d.cached:
                d.state[key] = s
        sinks_now[layer] = s
        record["sinks"][layer] = s.cpu()

    def edit(A, hook, layer):
        b, H, Q, K = A.shape
        v = layout.view(b, q=Q, k=K, n_prompts=P, device=A.device, what="VAR")
        img = v.gather(image, v.kpos)  # [b, K] image keys
        rows_ok = v.gather(after, v.qpos, after=True)  # [b, Q] real rows after the image (generated ones too)
        sinks = sinks_now.pop(layer).to(A.device)
        if sinks.shape[1] != K:
            raise ValueError(f"VAR found sinks on {sinks.shape[1]} positions but layer {layer} attends over {K} keys")
        vis = sinks & img
        has_vis = vis.any(-1)  # a sample whose layer has no visual sink is skipped
        Af = A.float()
        on_img = (Af * img[:, None, None]).sum(-1)  # [b, H, Q]
        share = (Af * vis[:, None, None]).sum(-1) / (on_img + img.sum(-1)[:, None, None] * 1e-6)
        chosen = (on_img >= summ) & (share <= rho) & rows_ok[:, None, :] & has_vis[:, None, None]
        record["rows"][layer] = chosen.cpu()
        take = Af * sinks[:, None, None, :] * moved
        new = _move_mass(Af, take, (img & ~sinks)[:, None, None, :])
        return torch.where(chosen[..., None], new, Af).to(A.dtype)

    hk = []
    for l in layers:
        hk += [(f"blocks.{l}.hook_resid_pre", lambda h, hook, l=l: find_sinks(h, hook, l)),
               (f"blocks.{l}.attn.hook_pattern", lambda A, hook, l=l: edit(A, hook, l))]
    with layout.editing(model, "var"), hooks.attach(model, hk, must_fire=False):
        yield record
