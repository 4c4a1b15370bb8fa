"""Head attribution: vision-aware head divergence (VHD) and direct logit attribution (DLA).

**VHD** (He et al. 2024, "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
Divergence"): how far each head's output moves when the visual context is taken away — the L2
distance between the head's output (``hook_z``, at the answer position) with and without the
image, same text. Heads with high VHD are "vision-aware"; VHR reinforces them
(:func:`mechlib.vhr`, per prompt and layer as the paper's Algorithm 1; :func:`mechlib.scale_heads`
is the static ablation with fixed heads). On a text model the "image" is a context span (a passage the
answer should come from); removing it tests which heads read the context.

**DLA**: the final residual stream is a sum of component outputs (embedding, each head, each
MLP, biases); with the final norm's scale frozen at its value on the clean run, the logit
difference splits exactly into one term per component. TransformerLens'
``direct_logit_attribution`` does this on a bridge in compatibility mode (folded norms); this one
works on the raw bridge, and the two agree (tested).

Most common misreading: VHD measures *sensitivity* to the context, not that the head helps the
answer; DLA measures a component's *direct* effect only — indirect effects through later layers
(and the final norm's dependence on everything) are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.memory import peak_memory
from mechlib.numerics import accumulation_bound, unit_roundoff
from mechlib.provenance import records
from mechlib.results import Result
from mechlib.tasks.contrast import ContrastSet, PromptBatch, Span


@dataclass(frozen=True, repr=False)
class HeadScores(Result):
    """Per-head scores ``[layer, head]`` (mean over prompts) with per-prompt values."""

    def top_heads(self, k: int = 10) -> list[tuple[int, int]]:
        flat = torch.argsort(self.values.flatten(), descending=True)[:k].tolist()
        H = self.values.shape[1]
        return [(i // H, i % H) for i in flat]


@records
def head_divergence(
    model,
    prompts,
    *,
    span: Span = None,
    relative: bool = False,
    extras: Optional[dict] = None,
    batch_size: Optional[int] = None,
) -> HeadScores:
    """VHD: per head, ``‖z_with − z_without‖₂`` of its output at the last token, with the span
    present vs removed (same text otherwise).

    ===============  ================================  ======================  ================================
    choice           paper (He et al., Eq. 4)          released code           mechlib
                                                       (jinghan1he/VHR)
    ===============  ================================  ======================  ================================
    head output      A_{l,i} = softmax(QKᵀ/√d_k)V,     not public              ``hook_z`` (before W_O)
                     before W_O
    distance d       Euclidean, not normalised         —                       ‖z_with − z_without‖₂;
                                                                               ``relative=True`` divides by
                                                                               ‖z_with‖₂ (mechlib's option)
    position         the generation step t (the first  —                       each prompt's last token (the
                     generated token in Fig. 2)                                first generation step)
    without image    the image tokens removed          —                       ``span`` removed; ``"image"``
                                                                               also drops ``pixel_values``
    over inputs      per sample (VHR chooses heads     —                       mean over prompts, per-prompt
                     per sample)                                               values kept (:func:`~mechlib.vhr`
                                                                               chooses per prompt)
    T-VHD            Σ_l top-k_i VHD (Eq. 5)           —                       not computed
    ===============  ================================  ======================  ================================

    Args:
        prompts: strings, a :class:`PromptBatch`, or a :class:`ContrastSet` (its clean prompts, and
            its ``spans`` when ``span`` is not given).
        span: the tokens to remove: ``(start, end)`` (end exclusive) for every prompt, one such
            pair per prompt, or ``"image"`` on a VLM (its image tokens; the run without the image
            also drops ``pixel_values``).
        relative: divide each distance by ``‖z_with‖₂`` (scale-free across layers).
        extras: forward inputs of the run *with* the span (``pixel_values`` for a VLM).
        batch_size: prompts per forward (default all); results do not depend on it.

    Returns:
        :class:`HeadScores` over ``("layer", "head")``; ``.top_heads(k)`` are the most
        context-/vision-aware heads.

    Example:
        >>> qa = mechlib.tasks.context_qa(model, n=16)                        # doctest: +SKIP
        >>> vhd = mechlib.head_divergence(model, qa)   # spans = the context sentences
        >>> vhd.top_heads(5)
    """
    contrast = prompts if isinstance(prompts, ContrastSet) else None
    batch = PromptBatch.from_prompts(model, prompts, extras=extras)
    removed = batch.span_positions(model, span, contrast)
    B, L, H = len(batch), model.cfg.n_layers, model.cfg.n_heads
    wo = batch.without(model, removed, drop_extras=span == "image")  # the image goes with its tokens
    names = [f"blocks.{l}.attn.hook_z" for l in range(L)]

    def last_z(pb: PromptBatch) -> Tensor:
        """Every head's output at each prompt's last token, ``[B, L, H, d_head]``."""
        out = []
        for sub in pb.batches(batch_size):
            z = hooks.activations(model, sub.tokens, names, extras=sub.extras)
            out.append(torch.stack([sub.at_last(z[n]).float().cpu() for n in names], 1))
        return torch.cat(out)

    with peak_memory(model.cfg.device) as mem:
        zw, zo = last_z(batch), last_z(wo)
    per_prompt = (zw - zo).norm(dim=-1)  # [B, L, H]
    if relative:
        per_prompt = per_prompt / zw.norm(dim=-1).clamp(min=1e-9)
    return HeadScores(
        values=per_prompt.mean(0), axis_names=("layer", "head"),
        labels={"layer": [f"L{l}" for l in range(L)], "head": [f"H{h}" for h in range(H)]},
        per_prompt=per_prompt,
        metadata=dict(method="head_divergence", relative=relative, n_prompts=B, batch_size=batch_size, peak_memory=mem,
                      span="image" if span == "image" else "context",
                      title="head divergence (VHD)" + (" relative" if relative else "")),
    )


# ----------------------------------------------------------------------------------------------
# direct logit attribution
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class DLAResult(Result):
    """Direct logit attribution over ``("component",)``: ``embed``, ``L{l}H{h}``, ``L{l} mlp``,
    bias terms. ``values`` sum to the mean logit difference (``baselines["logit_diff"]``)."""

    n_layers: int = 0
    n_heads: int = 0

    def heads(self) -> Result:
        """The head terms as a ``[layer, head]`` table."""
        L, H = self.n_layers, self.n_heads
        idx = [self.labels["component"].index(f"L{l}H{h}") for l in range(L) for h in range(H)]
        pp = None if self.per_prompt is None else self.per_prompt[:, idx].reshape(-1, L, H)
        return Result(values=self.values[idx].reshape(L, H), axis_names=("layer", "head"),
                      labels={"layer": [f"L{l}" for l in range(L)], "head": [f"H{h}" for h in range(H)]},
                      per_prompt=pp, metadata={**self.metadata, "title": "DLA per head"})

    def mlps(self) -> Result:
        """The MLP terms as a ``[layer]`` table."""
        idx = [self.labels["component"].index(f"L{l} mlp") for l in range(self.n_layers)]
        return Result(values=self.values[idx], axis_names=("layer",),
                      labels={"layer": [f"L{l}" for l in range(self.n_layers)]},
                      per_prompt=None if self.per_prompt is None else self.per_prompt[:, idx],
                      metadata={**self.metadata, "title": "DLA per MLP"})


def frozen_norm(model, norm, x: Tensor, y: Tensor, *, what: str = "final norm"):
    """A norm made linear by freezing its statistics at input ``x`` (``[b, d]``), checked
    against its real output ``y``: returns ``(f, bias)`` with ``f(x) + bias == y``, and
    ``Σ f(c_i) == f(Σ c_i)`` for any split of ``x`` into components ``c_i``.

    The norm's form comes from :func:`mechlib.arch.describe` (RMSNorm or LayerNorm, Gemma's
    ``1 + w`` offset); folded norms (compatibility mode) carry no weight.
    """
    from mechlib.arch import describe

    arch = describe(model)
    hf = getattr(norm, "original_component", None)
    eps = float(getattr(hf, "eps", None) or getattr(hf, "variance_epsilon", None) or getattr(model.cfg, "eps", 1e-5))
    kind = str(getattr(model.cfg, "normalization_type", "RMS"))
    center = arch.norm == "LN"
    xc = x - x.mean(-1, keepdim=True) if center else x
    scale = (xc.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    params = dict(norm.named_parameters())
    w = next((v.detach().float().cpu() for k, v in params.items() if k.endswith("weight")), None)
    b = next((v.detach().float().cpu() for k, v in params.items() if k.endswith("bias")), None)
    if kind.endswith("Pre"):
        w = b = None
    elif w is not None:
        w = w + arch.norm_offset

    def f(c: Tensor) -> Tensor:
        c = c - c.mean(-1, keepdim=True) if center else c
        c = c * (scale if c.ndim == 2 else scale[:, None])  # [b, d] or [b, component, d]
        return c * w if w is not None else c

    bias = torch.zeros_like(x) if b is None else b.expand_as(x)
    # a half-precision model's norm output is rounded (twice, in HF's RMSNorm): to 2 ulps of each value
    if not torch.allclose(f(x) + bias, y, atol=1e-3 * float(y.abs().max()) + 1e-5,
                          rtol=4 * unit_roundoff(model.cfg.dtype)):
        raise NotImplementedError(f"could not reproduce this model's {what} from its input ({arch.family}, "
                                  f"{arch.norm}): DLA would not decompose its logits exactly")
    return f, bias


def _final_norm_frozen(model, x: Tensor, y: Tensor):
    return frozen_norm(model, model.ln_final, x, y)


@records
def direct_logit_attribution(model, contrast: ContrastSet, *, batch_size: Optional[int] = None) -> DLAResult:
    """Split each prompt's logit difference (answer − wrong answer, last token) into the direct
    contributions of the embedding, every head, every MLP and the bias terms.

    The final norm's scale is frozen at the clean run's value, so the terms sum exactly (up to
    float error) to the logit difference. Works on the raw bridge of every family in the test
    matrix: RMSNorm or LayerNorm (Gemma's ``1 + w``), parallel blocks (Pythia), and post-norms
    (Gemma 2/3, OLMo-2), where each head's share of the post-attention norm is linear with that
    norm's statistics frozen too. With an output soft cap (Gemma 2) the terms decompose the logit
    difference *before* the cap (``metadata["logit_softcap"]``; the cap is monotone).

    Args:
        batch_size: prompts per forward (default all); results do not depend on it.

    Returns:
        :class:`DLAResult` over ``("component",)``; ``.heads()`` ``[layer, head]``, ``.mlps()``
        ``[layer]``.

    Example:
        >>> dla = mechlib.direct_logit_attribution(model, mechlib.tasks.ioi(model, n=8))  # doctest: +SKIP
        >>> dla.heads().top(5)
    """
    from mechlib.analyses.patching import prompt_batches
    from mechlib.arch import describe
    from mechlib.metrics import logit_diff

    arch = describe(model)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    parts, labels = [], None
    with peak_memory(model.cfg.device) as mem:
        for idx, sub, _ in prompt_batches(contrast, logit_diff(contrast), batch_size, trim=True):
            pp, labels, capped, pre_cap = _dla_batch(model, sub, arch)
            parts.append((pp, capped, pre_cap))
    per_prompt = torch.cat([p[0] for p in parts])
    ld = torch.cat([p[1] for p in parts])
    pre = torch.cat([p[2] for p in parts])
    return DLAResult(
        values=per_prompt.mean(0), axis_names=("component",), labels={"component": labels},
        per_prompt=per_prompt, baselines={"logit_diff": float(ld.mean()), "logit_diff_before_softcap": float(pre.mean())},
        n_layers=L, n_heads=H,
        metadata=dict(method="direct_logit_attribution", task=contrast.task, n_prompts=len(contrast),
                      max_sum_error=float((per_prompt.sum(1) - pre).abs().max()),
                      logit_softcap=arch.logit_softcap, post_norms=arch.post_norms, batch_size=batch_size,
                      peak_memory=mem, title="direct logit attribution"),
    )


def _dla_batch(model, contrast: ContrastSet, arch):
    L, H = model.cfg.n_layers, model.cfg.n_heads
    names = (["blocks.0.hook_resid_pre", "ln_final.hook_in", "ln_final.hook_out"]
             + [f"blocks.{l}.attn.hook_z" for l in range(L)] + [f"blocks.{l}.hook_mlp_out" for l in range(L)]
             + [f"blocks.{l}.hook_attn_out" for l in range(L)])
    if arch.post_norms:
        names += [f"blocks.{l}.ln1_post.hook_in" for l in range(L)]
    logits, acts = hooks.run_with_cache(model, contrast.clean_tokens, names, extras=contrast.forward_extras("clean"))
    batch = PromptBatch.from_prompts(model, contrast)
    at = lambda n: batch.at_last(acts[n]).float().cpu()  # noqa: E731  [B, ...] at each prompt's last token
    x, y = at("ln_final.hook_in"), at("ln_final.hook_out")
    norm, ln_bias = _final_norm_frozen(model, x, y)
    W_U = model.W_U.detach().float().cpu()
    direction = (W_U[:, contrast.answer_ids] - W_U[:, contrast.wrong_ids]).T  # [B, d_model]

    comps, labels = [at("blocks.0.hook_resid_pre")], ["embed"]
    stream = [comps[0]]  # what the residual stream adds, in order (its rounding in half precision)
    for l in range(L):
        W_O = model.blocks[l].attn.W_O.detach().float().cpu()  # [H, d_head, d_model]
        z = at(f"blocks.{l}.attn.hook_z")  # [B, H, d_head]
        heads = torch.einsum("bhe,hed->bhd", z, W_O)
        attn_out = at(f"blocks.{l}.hook_attn_out")
        if arch.post_norms:  # what the block adds is post_norm(Σ heads + bias): linear with its scale frozen
            raw = at(f"blocks.{l}.ln1_post.hook_in")
            post, _ = frozen_norm(model, model.blocks[l].ln1_post, raw, attn_out, what=f"layer {l}'s post-attention norm")
            heads = post(heads)
        comps += list(heads.unbind(1)) + [attn_out - heads.sum(1), at(f"blocks.{l}.hook_mlp_out")]
        stream += [attn_out, comps[-1]]
        labels += [f"L{l}H{h}" for h in range(H)] + [f"L{l} attn bias", f"L{l} mlp"]
    stack = torch.stack(comps, 1)  # [B, component, d_model]
    tol = 1e-3 * float(x.abs().max()) + 1e-4 + accumulation_bound(stream, model.cfg.dtype)
    if not bool(((stack.sum(1) - x).abs() <= tol).all()):
        raise NotImplementedError("the final residual is not the sum of embedding, head, MLP and bias "
                                  f"outputs on this architecture ({arch.family})")
    per_prompt = torch.einsum("bcd,bd->bc", norm(stack), direction)
    extra = (ln_bias * direction).sum(-1, keepdim=True)
    b_U = getattr(model, "b_U", None)
    if b_U is not None:
        b_U = b_U.detach().float().cpu()
        extra = extra + (b_U[contrast.answer_ids] - b_U[contrast.wrong_ids])[:, None]
    per_prompt = torch.cat([per_prompt, extra], 1)
    labels.append("final norm / unembed bias")
    from mechlib.metrics import logit_diff

    capped = logit_diff(contrast)(logits).float().cpu()
    if arch.logit_softcap:  # undo c·tanh(x/c) on the model's own logits of the two answers
        last = batch.at_last(logits).float().cpu()
        rows = torch.arange(len(contrast))
        c = arch.logit_softcap
        uncap = lambda v: c * torch.atanh((v / c).clamp(-1 + 1e-7, 1 - 1e-7))  # noqa: E731
        pre_cap = uncap(last[rows, contrast.answer_ids]) - uncap(last[rows, contrast.wrong_ids])
    else:
        pre_cap = capped
    return per_prompt, labels, capped, pre_cap
