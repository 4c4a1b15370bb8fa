"""Activation patching: the verb, its clean/corrupted base runs and one batch of a sweep."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.analyses.patching.common import (
    PatchingResult,
    _check_contrast,
    _chunk_size,
    _fallback_warning,
    _metric_name,
    _Plan,
    _plan,
    _progress,
    _reads_every_position,
    _sweep_result,
    prompt_batches,
)
from mechlib.analyses.patching.engine import _BLOCK_OVERHEAD_ROWS, _TOKEN_ROWS, _changed, _Engine, _select_rows, _walks
from mechlib.analyses.patching.packed import packed_walks
from mechlib.flops import forward_flops
from mechlib.memory import peak_memory
from mechlib.metrics import Metric, check_metric_values, read_positions
from mechlib.provenance import records
from mechlib.tasks.contrast import ContrastSet

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
            By-position rows that start at different positions are packed into one walk, each
            row only on its own positions (checked once per model; ``metadata["packed"]``, and
            ``metadata["pack_reason"]`` with a warning where the check failed).

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
    pack_reasons = [o["pack_reason"] for o in parts if o["pack_reason"]]
    if pack_reasons:
        warnings.warn(f"activation_patching: packed walks are off for this model, so rows that start at different "
                      f"positions run in separate, smaller walks (same values, slower). Why: {pack_reasons[0]}. "
                      "The result's metadata records packed=False.", stacklevel=2)
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
                      packed=any(o["packed"] for o in parts), pack_reason=pack_reasons[0] if pack_reasons else None,
                      flops_one_forward_per_cell=sum(o["flops_one_forward_per_cell"] for o in parts),
                      chunk=chunk, batch_size=batch_size,
                      peak_memory=mem, positions=plan.positions, heads=plan.heads if spec.per_head else None),
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
            out = hooks.forward_read(model, toks, None if read_pos is None else read_pos.repeat(n // B), extras=extras)
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
    read_pos = read_positions(metric, contrast)
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
            prefix_reason = _reads_every_position(metric)
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
    # rows of different first positions: one packed walk (each row only its own positions) where
    # the model passed the packing check and the cells are by position
    would_pack = (prefix is not None and engine.cell_pos is not None and spec.head_dim != 1
                  and len(rows) > 0 and bool((rows.fp != rows.fp[0]).any()))
    packed = would_pack and engine.packed
    if packed:
        walks = [(int(rows.fp[idx].min()), idx)
                 for idx in packed_walks(rows.layer, rows.b, rows.fp, last.cpu(), token_rows, chunk * B,
                                         last_layer=model.cfg.n_layers - 1 if engine.read_row else None)]
    else:
        walks = _walks(rows, model.cfg.n_layers, T, chunk * B, overhead, split_last=engine.read_row,
                       token_rows=token_rows)
    fill = base.corr_out
    per_prompt = corr_vals.cpu().reshape(B, 1, 1).repeat(1, len(plan.layers), len(plan.cells()))
    extras = hooks.check_inputs(model, contrast.forward_extras("corrupted"), contrast.corrupted_tokens)
    with _progress(len(walks), f"patching {spec.kind}", progress) as bar:
        for p0, idx in walks:
            part = rows.take(idx)
            if packed:
                out = engine.walk_packed(part)
            else:
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
                read_row=engine.read_row, readout="columns" if engine.columns is not None else "vocabulary",
                packed=packed, pack_reason=engine.pack_reason if would_pack and not packed else None)
