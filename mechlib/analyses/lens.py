"""The logit lens: what each layer's residual stream would predict, and how target tokens rise and
fall through the layers.

Built on TransformerLens 4.3's ``logit_lens`` (``tools/analysis/logit_lens.py``: accumulated
residual stack → final norm with recomputed statistics → unembedding, chunked over the vocabulary,
checked against the model's own logits). mechlib adds what the papers need on top:

* per-prompt reading at each prompt's own last token (mixed lengths are grouped, not padded);
* target probabilities and full-vocabulary ranks per layer (``rank trajectories``; VISTA,
  Li et al. 2025), and **early excitation** — the layer where a token's probability peaks vs the
  final layer (Lv et al. 2024's final-layer suppression is the same picture: the answer peaks
  before the last layer and is pushed down at the end);
* :func:`component_tokens` — decompose each MLP's (or attention layer's) output at the last token
  into the vocabulary tokens it promotes (factual recall: which MLP writes "Paris");
* :func:`self_logits_augmentation` — VISTA's SLA: mix earlier layers' lens logits into the final
  logits.

Most common misreading: the lens reads early layers through the *final* norm and unembedding,
which they were not trained for; low early ranks mean "not linearly readable by the final
readout yet", not "absent". A tuned lens (TL's ``lens=`` hook) corrects for this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.memory import peak_memory
from mechlib.provenance import records
from mechlib.results import Result
from mechlib.tasks.contrast import ContrastSet, PromptBatch, single_token_id


def _batch_and_targets(model, prompts, targets) -> tuple[PromptBatch, Optional[Tensor], list[str]]:
    """Prompts as a batch, and targets as ``[batch, k]`` ids with names."""
    batch = PromptBatch.from_prompts(model, prompts)
    if isinstance(prompts, ContrastSet) and targets is None:
        return batch, torch.stack([prompts.answer_ids, prompts.wrong_ids], 1), ["answer", "wrong"]
    if targets is None:
        return batch, None, []
    if isinstance(targets, str):
        targets = [targets]
    ids = [single_token_id(model, t, what=f"target {t!r}") if isinstance(t, str) else int(t) for t in targets]
    names = [t if isinstance(t, str) else model.tokenizer.decode([int(t)]) for t in targets]
    return batch, torch.tensor(ids).repeat(len(batch), 1), names


@dataclass(frozen=True, repr=False)
class LensResult(Result):
    """Logit-lens readout at each prompt's last token.

    ``values``: ``[layer, target]`` target probabilities (mean over prompts); ``per_prompt`` the
    same per prompt; ``ranks``: ``[prompt, layer, target]`` full-vocabulary ranks (0 = top);
    ``top_tokens[prompt][layer]``: the layer's top-k tokens. Layers are TL's stack labels
    (``"0_pre"`` … ``"29_pre"``, ``"final_post"``).
    """

    ranks: Optional[Tensor] = None
    top_tokens: tuple = ()

    def tokens(self, prompt: int, layer: Union[int, str]) -> tuple[str, ...]:
        """The top-k tokens of prompt ``prompt`` at ``layer`` — a layer number or label (``15``,
        ``"15_pre"``), located by :meth:`~mechlib.Result.locate` (``top_tokens`` itself is indexed
        by position in the result)."""
        return self.top_tokens[prompt][self.locate("layer", layer)]

    def rank_trajectory(self, target: Union[int, str] = 0) -> Tensor:
        """``[prompt, layer]`` ranks of one target (index or name)."""
        k = target if isinstance(target, int) else list(self.labels["target"]).index(target)
        return self.ranks[:, :, k]

    def early_excitation(self):
        """Per prompt and target: the layer of peak probability, the peak and final probability and
        rank; ``early`` where the peak is before the last layer and at least twice the final value."""
        import pandas as pd

        rows = []
        layers = self.labels["layer"]
        for i in range(self.per_prompt.shape[0]):
            for k, name in enumerate(self.labels["target"]):
                p = self.per_prompt[i, :, k]
                peak = int(p.argmax())
                rows.append(dict(prompt=i, target=name, peak_layer=layers[peak], peak_index=peak,
                                 peak_prob=float(p[peak]), final_prob=float(p[-1]),
                                 final_rank=int(self.ranks[i, -1, k]), best_rank=int(self.ranks[i, :, k].min()),
                                 early=peak < len(layers) - 1 and float(p[peak]) >= 2 * float(p[-1])))
        return pd.DataFrame(rows)

    def plot_trajectories(self, target: Union[int, str] = 0, ax=None, *, log: bool = True):
        """Rank trajectory of one target, one line per prompt (returns the figure)."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=(7, 3.2))
        else:
            fig = ax.figure
        r = self.rank_trajectory(target).float() + 1
        for row in r:
            ax.plot(row.numpy(), color="C0", alpha=0.35)
        ax.plot(r.median(0).values.numpy(), color="C3", lw=2, label="median")
        if log:
            ax.set_yscale("log")
        ax.invert_yaxis()
        name = target if isinstance(target, str) else self.labels["target"][target]
        ax.set(xlabel="layer (residual stream read by the logit lens)", ylabel="rank + 1",
               title=f"rank trajectory of {name!r}")
        ax.legend()
        return fig


@records
def logit_lens(
    model,
    prompts,
    *,
    targets: Optional[Sequence[Union[str, int]]] = None,
    top_k: int = 5,
    batch_size: Optional[int] = None,
) -> LensResult:
    """Logit lens at each prompt's last token, with target probabilities and ranks per layer.

    Args:
        prompts: strings, a :class:`PromptBatch`, or a :class:`ContrastSet` (then the default
            targets are each prompt's answer and wrong answer).
        targets: tokens to follow (one-token strings or ids), shared by all prompts.
        top_k: top tokens kept per layer and prompt.
        batch_size: prompts per forward (default: all prompts of one length together).

    Returns:
        :class:`LensResult` over ``("layer", "target")``.

    Example:
        >>> lens = mechlib.logit_lens(model, ["The capital of France is"], targets=[" Paris"])  # doctest: +SKIP
        >>> lens.rank_trajectory(" Paris")
    """
    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    batch, ids, names = _batch_and_targets(model, prompts, targets)
    if ids is None:
        raise ValueError("targets are required for plain prompts (e.g. targets=[' Paris'])")
    B, K = ids.shape
    probs, ranks, tops, labels = [None] * B, [None] * B, [None] * B, None
    resid = [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)] + [
        f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    groups = []
    for length in sorted(set(batch.lengths.tolist())):
        same = (batch.lengths == length).nonzero().flatten()
        size = len(same) if batch_size is None else batch_size
        groups += [(length, same[i:i + size]) for i in range(0, len(same), size)]
    with peak_memory(model.cfg.device) as mem:
        for length, rows in groups:
            toks = batch.tokens[rows, :length].to(model.cfg.device)
            extras = hooks._on_device(model, hooks.check_inputs(model, {k: v[rows] for k, v in batch.extras.items()}, toks))
            with torch.no_grad():
                _, cache = model.run_with_cache(toks, names_filter=lambda n: n in resid, **extras)
            # every target of these rows as one shared selector: one unembedding pass for all of them
            union, where = torch.unique(ids[rows], return_inverse=True)  # where: [g, K] index into union
            res = tl_logit_lens(cache, targets=union.tolist(), return_type="probs")
            labels = res.labels
            vals = res.readout.values.float().cpu()  # [layer, g, U]
            rks = res.readout.target_ranks.float().cpu()
            sel = where[None].expand(vals.shape[0], -1, -1)  # [layer, g, K]
            p, r = vals.gather(2, sel), rks.gather(2, sel)
            top_ids = tl_logit_lens(cache, top_k=top_k).readout.top_ids.cpu()  # [layer, g, top_k]
            for j, i in enumerate(rows.tolist()):
                probs[i], ranks[i] = p[:, j], r[:, j]
                tops[i] = tuple(tuple(model.tokenizer.decode([int(t)]) for t in top_ids[l, j]) for l in range(len(labels)))
    per_prompt = torch.stack(probs)  # [B, layer, K]
    return LensResult(
        values=per_prompt.mean(0), axis_names=("layer", "target"),
        labels={"layer": labels, "target": names}, per_prompt=per_prompt,
        ranks=torch.stack(ranks), top_tokens=tuple(tops),
        metadata=dict(method="logit_lens", n_prompts=B, top_k=top_k, target_ids=ids[0].tolist() if B else [],
                      batch_size=batch_size, peak_memory=mem, title="logit lens: target probability"),
    )


# ----------------------------------------------------------------------------------------------
# component decomposition and self-logits augmentation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class ComponentTokens(Result):
    """Each layer's component output at the last token read as tokens.

    ``values``: ``[layer, target]`` direct logit contribution to the targets (final-norm scale
    frozen; mean over prompts); ``top_tokens[i]``: the tokens the component of the ``i``-th layer
    read promotes most (mean over prompts) — by position; :meth:`tokens` takes the layer number."""

    top_tokens: tuple = ()

    def tokens(self, layer: Union[int, str]) -> tuple[str, ...]:
        """The tokens ``layer``'s component promotes most, ``layer`` a layer number or label (``20``,
        ``"L20"``): on ``component_tokens(..., layers=range(15, 30))`` ``tokens(20)`` is the sixth
        entry of ``top_tokens``. A number that is not one of the result's layers is an error naming
        them (or, if it is a valid position, read as one with a warning)."""
        return self.top_tokens[self.locate("layer", layer)]

    def table(self):
        import pandas as pd

        return pd.DataFrame({"layer": self.labels["layer"],
                             **{f"→ {t}": self.values[:, k].tolist() for k, t in enumerate(self.labels["target"])},
                             "top tokens": [", ".join(repr(t) for t in row) for row in self.top_tokens]})


@records
def component_tokens(
    model,
    prompts,
    *,
    site: str = "mlp_out",
    layers: Optional[Sequence[int]] = None,
    targets: Optional[Sequence[Union[str, int]]] = None,
    top_k: int = 8,
    batch_size: Optional[int] = None,
) -> ComponentTokens:
    """Decompose each layer's ``mlp_out`` (or ``attn_out``) at the last token into token directions:
    ``component · scale · w_norm · W_U`` with the final norm's scale frozen at the real residual.

    Args:
        prompts: strings / :class:`PromptBatch` / :class:`ContrastSet` (default targets: answer, wrong).
        site: ``"mlp_out"`` or ``"attn_out"``.
        layers: layers to read (default all).
        targets: tokens whose direct contribution is tabulated.
    """
    from mechlib.analyses.attribution import _final_norm_frozen

    if site not in ("mlp_out", "attn_out"):
        raise ValueError(f"site={site!r}: choose 'mlp_out' or 'attn_out'")
    batch, ids, names = _batch_and_targets(model, prompts, targets)
    L = model.cfg.n_layers
    layers = list(range(L)) if layers is None else [int(l) for l in layers]
    hook = "hook_mlp_out" if site == "mlp_out" else "hook_attn_out"
    hnames = ["ln_final.hook_in", "ln_final.hook_out"] + [f"blocks.{l}.{hook}" for l in layers]
    parts = []
    for sub in batch.batches(batch_size):
        _, acts = hooks.run_with_cache(model, sub.tokens, hnames, extras=sub.extras)
        parts.append({n: sub.at_last(acts[n]).float().cpu() for n in hnames})
    at = lambda n: torch.cat([p[n] for p in parts])  # noqa: E731  [B, d] at each prompt's last token
    norm, _ = _final_norm_frozen(model, at("ln_final.hook_in"), at("ln_final.hook_out"))
    W_U = model.W_U.detach().float().cpu()
    comp = torch.stack([at(f"blocks.{l}.{hook}") for l in layers], 1)  # [B, layer, d]
    logits = norm(comp) @ W_U  # [B, layer, vocab]
    mean_logits = logits.mean(0)
    top = torch.topk(mean_logits, top_k, dim=-1).indices
    tops = tuple(tuple(model.tokenizer.decode([int(t)]) for t in row) for row in top)
    if ids is None:
        per_prompt = torch.zeros(len(batch), len(layers), 0)
    else:
        per_prompt = torch.gather(logits, 2, ids[:, None, :].expand(-1, len(layers), -1))
    return ComponentTokens(
        values=per_prompt.mean(0), axis_names=("layer", "target"),
        labels={"layer": [f"L{l}" for l in layers], "target": names}, per_prompt=per_prompt,
        top_tokens=tops, metadata=dict(method="component_tokens", site=site, title=f"{site} read as tokens"),
    )


def sla_layers(model, variant: str = "paper", window: int = 5) -> list[int]:
    """The blocks (0-indexed, as ``blocks.{l}``) whose outputs SLA mixes in.

    * ``"paper"``: the ``w`` layer outputs before the last, ``h^{L-w} .. h^{L-1}`` (1-indexed):
      blocks ``L-1-w .. L-2``, i.e. 26..30 of LLaVA's 32 with ``w = 5``.
    * ``"code"``: the released code's ``--logits-layers 25,30``. VISTA's ``llava_llama.py`` first
      drops the embedding entry of HF's ``hidden_states`` (``all_hidden_states[1:]``) and then
      indexes ``range(25, 30 + 1)``, so it mixes the outputs of blocks 25..30 of 32 (all before
      the final norm): ``L-7 .. L-2`` on a model of ``L`` layers.

    Example:
        >>> sla_layers(mechlib.tiny_model("llama", n_layers=32), "code")
        [25, 26, 27, 28, 29, 30]
        >>> sla_layers(mechlib.tiny_model("llama", n_layers=32), "paper")
        [26, 27, 28, 29, 30]
    """
    if variant not in ("paper", "code"):
        raise ValueError(f"variant={variant!r}: choose 'paper' or 'code'")
    L = model.cfg.n_layers
    if variant == "paper":
        return list(range(max(L - 1 - window, 0), L - 1))
    return list(range(max(L - 7, 0), max(L - 1, 1)))


def self_logits_augmentation(
    model,
    prompts,
    *,
    gamma: float = 0.3,
    window: int = 5,
    variant: str = "paper",
    layers: Optional[Sequence[int]] = None,
    batch_size: Optional[int] = None,
) -> Tensor:
    """VISTA's self-logits augmentation (SLA) at each prompt's last token:
    ``(1 − γ) · final logits + γ · mean_l H(h^l)`` over earlier layers' outputs ``h^l``.

    ==============  =================================  =================================  ====================
    choice          paper                              released code                      mechlib
    ==============  =================================  =================================  ====================
    window          the w = 5 layers before the last   ``--logits-layers 25,30`` on       ``variant``/``window``
                    (blocks L−6..L−2, 0-indexed)       ``hidden_states[1:]``: the outputs (or ``layers=``; see
                                                       of blocks 25..30 of 32 (L−7..L−2)  :func:`sla_layers`)
    readout H       the LM head                        raw ``lm_head`` on pre-norm        ``"paper"``: final norm
                                                       states (no final norm)             + unembedding (the logit
                                                                                          lens); ``"code"``: raw
    γ               0.3 (0.2–0.3 best)                 α = 0.3                            ``gamma=0.3``
    ==============  =================================  =================================  ====================

    Returns ``[batch, vocab]`` logits (what mechlib metrics accept directly).
    """
    from mechlib.sites import check_layer

    if not 0 <= gamma <= 1:
        raise ValueError(f"gamma={gamma} must be in [0, 1]")
    if variant not in ("paper", "code"):
        raise ValueError(f"variant={variant!r}: choose 'paper' or 'code'")
    layers = sla_layers(model, variant, window) if layers is None else [check_layer(model, int(l)) for l in layers]
    if not layers:
        raise ValueError("layers is empty")
    names = [f"blocks.{l}.hook_resid_post" for l in layers]
    out = []
    for sub in PromptBatch.from_prompts(model, prompts).batches(batch_size):
        logits, acts = hooks.run_with_cache(model, sub.tokens, names, extras=sub.extras)
        h = torch.stack([sub.at_last(acts[n]) for n in names], 1)  # [b, layers, d]
        out.append(sla_logits(model, sub.at_last(logits), h, gamma=gamma, variant=variant).detach())
    return torch.cat(out)


def sla_logits(model, final: Tensor, hidden: Tensor, *, gamma: float = 0.3, variant: str = "paper") -> Tensor:
    """SLA's mix for one position per row: ``(1 − γ) · final + γ · mean_l H(h^l)``, with ``final``
    ``[b, vocab]`` the model's logits and ``hidden`` ``[b, layers, d_model]`` the window's block
    outputs; ``H`` is the final norm + unembedding (``"paper"``) or the raw unembedding
    (``"code"``). Used by :func:`self_logits_augmentation` and as a decoding rule by
    ``mechlib.generate(..., sla=...)``."""
    with torch.no_grad():
        if variant == "paper":
            early = hooks._logits_from_resid(model, hidden).mean(1)
        else:
            early = model.unembed(hidden.transpose(0, 1)).mean(0)
    return (1 - gamma) * final + gamma * early.to(final.device, final.dtype)
