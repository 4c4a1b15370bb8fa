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

from mechlib.analyses.edges.faithfulness import (
    ABLATIONS,
    FaithfulnessCurve,
    FaithfulnessResult,
    faithfulness,
    faithfulness_curve,
)
from mechlib.analyses.edges.graph import SELECTIONS, EdgeGraphError, Graph, GraphSpec, select
from mechlib.analyses.edges.scoring import METHODS, EdgeScores, edge_attribution

__all__ = ["GraphSpec", "Graph", "EdgeScores", "FaithfulnessResult", "FaithfulnessCurve", "EdgeGraphError",
           "edge_attribution", "faithfulness", "faithfulness_curve", "select", "METHODS", "ABLATIONS", "SELECTIONS"]
