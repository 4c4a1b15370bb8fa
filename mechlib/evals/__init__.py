"""The papers' own evaluations: CHAIR and POPE on generated text, and loaders for the papers' data.

* :func:`chair` — CHAIR_S / CHAIR_I (Rohrbach et al. 2018): how often captions name COCO objects
  that are not in the image; :func:`coco_ground_truth` builds the per-image ground truth.
* :func:`pope_questions` / :func:`pope_scores` — POPE (Li et al. 2023): balanced yes/no questions
  "Is there a {object} in the image?" with random / popular / adversarial negatives, scored by
  accuracy, precision, recall, F1 and the yes-ratio; :func:`pope_mean` averages them over the three
  settings, as the papers report one POPE number.
* :func:`chair_synonyms_path` — CHAIR's COCO synonym list (Rohrbach et al.'s ``data/synonyms.txt``
  of github.com/LisaAnne/Hallucination, pinned commit). Not shipped with mechlib: every CHAIR
  function takes ``synonyms=`` (a path), else reads ``$MECHLIB_CHAIR_SYNONYMS``, else the cached
  copy ``<$MECHLIB_CACHE>/datasets/chair/synonyms.txt``, else downloads the published file once
  (sha256-checked, written atomically to that cache). A notebook run offline needs the file placed
  there once; the error names the file, its URL and the folder.
* :func:`load_coco` (:mod:`mechlib.evals.coco`) — COCO val2014: annotations, a seeded sample of
  images, each image's CHAIR ground truth and POPE objects.
* :mod:`mechlib.evals.datasets` — ACT's
  classification sets, WikiText-2 / C4 text for perplexity, RewardBench's reasoning subsets. Cached
  under ``$MECHLIB_CACHE/datasets``; a local folder works (``root=``); offline they fail at once and
  name the file to place.

Nothing heavy is imported here: PIL, ``datasets`` and pandas load only when a function needs them.
"""

from mechlib.evals.chair import (
    CaptionChair,
    CaptionObjects,
    ChairResult,
    caption_objects,
    chair,
    coco_ground_truth,
    vocabulary,
)
from mechlib.evals.coco import CocoRecord, load_coco
from mechlib.evals.datasets import (
    ACT_DATASETS,
    ActDataset,
    DatasetNotAvailable,
    chair_synonyms_path,
    load_act_dataset,
    load_perplexity_text,
    load_rewardbench,
)
from mechlib.evals.pope import PopeMean, PopeQuestion, PopeScores, pope_answer, pope_mean, pope_questions, pope_scores

__all__ = [
    "chair", "ChairResult", "CaptionChair", "caption_objects", "CaptionObjects", "coco_ground_truth", "vocabulary",
    "pope_questions", "pope_scores", "pope_mean", "pope_answer", "PopeQuestion", "PopeScores", "PopeMean",
    "load_coco", "CocoRecord", "load_act_dataset", "ActDataset", "ACT_DATASETS", "load_perplexity_text",
    "load_rewardbench", "DatasetNotAvailable", "chair_synonyms_path",
]
