"""Circuit overlap across tasks (Merullo, Eickhoff & Pavlick 2024, "Circuit Component Reuse
Across Tasks"): how many units two circuits share — head circuits (:class:`Circuit`, from
:func:`~mechlib.find_circuit`) or edge graphs (:class:`Graph`, from
:meth:`~mechlib.analyses.edges.EdgeScores.graph`) — against exact chance, with a bootstrap over
each task's prompts (each resample re-selects the heads from the stored per-prompt path effects).

This module compares both kinds of circuit, so it sits above :mod:`mechlib.analyses.circuits` and
:mod:`mechlib.analyses.edges`; neither of them imports it.

Most common misreading: a high overlap means little unless it beats chance for circuits of those
sizes in a model of that size (the hypergeometric null), and overlap is no substitute for
faithfulness: two circuits can share most heads and still not carry the behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import Tensor

from mechlib.analyses.circuits import Circuit
from mechlib.analyses.edges import Graph
from mechlib.results import Result


@dataclass(frozen=True, repr=False)
class OverlapResult(Result):
    """Overlap of two circuits. ``values`` = ``[iou, share_a, share_b]``: |A∩B|/|A∪B| (the paper's
    figure: Merullo et al.'s 78% is 25 shared of a 32-head union), |A∩B|/|A| and |A∩B|/|B|.

    Chance is exact: under the null that B is a uniformly random set of |B| of the N units (heads or
    edges), |A∩B| is hypergeometric. ``null`` holds ``[k, P(|A∩B| = k)]`` rows, ``chance`` (in
    ``baselines``) the expected value of each measure, :meth:`p_value` ``P(|A∩B| ≥ observed)``.
    ``bootstrap`` holds re-selections over resampled prompts (``[draw, 3]``)."""

    shared: tuple = ()
    only_a: tuple = ()
    only_b: tuple = ()
    per_class: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    null: Optional[Tensor] = None
    bootstrap: Optional[Tensor] = None

    @property
    def iou(self) -> float:
        """|A∩B| / |A∪B| — the figure Merullo et al. report (78% = 25/32)."""
        return float(self.values[0])

    @property
    def overlap(self) -> float:
        """Alias of :attr:`iou`, the paper's overlap figure."""
        return self.iou

    @property
    def share_a(self) -> float:
        """|A∩B| / |A|: how much of circuit A (e.g. IOI) is reused in B."""
        return float(self.values[1])

    def p_value(self) -> float:
        """Exact P(|A∩B| ≥ observed) for a random B of the same size (hypergeometric; the same
        p-value for every measure, since all three grow with |A∩B| at fixed sizes)."""
        from scipy.stats import hypergeom

        m = self.metadata
        return float(hypergeom.sf(len(self.shared) - 1, m["n_units"], m["size_a"], m["size_b"]))

    def interval(self, which: int = 0, level: float = 0.95) -> tuple[float, float]:
        """Percentile interval of measure ``which`` (0 IoU, 1 share of A, 2 share of B) over the
        prompt bootstrap."""
        if self.bootstrap is None:
            raise ValueError("no bootstrap was drawn (circuits without per-prompt stage scores, or n_boot=0)")
        d = self.bootstrap[:, which].float()
        d = d[~d.isnan()]
        q = torch.tensor([(1 - level) / 2, 1 - (1 - level) / 2])
        lo, hi = torch.quantile(d, q).tolist()
        return lo, hi

    def summary(self) -> str:
        m = self.metadata
        s = (f"IoU {self.iou:.0%} ({len(self.shared)} shared of {len(self.shared) + len(self.only_a) + len(self.only_b)} "
             f"in the union; A has {m['size_a']}, B {m['size_b']}; {self.share_a:.0%} of A reused)")
        if self.baselines:
            s += f"; chance IoU {self.baselines['chance_iou']:.1%}, p = {self.p_value():.2g} (exact)"
        if self.bootstrap is not None:
            lo, hi = self.interval()
            s += f"; bootstrap 95% [{lo:.0%}, {hi:.0%}]"
        return s


def _overlaps(a: frozenset, b: frozenset) -> tuple[float, float, float]:
    inter = len(a & b)
    return (inter / len(a | b) if a | b else float("nan"), inter / len(a) if a else float("nan"),
            inter / len(b) if b else float("nan"))


def exact_null(n_units: int, size_a: int, size_b: int) -> tuple[Tensor, dict[str, float]]:
    """The hypergeometric distribution of |A∩B| for a random B (``[k, pmf]`` rows) and the
    expected IoU, share of A and share of B under it."""
    from scipy.stats import hypergeom

    if not (0 < size_a <= n_units and 0 < size_b <= n_units):
        raise ValueError(f"sizes {size_a}, {size_b} must be in 1..{n_units}")
    k = torch.arange(max(0, size_a + size_b - n_units), min(size_a, size_b) + 1)
    pmf = torch.tensor(hypergeom.pmf(k.numpy(), n_units, size_a, size_b), dtype=torch.float64)
    iou = (pmf * k / (size_a + size_b - k)).sum()
    chance = {"chance_iou": float(iou), "chance_share_a": float((pmf * k).sum() / size_a),
              "chance_share_b": float((pmf * k).sum() / size_b)}
    return torch.stack([k.double(), pmf], 1), chance


def circuit_overlap(a, b, *, n_boot: int = 500, seed: int = 0, units: str = "auto") -> OverlapResult:
    """How much two circuits share, against exact chance.

    ===============  ================================  ======================  ================================
    choice           paper (Merullo et al., §4)        released code           mechlib
                                                       (jmerullo/
                                                       circuit_reuse)
    ===============  ================================  ======================  ================================
    units            heads: the top 2% of each path-   path patching only      heads (:class:`Circuit`); edge
                     patching stage, per task          (overlap not released)  graphs: edges, nodes or heads
                                                                               (``units=``)
    figure           25/32 = 78%: shared / union       —                       ``values[0]`` = IoU (``.iou``,
                     (IoU)                                                     ``.overlap``); shared/|A|,
                                                                               shared/|B| next to it
    chance           —                                 —                       exact: hypergeometric |A∩B|,
                                                                               expected IoU, ``p_value()``
    uncertainty      —                                 —                       bootstrap over each task's
                                                                               prompts (heads re-selected),
                                                                               ``interval()``
    ===============  ================================  ======================  ================================

    Args:
        a, b: two :class:`Circuit` (heads) or two edge :class:`~mechlib.analyses.edges.Graph`
            circuits on the same model (A is the reference, e.g. IOI; B e.g. Colored Objects).
        n_boot: bootstrap resamples of each circuit's prompts; each resample re-selects the heads
            from the stored per-prompt path effects (stage receivers held fixed). 0 to skip.
        units: ``"heads"``, ``"edges"`` or ``"nodes"`` (edge graphs; nodes = heads, MLPs) —
            ``"auto"`` picks heads for circuits and edges for graphs.

    Returns:
        :class:`OverlapResult` with ``values = [IoU, shared/|A|, shared/|B|]``, the shared units,
        per-class overlap (circuits: for each class of A the share of its heads found in B, and in
        B under the same class), the exact chance level and ``p_value()``, and ``interval()`` of
        the bootstrap.
    """
    A, B, n_total, kind = _units(a, b, units)
    per_class = {}
    if kind == "heads" and isinstance(a, Circuit) and isinstance(b, Circuit):
        for cls, hs in a.by_class().items():
            per_class[cls] = dict(n=len(hs), in_b=sum(h in B for h in hs) / len(hs),
                                  same_class=sum(b.classes.get(h) == cls for h in hs) / len(hs))
    null, chance = exact_null(n_total, len(A), len(B)) if A and B else (None, {})
    boot = None
    if n_boot and kind == "heads" and isinstance(a, Circuit) and isinstance(b, Circuit) and a.stages and b.stages:
        g = torch.Generator().manual_seed(seed)
        na, nb = a.stages[0].scores.shape[0], b.stages[0].scores.shape[0]
        boot = torch.tensor([_overlaps(a.resample(torch.randint(na, (na,), generator=g)),
                                       b.resample(torch.randint(nb, (nb,), generator=g)))
                             for _ in range(n_boot)])
    label = getattr(a, "task", "A"), getattr(b, "task", "B")
    return OverlapResult(
        values=torch.tensor(_overlaps(A, B)), axis_names=("measure",),
        labels={"measure": ["IoU", "shared / |A|", "shared / |B|"]},
        baselines=chance,
        shared=tuple(sorted(A & B)), only_a=tuple(sorted(A - B)), only_b=tuple(sorted(B - A)),
        per_class=per_class, null=null, bootstrap=boot,
        metadata=dict(task_a=label[0], task_b=label[1], model=getattr(a, "model", ""), size_a=len(A), size_b=len(B),
                      n_units=n_total, units=kind, n_boot=n_boot if boot is not None else 0,
                      title=f"circuit overlap {label[0]} vs {label[1]}"),
    )


def _units(a, b, units: str):
    """The two unit sets, the universe size and the unit kind."""
    if isinstance(a, Circuit) and isinstance(b, Circuit):
        if units not in ("auto", "heads"):
            raise ValueError(f"units={units!r}: head circuits compare heads")
        if (a.n_layers, a.n_heads) != (b.n_layers, b.n_heads):
            raise ValueError(f"circuits come from different models ({a.n_layers}x{a.n_heads} heads vs "
                             f"{b.n_layers}x{b.n_heads}): overlap compares units of one model")
        return frozenset(a.heads), frozenset(b.heads), a.n_layers * a.n_heads, "heads"
    if isinstance(a, Graph) and isinstance(b, Graph):
        if a.spec != b.spec:
            raise ValueError("edge graphs come from different models: overlap compares units of one model")
        kind = "edges" if units == "auto" else units
        if kind == "edges":
            return frozenset(a.edge_names()), frozenset(b.edge_names()), a.spec.n_edges, "edges"
        if kind == "nodes":
            return (frozenset(a.node_names(exclude_io=True)), frozenset(b.node_names(exclude_io=True)),
                    a.spec.n_nodes - 2, "nodes")
        if kind == "heads":
            return frozenset(a.heads()), frozenset(b.heads()), a.spec.n_layers * a.spec.n_heads, "heads"
        raise ValueError(f"units={units!r}: choose 'edges', 'nodes' or 'heads' for edge graphs")
    raise TypeError(f"circuit_overlap compares two Circuits or two edge Graphs, got {type(a).__name__} and "
                    f"{type(b).__name__}")
