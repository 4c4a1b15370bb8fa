"""Activation patching, attribution patching and path patching — batched, exact, resumable.

**Activation patching** (causal tracing; Meng et al. 2022, Wang et al. 2022): run the corrupted
prompt, overwrite one activation (a residual position, a head's output ...) with its value from the
clean run, and measure how much of the clean behaviour comes back. Values equal TransformerLens'
``patching.get_act_patch_*`` on the same inputs (tested), but mechlib

* computes no cell whose answer is already known: where the clean and corrupted activations at the
  patched site are exactly equal, the patch writes what is already there, so the cell's value is
  the corrupted run's (TL computes a forward and gets the same). With causal attention, a prompt's
  activations before its first clean/corrupted difference are equal at every layer, so how much is
  skipped depends on the contrast set (how late its prompts first differ), not on the model;
* recomputes each patched variant only from the first position it changes: earlier positions are
  exactly the corrupted run's, whose keys and values stand in for them (causal prefix reuse,
  verified once per model);
* resumes at the patched layer from the recorded corrupted run, so earlier blocks are not
  recomputed (the bridge's ``start_at_layer`` still runs them), and runs the variants layer-major:
  one walk over the blocks in which every variant joins at its own layer, so each block runs a few
  times per sweep on large batches (by-position variants, which start at different positions, are
  packed end to end into sequences kept apart by the attention mask, so one walk runs each on its
  own positions only); the last block computes only the position the metric reads,
  and a logit difference unembeds only its two tokens. Resuming is checked once per model against
  the model's own logits; if it does not reproduce them, mechlib falls back to full forwards, which
  also carry ``pixel_values`` and other extra inputs.

``metadata`` records what was skipped (``skipped_cells``: cells no prompt needed a forward for;
``skipped_rows``: (cell, prompt) pairs), where recomputing started (``from_pos``, ``walk_starts``),
whether variants were packed (``packed``; ``pack_reason`` where the model failed the check) and
the matmul FLOPs done, the clean/corrupted runs included (``flops``; TL's count is
``flops_one_forward_per_cell``).

**Attribution patching** (Nanda 2023; Syed et al. 2023): the first-order estimate
``metric(corrupted) + (clean - corrupted) · ∂metric/∂activation`` for every cell at once, from
one forward and one backward. Same result type, so the two tables compare directly.

**Path patching** (Wang et al. 2022): the effect of sender heads on chosen receivers only: run the
clean prompt with the senders' outputs taken from the corrupted run and every other head frozen
to its clean output; record what the receivers (their query/key/value inputs, or the logits) now
see; then patch just that into a clean run.

Most common misreading: a large patching effect at a position says the *information* there
matters for the metric, not that the component "computes the task"; and a zero effect can hide
backup components (negative/backup name movers compensate). Compare with path patching and with
several corruptions before naming a circuit.
"""

from mechlib.analyses.patching.activation import activation_patching
from mechlib.analyses.patching.attribution import attribution_patching, gradients_available
from mechlib.analyses.patching.common import PatchingResult, prompt_batches
from mechlib.analyses.patching.path import PathBases, path_patching

__all__ = ["PatchingResult", "PathBases", "activation_patching", "attribution_patching", "gradients_available",
           "path_patching", "prompt_batches"]
