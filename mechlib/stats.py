"""Statistics for per-prompt effects, from scipy: bootstrap confidence intervals (BCa) and exact or
Monte-Carlo sign-flip permutation p-values.

* :func:`bootstrap_ci` — CI of the mean of ``[n]`` values (``scipy.stats.bootstrap``, BCa: bias-
  and skew-corrected; percentile when the data are degenerate, e.g. all equal).
* :func:`sign_flip_pvalue` — two-sided p-value of "mean = 0" for paired differences or a one-
  sample effect (``scipy.stats.permutation_test`` with ``permutation_type="samples"``: each
  value's sign flipped at random; exact enumeration up to 2^n ≤ 2^16 resamples).
* :func:`effect` — mean, CI and p in one call, the row every "paper | ours" table reports;
  :func:`paired` — the same for ``b − a`` over the same prompts.

Common misreading: a CI over prompts says how stable the mean is over *these* templates; a new
template family can still move the mean outside it.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from torch import Tensor


def _as_array(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1) if np.ndim(x) <= 1 else np.asarray(x, dtype=np.float64)


def bootstrap_ci(x, *, level: float = 0.95, method: str = "BCa", n_resamples: int = 9999,
                 seed: int = 0, axis: int = 0) -> tuple:
    """Bootstrap CI ``(low, high)`` of the mean of ``x`` along ``axis`` (``[n]`` → two floats;
    ``[n, ...]`` → two arrays, one interval per cell)."""
    from scipy.stats import bootstrap

    a = _as_array(x)
    n = a.shape[axis]
    if n < 2:
        raise ValueError(f"bootstrap_ci needs at least 2 values, got {n}")
    spread = np.ptp(a, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BCa warns on degenerate cells; those are handled below
        res = bootstrap((a,), np.mean, axis=axis, confidence_level=level, method=method, n_resamples=n_resamples,
                        vectorized=True, random_state=np.random.default_rng(seed))
    lo, hi = np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)
    mean = a.mean(axis=axis)
    flat = np.isclose(spread, 0) | ~np.isfinite(lo) | ~np.isfinite(hi)
    if np.any(flat):  # all values equal (or BCa undefined): the interval collapses / falls back to percentile
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pct = bootstrap((a,), np.mean, axis=axis, confidence_level=level, method="percentile",
                            n_resamples=n_resamples, vectorized=True, random_state=np.random.default_rng(seed))
        lo = np.where(flat, np.where(np.isclose(spread, 0), mean, pct.confidence_interval.low), lo)
        hi = np.where(flat, np.where(np.isclose(spread, 0), mean, pct.confidence_interval.high), hi)
    if lo.ndim == 0:
        return float(lo), float(hi)
    return lo, hi


def sign_flip_pvalue(d, *, n_resamples: int = 9999, seed: int = 0) -> float:
    """Two-sided p-value that the mean of ``d`` (``[n]``: paired differences, or effects against
    0) is 0, by flipping signs (exact when ``2**n ≤ 65536``)."""
    from scipy.stats import permutation_test

    a = _as_array(d)
    if a.size < 2:
        raise ValueError(f"sign_flip_pvalue needs at least 2 values, got {a.size}")
    if np.allclose(a, 0):
        return 1.0
    res = permutation_test((a,), np.mean, permutation_type="samples", alternative="two-sided",
                           n_resamples=n_resamples if 2 ** a.size > 65536 else np.inf, vectorized=True,
                           random_state=np.random.default_rng(seed))
    return float(res.pvalue)


class Effect(NamedTuple):
    """A mean with its CI and p-value (H0: mean 0)."""

    mean: float
    low: float
    high: float
    p: float

    def __str__(self) -> str:
        return f"{self.mean:+.3g} [{self.low:+.3g}, {self.high:+.3g}], p = {self.p:.2g}"


def effect(x, *, level: float = 0.95, seed: int = 0) -> Effect:
    """Mean of ``x`` with a bootstrap CI (BCa; percentile when fewer than 8 values differ from 0,
    e.g. paired 0/1 outcomes where few prompts change — BCa is too narrow there) and a sign-flip
    p-value against 0. With few non-zero values, decide by the p-value: the exact test is the
    reliable one."""
    a = _as_array(x)
    method = "BCa" if np.count_nonzero(~np.isclose(a, 0)) >= 8 else "percentile"
    lo, hi = bootstrap_ci(a, level=level, seed=seed, method=method)
    return Effect(float(a.mean()), lo, hi, sign_flip_pvalue(a, seed=seed))


def paired(a, b, *, level: float = 0.95, seed: int = 0) -> Effect:
    """``b − a`` over the same prompts: mean difference, paired BCa CI, sign-flip p-value."""
    a, b = _as_array(a), _as_array(b)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same prompts: shapes {a.shape} and {b.shape}")
    return effect(b - a, level=level, seed=seed)


def proportion_ci(successes: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (for rates measured once, without per-prompt pairing)."""
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def empirical_p(observed: float, null, *, greater: bool = True) -> float:
    """``(1 + #null ≥ observed) / (1 + n)``: the p-value of an observed statistic against draws from
    a null (e.g. random head sets), never 0."""
    null = _as_array(null)
    hits = (null >= observed - 1e-12).sum() if greater else (null <= observed + 1e-12).sum()
    return float((1 + hits) / (1 + null.size))

