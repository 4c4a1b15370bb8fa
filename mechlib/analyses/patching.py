"""Activation patching, attribution patching and path patching — batched, exact, resumable.

**Activation patching** (causal tracing; Meng et al. 2022, Wang et al. 2022): run the corrupted
prompt, overwrite one activation (a residual position, a head's output ...) with its value from the
clean run, and measure how much of the clean behaviour comes back. Values equal TransformerLens'
``patching.get_act_patch_*`` on the same inputs (tested), but mechlib

* computes no cell whose answer is already known: where the clean and corrupted activations at the
  patched site are exactly equal, the patch writes what is already there, so the cell's value is
  the corrupted run's (TL computes a forward and gets the same). With causal attention, a prompt's
  activations before its first clean/corrupted difference are equal at every layer, so how much is
  skipped depends on the contrast set (how late its prompts first differ), not on the model;
* recomputes each patched variant only from the first position it changes: earlier positions are
  exactly the corrupted run's, whose keys and values stand in for them (causal prefix reuse,
  verified once per model);
* resumes at the patched layer from the recorded corrupted run, so earlier blocks are not
  recomputed (the bridge's ``start_at_layer`` still runs them), and runs the variants layer-major:
  one walk over the blocks in which every variant joins at its own layer, so each block runs a few
  times per sweep on large batches; the last block computes only the position the metric reads,
  and a logit difference unembeds only its two tokens. Resuming is checked once per model against
  the model's own logits; if it does not reproduce them, mechlib falls back to full forwards, which
  also carry ``pixel_values`` and other extra inputs.

``metadata`` records what was skipped (``skipped_cells``: cells no prompt needed a forward for;
``skipped_rows``: (cell, prompt) pairs), where recomputing started (``from_pos``, ``walk_starts``)
and the matmul FLOPs done, the clean/corrupted runs included (``flops``; TL's count is
``flops_one_forward_per_cell``).

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
import weakref
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.flops import block_flops, forward_flops, qkv_flops_per_token, unembed_flops
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


def _write_cells(spec: SiteSpec, act: Tensor, source: Tensor, idx, offset: int = 0) -> Tensor:
    """Copy the chosen cells of ``source[src]`` into ``act[rows]``. ``offset``: ``act`` holds
    positions ``offset..`` only (causal prefix reuse), ``source`` all of them."""
    rows, src, pos, head = idx
    at = None if pos is None else pos - offset
    act = act.clone()
    if not spec.per_head:  # [batch, pos, d]
        act[rows, at] = source[src, pos]
    elif spec.head_dim == 1:  # pattern [batch, head, q, k]; pos = destination (query) position
        if pos is None:
            act[rows, head] = source[src, head, offset:]
        else:
            act[rows, head, at] = source[src, head, pos]
    else:  # [batch, pos, head, d]
        if pos is None:
            act[rows, :, head] = source[src, offset:, head]
        else:
            act[rows, at, head] = source[src, pos, head]
    return act


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
        reuse_prefix: recompute each patched variant only from the first position it changes
            (the patched one, or for all-position head sweeps the first position where the head's
            clean and corrupted values differ): with causal attention every earlier position is
            exactly as in the corrupted run, so its keys and values are taken from that run
            (verified once per model against the full forward; if it cannot be used, a warning
            says why). Needs a last-token metric. Cells whose patch changes nothing are skipped
            either way (decided by exact equality of the activations, never by tokens alone).

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
                      skipped_cells=sum(o["skipped_cells"] for o in parts),
                      skipped_rows=sum(o["skipped_rows"] for o in parts),
                      from_pos=min((o["from_pos"] for o in parts if o["from_pos"] is not None), default=None),
                      walk_starts=sorted({p for o in parts for p in o["walk_starts"]}),
                      read_row=all(o["read_row"] for o in parts), readout=parts[0]["readout"] if parts else None,
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


@dataclass
class _BaseRuns:
    """The clean and corrupted runs of one batch of prompts: what the metric reads of each
    (``[b, vocab]`` at the read position, or ``[b, pos, vocab]``), the patched site's activations,
    the corrupted run's block inputs (:class:`hooks.BlockInputs` by layer) and its keys/values."""

    clean_out: Tensor
    corr_out: Tensor
    clean_acts: dict
    corr_acts: dict
    starts: dict
    flops: int
    _kv: Optional[tuple] = None  # (recording, layer, batch rows)

    def prefix(self):
        if self._kv is None:
            raise hooks.PrefixUnsupported("no keys and values were recorded")
        rec, layer, rows, model, n_pos = self._kv
        return hooks.prefix_from(model, rec, layer, n_pos, rows)


def _rows_of(v, rows: slice, total: int):
    """``v`` (a block keyword argument) for batch rows ``rows`` of a batch of ``total``."""
    if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == total:
        return v[rows]
    if isinstance(v, tuple):
        return tuple(_rows_of(x, rows, total) for x in v)
    return v


def _base_runs(model, contrast: ContrastSet, hook_names: list[str], layers: Sequence[int],
               read_pos: Optional[Tensor], kv_layer: Optional[int]) -> _BaseRuns:
    """Both base runs in one forward of the clean prompts followed by the corrupted ones (twice
    the rows per matmul; two forwards when their extra inputs differ in kind), unembedded at the
    read positions only when the metric reads nothing else."""
    from contextlib import ExitStack

    B, T = len(contrast), contrast.n_pos
    ex = {side: contrast.forward_extras(side) for side in ("clean", "corrupted")}
    tokens = {"clean": contrast.clean_tokens, "corrupted": contrast.corrupted_tokens}
    if set(ex["clean"]) == set(ex["corrupted"]):
        runs = [(torch.cat([tokens["clean"], tokens["corrupted"]]),
                 {k: torch.cat([ex["clean"][k], ex["corrupted"][k].to(ex["clean"][k].device)]) for k in ex["clean"]},
                 {"clean": slice(0, B), "corrupted": slice(B, 2 * B)})]
    else:
        runs = [(tokens[side], ex[side], {side: slice(0, B)}) for side in ("clean", "corrupted")]
    got: dict = {}
    flops = 0
    for toks, extras, halves in runs:
        n = toks.shape[0]
        with ExitStack() as stack:
            starts = stack.enter_context(hooks.record_block_inputs(
                model, layers if "corrupted" in halves else []))
            acts = stack.enter_context(hooks.capture(model, hook_names))
            rec = None
            if kv_layer is not None and "corrupted" in halves:
                rec = stack.enter_context(hooks.record_keys_values(model, kv_layer))
            if read_pos is not None:
                stack.enter_context(torch.no_grad())
                out = hooks.forward_last(model, toks, read_pos.repeat(n // B), extras=extras)
            else:
                out = hooks.forward(model, toks, extras=extras)
        flops += forward_flops(model, n, T, unembedded=n if read_pos is not None else n * T)
        for side, rows in halves.items():
            got[side] = (out[rows], {k: v[rows] for k, v in acts.items()})
        if "corrupted" in halves:
            rows = halves["corrupted"]
            kw = next(iter(starts.values())).kwargs_by_layer if starts else {}
            kw = {l: {k: _rows_of(v, rows, n) for k, v in d.items()} for l, d in kw.items()}
            got["starts"] = {l: hooks.BlockInputs(st.resid[rows], l, kw, B) for l, st in starts.items()}
            got["kv"] = None if rec is None else (rec, kv_layer, rows, model, T)
    return _BaseRuns(got["clean"][0], got["corrupted"][0], got["clean"][1], got["corrupted"][1], got["starts"],
                     flops, got["kv"])


def _patch_batch(model, contrast: ContrastSet, metric: Metric, plan: "_Plan", memory_budget_mb: float,
                 max_chunk: int, resume: bool, progress: Optional[bool], reuse_prefix: bool = True) -> dict:
    """The sweep of ``plan`` on one batch of prompts: per-prompt values ``[b, layer, cell]`` and
    the baselines, with which path ran (see "the sweep engine" above)."""
    spec = plan.spec
    B, T = len(contrast), contrast.n_pos
    name = _metric_name(metric)
    hook_names = [spec.hook_name(l) for l in plan.layers]
    first = min(plan.layers)
    read_pos = contrast.last_pos if getattr(metric, "last_token_only", False) else None
    # the clean and corrupted runs: the patched site at the swept layers (to copy from, and to find
    # the cells whose patch changes nothing), each swept block's inputs (to resume there) and the
    # keys and values from the first swept layer on (causal prefix reuse)
    base = _base_runs(model, contrast, hook_names, plan.layers if resume else [], read_pos,
                      first if resume and reuse_prefix and read_pos is not None else None)
    flops, starts = base.flops, base.starts
    clean_vals = check_metric_values(metric(base.clean_out), B, name=name).detach()
    corr_vals = check_metric_values(metric(base.corr_out), B, name=name).detach()
    reason = None
    if resume:
        reference = None
        if not hooks.resume_verified(model, first):  # once per model and layer: the model's own logits
            reference = hooks.forward(model, contrast.corrupted_tokens, extras=contrast.forward_extras("corrupted"))
            flops += forward_flops(model, B, T)
        reason = hooks.resume_check(model, starts[first], first, reference)
    resumed = resume and reason is None
    changed = [_changed(spec, base.clean_acts[n], base.corr_acts[n]) for n in hook_names]
    clean_acts = base.clean_acts
    last = read_pos.to(base.corr_out.device) if read_pos is not None else None
    corr_read = base.corr_out if last is not None else None
    # causal prefix reuse: a patch that changes nothing before position p leaves every earlier
    # position as in the corrupted run, whose keys and values then stand in for them
    prefix, prefix_reason, causal = None, None, False
    would_reuse = bool(_select_rows(plan, changed, read_pos if read_pos is not None else contrast.last_pos,
                                    True, model.cfg.n_layers).fp.gt(0).any())
    if reuse_prefix and would_reuse:
        if not resumed:
            prefix_reason = "it needs the resumed path, which is off"
        elif read_pos is None:
            prefix_reason = (f"the metric {name!r} reads every position (build it with last_token_only=True "
                             "if it reads only the last token)")
        else:
            try:
                try:
                    prefix = base.prefix()
                except hooks.PrefixUnsupported:  # not recorded in the base run: replay it
                    prefix = hooks.record_prefix(model, starts[first])
                    flops += forward_flops(model, B, T, start_layer=first, unembedded=0)
            except hooks.PrefixUnsupported as e:
                prefix_reason = str(e)
            if prefix is not None:
                prefix_reason = hooks.prefix_check(model, starts[first], prefix, read_pos, corr_read)
                prefix = None if prefix_reason else prefix
            causal = prefix is not None
    rows = _select_rows(plan, changed, read_pos, causal, model.cfg.n_layers)
    n_rows_all = B * len(plan.layers) * len(plan.cells())

    chunk = _chunk_size(model, contrast, memory_budget_mb, max_chunk, read_pos is not None)
    engine = _Engine(model, plan, contrast, dict(starts), clean_acts, prefix, last, chunk * B)
    if resumed and last is not None:
        engine.check(corr_read, metric)
    overhead = _BLOCK_OVERHEAD_ROWS.get(torch.device(model.cfg.device).type, 256) if resumed else 0
    token_rows = _TOKEN_ROWS.get(torch.device(model.cfg.device).type, 1 << 16)
    walks = _walks(rows, model.cfg.n_layers, T, chunk * B, overhead, split_last=engine.read_row,
                   token_rows=token_rows)
    fill = base.corr_out
    per_prompt = corr_vals.cpu().reshape(B, 1, 1).repeat(1, len(plan.layers), len(plan.cells()))
    extras = hooks.check_inputs(model, contrast.forward_extras("corrupted"), contrast.corrupted_tokens)
    with _progress(len(walks), f"patching {spec.kind}", progress) as bar:
        for p0, idx in walks:
            part = rows.take(idx)
            out = engine.walk(part, p0) if resumed else engine.full(part, extras)
            vals = engine.values(out, part.b, metric, name, fill)
            per_prompt[part.b, part.li, part.ci] = vals.cpu()
            bar.update(1)
    computed = torch.zeros(len(plan.layers), len(plan.cells()), dtype=torch.bool)
    computed[rows.li, rows.ci] = True
    return dict(per_prompt=per_prompt, clean=clean_vals.cpu(), corrupted=corr_vals.cpu(),
                reason=reason if resume else None, chunk=chunk, prefix=prefix is not None and any(p > 0 for p, _ in walks),
                prefix_reason=prefix_reason, forwards=len(walks), flops=flops + engine.flops,
                flops_one_forward_per_cell=len(plan.layers) * len(plan.cells()) * forward_flops(model, B, T),
                skipped_rows=n_rows_all - len(rows), skipped_cells=int((~computed).sum()),
                from_pos=min((p for p, _ in walks), default=None), walk_starts=sorted({p for p, _ in walks}),
                read_row=engine.read_row, readout="columns" if engine.columns is not None else "vocabulary")


# ----------------------------------------------------------------------------------------------
# the sweep engine
# ----------------------------------------------------------------------------------------------
#
# A sweep is a table of (layer, cell, prompt) variants, and most of them need no forward:
#   * a variant whose clean and corrupted activations at the patched site are exactly equal writes
#     the value that is already there, so its value is the corrupted run's (and TL's);
#   * with causal attention (verified once per model), a patch at position p cannot reach a read
#     position before p; and at the last layer, a patch that acts on its own position only (head
#     outputs and queries, pattern rows, attention/MLP outputs, resid_mid/post) reaches the read
#     position only at the read position.
# The others ("rows", one per variant) are grouped by the first position they change: everything
# earlier is exactly the corrupted run, whose keys and values stand in for it (causal prefix
# reuse). Each group runs layer-major: one walk over the blocks in which every row joins at its own
# patched layer, so each block runs once per walk, on every row patched at or before it (large
# matmuls, few calls). The final block computes the read row only (the other rows' keys and
# values), and a metric that names the logits it reads (``columns``: a logit difference reads two)
# is handed only those.

# sites whose patch at position p changes, from that layer on, only position p's own residual
_LOCAL_AFTER = frozenset({"resid_mid", "resid_post", "attn_out", "mlp_out", "head_out", "head_q", "pattern"})

# Per block call, the overhead in token-rows (one position of one row through one block): the cost
# model that groups rows into walks trades these against positions recomputed for nothing.
_BLOCK_OVERHEAD_ROWS = {"cpu": 16, "cuda": 1024}
# Most token-rows per block call: past a few thousand on the CPU the matmuls' operands leave the
# caches and throughput drops (measured: 4,000 x 576 @ 576 x 1536 runs at ~90% of peak, 8,000 at ~60%).
_TOKEN_ROWS = {"cpu": 4096, "cuda": 1 << 20}


def _changed(spec: SiteSpec, clean: Tensor, corr: Tensor) -> Tensor:
    """Where the clean activation differs from the corrupted one (exact comparison):
    ``[batch, pos]``, or ``[batch, pos, head]`` for per-head sites (``pos`` = query for patterns)."""
    ne = clean.to(corr.device) != corr
    if spec.per_head and spec.head_dim == 1:  # pattern [b, head, q, k]
        return ne.any(-1).transpose(1, 2)
    return ne.any(-1)


@dataclass
class _Rows:
    """The variants that need a forward, one per row: the swept layer's index ``li`` and number
    ``layer``, the cell's index ``ci`` in ``plan.cells()``, the prompt ``b``, and ``fp``, the first
    position at which the patched run differs from the corrupted one."""

    li: Tensor
    ci: Tensor
    b: Tensor
    fp: Tensor
    layer: Tensor

    def __len__(self) -> int:
        return int(self.b.numel())

    def take(self, idx) -> "_Rows":
        return _Rows(self.li[idx], self.ci[idx], self.b[idx], self.fp[idx], self.layer[idx])


def _select_rows(plan: _Plan, changed: list[Tensor], last: Optional[Tensor], causal: bool, n_layers: int) -> _Rows:
    """The rows of a sweep that need a forward (``causal``: the model's attention is verified
    causal, so patches after the read position, or away from it at the last layer, are no-ops)."""
    cells = plan.cells()
    B = changed[0].shape[0]
    last = last.cpu() if last is not None else None
    parts = []
    for li, layer in enumerate(plan.layers):
        ch = changed[li].cpu()
        if plan.spec.per_head and not plan.by_position:  # (head,) cells over all positions
            m = ch[:, :, torch.tensor([c[0] for c in cells])]  # [b, pos, cell]
            need = m.any(1)
            fp = (m.cumsum(1) == 0).sum(1)  # first changed position (T where none)
        else:  # (pos,) or (pos, head) cells
            pos = torch.tensor([c[0] for c in cells])
            need = ch[:, pos] if not plan.spec.per_head else ch[:, pos, torch.tensor([c[1] for c in cells])]
            fp = pos.expand(B, -1)
            if causal and layer == n_layers - 1 and plan.spec.kind in _LOCAL_AFTER:
                need = need & (pos[None] == last[:, None])
        if causal:
            need = need & (fp <= last[:, None])
        else:
            fp = torch.zeros_like(fp)
        b, c = need.nonzero(as_tuple=True)
        parts.append((torch.full_like(b, li), c, b, fp[b, c], torch.full_like(b, layer)))
    return _Rows(*(torch.cat(t) for t in zip(*parts)))


def _walks(rows: _Rows, n_layers: int, n_pos: int, max_rows: int, overhead: int,
           split_last: bool = False, token_rows: Optional[int] = None) -> list[tuple[int, Tensor]]:
    """Group rows into layer-major walks ``(from_pos, row indices)``: contiguous runs of first
    positions, chosen to minimise the token-rows recomputed (a row from ``from_pos`` on, through
    every block from its layer) plus ``overhead`` per block call; each walk holds at most
    ``max_rows`` rows (and ``token_rows`` rows x positions), sorted by layer. ``split_last``: rows
    patched at the last layer walk separately (the final block's read-row shortcut cannot patch)."""
    if len(rows) == 0:
        return []
    ps = sorted(set(rows.fp.tolist()))
    work = [int((n_layers - rows.layer[rows.fp == p]).sum()) for p in ps]
    count = [int((rows.fp == p).sum()) for p in ps]
    low = [int(rows.layer[rows.fp == p].min()) for p in ps]
    cap = lambda p: max(1, min(max_rows, (token_rows or 1 << 62) // (n_pos - p)))  # noqa: E731
    best, cut = [0.0] + [float("inf")] * len(ps), [0] * (len(ps) + 1)
    for j in range(1, len(ps) + 1):
        w = n = 0
        lo = n_layers
        for i in range(j - 1, -1, -1):
            w, n, lo = w + work[i], n + count[i], min(lo, low[i])
            cost = best[i] + (n_pos - ps[i]) * w + overhead * (n_layers - lo) * -(-n // cap(ps[i]))
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], len(ps)
    while j > 0:
        i = cut[j]
        sel = ((rows.fp >= ps[i]) & (rows.fp <= ps[j - 1])).nonzero().flatten()
        sel = sel[torch.argsort(rows.layer[sel], stable=True)]
        pieces = [sel]
        if split_last:
            at_last = rows.layer[sel] == n_layers - 1
            pieces = [sel[~at_last], sel[at_last]]
        size = cap(ps[i])
        for piece in pieces:
            out += [(ps[i], piece[k:k + size]) for k in range(0, len(piece), size)]
        j = i
    return [w for w in out[::-1] if len(w[1])]


class _KeyValueSeen(Exception):
    """Raised by :class:`_KeyValueProbe` to end a block once its attention has its keys and values."""

    def __init__(self, k: Tensor, v: Tensor, layer_idx: int):
        super().__init__("keys and values recorded")
        self.k, self.v, self.layer_idx = k, v, layer_idx


class _KeyValueProbe:
    """A key/value cache that stops the block at the first update: the keys and values of the
    positions given, at the cost of the query/key/value projections only."""

    def __init__(self, pos: int):
        self.pos = pos

    def update(self, k, v, layer_idx, *args, **kwargs):
        raise _KeyValueSeen(k, v, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pos


class _FixedKeyValues:
    """A key/value cache that hands the attention fixed keys and values (every position)."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    def update(self, k, v, layer_idx, *args, **kwargs):
        return self.k.to(k.device), self.v.to(v.device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.k.shape[-2]) - 1


class _NotAtRows(Exception):
    """A block input the read-row shortcut cannot cut to one query per row."""


def _row_kwargs(kw: dict, src: Tensor, batch: int) -> dict:
    """A block's recorded keyword arguments for rows continuing prompts ``src``."""

    def pick(key, v):
        if isinstance(v, Tensor) and key != "cache_position" and v.ndim >= 1 and v.shape[0] == batch:
            return v.index_select(0, src.to(v.device))
        if isinstance(v, tuple):
            return tuple(pick(key, x) for x in v)
        return v

    return {k: pick(k, v) for k, v in kw.items()}


def _at_rows(key: str, v, at: Tensor):
    """Block keyword argument ``key`` for one query per row, at position ``at[row]``."""
    if v is None or not isinstance(v, (Tensor, tuple)):
        return v
    n = at.shape[0]
    r = torch.arange(n, device=at.device)
    if key == "attention_mask":
        if not isinstance(v, Tensor) or v.ndim != 4:
            raise _NotAtRows("the attention mask is not [batch, 1, query, key]")
        return v.expand(n, *v.shape[1:])[r, :, at][:, :, None]
    if key == "position_ids":
        return v.expand(n, v.shape[-1])[r, at][:, None]
    if key == "cache_position":
        if not bool((at == at[0]).all()):
            raise _NotAtRows("cache_position cannot give each row its own query position")
        return v[int(at[0]):int(at[0]) + 1]
    if key == "position_embeddings":
        if any(not isinstance(x, Tensor) or x.ndim != 3 for x in v):
            raise _NotAtRows("the rotary embeddings are not [batch, pos, dim]")
        return tuple(x.expand(n, *x.shape[1:])[r, at][:, None] for x in v)
    return v


_ENGINE_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Engine:
    """Runs rows of one sweep batch (see "the sweep engine") and counts their matmul FLOPs."""

    def __init__(self, model, plan: _Plan, contrast: ContrastSet, starts: dict, clean_acts, prefix,
                 last: Optional[Tensor], max_rows: int):
        self.model, self.plan, self.contrast, self.starts = model, plan, contrast, starts
        self.clean, self.prefix, self.last, self.max_rows = clean_acts, prefix, last, max_rows
        self.B, self.T, self.L = len(contrast), contrast.n_pos, model.cfg.n_layers
        cells = plan.cells()
        self.cell_pos = torch.tensor([c[0] for c in cells]) if "pos" in plan.axis_names else None
        self.cell_head = torch.tensor([c[-1] for c in cells]) if plan.spec.per_head else None
        self.flops = 0
        self.read_row = False
        self.columns = None

    # ---------------------------------------------------------------- checks (once per model)
    def check(self, corr_read: Tensor, metric) -> None:
        """Turn on the read-row final block and the column readout where they reproduce the
        corrupted run's logits at the read positions (checked once per model)."""
        ok = _ENGINE_OK.get(self.model)
        grad = torch.is_grad_enabled()
        if ok is None:
            ok = {"read_row": False, "columns": False}
            rows = _Rows(*(torch.zeros(self.B, dtype=torch.long),) * 2, torch.arange(self.B),
                         torch.zeros(self.B, dtype=torch.long), torch.full((self.B,), self.L - 1))
            p0 = min(1, int(self.last.min())) if self.prefix is not None else 0
            tol = 1e-4 + 1e-4 * float(corr_read.abs().max())
            try:
                self.read_row = True
                torch.set_grad_enabled(False)
                x = self.walk(rows, p0, patch=False, resid=True)
                ok["read_row"] = float((hooks._logits_from_resid(self.model, x[:, None])[:, 0]
                                        - corr_read.to(x.device)).abs().max()) <= tol
                ids = torch.stack([self.contrast.answer_ids, self.contrast.wrong_ids], 1)
                cols = self._columns(x, torch.arange(self.B), ids)
                want = corr_read.gather(1, ids.to(corr_read.device))
                ok["columns"] = float((cols - want.to(cols.device)).abs().max()) <= tol
            except (_NotAtRows, hooks.PrefixUnsupported):
                pass
            finally:
                self.flops = 0
                torch.set_grad_enabled(grad)
            if self.prefix is not None or not ok["read_row"]:
                _ENGINE_OK[self.model] = ok
        self.read_row = ok["read_row"]
        cols = getattr(metric, "columns", None)
        if ok["columns"] and cols is not None and callable(getattr(metric, "from_columns", None)):
            self.columns = (cols, metric.from_columns)

    # ---------------------------------------------------------------- patching
    def _patch(self, layer: int, part: _Rows, first_row: int, p0: int):
        """The hook that writes the clean values of ``part``'s cells into rows ``first_row..``."""
        spec = self.plan.spec
        source = self.clean[spec.hook_name(layer)]
        dev = source.device
        n = len(part)
        idx = (torch.arange(first_row, first_row + n, device=dev), part.b.to(dev),
               None if self.cell_pos is None else self.cell_pos[part.ci].to(dev),
               None if self.cell_head is None else self.cell_head[part.ci].to(dev))
        return (spec.hook_name(layer), lambda act, hook: _write_cells(spec, act, source, idx, p0))

    def walk(self, rows: _Rows, p0: int, *, patch: bool = True, resid: bool = False) -> Tensor:
        """Outputs of ``rows`` (sorted by layer) run layer-major from position ``p0`` on: logits at
        the read position (``[row, vocab]``, or ``[row, k]`` for a column readout), or at every
        position without a read position; ``resid``: the final residual at the read position."""
        from mechlib.arch import block_device

        model, L, T = self.model, self.L, self.T
        layers = rows.layer.tolist()
        first = layers[0]
        kwl = self.starts[first].kwargs_by_layer
        batch = self.starts[first].batch
        q = T - p0
        use_prefix = self.prefix is not None and p0 > 0
        read_row = self.read_row and self.last is not None and layers[-1] < L - 1 and q > 1
        bounds: dict[int, list[int]] = {}
        for k, l in enumerate(layers):
            bounds.setdefault(l, [k, k])[1] = k + 1
        x, src, out = None, None, None
        with torch.no_grad(), hooks._cache_reaches_attention(model, first, use_prefix or read_row):
            for j in range(first, L):
                dev = block_device(model, j)
                patches = []
                if j in bounds:
                    a, b = bounds[j]
                    part = rows.take(slice(a, b))
                    new = self.starts[j].resid.index_select(0, part.b.to(self.starts[j].resid.device))[:, p0:]
                    x = new.to(dev) if x is None else torch.cat([x.to(dev), new.to(dev)])
                    src = part.b if src is None else torch.cat([src, part.b])
                    if patch:
                        patches.append(self._patch(j, part, a, p0))
                kw = hooks._to_device(_row_kwargs(kwl[j], src, batch), dev)
                if j == L - 1 and read_row:
                    try:
                        out = self._final_read_row(x.to(dev), kw, src, p0)
                        break
                    except _NotAtRows:
                        if resid:
                            raise
                        read_row = False
                if use_prefix:
                    kw = {k: hooks._suffix(k, v, p0) for k, v in kw.items()}
                    kw["cache"] = hooks._PrefixCache(self.prefix, p0, src)
                with hooks.attach(model, patches):
                    y = model.blocks[j](x.to(dev), use_cache=False, **kw)
                x = y[0] if isinstance(y, tuple) else y
                self.flops += block_flops(model, j, len(src), q, T)
        if self.last is None:
            self.flops += unembed_flops(model, len(src) * q)
            return hooks._logits_from_resid(model, x)
        if out is None:
            at = self.last.to(x.device)[src.to(x.device)] - p0
            out = x[torch.arange(len(src), device=x.device), at]
        if resid:
            return out
        return self._read(out, src)

    def _final_read_row(self, x: Tensor, kw: dict, src: Tensor, p0: int) -> Tensor:
        """The last block's output at each row's read position only: the other positions give
        their keys and values (query/key/value projections), the read row runs the whole block."""
        model, T = self.model, self.T
        block = model.blocks[self.L - 1]
        at = self.last.to(x.device)[src.to(x.device)]
        kw2 = {k: _at_rows(k, v, at.to(v.device) if isinstance(v, Tensor) else at) for k, v in kw.items()}
        if kw.get("attention_mask") is None and not bool((at == T - 1).all()):
            raise _NotAtRows("without an attention mask the read row must be the last position")
        kw1 = {k: hooks._suffix(k, v, p0) for k, v in kw.items()} if p0 else dict(kw)
        kw1["cache"] = _KeyValueProbe(p0)
        try:
            block(x, use_cache=False, **kw1)
        except _KeyValueSeen as seen:
            k, v, layer_idx = seen.k, seen.v, seen.layer_idx
        else:
            raise _NotAtRows("the final block's attention never read its key/value cache")
        if p0:
            pk, pv = self.prefix.kv[layer_idx]
            s = src.to(pk.device)
            k = torch.cat([pk[..., :p0, :].index_select(0, s).to(k.device), k], dim=-2)
            v = torch.cat([pv[..., :p0, :].index_select(0, s).to(v.device), v], dim=-2)
        kw2["cache"] = _FixedKeyValues(k, v)
        rows = torch.arange(x.shape[0], device=x.device)
        y = block(x[rows, at - p0][:, None], use_cache=False, **kw2)
        y = y[0] if isinstance(y, tuple) else y
        self.flops += x.shape[0] * (T - p0) * qkv_flops_per_token(model) + block_flops(model, self.L - 1, x.shape[0], 1, T)
        return y[:, 0]

    def _columns(self, x: Tensor, src: Tensor, ids: Tensor) -> Tensor:
        """Logits ``[row, k]`` of the token ids ``ids[src]`` only, from final residuals ``[row, d]``."""
        from mechlib.arch import output_device

        model = self.model
        x = model.ln_final(x.to(output_device(model))[:, None])[:, 0]
        lin = model.unembed.original_component
        cols = ids.to(x.device)[src.to(x.device)]  # [row, k]
        logits = torch.bmm(lin.weight[cols], x[:, :, None])[..., 0]
        if getattr(lin, "bias", None) is not None:
            logits = logits + lin.bias[cols]
        self.flops += unembed_flops(model, x.shape[0], cols.shape[1])
        return model.adapter.apply_output_logits_transform(logits)

    def _read(self, x: Tensor, src: Tensor) -> Tensor:
        if self.columns is not None:
            return self._columns(x, src, self.columns[0])
        self.flops += unembed_flops(self.model, x.shape[0])
        return hooks._logits_from_resid(self.model, x[:, None])[:, 0]

    def full(self, rows: _Rows, extras: dict) -> Tensor:
        """Outputs of ``rows`` from full forwards of the corrupted prompts (when resuming cannot be
        verified): every row's patch at its own layer, ``pixel_values`` and other inputs carried."""
        model = self.model
        dev = model.cfg.device
        src = rows.b
        patches = []
        for layer in sorted(set(rows.layer.tolist())):  # rows are sorted by layer
            sel = (rows.layer == layer).nonzero().flatten()
            patches.append(self._patch(layer, rows.take(sel), int(sel[0]), 0))
        tokens = self.contrast.corrupted_tokens.to(dev)[src.to(dev)]
        ex = {k: v.index_select(0, src.to(v.device)) if isinstance(v, Tensor) else v for k, v in extras.items()}
        logits = hooks.forward(model, tokens, hooks=patches, extras=ex)
        self.flops += forward_flops(model, len(src), self.T)
        if self.last is None:
            return logits
        return logits[torch.arange(len(src), device=logits.device), self.last.to(logits.device)[src.to(logits.device)]]

    # ---------------------------------------------------------------- metric values
    def values(self, out: Tensor, src: Tensor, metric, name: str, fill: Tensor) -> Tensor:
        """Per-row metric values. Metrics take copy-major stacks of the whole batch, so rows are
        slotted into copies, the slots no row fills holding the corrupted run's logits (``fill``)."""
        n = len(src)
        if self.columns is not None:
            return check_metric_values(self.columns[1](out), n, name=name)
        order = torch.argsort(src, stable=True)
        counts = torch.bincount(src, minlength=self.B)
        starts = torch.cumsum(counts, 0) - counts
        occ = torch.empty(n, dtype=torch.long)
        occ[order] = torch.arange(n) - starts[src[order]]
        vals = torch.empty(n)
        copies = max(1, self.max_rows // self.B)
        for k0 in range(0, int(occ.max()) + 1, copies):
            sel = ((occ >= k0) & (occ < k0 + copies)).nonzero().flatten()
            k = min(copies, int(occ.max()) + 1 - k0)
            stack = fill.repeat(k, *([1] * (fill.ndim - 1)))
            where = (occ[sel] - k0) * self.B + src[sel]
            stack[where.to(stack.device)] = out[sel.to(out.device)].to(stack.device, stack.dtype)
            v = check_metric_values(metric(stack), k * self.B, name=name)
            vals[sel] = v[where.to(v.device)].detach().float().cpu()
        return vals


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
                # a receiver at or below the chunk's first sender layer reads the clean run (no sender
                # reaches it); the resumed forward starts above it, so it is neither recorded nor patched
                recv_names = sorted({r.hook_name for r in recv if r.layer >= c_first})
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
