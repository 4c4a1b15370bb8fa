"""mechlib: mechanistic interpretability of attention on TransformerLens 4.3 hook points.

Importing mechlib has no side effects: no network, no plotting backend, no global torch state.

    >>> import mechlib
    >>> model = mechlib.load_model()                      # SmolLM2-135M-Instruct, offline
    >>> ioi = mechlib.tasks.ioi(model, n=16)
    >>> mechlib.metrics.logit_diff(ioi)(model(ioi.clean_tokens)).mean()
"""

from mechlib import arch, hooks, metrics, sites, tasks, viz
from mechlib.models import ModelLoadError, ModelNotAvailableOffline, generate, load_model, tiny_model, vlm_inputs
from mechlib.results import Result
from mechlib.sites import SITES, Site
from mechlib.tasks import ContrastSet, ContrastSetError

__version__ = "0.1.0"

__all__ = [
    "load_model", "tiny_model", "generate", "vlm_inputs", "ModelLoadError", "ModelNotAvailableOffline",
    "ContrastSet", "ContrastSetError", "Site", "SITES", "Result",
    "arch", "hooks", "metrics", "sites", "tasks", "viz",
]

from mechlib.analyses.patching import PatchingResult, activation_patching, attribution_patching, path_patching  # noqa: E402

__all__ += ["activation_patching", "attribution_patching", "path_patching", "PatchingResult"]

from mechlib import interventions  # noqa: E402
from mechlib.analyses.sinks import act_head_search, attention_sinks, massive_activations, massive_means, sink_dimensions  # noqa: E402
from mechlib.interventions import ablate_massive, ablate_sink_values, calibrate_attention, redistribute_attention  # noqa: E402
from mechlib.tasks.contrast import PromptBatch  # noqa: E402

__all__ += ["attention_sinks", "massive_activations", "massive_means", "sink_dimensions", "act_head_search", "interventions",
            "ablate_massive", "ablate_sink_values", "calibrate_attention", "redistribute_attention", "PromptBatch"]

from mechlib.analyses.circuits import Circuit, find_circuit  # noqa: E402
from mechlib.analyses.overlap import OverlapResult, circuit_overlap  # noqa: E402
from mechlib.interventions import scale_heads, steer_attention, steer_residual  # noqa: E402

__all__ += ["find_circuit", "circuit_overlap", "Circuit", "OverlapResult", "scale_heads", "steer_attention", "steer_residual"]

from mechlib.analyses.attribution import DLAResult, HeadScores, direct_logit_attribution, head_divergence  # noqa: E402

__all__ += ["head_divergence", "direct_logit_attribution", "HeadScores", "DLAResult"]

from mechlib.analyses.lens import ComponentTokens, LensResult, component_tokens, logit_lens, self_logits_augmentation  # noqa: E402

__all__ += ["logit_lens", "component_tokens", "self_logits_augmentation", "LensResult", "ComponentTokens"]

from mechlib.analyses.position import PositionBias, position_bias, segment_attention  # noqa: E402
from mechlib.interventions import position_invariant, steering_vectors, var, vhr, vista  # noqa: E402

__all__ += ["position_bias", "segment_attention", "PositionBias", "position_invariant", "var", "vhr", "vista",
            "steering_vectors"]

from mechlib import stats  # noqa: E402
from mechlib.analyses.controls import compare_with_random, random_head_sets  # noqa: E402
from mechlib.analyses.probes import PCAResult, ProbeResult, pca, probe  # noqa: E402

__all__ += ["stats", "probe", "pca", "ProbeResult", "PCAResult", "random_head_sets", "compare_with_random"]
from mechlib.analyses.edges import (  # noqa: E402
    EdgeScores,
    FaithfulnessResult,
    Graph,
    edge_attribution,
    faithfulness,
    faithfulness_curve,
)

__all__ += ["edge_attribution", "faithfulness", "faithfulness_curve", "EdgeScores", "FaithfulnessResult", "Graph"]
