"""Edge scores (:func:`edge_attribution` → :class:`EdgeScores`): EAP, EAP-IG on the inputs or on
the activations, clean-corrupted gradients, and exact edge patching, all edges of one gradient
point from one forward and one backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.analyses.edges.graph import Graph, GraphSpec, select
from mechlib.analyses.edges.wiring import (
    _check_additive,
    _check_inputs,
    _chunk,
    _masked_logits,
    _metric_name,
    _record,
    _rows,
    _split_qkv,
    _Wiring,
    _wiring,
)
from mechlib.memory import peak_memory
from mechlib.metrics import Metric, MetricError, check_metric_values, read_positions
from mechlib.provenance import records
from mechlib.results import Result
from mechlib.tasks.contrast import ContrastSet

METHODS = ("eap", "eap-ig", "eap-ig-activations", "clean-corrupted", "exact")


@dataclass(frozen=True, repr=False)
class EdgeScores(Result):
    """One score per edge: ``values [edge]`` (mean over prompts), ``labels["edge"]`` the edge
    names (``"L0H1->L1H0<q>"``), ``per_prompt [prompt, edge]`` when kept.

    Sign: ``score ≈ metric(clean) − metric(clean run with this edge patched from the corrupted
    run)`` — positive = the edge helps the clean behaviour (see the module docstring).

    Extra attributes:
        clean_per_prompt, corrupted_per_prompt: ``[prompt]`` metric of the clean / corrupted run
            (their means are ``baselines["clean"]`` / ``baselines["corrupted"]``).
    """

    clean_per_prompt: Optional[Tensor] = None
    corrupted_per_prompt: Optional[Tensor] = None

    @property
    def spec(self) -> GraphSpec:
        return GraphSpec(**self.metadata["spec"])

    def matrix(self) -> Tensor:
        """``[n_forward, n_backward]`` writer × reader table of the scores (0 where no edge)."""
        spec = self.spec
        m = torch.zeros(spec.n_forward, spec.n_backward)
        m[spec.edge_src, spec.edge_dst] = self.values.float()
        return m

    def to_dataframe(self):
        """One row per edge: ``edge`` (index), ``edge_label``, ``src``, ``dst``, ``value``
        (and ``stderr`` with per-prompt scores)."""
        df = super().to_dataframe()
        split = [n.split("->") for n in self.labels["edge"]]
        df.insert(2, "src", [s for s, _ in split])
        df.insert(3, "dst", [d for _, d in split])
        return df

    def top(self, k: int = 10, *, by_abs: bool = True, largest: bool = True):
        """The ``k`` edges with the largest |score| (``by_abs=False``: largest signed score)."""
        return super().top(k, by_abs=by_abs, largest=largest)

    def graph(self, top_n: int, *, method: str = "greedy", absolute: bool = True, prune: bool = True) -> Graph:
        """Select a circuit of (at most) ``top_n`` edges, then prune.

        Args:
            top_n: edges to select before pruning (the result can have fewer).
            method: ``"greedy"`` (the paper's: grow from the logits backwards, always taking the
                best-scoring edge into a node already in the graph) or ``"topn"`` (the ``top_n``
                best edges anywhere).
            absolute: rank by |score| (the paper) or by signed score (only edges that help).
            prune: drop nodes not on an input → logits path, and their edges (the reference does).

        Returns:
            a :class:`Graph` carrying these scores.
        """
        return select(self.spec, self.values, top_n, method=method, absolute=absolute, prune=prune,
                      metadata=dict(scores_method=self.metadata.get("method")))

    def plot(self, ax=None, *, title: Optional[str] = None, cmap: str = "RdBu_r", **kw):
        """Heatmap of the writer × reader score table (a matplotlib figure)."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=kw.pop("figsize", (9, 5)))
        else:
            fig = ax.figure
        spec = self.spec
        m = self.matrix()
        lim = float(m.abs().max()) or 1.0
        masked = m.masked_fill(~spec.real_mask, float("nan"))
        im = ax.imshow(masked.numpy(), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest", **kw)
        ax.set_ylabel("writer")
        ax.set_xlabel("reader input")
        if spec.n_forward <= 60:
            ax.set_yticks(range(spec.n_forward), spec.forward_names, fontsize=7)
        if spec.n_backward <= 80:
            ax.set_xticks(range(spec.n_backward), spec.backward_names, rotation=90, fontsize=7)
        fig.colorbar(im, ax=ax, label="score (+ = helps clean)")
        ax.set_title(title or self.metadata.get("title") or "edge scores")
        fig.tight_layout()
        return fig


@records
def edge_attribution(
    model,
    contrast: ContrastSet,
    metric: Metric,
    *,
    method: str = "eap-ig",
    ig_steps: int = 5,
    batch_size: Optional[int] = None,
    per_prompt: Optional[bool] = None,
    edges: Optional[Sequence[str]] = None,
    progress: Optional[bool] = None,
) -> EdgeScores:
    """Score every edge of the model's graph (EAP / EAP-IG, Hanna et al. 2024).

    Each score estimates ``metric(clean) − metric(clean run with edge u→v patched from the
    corrupted run)``: positive = the edge helps the clean behaviour.

    Methods (all edges from one forward + backward per gradient point; ``Δ_u = a_u(clean) −
    a_u(corrupted)`` is the real activation difference of writer ``u`` in every method):

    * ``"eap-ig"`` (default; the paper's EAP-IG, the reference's "EAP-IG-inputs"): the input
      embedding (``blocks.0.hook_resid_pre``) is moved from corrupted to clean,
      ``e_α = e_corr + α (e_clean − e_corr)`` at ``α = k/m, k = 1..m`` (``m = ig_steps``; the
      clean end is included, the corrupted end is not: the paper-era code, spec §2), and the
      reader-input gradients are averaged over the ``m`` points.
    * ``"eap"`` (Syed et al.): the gradient at the clean run only.
    * ``"clean-corrupted"``: the average of the gradients at the clean and the corrupted run.
    * ``"eap-ig-activations"``: for each layer node in turn (input, attention layer ``l``, MLP
      ``l``) its output is set to ``α·clean + (1 − α)·corrupted`` (``α = k/m, k = 1..m``), the
      clean prompt runs and all readers' gradients are accumulated; divided by ``(2L+1)·m``
      runs (the reference's ``ig-activations``; as there, a node whose output is replaced
      passes no gradient on its own runs, so its inputs and the paths through it get 0 there).
    * ``"exact"``: the quantity itself, one edge patched at a time (``n_edges`` forwards, batched
      as stacked copies) — the ground truth, for small models.

    Args:
        contrast: clean/corrupted pairs (pair ``i`` must have the same length, as ContrastSet ensures).
        metric: differentiable ``logits -> [batch]``, higher = more like clean (e.g.
            ``metrics.logit_diff(contrast)``; not accuracy).
        ig_steps: gradient points for the IG methods (the paper uses 5).
        batch_size: prompts per forward/backward (default all); results do not depend on it.
        per_prompt: keep the ``[prompt, edge]`` scores (default: when that is ≤ 25M numbers).
        edges: with ``method="exact"``, patch only these edges (names as in ``labels["edge"]``); the
            others get NaN — exact patching of a sample, to check the estimates on a large model.

    Returns:
        :class:`EdgeScores` over ``("edge",)`` with ``baselines`` clean/corrupted and
        ``metadata`` method, ig_steps, the graph spec. Gradients are enabled inside (also under
        ``torch.set_grad_enabled(False)``); parameters get no ``.grad``; the split-q/k/v flag of
        the bridge is restored and no hook is left behind, also when the metric raises.

    Example:
        >>> ioi = mechlib.tasks.ioi(model, n=16)                                     # doctest: +SKIP
        >>> scores = edge_attribution(model, ioi, mechlib.metrics.logit_diff(ioi))
        >>> circuit = scores.graph(200)                       # greedy + pruning, as in the paper
        >>> faithfulness(model, ioi, mechlib.metrics.logit_diff(ioi), circuit).recovery
    """
    from mechlib.analyses.patching.attribution import gradients_available
    from mechlib.analyses.patching.common import _check_batch_size, _progress, prompt_batches

    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)} ('eap-ig' is the paper's)")
    if method != "exact":
        gradients_available(f"edge_attribution(method={method!r})")
        if edges is not None:
            raise ValueError("edges= restricts method='exact' (the gradient methods score every edge at once)")
    if not isinstance(ig_steps, int) or isinstance(ig_steps, bool) or ig_steps < 1:
        raise ValueError(f"ig_steps={ig_steps!r}: give a positive number of interpolation points (the paper uses 5)")
    _check_batch_size(batch_size)
    _check_inputs(model, contrast, metric, "edge_attribution")
    w = _wiring(model)
    spec = w.spec
    only = None if edges is None else [spec.edge_index(e) for e in edges]
    B = len(contrast)
    keep = per_prompt if per_prompt is not None else B * spec.n_edges <= 25_000_000
    n_batches = -(-B // (batch_size or B))
    runs = {"eap": 1, "clean-corrupted": 2, "eap-ig": ig_steps,
            "eap-ig-activations": (2 * spec.n_layers + 1) * ig_steps, "exact": 1}[method]
    parts, total = [], torch.zeros(spec.n_edges)
    clean_vals, corr_vals = torch.empty(B), torch.empty(B)
    with _split_qkv(model), peak_memory(model.cfg.device) as mem, \
            _progress(n_batches * runs, f"edge attribution ({method})", progress) as bar:
        _check_additive(model, w, contrast.clean_tokens[:1], _rows(contrast.forward_extras("clean"), [0]))
        for idx, sub, m in prompt_batches(contrast, metric, batch_size):
            if method == "exact":
                pp, cv, kv = _exact_batch(model, w, sub, m, only)
                bar.update(1)
            else:
                pp, cv, kv = _gradient_batch(model, w, sub, m, method, ig_steps, bar)
            clean_vals[idx], corr_vals[idx] = cv, kv
            total += pp.sum(0)
            if keep:
                parts.append(pp)
    alphas = [k / ig_steps for k in range(1, ig_steps + 1)] if method in ("eap-ig", "eap-ig-activations") else None
    return EdgeScores(
        values=total / B, axis_names=("edge",), labels={"edge": spec.edge_names},
        per_prompt=torch.cat(parts) if keep else None,
        baselines={"clean": float(clean_vals.mean()), "corrupted": float(corr_vals.mean())},
        clean_per_prompt=clean_vals, corrupted_per_prompt=corr_vals,
        metadata=dict(method=method, ig_steps=ig_steps if alphas else None, ig_alphas=alphas,
                      sign="noising: score ≈ metric(clean) − metric(edge patched from corrupted); + helps clean",
                      metric=_metric_name(metric), task=contrast.task, n_prompts=B, batch_size=batch_size,
                      spec=spec.to_dict(), family=w.family,
                      post_norm="per-head share, norm scale frozen per run" if w.post_norm else None,
                      peak_memory=mem, title=f"edge scores ({method})"),
    )


def _grad_run(model, w: _Wiring, tokens: Tensor, extras, metric, embed: Tensor,
              replace: Optional[tuple[str, Tensor]] = None, *,
              read_pos: Optional[Tensor] = None) -> tuple[Tensor, list[Tensor]]:
    """One forward + backward: per-prompt metric values and ``d metric / d reader input`` for every
    reader hook (``[b, p, k, d]``; zeros where the input does not reach the metric). With
    ``read_pos`` (a metric that reads the last token only) only those positions are unembedded,
    forward and backward."""
    leaf = embed.detach().clone().requires_grad_(True)
    seen: dict[str, Tensor] = {}

    def capture(x, hook, name):
        # a fresh view, so the gradient is the one through this reader only (the MLP's input hook
        # sees the same tensor the residual skip connection carries on)
        seen[name] = x.view_as(x)
        return seen[name]

    hk = [(w.embed, lambda x, hook: leaf)]
    if replace is not None:
        const = replace[1].detach()
        hk.append((replace[0], lambda x, hook: const.to(x.dtype)))
    hk += [(s.hook, lambda x, hook, n=s.hook: capture(x, hook, n)) for s in w.slots]
    name = _metric_name(metric)
    with torch.enable_grad():
        if read_pos is not None:
            logits = hooks.forward_last(model, tokens, read_pos, hooks=hk, extras=extras, grad=True)
        else:
            logits = hooks.forward(model, tokens, hooks=hk, extras=extras, grad=True)
        vals = check_metric_values(metric(logits), tokens.shape[0], name=name)
        if not vals.requires_grad:
            raise MetricError(f"the metric {name!r} is not differentiable w.r.t. the model's activations (it "
                              "detaches or thresholds the logits, like accuracy): use a smooth metric such as "
                              "metrics.logit_diff for edge attribution")
        acts = [seen[s.hook] for s in w.slots]
        grads = torch.autograd.grad(vals.sum(), acts, allow_unused=True)
    out = []
    for s, a, g in zip(w.slots, acts, grads):
        g = torch.zeros_like(a) if g is None else g
        out.append((g[:, :, None] if s.flat else g).detach())
    return vals.detach(), out


def _gradient_batch(model, w: _Wiring, contrast: ContrastSet, metric, method: str, ig_steps: int, bar):
    spec = w.spec
    ex_clean, ex_corr = contrast.forward_extras("clean"), contrast.forward_extras("corrupted")
    clean_logits, A_clean, c_cache = _record(model, w, contrast.clean_tokens, ex_clean, extra_names=w.attn_out)
    corr_logits, A_corr, k_cache = _record(model, w, contrast.corrupted_tokens, ex_corr, extra_names=w.attn_out)
    B, name = len(contrast), _metric_name(metric)
    clean_vals = check_metric_values(metric(clean_logits), B, name=name).detach().cpu()
    corr_vals = check_metric_values(metric(corr_logits), B, name=name).detach().cpu()
    del clean_logits, corr_logits
    clean_tok = contrast.clean_tokens
    read = read_positions(metric, contrast)
    G: Optional[list[Tensor]] = None

    def add(grads: list[Tensor], weight: float):
        nonlocal G
        if G is None:
            G = [g.float() * weight for g in grads]
        else:
            for acc, g in zip(G, grads):
                acc.add_(g.float(), alpha=weight)
        bar.update(1)

    e_clean, e_corr = A_clean[:, :, 0], A_corr[:, :, 0]
    alphas = [k / ig_steps for k in range(1, ig_steps + 1)]  # paper-era EAP-IG: clean end in, corrupted out
    if method == "eap":
        add(_grad_run(model, w, clean_tok, ex_clean, metric, e_clean, read_pos=read)[1], 1.0)
    elif method == "clean-corrupted":
        add(_grad_run(model, w, clean_tok, ex_clean, metric, e_clean, read_pos=read)[1], 0.5)
        add(_grad_run(model, w, contrast.corrupted_tokens, ex_corr, metric, e_corr, read_pos=read)[1], 0.5)
    elif method == "eap-ig":
        for a in alphas:
            add(_grad_run(model, w, clean_tok, ex_clean, metric, e_corr + a * (e_clean - e_corr), read_pos=read)[1], 1 / ig_steps)
    else:  # eap-ig-activations
        nodes = [(None, e_clean, e_corr)]
        for l in range(spec.n_layers):
            nodes.append((w.attn_out[l], c_cache[w.attn_out[l]], k_cache[w.attn_out[l]]))
            nodes.append((w.mlp_out[l], c_cache[w.mlp_out[l]], k_cache[w.mlp_out[l]]))
        wt = 1 / (len(nodes) * ig_steps)
        for hook_name, c, k in nodes:
            for a in alphas:
                mix = k + a * (c - k)
                if hook_name is None:
                    add(_grad_run(model, w, clean_tok, ex_clean, metric, mix, read_pos=read)[1], wt)
                else:
                    add(_grad_run(model, w, clean_tok, ex_clean, metric, e_clean, (hook_name, mix), read_pos=read)[1], wt)
    # mechlib sign: Δ = clean − corrupted, as [b, writer, pos·d] so each reader group is one bmm
    delta = (A_clean - A_corr).float().permute(0, 2, 1, 3).reshape(B, spec.n_forward, -1)
    S = torch.zeros(B, spec.n_forward, spec.n_backward, device=delta.device)
    for s, g in zip(w.slots, G):
        # every edge into these reader slots at once: Σ_pos,d Δ_u · ∂metric/∂input_v  ([b, prev, k])
        g = g.permute(0, 2, 1, 3).reshape(B, g.shape[2], -1)
        S[:, :s.prev, s.cols[0]:s.cols[-1] + 1] = torch.bmm(delta[:, :s.prev], g.transpose(1, 2))
    per_prompt = S[:, spec.edge_src.to(S.device), spec.edge_dst.to(S.device)].cpu()
    return per_prompt, clean_vals, corr_vals


def _exact_batch(model, w: _Wiring, contrast: ContrastSet, metric, only: Optional[Sequence[int]] = None):
    """``metric(clean) − metric(clean with one edge ablated to its corrupted value)`` per edge (the
    edges ``only``, when given; NaN elsewhere)."""
    spec = w.spec
    ex_clean = contrast.forward_extras("clean")
    clean_logits, _, _ = _record(model, w, contrast.clean_tokens, ex_clean)
    corr_logits, A_corr, _ = _record(model, w, contrast.corrupted_tokens, contrast.forward_extras("corrupted"))
    B, name = len(contrast), _metric_name(metric)
    clean_vals = check_metric_values(metric(clean_logits), B, name=name).detach().cpu()
    corr_vals = check_metric_values(metric(corr_logits), B, name=name).detach().cpu()
    chunk = _chunk(model, B, contrast.n_pos, spec.n_forward * model.cfg.d_model * 2)
    out = torch.full((B, spec.n_edges), float("nan"))
    src, dst = spec.edge_src, spec.edge_dst
    todo = list(range(spec.n_edges)) if only is None else list(only)
    for e0 in range(0, len(todo), chunk):
        es = todo[e0:e0 + chunk]
        notin = torch.zeros(len(es), spec.n_forward, spec.n_backward, dtype=torch.bool)
        notin[torch.arange(len(es)), src[es], dst[es]] = True
        logits = _masked_logits(model, w, contrast.clean_tokens, ex_clean, A_corr, notin)
        vals = check_metric_values(metric(logits), len(es) * B, name=name).detach().cpu()
        out[:, es] = clean_vals[:, None] - vals.reshape(len(es), B).T
    return out, clean_vals, corr_vals
