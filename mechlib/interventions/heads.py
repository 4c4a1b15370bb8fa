"""Interventions that edit head outputs (``hook_z``): scaling chosen heads (ablation, the static
VHR ablation) and VHR itself."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence


from mechlib import hooks

from mechlib.interventions._common import _heads_by_layer


@contextmanager
def scale_heads(
    model,
    heads: Sequence[tuple[int, int]],
    alpha: float,
    *,
    positions: Optional[Sequence[int]] = None,
) -> Iterator[dict[str, int]]:
    """Multiply the outputs (``hook_z``) of ``heads`` by ``alpha`` while active.

    ``alpha > 1`` reinforces the heads (VHR), ``0`` ablates them, ``1`` changes nothing.
    ``positions`` restricts the scaling to those query positions (default all).

    Example:
        >>> with mechlib.interventions.scale_heads(model, [(23, 3)], 2.0):   # doctest: +SKIP
        ...     logits = model(tokens)
    """
    by_layer = _heads_by_layer(model, heads)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha} must be finite")
    pos = slice(None) if positions is None else list(positions)

    def edit(z, hook, hs):
        z = z.clone()
        sub = z[:, pos]
        sub[:, :, hs] = sub[:, :, hs] * alpha
        z[:, pos] = sub
        return z

    hk = [(f"blocks.{l}.attn.hook_z", lambda z, hook, hs=hs: edit(z, hook, hs)) for l, hs in by_layer.items()]
    with hooks.attach(model, hk, must_fire=False) as fired:
        yield fired
