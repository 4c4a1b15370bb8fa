"""Attribution patching: the first-order estimate of every cell from one forward and one backward."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.analyses.patching.common import (
    PatchingResult,
    _check_contrast,
    _metric_name,
    _Plan,
    _plan,
    _reduce_cells,
    _sweep_result,
    prompt_batches,
)
from mechlib.memory import peak_memory
from mechlib.metrics import Metric, check_metric_values, read_positions
from mechlib.provenance import records
from mechlib.tasks.contrast import ContrastSet

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
    read = read_positions(metric, contrast)  # a last-token metric: unembed the answer position only

    def run(side, tracked=(), grad=False):
        return hooks.forward_read(model, getattr(contrast, f"{side}_tokens"), read, hooks=tracked,
                                  extras=contrast.forward_extras(side), grad=grad)

    with hooks.capture(model, hook_names) as clean_acts:
        clean_vals = check_metric_values(metric(run("clean")), B, name=name).detach().cpu()
    corr_acts: dict[str, Tensor] = {}

    def keep(act, hook, name):
        if not act.requires_grad:
            act = act.detach().requires_grad_(True) if act.grad_fn is None else act
        corr_acts[name] = act
        return act

    tracked = [(n, lambda act, hook, n=n: keep(act, hook, n)) for n in hook_names]
    with torch.enable_grad():
        corr_vals = check_metric_values(metric(run("corrupted", tracked, grad=True)), B, name=name)
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
