"""Metrics: factories returning ``logits -> [batch]`` functions; higher always means "more like clean".

Each metric reads the logits at each prompt's *own* last token (``contrast.last_pos``), so padding
never shifts the answer position. A metric also accepts logits for ``k`` stacked copies of the set
(batch ``k * n``, copy-major), which is how batched patching evaluates many variants per forward.

Metrics made here carry ``last_token_only = True``: they read nothing but the last token, so
patching engines may hand them ``[batch, vocab]`` logits computed at the last token only (the
unembedding is a third of a resumed forward's cost on a 49k vocabulary). A custom metric without
the flag always gets full ``[batch, pos, vocab]`` logits.

Common misreading: a logit difference is not a probability; a large logit difference can sit on a
token with tiny probability when both answer and wrong answer are unlikely. Report
:func:`answer_prob` alongside when that matters.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mechlib.numerics import widen
from mechlib.tasks.contrast import ContrastSet

Metric = Callable[[Float[Tensor, "batch pos vocab"]], Float[Tensor, "batch"]]


class MetricError(ValueError):
    """A metric returned the wrong shape, or NaN/inf values."""


def last_token_logits(
    logits: Float[Tensor, "batch pos vocab"], contrast: ContrastSet
) -> Float[Tensor, "batch vocab"]:
    """Logits at each prompt's last real token; ``batch`` may be any multiple of ``len(contrast)``.

    Logits that are already ``[batch, vocab]`` (read at the last token by the caller) pass through.
    """
    n = len(contrast)
    b = logits.shape[0]
    if b % n:
        raise MetricError(
            f"logits have batch {b}, which is not a multiple of the contrast set's {n} prompts"
        )
    if logits.ndim == 2:
        return logits
    pos = contrast.last_pos.to(logits.device).repeat(b // n)
    return logits[torch.arange(b, device=logits.device), pos]


def _tile(ids: Tensor, b: int, device) -> Tensor:
    return ids.to(device).repeat(b // len(ids))


def _finish(metric, name: str, subset) -> Metric:
    """Mark a metric made by a factory: its name, that it reads the last token only, and how to
    make the same metric for a subset of the prompts (``subset(idx)``; used by ``batch_size=``)."""
    metric.__name__ = name
    metric.last_token_only = True
    metric.subset = subset
    return metric


def custom(contrast: ContrastSet, fn: Callable[[Tensor, ContrastSet], Tensor], *, name: str = "custom") -> Metric:
    """A metric from ``fn(last_token_logits [b, vocab], contrast) -> [b]``, higher = more like
    clean. Unlike a plain function, it can be evaluated on any subset of the prompts, so verbs can
    split the prompts into batches (``batch_size=``).

    Example:
        >>> m = metrics.custom(ioi, lambda last, cs: last.log_softmax(-1)[torch.arange(len(last)),  # doctest: +SKIP
        ...                    cs.answer_ids.repeat(len(last) // len(cs))], name="answer_logprob")
    """

    def metric(logits):
        out = fn(last_token_logits(logits, contrast), contrast)
        return widen(out) if isinstance(out, Tensor) else out

    return _finish(metric, name, lambda idx: custom(contrast.subset(idx), fn, name=name))


def on_prompts(metric: Metric, idx, n: int) -> Metric:
    """The same metric for prompts ``idx`` of its ``n`` (``metric`` itself when ``idx`` is all of
    them); a plain function cannot be split and gets a clear error."""
    idx = list(idx)
    if idx == list(range(n)):
        return metric
    sub = getattr(metric, "subset", None)
    if sub is None:
        name = getattr(metric, "__name__", type(metric).__name__)
        raise MetricError(
            f"metric {name!r} is a plain function bound to all {n} prompts, so it cannot be evaluated on a "
            "batch of them: build it with mechlib.metrics (logit_diff, accuracy, ...) or metrics.custom(contrast, "
            "fn), or run without batch_size")
    return sub(idx)


def logit_diff(contrast: ContrastSet) -> Metric:
    """``logit(answer) - logit(wrong answer)`` at the last token, per prompt (float32 for a
    half-precision model's logits, as every metric here).

    Example:
        >>> metric = logit_diff(ioi_set)                  # doctest: +SKIP
        >>> metric(model(ioi_set.clean_tokens)).mean()    # ≈ +3 on SmolLM2-135M
    """

    def metric(logits):
        last = last_token_logits(logits, contrast)
        b = last.shape[0]
        rows = torch.arange(b, device=last.device)
        return last[rows, _tile(contrast.answer_ids, b, last.device)].float() - last[
            rows, _tile(contrast.wrong_ids, b, last.device)
        ].float()

    # the only logits it reads, per prompt, and the value from them (rows in any prompt order):
    # patching engines then unembed two columns instead of the whole vocabulary
    metric.columns = torch.stack([contrast.answer_ids, contrast.wrong_ids], 1)
    metric.from_columns = lambda cols: cols[:, 0].float() - cols[:, 1].float()
    return _finish(metric, "logit_diff", lambda idx: logit_diff(contrast.subset(idx)))


def answer_prob(contrast: ContrastSet) -> Metric:
    """Softmax probability of the answer token at the last token, per prompt."""

    def metric(logits):
        last = last_token_logits(logits, contrast).float()
        b = last.shape[0]
        probs = last.softmax(-1)
        return probs[torch.arange(b, device=last.device), _tile(contrast.answer_ids, b, last.device)]

    return _finish(metric, "answer_prob", lambda idx: answer_prob(contrast.subset(idx)))


def accuracy(contrast: ContrastSet, *, among: str = "answers", candidates: Optional[Tensor] = None) -> Metric:
    """1.0 where the answer is the top prediction at the last token, else 0.0, per prompt.

    Args:
        among: ``"answers"`` ranks only the task's candidate tokens (every answer and wrong answer
            in the set, e.g. all colours of Colored Objects — the usual multiple-choice
            accuracy); ``"options"`` each prompt's own candidates (``contrast.options``, e.g. the
            three colours of its scene); ``"vocab"`` ranks the whole vocabulary (greedy-decoding
            accuracy).
        candidates: the candidate token ids for ``among="answers"`` (default: every answer and
            wrong answer of the set).
    """
    if among not in ("answers", "options", "vocab"):
        raise ValueError(f"among={among!r}: choose 'answers', 'options' or 'vocab'")
    if among == "options" and not contrast.options:
        raise ValueError("among='options' needs a contrast set with per-prompt options (e.g. colored_objects)")
    cand = torch.unique(torch.cat([contrast.answer_ids, contrast.wrong_ids])) if candidates is None else candidates

    def metric(logits):
        last = last_token_logits(logits, contrast)
        b = last.shape[0]
        ans = _tile(contrast.answer_ids, b, last.device)
        if among == "answers":
            c = cand.to(last.device)
            pred = c[last[:, c].argmax(-1)]
        elif among == "options":
            opts = torch.tensor(contrast.options, device=last.device).repeat(b // len(contrast), 1)  # [b, k]
            pred = opts.gather(1, last.gather(1, opts).argmax(-1, keepdim=True))[:, 0]
        else:
            pred = last.argmax(-1)
        return (pred == ans).float()

    return _finish(metric, f"accuracy({among})",
                   lambda idx: accuracy(contrast.subset(idx), among=among, candidates=cand))


def kl_to_clean(contrast: ContrastSet, clean_logits: Float[Tensor, "batch pos vocab"]) -> Metric:
    """``-KL(clean || run)`` of the next-token distributions at the last token (0 = identical).

    Args:
        clean_logits: logits of the clean run on ``contrast.clean_tokens`` (full ``[batch, pos,
            vocab]``, or already at the last token ``[batch, vocab]``).
    """
    ref = clean_logits if clean_logits.ndim == 2 else last_token_logits(clean_logits, contrast)
    ref_logp = F.log_softmax(ref.detach().float(), -1)

    def metric(logits):
        logp = F.log_softmax(last_token_logits(logits, contrast).float(), -1)
        r = ref_logp.to(logp.device).repeat(logp.shape[0] // ref_logp.shape[0], 1)
        return -(r.exp() * (r - logp)).sum(-1)

    return _finish(metric, "kl_to_clean",
                   lambda idx: kl_to_clean(contrast.subset(idx), ref[torch.as_tensor(list(idx))]))


def read_positions(metric: Metric, contrast: ContrastSet) -> Optional[Tensor]:
    """The positions ``metric`` reads, ``[batch]`` (each prompt's last token), when it declares that
    it reads nothing else (``last_token_only``, as the metrics built here do); ``None`` when it may
    read every position's logits."""
    return contrast.last_pos if getattr(metric, "last_token_only", False) else None


def check_metric_values(values, n: int, *, name: str = "metric") -> Tensor:
    """Validate a metric's output: a float tensor of shape ``[n]`` with finite values; half
    precision (a bf16/fp16 model's logits) comes back as float32 (differentiably), so tables of
    values are float32 whatever the model's dtype."""
    if not isinstance(values, Tensor):
        raise MetricError(f"{name} returned {type(values).__name__}; it must return a tensor of shape [{n}]")
    if values.shape != (n,):
        raise MetricError(
            f"{name} returned shape {tuple(values.shape)}; metrics map logits [batch, pos, vocab] to "
            f"one value per prompt, shape [{n}] (do not reduce over the batch)"
        )
    if not torch.isfinite(values).all():
        bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
        raise MetricError(f"{name} returned NaN/inf for prompts {bad[:10]}")
    return widen(values)


def normalized(value: Tensor, clean: Tensor | float, corrupted: Tensor | float) -> Tensor:
    """``(value - corrupted) / (clean - corrupted)``: 0 = corrupted baseline, 1 = clean."""
    denom = clean - corrupted
    if isinstance(denom, Tensor):
        if (denom.abs() < 1e-8).any():
            raise MetricError("clean and corrupted baselines coincide: normalized recovery is undefined")
    elif abs(denom) < 1e-8:
        raise MetricError("clean and corrupted baselines coincide: normalized recovery is undefined")
    return (value - corrupted) / denom


_STARTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def evaluate(model, contrast: ContrastSet, metric: Optional[Metric] = None, *, side: str = "clean",
             start_layer: Optional[int] = None, from_pos: Optional[int] = None) -> Tensor:
    """Metric values ``[batch]`` of a forward on the clean or corrupted tokens (under whatever
    interventions are active).

    ``start_layer``: run only the blocks from ``start_layer`` on, from the inputs recorded by an
    unedited forward of the same set (recorded once per contrast set, side and layer; resuming is
    checked against the full forward). Much cheaper when comparing many edits of late layers — e.g.
    steering different head sets — and refused when a hook is active at an earlier layer, where the
    edit would be skipped.

    ``from_pos`` (with ``start_layer``): recompute only positions ``from_pos ..`` of those blocks;
    the unedited run's keys and values stand in for the earlier ones (causal prefix reuse, recorded
    once with the set's inputs and checked once per model against a full recomputation). Exact when
    the active edits change nothing before ``from_pos``, so it is refused unless every active hook
    belongs to an edit that declares it can check that (``steer_attention`` does: it raises for a
    query position before ``from_pos``), and the metric must read only positions ``>= from_pos``
    (``last_token_only``). Steering the last query of 62-token prompts: 1 position of 62 per block.
    """
    from mechlib import hooks, layout

    metric = metric or logit_diff(contrast)
    name = getattr(metric, "__name__", "metric")
    tokens = contrast.clean_tokens if side == "clean" else contrast.corrupted_tokens
    read = read_positions(metric, contrast)
    if from_pos is not None:
        if start_layer is None:
            raise ValueError("from_pos needs start_layer (the blocks whose later positions are recomputed); "
                             "pass both, e.g. start_layer=the first edited layer")
        if read is None:
            raise ValueError(f"from_pos={from_pos}: the metric {name} may read every position's logits; reuse needs "
                             "a metric that reads the last token only (last_token_only, as mechlib's metrics do)")
        from_pos = int(from_pos)
        if not 0 < from_pos <= int(read.min()):
            raise ValueError(f"from_pos={from_pos} must lie in [1, {int(read.min())}]: after the first position and "
                             "not after the earliest position the metric reads")
        safe = {id(hooks.hook_point(model, n)) for n in layout.suffix_hooks(model)}  # by point: names have aliases
        unsure = [n for n in hooks.active_hooks(model) if id(hooks.hook_point(model, n)) not in safe]
        if unsure:
            raise ValueError(f"from_pos={from_pos}: hooks at {unsure[:3]} are not from an edit that checks it changes "
                             "nothing before from_pos (steer_attention does); evaluate without from_pos")
    if start_layer is None:
        logits = hooks.forward_read(model, tokens, read, extras=contrast.forward_extras(side))
        return check_metric_values(metric(logits), len(contrast), name=name).cpu()
    early = [n for n in hooks.active_hooks(model) if n.startswith("blocks.")
             and int(n.split(".")[1]) < start_layer]
    if early:
        raise ValueError(f"hooks are active at {early[:3]}, before start_layer={start_layer}: resuming there would "
                         "skip them; lower start_layer or evaluate without it")
    key = (id(contrast), side, start_layer)
    per_model = _STARTS.setdefault(model, {})
    hit = per_model.get(key)
    if hit is None or hit[0] is not contrast or (from_pos is not None and hit[2] is None):
        hit = per_model[key] = _record_start(model, contrast, tokens, side, start_layer, read, prefix=from_pos is not None)
    logits = hooks.run_from(model, hit[1], start_layer, read_pos=read, prefix=hit[2], from_pos=from_pos or 0)
    return check_metric_values(metric(logits), len(contrast), name=name).cpu()


def _record_start(model, contrast: ContrastSet, tokens: Tensor, side: str, layer: int, read: Optional[Tensor], *,
                  prefix: bool) -> tuple:
    """``(contrast, block inputs at layer, Prefix or None)`` from one forward of the unedited model
    (the active edits paused). Where resuming at ``layer`` (and reusing the prefix) is not yet
    verified on this model, that forward computes every logit and the replay is checked against it;
    afterwards it unembeds only the positions the metric reads."""
    from contextlib import nullcontext

    from mechlib import hooks

    verified = hooks.resume_verified(model, layer) and (not prefix or hooks.prefix_verified(model))
    with hooks.paused(model):
        with hooks.record_block_inputs(model, [layer]) as rec, \
                (hooks.record_keys_values(model, layer) if prefix else nullcontext()) as kv:
            out = hooks.forward_read(model, tokens, read if verified else None, extras=contrast.forward_extras(side))
        start = rec[layer]
        reason = None if verified else hooks.resume_check(model, start, layer, out)
        if reason is not None:
            raise NotImplementedError(f"evaluate(start_layer=...) cannot resume this model: {reason}")
        if not prefix:
            return contrast, start, None
        try:
            pre = hooks.prefix_from(model, kv, layer, tokens.shape[1])
        except hooks.PrefixUnsupported as e:
            reason = str(e)
        else:
            if not hooks.prefix_verified(model):
                ref = last_token_logits(out, contrast)  # at read (contrast.last_pos); [b, vocab] passes through
                reason = hooks.prefix_check(model, start, pre, read, ref)
        if reason is not None:
            raise NotImplementedError(f"evaluate(from_pos=...) cannot reuse the unedited run's keys and values on "
                                      f"this model: {reason}; evaluate without from_pos")
    return contrast, start, pre


def next_token_loss(model, prompts, *, extras=None, batch_size: Optional[int] = None) -> Tensor:
    """Mean next-token cross-entropy per prompt ``[batch]`` over its real tokens (lower = better).

    Runs under whatever interventions are active, so ``exp(loss)`` before/after an intervention is
    the perplexity comparison of Sun et al. and Gu et al.
    """
    from mechlib.hooks import forward
    from mechlib.tasks.contrast import PromptBatch

    out = []
    for sub in PromptBatch.from_prompts(model, prompts, extras=extras).batches(batch_size):
        logits = forward(model, sub.tokens, extras=sub.extras).float()
        b, t, v = logits.shape
        # each position's next token as target (the last has none: ignored), over the logits as laid
        # out — no copy, and the vocabulary axis contiguous (4-5x faster than a transposed view)
        target = torch.full((b, t), -100, dtype=torch.long, device=logits.device)
        target[:, :-1] = sub.tokens[:, 1:].to(logits.device)
        ce = F.cross_entropy(logits.reshape(b * t, v), target.reshape(-1), reduction="none").view(b, t)[:, :-1]
        mask = sub.mask[:, 1:].to(ce.device).float()
        out.append(((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    return torch.cat(out)
