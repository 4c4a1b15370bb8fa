"""Prompts built from parts, with the token span of each segment (options, documents).

Used by position-bias analyses and :func:`mechlib.interventions.position_invariant` (PINE), which
need to know exactly where each option starts and ends. Each part is tokenized on its own (no
BOS) and the pieces are concatenated after one BOS, so a segment has the same tokens wherever it is
placed, and swapping two segments swaps exactly their token blocks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from mechlib.tasks.contrast import ContrastSetError, PromptBatch, _check_strings, _pad_id, _pad_right
from mechlib.tasks.data import load_data


@dataclass(frozen=True)
class SegmentedPrompts(PromptBatch):
    """A :class:`PromptBatch` (right-padded tokens, lengths) that also knows, per prompt, the
    ``(start, end)`` token span (end exclusive) of each segment, in the order they appear. Every
    analysis that takes prompts accepts it."""

    segments: tuple[tuple[tuple[int, int], ...], ...] = ()

    @classmethod
    def from_parts(cls, model, prefixes: Sequence[str], segments: Sequence[Sequence[str]],
                   suffixes: Sequence[str]) -> "SegmentedPrompts":
        """``prefixes[i] + segments[i][0] + ... + segments[i][-1] + suffixes[i]`` for each prompt.

        Example:
            >>> sp = SegmentedPrompts.from_parts(model, ["Q: pick one.\\n"],      # doctest: +SKIP
            ...                                  [["- apple\\n", "- hammer\\n"]], ["Answer:"])
        """
        prefixes = _check_strings("prefixes", prefixes)
        suffixes = _check_strings("suffixes", suffixes, len(prefixes))
        if len(segments) != len(prefixes):
            raise ContrastSetError(f"segments has {len(segments)} entries for {len(prefixes)} prefixes; "
                                   "give one list of segment strings per prompt")
        if not prefixes:
            raise ContrastSetError("no prompts: give at least one prefix/segments/suffix")
        tok = model.tokenizer
        bos = tok.bos_token_id
        seqs, spans, texts = [], [], []
        for i, (pre, segs, suf) in enumerate(zip(prefixes, segments, suffixes)):
            segs = _check_strings(f"segments[{i}]", segs)
            if not segs:
                raise ContrastSetError(f"segments[{i}] is empty: give at least one segment")
            ids = [] if bos is None else [bos]
            ids += tok.encode(pre, add_special_tokens=False)
            sp = []
            for j, s in enumerate(segs):
                piece = tok.encode(s, add_special_tokens=False)
                if not piece:
                    raise ContrastSetError(f"segments[{i}][{j}] ({s!r}) has no tokens")
                sp.append((len(ids), len(ids) + len(piece)))
                ids += piece
            ids += tok.encode(suf, add_special_tokens=False)
            seqs.append(torch.tensor(ids))
            spans.append(tuple(sp))
            texts.append(pre + "".join(segs) + suf)
        return cls(_pad_right(seqs, _pad_id(model)), torch.tensor([len(s) for s in seqs]),
                   tuple(texts), {}, tuple(spans))


@dataclass(frozen=True)
class OptionPrompts(SegmentedPrompts):
    """Multiple-choice prompts whose options are the segments, each item asked in every order.

    ``answer_ids``/``wrong_ids`` ``[batch]``: the token read for the correct / the wrong option;
    ``correct_slot`` ``[batch]``: the segment (0 = first) holding the correct option;
    ``item`` ``[batch]``: which question each prompt asks (rows of one item differ only in order).
    """

    answer_ids: Tensor = None
    wrong_ids: Tensor = None
    correct_slot: Tensor = None
    item: Tensor = None

    def logit_diff(self, logits: Tensor) -> Tensor:
        """``[batch]`` logit(correct) − logit(wrong) at each prompt's last token, from ``[batch, pos,
        vocab]`` logits or ``[batch, vocab]`` ones already read there (:func:`mechlib.hooks.forward_last`)."""
        last = logits if logits.ndim == 2 else self.at_last(logits)
        rows = torch.arange(len(self), device=last.device)
        return last[rows, self.answer_ids.to(last.device)] - last[rows, self.wrong_ids.to(last.device)]


def pairwise_choice(model, n: Optional[int] = None, *, format: str = "options", seed: int = 0) -> OptionPrompts:
    """Two-option questions from ``data/pairwise.json``, each asked twice (correct option first,
    then second; rows ``2i`` and ``2i+1``).

    Args:
        n: number of items (default all that fit the tokenizer), sampled with ``seed``.
        format: ``"options"`` — the options are listed ("- apple") and the answer is the option's
            own token; ``"labels"`` — the LM-as-a-judge form of the PINE paper ("Answer A: apple",
            answered with " A"/" B"; the label travels with its slot, as in the paper's prompts).
    """
    data = load_data("pairwise")
    if format not in data["formats"]:
        raise ValueError(f"format={format!r}; choose one of {sorted(data['formats'])}")
    fmt = data["formats"][format]
    tok = model.tokenizer

    def one_token(text: str) -> Optional[int]:
        ids = tok.encode(text, add_special_tokens=False)
        return ids[0] if len(ids) == 1 else None

    items = [it for it in data["items"]
             if all(one_token(fmt["answer"].format(option=o, label="A")) is not None for o in it[1:])]
    if n is not None:
        if not 1 <= n <= len(items):
            raise ContrastSetError(f"n={n}: data/pairwise.json has {len(items)} usable items")
        items = random.Random(seed).sample(items, n)
    pre, segs, suf, ans, wrong, slot, item = [], [], [], [], [], [], []
    for i, (question, correct, other) in enumerate(items):
        for order in ((correct, other), (other, correct)):
            labels = ("A", "B")
            pre.append(fmt["prefix"].format(question=question))
            segs.append([fmt["segment"].format(label=lab, option=o) for lab, o in zip(labels, order)])
            suf.append(fmt["suffix"])
            k = order.index(correct)
            ans.append(one_token(fmt["answer"].format(option=correct, label=labels[k])))
            wrong.append(one_token(fmt["answer"].format(option=other, label=labels[1 - k])))
            slot.append(k)
            item.append(i)
    sp = SegmentedPrompts.from_parts(model, pre, segs, suf)
    return OptionPrompts(sp.tokens, sp.lengths, sp.prompts, {}, sp.segments, torch.tensor(ans),
                         torch.tensor(wrong), torch.tensor(slot), torch.tensor(item))
