"""Faithfulness of a circuit (:func:`faithfulness`): the model run with everything outside an edge
:class:`~mechlib.analyses.edges.graph.Graph` or a head :class:`~mechlib.analyses.circuits.Circuit`
ablated, as the recovered share of the clean − ablated gap with a BCa bootstrap interval; and
:func:`faithfulness_curve`, the same for circuits of several sizes selected from one set of scores.

It evaluates both kinds of circuit, so it imports :mod:`mechlib.analyses.circuits` (which never
imports the edges package): the arrows point down.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.analyses.circuits import Circuit
from mechlib.analyses.edges import wiring
from mechlib.analyses.edges.graph import EdgeGraphError, Graph
from mechlib.analyses.edges.scoring import EdgeScores
from mechlib.memory import peak_memory
from mechlib.metrics import Metric, MetricError, check_metric_values
from mechlib.provenance import records
from mechlib.results import Result
from mechlib.tasks.contrast import ContrastSet

ABLATIONS = ("corrupted", "mean", "zero", "resample")


def _bca(circuit: Tensor, clean: Tensor, ablated: Tensor, level: float, seed: int,
         n_boot: int = 2000) -> tuple[tuple[float, float], str]:
    """BCa bootstrap interval of the recovery ``(mean circuit − mean ablated) / (mean clean − mean
    ablated)``, resampling prompts (the three values of a prompt stay together)."""
    import numpy as np
    from scipy.stats import bootstrap

    n = len(circuit)
    if n < 3:
        return (float("nan"), float("nan")), "none (fewer than 3 prompts)"
    data = tuple(x.double().numpy() for x in (circuit, clean, ablated))

    def ratio(c, k, a, axis=-1):
        return (c.mean(axis) - a.mean(axis)) / (k.mean(axis) - a.mean(axis))

    point = float(ratio(*data))
    if all(np.allclose(d, d[0]) for d in data) or np.allclose(data[0], data[1]) or np.allclose(data[0], data[2]):
        return (point, point), "exact (no spread over prompts)"
    for how in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bootstrap(data, ratio, paired=True, vectorized=True, method=how, n_resamples=n_boot,
                            confidence_level=level, random_state=seed)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return (lo, hi), f"{how} bootstrap of the ratio of prompt means (scipy, {n_boot} resamples)"
    return (float("nan"), float("nan")), "bootstrap failed (degenerate resamples)"


@dataclass(frozen=True, repr=False)
class FaithfulnessResult(Result):
    """How much of the clean behaviour a circuit keeps when everything outside it is ablated.

    ``values = [recovery, circuit, clean, ablated]`` (axis ``"measure"``): recovery is the ratio of
    prompt means ``(circuit − ablated) / (clean − ablated)`` (1 = the circuit does everything the
    model does, 0 = no better than ablating everything); the others are mean metric values.
    ``per_prompt [prompt, 4]`` holds each prompt's own ratio (unstable where clean ≈ ablated; not
    what ``recovery`` averages) and its three metric values. ``interval`` is a BCa bootstrap CI of
    the recovery over prompts (``metadata["ci_method"]``).
    """

    interval: tuple = (float("nan"), float("nan"))

    @property
    def recovery(self) -> float:
        return float(self.values[0])

    @property
    def circuit(self) -> float:
        return float(self.values[1])

    def ci(self, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[Tensor, Tensor]:
        """``(low, high)`` like ``values``: the recovery's BCa interval of the ratio of prompt
        means (prompts resampled, as :attr:`interval`), percentile intervals of the three means."""
        lo, hi = super().ci(level, n_boot, seed)
        (lo[0], hi[0]), _ = _bca(self.per_prompt[:, 1], self.per_prompt[:, 2], self.per_prompt[:, 3], level, seed,
                                 n_boot)
        return lo, hi

    def summary(self) -> str:
        lo, hi = self.interval
        m = self.metadata
        return (f"FaithfulnessResult(recovery {self.recovery:.3f} [{lo:.3f}, {hi:.3f}] with {m.get('size')} "
                f"{m.get('units')}, {m.get('ablation')} ablation, {self.n_prompts} prompts)")


def _ablation_sources(model, w: wiring._Wiring, contrast: ContrastSet, ablation: str, batch_size, seed: int,
                      z_only: bool = False):
    """A function ``idx -> [b, p, F, d] writers`` (or per-layer ``hook_z``) of the ablated run."""
    B = len(contrast)
    if ablation == "resample":
        if B < 2:
            raise ValueError("ablation='resample' takes another prompt's activation: give at least 2 prompts")
        if not contrast.same_length:
            warnings.warn("ablation='resample' with prompts of different lengths: a prompt receives another "
                          "prompt's activations position by position, padding included", stacklevel=3)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(B, generator=g)
        perm = torch.empty(B, dtype=torch.long)
        perm[order] = order.roll(-1)  # a random cycle: no prompt keeps its own activations
    mean = None
    if ablation == "mean":  # per-position mean over the corrupted prompts that are real there
        from mechlib.analyses.patching.common import _check_batch_size

        _check_batch_size(batch_size)
        tot, cnt = None, torch.zeros(contrast.n_pos)
        size = batch_size or B
        for s in range(0, B, size):
            idx = list(range(s, min(s + size, B)))
            toks = contrast.corrupted_tokens[idx]
            ex = wiring._rows(contrast.forward_extras("corrupted"), idx)
            a = _z_record(model, w, toks, ex) if z_only else wiring._record(model, w, toks, ex)[1]
            msk = (torch.arange(contrast.n_pos)[None, :] < contrast.lengths[idx][:, None]).to(a.device)
            part = (a * msk.reshape(*msk.shape, *([1] * (a.ndim - 2))).to(a.dtype)).sum(0)
            tot = part if tot is None else tot + part
            cnt += msk.sum(0).cpu()
        mean = tot / cnt.clamp(min=1).to(tot.device).reshape(-1, *([1] * (tot.ndim - 1)))

    def get(idx: Sequence[int], sub: ContrastSet) -> Tensor:
        if ablation == "corrupted":
            toks, ex = sub.corrupted_tokens, sub.forward_extras("corrupted")
        elif ablation == "resample":
            src = perm[list(idx)].tolist()
            toks, ex = contrast.clean_tokens[src], wiring._rows(contrast.forward_extras("clean"), src)
        elif ablation == "mean":
            return mean[None].expand(len(idx), *mean.shape)
        else:
            return None  # zero: built by the caller with the right shape
        return _z_record(model, w, toks, ex) if z_only else wiring._record(model, w, toks, ex)[1]

    return get


def _z_record(model, w: wiring._Wiring, tokens: Tensor, extras) -> Tensor:
    """``hook_z`` of every layer, stacked: ``[b, p, L, H, d_head]``."""
    cache = hooks.activations(model, tokens, w.z, extras=extras)
    return torch.stack([cache[n] for n in w.z], 2)


def _circuit_masks(w: wiring._Wiring, circuits: Sequence) -> tuple[Tensor, str, list[int]]:
    """Stacked ablation masks for Graphs (``[C, F, Bk]`` edges not in the circuit) or head
    Circuits (``[C, L, H]`` heads not in it); plus the unit kind and each circuit's size."""
    spec = w.spec
    if all(isinstance(c, Graph) for c in circuits):
        for c in circuits:
            if c.spec != spec:
                raise EdgeGraphError(f"the graph was built for {c.spec!r} but this model is {spec!r}: select it from "
                                     "this model's edge_attribution scores")
        return torch.stack([spec.real_mask & ~c.matrix() for c in circuits]), "edges", [len(c) for c in circuits]
    if all(isinstance(c, Circuit) for c in circuits):
        masks = []
        for c in circuits:
            if (c.n_layers, c.n_heads) != (spec.n_layers, spec.n_heads):
                raise EdgeGraphError(f"the circuit has {c.n_layers}x{c.n_heads} heads but this model "
                                     f"{spec.n_layers}x{spec.n_heads}: it was found on another model")
            m = torch.ones(spec.n_layers, spec.n_heads, dtype=torch.bool)
            for l, h in c.heads:
                m[l, h] = False
            masks.append(m)
        return torch.stack(masks), "heads", [len(c) for c in circuits]
    raise TypeError("circuit must be an edge Graph (EdgeScores.graph) or a head Circuit (find_circuit), got "
                    + ", ".join(type(c).__name__ for c in circuits))


def _head_ablated_logits(model, w: wiring._Wiring, tokens: Tensor, extras, z_abl: Optional[Tensor], masks: Tensor) -> Tensor:
    """Logits of ``C`` stacked copies; copy ``c`` replaces heads ``masks[c]`` at ``hook_z`` by ``z_abl``."""
    C, b = masks.shape[0], tokens.shape[0]

    def patch(x, hook, l):
        m = masks[:, l].to(x.device)  # [C, H]
        if not bool(m.any()):
            return None
        xs = x.reshape(C, b, *x.shape[1:])
        src = torch.zeros_like(xs[0]) if z_abl is None else z_abl[:, :, l].to(x.device, x.dtype)
        return torch.where(m[:, None, None, :, None], src[None], xs).reshape(x.shape)

    hk = [(w.z[l], lambda x, hook, l=l: patch(x, hook, l)) for l in range(w.spec.n_layers) if bool(masks[:, l].any())]
    return hooks.forward(model, tokens.repeat(C, 1), hooks=hk, extras=wiring._tile(extras, C))


def _evaluate(model, contrast: ContrastSet, metric, circuits: Sequence, *, ablation: str, batch_size, seed: int,
              progress=None, desc: str = "faithfulness"):
    """Per-prompt metric of each circuit ``[C, prompt]``, and clean / ablated / corrupted ``[prompt]``."""
    from mechlib.analyses.patching.common import _progress, prompt_batches

    if ablation not in ABLATIONS:
        raise ValueError(f"ablation={ablation!r}: choose one of {', '.join(ABLATIONS)}")
    wiring._check_inputs(model, contrast, metric, desc)
    w = wiring._wiring(model)
    masks, units, sizes = _circuit_masks(w, circuits)
    C, B = len(circuits), len(contrast)
    heads = units == "heads"
    empty = torch.ones_like(masks[:1]) if heads else w.spec.real_mask[None]  # every unit ablated
    full_masks = torch.cat([masks, empty])
    values = torch.empty(C + 1, B)
    clean_vals, corr_vals = torch.empty(B), torch.empty(B)
    name = wiring._metric_name(metric)
    with torch.no_grad(), wiring._split_qkv(model), peak_memory(model.cfg.device) as mem:
        if not heads:
            wiring._check_additive(model, w, contrast.clean_tokens[:1], wiring._rows(contrast.forward_extras("clean"), [0]))
        sources = _ablation_sources(model, w, contrast, ablation, batch_size, seed, z_only=heads)
        n_batches = -(-B // (batch_size or B))
        with _progress(n_batches, desc, progress) as bar:
            for idx, sub, m in prompt_batches(contrast, metric, batch_size):
                ex = sub.forward_extras("clean")
                b = len(sub)
                clean_vals[idx] = check_metric_values(
                    m(hooks.forward(model, sub.clean_tokens, extras=ex)), b, name=name).cpu()
                corr_vals[idx] = check_metric_values(
                    m(hooks.forward(model, sub.corrupted_tokens, extras=sub.forward_extras("corrupted"))),
                    b, name=name).cpu()
                abl = sources(idx, sub)
                chunk = wiring._chunk(model, b, sub.n_pos, 0 if heads else _per_copy_floats(w))
                for c0 in range(0, C + 1, chunk):
                    part = full_masks[c0:c0 + chunk]
                    if heads:
                        logits = _head_ablated_logits(model, w, sub.clean_tokens, ex, abl, part)
                    else:
                        if abl is None:
                            abl = torch.zeros(b, sub.n_pos, w.spec.n_forward, model.cfg.d_model,
                                              dtype=model.cfg.dtype, device=model.cfg.device)
                        logits = wiring._masked_logits(model, w, sub.clean_tokens, ex, abl, part)
                    vals = check_metric_values(m(logits), len(part) * b, name=name).cpu()
                    values[c0:c0 + len(part), idx] = vals.reshape(len(part), b)
                bar.update(1)
    return dict(circuit=values[:C], ablated=values[C], clean=clean_vals, corrupted=corr_vals, units=units,
                sizes=sizes, peak_memory=mem, metric=name)


def _per_copy_floats(w: wiring._Wiring) -> int:
    return 2 * w.spec.n_forward * int(w.W_O[0].shape[-1])


def _recovery(circuit: Tensor, clean: Tensor, ablated: Tensor) -> float:
    gap = float(clean.mean() - ablated.mean())
    if abs(gap) < 1e-8:
        raise MetricError("the clean run and the fully ablated run have the same mean metric: recovery is "
                          "undefined (is the contrast set's corruption changing the behaviour? check "
                          "metrics.evaluate on both sides)")
    return float(circuit.mean() - ablated.mean()) / gap


@records
def faithfulness(
    model,
    contrast: ContrastSet,
    metric: Metric,
    circuit,
    *,
    ablation: str = "corrupted",
    batch_size: Optional[int] = None,
    seed: int = 0,
    level: float = 0.95,
) -> FaithfulnessResult:
    """Run the model with everything outside ``circuit`` ablated; how much of the clean metric is left?

    * an edge :class:`Graph`: every edge *not* in the graph is ablated — each reader input is
      rebuilt as ``input − Σ_{u→v not in graph} (a_u(this run) − a_u(ablated))`` through the
      split q/k/v inputs, MLP inputs and the final residual, so circuit edges carry the circuit
      run's own activations (which reflect upstream ablations), as in the reference's
      ``evaluate_graph``. The graph is evaluated as given (graphs from
      :meth:`EdgeScores.graph` are already pruned).
    * a head :class:`~mechlib.analyses.circuits.Circuit`: every head outside it is replaced at
      its output ``hook_z``; MLPs and the embedding are left alone.

    Ablations: ``"corrupted"`` (the same prompt's corrupted run: the paper's patching),
    ``"mean"`` (per position, the mean over the contrast set's corrupted prompts that have a real
    token there), ``"zero"`` and ``"resample"`` (another prompt's clean activation, a seeded
    random cycle over the prompts). For edges, the input node's write is the token + position
    embedding, so ``"zero"``/``"mean"`` ablate positions too.

    Returns:
        :class:`FaithfulnessResult`: ``recovery = (circuit − ablated) / (clean − ablated)`` over
        prompt means, where *ablated* is the run with every unit ablated (the empty circuit: with
        ``"corrupted"`` and edges, exactly the corrupted run), per-prompt values and a BCa
        bootstrap ``interval`` (``level``); ``baselines`` clean, ablated and corrupted.

    Example:
        >>> r = faithfulness(model, ioi, metrics.logit_diff(ioi), scores.graph(300))   # doctest: +SKIP
        >>> r.recovery, r.interval
    """
    ev = _evaluate(model, contrast, metric, [circuit], ablation=ablation, batch_size=batch_size, seed=seed)
    circ, clean, abl = ev["circuit"][0], ev["clean"], ev["ablated"]
    rec = _recovery(circ, clean, abl)
    interval, how = _bca(circ, clean, abl, level, seed)
    with torch.no_grad():
        per = (circ - abl) / (clean - abl)
    return FaithfulnessResult(
        values=torch.tensor([rec, float(circ.mean()), float(clean.mean()), float(abl.mean())]),
        axis_names=("measure",), labels={"measure": ["recovery", "circuit", "clean", "ablated"]},
        per_prompt=torch.stack([per, circ, clean, abl], 1),
        baselines={"clean": float(clean.mean()), "ablated": float(abl.mean()), "corrupted": float(ev["corrupted"].mean())},
        interval=interval,
        metadata=dict(ablation=ablation, units=ev["units"], size=ev["sizes"][0], ci_method=how, level=level,
                      metric=ev["metric"], task=contrast.task, n_prompts=len(contrast), batch_size=batch_size,
                      seed=seed, peak_memory=ev["peak_memory"], title=f"faithfulness ({ablation} ablation)"),
    )


@dataclass(frozen=True, repr=False)
class FaithfulnessCurve(Result):
    """Faithfulness against circuit size: ``values [size]`` recovery (ratio of prompt means) of
    the circuit selected with ``top_n = size`` edges; ``n_edges`` the edges left after pruning;
    ``low``/``high`` the BCa interval per size; ``circuit_per_prompt [prompt, size]`` and the
    clean / ablated per-prompt metric."""

    n_edges: Optional[Tensor] = None
    low: Optional[Tensor] = None
    high: Optional[Tensor] = None
    circuit_per_prompt: Optional[Tensor] = None
    clean_per_prompt: Optional[Tensor] = None
    ablated_per_prompt: Optional[Tensor] = None

    def plot(self, ax=None, *, title: Optional[str] = None, log: bool = True, **kw):
        """Recovery against the number of edges left (after pruning), with the interval band."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=kw.pop("figsize", (6.5, 4)))
        else:
            fig = ax.figure
        x = self.n_edges.float().numpy()
        y = self.values.float().numpy()
        label = kw.pop("label", self.metadata.get("scores_method") or "circuit")
        ax.plot(x, y, marker="o", label=label, **kw)
        if self.low is not None and not torch.isnan(self.low).all():
            ax.fill_between(x, self.low.numpy(), self.high.numpy(), alpha=0.2)
        ax.axhline(1.0, color="#888", lw=0.8, ls="--")
        ax.axhline(0.0, color="#888", lw=0.8, ls=":")
        if log and (x > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel("edges in the circuit (after pruning)")
        ax.set_ylabel("normalized faithfulness")
        ax.set_title(title or self.metadata.get("title") or "faithfulness")
        ax.legend()
        fig.tight_layout()
        return fig


@records
def faithfulness_curve(
    model,
    contrast: ContrastSet,
    metric: Metric,
    scores: EdgeScores,
    sizes: Sequence[int] = (10, 20, 50, 100, 200, 500, 1000),
    *,
    selection: str = "greedy",
    absolute: bool = True,
    ablation: str = "corrupted",
    batch_size: Optional[int] = None,
    seed: int = 0,
    level: float = 0.95,
    progress: Optional[bool] = None,
) -> FaithfulnessCurve:
    """Faithfulness of the circuits selected from ``scores`` at each requested size (the paper's
    Figure 3): one forward per batch evaluates several sizes at once as stacked copies.

    Args:
        scores: :func:`edge_attribution` scores of this model.
        sizes: requested ``top_n`` per circuit (sizes above the number of edges are clipped).
        selection, absolute: see :meth:`EdgeScores.graph`.
        ablation, batch_size, seed, level: see :func:`faithfulness`.

    Returns:
        :class:`FaithfulnessCurve` (``.plot()`` gives recovery vs edges left after pruning).
    """
    if not isinstance(scores, EdgeScores):
        raise TypeError(f"scores must be EdgeScores from edge_attribution, got {type(scores).__name__}")
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 0 for s in sizes):
        raise ValueError(f"sizes={sizes!r}: give one or more edge counts >= 0")
    graphs = [scores.graph(min(s, scores.spec.n_edges), method=selection, absolute=absolute) for s in sizes]
    ev = _evaluate(model, contrast, metric, graphs, ablation=ablation, batch_size=batch_size, seed=seed,
                   progress=progress, desc="faithfulness curve")
    clean, abl = ev["clean"], ev["ablated"]
    recs, lows, highs = [], [], []
    for c in ev["circuit"]:
        recs.append(_recovery(c, clean, abl))
        (lo, hi), how = _bca(c, clean, abl, level, seed)
        lows.append(lo)
        highs.append(hi)
    return FaithfulnessCurve(
        values=torch.tensor(recs), axis_names=("size",), labels={"size": [str(s) for s in sizes]},
        baselines={"clean": float(clean.mean()), "ablated": float(abl.mean()), "corrupted": float(ev["corrupted"].mean())},
        n_edges=torch.tensor([len(g) for g in graphs]), low=torch.tensor(lows), high=torch.tensor(highs),
        circuit_per_prompt=ev["circuit"].T.contiguous(), clean_per_prompt=clean, ablated_per_prompt=abl,
        metadata=dict(ablation=ablation, selection=selection, absolute=absolute, sizes=sizes,
                      scores_method=scores.metadata.get("method"), metric=ev["metric"], task=contrast.task,
                      n_prompts=len(contrast), level=level, batch_size=batch_size, seed=seed,
                      peak_memory=ev["peak_memory"], title=f"faithfulness vs size ({scores.metadata.get('method')})"),
    )
