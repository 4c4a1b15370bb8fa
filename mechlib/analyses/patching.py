"""Activation patching, attribution patching and path patching — batched, exact, resumable.

**Activation patching** (causal tracing; Meng et al. 2022, Wang et al. 2022): run the corrupted
prompt, overwrite one activation (a residual position, a head's output ...) with its value from the
clean run, and measure how much of the clean behaviour comes back. Values equal TransformerLens'
``patching.get_act_patch_*`` on the same inputs (tested), but mechlib

* stacks many patched variants into the batch axis (one forward per chunk, not per cell), and
* resumes each forward at the patched layer from the recorded corrupted run, so earlier blocks are
  not recomputed (the bridge's ``start_at_layer`` still runs them). Resuming is checked once per
  call against the model's own logits; if it does not reproduce them, mechlib falls back to full
  forwards, which also carry ``pixel_values`` and other extra inputs.

**Attribution patching** (Nanda 2023; Syed et al. 2023): the first-order estimate
``metric(corrupted) + (clean - corrupted) · ∂metric/∂activation`` for every cell at once, from
one forward and one backward. Same result type, so the two tables compare directly.

**Path patching** (Wang et al. 2022): the effect of sender heads on chosen receivers only: run the
clean prompt with the senders' outputs taken from the corrupted run and every other head frozen
to its clean output; record what the receivers (their query/key/value inputs, or the logits) now
see; then patch just that into a clean run.

Most common misreading: a large patching effect at a position says the *information* there
matters for the metric, not that the component "computes the task"; and a zero effect can hide
backup components (negative/backup name movers compensate). Compare with path patching and with
several corruptions before naming a circuit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.flops import forward_flops
from mechlib.memory import peak_memory
from mechlib.metrics import Metric, check_metric_values, on_prompts
from mechlib.provenance import records
from mechlib.results import Result
from mechlib.sites import Site, SiteError, SiteSpec, check_head, check_layer, n_heads, site_spec
from mechlib.tasks.contrast import ContrastSet

# ----------------------------------------------------------------------------------------------
# result type
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class PatchingResult(Result):
    """Patching table: ``values`` are metric values of the patched runs (mean over prompts).

    Extra attributes:
        clean_per_prompt, corrupted_per_prompt: ``[prompt]`` baseline metric values.
    ``baselines`` holds their means (``"clean"``, ``"corrupted"``).
    """

    clean_per_prompt: Optional[Tensor] = None
    corrupted_per_prompt: Optional[Tensor] = None

    def normalized(self) -> Result:
        """Recovery ``(value - corrupted) / (clean - corrupted)``: 0 = corrupted run, 1 = clean run."""
        clean, corr = self.baselines["clean"], self.baselines["corrupted"]
        if abs(clean - corr) < 1e-8:
            raise ValueError("clean and corrupted baselines coincide: recovery is undefined")
        f = lambda v: None if v is None else (v - corr) / (clean - corr)  # noqa: E731
        return Result(values=f(self.values), axis_names=self.axis_names, labels=self.labels,
                      per_prompt=f(self.per_prompt), baselines={"clean": 1.0, "corrupted": 0.0},
                      metadata={**self.metadata, "normalized": True})

    def effect(self) -> Result:
        """``value - base run`` per cell (base = corrupted for denoising, clean for noising)."""
        base_name = "clean" if self.metadata.get("direction") == "noising" else "corrupted"
        base_pp = self.clean_per_prompt if base_name == "clean" else self.corrupted_per_prompt
        shape = (-1,) + (1,) * self.values.ndim
        return Result(
            values=self.values - self.baselines[base_name], axis_names=self.axis_names,
            labels=self.labels,
            per_prompt=None if self.per_prompt is None or base_pp is None
            else self.per_prompt - base_pp.reshape(shape),
            baselines={base_name: 0.0}, metadata={**self.metadata, "effect_vs": base_name},
        )


# ----------------------------------------------------------------------------------------------
# cells: which (layer, pos, head) combinations a sweep visits
# ----------------------------------------------------------------------------------------------


def _pos_labels(model, contrast: ContrastSet) -> list[str]:
    if contrast.same_length:
        return [f"{i}:{t}" for i, t in enumerate(contrast.str_tokens(model, 0))]
    return [f"pos{i}" for i in range(contrast.n_pos)]


def _check_indices(values: Optional[Iterable[int]], n: int, what: str) -> list[int]:
    if values is None:
        return list(range(n))
    out = []
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or not -n <= v < n:
            raise SiteError(f"{what} {v!r} is out of range 0..{n - 1}")
        out.append(v % n)
    if not out:
        raise SiteError(f"{what}s is empty")
    return out


@dataclass
class _Plan:
    spec: SiteSpec
    layers: list[int]
    positions: list[int]
    heads: list[int]
    by_position: bool

    @property
    def axis_names(self) -> tuple[str, ...]:
        head_axis = "kv_head" if self.spec.kv else "head"
        if not self.spec.per_head:
            return ("layer", "pos")
        if self.by_position:
            return ("layer", "pos", head_axis)
        return ("layer", head_axis)

    def cells(self) -> list[tuple[int, ...]]:
        """Cells within one layer: (pos,), (head,) or (pos, head)."""
        if not self.spec.per_head:
            return [(p,) for p in self.positions]
        if self.by_position:
            return [(p, h) for p in self.positions for h in self.heads]
        return [(h,) for h in self.heads]

    def labels(self, model, contrast: ContrastSet) -> dict[str, list[str]]:
        out = {"layer": [f"L{l}" for l in self.layers]}
        if "pos" in self.axis_names:
            every = _pos_labels(model, contrast)
            out["pos"] = [every[p] for p in self.positions]
        if self.spec.per_head:
            out[self.axis_names[-1]] = [f"{'KV' if self.spec.kv else 'H'}{h}" for h in self.heads]
        return out

    def shape(self) -> tuple[int, ...]:
        if not self.spec.per_head:
            return (len(self.layers), len(self.positions))
        if self.by_position:
            return (len(self.layers), len(self.positions), len(self.heads))
        return (len(self.layers), len(self.heads))


def _plan(model, contrast, site, by_position, layers, positions, heads) -> _Plan:
    spec = site_spec(site)
    if by_position and not spec.per_head:
        raise SiteError(f"site {spec.kind!r} is already resolved by position; drop by_position=True")
    layers = [check_layer(model, l) for l in (range(model.cfg.n_layers) if layers is None else layers)]
    if not layers:
        raise SiteError("layers is empty")
    positions = _check_indices(positions, contrast.n_pos, "position")
    head_list = [check_head(model, spec.kind, h) for h in heads] if heads is not None \
        else list(range(n_heads(model, spec.kind)))
    if spec.per_head and not head_list:
        raise SiteError("heads is empty")
    return _Plan(spec, layers, positions, head_list, by_position)


def _cell_index(spec: SiteSpec, by_position: bool, cells: Sequence[tuple[int, ...]], B: int, device):
    """Row-aligned index tensors for a chunk of cells (copy-major: rows k*B..(k+1)*B-1 = cell k)."""
    C = len(cells)
    rows = torch.arange(C * B, device=device)
    src = rows % B
    col = lambda i: torch.tensor([c[i] for c in cells], device=device).repeat_interleave(B)  # noqa: E731
    if not spec.per_head:
        return rows, src, col(0), None
    if by_position:
        return rows, src, col(0), col(1)
    return rows, src, None, col(0)


def _write_cells(spec: SiteSpec, act: Tensor, source: Tensor, idx, offset: int = 0) -> Tensor:
    """Copy the chosen cells of ``source[src]`` into ``act[rows]`` (both stacked copy-major).
    ``offset``: ``act`` holds positions ``offset..`` only (causal prefix reuse), ``source`` all."""
    rows, src, pos, head = idx
    at = None if pos is None else pos - offset
    act = act.clone()
    if not spec.per_head:  # [batch, pos, d]
        act[rows, at] = source[src, pos]
    elif spec.head_dim == 1:  # pattern [batch, head, q, k]; pos = destination (query) position
        if pos is None:
            act[rows, head] = source[src, head]
        else:
            act[rows, head, at] = source[src, head, pos]
    else:  # [batch, pos, head, d]
        if pos is None:
            act[rows, :, head] = source[src, :, head]
        else:
            act[rows, at, head] = source[src, pos, head]
    return act


# Per-forward overhead in token-rows (one prompt position through every block), for grouping the
# positions of a by-position sweep into forwards: small on the CPU, where the blocks' arithmetic
# dominates, large on a GPU, where launching a forward costs more than a few hundred rows.
_FORWARD_OVERHEAD_ROWS = {"cpu": 64, "cuda": 2048}


def _prefix_groups(cell_pos: Sequence[int], batch: int, n_pos: int, chunk: int,
                   overhead: int) -> list[tuple[int, list[int]]]:
    """Split a by-position sweep's cells into forwards ``(from_pos, [cell index, ...])`` that
    recompute positions ``from_pos..`` only: contiguous runs of positions chosen to minimise the
    token-rows recomputed plus ``overhead`` per forward, each at most ``chunk`` cells."""
    by_pos: dict[int, list[int]] = {}
    for i, p in enumerate(cell_pos):
        by_pos.setdefault(p, []).append(i)
    ps = sorted(by_pos)
    best, cut = [0.0] + [float("inf")] * len(ps), [0] * (len(ps) + 1)
    for j in range(1, len(ps) + 1):
        n = 0
        for i in range(j - 1, -1, -1):
            n += len(by_pos[ps[i]])
            cost = best[i] + -(-n // chunk) * overhead + n * batch * (n_pos - ps[i])
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(ps)
    while j > 0:
        i = cut[j]
        members = [c for p in ps[i:j] for c in by_pos[p]]
        groups += [(cell_pos[members[k]], members[k:k + chunk]) for k in range(0, len(members), chunk)]
        j = i
    return groups[::-1]


def _reduce_cells(spec: SiteSpec, prod: Tensor, by_position: bool) -> Tensor:
    """Per-prompt attribution from an elementwise product ``(clean - corr) * grad``.

    Returns ``[batch, pos]`` (resid-like), ``[batch, head]`` or ``[batch, pos, head]``.
    """
    if not spec.per_head:
        return prod.sum(-1)
    if spec.head_dim == 1:  # [b, head, q, k]
        per = prod.sum(-1)  # [b, head, q]
        return per.transpose(1, 2) if by_position else per.sum(-1)
    per = prod.sum(-1)  # [b, pos, head]
    return per if by_position else per.sum(1)


# ----------------------------------------------------------------------------------------------
# shared plumbing
# ----------------------------------------------------------------------------------------------


def _metric_name(metric) -> str:
    return getattr(metric, "__name__", type(metric).__name__)


def _check_contrast(model, contrast: ContrastSet) -> None:
    if not isinstance(contrast, ContrastSet):
        raise TypeError(f"contrast must be a mechlib ContrastSet, got {type(contrast).__name__}; "
                        f"build one with ContrastSet.from_prompts(model, clean, corrupted, answers, wrong)")
    vocab = model.cfg.d_vocab
    if int(contrast.clean_tokens.max()) >= vocab or int(contrast.corrupted_tokens.max()) >= vocab:
        raise ValueError("the contrast set's token ids exceed this model's vocabulary: was it built "
                         "with another model's tokenizer?")


def _chunk_size(model, contrast: ContrastSet, memory_budget_mb: float, max_chunk: int,
                last_only: bool = False) -> int:
    """How many patched copies of the batch fit in one forward under the memory budget."""
    cfg = model.cfg
    B, P = len(contrast), contrast.n_pos
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    # live activations of one copy in a no-grad forward: a few residual-sized tensors, one MLP
    # hidden, attention scores + pattern, and the logits at every position.
    floats = B * P * (12 * cfg.d_model + 3 * d_mlp + 3 * cfg.n_heads * P)
    floats += B * cfg.d_vocab * (1 if last_only else P)
    per_copy = floats * torch.finfo(cfg.dtype).bits // 8
    return int(max(1, min(max_chunk, memory_budget_mb * 2**20 // max(per_copy, 1))))


def _progress(total: int, desc: str, progress: Optional[bool]):
    from tqdm.auto import tqdm

    show = progress if progress is not None else total >= 20
    return tqdm(total=total, desc=desc, disable=not show, leave=False)


def _check_batch_size(batch_size: Optional[int]) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r}: give a positive number of prompts per forward, or None (all)")


def prompt_batches(contrast: ContrastSet, metric: Metric, batch_size: Optional[int], *, trim: bool = False):
    """``(indices, sub-contrast, metric for it)`` for consecutive batches of at most ``batch_size``
    prompts (one batch of everything for ``None``). Sub-sets keep the full width unless ``trim``,
    so position indices mean the same in every batch."""
    _check_batch_size(batch_size)
    n = len(contrast)
    size = n if batch_size is None else batch_size
    for s in range(0, n, size):
        idx = list(range(s, min(s + size, n)))
        if len(idx) == n:
            yield idx, contrast, metric
        else:
            yield idx, contrast.subset(idx, trim=trim), on_prompts(metric, idx, n)


def _fallback_warning(verb: str, reason: str) -> None:
    warnings.warn(f"{verb}: the fast path (resuming forwards at the patched layer) is off for this model, so "
                  f"every patched variant runs the full model (several times slower). Why: {reason}. The "
                  "result's metadata records path='full forwards'.", stacklevel=3)


# ----------------------------------------------------------------------------------------------
# activation patching
# ----------------------------------------------------------------------------------------------


@records
def activation_patching(
    model,
    contrast: ContrastSet,
    metric: Metric,
    *,
    site: str,
    by_position: bool = False,
    layers: Optional[Sequence[int]] = None,
    positions: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
    memory_budget_mb: float = 2048,
    max_chunk: int = 512,
    resume: bool = True,
    reuse_prefix: bool = True,
    progress: Optional[bool] = None,
) -> PatchingResult:
    """Patch clean activations into the corrupted run, one cell at a time (denoising).

    Args:
        contrast: the clean/corrupted pairs.
        metric: ``logits -> [batch]`` (e.g. ``metrics.logit_diff(contrast)``); higher = cleaner.
        site: ``resid_pre|resid_mid|resid_post|attn_out|mlp_out`` → ``[layer, pos]``;
            ``head_out|head_q|head_k|head_v|pattern`` → ``[layer, head]`` (all positions at once),
            or ``[layer, pos, head]`` with ``by_position=True``. ``head_k``/``head_v`` index KV
            heads on grouped-query models; ``pattern`` by position patches one query row.
        layers, positions, heads: restrict the sweep (default: everything).
        batch_size: prompts per forward (default all); results are the same for any value. Each
            forward stacks many patched copies of the batch, up to ``memory_budget_mb``.
        resume: start each forward at the patched layer (verified once against the full forward;
            if it cannot be verified, a warning says why and full forwards run).
        reuse_prefix: in by-position sweeps, recompute only the positions from the patched one on:
            with causal attention every earlier position is exactly as in the corrupted run, so its
            keys and values are taken from that run (verified once per model against the full
            forward; if it cannot be used, a warning says why). Needs a last-token metric.

    Returns:
        :class:`PatchingResult` with per-prompt values, ``baselines`` ``clean``/``corrupted``,
        ``normalized()`` recovery and ``ci()`` bootstrap intervals; ``metadata["path"]`` says which
        path ran, ``metadata["peak_memory"]`` the peak extra memory.

    Example:
        >>> ioi = mechlib.tasks.ioi(model, n=8)                                  # doctest: +SKIP
        >>> r = mechlib.activation_patching(model, ioi, metrics.logit_diff(ioi), site="resid_pre")
        >>> r.normalized().plot()
    """
    _check_contrast(model, contrast)
    plan = _plan(model, contrast, site, by_position, layers, positions, heads)
    spec = plan.spec
    if "pos" in plan.axis_names and not contrast.same_length:
        warnings.warn(
            "the prompts differ in length, so position p is a different token in different prompts "
            "(and padding in short ones): position-resolved values mix them. Sweep prompts of one "
            "template/length (ContrastSet.subset) for per-position results.", stacklevel=2)
    parts, reasons, chunk = [], [], None
    with peak_memory(model.cfg.device) as mem:
        for idx, sub, m in prompt_batches(contrast, metric, batch_size):
            out = _patch_batch(model, sub, m, plan, memory_budget_mb, max_chunk, resume, progress, reuse_prefix)
            parts.append(out)
            chunk = out["chunk"] if chunk is None else min(chunk, out["chunk"])
            if out["reason"]:
                reasons.append(out["reason"])
    if resume and reasons:
        _fallback_warning("activation_patching", reasons[0])
    prefix_reasons = [o["prefix_reason"] for o in parts if o["prefix_reason"]]
    prefix_used = bool(parts) and all(o["prefix"] for o in parts)
    if reuse_prefix and resume and prefix_reasons and not reasons:
        warnings.warn(f"activation_patching: causal prefix reuse is off for this sweep, so every patched copy "
                      f"recomputes all positions from the patched layer on (about twice the work). Why: "
                      f"{prefix_reasons[0]}. The result's metadata records prefix_reuse=False.", stacklevel=2)
    B = len(contrast)
    per_prompt = torch.cat([o["per_prompt"] for o in parts]).reshape(B, *plan.shape())
    resumed = resume and not reasons
    return _sweep_result(
        model, contrast, metric, plan, "activation_patching", per_prompt,
        torch.cat([o["clean"] for o in parts]), torch.cat([o["corrupted"] for o in parts]),
        metadata=dict(resumed=resumed,
                      path="resumed" if resumed else "full forwards",
                      fallback_reason=reasons[0] if reasons else None, prefix_reuse=prefix_used,
                      prefix_reason=prefix_reasons[0] if prefix_reasons else None,
                      forwards=sum(o["forwards"] for o in parts), flops=sum(o["flops"] for o in parts),
                      flops_one_forward_per_cell=sum(o["flops_one_forward_per_cell"] for o in parts),
                      chunk=chunk, batch_size=batch_size,
                      peak_memory=mem, positions=plan.positions, heads=plan.heads if spec.per_head else None),
    )


def _sweep_result(model, contrast: ContrastSet, metric, plan: "_Plan", method: str, per_prompt: Tensor,
                  clean_vals: Tensor, corr_vals: Tensor, metadata: dict) -> PatchingResult:
    """The :class:`PatchingResult` of a (layer x cell) sweep from its per-prompt table and baselines."""
    spec = plan.spec
    return PatchingResult(
        values=per_prompt.mean(0), axis_names=plan.axis_names, labels=plan.labels(model, contrast),
        per_prompt=per_prompt,
        baselines={"clean": float(clean_vals.mean()), "corrupted": float(corr_vals.mean())},
        clean_per_prompt=clean_vals, corrupted_per_prompt=corr_vals,
        metadata=dict(method=method, direction="denoising", site=spec.kind, by_position=plan.by_position,
                      metric=_metric_name(metric), task=contrast.task, n_prompts=len(contrast),
                      layers=plan.layers, **metadata,
                      title=f"{method.replace('_', ' ')}: {spec.kind}" + (" by position" if plan.by_position else "")),
    )


def _patch_batch(model, contrast: ContrastSet, metric: Metric, plan: "_Plan", memory_budget_mb: float,
                 max_chunk: int, resume: bool, progress: Optional[bool], reuse_prefix: bool = True) -> dict:
    """The sweep of ``plan`` on one batch of prompts: per-prompt values ``[b, layer, cell]`` and
    the baselines, with which path ran."""
    spec = plan.spec
    B = len(contrast)
    device = model.cfg.device
    name = _metric_name(metric)
    hook_names = [spec.hook_name(l) for l in plan.layers]
    # clean run: cache only the patched site at the swept layers
    clean_logits, clean_acts = hooks.run_with_cache(
        model, contrast.clean_tokens, hook_names, extras=contrast.forward_extras("clean"))
    clean_vals = check_metric_values(metric(clean_logits), B, name=name)
    del clean_logits
    # corrupted run: record each swept block's inputs so patched forwards can resume there
    with hooks.record_block_inputs(model, plan.layers if resume else []) as starts:
        corr_logits = hooks.forward(model, contrast.corrupted_tokens, extras=contrast.forward_extras("corrupted"))
    corr_vals = check_metric_values(metric(corr_logits), B, name=name)
    reason = hooks.resume_check(model, starts[min(plan.layers)], min(plan.layers), corr_logits) if resume else None
    resumed = resume and reason is None

    cells = plan.cells()
    read_pos = contrast.last_pos if getattr(metric, "last_token_only", False) else None
    chunk = _chunk_size(model, contrast, memory_budget_mb, max_chunk, read_pos is not None)
    # causal prefix reuse: a by-position cell at position p leaves positions < p as in the corrupted run
    prefix, prefix_reason = None, None
    if reuse_prefix and "pos" in plan.axis_names:
        if not resumed:
            prefix_reason = "it needs the resumed path, which is off"
        elif read_pos is None:
            prefix_reason = (f"the metric {name!r} reads every position (build it with last_token_only=True "
                             "if it reads only the last token)")
        else:
            try:
                prefix = hooks.record_prefix(model, starts[min(plan.layers)])
            except hooks.PrefixUnsupported as e:
                prefix_reason = str(e)
            if prefix is not None:
                rows = torch.arange(B, device=corr_logits.device)
                prefix_reason = hooks.prefix_check(model, starts[min(plan.layers)], prefix, read_pos,
                                                   corr_logits[rows, read_pos.to(corr_logits.device)])
                prefix = None if prefix_reason else prefix
    corr_last = None
    if prefix is not None:
        corr_last = corr_logits[torch.arange(B, device=corr_logits.device), read_pos.to(corr_logits.device)]
    del corr_logits
    if prefix is not None:
        overhead = _FORWARD_OVERHEAD_ROWS.get(torch.device(device).type, 256)
        groups = _prefix_groups([c[0] for c in cells], B, contrast.n_pos, chunk, overhead)
    else:
        groups = [(0, list(range(c0, min(c0 + chunk, len(cells))))) for c0 in range(0, len(cells), chunk)]
    per_prompt = torch.empty((B, len(plan.layers), len(cells)))
    corr_tokens = contrast.corrupted_tokens.to(device)
    extras = hooks.check_inputs(model, contrast.forward_extras("corrupted"), contrast.corrupted_tokens)
    last = read_pos.to(device) if read_pos is not None else None
    T, done = contrast.n_pos, 0  # done: matmul FLOPs of the patched forwards (mechlib.flops)
    with _progress(len(plan.layers) * len(groups), f"patching {spec.kind}", progress) as bar:
        for li, layer in enumerate(plan.layers):
            source = clean_acts[spec.hook_name(layer)]
            for p0, members in groups:
                part = [cells[i] for i in members]
                C = len(part)
                if prefix is not None and p0 > int(last.max()):  # after every prompt's answer position
                    per_prompt[:, li, members] = corr_vals.detach().cpu()[:, None]
                    bar.update(1)
                    continue
                idx = _cell_index(spec, plan.by_position, part, B, source.device)
                patch = [(spec.hook_name(layer),
                          lambda act, hook, idx=idx, source=source, p0=p0: _write_cells(spec, act, source, idx, p0))]
                out_rows = C * B if read_pos is not None else C * B * T
                if prefix is not None:
                    done += forward_flops(model, C * B, T - p0, T, start_layer=layer, unembedded=C * B)
                elif resumed:
                    done += forward_flops(model, C * B, T, start_layer=layer, unembedded=out_rows)
                else:
                    done += forward_flops(model, C * B, T, unembedded=C * B * T)
                if prefix is not None:
                    logits = hooks.run_from(model, starts[layer], layer, copies=C, hooks=patch,
                                            read_pos=last.clamp(min=p0), prefix=prefix, from_pos=p0)
                    before = (last < p0).repeat(C)  # answer read before the patch: the corrupted run's
                    if bool(before.any()):
                        logits[before] = corr_last.repeat(C, 1)[before].to(logits.device)
                elif resumed:
                    logits = hooks.run_from(model, starts[layer], layer, copies=C, hooks=patch, read_pos=read_pos)
                else:
                    tiled = {k: v.repeat(C, *([1] * (v.ndim - 1))) for k, v in extras.items()}
                    logits = hooks.forward(model, corr_tokens.repeat(C, 1), hooks=patch, extras=tiled)
                vals = check_metric_values(metric(logits), C * B, name=name)
                per_prompt[:, li, members] = vals.reshape(C, B).T.cpu()
                bar.update(1)
    return dict(per_prompt=per_prompt, clean=clean_vals.detach().cpu(), corrupted=corr_vals.detach().cpu(),
                reason=reason if resume else None, chunk=chunk, prefix=prefix is not None,
                prefix_reason=prefix_reason, forwards=len(plan.layers) * len(groups), flops=done,
                flops_one_forward_per_cell=len(plan.layers) * len(cells) * forward_flops(model, B, T))


# ----------------------------------------------------------------------------------------------
# attribution patching
# ----------------------------------------------------------------------------------------------


def gradients_available(verb: str) -> None:
    """Refuse to run a gradient-based verb under ``torch.inference_mode()`` (tensors made there
    can never take part in autograd); ``torch.set_grad_enabled(False)`` is fine: such verbs turn
    gradients on for themselves."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            f"{verb} needs gradients, and torch.inference_mode() forbids them for every tensor made "
            "inside it. Call it outside the inference_mode block (torch.no_grad() or "
            "torch.set_grad_enabled(False) around it are fine: it enables gradients itself).")


@records
def attribution_patching(
    model,
    contrast: ContrastSet,
    metric: Metric,
    *,
    site: str,
    by_position: bool = False,
    layers: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
) -> PatchingResult:
    """Gradient estimate of :func:`activation_patching` for every cell, in one forward/backward.

    ``value ≈ metric(corrupted) + Σ (clean_act - corrupted_act) · ∂metric/∂act`` evaluated on the
    corrupted run; same axes and result type as :func:`activation_patching`. The estimate is
    good where the metric is locally linear (residual stream, head outputs) and poor where a patch
    moves it far (e.g. patching a whole early residual position): check the correlation with exact
    patching on a subset before trusting it.

    Gradients are enabled inside (also under ``torch.set_grad_enabled(False)``); parameter
    gradients are never touched (``torch.autograd.grad`` on the activations only).
    ``batch_size`` bounds the prompts per forward/backward; the result does not depend on it.
    """
    gradients_available("attribution_patching")
    _check_contrast(model, contrast)
    plan = _plan(model, contrast, site, by_position, layers, None, None)
    parts = []
    with peak_memory(model.cfg.device) as mem:
        for idx, sub, m in prompt_batches(contrast, metric, batch_size):
            parts.append(_attribute_batch(model, sub, m, plan))
    return _sweep_result(model, contrast, metric, plan, "attribution_patching", torch.cat([p[0] for p in parts]),
                         torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
                         metadata=dict(batch_size=batch_size, peak_memory=mem))


def _attribute_batch(model, contrast: ContrastSet, metric: Metric, plan: "_Plan"):
    spec = plan.spec
    B = len(contrast)
    name = _metric_name(metric)
    hook_names = [spec.hook_name(l) for l in plan.layers]
    clean_logits, clean_acts = hooks.run_with_cache(
        model, contrast.clean_tokens, hook_names, extras=contrast.forward_extras("clean"))
    clean_vals = check_metric_values(metric(clean_logits), B, name=name).detach().cpu()
    del clean_logits
    corr_acts: dict[str, Tensor] = {}

    def keep(act, hook, name):
        if not act.requires_grad:
            act = act.detach().requires_grad_(True) if act.grad_fn is None else act
        corr_acts[name] = act
        return act

    tracked = [(n, lambda act, hook, n=n: keep(act, hook, n)) for n in hook_names]
    with torch.enable_grad():
        logits = hooks.forward(model, contrast.corrupted_tokens, hooks=tracked,
                               extras=contrast.forward_extras("corrupted"), grad=True)
        corr_vals = check_metric_values(metric(logits), B, name=name)
        if not corr_vals.requires_grad:
            raise RuntimeError(f"the metric {name!r} is not differentiable w.r.t. the model's activations "
                               "(it detaches or thresholds the logits, like accuracy): use a smooth metric "
                               "such as metrics.logit_diff for attribution patching")
        grads = torch.autograd.grad(corr_vals.sum(), [corr_acts[n] for n in hook_names], allow_unused=True)
    per_layer = []
    for n, g in zip(hook_names, grads):
        corr = corr_acts[n].detach()
        g = torch.zeros_like(corr) if g is None else g
        per_layer.append(_reduce_cells(spec, (clean_acts[n].to(corr.device) - corr) * g, plan.by_position))
    delta = torch.stack(per_layer, 1).detach().cpu()  # [batch, layer, ...]
    corr_vals = corr_vals.detach().cpu()
    return delta + corr_vals.reshape((B,) + (1,) * (delta.ndim - 1)), clean_vals, corr_vals


# ----------------------------------------------------------------------------------------------
# path patching
# ----------------------------------------------------------------------------------------------

Receiver = Union[Site, tuple[int, int, str]]


def _receivers(model, receivers) -> list[Site]:
    if isinstance(receivers, str):
        if receivers != "logits":
            raise SiteError(f"receivers={receivers!r}: use 'logits' or a list of Site('head_q'|'head_k'|"
                            f"'head_v', layer, head=...) / (layer, head, 'q'|'k'|'v') tuples")
        return []
    out = []
    for r in receivers:
        if isinstance(r, tuple):
            if len(r) != 3 or r[2] not in ("q", "k", "v"):
                raise SiteError(f"receiver {r!r}: tuples are (layer, head, 'q'|'k'|'v')")
            r = Site(f"head_{r[2]}", r[0], head=r[1])
        if not isinstance(r, Site) or r.kind not in ("head_q", "head_k", "head_v") or r.head is None:
            raise SiteError(f"receiver {r!r}: receivers are heads' q/k/v inputs, e.g. Site('head_q', 9, head=6)")
        out.append(r.validate(model))
    if not out:
        raise SiteError("receivers is empty; use receivers='logits' for the direct effect on the output")
    return out


@dataclass
class _PathBase:
    """The clean and corrupted runs path patching starts from, for one batch of prompts."""

    contrast: ContrastSet
    metric: Metric
    starts: dict
    clean_logits: Tensor
    clean_z: dict
    corr_z: dict
    clean_vals: Tensor
    corr_vals: Tensor

    @classmethod
    def record(cls, model, contrast: ContrastSet, metric: Metric, layers: Sequence[int]) -> "_PathBase":
        B, name = len(contrast), _metric_name(metric)
        z_names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
        with hooks.record_block_inputs(model, layers) as starts:
            clean_logits, clean_z = hooks.run_with_cache(model, contrast.clean_tokens, z_names,
                                                         extras=contrast.forward_extras("clean"))
        clean_vals = check_metric_values(metric(clean_logits), B, name=name)
        corr_logits, corr_z = hooks.run_with_cache(model, contrast.corrupted_tokens, z_names,
                                                   extras=contrast.forward_extras("corrupted"))
        corr_vals = check_metric_values(metric(corr_logits), B, name=name)
        return cls(contrast, metric, dict(starts), clean_logits, clean_z, corr_z, clean_vals, corr_vals)


class PathBases:
    """The recorded base runs of every prompt batch of one contrast set and metric, shared by
    repeated path-patching calls (the stages of circuit discovery) so each is recorded once."""

    def __init__(self, model, contrast: ContrastSet, metric: Metric, batch_size: Optional[int] = None):
        self.model, self.contrast, self.metric, self.batch_size = model, contrast, metric, batch_size
        self._bases: dict[tuple[int, ...], _PathBase] = {}

    def batches(self, layers: Sequence[int]):
        """``(indices, base)`` per prompt batch, recording each base the first time (at every layer
        in ``layers`` not yet recorded)."""
        for idx, sub, m in prompt_batches(self.contrast, self.metric, self.batch_size):
            key = tuple(idx)
            base = self._bases.get(key)
            if base is None or not set(layers) <= set(base.starts):
                have = set(base.starts) if base is not None else set()
                base = _PathBase.record(self.model, sub, m, sorted(set(layers) | have))
                self._bases[key] = base
            yield idx, base


@records
def path_patching(
    model,
    contrast: ContrastSet,
    metric: Metric,
    *,
    receivers: Union[str, Sequence[Receiver]] = "logits",
    senders: Optional[Sequence[tuple[int, int]]] = None,
    receiver_positions: str = "all",
    sender_positions: str = "all",
    batch_size: Optional[int] = None,
    memory_budget_mb: float = 2048,
    max_chunk: int = 256,
    progress: Optional[bool] = None,
    _base: Optional[PathBases] = None,
) -> PatchingResult:
    """Path patching (Wang et al. 2022): the effect of each sender head through the receivers only.

    For each sender head ``(layer, head)``:

    1. run the *clean* prompt with the sender's output (``hook_z``) taken from the corrupted run
       and every other head's output frozen to its clean value (MLPs recompute), and record the
       receivers' inputs (``hook_q``/``hook_k``/``hook_v`` of the receiver heads) — or, for
       ``receivers="logits"``, the logits themselves;
    2. run the clean prompt again with only the receivers' inputs replaced by those records.

    The value is the metric of step 2 (noising: the clean run is the base, so important paths
    *lower* the metric; :meth:`PatchingResult.effect` gives ``value - clean``).

    Args:
        receivers: ``"logits"`` (the senders' effect on the output through the residual stream,
            paths via later MLPs included), or heads' inputs as ``Site("head_q", 9, head=6)`` or
            ``(9, 6, "q")``. For ``k``/``v`` the head index is a **KV head**: on grouped-query
            models one KV head is shared by ``n_heads // n_key_value_heads`` query heads, and
            patching it changes all of them (TransformerLens refuses GQA here).
        senders: ``(layer, head)`` pairs; default every head in a layer before the last receiver
            (all layers for ``"logits"``).
        receiver_positions: ``"all"`` patches the receivers' inputs at every position;
            ``"last"`` only at each prompt's last token (the IOI paper's END position, e.g. for
            name-mover queries).
        sender_positions: ``"all"`` takes the senders' corrupted output at every position (Wang
            et al.); ``"last"`` only at each prompt's last token, as Merullo et al.'s released
            script does (``position=-1``).
        batch_size: prompts per forward (default all); results do not depend on it.

    Returns:
        :class:`PatchingResult` over ``("layer", "head")`` of the senders (cells that are not
        senders hold the clean value, so their effect is 0).
    """
    _check_contrast(model, contrast)
    if receiver_positions not in ("all", "last") or sender_positions not in ("all", "last"):
        raise ValueError(f"receiver_positions={receiver_positions!r}, sender_positions={sender_positions!r}: "
                         "choose 'all' or 'last'")
    recv = _receivers(model, receivers)
    n_layers, H = model.cfg.n_layers, model.cfg.n_heads
    last = max((r.layer for r in recv), default=n_layers)
    if senders is None:
        senders = [(l, h) for l in range(last) for h in range(H)]
    senders = [(check_layer(model, l, what="sender layer"), check_head(model, "head_out", h)) for l, h in senders]
    bad = [s for s in senders if recv and s[0] >= last]
    if bad:
        raise SiteError(f"senders {bad} are not before the last receiver layer {last}: a head cannot "
                        f"reach a receiver in its own or an earlier layer")
    if not senders:
        raise SiteError("senders is empty")
    senders = sorted(dict.fromkeys(senders))  # by layer, so each chunk resumes at its own first layer
    first = senders[0][0]
    recv_first = min((r.layer for r in recv), default=None)
    check_layers = [first] + ([recv_first] if recv_first is not None else [])
    bases = _base if _base is not None else PathBases(model, contrast, metric, batch_size)
    if bases.contrast is not contrast or bases.metric is not metric or bases.model is not model:
        raise ValueError("_base was recorded for another model, contrast set or metric")
    B = len(contrast)
    values = torch.empty((B, len(senders)))
    clean_vals, corr_vals = torch.empty(B), torch.empty(B)
    with peak_memory(model.cfg.device) as mem:
        for idx, base in bases.batches(sorted({l for l, _ in senders} | set(check_layers))):
            for l in check_layers:
                reason = hooks.resume_check(model, base.starts[l], l, base.clean_logits)
                if reason is not None:
                    raise NotImplementedError(
                        f"path patching resumes forwards at the sender/receiver layers, and that cannot be "
                        f"verified on this model: {reason}")
            values[idx] = _path_batch(model, base, senders, recv, receiver_positions, sender_positions,
                                      memory_budget_mb, max_chunk, progress)
            clean_vals[idx], corr_vals[idx] = base.clean_vals.cpu(), base.corr_vals.cpu()
    # scatter into a [layer, head] table; non-senders keep the clean value (no effect)
    per_prompt = clean_vals.reshape(B, 1, 1).repeat(1, n_layers, H)
    for k, (l, h) in enumerate(senders):
        per_prompt[:, l, h] = values[:, k]
    return PatchingResult(
        values=per_prompt.mean(0), axis_names=("layer", "head"),
        labels={"layer": [f"L{l}" for l in range(n_layers)], "head": [f"H{h}" for h in range(H)]},
        per_prompt=per_prompt,
        baselines={"clean": float(clean_vals.mean()), "corrupted": float(corr_vals.mean())},
        clean_per_prompt=clean_vals, corrupted_per_prompt=corr_vals,
        metadata=dict(method="path_patching", direction="noising", metric=_metric_name(metric), task=contrast.task,
                      n_prompts=B, senders=[list(s) for s in senders],
                      receivers="logits" if not recv else [str(r) for r in recv],
                      receiver_positions=receiver_positions, sender_positions=sender_positions,
                      batch_size=batch_size, peak_memory=mem, path="resumed",
                      title="path patching → " + ("logits" if not recv else ", ".join(map(str, recv)))),
    )


def _path_batch(model, base: _PathBase, senders, recv, receiver_positions, sender_positions,
                memory_budget_mb, max_chunk, progress) -> Tensor:
    """Per-prompt metric values ``[b, sender]`` of path patching on one batch."""
    contrast, metric = base.contrast, base.metric
    B, name = len(contrast), _metric_name(metric)
    n_layers = model.cfg.n_layers
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    starts, clean_z, corr_z = base.starts, base.clean_z, base.corr_z
    recv_first = min((r.layer for r in recv), default=None)
    read_pos = contrast.last_pos if getattr(metric, "last_token_only", False) else None
    chunk = _chunk_size(model, contrast, memory_budget_mb, max_chunk, read_pos is not None)
    values = torch.empty((B, len(senders)))
    last_b = contrast.last_pos
    with _progress(-(-len(senders) // chunk), "path patching", progress) as bar:
        for c0 in range(0, len(senders), chunk):
            part = senders[c0:c0 + chunk]
            C = len(part)
            rows_of: dict[int, list[tuple[int, int]]] = {}
            for k, (l, h) in enumerate(part):
                rows_of.setdefault(l, []).append((k, h))

            def freeze(act, hook, layer, C=C, rows_of=rows_of):
                out = clean_z[z_names[layer]].repeat(C, 1, 1, 1)
                corr = corr_z[z_names[layer]]
                for k, h in rows_of.get(layer, []):
                    rows = slice(k * B, (k + 1) * B)
                    if sender_positions == "all":
                        out[rows, :, h] = corr[:, :, h]
                    else:
                        r = torch.arange(B, device=out.device)
                        p = last_b.to(out.device)
                        out[k * B + r, p, h] = corr[r, p, h]
                return out.to(act.device)

            c_first = part[0][0]
            frozen = [(z_names[l], lambda act, hook, l=l: freeze(act, hook, l)) for l in range(c_first, n_layers)]
            if not recv:
                logits = hooks.run_from(model, starts[c_first], c_first, copies=C, hooks=frozen, read_pos=read_pos)
            else:
                recv_names = sorted({r.hook_name for r in recv})
                with hooks.capture(model, recv_names) as seen:
                    hooks.run_from(model, starts[c_first], c_first, copies=C, hooks=frozen)

                rows = torch.arange(C * B)
                last = last_b.repeat(C)

                def put(act, hook, hname, rows=rows, last=last):
                    act = act.clone()
                    for r in recv:
                        if r.hook_name != hname:
                            continue
                        if receiver_positions == "all":
                            act[:, :, r.head] = seen[hname][:, :, r.head].to(act.device)
                        else:
                            r_rows, r_pos = rows.to(act.device), last.to(act.device)
                            act[r_rows, r_pos, r.head] = seen[hname][r_rows, r_pos, r.head].to(act.device)
                    return act

                patch = [(n, lambda act, hook, n=n: put(act, hook, n)) for n in recv_names]
                logits = hooks.run_from(model, starts[recv_first], recv_first, copies=C, hooks=patch,
                                        read_pos=read_pos)
            vals = check_metric_values(metric(logits), C * B, name=name)
            values[:, c0:c0 + C] = vals.reshape(C, B).T.cpu()
            bar.update(1)
    return values
