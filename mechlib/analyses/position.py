"""Position bias: does the answer depend on where an option is placed? (PINE, Wang et al. 2024)

* :func:`position_bias` — ask every item of an :class:`~mechlib.tasks.segments.OptionPrompts` set
  in both orders and report accuracy, consistency (the same option wins in both orders), the share
  of answers that pick the first slot and the logit preference for the first slot, each with a
  bootstrap CI over items; :meth:`PositionBias.compare` gives paired differences (e.g. PINE − base).
* :func:`segment_attention` — attention mass from the answer position to each segment slot, per
  layer and head: the mechanism the paper blames (causal attention favours distant content, RoPE
  favours near content).

Both take ``pine=True`` to run every forward under :func:`mechlib.interventions.position_invariant`
with each batch's own segment spans.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.interventions import position_invariant
from mechlib.provenance import records
from mechlib.results import Result, bootstrap_ci
from mechlib.tasks.segments import OptionPrompts, SegmentedPrompts

STATS = ("accuracy", "consistency", "first_slot_rate", "first_slot_logit")


@dataclass(frozen=True, repr=False)
class PositionBias(Result):
    """``values[slot]``: mean logit(correct) − logit(wrong) when the correct option is in ``slot``;
    ``per_prompt[item, slot]`` the same per item (the prompt axis is the item)."""

    def _per_item(self) -> dict[str, Tensor]:
        d = self.per_prompt  # [item, 2]
        right = (d > 0).float()
        picks_first = torch.stack([right[:, 0], 1 - right[:, 1]], 1)
        return {"accuracy": right.mean(1), "consistency": (right[:, 0] == right[:, 1]).float(),
                "first_slot_rate": picks_first.mean(1), "first_slot_logit": (d[:, 0] - d[:, 1]) / 2}

    def stats(self, level: float = 0.95) -> dict[str, tuple[float, float, float]]:
        """``{stat: (value, ci_low, ci_high)}`` with a percentile bootstrap over items.
        ``first_slot_rate`` is 0.5 and ``first_slot_logit`` 0 for an order-blind model."""
        return {k: (float(v.mean()), *bootstrap_ci(v, level=level)) for k, v in self._per_item().items()}

    def compare(self, other: "PositionBias", level: float = 0.95) -> dict[str, tuple[float, float, float]]:
        """Paired ``other − self`` per statistic over the same items, with a bootstrap CI."""
        if other.per_prompt.shape != self.per_prompt.shape:
            raise ValueError("compare needs two runs over the same items")
        a, b = self._per_item(), other._per_item()
        return {k: (float((b[k] - a[k]).mean()), *bootstrap_ci(b[k] - a[k], level=level)) for k in STATS}

    def to_frame(self, level: float = 0.95):
        import pandas as pd

        return pd.DataFrame(self.stats(level), index=["value", "ci_low", "ci_high"]).T


def _check_options(options) -> OptionPrompts:
    if not isinstance(options, OptionPrompts):
        raise TypeError(f"options must be an OptionPrompts (e.g. mechlib.tasks.pairwise_choice), "
                        f"got {type(options).__name__}")
    if any(len(s) != 2 for s in options.segments):
        raise ValueError("position_bias handles two-option items (each prompt with two segments)")
    n_items = int(options.item.max()) + 1
    if len(options) != 2 * n_items or not torch.equal(
            torch.sort(options.correct_slot.view(n_items, 2), 1).values,
            torch.tensor([[0, 1]]).expand(n_items, 2)):
        raise ValueError("each item must be asked exactly twice, once with the correct option in "
                         "each slot (rows 2i, 2i+1), as pairwise_choice builds them")
    return options


def _maybe_pine(model, chunk: SegmentedPrompts, pine: bool):
    return position_invariant(model, chunk) if pine else nullcontext()


@records
def position_bias(model, options: OptionPrompts, *, pine: bool = False, batch_size: int = 32) -> PositionBias:
    """Logit difference (correct − wrong) of every item in both orders → :class:`PositionBias`.
    ``pine=True`` runs the forwards under PINE."""
    options = _check_options(options)
    ld = []
    for chunk in options.batches(batch_size):
        with _maybe_pine(model, chunk, pine):  # unembedded at the last token only (all the metric reads)
            ld.append(chunk.logit_diff(hooks.forward_last(model, chunk.tokens, chunk.lengths - 1)).float().cpu())
    ld = torch.cat(ld)
    n_items = len(options) // 2
    per = torch.zeros(n_items, 2)
    per[options.item, options.correct_slot] = ld
    return PositionBias(per.mean(0), ("slot",), labels={"slot": ("correct first", "correct second")},
                        per_prompt=per, metadata={"n_items": n_items, "pine": pine,
                                                  "model": model.cfg.model_name})


@records
def segment_attention(model, prompts: SegmentedPrompts, *, pine: bool = False, batch_size: int = 32,
                      layers: Optional[list[int]] = None) -> Result:
    """``values[layer, head, slot]``: attention mass from each prompt's last token to the tokens
    of its ``slot``-th segment (mean over prompts; ``per_prompt`` keeps each prompt).
    ``pine=True`` reads the patterns PINE produces."""
    if not isinstance(prompts, SegmentedPrompts) or not prompts.segments:
        raise TypeError("prompts must be SegmentedPrompts with segments (e.g. from pairwise_choice)")
    n_seg = {len(s) for s in prompts.segments}
    if len(n_seg) != 1:
        raise ValueError(f"prompts have different numbers of segments {sorted(n_seg)}")
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    out = []
    K = n_seg.pop()
    for chunk in prompts.batches(batch_size):
        seg = torch.zeros(len(chunk), chunk.tokens.shape[1], K)
        for i, spans in enumerate(chunk.segments):
            for k, (a, b) in enumerate(spans):
                seg[i, a:b, k] = 1.0
        with _maybe_pine(model, chunk, pine), hooks.capture(model, names) as acts:
            hooks.forward_last(model, chunk.tokens, chunk.lengths - 1)  # the patterns; no full unembedding
        rows = torch.stack([chunk.at_last(acts[n].transpose(1, 2)).float().cpu() for n in names], 1)  # [b, L, H, pos]
        out.append(torch.einsum("blhp,bps->blhs", rows, seg))
    per = torch.cat(out)
    return Result(per.mean(0), ("layer", "head", "slot"), labels={"layer": [str(l) for l in layers]},
                  per_prompt=per, metadata={"model": model.cfg.model_name, "pine": pine})
