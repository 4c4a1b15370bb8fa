"""Linear probes and PCA of hidden states, on scikit-learn.

**Probe** (:func:`probe`): per layer, is a label linearly decodable from the activations at one
site? A logistic-regression probe (``method="logistic"``; ``"l1"`` for a sparse probe whose
weights point at a few dimensions) is trained and scored with stratified K-fold cross-validation
— grouped by prompt when examples are tokens, so tokens of one prompt never sit on both sides of a
split — giving held-out accuracy and ROC AUC with bootstrap CIs, next to two controls: the same
pipeline on shuffled labels, and the best single random direction.

**PCA** (:func:`pca`): a 2-D view of hidden states (e.g. sink tokens vs ordinary tokens: Sun et
al.'s picture of massive activations).

Most common misreading: a decodable label is not a label the model *uses* — probes find information
that is present; causal claims need an intervention (patching, steering) on the probe's direction.
Always read the accuracy against the controls: high-dimensional activations separate random labels
too when examples are few.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from mechlib import hooks
from mechlib.memory import peak_memory
from mechlib.provenance import records
from mechlib.results import Result
from mechlib.sites import check_layer, site_spec
from mechlib.tasks.contrast import PromptBatch

_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def _examples(model, batch: PromptBatch, labels, site: str, layers: Sequence[int], positions,
              batch_size: Optional[int], cache=None):
    """Activations ``{layer: [n, d]}``, labels ``[n]`` and the prompt of each example ``[n]``."""
    if site not in _SITES:
        raise ValueError(f"site={site!r}: probes read one of {_SITES}")
    names = [site_spec(site).hook_name(l) for l in layers]
    per_token = positions == "all" or (isinstance(positions, Tensor) and positions.dtype == torch.bool)
    y_all = torch.as_tensor(labels)
    if per_token:
        if y_all.shape[:1] != (len(batch),) or y_all.ndim != 2:
            raise ValueError(f"token-level probes need labels [prompt, pos] (−1 = skip), got {tuple(y_all.shape)}")
    elif y_all.shape != (len(batch),):
        raise ValueError(f"labels must be one per prompt ({len(batch)}), got {tuple(y_all.shape)}")
    full = hooks.cached(model, cache, names, len(batch)) if cache is not None else None
    xs: dict[int, list[Tensor]] = {l: [] for l in layers}
    ys, groups, start = [], [], 0
    for sub in batch.batches(batch_size):
        rows = slice(start, start + len(sub))
        if full is not None:
            acts = {n: full[n][rows, : sub.tokens.shape[1]] for n in names}
        else:
            acts = hooks.activations(model, sub.tokens, names, extras=sub.extras)
        if per_token:
            y = y_all[rows, : sub.tokens.shape[1]]
            keep = sub.mask & (y >= 0)
            if isinstance(positions, Tensor):
                keep &= positions[rows, : sub.tokens.shape[1]]
            ys.append(y[keep])
            groups.append(torch.arange(start, start + len(sub))[:, None].expand_as(y)[keep])
            for l, n in zip(layers, names):
                xs[l].append(acts[n].float().cpu()[keep])
        else:
            ys.append(y_all[rows])
            groups.append(torch.arange(start, start + len(sub)))
            for l, n in zip(layers, names):
                a = acts[n].float().cpu()
                if positions == "last":
                    xs[l].append(sub.at_last(a))
                else:
                    xs[l].append(a[:, int(positions)])
        start += len(sub)
    return {l: torch.cat(v).numpy() for l, v in xs.items()}, torch.cat(ys).numpy(), torch.cat(groups).numpy()


def _classifier(method: str, C: float, seed: int, scale: str = "standard"):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    if method == "logistic":
        clf = LogisticRegression(C=C, max_iter=2000)
    elif method == "l1":
        clf = LogisticRegression(C=C, solver="liblinear", l1_ratio=1.0, max_iter=2000, random_state=seed)
    else:
        raise ValueError(f"method={method!r}: choose 'logistic' or 'l1' (sparse)")
    if scale == "standard":
        return make_pipeline(StandardScaler(), clf)
    if scale == "rms":  # each example divided by its RMS (VAR's φ): dimensions keep their relative size
        return make_pipeline(FunctionTransformer(_rms_rows), clf)
    if scale == "none":
        return make_pipeline(clf)
    raise ValueError(f"scale={scale!r}: 'standard' (each dimension to unit variance), 'rms' (each example) or 'none'")


def _rms_rows(X):
    return X / np.sqrt((X ** 2).mean(1, keepdims=True) + 1e-6)


def _auc(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """ROC AUC by ranks (Mann-Whitney), vectorised over leading axes of ``y``/``s`` (``[..., n]``)."""
    from scipy.stats import rankdata

    r = rankdata(s, axis=-1)
    pos = (y == 1)
    n1 = pos.sum(-1)
    n0 = y.shape[-1] - n1
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((r * pos).sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _cv_scores(X: np.ndarray, y: np.ndarray, groups: np.ndarray, method: str, C: float, cv: int, seed: int,
               scale: str = "standard"):
    """Out-of-fold predicted probabilities ``[n]`` (binary) and the probe refit on all examples."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    grouped = len(np.unique(groups)) < len(groups)
    splitter = (StratifiedGroupKFold(cv, shuffle=True, random_state=seed) if grouped
                else StratifiedKFold(cv, shuffle=True, random_state=seed))
    proba = np.zeros(len(y))
    for train, test in splitter.split(X, y, groups if grouped else None):
        model = _classifier(method, C, seed, scale).fit(X[train], y[train])
        proba[test] = model.predict_proba(X[test])[:, 1]
    return proba, _classifier(method, C, seed, scale).fit(X, y)


@dataclass(frozen=True, repr=False)
class ProbeResult(Result):
    """``values[layer, metric]``: held-out ``accuracy`` and ``auc`` per layer; ``ci_low``/``ci_high``
    the same shape (bootstrap over examples of the out-of-fold predictions); ``controls``
    ``[layer, control]``: ``shuffled_auc`` (labels permuted) and ``random_direction_auc`` (the
    best of 10 random directions); ``coef`` ``[layer, d]`` and ``intercept`` ``[layer]``: the
    probe refit on all examples, in activation units (``scale="rms"`` probes expect RMS-normalised
    rows); ``oof`` ``[layer, example]``: each example's out-of-fold probability."""

    ci_low: Optional[Tensor] = None
    ci_high: Optional[Tensor] = None
    controls: Optional[Tensor] = None
    coef: Optional[Tensor] = None
    intercept: Optional[Tensor] = None
    oof: Optional[Tensor] = None

    def decision_function(self, layer: Union[int, str], X: Tensor) -> Tensor:
        """The probe of ``layer`` (the layer number, e.g. 15 for a probe over ``layers=[15]``, or its
        label ``"L15"``) applied to activations ``X`` ``[n, d]`` (refit on all examples; positive =
        label 1)."""
        i = self.locate("layer", layer)
        return X.float() @ self.coef[i] + self.intercept[i]

    def top_dims(self, layer: Union[int, str], k: int = 5) -> list[int]:
        """The dimensions with the largest |weight| in the probe of ``layer`` (the layer number, e.g.
        15 for a probe over ``layers=[15]``, or its label ``"L15"``)."""
        i = self.locate("layer", layer)
        return torch.argsort(self.coef[i].abs(), descending=True)[:k].tolist()

    def table(self):
        import pandas as pd

        rows = []
        for i, lab in enumerate(self.labels["layer"]):
            rows.append(dict(layer=lab, accuracy=float(self.values[i, 0]), auc=float(self.values[i, 1]),
                             auc_ci=f"[{float(self.ci_low[i, 1]):.3f}, {float(self.ci_high[i, 1]):.3f}]",
                             shuffled_auc=float(self.controls[i, 0]), random_direction_auc=float(self.controls[i, 1])))
        return pd.DataFrame(rows)

    def plot(self, ax=None, *, title: Optional[str] = None, **kw):
        """Held-out AUC per layer with its CI, against the two controls (returns the figure)."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=kw.pop("figsize", (7, 3.5)))
        else:
            fig = ax.figure
        x = np.arange(self.values.shape[0])
        ax.plot(x, self.values[:, 1].numpy(), marker="o", label="probe (held-out AUC)")
        ax.fill_between(x, self.ci_low[:, 1].numpy(), self.ci_high[:, 1].numpy(), alpha=0.25)
        ax.plot(x, self.controls[:, 0].numpy(), ls="--", label="shuffled labels")
        ax.plot(x, self.controls[:, 1].numpy(), ls=":", label="best random direction")
        ax.axhline(0.5, color="grey", lw=0.8)
        labels = self.labels["layer"]
        ax.set_xticks(x[:: max(1, len(x) // 15)], [labels[i] for i in x[:: max(1, len(x) // 15)]])
        ax.set(xlabel="layer", ylabel="ROC AUC", ylim=(0.3, 1.02), title=title or self.metadata.get("title", "probe"))
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


@records
def probe(
    model,
    prompts,
    labels,
    *,
    site: str = "resid_post",
    layers: Optional[Sequence[int]] = None,
    positions: Union[str, int, Tensor] = "last",
    method: str = "logistic",
    C: Optional[float] = None,
    scale: str = "standard",
    cv: int = 5,
    control: str = "shuffle",
    batch_size: Optional[int] = None,
    seed: int = 0,
    cache=None,
    groups=None,
) -> ProbeResult:
    """Train and cross-validate a linear probe for a binary label at every layer.

    Args:
        prompts: strings, a token tensor, a :class:`PromptBatch` or a ContrastSet (clean prompts).
        labels: ``[prompt]`` (0/1) for ``positions="last"`` or an integer position; for
            token-level probes (``positions="all"`` or a ``[prompt, pos]`` bool mask) ``[prompt,
            pos]`` with ``-1`` where a token is not an example.
        site: ``resid_pre|resid_mid|resid_post|attn_out|mlp_out``.
        method: ``"logistic"`` (L2, C=1) or ``"l1"`` (sparse, C=0.1 by default).
        scale: ``"standard"`` (each dimension to zero mean, unit variance) or ``"rms"`` (each example
            divided by its RMS, as VAR's sink score; dimensions keep their relative size, so a sparse
            probe can point at a massive dimension).
        cv: folds (stratified; grouped by prompt for token-level examples).
        control: ``"shuffle"`` — also run the probe on permuted labels (and the random-direction
            control, always computed).
        cache: a TransformerLens ``ActivationCache`` (or dict) over the same prompts holding the
            site's hooks, reused instead of running the model.
        groups: ``[prompt]`` group ids: prompts of one group never sit on both sides of a fold (e.g.
            the two members of a minimal pair; otherwise a probe can score by recognising the
            pair). Token-level examples are always grouped by prompt.

    Returns:
        :class:`ProbeResult` (``values[layer, (accuracy, auc)]``, CIs, controls, weights).

    Example:
        >>> r = mechlib.probe(model, prompts, labels, site="resid_post")            # doctest: +SKIP
        >>> r.table(); r.plot()
    """
    from sklearn.metrics import roc_auc_score

    from mechlib.stats import bootstrap_ci

    batch = PromptBatch.from_prompts(model, prompts)
    L = model.cfg.n_layers
    layers = list(range(L)) if layers is None else [check_layer(model, l) for l in layers]
    if control not in ("shuffle", "none"):
        raise ValueError(f"control={control!r}: 'shuffle' or 'none'")
    C = (0.1 if method == "l1" else 1.0) if C is None else float(C)
    with peak_memory(model.cfg.device) as mem:
        X, y, example_prompt = _examples(model, batch, labels, site, layers, positions, batch_size, cache)
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (len(batch),):
            raise ValueError(f"groups must be one id per prompt ({len(batch)}), got shape {g.shape}")
        groups = g[example_prompt]
    else:
        groups = example_prompt
    classes = np.unique(y)
    if len(classes) != 2 or set(classes.tolist()) - {0, 1}:
        raise ValueError(f"probe labels must be binary 0/1 with both present; got classes {classes.tolist()}")
    if min((y == 0).sum(), (y == 1).sum()) < cv:
        raise ValueError(f"each class needs at least cv={cv} examples; got {int((y == 0).sum())} and {int((y == 1).sum())}")
    rng = np.random.default_rng(seed)
    shuffled = None
    if control == "shuffle":
        # respect the groups: permute whole groups' labels when each group has one label (tokens of a
        # prompt), otherwise permute labels within each group (the members of a minimal pair)
        ids, inv = np.unique(groups, return_inverse=True)
        members = [np.flatnonzero(inv == i) for i in range(len(ids))]
        if all(len(set(y[m])) == 1 for m in members):
            shuffled = rng.permutation(np.array([y[m[0]] for m in members]))[inv]
        else:
            shuffled = y.copy()
            for m in members:
                shuffled[m] = y[rng.permutation(m)]
    boot = np.random.default_rng(seed).integers(0, len(y), (1000, len(y)))
    vals, lo, hi, ctrl, coefs, icpt, oof = [], [], [], [], [], [], []
    for l in layers:
        Xl = X[l]
        proba, fit = _cv_scores(Xl, y, groups, method, C, cv, seed, scale)
        correct = ((proba > 0.5) == (y == 1)).astype(float)
        acc, auc = correct.mean(), roc_auc_score(y, proba)
        acc_ci = bootstrap_ci(correct, seed=seed, n_resamples=2000)
        boots = _auc(y[boot], proba[boot])  # AUC's CI: resample examples (percentile; AUC is not a mean)
        auc_ci = tuple(np.nanquantile(boots, [0.025, 0.975]))
        shuf_auc = float("nan")
        if shuffled is not None:
            p_s, _ = _cv_scores(Xl, shuffled, groups, method, C, cv, seed, scale)
            shuf_auc = roc_auc_score(shuffled, p_s)
        dirs = rng.standard_normal((10, Xl.shape[1]))
        rand_auc = max(max(a, 1 - a) for a in (roc_auc_score(y, Xl @ d) for d in dirs))
        clf = fit[-1]
        w, b = clf.coef_[0], float(clf.intercept_[0])
        if scale == "standard":  # back to activation units: (x - mean) / scale · w + b
            w, b = w / fit[0].scale_, b - float((fit[0].mean_ / fit[0].scale_) @ clf.coef_[0])
        coefs.append(torch.as_tensor(w, dtype=torch.float32))
        icpt.append(b)
        oof.append(torch.as_tensor(proba, dtype=torch.float32))
        vals.append([acc, auc])
        lo.append([acc_ci[0], auc_ci[0]])
        hi.append([acc_ci[1], auc_ci[1]])
        ctrl.append([shuf_auc, rand_auc])
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return ProbeResult(
        values=t(vals), axis_names=("layer", "metric"),
        labels={"layer": [f"L{l}" for l in layers], "metric": ["accuracy", "auc"]},
        ci_low=t(lo), ci_high=t(hi), controls=t(ctrl), coef=torch.stack(coefs), intercept=t(icpt),
        oof=torch.stack(oof),
        baselines={"chance_accuracy": float(max(y.mean(), 1 - y.mean()))},
        metadata=dict(method="probe", classifier=method, C=C, scale=scale, cv=cv, site=site, layers=layers,
                      n_examples=int(len(y)), n_positive=int(y.sum()), positions=positions if isinstance(positions, (str, int)) else "mask",
                      batch_size=batch_size, peak_memory=mem, seed=seed,
                      title=f"{method} probe on {site}"),
    )


@dataclass(frozen=True, repr=False)
class PCAResult(Result):
    """``values[example, component]``: PCA coordinates of hidden states; ``example_labels`` the
    labels given (e.g. sink / not sink); ``explained`` the variance ratio of each component."""

    example_labels: Optional[Tensor] = None
    explained: Optional[Tensor] = None

    def plot(self, ax=None, *, title: Optional[str] = None, names: Optional[dict] = None, **kw):
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=kw.pop("figsize", (5, 4)))
        else:
            fig = ax.figure
        v = self.values.numpy()
        lab = self.example_labels.numpy() if self.example_labels is not None else np.zeros(len(v))
        for k in np.unique(lab):
            sel = lab == k
            ax.scatter(v[sel, 0], v[sel, 1], s=12, alpha=0.7, label=(names or {}).get(int(k), str(int(k))))
        ev = self.explained.tolist()
        ax.set(xlabel=f"PC1 ({ev[0]:.0%})", ylabel=f"PC2 ({ev[1]:.0%})", title=title or self.metadata.get("title", "PCA"))
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


@records
def pca(model, prompts, *, layer: int, site: str = "resid_post", labels=None, positions: Union[str, Tensor] = "all",
        n_components: int = 2, batch_size: Optional[int] = None) -> PCAResult:
    """PCA of the hidden states at ``site``/``layer`` (every real token by default, or each prompt's
    last token with ``positions="last"``); ``labels`` as for :func:`probe` colour the points."""
    from sklearn.decomposition import PCA

    batch = PromptBatch.from_prompts(model, prompts)
    layer = check_layer(model, layer)
    if labels is None:
        labels = torch.zeros(batch.tokens.shape, dtype=torch.long) if positions != "last" else torch.zeros(len(batch))
    X, y, _ = _examples(model, batch, labels, site, [layer], positions, batch_size)
    p = PCA(n_components=n_components).fit(X[layer])
    coords = torch.as_tensor(p.transform(X[layer]), dtype=torch.float32)
    return PCAResult(values=coords, axis_names=("example", "component"), example_labels=torch.as_tensor(y),
                     explained=torch.as_tensor(p.explained_variance_ratio_, dtype=torch.float32),
                     metadata=dict(method="pca", layer=layer, site=site, title=f"PCA of {site} at layer {layer}"))
