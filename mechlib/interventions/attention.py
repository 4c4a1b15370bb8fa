"""Interventions that edit attention patterns (``hook_pattern``): ACT's calibration, VAR's
redistribution, and steering chosen heads onto given tokens (Merullo et al.'s repair)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.interventions._common import _check_pattern_editable, _editing_patterns, _heads_by_layer, _move_mass
from mechlib.sites import check_layer

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
        take = sub * sink * (p if variant == "paper" else 1 - p)
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
                                                         forward, in prefill only (generated  forward, generated
                                                         tokens are never sinks)              tokens included
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

    def tile(mask: Tensor, b: int, T: int, device, later: bool) -> Tensor:
        """``mask`` for a forward of batch ``b`` and ``T`` tokens (tokens beyond the prompts, e.g.
        generated ones, get ``later``)."""
        if b % P:
            raise ValueError(f"VAR was set up for {P} prompts; this forward has batch {b}")
        m = mask[:, :T] if T <= mask.shape[1] else torch.nn.functional.pad(mask, (0, T - mask.shape[1]), value=later)
        return m.repeat(b // P, 1).to(device)

    def find_sinks(h, hook, layer):
        sinks_now[layer] = rms_sink_scores(h, dims) > tau
        record["sinks"][layer] = sinks_now[layer].cpu()

    def edit(A, hook, layer):
        b, H, T, _ = A.shape
        img, rows_ok = tile(image, b, T, A.device, False), tile(after, b, T, A.device, True)  # [b, T]
        sinks = sinks_now.pop(layer).to(A.device)
        vis = sinks & img
        has_vis = vis.any(-1)  # a sample whose layer has no visual sink is skipped
        Af = A.float()
        on_img = (Af * img[:, None, None]).sum(-1)  # [b, H, T]
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
    with hooks.attach(model, hk, must_fire=False):
        yield record
