"""Controls: random head sets of the same shape as a chosen set, and the comparison against them.

Notebooks 02, 04 and 05 each ask "is this effect special to *these* heads?": the answer is the
same intervention on random head sets of the same size (from the same layers, by default, so depth
is matched), and an empirical p-value ``(1 + #random ≥ observed) / (1 + n)``.

Common misreading: beating random heads says the chosen heads matter more than typical heads of
those layers, not that they are the only heads that matter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from mechlib.results import Result
from mechlib.sites import check_head, check_layer

Head = tuple[int, int]


def random_head_sets(model, heads: Sequence[Head], *, n: int = 8, same_layers: bool = True,
                     exclude: Optional[Sequence[Head]] = None, seed: int = 0) -> list[list[Head]]:
    """``n`` random head sets shaped like ``heads``: each head replaced by a random other head of its
    own layer (``same_layers=True``, depth matched; from the nearest layers when its layer has too few
    other heads) or drawn from all heads, never one of ``heads`` (or ``exclude``)."""
    heads = [(check_layer(model, l), check_head(model, "head_out", h)) for l, h in heads]
    if not heads:
        raise ValueError("heads is empty")
    H, L = model.cfg.n_heads, model.cfg.n_layers
    banned = set(heads) | set(map(tuple, exclude or ()))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if same_layers:
            pick: list[Head] = []
            for l in sorted({l for l, _ in heads}):
                need = sum(1 for x, _ in heads if x == l)
                # this layer's other heads first, then the nearest layers' (when a layer holds more
                # than half the chosen heads there are not enough others in it)
                for ll in sorted(range(L), key=lambda x: (abs(x - l), x)):
                    pool = [(ll, h) for h in range(H) if (ll, h) not in banned and (ll, h) not in pick]
                    take = rng.sample(pool, min(need, len(pool)))
                    pick += take
                    need -= len(take)
                    if need == 0:
                        break
                if need:
                    raise ValueError(f"not enough other heads in this model for {len(heads)} random ones")
        else:
            pool = [(l, h) for l in range(L) for h in range(H) if (l, h) not in banned]
            pick = rng.sample(pool, len(heads))
        out.append(sorted(pick))
    return out


@dataclass(frozen=True, repr=False)
class ControlComparison(Result):
    """``values = [observed, mean of the random sets]``; ``random`` ``[n]`` each random set's value;
    ``p`` (metadata) the empirical p-value of the observed value against them."""

    random: Optional[Tensor] = None

    @property
    def p(self) -> float:
        return float(self.metadata["p"])

    def summary(self) -> str:
        r = self.random
        return (f"chosen heads {float(self.values[0]):.3g} vs random head sets {float(r.mean()):.3g} "
                f"(range {float(r.min()):.3g}–{float(r.max()):.3g}, n = {len(r)}); empirical p = {self.p:.2g}")


def compare_with_random(evaluate: Callable[[Sequence[Head]], float], heads: Sequence[Head],
                        random_sets: Sequence[Sequence[Head]], *, greater: bool = True) -> ControlComparison:
    """``evaluate(heads) -> float`` (e.g. accuracy under an intervention) on the chosen heads and on
    each random set; the empirical p-value is one-sided (``greater``: the chosen heads do better)."""
    from mechlib.stats import empirical_p

    obs = float(evaluate(list(heads)))
    rand = torch.tensor([float(evaluate(list(s))) for s in random_sets])
    return ControlComparison(values=torch.tensor([obs, float(rand.mean())]), axis_names=("set",),
                             labels={"set": ["chosen", "random (mean)"]}, random=rand,
                             metadata=dict(p=empirical_p(obs, rand, greater=greater), n_random=len(rand),
                                           heads=[list(h) for h in heads], title="chosen heads vs random heads"))
