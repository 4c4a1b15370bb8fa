"""Edge attribution patching (EAP) and EAP with integrated gradients (EAP-IG), edge circuits and
their faithfulness.

**What it measures.** A transformer's residual stream is a sum of writes: the embedding, every
attention head, every MLP. Every later component *reads* that sum, so each (writer → reader) pair
is an **edge** of a computational graph: writer ``u`` (input, head ``L{l}H{h}``, MLP ``M{l}``) →
reader ``v`` (a head's query, key or value input, an MLP's input, or the logits). Patching one
edge means: the reader ``v`` receives ``u``'s activation from the *corrupted* run while everything
else is unchanged. EAP (Syed et al. 2023) estimates the effect of patching every edge at once, to
first order, from one forward and one backward::

    score(u → v) = Σ_{prompt-mean, pos, d}  (a_u(clean) − a_u(corrupted)) · ∂metric/∂(input of v)

and EAP-IG (Hanna, Pezzelle & Belinkov 2024, "Have Faith in Faithfulness") averages the gradient
over ``ig_steps`` points on a straight path from the corrupted to the clean input embedding, which
fixes EAP's main failure: a gradient taken at the clean run is ~0 wherever the clean run is
saturated (a confident attention pattern, a saturated nonlinearity), although patching would
change a lot. All edges come from one forward/backward per step: the score table is an einsum of
the upstream activation differences with the downstream input gradients, never a loop over edges.

**Sign (mechlib's convention).** ``score ≈ metric(clean) − metric(clean run with edge u→v
patched from the corrupted run)`` — *noising*: positive = the edge carries what makes the clean
behaviour (removing it lowers the metric), negative = the edge works against it. This is the same
number as the reference code's ``(corr − clean) · ∇(−logit diff)``. ``method="exact"`` computes
exactly this quantity by patching one edge at a time (slow, the ground truth on small models).

**Circuits and faithfulness.** :meth:`EdgeScores.graph` keeps the top edges (the paper's greedy
search or plain top-n) and prunes nodes that no longer connect the input to the logits.
:func:`faithfulness` runs the model with every edge *outside* the circuit ablated — each reader
gets the ablated writer's activation for those edges and the circuit run's own activation for the
others — and reports the normalised recovery ``(circuit − ablated) / (clean − ablated)`` with a
BCa bootstrap interval.

**Most common misreading.** An EAP score is a *local linear estimate*, not an effect: a large
|score| is a reason to test the edge, and a near-zero score does not mean "unused" (the gradient
may simply be saturated — compare ``"eap"`` with ``"eap-ig"`` and with ``"exact"``). And a circuit
is judged by its faithfulness, not by how well its nodes overlap a hand-made circuit ("overlap is
no substitute for faithfulness", the paper's point): always evaluate the selected graph.

=================  ===============================  ====================================  ========================================
choice             paper (Hanna et al. 2024)        released code (hannamw/EAP-IG)        mechlib
=================  ===============================  ====================================  ========================================
nodes              input, heads, MLPs, logits       same; input = hook_embed (token)      same; input = blocks.0.hook_resid_pre
                                                                                          (token + position; same Δ when aligned)
edges into a head  q, k, v separately               same; GQA ungrouped (k/v per q head)  q per head; k/v per KV head (shared)
head write         z_h W_O^h (no b_O)               hook_result (no b_O)                  z_h W_O^h; b_O a constant, never ablated
default method     EAP-IG (inputs)                  attribute(method=...)                 method="eap-ig"
IG steps           5                                5 in the paper scripts (default 30)   ig_steps=5
IG points α = k/m  k = 1..m (right Riemann sum)     paper-era 0edbdd7: k = 1..m;          k = 1..m: clean end in, corrupted
                                                    HEAD 795f560: k = 0..m−1              end out (paper-era; spec §2)
score sign         (corr − clean)·∇(−LD)            same (noising)                        (clean − corr)·∇metric: same value
aggregation        Σ pos, d; mean over items        Σ pos, d; ÷ items                     Σ pos, d; mean over prompts;
                                                                                          per-prompt scores kept
selection          greedy (pareto.py)               top-n, threshold, greedy              graph(method="greedy"), "topn"
pruning            childless, then parentless       fixpoint: has in & has out            reachability input → node → logits
ablation           corrupted patching               patching, mean, zero                  corrupted, mean, zero, resample
faithfulness       (circuit − corr)/(clean − corr)  —                                     same (ratio of prompt means) + BCa CI
norms              gradients through LN             same                                  same; post-attention norms linearised
                                                                                          per head, scale frozen per run
=================  ===============================  ====================================  ========================================

The "paper" column is what the paper's experiment repository (hannamw/eap-ig-faithfulness, with
EAP-IG pinned at 0edbdd7) ran; "released code" is EAP-IG's HEAD (795f560) unless stated.

**Post-norm families** (Gemma 2/3, OLMo-2) normalise the attention output before adding it to the
residual, so a single head's write is not additive. mechlib linearises that norm per head with its
scale frozen at the value it has *in that run* (as :func:`mechlib.analyses.attribution.frozen_norm`
does for DLA): head ``h``'s write is ``w ⊙ (z_h W_O^h) / rms(attention output)``. The writes then sum
exactly to the attention output of every run (these models have no attention output bias), so the
full graph reproduces the clean run and the empty graph the corrupted run exactly; but "patching
edge u→v" there means replacing u's *share of its layer's normalised output*, whose scale depends
on the other heads of the layer in that run. ``metadata["post_norm"]`` records it.
"""

from __future__ import annotations

import heapq
import json
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.memory import peak_memory
from mechlib.metrics import Metric, MetricError, check_metric_values
from mechlib.provenance import records
from mechlib.results import Result, atomic_write_bytes
from mechlib.tasks.contrast import ContrastSet

METHODS = ("eap", "eap-ig", "eap-ig-activations", "clean-corrupted", "exact")
ABLATIONS = ("corrupted", "mean", "zero", "resample")
SELECTIONS = ("greedy", "topn")


class EdgeGraphError(ValueError):
    """A bad edge name, a graph from another model, or an impossible selection."""


# ==============================================================================================
# the graph: nodes, input slots and edges of one model shape
# ==============================================================================================


@dataclass(frozen=True)
class GraphSpec:
    """The edge graph of one model shape (equal specs ⇔ the same nodes and edges).

    Writers ("forward" nodes), in this order (the rows of every score matrix): ``input`` (0), then
    per layer ``l`` the heads ``L{l}H{h}`` and the MLP ``M{l}``. Reader slots ("backward", the
    columns): per layer the query inputs of every head ``L{l}H{h}<q>``, the key and value inputs
    of every KV head (``L{l}H{g}<k>`` on multi-head models, ``L{l}KV{g}<k>`` on grouped-query
    models, where KV head ``g`` serves query heads ``g·G … g·G+G−1``), the MLP input ``M{l}``,
    and finally ``logits`` (the final residual, before the last norm). An edge ``u → v`` exists
    when ``u`` writes before ``v`` reads: heads of layer ``l`` read from the input, heads and
    MLPs of layers ``< l``; MLP ``l`` also reads its own layer's heads unless the block is
    parallel (GPT-NeoX/Pythia); the logits read everything.

    Edge names are ``"{writer}->{reader slot}"``: ``"L3H2->L5H1<q>"``, ``"input->M0"``,
    ``"M4->logits"``.

    Example:
        >>> spec = GraphSpec(n_layers=12, n_heads=12, n_kv_heads=12, parallel=False)
        >>> spec.n_edges      # GPT-2 small, as counted by the reference code
        32491
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool = False

    def __post_init__(self):
        for k in ("n_layers", "n_heads", "n_kv_heads"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise EdgeGraphError(f"GraphSpec {k}={v!r} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise EdgeGraphError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @classmethod
    def from_model(cls, model) -> "GraphSpec":
        from mechlib.arch import describe

        a = describe(model)
        return cls(int(model.cfg.n_layers), a.n_heads, a.n_kv_heads, bool(a.parallel))

    def to_dict(self) -> dict:
        return dict(n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                    parallel=self.parallel)

    # ---------------------------------------------------------------- sizes and indices
    @property
    def group(self) -> int:
        """Query heads per KV head (1 on multi-head attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads != self.n_heads

    @property
    def n_forward(self) -> int:
        """Writers: input, every head, every MLP."""
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def width(self) -> int:
        """Reader slots per layer: H query + 2·KV key/value inputs + 1 MLP input."""
        return self.n_heads + 2 * self.n_kv_heads + 1

    @property
    def n_backward(self) -> int:
        """Reader slots: every q/k/v/MLP input, then the logits."""
        return self.n_layers * self.width + 1

    @property
    def n_nodes(self) -> int:
        """Nodes: input, heads, MLPs and logits."""
        return self.n_forward + 1

    @property
    def n_edges(self) -> int:
        return int(self.real_mask.sum())

    def head_index(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_index(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def q_slot(self, layer: int, head: int) -> int:
        return layer * self.width + head

    def k_slot(self, layer: int, kv_head: int) -> int:
        return layer * self.width + self.n_heads + kv_head

    def v_slot(self, layer: int, kv_head: int) -> int:
        return layer * self.width + self.n_heads + self.n_kv_heads + kv_head

    def mlp_slot(self, layer: int) -> int:
        return layer * self.width + self.n_heads + 2 * self.n_kv_heads

    @property
    def logits_slot(self) -> int:
        return self.n_layers * self.width

    def prev(self, slot: int) -> int:
        """How many writers (the first ``prev`` rows) a reader slot receives from."""
        if slot == self.logits_slot:
            return self.n_forward
        layer, r = divmod(slot, self.width)
        first = 1 + layer * (self.n_heads + 1)
        if r == self.width - 1 and not self.parallel:  # the MLP reads its own layer's heads
            return first + self.n_heads
        return first

    # ---------------------------------------------------------------- names and tables
    @cached_property
    def forward_names(self) -> tuple[str, ...]:
        out = ["input"]
        for l in range(self.n_layers):
            out += [f"L{l}H{h}" for h in range(self.n_heads)] + [f"M{l}"]
        return tuple(out)

    @cached_property
    def backward_names(self) -> tuple[str, ...]:
        kv = "KV" if self.gqa else "H"
        out = []
        for l in range(self.n_layers):
            out += [f"L{l}H{h}<q>" for h in range(self.n_heads)]
            out += [f"L{l}{kv}{g}<k>" for g in range(self.n_kv_heads)]
            out += [f"L{l}{kv}{g}<v>" for g in range(self.n_kv_heads)]
            out.append(f"M{l}")
        return tuple(out + ["logits"])

    @cached_property
    def node_names_all(self) -> tuple[str, ...]:
        return self.forward_names + ("logits",)

    @cached_property
    def real_mask(self) -> Tensor:
        """``[n_forward, n_backward]`` True where the writer → reader edge exists."""
        prev = torch.tensor([self.prev(k) for k in range(self.n_backward)])
        return torch.arange(self.n_forward)[:, None] < prev[None, :]

    @cached_property
    def _edges(self) -> tuple[Tensor, Tensor]:
        dst, src = self.real_mask.T.nonzero(as_tuple=True)  # reader-major: edges into one slot together
        return src, dst

    @property
    def edge_src(self) -> Tensor:
        """``[n_edges]`` writer row of each edge."""
        return self._edges[0]

    @property
    def edge_dst(self) -> Tensor:
        """``[n_edges]`` reader slot of each edge."""
        return self._edges[1]

    @cached_property
    def edge_names(self) -> tuple[str, ...]:
        f, b = self.forward_names, self.backward_names
        return tuple(f"{f[s]}->{b[d]}" for s, d in zip(self.edge_src.tolist(), self.edge_dst.tolist()))

    @cached_property
    def _edge_lookup(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.edge_names)}

    def edge_index(self, name: str) -> int:
        """Position of edge ``name`` in :attr:`edge_names` (clear error with close names)."""
        i = self._edge_lookup.get(name)
        if i is None:
            import difflib

            near = difflib.get_close_matches(name, self.edge_names, n=3)
            raise EdgeGraphError(f"no edge {name!r} in this graph ({self.n_layers} layers, {self.n_heads} heads, "
                                 f"{self.n_kv_heads} KV heads). Edges look like 'L0H1->L1H0<q>', 'input->M0', "
                                 f"'M1->logits'" + (f"; close: {near}" if near else ""))
        return i

    @cached_property
    def slot_nodes(self) -> tuple[tuple[int, ...], ...]:
        """For each reader slot, the nodes it feeds (one head; every head of a KV group; an MLP;
        logits = ``n_forward``)."""
        out = []
        for l in range(self.n_layers):
            out += [(self.head_index(l, h),) for h in range(self.n_heads)]
            grp = [tuple(self.head_index(l, g * self.group + j) for j in range(self.group))
                   for g in range(self.n_kv_heads)]
            out += grp + grp
            out.append((self.mlp_index(l),))
        return tuple(out + [(self.n_forward,)])

    @cached_property
    def node_slots(self) -> tuple[tuple[int, ...], ...]:
        """For each node (forward nodes, then logits), the reader slots that feed it."""
        res: list[list[int]] = [[] for _ in range(self.n_nodes)]
        for k, nodes in enumerate(self.slot_nodes):
            for n in nodes:
                res[n].append(k)
        return tuple(tuple(r) for r in res)

    def __repr__(self) -> str:
        return (f"GraphSpec({self.n_layers} layers × {self.n_heads} heads ({self.n_kv_heads} KV), "
                f"{'parallel' if self.parallel else 'sequential'} blocks: {self.n_nodes} nodes, {self.n_edges} edges)")


def _as_spec(x) -> GraphSpec:
    if isinstance(x, GraphSpec):
        return x
    if isinstance(x, Mapping):
        return GraphSpec(**x)
    return GraphSpec.from_model(x)


class Graph:
    """A set of edges of a :class:`GraphSpec` (an edge circuit), with optional per-edge scores.

    Build with :meth:`EdgeScores.graph` (selection + pruning), :meth:`full`, :meth:`empty` or
    :meth:`from_edges`; compare two with :func:`mechlib.circuit_overlap`; evaluate with
    :func:`faithfulness`; draw with :func:`mechlib.viz.edge_diagram`.

    Attributes:
        spec: the model shape (``==`` between graphs of the same model shape).
        mask: ``[n_edges]`` bool, True for the edges in the circuit (order of ``spec.edge_names``).
        scores: ``[n_edges]`` the scores the graph was selected from (or ``None``).
    """

    def __init__(self, spec: GraphSpec, mask: Tensor, *, scores: Optional[Tensor] = None,
                 metadata: Optional[Mapping[str, Any]] = None):
        spec = _as_spec(spec)
        mask = torch.as_tensor(mask, dtype=torch.bool).flatten().cpu()
        if mask.shape != (spec.n_edges,):
            raise EdgeGraphError(f"mask has {mask.numel()} entries but this spec has {spec.n_edges} edges")
        if scores is not None:
            scores = torch.as_tensor(scores).detach().float().flatten().cpu()
            if scores.shape != (spec.n_edges,):
                raise EdgeGraphError(f"scores has {scores.numel()} entries but this spec has {spec.n_edges} edges")
        self.spec, self.mask, self.scores = spec, mask, scores
        self.metadata = dict(metadata or {})

    # ---------------------------------------------------------------- construction
    @classmethod
    def full(cls, spec) -> "Graph":
        """Every edge of the model (faithfulness 1 by construction)."""
        spec = _as_spec(spec)
        return cls(spec, torch.ones(spec.n_edges, dtype=torch.bool), metadata=dict(selection="full"))

    @classmethod
    def empty(cls, spec) -> "Graph":
        """No edge (faithfulness 0: the ablated run)."""
        spec = _as_spec(spec)
        return cls(spec, torch.zeros(spec.n_edges, dtype=torch.bool), metadata=dict(selection="empty"))

    @classmethod
    def from_edges(cls, spec, names: Sequence[str]) -> "Graph":
        """The graph with exactly the edges called ``names`` (e.g. ``["input->L0H1<q>", ...]``)."""
        spec = _as_spec(spec)
        mask = torch.zeros(spec.n_edges, dtype=torch.bool)
        for n in names:
            mask[spec.edge_index(n)] = True
        return cls(spec, mask, metadata=dict(selection="hand-built"))

    # ---------------------------------------------------------------- views
    def __len__(self) -> int:
        return int(self.mask.sum())

    def __contains__(self, name: str) -> bool:
        return bool(self.mask[self.spec.edge_index(name)])

    def __eq__(self, other) -> bool:
        return isinstance(other, Graph) and self.spec == other.spec and torch.equal(self.mask, other.mask)

    __hash__ = None  # mutable tensors inside

    def edge_names(self) -> list[str]:
        """Names of the edges in the graph."""
        names = self.spec.edge_names
        return [names[i] for i in self.mask.nonzero().flatten().tolist()]

    def matrix(self) -> Tensor:
        """``[n_forward, n_backward]`` bool: the graph's edges as a writer × reader table."""
        m = torch.zeros(self.spec.n_forward, self.spec.n_backward, dtype=torch.bool)
        m[self.spec.edge_src[self.mask], self.spec.edge_dst[self.mask]] = True
        return m

    def _node_mask(self) -> Tensor:
        """``[n_nodes]`` True for nodes in the circuit: writers with an outgoing edge, and the
        logits when an edge reaches them (the reference's rule; after :meth:`prune` every such
        node also lies on an input → logits path)."""
        spec = self.spec
        nodes = torch.zeros(spec.n_nodes, dtype=torch.bool)
        nodes[spec.edge_src[self.mask]] = True
        nodes[spec.n_forward] = bool(self.mask[spec.edge_dst == spec.logits_slot].any())
        return nodes

    def node_names(self, exclude_io: bool = True) -> list[str]:
        """Names of the nodes in the graph — writers with an outgoing edge: heads ``L{l}H{h}``,
        MLPs ``M{l}``; with ``exclude_io=False`` also ``input`` and ``logits`` when connected."""
        names = self.spec.node_names_all
        out = [names[i] for i in self._node_mask().nonzero().flatten().tolist()]
        return [n for n in out if n not in ("input", "logits")] if exclude_io else out

    def heads(self) -> list[tuple[int, int]]:
        """``(layer, head)`` of the heads in the graph."""
        return [(int(n[1:].split("H")[0]), int(n.split("H")[1])) for n in self.node_names() if n.startswith("L")]

    def mlps(self) -> list[int]:
        return [int(n[1:]) for n in self.node_names() if n.startswith("M")]

    # ---------------------------------------------------------------- pruning
    def prune(self) -> "Graph":
        """Drop nodes that are not on a path input → node → logits, and their edges.

        A node stays when it is reachable from the input *and* reaches the logits through edges
        of the graph (an edge into a KV head's key/value input reaches every query head of its
        group). In a DAG this is the reference's fixpoint "has an outgoing edge and (is the input
        or has an incoming edge)", reached in one pass.
        """
        spec = self.spec
        E = self.matrix()
        F = spec.n_forward
        reach = torch.zeros(spec.n_nodes, dtype=torch.bool)
        reach[0] = True
        for n in range(1, spec.n_nodes):  # writers come before their readers in index order
            slots = list(spec.node_slots[n])
            reach[n] = bool((E[:, slots] & reach[:F, None]).any())
        co = torch.zeros(spec.n_nodes, dtype=torch.bool)
        co[F] = True
        slot_alive = torch.zeros(spec.n_backward, dtype=torch.bool)
        slot_alive[spec.logits_slot] = True
        for n in range(F - 1, -1, -1):  # readers of n all have larger indices
            co[n] = bool((E[n] & slot_alive).any())
            for k in spec.node_slots[n]:
                slot_alive[k] = slot_alive[k] or bool(co[n])
        keep = reach & co
        slot_keep = torch.tensor([bool(keep[list(ns)].any()) for ns in spec.slot_nodes])
        edge_keep = self.mask & keep[spec.edge_src] & slot_keep[spec.edge_dst]
        return Graph(spec, edge_keep, scores=self.scores, metadata={**self.metadata, "pruned": True})

    # ---------------------------------------------------------------- persistence
    def to_json(self) -> dict:
        d = dict(kind="EdgeGraph", spec=self.spec.to_dict(), edges=self.edge_names(), metadata=dict(self.metadata))
        if self.scores is not None:
            d["scores"] = self.scores.tolist()
        return d

    def save(self, path: Union[str, Path]) -> Path:
        """Write as JSON (edge names, spec, scores), atomically."""
        from mechlib.results import _jsonable

        path = Path(path)
        atomic_write_bytes(path, json.dumps(_jsonable(self.to_json()), indent=1).encode())
        return path

    @staticmethod
    def load(path: Union[str, Path]) -> "Graph":
        d = json.loads(Path(path).read_text())
        if d.get("kind") != "EdgeGraph":
            raise EdgeGraphError(f"{path} is not a saved edge Graph (kind={d.get('kind')!r})")
        g = Graph.from_edges(GraphSpec(**d["spec"]), d["edges"])
        return Graph(g.spec, g.mask, scores=d.get("scores"), metadata=d.get("metadata", {}))

    # ---------------------------------------------------------------- display
    def __repr__(self) -> str:
        s = self.spec
        return (f"Graph({len(self)} of {s.n_edges} edges, {len(self.node_names())} nodes; "
                f"{s.n_layers} layers × {s.n_heads} heads)")

    def _repr_html_(self) -> str:
        names = self.edge_names()
        shown = ", ".join(f"<code>{n}</code>" for n in names[:20]) + (" …" if len(names) > 20 else "")
        return f"<b>{self!r}</b><br>{shown}"


# ==============================================================================================
# wiring: which hook points carry each writer and reader slot on this model
# ==============================================================================================


@dataclass
class _PostNorm:
    """A post-attention norm linearised with the statistics of each run (see module docstring)."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float
    center: bool

    def scale(self, raw: Tensor) -> Tensor:
        x = raw.float()
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt()  # [b, p, 1]

    def share(self, parts: Tensor, scale: Tensor) -> Tensor:
        """``parts [b, p, H, d]`` → their linear shares of the norm's output (scale frozen)."""
        c = parts.float()
        if self.center:
            c = c - c.mean(-1, keepdim=True)
        c = c * scale[:, :, None]
        return (c * self.weight if self.weight is not None else c).to(parts.dtype)

    def apply(self, raw: Tensor) -> Tensor:
        out = self.share(raw[:, :, None], self.scale(raw))[:, :, 0]
        return out + self.bias if self.bias is not None else out


@dataclass(frozen=True)
class _Slot:
    """A reader hook: one activation feeding ``cols`` (consecutive reader slots) from writers
    ``[:prev]``; ``flat`` activations have no head axis."""

    hook: str
    cols: tuple[int, ...]
    prev: int
    flat: bool


@dataclass
class _Wiring:
    spec: GraphSpec
    family: str
    embed: str
    z: list
    mlp_out: list
    attn_out: list
    W_O: list
    post: list  # per layer: None or (raw hook, _PostNorm)
    slots: list  # [_Slot]

    @property
    def post_norm(self) -> bool:
        return any(p is not None for p in self.post)

    def source_names(self) -> list[str]:
        names = [self.embed] + self.z + self.mlp_out
        names += [p[0] for p in self.post if p is not None]
        return names


def _post_norm_of(model, layer: int, arch) -> _PostNorm:
    norm = model.blocks[layer].ln1_post
    hf = getattr(norm, "original_component", None)
    eps = float(getattr(hf, "eps", None) or getattr(hf, "variance_epsilon", None) or getattr(model.cfg, "eps", 1e-5))
    params = dict(norm.named_parameters())
    w = next((v.detach() for k, v in params.items() if k.endswith("weight")), None)
    b = next((v.detach() for k, v in params.items() if k.endswith("bias")), None)
    if str(getattr(model.cfg, "normalization_type", "")).endswith("Pre"):
        w = b = None
    elif w is not None:
        w = w.float() + arch.norm_offset
    return _PostNorm(w, None if b is None else b.float(), eps, arch.norm == "LN")


def _wiring(model) -> _Wiring:
    """Hook names of every writer and reader on this model (fails early, naming the family)."""
    from mechlib.arch import describe

    arch = describe(model)
    spec = GraphSpec.from_model(model)
    if not arch.pattern_editable:
        raise NotImplementedError(
            f"edge attribution needs separate query/key/value inputs per head, which TransformerLens' "
            f"bridge exposes only where it re-implements attention; this {arch.family} bridge delegates "
            f"attention to Hugging Face ({arch.attention_bridge}), so its q/k/v edges cannot be read or "
            f"patched. Use head-level tools (attribution_patching, path_patching) on this model")
    L = spec.n_layers
    slots = []
    for l in range(L):
        first = 1 + l * (spec.n_heads + 1)
        slots.append(_Slot(f"blocks.{l}.attn.hook_q_input", tuple(spec.q_slot(l, h) for h in range(spec.n_heads)),
                           first, False))
        slots.append(_Slot(f"blocks.{l}.attn.hook_k_input",
                           tuple(spec.k_slot(l, g) for g in range(spec.n_kv_heads)), first, False))
        slots.append(_Slot(f"blocks.{l}.attn.hook_v_input",
                           tuple(spec.v_slot(l, g) for g in range(spec.n_kv_heads)), first, False))
        children = dict(model.blocks[l].named_children())
        if "ln2" in children:
            mlp_in = f"blocks.{l}.ln2.hook_in"
        elif not arch.pre_norm and not arch.parallel:  # OLMo-2: the MLP reads the raw residual
            mlp_in = f"blocks.{l}.mlp.hook_in"
        else:
            raise NotImplementedError(
                f"{arch.family}: block {l} has no separate pre-MLP norm (ln2), so the MLP's residual input "
                f"cannot be told apart from the attention's; edge attribution does not support this block form")
        slots.append(_Slot(mlp_in, (spec.mlp_slot(l),), spec.prev(spec.mlp_slot(l)), True))
    slots.append(_Slot("ln_final.hook_in", (spec.logits_slot,), spec.n_forward, True))
    post = []
    for l in range(L):
        has_post = "ln1_post" in dict(model.blocks[l].named_children())
        post.append((f"blocks.{l}.ln1_post.hook_in", _post_norm_of(model, l, arch)) if has_post else None)
    w = _Wiring(
        spec=spec, family=arch.family, embed="blocks.0.hook_resid_pre",
        z=[f"blocks.{l}.attn.hook_z" for l in range(L)],
        mlp_out=[f"blocks.{l}.hook_mlp_out" for l in range(L)],
        attn_out=[f"blocks.{l}.hook_attn_out" for l in range(L)],
        W_O=[model.blocks[l].attn.W_O.detach() for l in range(L)],  # [H, d_head, d_model]
        post=post, slots=slots,
    )
    for name in w.source_names() + w.attn_out + [s.hook for s in slots]:
        hooks.hook_point(model, name)  # KeyError naming close hook names
    return w


@contextmanager
def _split_qkv(model) -> Iterator[None]:
    """Separate residual copies for every head's q/k/v input (``hook_q_input`` ...), restored after."""
    before = bool(getattr(model.cfg, "use_split_qkv_input", False))
    try:
        if not before:
            model.set_use_split_qkv_input(True)
        yield
    finally:
        if bool(getattr(model.cfg, "use_split_qkv_input", False)) != before:
            model.set_use_split_qkv_input(before)


# ==============================================================================================
# recording writers, and the masked (edge-ablated) forward
# ==============================================================================================


def _head_writes(w: _Wiring, layer: int, z: Tensor, raw: Optional[Tensor]) -> Tensor:
    """``z [b, p, H, d_head]`` → each head's write to the residual ``[b, p, H, d_model]``."""
    W_O = w.W_O[layer].to(z.device, z.dtype)
    heads = torch.einsum("bphe,hed->bphd", z, W_O)
    if w.post[layer] is not None:
        norm = w.post[layer][1]
        heads = norm.share(heads, norm.scale(raw))
    return heads


def _assemble(w: _Wiring, cache: Mapping[str, Tensor]) -> Tensor:
    """Writer activations ``[b, p, n_forward, d_model]`` from one run's cache."""
    spec = w.spec
    embed = cache[w.embed]
    b, p, d = embed.shape
    acts = embed.new_empty((b, p, spec.n_forward, d))
    acts[:, :, 0] = embed
    for l in range(spec.n_layers):
        raw = cache[w.post[l][0]] if w.post[l] is not None else None
        i = spec.head_index(l, 0)
        acts[:, :, i:i + spec.n_heads] = _head_writes(w, l, cache[w.z[l]], raw)
        acts[:, :, spec.mlp_index(l)] = cache[w.mlp_out[l]]
    return acts


def _record(model, w: _Wiring, tokens: Tensor, extras, *, extra_names: Sequence[str] = ()):
    """``(logits, writers [b, p, F, d], cache)`` of a plain no-grad forward."""
    names = list(dict.fromkeys(w.source_names() + list(extra_names)))
    logits, cache = hooks.run_with_cache(model, tokens, names, extras=extras)
    return logits, _assemble(w, cache), cache


def _check_additive(model, w: _Wiring, tokens: Tensor, extras) -> None:
    """Once per call: the final residual and every MLP input are the sums of the writers (plus
    constant biases); otherwise edge ablation would be silently wrong on this architecture."""
    spec = w.spec
    mlp_slots = [s for s in w.slots if s.cols == (spec.mlp_slot(0),)]
    names = w.attn_out + [mlp_slots[0].hook, "ln_final.hook_in"]
    _, acts, cache = _record(model, w, tokens, extras, extra_names=names)
    bias = sum(cache[w.attn_out[l]] - acts[:, :, spec.head_index(l, 0):spec.head_index(l, 0) + spec.n_heads].sum(2)
               for l in range(spec.n_layers))
    final = acts.sum(2) + bias
    target = cache["ln_final.hook_in"]
    tol = 1e-3 * float(target.abs().max()) + 1e-4
    err = float((final - target).abs().max())
    if err > tol:
        raise NotImplementedError(f"{w.family}: the final residual is not the sum of the embedding, head, MLP "
                                  f"and bias writes (off by {err:.3g}), so edges cannot be ablated exactly here")
    first = cache[w.embed] if spec.parallel else cache[w.embed] + cache[w.attn_out[0]]
    err = float((cache[mlp_slots[0].hook] - first).abs().max())
    if err > tol:
        raise NotImplementedError(f"{w.family}: the MLP's input hook ({mlp_slots[0].hook}) is not the residual "
                                  f"stream the MLP reads (off by {err:.3g}); edge attribution cannot use it")
    for l, p in enumerate(w.post):
        if p is None:
            continue
        want = cache[w.attn_out[l]]
        scale = 1e-3 * float(want.abs().max()) + 1e-5
        if not torch.allclose(p[1].apply(cache[p[0]]), want.float(), atol=scale):
            raise NotImplementedError(f"{w.family}: could not reproduce layer {l}'s post-attention norm from "
                                      "its input, so per-head writes cannot be linearised exactly")
        i = spec.head_index(l, 0)
        rest = float((want - acts[:, :, i:i + spec.n_heads].sum(2)).abs().max())
        if rest > scale:
            warnings.warn(f"{w.family}: layer {l}'s attention has an output bias, and its share of the post-norm "
                          "output changes with each run's norm scale; it is a constant of no node, never ablated, "
                          "so the empty graph is not exactly the corrupted run", stacklevel=3)


def _masked_logits(model, w: _Wiring, tokens: Tensor, extras, ablated: Tensor, notin: Tensor) -> Tensor:
    """Logits of ``C`` stacked copies of the batch (copy-major), copy ``c`` with the edges
    ``notin[c]`` (``[C, n_forward, n_backward]`` bool) ablated: every reader input is rebuilt as
    ``input − Σ_{ablated edges u→v} (a_u(this run) − a_u(ablated))``."""
    spec = w.spec
    C, b = notin.shape[0], tokens.shape[0]
    notin = notin.to(model.cfg.device)
    if not bool(notin.any()):
        return hooks.forward(model, tokens.repeat(C, 1), extras=_tile(extras, C))
    # buf["d"]: [C, n_forward, b, p, d] = a(this run) − a(ablated), filled as the writers fire;
    # writer-major so that each reader's correction is one batched matmul over the copies
    buf: dict[str, Tensor] = {}
    zs: dict[int, Tensor] = {}

    def write(rows: slice, value: Tensor) -> None:  # value [C*b, p, rows, d]
        abl = ablated[:, :, rows].to(value.device, value.dtype)
        diff = value.reshape(C, b, *value.shape[1:]) - abl[None]
        buf["d"][:, rows] = diff.permute(0, 3, 1, 2, 4)

    def on_embed(x, hook):
        buf["d"] = x.new_zeros((C, spec.n_forward, b, x.shape[1], x.shape[-1]))
        write(slice(0, 1), x[:, :, None])

    def on_z(x, hook, l):
        if w.post[l] is not None:  # the write needs this run's post-norm scale: finish at its input
            zs[l] = x
            return None
        i = spec.head_index(l, 0)
        write(slice(i, i + spec.n_heads), _head_writes(w, l, x, None))

    def on_raw(x, hook, l):
        i = spec.head_index(l, 0)
        write(slice(i, i + spec.n_heads), _head_writes(w, l, zs.pop(l), x))

    def on_mlp(x, hook, l):
        i = spec.mlp_index(l)
        write(slice(i, i + 1), x[:, :, None])

    def on_reader(x, hook, slot: _Slot, weights: Tensor):
        d = buf["d"][:, :slot.prev]  # [C, prev, b, p, d]
        k = weights.shape[-1]
        corr = torch.bmm(weights.transpose(1, 2).to(d.dtype), d.reshape(C, slot.prev, -1))  # [C, k, b·p·d]
        corr = corr.reshape(C, k, b, d.shape[3], d.shape[4]).permute(0, 2, 3, 1, 4).reshape(C * b, d.shape[3], k, -1)
        return x - (corr[:, :, 0] if slot.flat else corr)

    hk = [(w.embed, on_embed)]
    for l in range(spec.n_layers):
        hk.append((w.z[l], lambda x, hook, l=l: on_z(x, hook, l)))
        if w.post[l] is not None:
            hk.append((w.post[l][0], lambda x, hook, l=l: on_raw(x, hook, l)))
        hk.append((w.mlp_out[l], lambda x, hook, l=l: on_mlp(x, hook, l)))
    for s in w.slots:
        weights = notin[:, :s.prev, list(s.cols)]
        if bool(weights.any()):
            hk.append((s.hook, lambda x, hook, s=s, wt=weights: on_reader(x, hook, s, wt)))
    return hooks.forward(model, tokens.repeat(C, 1), hooks=hk, extras=_tile(extras, C))


def _tile(extras: Mapping[str, Tensor], C: int) -> dict:
    return {k: v.repeat(C, *([1] * (v.ndim - 1))) if isinstance(v, Tensor) else v for k, v in (extras or {}).items()}


def _chunk(model, b: int, p: int, per_copy_floats: int, budget_mb: float = 1024, cap: int = 256) -> int:
    """Copies of a batch per forward under a memory budget."""
    bits = torch.finfo(model.cfg.dtype).bits if model.cfg.dtype.is_floating_point else 32
    per_copy = b * p * (per_copy_floats + model.cfg.d_vocab) * bits // 8
    return int(max(1, min(cap, budget_mb * 2**20 // max(per_copy, 1))))


# ==============================================================================================
# scores
# ==============================================================================================


@dataclass(frozen=True, repr=False)
class EdgeScores(Result):
    """One score per edge: ``values [edge]`` (mean over prompts), ``labels["edge"]`` the edge
    names (``"L0H1->L1H0<q>"``), ``per_prompt [prompt, edge]`` when kept.

    Sign: ``score ≈ metric(clean) − metric(clean run with this edge patched from the corrupted
    run)`` — positive = the edge helps the clean behaviour (see the module docstring).

    Extra attributes:
        clean_per_prompt, corrupted_per_prompt: ``[prompt]`` metric of the clean / corrupted run
            (their means are ``baselines["clean"]`` / ``baselines["corrupted"]``).
    """

    clean_per_prompt: Optional[Tensor] = None
    corrupted_per_prompt: Optional[Tensor] = None

    @property
    def spec(self) -> GraphSpec:
        return GraphSpec(**self.metadata["spec"])

    def matrix(self) -> Tensor:
        """``[n_forward, n_backward]`` writer × reader table of the scores (0 where no edge)."""
        spec = self.spec
        m = torch.zeros(spec.n_forward, spec.n_backward)
        m[spec.edge_src, spec.edge_dst] = self.values.float()
        return m

    def to_dataframe(self):
        """One row per edge: ``edge`` (index), ``edge_label``, ``src``, ``dst``, ``value``
        (and ``stderr`` with per-prompt scores)."""
        df = super().to_dataframe()
        split = [n.split("->") for n in self.labels["edge"]]
        df.insert(2, "src", [s for s, _ in split])
        df.insert(3, "dst", [d for _, d in split])
        return df

    def top(self, k: int = 10, *, by_abs: bool = True, largest: bool = True):
        """The ``k`` edges with the largest |score| (``by_abs=False``: largest signed score)."""
        return super().top(k, by_abs=by_abs, largest=largest)

    def graph(self, top_n: int, *, method: str = "greedy", absolute: bool = True, prune: bool = True) -> Graph:
        """Select a circuit of (at most) ``top_n`` edges, then prune.

        Args:
            top_n: edges to select before pruning (the result can have fewer).
            method: ``"greedy"`` (the paper's: grow from the logits backwards, always taking the
                best-scoring edge into a node already in the graph) or ``"topn"`` (the ``top_n``
                best edges anywhere).
            absolute: rank by |score| (the paper) or by signed score (only edges that help).
            prune: drop nodes not on an input → logits path, and their edges (the reference does).

        Returns:
            a :class:`Graph` carrying these scores.
        """
        return select(self.spec, self.values, top_n, method=method, absolute=absolute, prune=prune,
                      metadata=dict(scores_method=self.metadata.get("method")))

    def plot(self, ax=None, *, title: Optional[str] = None, cmap: str = "RdBu_r", **kw):
        """Heatmap of the writer × reader score table (a matplotlib figure)."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=kw.pop("figsize", (9, 5)))
        else:
            fig = ax.figure
        spec = self.spec
        m = self.matrix()
        lim = float(m.abs().max()) or 1.0
        masked = m.masked_fill(~spec.real_mask, float("nan"))
        im = ax.imshow(masked.numpy(), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest", **kw)
        ax.set_ylabel("writer")
        ax.set_xlabel("reader input")
        if spec.n_forward <= 60:
            ax.set_yticks(range(spec.n_forward), spec.forward_names, fontsize=7)
        if spec.n_backward <= 80:
            ax.set_xticks(range(spec.n_backward), spec.backward_names, rotation=90, fontsize=7)
        fig.colorbar(im, ax=ax, label="score (+ = helps clean)")
        ax.set_title(title or self.metadata.get("title") or "edge scores")
        fig.tight_layout()
        return fig


def select(spec: GraphSpec, scores: Tensor, top_n: int, *, method: str = "greedy", absolute: bool = True,
           prune: bool = True, metadata: Optional[Mapping[str, Any]] = None) -> Graph:
    """A :class:`Graph` of ``top_n`` edges chosen from ``scores [n_edges]`` (see
    :meth:`EdgeScores.graph`). Ties go to the edge listed first in ``spec.edge_names``."""
    spec = _as_spec(spec)
    scores = torch.as_tensor(scores).detach().float().flatten().cpu()
    if scores.shape != (spec.n_edges,):
        raise EdgeGraphError(f"scores has {scores.numel()} entries but the graph has {spec.n_edges} edges")
    if method not in SELECTIONS:
        raise EdgeGraphError(f"method={method!r}: choose 'greedy' (the paper's) or 'topn'")
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 0:
        raise EdgeGraphError(f"top_n={top_n!r}: give a number of edges >= 0")
    if torch.isnan(scores).any():
        raise EdgeGraphError("scores contain NaN: cannot rank edges")
    key = scores.abs() if absolute else scores
    n = min(top_n, spec.n_edges)
    mask = torch.zeros(spec.n_edges, dtype=torch.bool)
    if method == "topn":
        order = torch.argsort(-key, stable=True)
        mask[order[:n]] = True
    else:
        mask = _greedy(spec, key, n)
    g = Graph(spec, mask, scores=scores,
              metadata={**dict(metadata or {}), "selection": method, "top_n": top_n, "absolute": absolute})
    return g.prune() if prune else g


def _greedy(spec: GraphSpec, key: Tensor, n: int) -> Tensor:
    """The reference's ``apply_greedy``: grow backwards from the logits, always taking the best
    edge (by ``key``) whose reader node is already in the graph."""
    edges_into: dict[int, list[int]] = {}
    for e, k in enumerate(spec.edge_dst.tolist()):
        edges_into.setdefault(k, []).append(e)
    src = spec.edge_src.tolist()
    kv = key.tolist()
    heap: list[tuple[float, int]] = []
    pushed_slots: set[int] = set()
    in_graph: set[int] = {spec.n_forward}

    def push_node(node: int):
        for k in spec.node_slots[node]:
            if k in pushed_slots:
                continue
            pushed_slots.add(k)
            for e in edges_into.get(k, ()):
                heapq.heappush(heap, (-kv[e], e))

    push_node(spec.n_forward)
    mask = torch.zeros(spec.n_edges, dtype=torch.bool)
    taken = 0
    while heap and taken < n:
        _, e = heapq.heappop(heap)
        mask[e] = True
        taken += 1
        u = src[e]
        if u not in in_graph:
            in_graph.add(u)
            push_node(u)
    return mask


# ==============================================================================================
# edge_attribution
# ==============================================================================================


def _check_inputs(model, contrast, metric, verb: str) -> None:
    from mechlib.analyses.patching import _check_contrast

    _check_contrast(model, contrast)
    if not callable(metric):
        raise TypeError(f"{verb}: metric must be a function logits -> [batch] (e.g. mechlib.metrics.logit_diff("
                        f"contrast)), got {type(metric).__name__}")


def _metric_name(metric) -> str:
    return getattr(metric, "__name__", type(metric).__name__)


@records
def edge_attribution(
    model,
    contrast: ContrastSet,
    metric: Metric,
    *,
    method: str = "eap-ig",
    ig_steps: int = 5,
    batch_size: Optional[int] = None,
    per_prompt: Optional[bool] = None,
    edges: Optional[Sequence[str]] = None,
    progress: Optional[bool] = None,
) -> EdgeScores:
    """Score every edge of the model's graph (EAP / EAP-IG, Hanna et al. 2024).

    Each score estimates ``metric(clean) − metric(clean run with edge u→v patched from the
    corrupted run)``: positive = the edge helps the clean behaviour.

    Methods (all edges from one forward + backward per gradient point; ``Δ_u = a_u(clean) −
    a_u(corrupted)`` is the real activation difference of writer ``u`` in every method):

    * ``"eap-ig"`` (default; the paper's EAP-IG, the reference's "EAP-IG-inputs"): the input
      embedding (``blocks.0.hook_resid_pre``) is moved from corrupted to clean,
      ``e_α = e_corr + α (e_clean − e_corr)`` at ``α = k/m, k = 1..m`` (``m = ig_steps``; the
      clean end is included, the corrupted end is not: the paper-era code, spec §2), and the
      reader-input gradients are averaged over the ``m`` points.
    * ``"eap"`` (Syed et al.): the gradient at the clean run only.
    * ``"clean-corrupted"``: the average of the gradients at the clean and the corrupted run.
    * ``"eap-ig-activations"``: for each layer node in turn (input, attention layer ``l``, MLP
      ``l``) its output is set to ``α·clean + (1 − α)·corrupted`` (``α = k/m, k = 1..m``), the
      clean prompt runs and all readers' gradients are accumulated; divided by ``(2L+1)·m``
      runs (the reference's ``ig-activations``; as there, a node whose output is replaced
      passes no gradient on its own runs, so its inputs and the paths through it get 0 there).
    * ``"exact"``: the quantity itself, one edge patched at a time (``n_edges`` forwards, batched
      as stacked copies) — the ground truth, for small models.

    Args:
        contrast: clean/corrupted pairs (pair ``i`` must have the same length, as ContrastSet ensures).
        metric: differentiable ``logits -> [batch]``, higher = more like clean (e.g.
            ``metrics.logit_diff(contrast)``; not accuracy).
        ig_steps: gradient points for the IG methods (the paper uses 5).
        batch_size: prompts per forward/backward (default all); results do not depend on it.
        per_prompt: keep the ``[prompt, edge]`` scores (default: when that is ≤ 25M numbers).
        edges: with ``method="exact"``, patch only these edges (names as in ``labels["edge"]``); the
            others get NaN — exact patching of a sample, to check the estimates on a large model.

    Returns:
        :class:`EdgeScores` over ``("edge",)`` with ``baselines`` clean/corrupted and
        ``metadata`` method, ig_steps, the graph spec. Gradients are enabled inside (also under
        ``torch.set_grad_enabled(False)``); parameters get no ``.grad``; the split-q/k/v flag of
        the bridge is restored and no hook is left behind, also when the metric raises.

    Example:
        >>> ioi = mechlib.tasks.ioi(model, n=16)                                     # doctest: +SKIP
        >>> scores = edge_attribution(model, ioi, mechlib.metrics.logit_diff(ioi))
        >>> circuit = scores.graph(200)                       # greedy + pruning, as in the paper
        >>> faithfulness(model, ioi, mechlib.metrics.logit_diff(ioi), circuit).recovery
    """
    from mechlib.analyses.patching import _check_batch_size, _progress, gradients_available, prompt_batches

    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {', '.join(METHODS)} ('eap-ig' is the paper's)")
    if method != "exact":
        gradients_available(f"edge_attribution(method={method!r})")
        if edges is not None:
            raise ValueError("edges= restricts method='exact' (the gradient methods score every edge at once)")
    if not isinstance(ig_steps, int) or isinstance(ig_steps, bool) or ig_steps < 1:
        raise ValueError(f"ig_steps={ig_steps!r}: give a positive number of interpolation points (the paper uses 5)")
    _check_batch_size(batch_size)
    _check_inputs(model, contrast, metric, "edge_attribution")
    w = _wiring(model)
    spec = w.spec
    only = None if edges is None else [spec.edge_index(e) for e in edges]
    B = len(contrast)
    keep = per_prompt if per_prompt is not None else B * spec.n_edges <= 25_000_000
    n_batches = -(-B // (batch_size or B))
    runs = {"eap": 1, "clean-corrupted": 2, "eap-ig": ig_steps,
            "eap-ig-activations": (2 * spec.n_layers + 1) * ig_steps, "exact": 1}[method]
    parts, total = [], torch.zeros(spec.n_edges)
    clean_vals, corr_vals = torch.empty(B), torch.empty(B)
    with _split_qkv(model), peak_memory(model.cfg.device) as mem, \
            _progress(n_batches * runs, f"edge attribution ({method})", progress) as bar:
        _check_additive(model, w, contrast.clean_tokens[:1], _rows(contrast.forward_extras("clean"), [0]))
        for idx, sub, m in prompt_batches(contrast, metric, batch_size):
            if method == "exact":
                pp, cv, kv = _exact_batch(model, w, sub, m, only)
                bar.update(1)
            else:
                pp, cv, kv = _gradient_batch(model, w, sub, m, method, ig_steps, bar)
            clean_vals[idx], corr_vals[idx] = cv, kv
            total += pp.sum(0)
            if keep:
                parts.append(pp)
    alphas = [k / ig_steps for k in range(1, ig_steps + 1)] if method in ("eap-ig", "eap-ig-activations") else None
    return EdgeScores(
        values=total / B, axis_names=("edge",), labels={"edge": spec.edge_names},
        per_prompt=torch.cat(parts) if keep else None,
        baselines={"clean": float(clean_vals.mean()), "corrupted": float(corr_vals.mean())},
        clean_per_prompt=clean_vals, corrupted_per_prompt=corr_vals,
        metadata=dict(method=method, ig_steps=ig_steps if alphas else None, ig_alphas=alphas,
                      sign="noising: score ≈ metric(clean) − metric(edge patched from corrupted); + helps clean",
                      metric=_metric_name(metric), task=contrast.task, n_prompts=B, batch_size=batch_size,
                      spec=spec.to_dict(), family=w.family,
                      post_norm="per-head share, norm scale frozen per run" if w.post_norm else None,
                      peak_memory=mem, title=f"edge scores ({method})"),
    )


def _rows(extras: Mapping[str, Tensor], idx: Sequence[int]) -> dict:
    t = torch.as_tensor(list(idx))
    return {k: v[t] if isinstance(v, Tensor) else v for k, v in (extras or {}).items()}


def _grad_run(model, w: _Wiring, tokens: Tensor, extras, metric, embed: Tensor,
              replace: Optional[tuple[str, Tensor]] = None) -> tuple[Tensor, list[Tensor]]:
    """One forward + backward: per-prompt metric values and ``d metric / d reader input`` for every
    reader hook (``[b, p, k, d]``; zeros where the input does not reach the metric)."""
    leaf = embed.detach().clone().requires_grad_(True)
    seen: dict[str, Tensor] = {}

    def capture(x, hook, name):
        # a fresh view, so the gradient is the one through this reader only (the MLP's input hook
        # sees the same tensor the residual skip connection carries on)
        seen[name] = x.view_as(x)
        return seen[name]

    hk = [(w.embed, lambda x, hook: leaf)]
    if replace is not None:
        const = replace[1].detach()
        hk.append((replace[0], lambda x, hook: const.to(x.dtype)))
    hk += [(s.hook, lambda x, hook, n=s.hook: capture(x, hook, n)) for s in w.slots]
    name = _metric_name(metric)
    with torch.enable_grad():
        logits = hooks.forward(model, tokens, hooks=hk, extras=extras, grad=True)
        vals = check_metric_values(metric(logits), tokens.shape[0], name=name)
        if not vals.requires_grad:
            raise MetricError(f"the metric {name!r} is not differentiable w.r.t. the model's activations (it "
                              "detaches or thresholds the logits, like accuracy): use a smooth metric such as "
                              "metrics.logit_diff for edge attribution")
        acts = [seen[s.hook] for s in w.slots]
        grads = torch.autograd.grad(vals.sum(), acts, allow_unused=True)
    out = []
    for s, a, g in zip(w.slots, acts, grads):
        g = torch.zeros_like(a) if g is None else g
        out.append((g[:, :, None] if s.flat else g).detach())
    return vals.detach(), out


def _gradient_batch(model, w: _Wiring, contrast: ContrastSet, metric, method: str, ig_steps: int, bar):
    spec = w.spec
    ex_clean, ex_corr = contrast.forward_extras("clean"), contrast.forward_extras("corrupted")
    clean_logits, A_clean, c_cache = _record(model, w, contrast.clean_tokens, ex_clean, extra_names=w.attn_out)
    corr_logits, A_corr, k_cache = _record(model, w, contrast.corrupted_tokens, ex_corr, extra_names=w.attn_out)
    B, name = len(contrast), _metric_name(metric)
    clean_vals = check_metric_values(metric(clean_logits), B, name=name).detach().cpu()
    corr_vals = check_metric_values(metric(corr_logits), B, name=name).detach().cpu()
    del clean_logits, corr_logits
    clean_tok = contrast.clean_tokens
    G: Optional[list[Tensor]] = None

    def add(grads: list[Tensor], weight: float):
        nonlocal G
        if G is None:
            G = [g.float() * weight for g in grads]
        else:
            for acc, g in zip(G, grads):
                acc.add_(g.float(), alpha=weight)
        bar.update(1)

    e_clean, e_corr = A_clean[:, :, 0], A_corr[:, :, 0]
    alphas = [k / ig_steps for k in range(1, ig_steps + 1)]  # paper-era EAP-IG: clean end in, corrupted out
    if method == "eap":
        add(_grad_run(model, w, clean_tok, ex_clean, metric, e_clean)[1], 1.0)
    elif method == "clean-corrupted":
        add(_grad_run(model, w, clean_tok, ex_clean, metric, e_clean)[1], 0.5)
        add(_grad_run(model, w, contrast.corrupted_tokens, ex_corr, metric, e_corr)[1], 0.5)
    elif method == "eap-ig":
        for a in alphas:
            add(_grad_run(model, w, clean_tok, ex_clean, metric, e_corr + a * (e_clean - e_corr))[1], 1 / ig_steps)
    else:  # eap-ig-activations
        nodes = [(None, e_clean, e_corr)]
        for l in range(spec.n_layers):
            nodes.append((w.attn_out[l], c_cache[w.attn_out[l]], k_cache[w.attn_out[l]]))
            nodes.append((w.mlp_out[l], c_cache[w.mlp_out[l]], k_cache[w.mlp_out[l]]))
        wt = 1 / (len(nodes) * ig_steps)
        for hook_name, c, k in nodes:
            for a in alphas:
                mix = k + a * (c - k)
                if hook_name is None:
                    add(_grad_run(model, w, clean_tok, ex_clean, metric, mix)[1], wt)
                else:
                    add(_grad_run(model, w, clean_tok, ex_clean, metric, e_clean, (hook_name, mix))[1], wt)
    # mechlib sign: Δ = clean − corrupted, as [b, writer, pos·d] so each reader group is one bmm
    delta = (A_clean - A_corr).float().permute(0, 2, 1, 3).reshape(B, spec.n_forward, -1)
    S = torch.zeros(B, spec.n_forward, spec.n_backward, device=delta.device)
    for s, g in zip(w.slots, G):
        # every edge into these reader slots at once: Σ_pos,d Δ_u · ∂metric/∂input_v  ([b, prev, k])
        g = g.permute(0, 2, 1, 3).reshape(B, g.shape[2], -1)
        S[:, :s.prev, s.cols[0]:s.cols[-1] + 1] = torch.bmm(delta[:, :s.prev], g.transpose(1, 2))
    per_prompt = S[:, spec.edge_src.to(S.device), spec.edge_dst.to(S.device)].cpu()
    return per_prompt, clean_vals, corr_vals


def _exact_batch(model, w: _Wiring, contrast: ContrastSet, metric, only: Optional[Sequence[int]] = None):
    """``metric(clean) − metric(clean with one edge ablated to its corrupted value)`` per edge (the
    edges ``only``, when given; NaN elsewhere)."""
    spec = w.spec
    ex_clean = contrast.forward_extras("clean")
    clean_logits, _, _ = _record(model, w, contrast.clean_tokens, ex_clean)
    corr_logits, A_corr, _ = _record(model, w, contrast.corrupted_tokens, contrast.forward_extras("corrupted"))
    B, name = len(contrast), _metric_name(metric)
    clean_vals = check_metric_values(metric(clean_logits), B, name=name).detach().cpu()
    corr_vals = check_metric_values(metric(corr_logits), B, name=name).detach().cpu()
    chunk = _chunk(model, B, contrast.n_pos, spec.n_forward * model.cfg.d_model * 2)
    out = torch.full((B, spec.n_edges), float("nan"))
    src, dst = spec.edge_src, spec.edge_dst
    todo = list(range(spec.n_edges)) if only is None else list(only)
    for e0 in range(0, len(todo), chunk):
        es = todo[e0:e0 + chunk]
        notin = torch.zeros(len(es), spec.n_forward, spec.n_backward, dtype=torch.bool)
        notin[torch.arange(len(es)), src[es], dst[es]] = True
        logits = _masked_logits(model, w, contrast.clean_tokens, ex_clean, A_corr, notin)
        vals = check_metric_values(metric(logits), len(es) * B, name=name).detach().cpu()
        out[:, es] = clean_vals[:, None] - vals.reshape(len(es), B).T
    return out, clean_vals, corr_vals


# ==============================================================================================
# faithfulness
# ==============================================================================================


def _bca(circuit: Tensor, clean: Tensor, ablated: Tensor, level: float, seed: int,
         n_boot: int = 2000) -> tuple[tuple[float, float], str]:
    """BCa bootstrap interval of the recovery ``(mean circuit − mean ablated) / (mean clean − mean
    ablated)``, resampling prompts (the three values of a prompt stay together)."""
    import numpy as np
    from scipy.stats import bootstrap

    n = len(circuit)
    if n < 3:
        return (float("nan"), float("nan")), "none (fewer than 3 prompts)"
    data = tuple(x.double().numpy() for x in (circuit, clean, ablated))

    def ratio(c, k, a, axis=-1):
        return (c.mean(axis) - a.mean(axis)) / (k.mean(axis) - a.mean(axis))

    point = float(ratio(*data))
    if all(np.allclose(d, d[0]) for d in data) or np.allclose(data[0], data[1]) or np.allclose(data[0], data[2]):
        return (point, point), "exact (no spread over prompts)"
    for how in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bootstrap(data, ratio, paired=True, vectorized=True, method=how, n_resamples=n_boot,
                            confidence_level=level, random_state=seed)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return (lo, hi), f"{how} bootstrap of the ratio of prompt means (scipy, {n_boot} resamples)"
    return (float("nan"), float("nan")), "bootstrap failed (degenerate resamples)"


@dataclass(frozen=True, repr=False)
class FaithfulnessResult(Result):
    """How much of the clean behaviour a circuit keeps when everything outside it is ablated.

    ``values = [recovery, circuit, clean, ablated]`` (axis ``"measure"``): recovery is the ratio of
    prompt means ``(circuit − ablated) / (clean − ablated)`` (1 = the circuit does everything the
    model does, 0 = no better than ablating everything); the others are mean metric values.
    ``per_prompt [prompt, 4]`` holds each prompt's own ratio (unstable where clean ≈ ablated; not
    what ``recovery`` averages) and its three metric values. ``interval`` is a BCa bootstrap CI of
    the recovery over prompts (``metadata["ci_method"]``).
    """

    interval: tuple = (float("nan"), float("nan"))

    @property
    def recovery(self) -> float:
        return float(self.values[0])

    @property
    def circuit(self) -> float:
        return float(self.values[1])

    def ci(self, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[Tensor, Tensor]:
        """``(low, high)`` like ``values``: the recovery's BCa interval of the ratio of prompt
        means (prompts resampled, as :attr:`interval`), percentile intervals of the three means."""
        lo, hi = super().ci(level, n_boot, seed)
        (lo[0], hi[0]), _ = _bca(self.per_prompt[:, 1], self.per_prompt[:, 2], self.per_prompt[:, 3], level, seed,
                                 n_boot)
        return lo, hi

    def summary(self) -> str:
        lo, hi = self.interval
        m = self.metadata
        return (f"FaithfulnessResult(recovery {self.recovery:.3f} [{lo:.3f}, {hi:.3f}] with {m.get('size')} "
                f"{m.get('units')}, {m.get('ablation')} ablation, {self.n_prompts} prompts)")


def _ablation_sources(model, w: _Wiring, contrast: ContrastSet, ablation: str, batch_size, seed: int,
                      z_only: bool = False):
    """A function ``idx -> [b, p, F, d] writers`` (or per-layer ``hook_z``) of the ablated run."""
    B = len(contrast)
    if ablation == "resample":
        if B < 2:
            raise ValueError("ablation='resample' takes another prompt's activation: give at least 2 prompts")
        if not contrast.same_length:
            warnings.warn("ablation='resample' with prompts of different lengths: a prompt receives another "
                          "prompt's activations position by position, padding included", stacklevel=3)
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(B, generator=g)
        perm = torch.empty(B, dtype=torch.long)
        perm[order] = order.roll(-1)  # a random cycle: no prompt keeps its own activations
    mean = None
    if ablation == "mean":  # per-position mean over the corrupted prompts that are real there
        from mechlib.analyses.patching import _check_batch_size

        _check_batch_size(batch_size)
        tot, cnt = None, torch.zeros(contrast.n_pos)
        size = batch_size or B
        for s in range(0, B, size):
            idx = list(range(s, min(s + size, B)))
            toks = contrast.corrupted_tokens[idx]
            ex = _rows(contrast.forward_extras("corrupted"), idx)
            a = _z_record(model, w, toks, ex) if z_only else _record(model, w, toks, ex)[1]
            msk = (torch.arange(contrast.n_pos)[None, :] < contrast.lengths[idx][:, None]).to(a.device)
            part = (a * msk.reshape(*msk.shape, *([1] * (a.ndim - 2))).to(a.dtype)).sum(0)
            tot = part if tot is None else tot + part
            cnt += msk.sum(0).cpu()
        mean = tot / cnt.clamp(min=1).to(tot.device).reshape(-1, *([1] * (tot.ndim - 1)))

    def get(idx: Sequence[int], sub: ContrastSet) -> Tensor:
        if ablation == "corrupted":
            toks, ex = sub.corrupted_tokens, sub.forward_extras("corrupted")
        elif ablation == "resample":
            src = perm[list(idx)].tolist()
            toks, ex = contrast.clean_tokens[src], _rows(contrast.forward_extras("clean"), src)
        elif ablation == "mean":
            return mean[None].expand(len(idx), *mean.shape)
        else:
            return None  # zero: built by the caller with the right shape
        return _z_record(model, w, toks, ex) if z_only else _record(model, w, toks, ex)[1]

    return get


def _z_record(model, w: _Wiring, tokens: Tensor, extras) -> Tensor:
    """``hook_z`` of every layer, stacked: ``[b, p, L, H, d_head]``."""
    _, cache = hooks.run_with_cache(model, tokens, w.z, extras=extras)
    return torch.stack([cache[n] for n in w.z], 2)


def _circuit_masks(w: _Wiring, circuits: Sequence) -> tuple[Tensor, str, list[int]]:
    """Stacked ablation masks for Graphs (``[C, F, Bk]`` edges not in the circuit) or head
    Circuits (``[C, L, H]`` heads not in it); plus the unit kind and each circuit's size."""
    from mechlib.analyses.circuits import Circuit

    spec = w.spec
    if all(isinstance(c, Graph) for c in circuits):
        for c in circuits:
            if c.spec != spec:
                raise EdgeGraphError(f"the graph was built for {c.spec!r} but this model is {spec!r}: select it from "
                                     "this model's edge_attribution scores")
        return torch.stack([spec.real_mask & ~c.matrix() for c in circuits]), "edges", [len(c) for c in circuits]
    if all(isinstance(c, Circuit) for c in circuits):
        masks = []
        for c in circuits:
            if (c.n_layers, c.n_heads) != (spec.n_layers, spec.n_heads):
                raise EdgeGraphError(f"the circuit has {c.n_layers}x{c.n_heads} heads but this model "
                                     f"{spec.n_layers}x{spec.n_heads}: it was found on another model")
            m = torch.ones(spec.n_layers, spec.n_heads, dtype=torch.bool)
            for l, h in c.heads:
                m[l, h] = False
            masks.append(m)
        return torch.stack(masks), "heads", [len(c) for c in circuits]
    raise TypeError("circuit must be an edge Graph (EdgeScores.graph) or a head Circuit (find_circuit), got "
                    + ", ".join(type(c).__name__ for c in circuits))


def _head_ablated_logits(model, w: _Wiring, tokens: Tensor, extras, z_abl: Optional[Tensor], masks: Tensor) -> Tensor:
    """Logits of ``C`` stacked copies; copy ``c`` replaces heads ``masks[c]`` at ``hook_z`` by ``z_abl``."""
    C, b = masks.shape[0], tokens.shape[0]

    def patch(x, hook, l):
        m = masks[:, l].to(x.device)  # [C, H]
        if not bool(m.any()):
            return None
        xs = x.reshape(C, b, *x.shape[1:])
        src = torch.zeros_like(xs[0]) if z_abl is None else z_abl[:, :, l].to(x.device, x.dtype)
        return torch.where(m[:, None, None, :, None], src[None], xs).reshape(x.shape)

    hk = [(w.z[l], lambda x, hook, l=l: patch(x, hook, l)) for l in range(w.spec.n_layers) if bool(masks[:, l].any())]
    return hooks.forward(model, tokens.repeat(C, 1), hooks=hk, extras=_tile(extras, C))


def _evaluate(model, contrast: ContrastSet, metric, circuits: Sequence, *, ablation: str, batch_size, seed: int,
              progress=None, desc: str = "faithfulness"):
    """Per-prompt metric of each circuit ``[C, prompt]``, and clean / ablated / corrupted ``[prompt]``."""
    from mechlib.analyses.patching import _progress, prompt_batches

    if ablation not in ABLATIONS:
        raise ValueError(f"ablation={ablation!r}: choose one of {', '.join(ABLATIONS)}")
    _check_inputs(model, contrast, metric, desc)
    w = _wiring(model)
    masks, units, sizes = _circuit_masks(w, circuits)
    C, B = len(circuits), len(contrast)
    heads = units == "heads"
    empty = torch.ones_like(masks[:1]) if heads else w.spec.real_mask[None]  # every unit ablated
    full_masks = torch.cat([masks, empty])
    values = torch.empty(C + 1, B)
    clean_vals, corr_vals = torch.empty(B), torch.empty(B)
    name = _metric_name(metric)
    with torch.no_grad(), _split_qkv(model), peak_memory(model.cfg.device) as mem:
        if not heads:
            _check_additive(model, w, contrast.clean_tokens[:1], _rows(contrast.forward_extras("clean"), [0]))
        sources = _ablation_sources(model, w, contrast, ablation, batch_size, seed, z_only=heads)
        n_batches = -(-B // (batch_size or B))
        with _progress(n_batches, desc, progress) as bar:
            for idx, sub, m in prompt_batches(contrast, metric, batch_size):
                ex = sub.forward_extras("clean")
                b = len(sub)
                clean_vals[idx] = check_metric_values(
                    m(hooks.forward(model, sub.clean_tokens, extras=ex)), b, name=name).cpu()
                corr_vals[idx] = check_metric_values(
                    m(hooks.forward(model, sub.corrupted_tokens, extras=sub.forward_extras("corrupted"))),
                    b, name=name).cpu()
                abl = sources(idx, sub)
                chunk = _chunk(model, b, sub.n_pos, 0 if heads else _per_copy_floats(w))
                for c0 in range(0, C + 1, chunk):
                    part = full_masks[c0:c0 + chunk]
                    if heads:
                        logits = _head_ablated_logits(model, w, sub.clean_tokens, ex, abl, part)
                    else:
                        if abl is None:
                            abl = torch.zeros(b, sub.n_pos, w.spec.n_forward, model.cfg.d_model,
                                              dtype=model.cfg.dtype, device=model.cfg.device)
                        logits = _masked_logits(model, w, sub.clean_tokens, ex, abl, part)
                    vals = check_metric_values(m(logits), len(part) * b, name=name).cpu()
                    values[c0:c0 + len(part), idx] = vals.reshape(len(part), b)
                bar.update(1)
    return dict(circuit=values[:C], ablated=values[C], clean=clean_vals, corrupted=corr_vals, units=units,
                sizes=sizes, peak_memory=mem, metric=name)


def _per_copy_floats(w: _Wiring) -> int:
    return 2 * w.spec.n_forward * int(w.W_O[0].shape[-1])


def _recovery(circuit: Tensor, clean: Tensor, ablated: Tensor) -> float:
    gap = float(clean.mean() - ablated.mean())
    if abs(gap) < 1e-8:
        raise MetricError("the clean run and the fully ablated run have the same mean metric: recovery is "
                          "undefined (is the contrast set's corruption changing the behaviour? check "
                          "metrics.evaluate on both sides)")
    return float(circuit.mean() - ablated.mean()) / gap


@records
def faithfulness(
    model,
    contrast: ContrastSet,
    metric: Metric,
    circuit,
    *,
    ablation: str = "corrupted",
    batch_size: Optional[int] = None,
    seed: int = 0,
    level: float = 0.95,
) -> FaithfulnessResult:
    """Run the model with everything outside ``circuit`` ablated; how much of the clean metric is left?

    * an edge :class:`Graph`: every edge *not* in the graph is ablated — each reader input is
      rebuilt as ``input − Σ_{u→v not in graph} (a_u(this run) − a_u(ablated))`` through the
      split q/k/v inputs, MLP inputs and the final residual, so circuit edges carry the circuit
      run's own activations (which reflect upstream ablations), as in the reference's
      ``evaluate_graph``. The graph is evaluated as given (graphs from
      :meth:`EdgeScores.graph` are already pruned).
    * a head :class:`~mechlib.analyses.circuits.Circuit`: every head outside it is replaced at
      its output ``hook_z``; MLPs and the embedding are left alone.

    Ablations: ``"corrupted"`` (the same prompt's corrupted run: the paper's patching),
    ``"mean"`` (per position, the mean over the contrast set's corrupted prompts that have a real
    token there), ``"zero"`` and ``"resample"`` (another prompt's clean activation, a seeded
    random cycle over the prompts). For edges, the input node's write is the token + position
    embedding, so ``"zero"``/``"mean"`` ablate positions too.

    Returns:
        :class:`FaithfulnessResult`: ``recovery = (circuit − ablated) / (clean − ablated)`` over
        prompt means, where *ablated* is the run with every unit ablated (the empty circuit: with
        ``"corrupted"`` and edges, exactly the corrupted run), per-prompt values and a BCa
        bootstrap ``interval`` (``level``); ``baselines`` clean, ablated and corrupted.

    Example:
        >>> r = faithfulness(model, ioi, metrics.logit_diff(ioi), scores.graph(300))   # doctest: +SKIP
        >>> r.recovery, r.interval
    """
    ev = _evaluate(model, contrast, metric, [circuit], ablation=ablation, batch_size=batch_size, seed=seed)
    circ, clean, abl = ev["circuit"][0], ev["clean"], ev["ablated"]
    rec = _recovery(circ, clean, abl)
    interval, how = _bca(circ, clean, abl, level, seed)
    with torch.no_grad():
        per = (circ - abl) / (clean - abl)
    return FaithfulnessResult(
        values=torch.tensor([rec, float(circ.mean()), float(clean.mean()), float(abl.mean())]),
        axis_names=("measure",), labels={"measure": ["recovery", "circuit", "clean", "ablated"]},
        per_prompt=torch.stack([per, circ, clean, abl], 1),
        baselines={"clean": float(clean.mean()), "ablated": float(abl.mean()), "corrupted": float(ev["corrupted"].mean())},
        interval=interval,
        metadata=dict(ablation=ablation, units=ev["units"], size=ev["sizes"][0], ci_method=how, level=level,
                      metric=ev["metric"], task=contrast.task, n_prompts=len(contrast), batch_size=batch_size,
                      seed=seed, peak_memory=ev["peak_memory"], title=f"faithfulness ({ablation} ablation)"),
    )


@dataclass(frozen=True, repr=False)
class FaithfulnessCurve(Result):
    """Faithfulness against circuit size: ``values [size]`` recovery (ratio of prompt means) of
    the circuit selected with ``top_n = size`` edges; ``n_edges`` the edges left after pruning;
    ``low``/``high`` the BCa interval per size; ``circuit_per_prompt [prompt, size]`` and the
    clean / ablated per-prompt metric."""

    n_edges: Optional[Tensor] = None
    low: Optional[Tensor] = None
    high: Optional[Tensor] = None
    circuit_per_prompt: Optional[Tensor] = None
    clean_per_prompt: Optional[Tensor] = None
    ablated_per_prompt: Optional[Tensor] = None

    def plot(self, ax=None, *, title: Optional[str] = None, log: bool = True, **kw):
        """Recovery against the number of edges left (after pruning), with the interval band."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=kw.pop("figsize", (6.5, 4)))
        else:
            fig = ax.figure
        x = self.n_edges.float().numpy()
        y = self.values.float().numpy()
        label = kw.pop("label", self.metadata.get("scores_method") or "circuit")
        ax.plot(x, y, marker="o", label=label, **kw)
        if self.low is not None and not torch.isnan(self.low).all():
            ax.fill_between(x, self.low.numpy(), self.high.numpy(), alpha=0.2)
        ax.axhline(1.0, color="#888", lw=0.8, ls="--")
        ax.axhline(0.0, color="#888", lw=0.8, ls=":")
        if log and (x > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel("edges in the circuit (after pruning)")
        ax.set_ylabel("normalized faithfulness")
        ax.set_title(title or self.metadata.get("title") or "faithfulness")
        ax.legend()
        fig.tight_layout()
        return fig


@records
def faithfulness_curve(
    model,
    contrast: ContrastSet,
    metric: Metric,
    scores: EdgeScores,
    sizes: Sequence[int] = (10, 20, 50, 100, 200, 500, 1000),
    *,
    selection: str = "greedy",
    absolute: bool = True,
    ablation: str = "corrupted",
    batch_size: Optional[int] = None,
    seed: int = 0,
    level: float = 0.95,
    progress: Optional[bool] = None,
) -> FaithfulnessCurve:
    """Faithfulness of the circuits selected from ``scores`` at each requested size (the paper's
    Figure 3): one forward per batch evaluates several sizes at once as stacked copies.

    Args:
        scores: :func:`edge_attribution` scores of this model.
        sizes: requested ``top_n`` per circuit (sizes above the number of edges are clipped).
        selection, absolute: see :meth:`EdgeScores.graph`.
        ablation, batch_size, seed, level: see :func:`faithfulness`.

    Returns:
        :class:`FaithfulnessCurve` (``.plot()`` gives recovery vs edges left after pruning).
    """
    if not isinstance(scores, EdgeScores):
        raise TypeError(f"scores must be EdgeScores from edge_attribution, got {type(scores).__name__}")
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 0 for s in sizes):
        raise ValueError(f"sizes={sizes!r}: give one or more edge counts >= 0")
    graphs = [scores.graph(min(s, scores.spec.n_edges), method=selection, absolute=absolute) for s in sizes]
    ev = _evaluate(model, contrast, metric, graphs, ablation=ablation, batch_size=batch_size, seed=seed,
                   progress=progress, desc="faithfulness curve")
    clean, abl = ev["clean"], ev["ablated"]
    recs, lows, highs = [], [], []
    for c in ev["circuit"]:
        recs.append(_recovery(c, clean, abl))
        (lo, hi), how = _bca(c, clean, abl, level, seed)
        lows.append(lo)
        highs.append(hi)
    return FaithfulnessCurve(
        values=torch.tensor(recs), axis_names=("size",), labels={"size": [str(s) for s in sizes]},
        baselines={"clean": float(clean.mean()), "ablated": float(abl.mean()), "corrupted": float(ev["corrupted"].mean())},
        n_edges=torch.tensor([len(g) for g in graphs]), low=torch.tensor(lows), high=torch.tensor(highs),
        circuit_per_prompt=ev["circuit"].T.contiguous(), clean_per_prompt=clean, ablated_per_prompt=abl,
        metadata=dict(ablation=ablation, selection=selection, absolute=absolute, sizes=sizes,
                      scores_method=scores.metadata.get("method"), metric=ev["metric"], task=contrast.task,
                      n_prompts=len(contrast), level=level, batch_size=batch_size, seed=seed,
                      peak_memory=ev["peak_memory"], title=f"faithfulness vs size ({scores.metadata.get('method')})"),
    )


__all__ = ["GraphSpec", "Graph", "EdgeScores", "FaithfulnessResult", "FaithfulnessCurve", "EdgeGraphError",
           "edge_attribution", "faithfulness", "faithfulness_curve", "select", "METHODS", "ABLATIONS"]
