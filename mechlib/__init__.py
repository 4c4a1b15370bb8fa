"""mechlib: mechanistic interpretability of attention on TransformerLens 4.3 hook points.

Importing mechlib has no side effects: no network, no plotting backend, no global torch state.

    >>> import mechlib
    >>> model = mechlib.load_model()                      # SmolLM2-135M-Instruct, offline
    >>> ioi = mechlib.tasks.ioi(model, n=16)
    >>> mechlib.metrics.logit_diff(ioi)(model(ioi.clean_tokens)).mean()

The flat surface below is re-exported from where each name lives. To add a name: add its import
line (``ruff check --fix`` keeps the block sorted, and the comments travel with their lines) and
the name to the matching group of ``__all__``.
"""

# modules used as namespaces: mechlib.metrics.logit_diff, mechlib.tasks.ioi, mechlib.evals.chair, mechlib.viz...
from mechlib import arch, evals, hooks, interventions, layout, metrics, sites, stats, tasks, viz

# analyses: one verb per module (mechlib/analyses/), each returning a typed result
from mechlib.analyses.attribution import DLAResult, HeadScores, direct_logit_attribution, head_divergence
from mechlib.analyses.circuits import Circuit, find_circuit
from mechlib.analyses.controls import compare_with_random, random_head_sets
from mechlib.analyses.edges import (
    EdgeScores,
    FaithfulnessResult,
    Graph,
    edge_attribution,
    faithfulness,
    faithfulness_curve,
)
from mechlib.analyses.lens import ComponentTokens, LensResult, component_tokens, logit_lens, self_logits_augmentation
from mechlib.analyses.overlap import OverlapResult, circuit_overlap
from mechlib.analyses.patching import PatchingResult, activation_patching, attribution_patching, path_patching
from mechlib.analyses.position import PositionBias, position_bias, segment_attention
from mechlib.analyses.probes import PCAResult, ProbeResult, pca, probe
from mechlib.analyses.sinks import act_head_search, attention_sinks, massive_activations, massive_means, sink_dimensions

# interventions: context managers that edit a forward and restore the model on exit
from mechlib.interventions import (
    ablate_massive,
    ablate_sink_values,
    calibrate_attention,
    position_invariant,
    redistribute_attention,
    scale_heads,
    steer_attention,
    steer_residual,
    steering_vectors,
    var,
    vhr,
    vista,
)

# models, inputs and results
from mechlib.models import (
    Generations,
    ModelLoadError,
    ModelNotAvailableOffline,
    generate,
    load_model,
    tiny_model,
    vlm_batch,
    vlm_inputs,
)
from mechlib.results import Result
from mechlib.sites import SITES, Site
from mechlib.tasks import ContrastSet, ContrastSetError
from mechlib.tasks.contrast import PromptBatch

__version__ = "0.1.0"

__all__ = [
    # modules
    "arch", "evals", "hooks", "interventions", "layout", "metrics", "sites", "stats", "tasks", "viz",
    # models, inputs and results
    "load_model", "tiny_model", "generate", "Generations", "vlm_inputs", "vlm_batch", "ModelLoadError", "ModelNotAvailableOffline",
    "ContrastSet", "ContrastSetError", "PromptBatch", "Site", "SITES", "Result",
    # analyses
    "activation_patching", "attribution_patching", "path_patching", "PatchingResult",
    "attention_sinks", "massive_activations", "massive_means", "sink_dimensions", "act_head_search",
    "find_circuit", "Circuit", "circuit_overlap", "OverlapResult",
    "head_divergence", "direct_logit_attribution", "HeadScores", "DLAResult",
    "logit_lens", "component_tokens", "self_logits_augmentation", "LensResult", "ComponentTokens",
    "position_bias", "segment_attention", "PositionBias",
    "probe", "pca", "ProbeResult", "PCAResult", "random_head_sets", "compare_with_random",
    "edge_attribution", "faithfulness", "faithfulness_curve", "EdgeScores", "FaithfulnessResult", "Graph",
    # interventions
    "ablate_massive", "ablate_sink_values", "calibrate_attention", "redistribute_attention", "scale_heads",
    "steer_attention", "steer_residual", "position_invariant", "var", "vhr", "vista", "steering_vectors",
]
