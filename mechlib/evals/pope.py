"""POPE: polling a vision-language model with "Is there a {object} in the image?".

Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models" (EMNLP), code
``RUCAIBox/POPE`` (``utils.py`` builds the questions, ``evaluate.py`` scores the answers). For
each image, POPE asks about ``per_image`` (3) objects that *are* in the image (answer "yes") and,
interleaved, as many that are *not* (answer "no"), so the set is balanced. The negatives are:

* ``"random"`` — drawn uniformly from the objects seen in the sampled images;
* ``"popular"`` — the most frequent objects (over the sampled images) that are not in this image;
* ``"adversarial"`` — the objects that most often co-occur with the positive object just asked
  about (over the sampled images) and are not in this image.

A model that hallucinates objects it expects (frequent ones, or ones that usually come with what it
sees) does worse on popular and adversarial than on random. Answers are read with POPE's rule:
keep the text before the first ".", drop commas, split on spaces; the answer is "no" when a word is
exactly ``No``, ``no`` or ``not``, and "yes" otherwise (so an empty or off-topic answer counts as
"yes"). Scores treat "yes" as the positive class.

**Common misreading.** Accuracy alone hides a bias: a model that says "yes" to everything scores
50% accuracy but 100% recall and F1 = 0.67. Report the yes-ratio next to F1 (POPE's table does);
a calibrated model is near 50%.

Defaults — paper | released code | mechlib:

| choice | paper | RUCAIBox/POPE | mechlib |
|---|---|---|---|
| images | 500 COCO val2014 with >= 3 objects | ``random.sample`` (unseeded) | ``n``, seeded ``random.Random(seed)`` |
| questions per image | 3 yes + 3 no | same, interleaved yes/no | same |
| positives | ground-truth objects | the image's first 3 objects in its list | same (order as given) |
| frequency / co-occurrence | "in the dataset" | over the sampled images | over the sampled images |
| article | "Is there a/an {object}" | ``template.replace("a", "an")`` (also turns "image" into "imange"; the published question files use "an" correctly) | "an" before a vowel, as the published files |
| answer parsing | yes/no | first sentence; "No"/"no"/"not" → no | same (:func:`pope_answer`) |
"""

from __future__ import annotations

import math
import numbers
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

SETTINGS = ("random", "popular", "adversarial")
TEMPLATE = "Is there a {} in the image?"


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question: ``label`` is ``"yes"`` when ``object`` is in the image, else ``"no"``."""

    question_id: int
    image_id: Any
    object: str
    text: str
    label: str

    @property
    def is_positive(self) -> bool:
        return self.label == "yes"


def _question_text(template: str, obj: str) -> str:
    if obj[:1].lower() in "aeiou" and " a {}" in template:
        return template.replace(" a {}", " an {}", 1).format(obj)
    return template.format(obj)


def _as_image_objects(objects) -> list[tuple[Any, list[str]]]:
    """Normalise ``objects`` to ``[(image_id, [object, ...]), ...]`` preserving order."""
    if isinstance(objects, Mapping):
        items = list(objects.items())
    else:
        items = []
        for k, rec in enumerate(objects):
            if hasattr(rec, "image_id") and hasattr(rec, "categories"):  # a CocoRecord
                items.append((rec.image_id, list(rec.categories)))
            elif isinstance(rec, Mapping) and "objects" in rec:       # POPE's own json lines
                items.append((rec.get("image_id", rec.get("image", k)), list(rec["objects"])))
            else:
                raise TypeError(f"objects[{k}] is {type(rec).__name__}; pass a mapping image_id -> [objects], "
                                "CocoRecords from load_coco(), or dicts with an 'objects' list")
    out = []
    for imid, objs in items:
        if isinstance(objs, str):
            raise TypeError(f"objects for image {imid!r} is the string {objs!r}; expected a list of object names")
        objs = list(dict.fromkeys(objs))  # an object asked about once per image
        for o in objs:
            if not isinstance(o, str) or not o:
                raise TypeError(f"objects for image {imid!r} holds {o!r}; expected non-empty object names")
        out.append((imid, objs))
    return out


def _random_negative(rng: random.Random, all_objects: list, asked: set, in_image: set) -> str:
    while True:  # POPE's rejection sampling over all seen objects
        o = rng.choice(all_objects)
        if o not in asked and o not in in_image:
            return o


def pope_questions(objects: Union[Mapping[Any, Sequence[str]], Iterable[Any]], n: Optional[int] = 500,
                   setting: str = "random", *, per_image: int = 3, seed: int = 0,
                   template: str = TEMPLATE) -> list[PopeQuestion]:
    """Build a POPE question set (Li et al. 2023) from per-image ground-truth objects.

    Args:
        objects: the objects in each image, in the order positives are taken: a mapping
            ``image_id -> [object, ...]``, the records of :func:`mechlib.evals.load_coco` (their
            ``categories``), or POPE's own ``{"image": ..., "objects": [...]}`` dicts.
        n: images to sample among those with at least ``per_image`` objects (POPE: 500); ``None``
            uses them all, in the order given.
        setting: ``"random"``, ``"popular"`` or ``"adversarial"`` (how negatives are chosen).
        per_image: positives (and negatives) per image (POPE: 3).
        seed: seeds the image sample and the random negatives (``random.Random(seed)``).
        template: the question, with ``{}`` for the object (POPE: "Is there a {} in the image?";
            "a" becomes "an" before a vowel).

    Returns:
        ``2 * per_image * n`` :class:`PopeQuestion` objects, image by image, alternating yes / no.

    >>> gt = {1: ["person", "dog", "frisbee"], 2: ["cat", "couch", "tv"], 3: ["person", "car", "dog"]}
    >>> qs = pope_questions(gt, n=None, setting="popular")
    >>> [(q.object, q.label) for q in qs[:2]]   # person and dog are the most frequent, but in image 1
    [('person', 'yes'), ('cat', 'no')]
    >>> qs[1].text
    'Is there a cat in the image?'
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r} is not one of {SETTINGS}")
    if per_image < 1:
        raise ValueError(f"per_image={per_image} must be >= 1")
    if "{}" not in template:
        raise ValueError(f"template {template!r} has no '{{}}' for the object name")
    rng = random.Random(seed)
    images = _as_image_objects(objects)
    eligible = [im for im in images if len(im[1]) >= per_image]
    if n is None:
        chosen = eligible
    else:
        if n > len(eligible):
            raise ValueError(f"n={n} images requested but only {len(eligible)} of {len(images)} images have at "
                             f"least per_image={per_image} objects")
        chosen = rng.sample(eligible, n)
    if not chosen:
        raise ValueError(f"no image has at least per_image={per_image} objects")

    # Frequency and co-occurrence over the chosen images (POPE's generate_ground_truth_objects /
    # compute_co_occurrence); ties keep first-seen order, as Python's stable sort does there.
    freq: Counter = Counter()
    co: dict[str, Counter] = {}
    for _, objs in chosen:
        freq.update(objs)
        for o in objs:
            c = co.setdefault(o, Counter())
            c.update(x for x in objs if x != o)
    all_objects = list(freq)  # POPE draws random negatives from these (first-seen order)
    popular = [o for o, _ in sorted(freq.items(), key=lambda kv: kv[1], reverse=True)]
    co_sorted = {o: [x for x, _ in sorted(c.items(), key=lambda kv: kv[1], reverse=True)] for o, c in co.items()}

    questions: list[PopeQuestion] = []
    for imid, objs in chosen:
        in_image = set(objs)
        asked: set = set()
        candidates_left = [o for o in all_objects if o not in in_image]
        if len(candidates_left) < per_image:
            raise ValueError(f"image {imid!r}: only {len(candidates_left)} objects seen in the sampled images are "
                             f"absent from it, fewer than per_image={per_image} negatives; sample more images")

        for pos in objs[:per_image]:
            asked.add(pos)
            questions.append(PopeQuestion(len(questions) + 1, imid, pos, _question_text(template, pos), "yes"))
            if setting == "random":
                neg = _random_negative(rng, all_objects, asked, in_image)
            else:
                ranking = popular if setting == "popular" else co_sorted.get(pos, [])
                neg = next((o for o in ranking if o not in asked and o not in in_image), None)
                if neg is None:  # nothing left in the ranking: POPE falls back to a random object
                    neg = _random_negative(rng, all_objects, asked, in_image)
            asked.add(neg)
            questions.append(PopeQuestion(len(questions) + 1, imid, neg, _question_text(template, neg), "no"))
    return questions


def pope_answer(text: str) -> bool:
    """POPE's reading of a free-form answer: ``False`` ("no") when the first sentence has the word
    "No", "no" or "not", else ``True`` ("yes").

    >>> pope_answer("No, there is no dog."), pope_answer("Yes."), pope_answer("There is not a cat")
    (False, True, False)
    """
    if not isinstance(text, str):
        raise TypeError(f"answer must be a string, got {type(text).__name__}")
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return not ("No" in words or "not" in words or "no" in words)


def _as_bool(x, where: str) -> bool:
    if isinstance(x, PopeQuestion):
        return x.is_positive
    if isinstance(x, bool):
        return x
    if isinstance(x, numbers.Integral) and x in (0, 1):
        return bool(x)
    if isinstance(x, str):
        if x.strip().lower() in ("yes", "no"):
            return x.strip().lower() == "yes"
        return None  # free text: parsed by the caller
    raise TypeError(f"{where} is {x!r}; expected 'yes'/'no', a bool, 0/1 or a PopeQuestion")


@dataclass(frozen=True)
class PopeScores:
    """POPE's scores, "yes" being the positive class. Fractions in [0, 1] (papers print ×100)."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    tp: int
    fp: int
    tn: int
    fn: int
    predictions: tuple[bool, ...] = field(repr=False)

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "precision": self.precision, "recall": self.recall, "f1": self.f1,
                "yes_ratio": self.yes_ratio, "TP": self.tp, "FP": self.fp, "TN": self.tn, "FN": self.fn}

    def summary(self, digits: int = 2) -> str:
        """``"accuracy / F1 (yes-ratio %)"`` ×100, as the papers' tables print them."""
        return _summary(self.accuracy, self.f1, self.yes_ratio, digits)

    def __repr__(self) -> str:
        return (f"PopeScores(accuracy={100 * self.accuracy:.2f}, precision={100 * self.precision:.2f}, "
                f"recall={100 * self.recall:.2f}, F1={100 * self.f1:.2f}, yes={100 * self.yes_ratio:.2f}%, n={self.n})")

    def _repr_html_(self) -> str:
        return (f"<b>POPE</b> (n={self.n}): accuracy {100 * self.accuracy:.2f}, precision {100 * self.precision:.2f}, "
                f"recall {100 * self.recall:.2f}, F1 {100 * self.f1:.2f}, yes-ratio {100 * self.yes_ratio:.2f}% "
                f"(TP {self.tp}, FP {self.fp}, TN {self.tn}, FN {self.fn})")


def _summary(accuracy: float, f1: float, yes_ratio: float, digits: int) -> str:
    return f"{100 * accuracy:.{digits}f} / {100 * f1:.{digits}f} (yes-ratio {100 * yes_ratio:.0f}%)"


@dataclass(frozen=True)
class PopeMean:
    """POPE's scores averaged over settings (the random, popular and adversarial question sets), as
    the VISTA and VAR papers report one POPE number: the mean of each setting's accuracy, F1, ...
    (not the scores of the pooled answers)."""

    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float
    settings: tuple[str, ...]

    def summary(self, digits: int = 2) -> str:
        """``"accuracy / F1 (yes-ratio %)"`` ×100, as the papers' tables print them."""
        return _summary(self.accuracy, self.f1, self.yes_ratio, digits)


def pope_mean(scores: Mapping[str, PopeScores]) -> PopeMean:
    """The mean of POPE's scores over settings, ``scores`` being ``{setting: PopeScores}``.

    >>> a = pope_scores(["yes", "no"], ["yes", "no"]); b = pope_scores(["yes", "yes"], ["yes", "no"])
    >>> m = pope_mean({"random": a, "adversarial": b}); m.accuracy, m.yes_ratio, m.settings
    (0.75, 0.75, ('random', 'adversarial'))
    """
    if not scores:
        raise ValueError("pope_mean needs the scores of at least one setting, as {setting: PopeScores}")
    rows = list(scores.values())
    bad = [k for k, v in scores.items() if not isinstance(v, PopeScores)]
    if bad:
        raise TypeError(f"scores[{bad[0]!r}] is not PopeScores (give {{setting: pope_scores(...)}})")
    mean = {k: sum(getattr(r, k) for r in rows) / len(rows) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")}
    return PopeMean(**mean, settings=tuple(scores))


def pope_scores(answers: Sequence[Union[str, bool, int]], labels: Sequence[Union[str, bool, int, PopeQuestion]]) -> PopeScores:
    """Accuracy, precision, recall, F1 and yes-ratio of yes/no answers (POPE's ``evaluate.py``).

    Args:
        answers: ``[n]`` model answers — free text (read with :func:`pope_answer`), ``"yes"``/``"no"``,
            bools or 0/1.
        labels: ``[n]`` truths — the :class:`PopeQuestion` list itself, ``"yes"``/``"no"``, bools or 0/1.

    Returns:
        :class:`PopeScores`. Precision is NaN (with a warning) when no answer is "yes", and F1 is NaN
        when precision and recall are both 0 or undefined (POPE's script divides by zero there).

    >>> s = pope_scores(["Yes", "No", "Yes, there is.", "no"], ["yes", "no", "no", "yes"])
    >>> s.accuracy, s.precision, s.recall, s.yes_ratio
    (0.5, 0.5, 0.5, 0.5)
    """
    if isinstance(answers, str) or isinstance(labels, str):
        raise TypeError("answers and labels must be sequences, not one string")
    answers, labels = list(answers), list(labels)
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    if not answers:
        raise ValueError("no answers to score")
    preds = []
    for k, a in enumerate(answers):
        b = _as_bool(a, f"answers[{k}]")
        preds.append(pope_answer(a) if b is None else b)
    truth = []
    for k, y in enumerate(labels):
        b = _as_bool(y, f"labels[{k}]")
        if b is None:
            raise ValueError(f"labels[{k}] is {y!r}; labels must be 'yes'/'no', bools, 0/1 or PopeQuestions")
        truth.append(b)
    tp = sum(p and t for p, t in zip(preds, truth))
    fp = sum(p and not t for p, t in zip(preds, truth))
    tn = sum((not p) and (not t) for p, t in zip(preds, truth))
    fn = sum((not p) and t for p, t in zip(preds, truth))
    nan = float("nan")
    if tp + fp == 0:
        warnings.warn("pope_scores: no answer is 'yes', so precision is undefined (NaN)", stacklevel=2)
    precision = tp / (tp + fp) if tp + fp else nan
    recall = tp / (tp + fn) if tp + fn else nan
    f1 = (2 * precision * recall / (precision + recall)
          if not (math.isnan(precision) or math.isnan(recall)) and precision + recall > 0 else nan)
    n = len(preds)
    return PopeScores(accuracy=(tp + tn) / n, precision=precision, recall=recall, f1=f1,
                      yes_ratio=sum(preds) / n, tp=tp, fp=fp, tn=tn, fn=fn, predictions=tuple(preds))


__all__ = ["pope_questions", "pope_scores", "pope_mean", "pope_answer", "PopeQuestion", "PopeScores", "PopeMean",
           "SETTINGS", "TEMPLATE"]
