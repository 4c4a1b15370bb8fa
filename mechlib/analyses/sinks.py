"""Attention sinks, massive activations and sink dimensions.

* :func:`massive_activations` — Sun et al. 2024 ("Massive Activations in Large Language Models"):
  residual-stream entries that are huge both absolutely (default > 100) and relative to the
  layer's median magnitude (default > 1000×). They sit in a few fixed dimensions, on the first
  token and on delimiters, appear abruptly in an early layer and then stay.
* :func:`attention_sinks` — Gu et al. 2024 ("When Attention Sink Emerges in Language Models"):
  ``α_k^{l,h}`` = mean over queries ``t ≥ k`` of ``A^{l,h}[t, k]``; head ``(l, h)`` has a sink at
  ``k`` if ``α_k > ε`` (default 0.3); the sink rate is the share of heads with a sink at ``k=0``.
  Also non-initial ("hidden") sinks (ACT, Yu et al. 2024) and the value-norm view: a sink gets
  large attention but has a small value vector, so it contributes little — it acts like a key bias.
* :func:`sink_dimensions` — VAR (Kang et al. 2025): the dimensions where the RMS-normalised hidden
  state of sink tokens is massive, discovered from data instead of hard-coded per model; a token
  is a sink if ``max_{d ∈ D_sink} |RMSNorm(h)_d| > τ`` (τ = 20).

Common misreading: a high attention weight on the first token is not "the model reading the
first token" — the sink's value vector is small, so the head mostly writes nothing. Check
``value_norm_ratio`` before interpreting attention to a sink as information flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional, Sequence

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.memory import peak_memory
from mechlib.provenance import records
from mechlib.results import Result
from mechlib.sites import check_layer
from mechlib.tasks.contrast import PromptBatch


def _batch(model, prompts, extras) -> PromptBatch:
    return PromptBatch.from_prompts(model, prompts, extras=extras)


def _activations(model, batch: PromptBatch, names, batch_size, cache):
    """``(sub-batch, {name: activation})`` per batch of prompts: from the model, or sliced from a
    user's ``cache`` (then trimmed to each batch's width)."""
    if cache is not None:
        full = hooks.cached(model, cache, names, len(batch))
    start = 0
    for sub in batch.batches(batch_size):
        if cache is None:
            acts = hooks.activations(model, sub.tokens, names, extras=sub.extras)
        else:
            T = sub.tokens.shape[1]
            acts = {n: (v[start:start + len(sub), :, :T, :T] if v.ndim == 4 and "pattern" in n
                        else v[start:start + len(sub), :T]) for n, v in full.items()}
        start += len(sub)
        yield sub, acts


# ----------------------------------------------------------------------------------------------
# massive activations
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class MassiveActivations(Result):
    """``values[layer]``: largest |residual entry| per layer (mean over prompts).

    Extra tensors (prompt-major): ``top_values``/``top_pos``/``top_dims`` ``[prompt, layer, k]``
    (signed values of the k largest-|value| entries, their token positions and dimensions) and
    ``medians`` ``[prompt, layer]`` (median |entry| of the layer's residual over real tokens).
    """

    top_values: Optional[Tensor] = None
    top_pos: Optional[Tensor] = None
    top_dims: Optional[Tensor] = None
    medians: Optional[Tensor] = None

    def massive_mask(self) -> Tensor:
        """``[prompt, layer, k]`` True where an entry passes both Sun et al. thresholds."""
        a, r = self.metadata["abs_threshold"], self.metadata["ratio_threshold"]
        mag = self.top_values.abs()
        return (mag > a) & (mag > r * self.medians[..., None])

    def entries(self, massive_only: bool = False):
        """One row per (prompt, layer, rank): value, position, token, dimension, massive flag."""
        import pandas as pd

        toks = self.metadata["str_tokens"]
        mask = self.massive_mask()
        rows = []
        P, L, K = self.top_values.shape
        for p in range(P):
            for l in range(L):
                for k in range(K):
                    if massive_only and not mask[p, l, k]:
                        continue
                    pos = int(self.top_pos[p, l, k])
                    rows.append(dict(prompt=p, layer=self.metadata["layers"][l], rank=k,
                                     value=float(self.top_values[p, l, k]), pos=pos, token=toks[p][pos],
                                     dim=int(self.top_dims[p, l, k]),
                                     ratio_to_median=float(self.top_values[p, l, k].abs() / self.medians[p, l]),
                                     massive=bool(mask[p, l, k])))
        return pd.DataFrame(rows)

    def massive_dims(self) -> list[int]:
        """Dimensions that carry massive entries, most frequent first."""
        d = self.top_dims[self.massive_mask()]
        if d.numel() == 0:
            return []
        vals, counts = d.unique(return_counts=True)
        return [int(v) for v in vals[counts.argsort(descending=True)]]

    def first_layer(self) -> Optional[int]:
        """The first layer at which every prompt has a massive entry (None if never)."""
        per_layer = self.massive_mask().any(-1).all(0)
        hit = per_layer.nonzero().flatten()
        return None if hit.numel() == 0 else self.metadata["layers"][int(hit[0])]


@records
def massive_activations(
    model,
    prompts,
    *,
    top_k: int = 4,
    abs_threshold: float = 100.0,
    ratio_threshold: float = 1000.0,
    layers: Optional[Sequence[int]] = None,
    extras: Optional[dict] = None,
    batch_size: Optional[int] = None,
    cache=None,
) -> MassiveActivations:
    """The largest residual-stream entries per layer (``blocks.{l}.hook_resid_post``), and which of
    them are massive (Sun et al. 2024).

    ===============  ================================  ================================  ===========================
    choice           paper (Sun et al., §2)            released code                     mechlib
                                                       (locuslab/massive-activations)
    ===============  ================================  ================================  ===========================
    hidden state     each layer's output               ``feat`` = the decoder layer's    ``hook_resid_post`` of
                                                       output (``--exp2``)               every layer (``layers=``)
    massive          |a| > 100 and "at least or        top entries against the median    |a| > ``abs_threshold``
                     around" 1,000 × the median         (figures)                         (100) and > 1000 × median
                     magnitude                                                           (``ratio_threshold``)
    median           of the hidden state               median |a| over the [T, d] state  over each prompt's real
                                                       of one sequence                   tokens × dims
    entries listed   top 3 per layer                   top 3 over [T, d]                 ``top_k=4`` (only how many
                                                                                         are listed)
    data             10 RedPajama sequences, 4,096     ``add_special_tokens=False``      any prompts; the paper's
                     tokens (Llama-2)                                                    protocol: BOS-free chunks,
                                                                                         ``tasks.natural_text(model,
                                                                                         bos="never")``
    ===============  ================================  ================================  ===========================

    Args:
        prompts: strings, a ``[batch, pos]`` token tensor, or a ``PromptBatch``.
        top_k: entries kept per (prompt, layer).
        abs_threshold, ratio_threshold: Sun et al.'s criterion (|a| > 100 and > 1000 × median).
        batch_size: prompts per forward (default all); results do not depend on it.

    Example:
        >>> r = mechlib.massive_activations(model, ["Summer is warm. Winter is cold."])  # doctest: +SKIP
        >>> r.entries(massive_only=True).head(); r.massive_dims(); r.first_layer()
    """
    batch = _batch(model, prompts, extras)
    layers = list(range(model.cfg.n_layers)) if layers is None else [check_layer(model, l) for l in layers]
    names = [f"blocks.{l}.hook_resid_post" for l in layers]
    tv, tp, td, med = [], [], [], []
    with peak_memory(model.cfg.device) as mem:
        for sub, acts in _activations(model, batch, names, batch_size, cache):
            mask = sub.mask.to(acts[names[0]].device)
            v_, p_, d_, m_ = [], [], [], []
            for n in names:
                h = acts[n].float()  # [b, pos, d]
                flat = h.abs().masked_fill(~mask[..., None], -1.0).flatten(1)
                idx = flat.topk(top_k, dim=1).indices
                d = h.shape[-1]
                v_.append(h.flatten(1).gather(1, idx))
                p_.append(idx // d)
                d_.append(idx % d)
                m_.append(torch.stack([h[i, : int(sub.lengths[i])].abs().median() for i in range(len(sub))]))
            tv.append(torch.stack(v_, 1).cpu())
            tp.append(torch.stack(p_, 1).cpu())
            td.append(torch.stack(d_, 1).cpu())
            med.append(torch.stack(m_, 1).cpu())
    top_values = torch.cat(tv)
    per_prompt = top_values.abs()[..., 0]
    return MassiveActivations(
        values=per_prompt.mean(0), axis_names=("layer",), labels={"layer": [f"L{l}" for l in layers]},
        per_prompt=per_prompt, top_values=top_values, top_pos=torch.cat(tp),
        top_dims=torch.cat(td), medians=torch.cat(med),
        metadata=dict(method="massive_activations", abs_threshold=abs_threshold,
                      ratio_threshold=ratio_threshold, layers=layers, top_k=top_k,
                      batch_size=batch_size, peak_memory=mem,
                      str_tokens=[batch.str_tokens(model, i) for i in range(len(batch))],
                      title="largest |residual entry| per layer"),
    )


def massive_means(model, prompts, dims: Sequence[int], *, layer: int, extras: Optional[dict] = None,
                  batch_size: Optional[int] = None) -> Tensor:
    """Sun et al.'s mean values for :func:`~mechlib.interventions.ablate_massive` (``mode="mean"``):
    ``[2, len(dims)]`` — the mean of ``dims`` at the first token and at each input's
    largest-activation position (the first delimiter), in block ``layer``'s output, over the
    prompts (the second row over prompts where that position is not 0; it repeats the first when
    none is)."""
    from mechlib.interventions.residual import massive_positions

    batch = _batch(model, prompts, extras)
    name = f"blocks.{check_layer(model, layer)}.hook_resid_post"
    first, delim = [], []
    for sub in batch.batches(batch_size):
        acts = hooks.activations(model, sub.tokens, [name], extras=sub.extras)
        h = acts[name].float()
        pos = massive_positions(h, dims, sub.lengths)
        rows = torch.arange(len(sub), device=h.device)
        first.append(h[rows, 0][:, list(dims)].cpu())
        keep = pos[:, 1] != 0
        delim.append(h[rows[keep], pos[keep, 1]][:, list(dims)].cpu())
    first, delim = torch.cat(first), torch.cat(delim)
    return torch.stack([first.mean(0), delim.mean(0) if len(delim) else first.mean(0)])


# ----------------------------------------------------------------------------------------------
# attention sinks
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class AttentionSinks(Result):
    """``values[layer, head]``: α_0, the mean attention to the first token (mean over prompts).

    Extra tensors: ``alpha`` ``[prompt, layer, head, key_pos]`` (α_k for every key position; 0 on
    padding) and ``value_norm_ratio`` ``[layer, head]`` (‖v‖ at the first token divided by the mean
    ‖v‖ of the other tokens, mean over prompts; < 1 means the sink writes little).
    ``baselines["sink_rate"]`` is Gu et al.'s Sink_0^ε.
    """

    alpha: Optional[Tensor] = None
    value_norm_ratio: Optional[Tensor] = None

    def sink_rate(self, k: int = 0) -> float:
        """Share of (layer, head) pairs with α_k > ε, averaged over prompts."""
        return float((self.alpha[..., k] > self.metadata["epsilon"]).float().mean())

    def rate_by_layer(self, k: int = 0) -> Result:
        """Sink rate per layer (share of heads with α_k > ε), as a 1-D result."""
        per = (self.alpha[..., k] > self.metadata["epsilon"]).float().mean(-1)  # [prompt, layer]
        return Result(values=per.mean(0), axis_names=("layer",), labels={"layer": self.labels["layer"]},
                      per_prompt=per, metadata={"title": f"sink rate by layer (k={k}, ε={self.metadata['epsilon']})"})

    def hidden_sinks(self, min_heads: int = 1, min_queries: int = 1):
        """Non-initial sink tokens (ACT): per prompt and key position ``k > 0``, how many heads
        have α_k > ε, with the token text, sorted by that count. Positions followed by fewer than
        ``min_queries`` queries are skipped: α_k averages over queries ``t ≥ k``, so near the end
        of a prompt it rests on one or two rows and is high by construction."""
        import pandas as pd

        eps = self.metadata["epsilon"]
        toks = self.metadata["str_tokens"]
        counts = (self.alpha > eps).sum((1, 2))  # [prompt, pos]
        rows = []
        for p in range(counts.shape[0]):
            for k in range(1, len(toks[p]) - min_queries + 1):
                c = int(counts[p, k])
                if c >= min_heads:
                    rows.append(dict(prompt=p, pos=k, token=toks[p][k], n_heads=c,
                                     max_alpha=float(self.alpha[p, :, :, k].max())))
        df = pd.DataFrame(rows, columns=["prompt", "pos", "token", "n_heads", "max_alpha"])
        return df.sort_values("n_heads", ascending=False).reset_index(drop=True)


@records
def attention_sinks(
    model,
    prompts,
    *,
    epsilon: float = 0.3,
    layers: Optional[Sequence[int]] = None,
    extras: Optional[dict] = None,
    batch_size: Optional[int] = None,
    cache=None,
) -> AttentionSinks:
    """Gu et al.'s sink scores for every layer and head, hidden sinks, and value norms.

    ===============  ================================  ================================  ===========================
    choice           paper (Gu et al. 2024)            released code                     mechlib
                                                       (sail-sg/Attention-Sink)
    ===============  ================================  ================================  ===========================
    α_k              mean attention to key k from      ``compute_attention_sink``:       same, from ``hook_pattern``;
                     queries t ≥ k (t = k included)    ``(A / arange(T, 0, −1))``        padding rows excluded
                                                       ``.sum(−2)``
    sink             α_k > ε, ε = 0.3                  same                              ``epsilon=0.3``
    metric           Sink_k^ε: % of (sample, layer,    ``(importance > ε).mean() ·       ``sink_rate(k)`` as a share;
                     head) with α_k > ε; Sink_1 = the  100``                             k = 0 is the paper's Sink_1
                     first token
    protocol         100 sequences of 64 tokens, HF    same (``probe_valid`` text,       any prompts; the paper's:
                     tokenizer defaults (BOS when the  truncated to 64 incl. BOS)        ``tasks.natural_text(model)``
                     tokenizer adds it)                                                  (100 × 64 tokens, HF BOS)
    value norms      small sink values ("a key bias")  ``eval_activations``: mean ‖v‖     ``value_norm_ratio``: ‖v‖ of
                                                       per token                         the first token / the rest
    ===============  ================================  ================================  ===========================

    Args:
        prompts: strings, a ``[batch, pos]`` token tensor, or a ``PromptBatch``.
        epsilon: a head has a sink at ``k`` when ``α_k > epsilon``.

    Returns:
        :class:`AttentionSinks`: ``values`` = α_0 ``[layer, head]``; ``sink_rate()``;
        ``rate_by_layer()``; ``hidden_sinks()``; ``value_norm_ratio``.
    """
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon={epsilon} must be in (0, 1)")
    batch = _batch(model, prompts, extras)
    if int(batch.lengths.min()) < 2:
        raise ValueError("every prompt needs at least 2 tokens (the first token plus one query)")
    layers = list(range(model.cfg.n_layers)) if layers is None else [check_layer(model, l) for l in layers]
    pat = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    val = [f"blocks.{l}.attn.hook_v" for l in layers]
    P = batch.tokens.shape[1]
    H = model.cfg.n_heads
    group = H // int(getattr(model.cfg, "n_key_value_heads", None) or H)
    alphas, ratios = [], []
    with peak_memory(model.cfg.device) as mem:
        for sub, acts in _activations(model, batch, pat + val, batch_size, cache):
            Ps = sub.tokens.shape[1]
            mask = sub.mask.float()  # [b, pos]
            # α_k = mean over real queries t >= k of A[t, k]
            q_idx = torch.arange(Ps)
            valid = (q_idx[:, None] >= q_idx[None, :]).float()[None] * mask[:, :, None]  # [b, t, k]
            n_valid = valid.sum(1).clamp(min=1)  # [b, k]
            a_l, r_l = [], []
            for pn, vn in zip(pat, val):
                A = acts[pn].float().cpu()  # [b, head, t, k]
                alpha = (A * valid[:, None]).sum(2) / n_valid[:, None]  # [b, head, k]
                a_l.append(torch.nn.functional.pad(alpha * mask[:, None], (0, P - Ps)))
                v = acts[vn].float().cpu().norm(dim=-1)  # [b, pos, kv_head]
                v = v.repeat_interleave(group, dim=-1)  # per query head
                other = (v[:, 1:] * mask[:, 1:, None]).sum(1) / mask[:, 1:].sum(1, keepdim=True)
                r_l.append(v[:, 0] / other)  # [b, head]
            alphas.append(torch.stack(a_l, 1))
            ratios.append(torch.stack(r_l, 1))
    alpha = torch.cat(alphas)  # [b, layer, head, pos]
    per_prompt = alpha[..., 0]
    return AttentionSinks(
        values=per_prompt.mean(0), axis_names=("layer", "head"),
        labels={"layer": [f"L{l}" for l in layers], "head": [f"H{h}" for h in range(H)]},
        per_prompt=per_prompt, alpha=alpha, value_norm_ratio=torch.cat(ratios).mean(0),
        baselines={"sink_rate": float((per_prompt > epsilon).float().mean())},
        metadata=dict(method="attention_sinks", epsilon=epsilon, layers=layers, batch_size=batch_size, peak_memory=mem,
                      str_tokens=[batch.str_tokens(model, i) for i in range(len(batch))],
                      title="α_0: mean attention to the first token"),
    )


# ----------------------------------------------------------------------------------------------
# sink dimensions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class SinkDimensions(Result):
    """``values[dim]``: share of (prompt, layer) pairs where the first token's RMS-normalised
    hidden state exceeds τ in that dimension. ``sink_dims`` (metadata) are the dims above
    ``min_share``; ``token_scores`` ``[prompt, pos]`` = max over sink dims of |RMSNorm(h)|,
    averaged over the analysed layers; ``is_sink`` ``[prompt, pos]`` the VAR flag (> τ)."""

    token_scores: Optional[Tensor] = None
    is_sink: Optional[Tensor] = None

    @property
    def sink_dims(self) -> list[int]:
        return list(self.metadata["sink_dims"])

    def sink_tokens(self):
        import pandas as pd

        toks = self.metadata["str_tokens"]
        rows = [dict(prompt=p, pos=k, token=toks[p][k], score=float(self.token_scores[p, k]))
                for p in range(self.is_sink.shape[0]) for k in range(len(toks[p])) if self.is_sink[p, k]]
        return pd.DataFrame(rows, columns=["prompt", "pos", "token", "score"])


@records
def sink_dimensions(
    model,
    prompts,
    *,
    tau: float = 20.0,
    min_share: float = 0.5,
    layers: Optional[Sequence[int]] = None,
    extras: Optional[dict] = None,
    batch_size: Optional[int] = None,
    cache=None,
) -> SinkDimensions:
    """Discover the sink dimensions (VAR's ``D_sink``) and flag sink tokens.

    ===============  ================================  ================================  ===========================
    choice           paper (Kang et al. 2025)          released code                     mechlib
                                                       (seilk/VisAttnSink)
    ===============  ================================  ================================  ===========================
    sink dims        the LLM's massive dimensions      hard-coded: [2533, 1415]          discovered: the first
                                                       (Llama-2-7B), [2100, 4743] (13B)  token > τ in ≥ ``min_share``
                                                                                         of (prompt, layer) pairs
    score φ(x)       max over sink dims of             ``DimProspector``: h / rms(h) of  same (``hook_resid_pre``,
                     |RMSNorm(h)_d|                    the layer input, no weight,       no weight, eps 1e-6, fp32)
                                                       eps 1e-6
    τ                20                                20                                ``tau=20`` (mind the scale
                                                                                         on small models, below)
    sink tokens      per layer                         per layer from 2 on, every        one set: the score averaged
                                                       forward (prefill)                 over ``layers`` (2..L−2);
                                                                                         per-layer sinks are
                                                                                         :func:`~mechlib.var`'s
    ===============  ================================  ================================  ===========================

    The RMS-normalised hidden state is ``h / rms(h)`` of the block's input ``blocks.{l}.hook_resid_pre``
    (no norm weight, eps 1e-6: VAR's ``DimProspector``), whatever norm the model itself uses. A
    dimension is a sink dimension when the first token's |value| exceeds ``tau`` in at least ``min_share`` of the (prompt, layer) pairs; a token is a sink when its
    score (max over sink dims of |value|, averaged over the layers) exceeds ``tau``. Default
    layers: 2 to the last-but-one.

    Mind the scale: entries of ``h / rms(h)`` are bounded by ``sqrt(d_model)`` (all the mass in
    one dimension). VAR's τ = 20 was set on Llama-2-7B (bound 64); on SmolLM2-135M the bound is
    24, so τ = 20 asks for near-total concentration — which the first token shows (≈ 22) and
    ordinary tokens do not (≈ 10–16 in the same dimension, which is large for every token).
    """
    batch = _batch(model, prompts, extras)
    L = model.cfg.n_layers
    layers = ((list(range(min(2, L - 1), max(L - 1, 1))) or list(range(L))) if layers is None
              else [check_layer(model, l) for l in layers])  # default: skip the first two and the last
    if not layers:
        raise ValueError("layers is empty: give the layers to read")
    names = [f"blocks.{l}.hook_resid_pre" for l in layers]
    P = batch.tokens.shape[1]
    xs = []
    with peak_memory(model.cfg.device) as mem:
        for sub, acts in _activations(model, batch, names, batch_size, cache):
            x = torch.stack([acts[n].float().cpu() for n in names], 1)  # [b, layer, pos, d]
            x = x * (x.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()  # RMSNorm without weight (VAR's code)
            xs.append(torch.nn.functional.pad(x, (0, 0, 0, P - x.shape[2])))
    x = torch.cat(xs)
    first = x[:, :, 0].abs()  # [b, layer, d]
    share = (first > tau).float().mean((0, 1))  # [d]
    dims = (share >= min_share).nonzero().flatten().tolist()
    if dims:
        scores = x[..., dims].abs().amax(-1).mean(1)  # [b, pos]
    else:
        scores = torch.zeros(x.shape[0], x.shape[2])
    scores = scores * batch.mask
    return SinkDimensions(
        values=share, axis_names=("dim",), per_prompt=(first > tau).float().mean(1),
        token_scores=scores, is_sink=(scores > tau) & batch.mask,
        metadata=dict(method="sink_dimensions", tau=tau, min_share=min_share, layers=layers,
                      batch_size=batch_size, peak_memory=mem,
                      sink_dims=dims, str_tokens=[batch.str_tokens(model, i) for i in range(len(batch))],
                      title=f"share of first-token |RMSNorm(h)| > {tau:.1f}"),
    )


# ----------------------------------------------------------------------------------------------
# ACT's head search
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class HeadSearch(Result):
    """``values[layer, head]``: calibration-set accuracy change when that head alone is calibrated
    (NaN for heads not searched); ``margin_gain`` the same for the mean logit difference.
    ``selected`` (metadata): the heads kept, best first."""

    margin_gain: Optional[Tensor] = None

    @property
    def selected(self) -> list[tuple[int, int]]:
        return [tuple(h) for h in self.metadata["selected"]]

    def table(self):
        import pandas as pd

        rows = [dict(layer=l, head=h, accuracy_gain=float(self.values[l, h]), margin_gain=float(self.margin_gain[l, h]),
                     selected=(l, h) in self.selected)
                for l, h in (~self.values.isnan()).nonzero().tolist()]
        return pd.DataFrame(rows).sort_values(["accuracy_gain", "margin_gain"], ascending=False).reset_index(drop=True)


@records
def act_head_search(
    model,
    calib,
    *,
    beta: float = 0.4,
    epsilon: float = 0.1,
    min_queries: int = 1,
    variant: str = "paper",
    layers: Optional[Sequence[int]] = None,
    max_heads: Optional[int] = None,
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> HeadSearch:
    """ACT's calibration search (Yu et al. 2024; ``scripts/calibration.sh`` in GATECH-EIC/ACT):
    calibrate one head at a time (β = 0.4, sink threshold α_k > 0.1 as in the authors' script) and
    measure the calibration set's accuracy; keep the heads that raise it, best first (ties broken
    by the mean logit difference).

    ===============  ================================  ================================  ===========================
    choice           paper (Yu et al. 2024)            released code (GATECH-EIC/ACT)    mechlib
    ===============  ================================  ================================  ===========================
    search           calibrate one head at a time,     ``calibration.sh``: one run per   one head at a time (stacked
                     keep the heads that help          (HEAD_NUM, LAYER_NUM)             copies of a resumed forward;
                                                                                         equal to one run per head)
    layers           —                                 2..30 of 32 (``range(2, 31)``):   2..L−2 (``layers=``)
                                                       the last excluded
    β, ε             0.4, 0.1                          ``BETA=0.4``, ``THRES=0.1``       ``beta=0.4``,
                                                                                         ``epsilon=0.1``
    calibration set  a held-out set per task           900 samples per dataset           ``calib`` (any size)
    score            accuracy                          classification: argmax over the   accuracy among the
                                                       label tokens                      contrast set's answers
    kept             heads that raise accuracy         lists in ``augment_index.py``     gain > 0, best first (ties:
                                                       (184 heads, Llama-2-7B-chat)      logit difference);
                                                                                         ``max_heads`` caps them
    ===============  ================================  ================================  ===========================

    Every head of a layer is tried in one resumed forward: the calibration batch is stacked once per
    head, copy ``k`` calibrates head ``k``, and the model restarts at that layer from recorded
    inputs (the earlier blocks are not affected by the edit). A head with no sink in any prompt
    of a batch (no key above ``epsilon``, read from the unedited run's patterns with a margin for
    rounding: 1e-6 in float32, 8 ulps in half precision) is left out of that forward: calibrating
    it changes nothing, so its accuracy is the unedited one (``metadata["skipped"]`` counts these
    (batch, head) cells). Results equal calibrating each head alone with
    :func:`~mechlib.interventions.calibrate_attention` (tested).

    Args:
        calib: a :class:`ContrastSet` (answers vs wrong answers; accuracy among the set's answers).
        layers: layers searched (default: 2 to the last-but-one, as the authors' scripts, which
            search ``range(2, 31)`` of Llama's 32 layers).
        variant, min_queries: the sink rule (see :func:`~mechlib.interventions.calibrate_attention`).
        max_heads: keep at most this many.
    """
    from tqdm.auto import tqdm

    from mechlib import metrics
    from mechlib.interventions import _check_pattern_editable, act_calibrate, act_sinks

    L = model.cfg.n_layers
    layers = (list(range(min(2, L - 1), max(L - 1, 1))) or list(range(L))) if layers is None else [
        check_layer(model, l) for l in layers]
    _check_pattern_editable(model, layers)
    from mechlib.analyses.patching import prompt_batches
    from mechlib.metrics import on_prompts

    H, B = model.cfg.n_heads, len(calib)
    acc_all, ld_all = metrics.accuracy(calib), metrics.logit_diff(calib)
    acc_sum, ld_sum = torch.zeros(model.cfg.n_layers, H), torch.zeros(model.cfg.n_layers, H)
    acc0_sum = ld0_sum = 0.0
    skipped = 0
    show = progress if progress is not None else len(layers) > 4
    patterns = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    for idx, sub, _ in prompt_batches(calib, acc_all, batch_size, trim=True):
        acc_m, ld_m, b = on_prompts(acc_all, idx, B), on_prompts(ld_all, idx, B), len(sub)
        with hooks.record_block_inputs(model, layers) as starts, hooks.capture(model, patterns) as seen, \
                torch.no_grad():
            full = hooks.forward(model, sub.clean_tokens.to(model.cfg.device), extras=sub.forward_extras())
        acc0, ld0 = float(acc_m(full).sum()), float(ld_m(full).float().sum())
        acc0_sum += acc0
        ld0_sum += ld0

        def edit(A, hook, b, heads, lengths):
            A = A.clone()
            for k, h in enumerate(heads):  # copy k calibrates head heads[k]
                part = A[k * b:(k + 1) * b, h:h + 1]
                sink = act_sinks(part, epsilon=epsilon, min_queries=min_queries, lengths=lengths[k * b:(k + 1) * b],
                                 variant=variant)
                A[k * b:(k + 1) * b, h:h + 1] = act_calibrate(part, sink, beta)
            return A

        for l, name in tqdm(list(zip(layers, patterns)), desc="ACT head search", disable=not show):
            # heads with no sink in any prompt (below epsilon by a margin): calibrating them is the identity
            # (the margin covers the resumed copies' rounding: 1e-6 in float32, 8 ulps at 1 in half precision)
            dt = seen[name].dtype
            margin = 1e-6 if torch.finfo(dt).bits >= 32 else 8 * torch.finfo(dt).eps
            maybe = act_sinks(seen[name], epsilon=epsilon - margin, min_queries=min_queries, lengths=sub.lengths,
                              variant=variant).any(-1).any(0)
            heads = maybe.nonzero().flatten().tolist()
            idle = [h for h in range(H) if h not in heads]
            acc_sum[l, idle] += acc0
            ld_sum[l, idle] += ld0
            skipped += len(idle)
            if not heads:
                continue
            if not hooks.resume_matches(model, starts[l], l, full):
                raise RuntimeError(f"resuming this model at layer {l} does not reproduce its logits; "
                                   "search with calibrate_attention head by head instead")
            fix = partial(edit, b=b, heads=heads, lengths=sub.lengths.repeat(len(heads)))
            logits = hooks.run_from(model, starts[l], l, copies=len(heads), read_pos=sub.last_pos, hooks=[(name, fix)])
            acc_sum[l, heads] += acc_m(logits).view(len(heads), b).sum(-1).cpu()
            ld_sum[l, heads] += ld_m(logits).float().view(len(heads), b).sum(-1).cpu()
    acc0, ld0 = acc0_sum / B, ld0_sum / B
    acc_gain = torch.full((model.cfg.n_layers, H), float("nan"))
    ld_gain = torch.full((model.cfg.n_layers, H), float("nan"))
    for l in layers:
        acc_gain[l], ld_gain[l] = acc_sum[l] / B - acc0, ld_sum[l] / B - ld0
    keep = [(l, h) for l in layers for h in range(H) if acc_gain[l, h] > 0]
    keep.sort(key=lambda lh: (-float(acc_gain[lh]), -float(ld_gain[lh])))
    if max_heads is not None:
        keep = keep[:max_heads]
    return HeadSearch(values=acc_gain, axis_names=("layer", "head"), margin_gain=ld_gain,
                      baselines={"accuracy": acc0, "logit_diff": ld0},
                      metadata=dict(selected=keep, beta=beta, epsilon=epsilon, min_queries=min_queries, variant=variant,
                                    layers=layers, n_prompts=B, batch_size=batch_size, skipped=skipped,
                                    title="ACT search: calibration accuracy change per head"))
