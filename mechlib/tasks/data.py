"""Access to the task data shipped as package data ``mechlib.data`` (the repo's ``data/``)."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=None)
def load_data(name: str) -> dict:
    """The parsed JSON file ``data/<name>.json``."""
    try:
        text = resources.files("mechlib.data").joinpath(f"{name}.json").read_text()
    except FileNotFoundError:
        raise ValueError(f"no task data named {name!r} in mechlib's data/") from None
    return json.loads(text)


def vocabulary_words() -> list[str]:
    """Every word and punctuation mark in the task data (the tiny models' vocabulary)."""
    words: set[str] = set()

    def walk(x):
        if isinstance(x, str):
            words.update(re.findall(r"\w+|[^\w\s]+", re.sub(r"\{\w+\}", " ", x)))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for name in ("ioi", "colored_objects", "capitals"):
        walk(load_data(name))
    return sorted(words)
