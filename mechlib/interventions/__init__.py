"""Interventions the papers propose, as context managers that restore the model on exit.

* :func:`ablate_massive` — Sun et al.: set massive activations (given dims at given positions) to
  zero or to their mean, in the residual stream.
* :func:`calibrate_attention` — ACT (Yu et al. 2024): in chosen heads, scale down the attention
  on non-initial sink tokens (found per input: α_k > ε) and give the removed mass to the other
  tokens, proportionally to their attention.
* :func:`scale_heads` — VHR (vision-aware head reinforcement) and head ablation: multiply chosen
  heads' outputs (``hook_z``) by a factor.
* :func:`steer_attention` — the circuit-repair intervention of Merullo et al. (2024): make chosen
  heads attend, at the answer position, to given tokens (e.g. the wrong colour options, as IOI's
  S-inhibition heads attend to the repeated name).
* :func:`steer_residual` — VISTA's steering vector (activation addition in the residual stream).
* :func:`redistribute_attention` — VAR (Kang et al. 2025): in chosen heads, move a share ``p`` of
  the attention on sink tokens to the non-sink tokens of a span (the image; a context passage in
  the text analogue), proportionally to their attention.
* :func:`position_invariant` — PINE (Wang et al. 2024): bidirectional attention between segments
  (options, documents) and each segment's position set by attention importance, not input order.

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
