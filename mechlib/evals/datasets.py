"""The papers' data: ACT's classification sets, perplexity corpora, RewardBench, CHAIR's synonym list, and
what every loader shares (where files are looked for, downloads, the cache; COCO is :mod:`mechlib.evals.coco`).

Every loader looks, in order, in ``root=`` (a folder you pass), in mechlib's cache
(``$MECHLIB_CACHE/datasets/...``, by default ``~/.cache/mechlib/datasets``), and — only when the
network answers — downloads the official files (COCO) or reads the Hugging Face hub through the
``datasets`` library, keeping a plain copy in the cache so the next call works offline. Downloads
show a progress bar and are written atomically (a temp file renamed into place).

Offline (the network is checked once per host, with a short timeout, and ``MECHLIB_OFFLINE=1``
skips the check) a loader whose files are missing raises :class:`DatasetNotAvailable` at once,
naming the exact file to place and the folder to place it in.

| loader | paper setting it serves | source |
|---|---|---|
| :func:`mechlib.evals.coco.load_coco` | CHAIR (VHR, VISTA: 500 val2014 images), POPE (VAR, VISTA, VHR) | images.cocodataset.org (annotations zip, images one by one) |
| :func:`load_act_dataset` | ACT (Yu et al. 2024) classification: SST-2, SST-5, MR, SUBJ, AGNews, TREC, CB, BoolQ, DBPedia | the hub ids ACT loads (``utils/data_utils.py``) |
| :func:`load_perplexity_text` | Sun et al. 2024 perplexity: WikiText-2 test, C4 | the hub (``Salesforce/wikitext``, ``NeelNanda/c4-10k``, ``allenai/c4``) |
| :func:`load_rewardbench` | PINE (Wang et al.): RewardBench's reasoning subsets | ``allenai/reward-bench``, split ``filtered`` |
| :func:`chair_synonyms_path` | CHAIR's COCO synonym list (every CHAIR function, :func:`~mechlib.evals.coco.load_coco`'s ``objects``) | ``data/synonyms.txt`` of github.com/LisaAnne/Hallucination at a pinned commit, sha256-checked |

CHAIR's synonym list is not shipped with mechlib (it is Rohrbach et al.'s file): it is found as
``synonyms=`` (a path, on every function that needs it), else ``$MECHLIB_CHAIR_SYNONYMS``, else the
cached copy ``<datasets_dir()>/chair/synonyms.txt``, else downloaded once from
raw.githubusercontent.com. A notebook run offline needs the file placed there once.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from mechlib.models._common import cache_dir

PathLike = Union[str, os.PathLike]

HF_HOST = "huggingface.co"


class DatasetNotAvailable(FileNotFoundError):
    """A dataset's files are not on this machine and cannot be downloaded (offline or failed)."""


def datasets_dir() -> Path:
    """Where mechlib keeps datasets: ``<mechlib cache>/datasets`` (``$MECHLIB_CACHE`` or ``~/.cache/mechlib``)."""
    return cache_dir() / "datasets"


# --- network -------------------------------------------------------------------------------------

_ONLINE: dict[str, bool] = {}


def _offline_forced() -> bool:
    return os.environ.get("MECHLIB_OFFLINE", "").lower() in ("1", "true", "yes")


def online(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection, checked once per host and remembered.

    Never blocks longer than ``timeout`` seconds (name resolution included: the check runs in a
    daemon thread). ``MECHLIB_OFFLINE=1`` answers False without trying.
    """
    if _offline_forced():
        return False
    if host in _ONLINE:
        return _ONLINE[host]
    result = [False]

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result[0] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    _ONLINE[host] = result[0]
    return result[0]


def _download(url: str, dest: Path, *, desc: str, timeout: float = 30.0) -> Path:
    """Stream ``url`` to ``dest`` with a progress bar; the file appears only once complete."""
    import urllib.request

    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def _atomic_write_text(path: Path, text: str) -> None:
    from mechlib.results import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def _first_existing(paths: Iterable[Path]) -> Optional[Path]:
    for p in paths:
        if p.is_file():
            return p
    return None


# --- CHAIR's COCO synonym list -------------------------------------------------------------------

# Rohrbach et al.'s list, fetched at run time (mechlib does not redistribute it): the file chair.py reads.
CHAIR_SYNONYMS_REPO = "LisaAnne/Hallucination"
CHAIR_SYNONYMS_COMMIT = "6e4d33c4bedf6dfcd24c61bf527f40714717be47"
CHAIR_SYNONYMS_URL = (f"https://raw.githubusercontent.com/{CHAIR_SYNONYMS_REPO}/{CHAIR_SYNONYMS_COMMIT}"
                      "/data/synonyms.txt")
CHAIR_SYNONYMS_SHA256 = "b685537b36fe21b791c87151b96a991ceb582edff19f3da204dcc7a7905502f2"  # 3,577 bytes, 80 lines
CHAIR_SYNONYMS_ENV = "MECHLIB_CHAIR_SYNONYMS"
GITHUB_RAW_HOST = "raw.githubusercontent.com"


def chair_synonyms_cache() -> Path:
    """Where the downloaded list is kept: ``<datasets_dir()>/chair/synonyms.txt``."""
    return datasets_dir() / "chair" / "synonyms.txt"


def _chair_synonyms_described() -> str:
    return (f"data/synonyms.txt of github.com/{CHAIR_SYNONYMS_REPO} at commit {CHAIR_SYNONYMS_COMMIT} "
            f"({CHAIR_SYNONYMS_URL}, sha256 {CHAIR_SYNONYMS_SHA256})")


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def chair_synonyms_path(synonyms: Optional[PathLike] = None, *, download: bool = True) -> Path:
    """The COCO synonym list CHAIR reads (Rohrbach et al.'s ``data/synonyms.txt``), found or fetched.

    mechlib does not ship the list: it is Rohrbach et al.'s file, obtained at run time like COCO's
    annotations. Looked for, in order:

    1. ``synonyms=`` — a path you pass (any file in the list's format: your own copy of the
       published list, or another vocabulary such as the tests' stand-in);
    2. ``$MECHLIB_CHAIR_SYNONYMS`` — the same, from the environment;
    3. the cache, :func:`chair_synonyms_cache` (``<$MECHLIB_CACHE>/datasets/chair/synonyms.txt``),
       which must be the published file (its sha256 is checked);
    4. the network, once: ``CHAIR_SYNONYMS_URL`` (the file at the pinned commit
       ``CHAIR_SYNONYMS_COMMIT``), checked against ``CHAIR_SYNONYMS_SHA256`` and written atomically
       to the cache, so later calls work offline.

    Offline with nothing found (or ``download=False``) it raises :class:`DatasetNotAvailable` at
    once, naming the file, its URL and where to place it: on a machine without the network, place
    the file there once (or pass ``synonyms=``).

    >>> chair_synonyms_path()                                       # doctest: +SKIP
    PosixPath('/home/me/.cache/mechlib/datasets/chair/synonyms.txt')
    """
    for given, where in ((synonyms, "synonyms"), (os.environ.get(CHAIR_SYNONYMS_ENV) or None, f"${CHAIR_SYNONYMS_ENV}")):
        if given is None:
            continue
        p = Path(given).expanduser()
        if not p.is_file():
            raise DatasetNotAvailable(f"{where}={str(given)!r}: no file there. Pass the path of a CHAIR synonym "
                                      f"list ({_chair_synonyms_described()}), or leave it unset to use the cached "
                                      f"copy at {chair_synonyms_cache()}")
        return p
    cache = chair_synonyms_cache()
    if cache.is_file():
        got = _sha256(cache.read_bytes())
        if got != CHAIR_SYNONYMS_SHA256:
            raise DatasetNotAvailable(
                f"{cache} is not CHAIR's published synonym list (sha256 {got}, expected {CHAIR_SYNONYMS_SHA256}): "
                f"replace it with {_chair_synonyms_described()} unchanged, or delete it to download it again; "
                f"to use another list on purpose, pass synonyms= its path (or set ${CHAIR_SYNONYMS_ENV})")
        return cache
    place = (f"place {_chair_synonyms_described()} at {cache} once, or pass synonyms= its path "
             f"(or set ${CHAIR_SYNONYMS_ENV})")
    if not download:
        raise DatasetNotAvailable(f"CHAIR's COCO synonym list is not on this machine (download=False): {place}")
    if not online(GITHUB_RAW_HOST):
        raise DatasetNotAvailable(f"CHAIR's COCO synonym list is not on this machine and {GITHUB_RAW_HOST} is "
                                  f"unreachable (offline): {place}")
    import urllib.request

    try:
        with urllib.request.urlopen(CHAIR_SYNONYMS_URL, timeout=30) as r:
            data = r.read()
    except OSError as e:  # URLError, HTTPError and timeouts are OSErrors
        raise DatasetNotAvailable(f"downloading CHAIR's COCO synonym list from {CHAIR_SYNONYMS_URL} failed ({e}): "
                                  f"{place}") from e
    got = _sha256(data)
    if got != CHAIR_SYNONYMS_SHA256:
        raise DatasetNotAvailable(f"the file downloaded from {CHAIR_SYNONYMS_URL} has sha256 {got}, not "
                                  f"{CHAIR_SYNONYMS_SHA256} (the published list at commit {CHAIR_SYNONYMS_COMMIT}); "
                                  f"nothing was cached. {place[0].upper() + place[1:]}")
    from mechlib.results import atomic_write_bytes

    atomic_write_bytes(cache, data)
    return cache


# --- text datasets -------------------------------------------------------------------------------


def _read_records(path: Path) -> list[dict]:
    """Rows of a .jsonl / .json / .jsonl.gz / .json.gz / .parquet / .csv file as dicts."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    if name.endswith(".csv"):
        import pandas as pd

        return pd.read_csv(path).to_dict("records")
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        text = f.read()
    stripped = text.lstrip()
    if name.endswith((".json", ".json.gz")) and stripped.startswith("["):
        return json.loads(text)
    if name.endswith((".json", ".json.gz")) and stripped.startswith("{") and "\n{" not in stripped.strip():
        doc = json.loads(text)
        for key in ("data", "rows", "examples"):
            if isinstance(doc.get(key), list):
                return doc[key]
        raise ValueError(f"{path}: a JSON object without a 'data'/'rows' list")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


_TABLE_EXTS = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv")


def _find_table(folder: Path, stem: str) -> Optional[Path]:
    return _first_existing(folder / f"{stem}{ext}" for ext in _TABLE_EXTS)


def _hub_rows(hub_id: str, config: Optional[str], split: str, *, what: str, place: str) -> list[dict]:
    """Rows of a hub dataset through ``datasets`` (online only), or DatasetNotAvailable."""
    import importlib.util

    if not online(HF_HOST):
        raise DatasetNotAvailable(f"{what} is not on this machine and {HF_HOST} is unreachable (offline): {place}")
    if importlib.util.find_spec("datasets") is None:
        raise DatasetNotAvailable(f"{what} is not on this machine and the `datasets` library is not installed "
                                  f"(pip install datasets): {place}")
    from datasets import load_dataset

    ds = load_dataset(hub_id, config, split=split, cache_dir=str(datasets_dir() / "hf"))
    return [dict(r) for r in ds]


def _cache_rows(path: Path, rows: list[dict]) -> None:
    try:
        _atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
    except OSError:
        pass


@dataclass(frozen=True)
class _ActSpec:
    act_id: tuple            # what ACT's utils/data_utils.py passes to load_dataset
    hub_id: tuple            # the current hub location (repo, config)
    train_split: str
    eval_split: str
    instruction: str
    template: str
    labels: tuple[str, ...]
    label_key: str = "label"

    @property
    def fields(self) -> list[str]:
        import string

        return [f for _, f, _, _ in string.Formatter().parse(self.template) if f]


# ACT (Yu et al. 2024), utils/data_utils.py get_classification_dataset: datasets, splits, prompts, labels.
ACT_DATASETS: dict[str, _ActSpec] = {
    "sst2": _ActSpec(("glue", "sst2"), ("nyu-mll/glue", "sst2"), "train", "validation",
                     "Classify the sentiment of the user's message into one of the following categories:'positive' or 'negative'.\n\n",
                     "Sentence: {sentence} \nSentiment: ", (" negative", " positive")),
    "sst5": _ActSpec(("SetFit/sst5", None), ("SetFit/sst5", None), "train", "validation",
                     "Classify the sentiment of the user's message into one of the following categories:'terrible', 'negative', 'neutral', 'positive', or 'great'.\n\n",
                     "Sentence: {text} \nSentiment: ", (" terrible", " negative", " neutral", " positive", " great")),
    "MR": _ActSpec(("rotten_tomatoes", None), ("cornell-movie-review-data/rotten_tomatoes", None), "train", "validation",
                   "Classify the sentiment of the movie's review into one of the following categories:'positive' or 'negative'.\n\n",
                   "Review: {text} \nSentiment: ", (" negative", " positive")),
    "SUBJ": _ActSpec(("SetFit/subj", None), ("SetFit/subj", None), "train", "test",
                     "Classify the sentiment polarity of the movie's review into one of the following categories: 'subjective' or 'object'.\n\n",
                     "Input: {text} \nType: ", (" objective", " subjective")),
    "DBPedia": _ActSpec(("dbpedia_14", None), ("fancyzhx/dbpedia_14", None), "train", "test",
                        "Classify the given text into one of the most relevant categories: 'company', 'school', 'artist', 'sport', 'politics', 'transportation', 'building', 'nature', 'village', 'animal', 'plant', 'album', 'film', or 'book'.\n\n",
                        "Input: {content} \nType: ",
                        (" company", " school", " artist", " sport", " politics", " transportation", " building",
                         " nature", " village", " animal", " plant", " album", " film", " book")),
    "AGNews": _ActSpec(("ag_news", None), ("fancyzhx/ag_news", None), "train", "test",
                       "Classify the news articles into the categories of 'World', 'Sports', 'Business', or 'Technology'.\n\n",
                       "Article: {text} \nCategory: ", (" World", " Sports", " Business", " Technology")),
    "TREC": _ActSpec(("trec", None), ("CogComp/trec", None), "train", "test",
                     "Classify the given questions into the following categories of 'Description', 'Entity', 'Expression', 'Person', 'Number', or 'Location'.\n\n",
                     "Question: {text} \nType: ", (" Description", " Entity", " Expression", " Person", " Number", " Location"),
                     label_key="coarse_label"),
    "CB": _ActSpec(("super_glue", "cb"), ("aps/super_glue", "cb"), "train", "validation",
                   "Read the following paragraph and determine if the hypothesis is true.\n\n",
                   "Premise: {premise} Hypothesis: {hypothesis}. Answer: ", ("Yes", "No", "Maybe")),
    "BoolQ": _ActSpec(("super_glue", "boolq"), ("aps/super_glue", "boolq"), "train", "validation",
                      "Read the text and answer the question by True or False.\n\n",
                      "Text: {passage} Question: {question}? \nAnswer: ", (" False", " True")),
}


@dataclass(frozen=True)
class ActDataset:
    """One of ACT's classification datasets, with ACT's instruction, template and label words.

    ``prompts[i]`` is ACT's zero-shot prompt (instruction + template); the model's prediction is the
    argmax over the log-probabilities of the last token of each ``label_choices`` entry at the last
    position; ``labels[i]`` indexes ``label_choices``.
    """

    name: str
    split: str
    instruction: str
    template: str
    label_choices: tuple[str, ...]
    examples: tuple[Mapping[str, Any], ...] = field(repr=False)

    @property
    def labels(self) -> list[int]:
        return [int(e["label"]) for e in self.examples]

    @property
    def prompts(self) -> list[str]:
        return [self.instruction + self.template.format(**e) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)


def load_act_dataset(name: str, *, split: Optional[str] = None, root: Optional[PathLike] = None,
                     n: Optional[int] = None, seed: int = 0) -> ActDataset:
    """One of ACT's classification datasets (Yu et al. 2024, ``utils/data_utils.py``).

    Args:
        name: one of ``ACT_DATASETS``: sst2, sst5, MR, SUBJ, AGNews, TREC, CB, BoolQ, DBPedia.
        split: ``"train"`` (ACT calibrates on 900 train samples) or the evaluation split (default:
            ACT's — validation or test, per dataset).
        root: a folder holding ``{name}/{split}.jsonl`` (or .json/.parquet/.csv) with the hub's columns.
        n: keep a seeded random sample of n examples (``None``: all, in file order).

    >>> ds = load_act_dataset("sst2", n=100)                       # doctest: +SKIP
    >>> ds.prompts[0], ds.label_choices, ds.labels[0]              # doctest: +SKIP
    """
    if name not in ACT_DATASETS:
        lowered = {k.lower(): k for k in ACT_DATASETS}
        if name.lower() in lowered:
            name = lowered[name.lower()]
        else:
            raise ValueError(f"name={name!r} is not one of ACT's classification datasets {sorted(ACT_DATASETS)}")
    spec = ACT_DATASETS[name]
    split = split or spec.eval_split
    if split not in (spec.train_split, spec.eval_split):
        raise ValueError(f"split={split!r}: ACT uses {spec.train_split!r} (calibration) and {spec.eval_split!r} "
                         f"(evaluation) for {name}")
    cache = datasets_dir() / "act" / name
    folders = ([Path(root).expanduser() / name, Path(root).expanduser()] if root is not None else []) + [cache]
    path = next((p for p in (_find_table(f, split) for f in folders) if p), None)
    cols = spec.fields + [spec.label_key]
    place = (f"place {cache / f'{split}.jsonl'} (one JSON object per line with the fields {cols})"
             + (f" or {Path(root) / name / f'{split}.jsonl'}" if root is not None else ", or pass root= a folder "
                f"holding {name}/{split}.jsonl") + f"; with the network it is read from the hub ({spec.hub_id[0]})")
    if path is not None:
        rows = _read_records(path)
    else:
        rows = _hub_rows(spec.hub_id[0], spec.hub_id[1], split, what=f"ACT dataset {name!r} ({split})", place=place)
        _cache_rows(cache / f"{split}.jsonl", rows)
        path = cache / f"{split}.jsonl"
    for k, r in enumerate(rows):
        absent = [c for c in cols if c not in r]
        if absent:
            raise ValueError(f"{path}: row {k} lacks {absent}; ACT's {name} rows need {cols}")
    examples = [{**{f: r[f] for f in spec.fields}, "label": int(r[spec.label_key])} for r in rows]
    if n is not None:
        if n > len(examples):
            raise ValueError(f"n={n} but {path} has {len(examples)} examples")
        examples = random.Random(seed).sample(examples, n)
    return ActDataset(name=name, split=split, instruction=spec.instruction, template=spec.template,
                      label_choices=spec.labels, examples=tuple(examples))


# (hub repo, config, split, text column, joiner, documents kept, local file names)
_PPL = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n", None,
                  ("wiki.test.raw", "wikitext-2-raw/wiki.test.raw", "wikitext-2-raw-v1/wiki.test.raw")),
    "c4": ("NeelNanda/c4-10k", None, "train", "text", " ", 5000,
           tuple(f"c4-10k{e}" for e in _TABLE_EXTS)),
    "c4-validation": ("allenai/c4", "en", "validation", "text", " ", 1100,
                      ("c4-validation.00000-of-00008.json.gz", "en/c4-validation.00000-of-00008.json.gz")),
}


def load_perplexity_text(name: str = "wikitext2", *, root: Optional[PathLike] = None) -> str:
    """The evaluation text of a perplexity benchmark, joined as Sun et al.'s ``lib/load_data.py`` does.

    * ``"wikitext2"``: WikiText-2 (raw) test, rows joined with ``"\\n\\n"`` (Sun et al.; also the
      SparseGPT/Wanda convention). Local file: ``wiki.test.raw`` (from ``wikitext-2-raw-v1.zip``),
      read line by line.
    * ``"c4"``: the first 5,000 documents of ``NeelNanda/c4-10k`` joined with ``" "`` (Sun et al.'s C4).
    * ``"c4-validation"``: the first 1,100 documents of C4's validation shard
      ``en/c4-validation.00000-of-00008.json.gz`` joined with ``" "`` (the SparseGPT/Wanda C4).

    Tokenize the result without special tokens and cut it into fixed-length windows (Sun et al.:
    4,096 tokens for Llama-2).

    >>> text = load_perplexity_text("wikitext2")                   # doctest: +SKIP
    """
    if name not in _PPL:
        raise ValueError(f"name={name!r} is not one of {sorted(_PPL)}")
    hub, config, split, col, joiner, keep, files = _PPL[name]
    cache = datasets_dir() / "text" / name
    folders = ([Path(root).expanduser()] if root is not None else []) + [cache]
    path = _first_existing(f / fn for f in folders for fn in files)
    place = (f"place {files[0]} in {cache}" + (f" or in root={str(root)!r}" if root is not None else " or pass root= "
             "a folder holding it") + f"; with the network it is read from the hub ({hub})")
    if path is not None:
        if path.name.endswith(".raw") or path.suffix == ".txt":
            rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
        else:
            rows = [r[col] for r in _read_records(path)]
    else:
        rows = [r[col] for r in _hub_rows(hub, config, split, what=f"the {name} text", place=place)]
        _cache_rows(cache / f"{files[0].split('/')[-1].split('.')[0]}.jsonl", [{col: r} for r in rows])
    if keep is not None:
        rows = rows[:keep]
    return joiner.join(rows)


REWARDBENCH_REASONING = ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust")


def load_rewardbench(*, subsets: Union[str, Sequence[str]] = "reasoning", root: Optional[PathLike] = None) -> list[dict]:
    """RewardBench pairs (Lambert et al. 2024; PINE evaluates LM-as-a-judge on its reasoning subsets).

    Args:
        subsets: ``"reasoning"`` (math-prm and the six HumanEvalPack languages), ``"all"``, or a
            list of subset names.
        root: a folder holding ``filtered.jsonl`` (or .json/.parquet): the ``filtered`` split of
            ``allenai/reward-bench`` with columns prompt, chosen, rejected, subset, id.

    Returns:
        ``[{"id", "subset", "prompt", "chosen", "rejected"}]`` in file order.

    >>> pairs = load_rewardbench()                                  # doctest: +SKIP
    """
    if subsets == "reasoning":
        wanted: Optional[set] = set(REWARDBENCH_REASONING)
    elif subsets == "all":
        wanted = None
    elif isinstance(subsets, str):
        raise ValueError(f"subsets={subsets!r}: use 'reasoning', 'all' or a list of subset names")
    else:
        wanted = set(subsets)
    cache = datasets_dir() / "rewardbench"
    folders = ([Path(root).expanduser()] if root is not None else []) + [cache]
    path = next((p for p in (_find_table(f, "filtered") for f in folders) if p), None)
    place = (f"place {cache / 'filtered.jsonl'} (columns prompt, chosen, rejected, subset, id)"
             + (f" or {Path(root) / 'filtered.jsonl'}" if root is not None else ", or pass root= a folder holding it")
             + "; with the network it is read from the hub (allenai/reward-bench, split 'filtered')")
    if path is not None:
        rows = _read_records(path)
    else:
        rows = _hub_rows("allenai/reward-bench", None, "filtered", what="RewardBench", place=place)
        _cache_rows(cache / "filtered.jsonl", rows)
    cols = ("prompt", "chosen", "rejected", "subset")
    out = []
    for k, r in enumerate(rows):
        absent = [c for c in cols if c not in r]
        if absent:
            raise ValueError(f"RewardBench row {k} lacks {absent}; rows need {list(cols) + ['id']}")
        if wanted is None or r["subset"] in wanted:
            out.append({"id": r.get("id", k), "subset": r["subset"], "prompt": r["prompt"],
                        "chosen": r["chosen"], "rejected": r["rejected"]})
    if wanted is not None:
        unknown = wanted - {r["subset"] for r in rows}
        if unknown and not out:
            raise ValueError(f"no RewardBench rows in subsets {sorted(unknown)}")
    return out


__all__ = ["load_act_dataset", "ActDataset", "ACT_DATASETS", "load_perplexity_text",
           "load_rewardbench", "REWARDBENCH_REASONING", "DatasetNotAvailable", "datasets_dir", "online",
           "chair_synonyms_path", "chair_synonyms_cache", "CHAIR_SYNONYMS_URL", "CHAIR_SYNONYMS_SHA256",
           "CHAIR_SYNONYMS_COMMIT", "CHAIR_SYNONYMS_ENV"]
