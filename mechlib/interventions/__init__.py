"""Interventions the papers propose, as context managers that restore the model on exit.

The papers' methods:

* :func:`ablate_massive` — Sun et al. 2024: set the massive activations (given dims, at the first
  token and each input's largest-activation position, in one layer's output) to zero or to their
  per-position mean.
* :func:`calibrate_attention` — ACT (Yu et al. 2024): in chosen heads, scale down the attention
  on non-initial sink tokens (found per input: α_k > ε) and give the removed mass to the other
  tokens, proportionally to their attention (heads from :func:`mechlib.act_head_search`).
* :func:`vhr` — VHR (He et al. 2025, Algorithm 1): per input and per layer (layer 1 and the last
  14 of 32), choose the vision-aware heads by VHD and reinforce them (α = 2), layer by layer, in
  one forward.
* :func:`steering_vectors` + :func:`vista` — VISTA (Li et al. 2025): per-input visual steering
  vectors (each layer's output with − without the image), injected norm-preserving into the
  residual stream (the paper) or into the MLP output (the released code); its logit mix (SLA) is
  :func:`mechlib.self_logits_augmentation`.
* :func:`var` — VAR (Kang et al. 2025): in every layer and forward, find the sink tokens (the
  RMS-normalised sink dimensions above τ) and the image-centric (head, query) rows, and move a
  share of their attention on sinks to the non-sink image tokens.
* :func:`steer_attention` — the circuit-repair intervention of Merullo et al. (2024): make chosen
  heads attend, at the answer position, to given tokens (e.g. the wrong colour options, as IOI's
  S-inhibition heads attend to the repeated name).
* :func:`position_invariant` — PINE (Wang et al. 2024): bidirectional attention between segments
  (options, documents) and each segment's position set by attention importance, not input order.
* :func:`ablate_sink_values` — Gu et al. 2024's test of "a sink is a key bias": zero the sink
  tokens' value vectors, keep the attention.

Static ablations — useful controls, not the papers' methods (a reader looking for the method
wants the entry above):

* :func:`scale_heads` — multiply fixed heads' outputs (``hook_z``) by a fixed factor: VHR's
  "fixed heads" ablation, and head ablation (factor 0). The paper's VHR is :func:`vhr`.
* :func:`steer_residual` — add one fixed vector to the residual stream (plain activation
  addition, not normalised): neither of VISTA's edits, which are :func:`vista`'s.
* :func:`redistribute_attention` — VAR's redistribution with fixed heads and fixed sink positions.
  The paper's VAR is :func:`var`.

Attention edits go through ``hook_pattern``, which only changes the output on bridges that
re-implement attention (Llama/GPT-2-style ``PositionEmbeddingsAttentionBridge`` /
``JointQKVAttentionBridge``); on HF-delegating bridges the edit would be silently dropped, so
these raise :class:`UnsupportedBridgeError` instead.
"""


from mechlib.interventions._common import UnsupportedBridgeError, _check_pattern_editable, _heads_by_layer  # noqa: F401
from mechlib.interventions.attention import (
                                             ablate_sink_values,
                                             act_calibrate,
                                             act_sinks,
                                             calibrate_attention,
                                             redistribute_attention,
                                             rms_sink_scores,
                                             steer_attention,
                                             var,
)
from mechlib.interventions.heads import VHRSelection, reinforce_heads, scale_heads, vhr, vhr_layers
from mechlib.interventions.position import _order_shift, _rope_scores, position_invariant, rope_frequencies  # noqa: F401
from mechlib.interventions.residual import (
                                             SteeringVectors,
                                             ablate_massive,
                                             massive_positions,
                                             steer_residual,
                                             steering_vectors,
                                             vista,
)

__all__ = ["UnsupportedBridgeError", "calibrate_attention", "redistribute_attention", "steer_attention",
           "ablate_sink_values", "scale_heads", "position_invariant", "ablate_massive", "steer_residual",
           "act_sinks", "act_calibrate", "rope_frequencies", "massive_positions", "vhr", "vhr_layers", "VHRSelection",
           "reinforce_heads", "vista", "steering_vectors", "SteeringVectors", "var", "rms_sink_scores"]
