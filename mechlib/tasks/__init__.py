"""Tasks: generators that turn the templates in ``data/`` into validated ContrastSets.

* :func:`ioi` — Indirect Object Identification (Wang et al. 2022), ABBA and BABA templates.
* :func:`colored_objects` — BIG-bench colored objects with one-token colour answers (Merullo et al.).
* :func:`factual_recall` — "The capital of X is" → capital.
* :func:`context_qa` — a context that contradicts the prior (text analogue of hallucination).
* :func:`sentiment` — zero/few-shot sentiment classification.
* :func:`colored_shapes` — synthetic coloured-square images for vision-language probes.
* :func:`pairwise_choice` — two-option questions asked in both orders (position bias, PINE).
* :func:`natural_text` — fixed-length natural-text sequences (Gu et al.'s and Sun et al.'s protocols).

Each generator is seeded, filters its word lists to words that are single tokens for the model's
tokenizer, and pairs every clean prompt with a corrupted one of the same token length.
"""

from __future__ import annotations

from mechlib.tasks.contrast import ContrastSet, ContrastSetError, single_token_id
from mechlib.tasks.data import load_data, vocabulary_words
from mechlib.tasks.generators import (
                                      colored_objects,
                                      colored_shapes,
                                      context_qa,
                                      factual_recall,
                                      ioi,
                                      natural_text,
                                      sentiment,
)
from mechlib.tasks.segments import OptionPrompts, SegmentedPrompts, pairwise_choice

__all__ = ["ContrastSet", "ContrastSetError", "single_token_id", "ioi", "colored_objects",
           "factual_recall", "sentiment", "context_qa", "natural_text", "colored_shapes", "load_data", "vocabulary_words", "SegmentedPrompts",
           "OptionPrompts", "pairwise_choice"]
