"""COCO val2014 for CHAIR and POPE: the annotations, a seeded sample of images, and each image's
CHAIR ground truth (its instance categories and the COCO objects its captions name, mapped with
CHAIR's synonym list). It sits above :mod:`mechlib.evals.datasets` (where files are looked for,
downloads, the cache) and :mod:`mechlib.evals.chair` (the synonym list and caption rules), and
neither imports it.

Files are looked for in ``root=``, then ``<datasets_dir()>/coco``; with the network the official
annotations zip and the images one by one are downloaded there (progress bars, atomic writes);
offline a missing file raises :class:`~mechlib.evals.datasets.DatasetNotAvailable` naming it and
where to place it.
"""

from __future__ import annotations

import json
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from mechlib.evals.chair import _caption_objects, _category_of_instance, vocabulary
from mechlib.evals.datasets import (
    DatasetNotAvailable,
    PathLike,
    _atomic_write_text,
    _download,
    _first_existing,
    datasets_dir,
    online,
)
from mechlib.results import atomic_write_bytes

COCO_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2014.zip"
COCO_IMAGE_URL = "http://images.cocodataset.org/{split}/{file_name}"
COCO_HOST = "images.cocodataset.org"


@dataclass(frozen=True)
class CocoRecord:
    """One COCO image with what CHAIR and POPE need.

    ``categories``: its instance categories (COCO names, first-annotated first) — POPE's objects.
    ``objects``: CHAIR's ground truth (categories ∪ COCO objects named in ``captions``).
    ``path``: the image file (``None`` when loaded with ``images=False``); :meth:`image` opens it.
    """

    image_id: int
    file_name: str
    path: Optional[Path]
    categories: tuple[str, ...]
    objects: frozenset[str]
    captions: tuple[str, ...] = field(repr=False)

    def image(self):
        """The image as an RGB ``PIL.Image``."""
        if self.path is None:
            raise ValueError(f"image {self.image_id} was loaded without its file (images=False); "
                             "call load_coco(..., images=True)")
        from PIL import Image

        with Image.open(self.path) as im:
            return im.convert("RGB")


def _coco_dirs(root: Optional[PathLike]) -> list[Path]:
    dirs = []
    if root is not None:
        r = Path(root).expanduser()
        if not r.is_dir():
            raise DatasetNotAvailable(f"root={str(root)!r} is not a folder")
        dirs += [r, r / "annotations"]
    base = datasets_dir() / "coco"
    dirs += [base / "annotations"]
    return dirs


def _coco_annotations(root: Optional[PathLike], split: str, download: bool) -> tuple[Path, Path]:
    names = (f"captions_{split}.json", f"instances_{split}.json")
    dirs = _coco_dirs(root)
    found = [_first_existing(d / n for d in dirs) for n in names]
    if all(found):
        return found[0], found[1]
    target = datasets_dir() / "coco" / "annotations"
    missing = [n for n, f in zip(names, found) if f is None]
    where = f"{target}" + (f" or in root={str(root)!r}" if root is not None else "")
    if not download or split not in ("val2014", "train2014"):
        raise DatasetNotAvailable(f"COCO annotations {', '.join(missing)} not found: place them in {where} "
                                  f"(they are in {COCO_ANNOTATIONS_URL}), or pass root= a folder holding them")
    if not online(COCO_HOST, 80):
        raise DatasetNotAvailable(f"COCO annotations {', '.join(missing)} not found and {COCO_HOST} is unreachable "
                                  f"(offline): place {' and '.join(missing)} in {where}, from {COCO_ANNOTATIONS_URL}")
    zpath = _download(COCO_ANNOTATIONS_URL, datasets_dir() / "coco" / "annotations_trainval2014.zip",
                      desc="COCO annotations (241 MB)")
    with zipfile.ZipFile(zpath) as z:
        for n in names:
            data = z.read(f"annotations/{n}")
            atomic_write_bytes(target / n, data)
    zpath.unlink()
    return target / names[0], target / names[1]


def _coco_index(captions_path: Path, instances_path: Path, split: str) -> dict:
    """A compact per-image index (file name, categories, captions), cached beside the annotations."""
    from tqdm.auto import tqdm

    stamp = [captions_path.stat().st_size, instances_path.stat().st_size]
    cache = datasets_dir() / "coco" / f"index_{split}.json"
    if cache.is_file():
        try:
            idx = json.loads(cache.read_text())
            if idx.get("stamp") == stamp and idx.get("sources") == [str(captions_path), str(instances_path)]:
                return idx
        except (OSError, ValueError):
            pass
    with open(instances_path) as f:
        inst = json.load(f)
    with open(captions_path) as f:
        caps = json.load(f)
    names = {c["id"]: c["name"] for c in inst["categories"]}
    images = {im["id"]: {"file_name": im["file_name"], "categories": [], "captions": []} for im in inst["images"]}
    for im in caps.get("images", []):
        images.setdefault(im["id"], {"file_name": im["file_name"], "categories": [], "captions": []})
    for ann in tqdm(inst["annotations"], desc="COCO instances", leave=False):
        cats = images[ann["image_id"]]["categories"]
        name = names[ann["category_id"]]
        if name not in cats:
            cats.append(name)
    for ann in tqdm(caps["annotations"], desc="COCO captions", leave=False):
        images[ann["image_id"]]["captions"].append(ann["caption"])
    idx = {"stamp": stamp, "sources": [str(captions_path), str(instances_path)],
           "images": {str(k): v for k, v in images.items()}}
    try:
        _atomic_write_text(cache, json.dumps(idx))
    except OSError:
        pass  # a read-only cache only costs the re-indexing next time
    return idx


def _coco_image_path(root: Optional[PathLike], split: str, file_name: str) -> Optional[Path]:
    cands = []
    if root is not None:
        r = Path(root).expanduser()
        cands += [r / split / file_name, r / "images" / split / file_name, r / file_name]
    cands.append(datasets_dir() / "coco" / split / file_name)
    return _first_existing(cands)


def load_coco(n: Optional[int] = 500, *, root: Optional[PathLike] = None, split: str = "val2014", seed: int = 0,
              image_ids: Optional[Sequence[int]] = None, images: bool = True, download: bool = True,
              synonyms: Optional[PathLike] = None) -> list[CocoRecord]:
    """A seeded sample of COCO images with their CHAIR ground truth, POPE objects and captions.

    Args:
        n: images to sample (``random.Random(seed).sample`` over the sorted image ids; the papers
            use 500). ``None``: every image of the split, sorted by id.
        root: a folder with ``captions_{split}.json`` / ``instances_{split}.json`` (directly or in
            ``annotations/``) and the images (in ``{split}/``, ``images/{split}/`` or directly).
        split: ``"val2014"`` (the papers') or another COCO split whose files you have.
        seed: the sampling seed.
        image_ids: load exactly these images instead of sampling.
        images: also locate (and if needed download) the image files; ``False`` loads annotations only.
        download: allow downloading missing files when the network answers.
        synonyms: the CHAIR synonym list that maps categories and caption words to ``objects``
            (a path; default: :func:`chair_synonyms_path` — ``$MECHLIB_CHAIR_SYNONYMS``, the
            cached published list, or a download of it).

    Returns:
        ``[CocoRecord]`` in sample order.

    Raises:
        DatasetNotAvailable: a file is missing and cannot be downloaded (offline); the message
            names the file and the folder to place it in. The synonym list is looked for after the
            annotations and before any image is downloaded.

    >>> recs = load_coco(500, seed=0)                      # doctest: +SKIP
    >>> recs[0].objects, recs[0].image().size              # doctest: +SKIP
    """
    cap_path, inst_path = _coco_annotations(root, split, download)
    idx = _coco_index(cap_path, inst_path, split)["images"]
    if image_ids is not None:
        missing = [i for i in image_ids if str(int(i)) not in idx]
        if missing:
            raise KeyError(f"image ids {missing[:5]} are not in COCO {split} ({inst_path})")
        ids = [int(i) for i in image_ids]
    else:
        all_ids = sorted(int(k) for k in idx)
        if n is None:
            ids = all_ids
        elif n > len(all_ids):
            raise ValueError(f"n={n} but COCO {split} ({inst_path}) has {len(all_ids)} images")
        else:
            ids = random.Random(seed).sample(all_ids, n)
    vocab = vocabulary(synonyms=synonyms, download=download)
    paths: dict[int, Optional[Path]] = {}
    if images:
        missing = []
        for i in ids:
            p = _coco_image_path(root, split, idx[str(i)]["file_name"])
            paths[i] = p
            if p is None:
                missing.append(i)
        if missing:
            target = datasets_dir() / "coco" / split
            first = idx[str(missing[0])]["file_name"]
            if not download:
                raise DatasetNotAvailable(f"{len(missing)} of {len(ids)} COCO images are missing (e.g. {first}): "
                                          f"place them in {target}" + (f" or {Path(root) / split}" if root else "")
                                          + ", or pass images=False")
            if not online(COCO_HOST, 80):
                raise DatasetNotAvailable(f"{len(missing)} of {len(ids)} COCO images are missing (e.g. {first}) and "
                                          f"{COCO_HOST} is unreachable (offline): place them in {target}"
                                          + (f" or {Path(root) / split}" if root else "")
                                          + f" (from {COCO_IMAGE_URL.format(split=split, file_name=first)}), or pass images=False")
            from tqdm.auto import tqdm

            for i in tqdm(missing, desc=f"COCO {split} images"):
                fn = idx[str(i)]["file_name"]
                paths[i] = _download(COCO_IMAGE_URL.format(split=split, file_name=fn), target / fn, desc=fn)
    out = []
    for i in ids:
        e = idx[str(i)]
        gt = {_category_of_instance(vocab, c, where=f"COCO {split} image {i} ({inst_path})") for c in e["categories"]}
        for c in e["captions"]:
            gt.update(_caption_objects(c, vocab, "rohrbach").objects)
        out.append(CocoRecord(image_id=i, file_name=e["file_name"], path=paths.get(i), categories=tuple(e["categories"]),
                              objects=frozenset(gt), captions=tuple(e["captions"])))
    return out


__all__ = ["load_coco", "CocoRecord"]
