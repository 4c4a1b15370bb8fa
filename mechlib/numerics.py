"""Rounding of half-precision models: what mechlib's exactness checks allow for in bf16/fp16.

A check that a decomposition is exact (DLA's terms, edge attribution's writes) compares float32
sums of the model's recorded tensors with the model's own result. In float32 the checks' fixed
tolerances cover rounding; in half precision the model rounds every addition to the residual
stream, so the allowance is that rounding, bounded per element (first order): a stream that adds
``a_1, a_2, ...`` in order, each sum rounded to the unit roundoff ``u``, is off by at most
``u · Σ_k |a_1 + ... + a_k|``. A structural mismatch (a term the decomposition misses) is of the
order of the terms themselves, far outside it.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

HALF = (torch.float16, torch.bfloat16)


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2`` of a half-precision dtype; 0 for float32 and wider (fixed tolerances cover them)."""
    return float(torch.finfo(dtype).eps) / 2 if dtype in HALF else 0.0


def widen(t: Tensor) -> Tensor:
    """``t`` in float32 if it is half precision (differentiably), else as it is: metric values and
    results are float32 whatever the model's dtype."""
    return t.float() if t.dtype in HALF else t


def accumulation_bound(addends: Sequence[Tensor], dtype: torch.dtype, *, safety: float = 2.0) -> Union[Tensor, float]:
    """Per-element bound on the rounding of a ``dtype`` stream that adds ``addends`` in order
    (``safety · u · Σ_k |partial sum k|``, in float32); 0 when ``dtype`` is not half precision.

    Example:
        >>> a = [torch.full((2,), 1.0), torch.full((2,), 0.5)]
        >>> accumulation_bound(a, torch.bfloat16)   # 2 · 2^-8 · (1 + 1.5)
        tensor([0.0195, 0.0195])
    """
    u = unit_roundoff(dtype)
    if not u or not addends:
        return 0.0
    run = torch.zeros_like(addends[0], dtype=torch.float32)
    total = torch.zeros_like(run)
    for a in addends:
        run = run + a.float()
        total += run.abs()
    return safety * u * total
