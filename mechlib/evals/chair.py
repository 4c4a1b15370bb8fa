"""CHAIR: how often a caption names COCO objects that are not in the image.

Rohrbach et al. 2018, "Object Hallucination in Image Captioning" (EMNLP), code
``LisaAnne/Hallucination/utils/chair.py``. The vision-language papers of this project (VHR, VISTA,
VCD, OPERA) report it on 500 COCO val2014 images captioned with "Please describe this image in
detail."::

    CHAIR_I = (# hallucinated object mentions) / (# COCO object mentions)     over all captions
    CHAIR_S = (# captions with >= 1 hallucinated object) / (# captions)

A *mention* is a caption word (or two-word compound) that is one of the 80 COCO categories or one
of their synonyms ("puppy" → dog, "sofa" → couch); it is *hallucinated* when its category is not in
the image's ground truth. The ground truth of an image is the union of its COCO instance categories
and the COCO objects mentioned in its five reference captions (:func:`coco_ground_truth`).

**The synonym list.** The synonyms are Rohrbach et al.'s file ``data/synonyms.txt`` of
github.com/LisaAnne/Hallucination (pinned at commit 6e4d33c4; OPERA's copy of chair.py embeds the
same 80 lines). mechlib does not ship it; every function here takes ``synonyms=`` (a path) and
otherwise finds the list as :func:`mechlib.evals.datasets.chair_synonyms_path` does:
``$MECHLIB_CHAIR_SYNONYMS``, else the cached copy ``<$MECHLIB_CACHE>/datasets/chair/synonyms.txt``,
else a download of the published file (sha256-checked, written atomically to that cache), once. A
notebook run offline therefore needs the file placed there once (the error says which file and
where). It is read exactly as chair.py reads it (``line.strip().split(", ")``; mechlib also skips
blank lines and ``#`` comments, which the published file has none of). Another list in the same
format works too (``synonyms=``); results record which one was used (``metadata["synonyms"]``,
``["synonyms_sha256"]``, ``["synonyms_published"]``).

How chair.py reads a caption, reproduced exactly (see :mod:`mechlib.evals._text` for the tokeniser
and pattern's singulariser, quirks included):

1. lowercase, ``nltk.word_tokenize``, ``pattern.en.singularize`` on every token;
2. merge two-word compounds left to right: "hot dog", "teddy bear", "stop sign", "cell phone", ...
   keep their own name; "baby X"/"adult X" → X for animals (so "baby elephant" is an elephant,
   not a person); "passenger jet/train" → jet/train; "bow tie" → tie; "toilet seat" → toilet;
   "wine glas" (pattern's singular of "glass") → "wine glass";
3. if the caption contains both "toilet" and "seat", drop every "seat" (a toilet seat is no chair);
4. keep the words that are COCO objects or synonyms, and map each to its category.

**Common misreadings.** (a) CHAIR_I counts *mentions*, not distinct objects: "a dog chases
another dog" with no dog in the image adds two hallucinated mentions (chair.py does this; pass
``count="unique"`` to count each category once per caption). (b) It only sees the 80 COCO
categories: a caption that invents a "tree" or a "cloud" is not penalised, and objects outside COCO
never count as correct either. (c) Longer captions mention more objects, so CHAIR_S grows with
length: compare methods at similar caption lengths (``mean_length``). (d) The ground truth includes
objects named in the human captions, not only the annotated instances.

Defaults — paper | released code | mechlib:

| choice | Rohrbach et al. (chair.py) | OPERA's copy (used by VCD/VISTA/VHR) | mechlib |
|---|---|---|---|
| synonym list | ``data/synonyms.txt`` (80 categories) | the same 80 lines, embedded | that file at the pinned commit, fetched once (``synonyms=`` for another) |
| tokeniser | nltk ``word_tokenize`` | same | a re-implementation (same tokens on 20,000 model captions) |
| normalisation | ``pattern.en.singularize`` | nltk POS tags + WordNet lemmatizer | pattern's rules (``rules="rohrbach"``); ``rules="opera"`` needs nltk and its data |
| compounds | 28 listed | the same + "train track" | as the chosen rules |
| ground truth | instances + reference captions | same, train+val 2014 | same, of the annotation files given |
| CHAIR_I counts | every mention | every mention | every mention (``count="mentions"``) |
| extra outputs | — | recall of ground-truth objects, mean length | both (``recall``, ``mean_length``) |
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from mechlib.evals import datasets as _datasets
from mechlib.evals._text import singularize, word_tokenize
from mechlib.evals.datasets import chair_synonyms_path

PathLike = Union[str, os.PathLike]

# chair.py's hard-coded compounds ("hot dog" and "teddy bear" appear twice there).
_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone",
    "mobile phone", "teddy bear", "hair drier", "potted plant", "bow tie", "laptop computer",
    "stove top oven", "home plate",
)
_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
                 "animal", "cub")
_VEHICLE_WORDS = ("jet", "train")
RULES = ("rohrbach", "opera")


@dataclass(frozen=True)
class Vocabulary:
    """The COCO object vocabulary of CHAIR: every synonym → its category, and the compound rules.

    ``source`` is the synonym file read, ``sha256`` its hash, and ``published`` whether it is
    Rohrbach et al.'s published list (``CHAIR_SYNONYMS_SHA256``) rather than another list.
    """

    synonyms: Mapping[str, str]          # word or compound -> category (the line's first entry)
    categories: tuple[str, ...]          # the category names, in file order (80 in the published list)
    double_words: Mapping[str, str]      # two-word compound -> the word it stands for
    source: str = ""
    sha256: str = ""

    @property
    def published(self) -> bool:
        """Whether this is Rohrbach et al.'s published list (its sha256 is ``CHAIR_SYNONYMS_SHA256``)."""
        return self.sha256 == _datasets.CHAIR_SYNONYMS_SHA256

    def category(self, word: str) -> Optional[str]:
        """The COCO category of ``word`` (a synonym or a category name), or None."""
        return self.synonyms.get(word)

    @property
    def metadata(self) -> dict:
        """Which list was used, for results' metadata."""
        return {"synonyms": self.source, "synonyms_sha256": self.sha256, "synonyms_published": self.published}


def vocabulary(rules: str = "rohrbach", *, synonyms: Optional[PathLike] = None, download: bool = True) -> Vocabulary:
    """CHAIR's synonym table and compound rules, read from the synonym list as chair.py reads it.

    Args:
        rules: ``"rohrbach"`` (chair.py's compounds) or ``"opera"`` (adds "train track").
        synonyms: the synonym list's path; default: found or downloaded by
            :func:`~mechlib.evals.datasets.chair_synonyms_path` (``$MECHLIB_CHAIR_SYNONYMS``, the
            cache, or the published file at its pinned commit).
        download: allow that download when the list is nowhere on this machine.

    Parsed once per file (and again if the file changes).
    """
    if rules not in RULES:
        raise ValueError(f"rules={rules!r} is not one of {RULES}")
    path = chair_synonyms_path(synonyms, download=download).resolve()
    st = path.stat()
    return _read_vocabulary(str(path), st.st_mtime_ns, st.st_size, rules)


@lru_cache(maxsize=16)
def _read_vocabulary(path: str, mtime_ns: int, size: int, rules: str) -> Vocabulary:
    import hashlib

    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"synonyms={path!r} is not a UTF-8 text file ({e}); CHAIR's synonym list is one "
                         "category per line, 'name, synonym, synonym, ...'") from None
    synonyms: dict[str, str] = {}
    categories = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():  # mechlib's tolerance; the published file has neither
            continue
        words = line.strip().split(", ")  # exactly chair.py's parsing (leading spaces survive)
        categories.append(words[0])
        for w in words:
            synonyms[w] = words[0]
    if not categories:
        raise ValueError(f"synonyms={path!r} holds no category: CHAIR's synonym list is one category per line, "
                         "'name, synonym, synonym, ...'")
    double = {w: w for w in _DOUBLE_WORDS + (("train track",) if rules == "opera" else ())}
    for a in _ANIMAL_WORDS:
        double[f"baby {a}"] = a
        double[f"adult {a}"] = a
    for v in _VEHICLE_WORDS:
        double[f"passenger {v}"] = v
    double["bow tie"] = "tie"
    double["toilet seat"] = "toilet"
    double["wine glas"] = "wine glass"
    sha = hashlib.sha256(data).hexdigest()
    return Vocabulary(synonyms=synonyms, categories=tuple(categories), double_words=double, source=path, sha256=sha)


def _normalise_tokens(tokens: list[str], rules: str) -> list[str]:
    if rules == "rohrbach":
        return [singularize(t) for t in tokens]
    try:
        import nltk
        from nltk.corpus import wordnet
        from nltk.stem import WordNetLemmatizer

        tags = nltk.pos_tag(tokens)
        lemmatizer = WordNetLemmatizer()
        tag_to_pos = {"J": wordnet.ADJ, "V": wordnet.VERB, "N": wordnet.NOUN, "R": wordnet.ADV}
        return [lemmatizer.lemmatize(t, pos=tag_to_pos.get(tag[:1], wordnet.NOUN)) for t, tag in tags]
    except ImportError:
        raise ImportError("rules='opera' lemmatizes with nltk: pip install nltk, then "
                          "nltk.download('averaged_perceptron_tagger_eng'); nltk.download('wordnet')") from None
    except LookupError as e:
        raise LookupError("rules='opera' needs nltk's tagger and WordNet data, which are not installed "
                          "(they need the network once): nltk.download('averaged_perceptron_tagger_eng'); "
                          f"nltk.download('wordnet'). nltk said: {str(e).strip().splitlines()[0] if str(e).strip() else e}") from None


@dataclass(frozen=True)
class CaptionObjects:
    """The COCO objects one caption mentions, as chair.py finds them.

    ``words`` are the caption's matching words after singularisation and compound merging (with
    repeats, in order); ``objects[i]`` is the category of ``words[i]``; ``tokens`` is the whole
    processed caption (chair.py's ``double_words``, whose length is OPERA's caption length).
    """

    words: tuple[str, ...]
    objects: tuple[str, ...]
    tokens: tuple[str, ...]


def caption_objects(caption: str, *, rules: str = "rohrbach", synonyms: Optional[PathLike] = None) -> CaptionObjects:
    """The COCO object mentions of one caption (chair.py's ``caption_to_words``).

    ``synonyms``: the synonym list's path (default: :func:`~mechlib.evals.datasets.chair_synonyms_path`).

    >>> caption_objects("Two hot dogs and a puppy near a toilet seat.").objects
    ('hot dog', 'dog', 'toilet')
    """
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string, got {type(caption).__name__}")
    return _caption_objects(caption, vocabulary(rules, synonyms=synonyms), rules)


def _caption_objects(caption: str, vocab: Vocabulary, rules: str) -> CaptionObjects:
    words = _normalise_tokens(word_tokenize(caption.lower()), rules)
    merged, i = [], 0
    while i < len(words):
        pair = " ".join(words[i:i + 2])
        if pair in vocab.double_words:
            merged.append(vocab.double_words[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    kept = merged
    if "toilet" in kept and "seat" in kept:  # "the seat of the toilet" is not a chair
        kept = [w for w in kept if w != "seat"]
    found = [w for w in kept if w in vocab.synonyms]
    return CaptionObjects(words=tuple(found), objects=tuple(vocab.synonyms[w] for w in found),
                          tokens=tuple(merged))


def to_categories(objects: Iterable[str], *, where: str = "objects", rules: str = "rohrbach",
                  synonyms: Optional[PathLike] = None) -> frozenset[str]:
    """Map ground-truth object names (COCO category names or synonyms) to COCO categories."""
    return _to_categories(objects, vocabulary(rules, synonyms=synonyms), where=where)


def _to_categories(objects: Iterable[str], vocab: Vocabulary, *, where: str) -> frozenset[str]:
    if isinstance(objects, str):
        raise TypeError(f"{where} must be a collection of object names, got the string {objects!r}")
    out = set()
    for o in objects:
        if not isinstance(o, str):
            raise TypeError(f"{where} holds {o!r} ({type(o).__name__}); expected object names (strings)")
        cat = vocab.category(o) or vocab.category(o.lower().strip())
        if cat is None:
            raise ValueError(
                f"{where} holds {o!r}, which is not one of the {len(vocab.categories)} COCO categories or their "
                f"synonyms in the synonym list {vocab.source}; CHAIR only scores COCO objects. Use the COCO name "
                f"(e.g. 'dining table', 'cell phone', 'tv') or build ground truth with coco_ground_truth().")
        out.add(cat)
    return frozenset(out)


def _category_of_instance(vocab: Vocabulary, name: str, *, where: str) -> str:
    """The category of a COCO instance annotation's category name, or an error naming the list."""
    cat = vocab.category(name)
    if cat is None:
        raise ValueError(f"{where}: the COCO category {name!r} is not in the synonym list {vocab.source} "
                         f"({len(vocab.categories)} categories); CHAIR needs a list with every category of "
                         "the annotations (the published list has all 80)")
    return cat


@dataclass(frozen=True)
class CaptionChair:
    """CHAIR of one caption: its mentions, which are hallucinated, and the image's ground truth."""

    caption: str
    image_id: Any
    words: tuple[str, ...]                         # matched words (after singularising / merging)
    objects: tuple[str, ...]                       # their COCO categories, with repeats
    hallucinated: tuple[tuple[str, str], ...]      # (word, category) pairs not in the ground truth
    ground_truth: frozenset[str]
    length: int                                    # tokens after compound merging (OPERA's "Len")

    @property
    def chair_s(self) -> int:
        """1 when the caption hallucinates at least one object, else 0."""
        return int(bool(self.hallucinated))

    @property
    def chair_i(self) -> float:
        """Hallucinated mentions / mentions in this caption (0 when it mentions none)."""
        return len(self.hallucinated) / len(self.words) if self.words else 0.0

    @property
    def hallucinated_objects(self) -> tuple[str, ...]:
        """The distinct hallucinated categories, in order of first mention."""
        return tuple(dict.fromkeys(c for _, c in self.hallucinated))


@dataclass(frozen=True)
class ChairResult:
    """CHAIR over a set of captions (Rohrbach et al. 2018).

    ``chair_s`` and ``chair_i`` are fractions in [0, 1] (papers print them ×100). ``recall`` is
    OPERA's addition: the fraction of ground-truth objects that the captions mention.
    """

    chair_s: float
    chair_i: float
    recall: float
    mean_length: float
    n_captions: int
    n_mentions: int
    n_hallucinated: int
    per_caption: tuple[CaptionChair, ...] = field(repr=False)
    metadata: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        """The headline numbers as a dict (×100, as papers print them, under the ``*_pct`` keys)."""
        return {"CHAIR_S": self.chair_s, "CHAIR_I": self.chair_i, "recall": self.recall,
                "mean_length": self.mean_length, "n_captions": self.n_captions,
                "CHAIR_S_pct": 100 * self.chair_s, "CHAIR_I_pct": 100 * self.chair_i}

    def to_dataframe(self):
        """One row per caption: image id, caption, mentions, hallucinated objects, CHAIR_S/I."""
        import pandas as pd

        return pd.DataFrame([{
            "image_id": c.image_id, "caption": c.caption, "objects": list(c.objects),
            "hallucinated": list(c.hallucinated_objects), "ground_truth": sorted(c.ground_truth),
            "chair_s": c.chair_s, "chair_i": c.chair_i, "length": c.length,
        } for c in self.per_caption])

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the metrics and per-caption details as JSON (atomically)."""
        from mechlib.results import atomic_write_bytes

        doc = {"overall": self.as_dict(), "metadata": dict(self.metadata), "sentences": [
            {"image_id": c.image_id, "caption": c.caption, "words": list(c.words), "objects": list(c.objects),
             "hallucinated": [list(p) for p in c.hallucinated], "ground_truth": sorted(c.ground_truth),
             "chair_s": c.chair_s, "chair_i": c.chair_i, "length": c.length} for c in self.per_caption]}
        atomic_write_bytes(path, json.dumps(doc, indent=1, default=str).encode())
        return Path(path)

    def summary(self, digits: int = 2) -> str:
        """``"CHAIR_S / CHAIR_I (recall; mean length)"`` ×100, as the papers' tables print them."""
        return (f"{100 * self.chair_s:.{digits}f} / {100 * self.chair_i:.{digits}f} (recall {100 * self.recall:.1f}; "
                f"{self.mean_length:.0f} words)")

    def _list_note(self) -> str:
        """A note when the synonym list was not the published one (numbers not comparable to papers')."""
        if self.metadata.get("synonyms_published", True):
            return ""
        name = Path(str(self.metadata.get("synonyms", "?"))).name
        return f"synonym list {name!r} (not CHAIR's published list)"

    def __repr__(self) -> str:
        note = self._list_note()
        return (f"ChairResult(CHAIR_S={100 * self.chair_s:.2f}, CHAIR_I={100 * self.chair_i:.2f}, "
                f"recall={100 * self.recall:.2f}, captions={self.n_captions}, mentions={self.n_mentions}, "
                f"mean_length={self.mean_length:.1f}" + (f"; {note}" if note else "") + ")")

    def _repr_html_(self) -> str:
        note = self._list_note()
        return (f"<b>CHAIR</b> over {self.n_captions} captions: CHAIR<sub>S</sub> = {100 * self.chair_s:.2f}, "
                f"CHAIR<sub>I</sub> = {100 * self.chair_i:.2f} ({self.n_hallucinated}/{self.n_mentions} "
                f"mentions), recall = {100 * self.recall:.2f}, mean length = {self.mean_length:.1f} tokens"
                + (f"; <i>{html.escape(note)}</i>" if note else ""))


def coco_ground_truth(instances: Union[Mapping, str, os.PathLike], captions: Union[Mapping, str, os.PathLike, None] = None,
                      *, image_ids: Optional[Iterable[int]] = None, rules: str = "rohrbach",
                      synonyms: Optional[PathLike] = None) -> dict[int, frozenset[str]]:
    """CHAIR's ground truth per image: instance categories ∪ objects named in the reference captions.

    Args:
        instances: COCO ``instances_*.json`` (the parsed dict or its path).
        captions: COCO ``captions_*.json`` (dict or path); ``None`` uses the instances only (not
            CHAIR's definition — the papers use both).
        image_ids: restrict to these images (others are skipped; an id with no annotation gets an
            empty set).
        rules: as in :func:`chair` (how the reference captions are read).
        synonyms: the synonym list's path (default: :func:`~mechlib.evals.datasets.chair_synonyms_path`).

    Returns:
        ``{image_id: frozenset of COCO categories}``.

    >>> gt = coco_ground_truth("instances_val2014.json", "captions_val2014.json")  # doctest: +SKIP
    """
    vocab = vocabulary(rules, synonyms=synonyms)
    inst = _read_json(instances, "instances")
    if "annotations" not in inst or "categories" not in inst:
        raise ValueError("instances must be a COCO instances file (with 'annotations' and 'categories')")
    wanted = None if image_ids is None else {int(i) for i in image_ids}
    gt: dict[int, set] = {i: set() for i in wanted} if wanted is not None else {}
    id_to_name = {c["id"]: c["name"] for c in inst["categories"]}
    for ann in inst["annotations"]:
        imid = ann["image_id"]
        if wanted is not None and imid not in wanted:
            continue
        gt.setdefault(imid, set()).add(_category_of_instance(vocab, id_to_name[ann["category_id"]],
                                                             where=f"instances (image {imid})"))
    if captions is not None:
        caps = _read_json(captions, "captions")
        if "annotations" not in caps:
            raise ValueError("captions must be a COCO captions file (with 'annotations')")
        for ann in caps["annotations"]:
            imid = ann["image_id"]
            if wanted is not None and imid not in wanted:
                continue
            gt.setdefault(imid, set()).update(_caption_objects(ann["caption"], vocab, rules).objects)
    return {k: frozenset(v) for k, v in gt.items()}


def _read_json(x, what: str) -> Mapping:
    if isinstance(x, Mapping):
        return x
    p = Path(x)
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no file at {p}")
    with open(p) as f:
        return json.load(f)


def chair(captions: Sequence[str], objects: Union[Sequence[Iterable[str]], Mapping[Any, Iterable[str]]], *,
          image_ids: Optional[Sequence[Any]] = None, count: str = "mentions", rules: str = "rohrbach",
          synonyms: Optional[PathLike] = None) -> ChairResult:
    """CHAIR_S and CHAIR_I of generated captions against ground-truth objects (Rohrbach et al. 2018).

    Args:
        captions: the generated captions, ``[n]`` strings.
        objects: the ground truth — either one collection of object names per caption (COCO category
            names or synonyms, e.g. ``[["person", "dog"], ...]``), or a mapping ``image_id ->
            objects`` (e.g. from :func:`coco_ground_truth`) together with ``image_ids``.
        image_ids: ``[n]`` image ids of the captions; required when ``objects`` is a mapping.
        count: ``"mentions"`` (chair.py: every mention counts in CHAIR_I) or ``"unique"`` (each
            category once per caption).
        rules: ``"rohrbach"`` (chair.py: pattern's singulariser) or ``"opera"`` (OPERA's copy used
            by VCD/VISTA/VHR: WordNet lemmas, needs nltk with its data).
        synonyms: the COCO synonym list's path. Default: Rohrbach et al.'s published list, from
            ``$MECHLIB_CHAIR_SYNONYMS``, the cache or a one-time download
            (:func:`~mechlib.evals.datasets.chair_synonyms_path`); offline, place it once as the
            error says. Only the published list gives the papers' numbers.

    Returns:
        :class:`ChairResult` with ``chair_s``, ``chair_i``, ``recall``, ``mean_length`` and
        ``per_caption`` details (mentions, hallucinated objects, ground truth).

    >>> r = chair(["A man rides a horse next to two dogs.", "A cat on a sofa."],
    ...           [["person", "horse"], ["cat", "couch"]])
    >>> r.chair_s, r.chair_i            # caption 1 hallucinates "dog": 1/2 captions, 1/5 mentions
    (0.5, 0.2)
    >>> r.per_caption[0].hallucinated
    (('dog', 'dog'),)
    """
    if count not in ("mentions", "unique"):
        raise ValueError(f"count={count!r} must be 'mentions' (chair.py) or 'unique'")
    if rules not in RULES:
        raise ValueError(f"rules={rules!r} is not one of {RULES}")
    if isinstance(captions, str):
        raise TypeError("captions must be a list of strings, got one string")
    captions = list(captions)
    if not captions:
        raise ValueError("captions is empty")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f"captions[{i}] is {type(c).__name__}, expected a string")
    vocab = vocabulary(rules, synonyms=synonyms)
    if isinstance(objects, Mapping):
        if image_ids is None:
            raise ValueError("objects is a mapping image_id -> objects: pass image_ids=[...] (one per caption)")
        image_ids = list(image_ids)
        if len(image_ids) != len(captions):
            raise ValueError(f"image_ids has {len(image_ids)} entries for {len(captions)} captions")
        missing = [i for i in image_ids if i not in objects]
        if missing:
            raise KeyError(f"no ground truth for image ids {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                           f"({len(missing)} of {len(image_ids)}); build it for these images")
        gts = [_to_categories(objects[i], vocab, where=f"objects[{i!r}]") for i in image_ids]
    else:
        objects = list(objects)
        if len(objects) != len(captions):
            raise ValueError(f"objects has {len(objects)} entries for {len(captions)} captions "
                             "(one collection of ground-truth objects per caption)")
        gts = [_to_categories(o, vocab, where=f"objects[{k}]") for k, o in enumerate(objects)]
        image_ids = list(image_ids) if image_ids is not None else list(range(len(captions)))
        if len(image_ids) != len(captions):
            raise ValueError(f"image_ids has {len(image_ids)} entries for {len(captions)} captions")

    per, n_mentions, n_hall, n_hall_caps = [], 0, 0, 0
    recalled, n_gt, total_len = 0, 0, 0
    for cap, imid, gt in zip(captions, image_ids, gts):
        found = _caption_objects(cap, vocab, rules)
        pairs = list(zip(found.words, found.objects))
        if count == "unique":  # the first mention of each category only
            seen: set = set()
            pairs = [(w, c) for w, c in pairs if not (c in seen or seen.add(c))]
        hall = tuple((w, c) for w, c in pairs if c not in gt)
        words = tuple(w for w, _ in pairs)
        objs = tuple(c for _, c in pairs)
        n_mentions += len(pairs)
        n_hall += len(hall)
        n_hall_caps += bool(hall)
        recalled += len({c for c in objs if c in gt})
        n_gt += len(gt)
        total_len += len(found.tokens)
        per.append(CaptionChair(caption=cap, image_id=imid, words=words, objects=objs, hallucinated=hall,
                                ground_truth=gt, length=len(found.tokens)))
    n = len(captions)
    return ChairResult(
        chair_s=n_hall_caps / n,
        chair_i=n_hall / n_mentions if n_mentions else float("nan"),  # chair.py divides by zero here
        recall=recalled / n_gt if n_gt else float("nan"),
        mean_length=total_len / n,
        n_captions=n, n_mentions=n_mentions, n_hallucinated=n_hall,
        per_caption=tuple(per),
        metadata={"rules": rules, "count": count, **vocab.metadata},
    )


__all__ = ["chair", "ChairResult", "CaptionChair", "caption_objects", "CaptionObjects", "coco_ground_truth",
           "vocabulary", "Vocabulary", "to_categories"]
