"""PINE (Wang et al. 2024): position-invariant inference over segments."""

from __future__ import annotations

import numbers
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from mechlib import hooks, layout
from mechlib.interventions._common import UnsupportedBridgeError, _check_pattern_editable
from mechlib.sites import check_layer


def rope_frequencies(cos: Tensor, sin: Tensor, candidates: Sequence[Tensor] = ()) -> Tensor:
    """The rotary frequencies ``[rotary_dim / 2]`` of one layer, read off the cos/sin it applied
    (``[..., T, rotary_dim]``, rotate-half layout, positions ``0..T-1``): the angle at position 1.
    Works for any RoPE whose angle is linear in position — per-layer bases (Gemma 2/3 local and
    global layers), partial rotary (Pythia), frequency scaling (Llama 3, linear, YaRN's attention
    factor cancels in the angle) — and is checked at every position.

    In half precision the angle at position 1 is good to a few digits only, which thousands of
    positions later is a wrong rotation: the frequencies are then the one of ``candidates`` (the
    model's rotary frequency buffers, ``*inv_freq``: one per layer type in Gemma 3) that gives the
    cos/sin applied at every position to within their rounding."""
    dtype = cos.dtype
    cos, sin = cos.reshape(-1, *cos.shape[-2:])[0].double(), sin.reshape(-1, *sin.shape[-2:])[0].double()
    T, rd = cos.shape
    if T < 2 or rd % 2:
        raise UnsupportedBridgeError(f"cannot read rotary frequencies from cos/sin of shape {tuple(cos.shape)}")
    half = rd // 2
    scale = cos[0, :half]
    exact = dtype in (torch.float32, torch.float64)
    atol = 1e-4 if exact else float(torch.finfo(dtype).eps) * max(1.0, float(scale.abs().max()))

    def fits(freq: Tensor) -> bool:
        angles = torch.arange(T, dtype=torch.float64)[:, None] * freq.double()
        return (torch.allclose(cos[:, :half], scale * torch.cos(angles), atol=atol)
                and torch.allclose(sin[:, :half], scale * torch.sin(angles), atol=atol)
                and torch.allclose(cos[:, half:], cos[:, :half], atol=1e-6))

    if exact:
        freq = torch.atan2(sin[1, :half], cos[1, :half])
        if fits(freq):
            return freq.float()
    else:
        for cand in candidates:
            cand = cand.detach().cpu().double().flatten()
            if cand.numel() == half and fits(cand):
                return cand.float()
        if not any(c.numel() == half for c in candidates):
            raise UnsupportedBridgeError(
                f"position_invariant reads a {dtype} model's rotary frequencies from its inv_freq buffers, "
                "and this model has none of the right size: load the model in float32")
    raise UnsupportedBridgeError("this model's rotary embedding is not rotate-half with angles linear in "
                                 "position (e.g. interleaved pairs or position-dependent scaling): "
                                 "position_invariant cannot re-position its keys")


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


def _check_reconstruction(layer: int, A: Tensor, qr: Tensor, kr: Tensor, scores: Optional[Tensor], inv_freq: Tensor,
                          scale: float, softcap: Optional[float], window: Optional[int], where: str) -> None:
    """Raise unless PINE's reconstruction (rotated queries ``qr`` and keys ``kr`` of the first prompt,
    ``[T, H, D]`` in float32) is the model's attention at ``layer``.

    In float32 the probabilities must agree to 1e-4. In half precision they cannot: the model rounds
    each score (a score of 10 is good to 0.06 in bfloat16, which moves its probability by 6%), so the
    model's own scores (``scores``, from ``hook_attn_scores``) are compared instead, each within
    ``1e-4 + 2 eps |score| + d_head eps_32 scale sum_d |q_d k_d|``: the rounding of the product and
    of its scaling to the half type, and a float32 accumulation of the dot product (a backend that
    accumulates in half precision fails the check, and PINE refuses to edit). The masked keys must
    be the same.
    """
    T = A.shape[-1]
    pos = torch.arange(T, device=A.device)
    zero = torch.zeros(1, 1, 1, dtype=torch.long, device=A.device)
    ours = _cap_and_mask(_rope_scores(qr, kr, zero, inv_freq) * scale, pos[:, None], pos[None, :], softcap, window)
    if A.dtype in (torch.float32, torch.float64):
        err = float((torch.softmax(ours, -1) - A[0].detach().float()).abs().max())
        if not err < 1e-4:
            raise UnsupportedBridgeError(
                f"position_invariant could not reproduce layer {layer}'s attention from its rotated queries and "
                f"keys ({where}; max error {err:.2g}): editing it would be wrong")
        return
    if scores is None:
        raise UnsupportedBridgeError(
            f"position_invariant cannot check its reconstruction of layer {layer}'s attention in {A.dtype} ({where} "
            "has no hook_attn_scores to compare with): load the model in float32")
    theirs = scores[0].detach().float()
    seen = torch.isfinite(ours)
    eps = torch.finfo(A.dtype).eps
    mag = scale * torch.einsum("ihd,jhd->hij", qr.abs(), kr.abs())
    bound = 1e-4 + 2 * eps * ours.abs() + qr.shape[-1] * torch.finfo(torch.float32).eps * mag
    excess = ((ours - theirs).abs() - bound)[seen]
    masked_ok = bool((theirs[~seen] < -1e4).all())
    if float(excess.max()) > 0 or not masked_ok:
        err = float((ours - theirs)[seen].abs().max())
        raise UnsupportedBridgeError(
            f"position_invariant could not reproduce layer {layer}'s attention scores from its rotated queries and "
            f"keys in {A.dtype} ({where}; max error {err:.2g}, beyond the rounding bound"
            f"{'' if masked_ok else '; the masked keys differ'}): editing it would be wrong")


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

    ===============  ==================================  ===================================  ==================
    choice           paper (Wang et al. 2024)            released code (wzq016/PINE)          mechlib
    ===============  ==================================  ===================================  ==================
    attention        bidirectional between segments,     same (``LlamaAttentionWithPS``)      same
                     causal inside each; prefix causal
    importance       attention computed without          un-rotated q·k/√d over the other     same, in float32
                     position                            segments' tokens, softmax, mean per  (the code: the
                                                         segment                              model's dtype)
    positions        segments re-ordered by importance,  stable descending sort; a segment    same
                     the most important closest to the   is shifted by the lengths of those
                     query                               ranked before it
    where            all layers and heads                all layers and heads                 ``layers`` (default
                                                                                              all), all heads
    segments         documents / options                 tokenised one by one (``ps_call``)   contiguous spans of
                                                                                              one tokenisation
    ===============  ==================================  ===================================  ==================

    Yields ``{hook name: times fired}``. Works on bridges that re-implement rotate-half RoPE
    attention (Llama, Qwen2, Mistral, SmolLM); otherwise :class:`UnsupportedBridgeError`. Before
    editing a layer it checks, on the first forward, that its reconstruction is the model's attention:
    in float32 the probabilities to 1e-4; in half precision (bfloat16/float16, as the released code
    runs) the scores, each to the rounding its dot product allows.
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
    half = getattr(model.cfg, "dtype", torch.float32) not in (torch.float32, torch.float64)
    hf = getattr(model, "original_model", None)
    # every rotary frequency buffer (Gemma 3 keeps one per layer type: sliding_attention_inv_freq, ...)
    inv_freqs = [b for name, b in hf.named_buffers() if name.endswith("inv_freq")] if half and hf else []

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
        f = rope_frequencies(cos, sin, inv_freqs).to(A.device)
        scale = float(getattr(model.blocks[layer].attn.original_component, "scaling", None) or model.cfg.d_head ** -0.5)
        cap, window = arch.attn_softcap, arch.windows[layer]
        if layer not in checked:  # prove the reconstruction is this model's attention before editing it
            _check_reconstruction(layer, A, qr[0].float(), kr[0].float(), store.pop(f"s{layer}", None), f, scale,
                                  cap, window, f"{arch.family}, {arch.attention_bridge}")
            checked.add(layer)
        A = A.clone()
        v = layout.view(b, q=T, n_prompts=len(segments) if per_prompt else None, what="position_invariant")
        if bool((v.kpos[:, 0] != 0).any()) or A.shape[-1] != T:
            raise ValueError("position_invariant needs each prompt's whole sequence, unpadded, in every forward "
                             "(mechlib.generate runs it one prompt at a time without a key/value cache)")
        for i in range(b):
            p = int(v.rows[i])
            spans = _check_spans(segments[p] if per_prompt else segments, T, f"prompt {p}")
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
        if half and hasattr(model.blocks[l].attn, "hook_attn_scores"):  # the check compares scores (see above)
            hk.append((f"blocks.{l}.attn.hook_attn_scores",
                       lambda x, hook, l=l: keep(x, hook, f"s{l}") if l not in checked else x))
    why = "it re-positions every key for every query, so it needs the whole sequence, unpadded"
    try:
        with layout.editing(model, "position_invariant", cache=False, padding=False, reason=why), \
                hooks.attach(model, hk, must_fire=False) as fired:
            yield fired
    finally:
        store.clear()
