"""Shared by the patching verbs: the result type, the cells a sweep visits, batching and progress."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor

from mechlib.metrics import Metric, on_prompts
from mechlib.results import Result
from mechlib.sites import SiteError, SiteSpec, check_head, check_layer, n_heads, site_spec
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


def _write_cells(spec: SiteSpec, act: Tensor, source: Tensor, idx, offset: "int | Tensor" = 0) -> Tensor:
    """Copy the chosen cells of ``source[src]`` into ``act[rows]``. ``offset``: ``act`` holds
    positions ``offset..`` only (causal prefix reuse), ``source`` all of them; a tensor gives each
    cell its own offset (packed walks: position ``pos`` sits at ``pos - offset`` of its sequence)."""
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


def _reads_every_position(metric) -> str:
    """Why causal prefix reuse is off for a metric without ``last_token_only``."""
    return (f"the metric {_metric_name(metric)!r} reads every position (build it with last_token_only=True "
            "if it reads only the last token)")


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
