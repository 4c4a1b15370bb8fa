"""Circuit discovery by path patching: head circuits (:class:`Circuit`) found IOI-style.

**Discovery** follows the IOI paper (Wang et al. 2022), as reused by Merullo, Eickhoff & Pavlick
(2024, "Circuit Component Reuse Across Tasks"): start at the logits and walk backwards, one
*stage* at a time. Stage 1 path-patches every head to the logits (the heads whose direct path
carries the answer: *name movers*, and *negative* name movers when the sign flips); stage 2
path-patches every earlier head to the *queries* of the stage-1 heads at the last token
(*S-inhibition*); stage 3 to the *values* of the stage-2 heads (*induction / duplicate-token*);
stage 4 to the *keys* of the stage-3 heads (*previous-token*). A head joins a stage when its
path effect is large (``threshold``, a share of the clean − corrupted metric gap) and consistent
over prompts (``min_z`` standard errors).

Exhaustive path patching costs one resumed forward per head and stage; ``candidates=K`` first
ranks every head by attribution patching (one forward/backward) and path-patches only the top K
— ``candidates=None`` is exhaustive and gives the same circuit whenever the true members are
among the K (checked in the tests on a tiny model).

How much two circuits share is :func:`mechlib.analyses.overlap.circuit_overlap` (it compares head
circuits and edge graphs, so it sits above this module and :mod:`mechlib.analyses.edges`); how
much of the behaviour a circuit keeps is :func:`mechlib.analyses.edges.faithfulness`.

Most common misreading: a head outside the circuit is not "unused" — the thresholds, the
corruption and backup heads decide membership.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib.analyses.patching import PathBases, attribution_patching, path_patching
from mechlib.metrics import Metric
from mechlib.provenance import records
from mechlib.results import atomic_write_bytes
from mechlib.sites import Site
from mechlib.tasks.contrast import ContrastSet

Head = tuple[int, int]


@dataclass(frozen=True)
class Stage:
    """One step backwards: heads that reach the previous stage's heads through ``via``."""

    name: str
    via: str  # "logits" | "q" | "k" | "v"
    positions: str = "all"  # receiver positions: "all" or "last"


IOI_STAGES = (
    Stage("name mover", "logits", "last"),
    Stage("s-inhibition", "q", "last"),
    Stage("induction / duplicate token", "v", "all"),
    Stage("previous token", "k", "all"),
)


def head_label(h: Head) -> str:
    return f"L{h[0]}H{h[1]}"


def parse_head(label: str) -> Head:
    l, h = label[1:].split("H")
    return int(l), int(h)


@dataclass(frozen=True)
class StageRecord:
    """What one stage measured: candidate senders and their per-prompt path scores."""

    name: str
    via: str
    positions: str
    receivers: tuple[str, ...]  # head labels, or ("logits",)
    candidates: tuple[Head, ...]
    scores: Tensor  # [prompt, candidate]: (clean - patched) / mean(clean - corrupted)

    def select(self, threshold: float, min_z: float, max_heads: int,
               idx: Optional[Tensor] = None) -> list[tuple[Head, float, float]]:
        """``(head, mean score, z)`` of the heads that pass, strongest (largest |mean|) first:
        |mean| ≥ ``threshold`` and |z| ≥ ``min_z``, at most ``max_heads`` (with ``threshold = min_z
        = 0`` this is Merullo et al.'s "top k per stage")."""
        s = self.scores if idx is None else self.scores[idx]
        mean = s.mean(0)
        se = s.std(0) / math.sqrt(s.shape[0]) if s.shape[0] > 1 else torch.full_like(mean, float("nan"))
        z = mean / se.clamp(min=1e-9)
        ok = (mean.abs() >= threshold) & ((z.abs() >= min_z) | torch.isnan(se))
        picked = sorted((i for i in range(len(self.candidates)) if ok[i]), key=lambda i: -abs(float(mean[i])))
        return [(self.candidates[i], float(mean[i]), float(z[i])) for i in picked[:max_heads]]


@dataclass(frozen=True)
class Circuit:
    """A set of heads with classes, path-effect scores and edges, found for one task on one model.

    Attributes:
        heads: in-circuit ``(layer, head)`` pairs, in stage order.
        classes: head → class (``"name mover"``, ``"negative name mover"``, ``"s-inhibition"``...).
        scores: head → mean normalized path effect at its stage (positive: the path carries the
            clean answer; negative: it pushes against it).
        zscores: head → mean / standard error over prompts.
        edges: ``(sender, receiver, weight)`` with labels like ``"L20H0"`` and ``"logits"``; the
            weight is the sender's normalized path effect through that receiver alone.
        stages: what each stage measured (to re-select on resampled prompts).
    """

    heads: tuple[Head, ...]
    classes: Mapping[Head, str]
    scores: Mapping[Head, float]
    zscores: Mapping[Head, float]
    edges: tuple[tuple[str, str, float], ...]
    task: str
    model: str
    n_layers: int
    n_heads: int
    stages: tuple[StageRecord, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.heads)

    def __contains__(self, head) -> bool:
        return tuple(head) in set(self.heads)

    def by_class(self) -> dict[str, list[Head]]:
        out: dict[str, list[Head]] = {}
        for h in self.heads:
            out.setdefault(self.classes[h], []).append(h)
        return out

    def resample(self, idx: Tensor) -> frozenset[Head]:
        """The head set re-selected on prompts ``idx`` (receivers of each stage held fixed)."""
        o = self.metadata
        return frozenset(h for st in self.stages
                         for h, _, _ in st.select(o["threshold"], o["min_z"], o["max_heads"], idx))

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame([dict(head=head_label(h), layer=h[0], index=h[1], cls=self.classes[h],
                                  score=self.scores[h], z=self.zscores[h]) for h in self.heads])

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict:
        return dict(
            kind="Circuit", task=self.task, model=self.model, n_layers=self.n_layers, n_heads=self.n_heads,
            heads=[head_label(h) for h in self.heads],
            classes={head_label(h): c for h, c in self.classes.items()},
            scores={head_label(h): v for h, v in self.scores.items()},
            zscores={head_label(h): v for h, v in self.zscores.items()},
            edges=[list(e) for e in self.edges],
            stages=[dict(name=s.name, via=s.via, positions=s.positions, receivers=list(s.receivers),
                         candidates=[head_label(h) for h in s.candidates], scores=s.scores.tolist())
                    for s in self.stages],
            metadata=dict(self.metadata),
        )

    def save(self, path: Union[str, Path]) -> Path:
        """Write as JSON, atomically."""
        path = Path(path)
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=1).encode())
        return path

    @staticmethod
    def load(path: Union[str, Path]) -> "Circuit":
        d = json.loads(Path(path).read_text())
        if d.get("kind") != "Circuit":
            raise ValueError(f"{path} is not a saved Circuit (kind={d.get('kind')!r})")
        byl = {k: parse_head(k) for k in d["heads"]}
        return Circuit(
            heads=tuple(byl[k] for k in d["heads"]),
            classes={parse_head(k): v for k, v in d["classes"].items()},
            scores={parse_head(k): v for k, v in d["scores"].items()},
            zscores={parse_head(k): v for k, v in d["zscores"].items()},
            edges=tuple((a, b, float(w)) for a, b, w in d["edges"]),
            task=d["task"], model=d["model"], n_layers=d["n_layers"], n_heads=d["n_heads"],
            stages=tuple(StageRecord(s["name"], s["via"], s["positions"], tuple(s["receivers"]),
                                     tuple(parse_head(c) for c in s["candidates"]),
                                     torch.tensor(s["scores"], dtype=torch.float32).reshape(
                                         -1, len(s["candidates"])))
                         for s in d["stages"]),
            metadata=d.get("metadata", {}),
        )

    def __repr__(self) -> str:
        parts = ", ".join(f"{c}: {' '.join(head_label(h) for h in hs)}" for c, hs in self.by_class().items())
        return f"Circuit({self.task} on {self.model}, {len(self)} heads — {parts or 'empty'})"

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{head_label(h)}</td><td>{self.classes[h]}</td><td>{self.scores[h]:+.3f}</td>"
                       f"<td>{self.zscores[h]:+.1f}</td></tr>" for h in self.heads)
        return (f"<b>Circuit</b> {self.task} on {self.model}: {len(self)} heads"
                f"<table><tr><th>head</th><th>class</th><th>score</th><th>z</th></tr>{rows}</table>")


def _receiver_sites(model, heads: Sequence[Head], via: str) -> list[Site]:
    if via == "q":
        return [Site("head_q", l, head=h) for l, h in heads]
    group = model.cfg.n_heads // (getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    kv = sorted({(l, h // group) for l, h in heads})
    return [Site(f"head_{via}", l, head=g) for l, g in kv]


def _scores(res, gap: float) -> Tensor:
    """Per-prompt ``(clean - patched) / gap`` for every [layer, head] cell, flattened."""
    clean = res.clean_per_prompt.reshape(-1, 1, 1)
    return ((clean - res.per_prompt) / gap).flatten(1)


@records
def find_circuit(
    model,
    contrast: ContrastSet,
    metric: Metric,
    *,
    selection: str = "threshold",
    stages: Optional[Sequence[Stage]] = None,
    threshold: float = 0.05,
    min_z: float = 2.0,
    max_heads: int = 6,
    candidates: Union[int, None, str] = "auto",
    edges: bool = True,
    top_fraction: float = 0.02,
    sender_positions: str = "all",
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
) -> Circuit:
    """Find a circuit by path patching backwards from the logits (IOI-style).

    ====================  ===========================  ===========================  ===============================
    choice                Merullo et al. (paper)       released code                mechlib
    ====================  ===========================  ===========================  ===============================
    heads per stage       top 2% by |importance|       (selection not released)     ``selection="top"``: top
                                                                                    ``top_fraction`` (2%) by |mean
                                                                                    effect|; ``"threshold"``:
                                                                                    |effect| ≥ ``threshold``,
                                                                                    |z| ≥ 2, ≤ ``max_heads``
    senders searched      every head below the         every head below the         ``"top"``: every head;
                          receivers                    receivers                    ``"threshold"``: the top 24 by
                                                                                    attribution patching
                                                                                    (``candidates=``)
    stages                Wang et al.'s walk back      one run per receiver set     ``"top"``: all four
                          from the logits (29/28       (configs not released)       ``IOI_STAGES``; ``"threshold"``:
                          heads on GPT-2 Medium: more                               the first three (``stages=``)
                          than 3 stages of 8)
    sender positions      —                            END only (``position=-1``)   all (Wang et al.);
                                                                                    ``sender_positions="last"``
    receiver positions    —                            END only                     per stage (``Stage.positions``)
    score                 (patched − clean)/(corr −    same                         (clean − patched)/(clean −
                          clean)                                                    corr): the same quantity,
                                                                                    same sign (+ = the path
                                                                                    carries the clean behaviour)
    ====================  ===========================  ===========================  ===============================

    ``selection="top"`` is the paper's rule, and its defaults are the paper's: exhaustive path
    patching (every head is a sender), all four stages of :data:`IOI_STAGES` (name movers,
    S-inhibition, induction / duplicate token, previous token), the top
    ``ceil(top_fraction · n_layers · n_heads)`` heads of each stage by |mean effect|, no threshold.
    Passing ``candidates=K`` or ``stages=`` there is a deliberate departure (e.g. a CPU compromise);
    ``metadata["exhaustive"]`` and ``metadata["stages"]`` record what ran. ``"threshold"`` is mechlib's
    rule (significance over prompts), with a 24-head attribution pre-filter and three stages.

    Args:
        contrast: clean/corrupted pairs; ``metric`` their metric (e.g. ``metrics.logit_diff``).
        selection: ``"threshold"`` (mechlib) or ``"top"`` (Merullo et al.: the top fraction per stage).
        stages: the stages to walk (default: all of ``IOI_STAGES`` with ``"top"``, the first three —
            name movers, S-inhibition, induction/duplicate-token — with ``"threshold"``). Stage 1
            must be ``via="logits"``.
        threshold: minimum |mean normalized path effect| (share of the clean − corrupted gap).
        min_z: minimum |mean / standard error| over prompts.
        max_heads: at most this many heads per stage (strongest first).
        candidates: path-patch only the top-K heads by attribution patching; ``None``: every head
            (exhaustive). ``"auto"`` (default): ``None`` with ``"top"``, 24 with ``"threshold"``.
        edges: measure each in-circuit sender's path through each receiver head separately
            (weights for :func:`mechlib.viz.circuit_diagram`).
        top_fraction: the share of all heads kept per stage with ``selection="top"``.
        batch_size: prompts per forward (default all); the circuit does not depend on it.

    Returns:
        a :class:`Circuit`; heads with a negative score get the class ``"negative <stage>"`` and do
        not become receivers of the next stage.

    Example:
        >>> ioi = mechlib.tasks.ioi(model, n=8)                              # doctest: +SKIP
        >>> c = mechlib.find_circuit(model, ioi, mechlib.metrics.logit_diff(ioi))
        >>> c.by_class()["name mover"]
        >>> paper = mechlib.find_circuit(model, ioi, mechlib.metrics.logit_diff(ioi), selection="top")
    """
    if selection not in ("threshold", "top"):
        raise ValueError(f"selection={selection!r}: choose 'threshold' (mechlib) or 'top' (Merullo et al.'s top "
                         "fraction per stage)")
    if stages is None:
        stages = IOI_STAGES if selection == "top" else IOI_STAGES[:3]
    if isinstance(candidates, str):
        if candidates != "auto":
            raise ValueError(f"candidates={candidates!r}: give a number of heads, None (exhaustive) or 'auto'")
        candidates = None if selection == "top" else 24
    stages = tuple(stages)
    if not stages or stages[0].via != "logits":
        raise ValueError("stages must start with a via='logits' stage (the heads that write the answer)")
    for st in stages:
        if st.via not in ("logits", "q", "k", "v") or st.positions not in ("all", "last"):
            raise ValueError(f"{st}: via must be 'logits'|'q'|'k'|'v' and positions 'all'|'last'")
    if any(st.via == "logits" for st in stages[1:]):
        raise ValueError("only the first stage can be via='logits'")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    if selection == "top":
        if not 0 < top_fraction <= 1:
            raise ValueError(f"top_fraction={top_fraction} must be in (0, 1]")
        threshold, min_z, max_heads = 0.0, 0.0, math.ceil(top_fraction * L * H)
    if threshold < 0 or min_z < 0 or max_heads < 1:
        raise ValueError("threshold and min_z must be >= 0 and max_heads >= 1")
    all_heads = [(l, h) for l in range(L) for h in range(H)]

    ranked = all_heads
    if candidates is not None:
        if candidates < 1:
            raise ValueError(f"candidates={candidates}: give a positive number or None (exhaustive)")
        attr = attribution_patching(model, contrast, metric, site="head_out", batch_size=batch_size)
        est = (attr.values - attr.baselines["corrupted"]).abs().flatten()
        ranked = [all_heads[i] for i in torch.argsort(est, descending=True).tolist()]

    base = PathBases(model, contrast, metric, batch_size)  # shared by every path patching below
    gap = None
    records, heads, classes, scores, zs, edge_list = [], [], {}, {}, {}, []
    receivers: list[Head] = []
    for k, st in enumerate(stages):
        if k > 0 and not receivers:
            break
        limit = L if st.via == "logits" else max(l for l, _ in receivers)
        pool = [h for h in ranked if h[0] < limit and h not in classes]
        senders = pool if candidates is None else pool[:candidates]
        if not senders:
            break
        recv = "logits" if st.via == "logits" else _receiver_sites(model, receivers, st.via)
        res = path_patching(model, contrast, metric, receivers=recv, senders=senders,
                            receiver_positions=st.positions, sender_positions=sender_positions,
                            progress=progress, _base=base)
        if gap is None:
            gap = res.baselines["clean"] - res.baselines["corrupted"]
            if abs(gap) < 1e-6:
                raise ValueError(f"the metric does not separate clean from corrupted on this task "
                                 f"(clean {res.baselines['clean']:.3f} = corrupted): no circuit to find")
        flat = _scores(res, gap)
        cols = torch.tensor([l * H + h for l, h in senders])
        rec = StageRecord(st.name, st.via, st.positions,
                          ("logits",) if st.via == "logits" else tuple(head_label(h) for h in receivers),
                          tuple(senders), flat[:, cols])
        records.append(rec)
        found = rec.select(threshold, min_z, max_heads)
        for h, s, z in found:
            heads.append(h)
            classes[h] = st.name if s > 0 else f"negative {st.name}"
            scores[h], zs[h] = s, z
        if edges and found:
            if st.via == "logits":
                edge_list += [(head_label(h), "logits", s) for h, s, _ in found]
            else:
                for r in receivers:
                    upstream = [h for h, _, _ in found if h[0] < r[0]]  # only earlier heads reach r
                    if not upstream:
                        continue
                    one = path_patching(model, contrast, metric, receivers=_receiver_sites(model, [r], st.via),
                                        senders=upstream, receiver_positions=st.positions,
                                        sender_positions=sender_positions, progress=False, _base=base)
                    e = _scores(one, gap).mean(0)
                    edge_list += [(head_label(h), head_label(r), float(e[h[0] * H + h[1]])) for h in upstream]
        receivers = [h for h, s, _ in found if s > 0]
    name = getattr(model.cfg, "model_name", None) or type(model).__name__
    return Circuit(
        heads=tuple(heads), classes=classes, scores=scores, zscores=zs, edges=tuple(edge_list),
        task=contrast.task, model=str(name), n_layers=L, n_heads=H, stages=tuple(records),
        metadata=dict(threshold=threshold, min_z=min_z, max_heads=max_heads, candidates=candidates,
                      exhaustive=candidates is None,
                      selection=selection, top_fraction=top_fraction if selection == "top" else None,
                      sender_positions=sender_positions,
                      n_prompts=len(contrast), gap=gap, stages=[s.name for s in stages],
                      metric=getattr(metric, "__name__", "metric")),
    )
