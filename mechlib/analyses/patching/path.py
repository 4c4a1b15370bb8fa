"""Path patching: sender heads' effects through chosen receivers only."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.analyses.patching.common import (
    PatchingResult,
    _check_contrast,
    _chunk_size,
    _metric_name,
    _progress,
    _reads_every_position,
    prompt_batches,
)
from mechlib.memory import peak_memory
from mechlib.metrics import Metric, check_metric_values, read_positions
from mechlib.provenance import records
from mechlib.sites import Site, SiteError, check_head, check_layer
from mechlib.tasks.contrast import ContrastSet

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
    """The clean and corrupted runs path patching starts from, for one batch of prompts; with a
    metric that reads the last token only, also the clean run's keys and values from the first
    recorded layer on (``prefix``: causal prefix reuse; ``prefix_reason`` says why there is none)."""

    contrast: ContrastSet
    metric: Metric
    starts: dict
    clean_logits: Tensor
    clean_z: dict
    corr_z: dict
    clean_vals: Tensor
    corr_vals: Tensor
    prefix: Optional[hooks.Prefix] = None
    prefix_reason: Optional[str] = None

    @classmethod
    def record(cls, model, contrast: ContrastSet, metric: Metric, layers: Sequence[int]) -> "_PathBase":
        from contextlib import ExitStack

        B, name = len(contrast), _metric_name(metric)
        z_names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
        read = read_positions(metric, contrast)  # a last-token metric: [batch, vocab] logits there only

        def run(side):
            with hooks.capture(model, z_names) as z:
                logits = hooks.forward_read(model, getattr(contrast, f"{side}_tokens"), read,
                                            extras=contrast.forward_extras(side))
            return logits, dict(z)

        with ExitStack() as stack:
            starts = stack.enter_context(hooks.record_block_inputs(model, layers))
            rec = stack.enter_context(hooks.record_keys_values(model, min(layers))) if read is not None else None
            clean_logits, clean_z = run("clean")
        clean_vals = check_metric_values(metric(clean_logits), B, name=name)
        corr_logits, corr_z = run("corrupted")
        corr_vals = check_metric_values(metric(corr_logits), B, name=name)
        prefix, reason = None, None
        if rec is None:
            reason = _reads_every_position(metric)
        else:
            try:
                prefix = hooks.prefix_from(model, rec, min(layers), contrast.n_pos)
            except hooks.PrefixUnsupported as e:
                reason = str(e)
        return cls(contrast, metric, dict(starts), clean_logits, clean_z, corr_z, clean_vals, corr_vals,
                   prefix, reason)


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

    Causal prefix reuse: both runs equal the clean run at every position before the first one
    where a sender's corrupted output differs from its clean output (attention is causal and every
    other head is frozen to its clean output), so with a metric that reads the last token only
    (``last_token_only``, as :mod:`mechlib.metrics` builds them) they recompute only from that
    position on, the clean run's keys and values standing in for the earlier ones — exact, and
    checked once per model against the clean logits. On IOI (S2 swapped) that is from the batch's
    earliest S2 on; on Colored Objects, the last tokens of the question. The result's metadata records
    ``prefix_reuse`` and ``from_pos`` (the earliest recompute start); where reuse would have
    helped but cannot be used, a warning and ``prefix_reason`` say why.

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
    from_pos, prefix_reasons = [], []
    with peak_memory(model.cfg.device) as mem:
        for idx, base in bases.batches(sorted({l for l, _ in senders} | set(check_layers))):
            for l in check_layers:
                reason = hooks.resume_check(model, base.starts[l], l, _full_clean_logits(model, base, l))
                if reason is not None:
                    raise NotImplementedError(
                        f"path patching resumes forwards at the sender/receiver layers, and that cannot be "
                        f"verified on this model: {reason}")
            prefix, reason = _checked_prefix(model, base, min(check_layers))
            values[idx], starts_at, would = _path_batch(model, base, senders, recv, receiver_positions,
                                                        sender_positions, memory_budget_mb, max_chunk, progress,
                                                        prefix)
            from_pos += starts_at
            if prefix is None and would:
                prefix_reasons.append(reason)
            clean_vals[idx], corr_vals[idx] = base.clean_vals.cpu(), base.corr_vals.cpu()
    if prefix_reasons:
        warnings.warn(f"path_patching: causal prefix reuse is off for this call, so every patched copy recomputes "
                      f"the positions before the senders' first difference too. Why: {prefix_reasons[0]}. The "
                      "result's metadata records prefix_reuse=False.", stacklevel=2)
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
                      prefix_reuse=max(from_pos, default=0) > 0,
                      prefix_reason=prefix_reasons[0] if prefix_reasons else None,
                      from_pos=min(from_pos, default=0),
                      title="path patching → " + ("logits" if not recv else ", ".join(map(str, recv)))),
    )


def _full_clean_logits(model, base: _PathBase, layer: int) -> Tensor:
    """The clean run's full logits, the reference :func:`hooks.resume_check` compares a resumed
    forward with — run only while resuming at ``layer`` is unverified on this model (the base run
    unembeds the read positions only when the metric reads nothing else)."""
    if base.clean_logits.ndim == 3 or hooks.resume_verified(model, layer):
        return base.clean_logits
    c = base.contrast
    return hooks.forward(model, c.clean_tokens, extras=c.forward_extras("clean"))


def _checked_prefix(model, base: _PathBase, layer: int) -> tuple[Optional[hooks.Prefix], Optional[str]]:
    """The base's clean keys and values where recomputing only later positions reproduces the clean
    logits on this model (checked once per model), else ``None`` and why not."""
    if base.prefix is None:
        return None, base.prefix_reason
    c = base.contrast
    ref = base.clean_logits
    if ref.ndim == 3:
        last = c.last_pos.to(ref.device)
        ref = ref[torch.arange(len(c), device=last.device), last]
    reason = hooks.prefix_check(model, base.starts[layer], base.prefix, c.last_pos, ref)
    return (None, reason) if reason is not None else (base.prefix, None)


def _first_change(base: _PathBase, part, sender_positions: str, last_b: Tensor) -> int:
    """The first position at which a sender of ``part`` is patched with a value that differs from
    the clean one (in any prompt of the batch): every earlier position of the patched runs is the
    clean run's (causal attention; every other head frozen to its clean output), so the clean
    keys and values stand in for them. At most the first read position."""
    p = int(last_b.min())
    if sender_positions == "last":
        return p
    for l, h in part:
        name = f"blocks.{l}.attn.hook_z"
        diff = (base.clean_z[name][:, :p, h] != base.corr_z[name][:, :p, h]).flatten(2).any(-1).any(0)
        if bool(diff.any()):
            p = int(diff.nonzero()[0])
        if p == 0:
            break
    return p


def _path_batch(model, base: _PathBase, senders, recv, receiver_positions, sender_positions,
                memory_budget_mb, max_chunk, progress,
                prefix: Optional[hooks.Prefix]) -> tuple[Tensor, list[int], bool]:
    """Per-prompt metric values ``[b, sender]`` of path patching on one batch, the position each
    chunk's patched runs recomputed from (0 without ``prefix``), and whether a prefix would have
    let a chunk start later than position 0."""
    contrast, metric = base.contrast, base.metric
    B, name = len(contrast), _metric_name(metric)
    n_layers = model.cfg.n_layers
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    starts, clean_z, corr_z = base.starts, base.clean_z, base.corr_z
    recv_first = min((r.layer for r in recv), default=None)
    read_pos = read_positions(metric, contrast)
    chunk = _chunk_size(model, contrast, memory_budget_mb, max_chunk, read_pos is not None)
    values = torch.empty((B, len(senders)))
    last_b = contrast.last_pos
    starts_at, would = [], False
    with _progress(-(-len(senders) // chunk), "path patching", progress) as bar:
        for c0 in range(0, len(senders), chunk):
            part = senders[c0:c0 + chunk]
            C = len(part)
            rows_of: dict[int, list[tuple[int, int]]] = {}
            for k, (l, h) in enumerate(part):
                rows_of.setdefault(l, []).append((k, h))
            # causal prefix reuse: positions before p0 are the clean run's in every patched copy
            p0 = _first_change(base, part, sender_positions, last_b)
            would = would or p0 > 0
            p0 = p0 if prefix is not None else 0
            starts_at.append(p0)
            resume = dict(prefix=prefix, from_pos=p0) if p0 else {}

            def freeze(act, hook, layer, C=C, rows_of=rows_of, p0=p0):
                out = clean_z[z_names[layer]][:, p0:].repeat(C, 1, 1, 1)
                corr = corr_z[z_names[layer]][:, p0:]
                for k, h in rows_of.get(layer, []):
                    rows = slice(k * B, (k + 1) * B)
                    if sender_positions == "all":
                        out[rows, :, h] = corr[:, :, h]
                    else:
                        r = torch.arange(B, device=out.device)
                        p = last_b.to(out.device) - p0
                        out[k * B + r, p, h] = corr[r, p, h]
                return out.to(act.device)

            c_first = part[0][0]
            frozen = [(z_names[l], lambda act, hook, l=l: freeze(act, hook, l)) for l in range(c_first, n_layers)]
            if not recv:
                logits = hooks.run_from(model, starts[c_first], c_first, copies=C, hooks=frozen, read_pos=read_pos,
                                        **resume)
            else:
                # a receiver at or below the chunk's first sender layer reads the clean run (no sender
                # reaches it); the resumed forward starts above it, so it is neither recorded nor patched
                recv_names = sorted({r.hook_name for r in recv if r.layer >= c_first})
                until = max(r.layer for r in recv)  # nothing after the last receiver's block runs
                with hooks.capture(model, recv_names) as seen:
                    hooks.run_from(model, starts[c_first], c_first, copies=C, hooks=frozen[:until - c_first + 1],
                                   until=until, **resume)

                rows = torch.arange(C * B)
                last = last_b.repeat(C) - p0

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
                                        read_pos=read_pos, **resume)
            vals = check_metric_values(metric(logits), C * B, name=name)
            values[:, c0:c0 + C] = vals.reshape(C, B).T.cpu()
            bar.update(1)
    return values, starts_at, would
