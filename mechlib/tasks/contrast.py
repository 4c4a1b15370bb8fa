"""``ContrastSet``: clean / corrupted prompt pairs with one-token answers, validated once.

Every causal analysis in mechlib compares a *clean* run with a *corrupted* run that differs in the
information the behaviour depends on (IOI: which name is repeated). A ContrastSet holds both,
tokenized exactly as ``model.to_tokens`` does (BOS prepended), right-padded, with each prompt's
own last-token index so metrics read the answer where the prompt ends, never at a pad.

Right padding is exact for causal models: pads sit after every real token, so no real position can
attend to them, and position ids of real tokens are unchanged (left padding would shift RoPE
positions).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor


class ContrastSetError(ValueError):
    """Bad input to a ContrastSet: the message names the prompt index and what to do."""


def _check_strings(name: str, values: Sequence[str], n: Optional[int] = None) -> list[str]:
    if isinstance(values, str):
        raise ContrastSetError(f"{name} must be a list of strings, got a single string {values!r}")
    values = list(values)
    if n is not None and len(values) != n:
        raise ContrastSetError(f"{name} has {len(values)} entries but clean has {n}: give one per prompt")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ContrastSetError(f"{name}[{i}] is {type(v).__name__}, expected str")
        if not v.strip():
            raise ContrastSetError(f"{name}[{i}] is empty: every prompt and answer needs text")
    return values


def _text_token_ids(tokenizer, text: str) -> list[int]:
    """The token ids of ``text`` as it reads after a prompt (no special tokens).

    SentencePiece tokenizers with a dummy prefix (Llama-2, Mistral; transformers' "legacy" mode)
    encode ``" Paris"`` on its own as ``['▁', '▁Paris']``, while in running text ("... is Paris")
    the word is the one token ``'▁Paris'``, which carries its space. Where the leading space
    encodes as bare space tokens followed by exactly the encoding of the rest, and that begins with a
    ``'▁'`` word piece, the rest's ids are the answer. Byte-level BPE (GPT-2, Llama-3, SmolLM2) and
    SentencePiece without a dummy prefix (Gemma) encode ``" Paris"`` as one token, and a vocabulary
    that splits off a bare ``' '`` before an unmarked word keeps both tokens (after a prompt the
    space is the next token).
    """
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) > 1 and text.startswith(" ") and not text.startswith("  "):
        rest = tokenizer.encode(text[1:], add_special_tokens=False)
        head = ids[:len(ids) - len(rest)]
        if (rest and head and ids[len(head):] == rest
                and str(tokenizer.convert_ids_to_tokens(rest[0])).startswith("\u2581")
                and all(tokenizer.convert_ids_to_tokens(i) == "\u2581" for i in head)):
            return rest
    return ids


def single_token_id(model, text: str, *, what: str = "answer") -> int:
    """The id of ``text`` if it is exactly one token for this model's tokenizer (as it reads after a
    prompt: :func:`_text_token_ids`), else a clear error."""
    ids = _text_token_ids(model.tokenizer, text)
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        hint = " (most BPE vocabularies want a leading space, e.g. ' Paris')" if not text.startswith(" ") else ""
        raise ContrastSetError(
            f"{what} {text!r} is {len(ids)} tokens for this tokenizer {pieces}; mechlib needs "
            f"single-token answers{hint}: pick another word"
        )
    return int(ids[0])


Span = Union[tuple[int, int], Sequence[tuple[int, int]], str, None]


def _pad_right(seqs: Sequence[Tensor], pad: int) -> Tensor:
    return torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=pad).long()


def _decode_each(model, tokens: Tensor) -> list[str]:
    """One string per token (TransformerLens' ``to_str_tokens``)."""
    return list(model.to_str_tokens(tokens.reshape(-1)))


def _pad_id(model) -> int:
    pad = model.tokenizer.pad_token_id
    return int(pad if pad is not None else (model.tokenizer.eos_token_id or 0))


@dataclass(frozen=True)
class PromptBatch:
    """Plain prompts for probes (no contrast): right-padded tokens and each prompt's length.

    Build with :meth:`from_prompts` from strings (``model.to_tokens`` each, BOS first) or a
    ``[batch, pos]`` token tensor (taken as unpadded).
    """

    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, "batch"]
    prompts: tuple[str, ...]
    extras: Mapping[str, Tensor] = field(default_factory=dict)

    @classmethod
    def from_prompts(cls, model, prompts, *, extras: Optional[Mapping[str, Tensor]] = None) -> "PromptBatch":
        """From strings, a token tensor, a PromptBatch (returned as is) or a :class:`ContrastSet`
        (its clean side; ``extras`` default to the set's)."""
        if isinstance(prompts, PromptBatch):
            return prompts
        if isinstance(prompts, ContrastSet):
            return cls(prompts.clean_tokens, prompts.lengths, prompts.clean_prompts,
                       dict(prompts.extras if extras is None else extras))
        if isinstance(prompts, Tensor):
            if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
                raise ContrastSetError(f"token prompts must be a non-empty [batch, pos] tensor, got {tuple(prompts.shape)}")
            toks = prompts.cpu().long()
            texts = tuple(model.tokenizer.decode(t) for t in toks)
            return cls(toks, torch.full((len(toks),), toks.shape[1]), texts, dict(extras or {}))
        prompts = _check_strings("prompts", prompts)
        if not prompts:
            raise ContrastSetError("prompts is empty: give at least one prompt")
        seqs = [model.to_tokens(p)[0].cpu() for p in prompts]
        return cls(_pad_right(seqs, _pad_id(model)), torch.tensor([len(s) for s in seqs]),
                   tuple(prompts), dict(extras or {}))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def mask(self) -> Tensor:
        """``[batch, pos]`` True on real tokens, False on padding."""
        return torch.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

    def str_tokens(self, model, i: int) -> list[str]:
        return _decode_each(model, self.tokens[i, : int(self.lengths[i])])

    def at_last(self, x: Tensor) -> Tensor:
        """``x[b, pos, ...]`` read at each prompt's last real token → ``[b, ...]`` (same device)."""
        rows = torch.arange(len(self), device=x.device)
        return x[rows, (self.lengths - 1).to(x.device)]

    def span_positions(self, model, span: "Span", contrast: Optional["ContrastSet"] = None) -> list[list[int]]:
        """Per prompt, the sorted token positions of ``span``: ``(start, end)`` for every prompt, one
        such pair per prompt, ``"image"`` (a VLM's image tokens), or ``None`` (the contrast set's
        own ``spans``). The first token and the last (answer) position must stay outside."""
        from mechlib.hooks import image_token_id

        B = len(self)
        if span is None:
            if contrast is None or not contrast.spans:
                raise ValueError("span is required: (start, end), one (start, end) per prompt, or 'image'")
            span = list(contrast.spans)
        if span == "image":
            tid = image_token_id(model)
            if tid is None:
                raise ValueError("span='image' needs a VLM; for a text model give the context span (start, end)")
            out = [(self.tokens[i, : int(self.lengths[i])] == tid).nonzero().flatten().tolist() for i in range(B)]
            empty = [i for i, o in enumerate(out) if not o]
            if empty:
                raise ValueError(f"prompt(s) {empty} have no image token ({tid}): nothing to remove")
            return out
        if isinstance(span, tuple) and len(span) == 2 and all(isinstance(x, int) for x in span):
            span = [span] * B
        span = list(span)
        if len(span) != B:
            raise ValueError(f"span has {len(span)} entries for {B} prompts")
        out = []
        for i, (s, e) in enumerate(span):
            L = int(self.lengths[i])
            if not (1 <= s < e < L):
                raise ValueError(f"prompt {i}: span ({s}, {e}) must satisfy 1 <= start < end < {L} (the prompt's "
                                 f"length; the first token and the answer position must stay)")
            out.append(list(range(s, e)))
        return out

    def without(self, model, positions: Sequence[Sequence[int]], *, drop_extras: bool = False) -> "PromptBatch":
        """The same prompts with the given token positions removed (re-padded on the right);
        ``drop_extras`` drops ``pixel_values`` too (the image goes with its tokens)."""
        seqs = []
        for i in range(len(self)):
            t = self.tokens[i, : int(self.lengths[i])]
            keep = torch.ones(len(t), dtype=torch.bool)
            keep[list(positions[i])] = False
            seqs.append(t[keep])
        return PromptBatch(_pad_right(seqs, _pad_id(model)), torch.tensor([len(t) for t in seqs]), self.prompts,
                           {} if drop_extras else dict(self.extras))

    def batches(self, size: Optional[int]) -> Iterator["PromptBatch"]:
        """Consecutive row slices of at most ``size`` prompts (same class; per-row fields sliced,
        padding trimmed to the slice's longest prompt)."""
        n = len(self)
        if size is None or size >= n:
            yield self
            return
        if size < 1:
            raise ValueError(f"batch_size={size} must be >= 1 (or None: all prompts in one forward)")
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            kw = {}
            for f in fields(self):
                v = getattr(self, f.name)
                if isinstance(v, (Tensor, tuple)) and len(v) == n:
                    v = v[rows]
                elif isinstance(v, Mapping) and v:  # extras (pixel_values): batch-first tensors
                    v = {k: x[rows] if isinstance(x, Tensor) and x.ndim and x.shape[0] == n else x
                         for k, x in v.items()}
                kw[f.name] = v
            kw["tokens"] = kw["tokens"][:, : int(kw["lengths"].max())]
            yield replace(self, **kw)


@dataclass(frozen=True)
class ContrastSet:
    """Validated clean/corrupted pairs. Build with :meth:`from_prompts` or a task generator.

    Attributes:
        clean_tokens, corrupted_tokens: ``[batch, pos]`` right-padded token ids (BOS first).
        answer_ids, wrong_ids: ``[batch]`` the correct and the contrasting answer token.
        last_pos: ``[batch]`` index of each prompt's last real token (where the answer is read).
        lengths: ``[batch]`` number of real tokens per prompt (``last_pos + 1``).
        labels: per-prompt labels (e.g. the IOI template family, ``"ABBA"``/``"BABA"``).
        extras: extra model inputs carried through every forward (``pixel_values`` for VLMs),
            each a tensor whose first axis is the batch.
        spans: optional per-prompt ``(start, end)`` token span of interest (the context passage of
            a context-QA prompt; what :func:`mechlib.head_divergence` removes).
        options: optional per-prompt candidate answer ids (e.g. the three colours of a Colored
            Objects scene), for ``metrics.accuracy(among="options")``.
        option_pos: optional per-prompt token positions where those options are mentioned in the
            prompt (same order as ``options``), for :meth:`option_positions`.
        prepend_bos: whether the prompts were tokenized with BOS first (``model.to_tokens``'s
            default; some papers' protocols use none, e.g. Merullo et al.'s GPT-2 prompts).
    """

    clean_tokens: Int[Tensor, "batch pos"]
    corrupted_tokens: Int[Tensor, "batch pos"]
    answer_ids: Int[Tensor, "batch"]
    wrong_ids: Int[Tensor, "batch"]
    last_pos: Int[Tensor, "batch"]
    clean_prompts: tuple[str, ...]
    corrupted_prompts: tuple[str, ...]
    answers: tuple[str, ...]
    wrong_answers: tuple[str, ...]
    labels: tuple[str, ...] = ()
    task: str = "custom"
    pad_id: int = 0
    extras: Mapping[str, Tensor] = field(default_factory=dict)
    corrupted_extras: Optional[Mapping[str, Tensor]] = None
    spans: tuple[tuple[int, int], ...] = ()
    options: tuple[tuple[int, ...], ...] = ()
    option_pos: tuple[tuple[int, ...], ...] = ()
    prepend_bos: bool = True

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_prompts(
        cls,
        model,
        clean: Sequence[str],
        corrupted: Sequence[str],
        answers: Sequence[str],
        wrong_answers: Sequence[str],
        *,
        labels: Optional[Sequence[str]] = None,
        task: str = "custom",
        extras: Optional[Mapping[str, Tensor]] = None,
        corrupted_extras: Optional[Mapping[str, Tensor]] = None,
        options: Optional[Sequence[Sequence[str]]] = None,
        option_pos: Optional[Sequence[Sequence[int]]] = None,
        prepend_bos: bool = True,
    ) -> "ContrastSet":
        """Tokenize and validate plain strings.

        Args:
            model: the bridge whose tokenizer defines tokens (``model.to_tokens`` defaults).
            clean, corrupted: prompts; pair ``i`` must have the same number of tokens.
            answers, wrong_answers: one-token strings (mind the leading space: ``" Mary"``).
            extras: extra forward inputs for both runs (e.g. ``{"pixel_values": ...}``);
                ``corrupted_extras`` overrides them for the corrupted run.
            options: per prompt, the candidate answers (one-token strings) the answer competes with.
            prepend_bos: tokenize with BOS first (default, ``model.to_tokens``'s convention).

        Example:
            >>> cs = ContrastSet.from_prompts(model,                       # doctest: +SKIP
            ...     ["When Mary and John went to the store, John gave a drink to"],
            ...     ["When Mary and John went to the store, Mary gave a drink to"],
            ...     [" Mary"], [" John"])
        """
        clean = _check_strings("clean", clean)
        if not clean:
            raise ContrastSetError("clean is empty: give at least one prompt")
        n = len(clean)
        corrupted = _check_strings("corrupted", corrupted, n)
        answers = _check_strings("answers", answers, n)
        wrong_answers = _check_strings("wrong_answers", wrong_answers, n)
        labels = tuple(labels) if labels is not None else ("",) * n
        if len(labels) != n:
            raise ContrastSetError(f"labels has {len(labels)} entries but clean has {n}")

        def tok(text: str):
            return model.to_tokens(text, prepend_bos=prepend_bos)[0].cpu()

        clean_t = [tok(s) for s in clean]
        corr_t = [tok(s) for s in corrupted]
        for i, (a, b) in enumerate(zip(clean_t, corr_t)):
            if len(a) != len(b):
                raise ContrastSetError(
                    f"prompt {i}: clean has {len(a)} tokens but corrupted has {len(b)} "
                    f"(clean={clean[i]!r}, corrupted={corrupted[i]!r}). Patching compares positions "
                    f"one to one: make the pair the same length in tokens (e.g. swap names that "
                    f"are single tokens)"
                )
        ans = []
        wrong = []
        for i in range(n):
            try:
                ans.append(single_token_id(model, answers[i], what=f"answers[{i}]"))
                wrong.append(single_token_id(model, wrong_answers[i], what=f"wrong_answers[{i}]"))
            except ContrastSetError as e:
                raise ContrastSetError(f"prompt {i} ({clean[i]!r}): {e}") from None
        opts = ()
        if options is not None:
            options = list(options)
            if len(options) != n:
                raise ContrastSetError(f"options has {len(options)} entries but clean has {n}")
            opts = tuple(tuple(single_token_id(model, o, what=f"options[{i}] {o!r}") for o in row)
                         for i, row in enumerate(options))
            missing = [i for i in range(n) if ans[i] not in opts[i]]
            if missing:
                raise ContrastSetError(f"prompt(s) {missing}: the answer is not among the options")
        pad = _pad_id(model)
        lengths = torch.tensor([len(t) for t in clean_t])
        cs = cls(
            clean_tokens=_pad_right(clean_t, pad), corrupted_tokens=_pad_right(corr_t, pad),
            answer_ids=torch.tensor(ans), wrong_ids=torch.tensor(wrong), last_pos=lengths - 1,
            clean_prompts=tuple(clean), corrupted_prompts=tuple(corrupted),
            answers=tuple(answers), wrong_answers=tuple(wrong_answers), labels=labels,
            task=task, pad_id=pad, extras=dict(extras or {}),
            corrupted_extras=dict(corrupted_extras) if corrupted_extras is not None else None,
            options=opts, prepend_bos=prepend_bos,
            option_pos=tuple(tuple(int(p) for p in row) for row in option_pos) if option_pos is not None else (),
        )
        cs._check_extras()
        return cs

    def _check_extras(self) -> None:
        for side, ex in (("extras", self.extras), ("corrupted_extras", self.corrupted_extras or {})):
            for k, v in ex.items():
                if not isinstance(v, Tensor) or v.shape[0] != len(self):
                    raise ContrastSetError(
                        f"{side}[{k!r}] must be a tensor with batch axis {len(self)}, got "
                        f"{getattr(v, 'shape', type(v).__name__)}"
                    )

    # ---------------------------------------------------------------- views
    def __len__(self) -> int:
        return int(self.clean_tokens.shape[0])

    @property
    def lengths(self) -> Int[Tensor, "batch"]:
        return self.last_pos + 1

    @property
    def n_pos(self) -> int:
        return int(self.clean_tokens.shape[1])

    @property
    def same_length(self) -> bool:
        """True when no prompt is padded (position-resolved results are then well defined)."""
        return bool((self.lengths == self.n_pos).all())

    def forward_extras(self, side: str = "clean") -> dict[str, Tensor]:
        """Extra model inputs for the ``"clean"`` or ``"corrupted"`` run."""
        if side == "corrupted" and self.corrupted_extras is not None:
            return dict(self.corrupted_extras)
        return dict(self.extras)

    def subset(self, idx: Sequence[int] | slice, *, trim: bool = True) -> "ContrastSet":
        """A ContrastSet of the chosen prompts (trailing all-pad columns trimmed unless
        ``trim=False``, which keeps position indices valid across subsets)."""
        if isinstance(idx, slice):
            idx = list(range(len(self)))[idx]
        idx = list(idx)
        if not idx:
            raise ContrastSetError("subset needs at least one index")
        bad = [i for i in idx if not -len(self) <= i < len(self)]
        if bad:
            raise ContrastSetError(f"subset indices {bad} out of range for {len(self)} prompts")
        t = torch.tensor(idx)
        width = int(self.lengths[t].max()) if trim else self.n_pos
        pick = lambda xs: tuple(xs[i] for i in idx)  # noqa: E731
        return replace(
            self,
            clean_tokens=self.clean_tokens[t, :width], corrupted_tokens=self.corrupted_tokens[t, :width],
            answer_ids=self.answer_ids[t], wrong_ids=self.wrong_ids[t], last_pos=self.last_pos[t],
            clean_prompts=pick(self.clean_prompts), corrupted_prompts=pick(self.corrupted_prompts),
            answers=pick(self.answers), wrong_answers=pick(self.wrong_answers),
            labels=pick(self.labels) if self.labels else (),
            spans=pick(self.spans) if self.spans else (),
            options=pick(self.options) if self.options else (),
            option_pos=pick(self.option_pos) if self.option_pos else (),
            extras={k: v[t] for k, v in self.extras.items()},
            corrupted_extras=({k: v[t] for k, v in self.corrupted_extras.items()}
                              if self.corrupted_extras is not None else None),
        )

    def option_positions(self, n_options: int, *, exclude_answer: bool = True, side: str = "clean") -> Tensor:
        """``[batch, pos]`` bool mask of where the answer options occur in each prompt.

        An option is any token that is some prompt's answer or wrong answer (e.g. every colour in
        Colored Objects); the last ``n_options`` occurrences before the answer position are taken
        (the options of the question, not of the few-shot examples), minus the prompt's own
        answer with ``exclude_answer``. Raises if a prompt lists fewer than ``n_options``.
        """
        toks = self.clean_tokens if side == "clean" else self.corrupted_tokens
        mask = torch.zeros_like(toks, dtype=torch.bool)
        if self.option_pos:  # the generator recorded where each option is mentioned
            for i, (opts, pos) in enumerate(zip(self.options, self.option_pos)):
                if len(pos) < n_options:
                    raise ContrastSetError(f"prompt {i} lists {len(pos)} options, fewer than n_options={n_options}")
                for o, p in list(zip(opts, pos))[-n_options:]:
                    if not (exclude_answer and o == int(self.answer_ids[i])):
                        mask[i, p] = True
            return mask
        cand = torch.unique(torch.cat([self.answer_ids, self.wrong_ids]))
        for i in range(len(self)):
            L = int(self.lengths[i])
            hits = torch.isin(toks[i, :L], cand).nonzero().flatten()
            if len(hits) < n_options:
                raise ContrastSetError(f"prompt {i} ({self.clean_prompts[i]!r}) lists {len(hits)} "
                                       f"option tokens, fewer than n_options={n_options}")
            for p in hits[-n_options:].tolist():
                if not (exclude_answer and int(toks[i, p]) == int(self.answer_ids[i])):
                    mask[i, p] = True
        return mask

    def str_tokens(self, model, i: int = 0, side: str = "clean") -> list[str]:
        toks = (self.clean_tokens if side == "clean" else self.corrupted_tokens)[i, : int(self.lengths[i])]
        return _decode_each(model, toks)

    def __repr__(self) -> str:
        return (f"ContrastSet(task={self.task!r}, n={len(self)}, n_pos={self.n_pos}, "
                f"example={self.clean_prompts[0]!r} -> {self.answers[0]!r} vs {self.wrong_answers[0]!r})")

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(dict(clean=self.clean_prompts, corrupted=self.corrupted_prompts,
                                 answer=self.answers, wrong=self.wrong_answers,
                                 label=self.labels or [""] * len(self),
                                 n_tokens=self.lengths.tolist()))

    def _repr_html_(self) -> str:
        return (f"<b>ContrastSet</b> task=<code>{self.task}</code>, {len(self)} pairs, "
                f"up to {self.n_pos} tokens" + self.to_dataframe().head(5).to_html())
