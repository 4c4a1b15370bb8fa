"""The edge graph of one model shape (:class:`GraphSpec`), edge circuits (:class:`Graph`: a set of
its edges, pruned, saved, compared) and their selection from scores (:func:`select`: the paper's
greedy growth from the logits, or plain top-n).

Bookkeeping over names and index tables only: nothing here runs a model.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib.results import atomic_write_bytes

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
