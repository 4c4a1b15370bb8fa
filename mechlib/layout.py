"""Where the rows and positions of a forward sit relative to the prompts an intervention was set up for.

An intervention is set up for prompts (strings, a PromptBatch or a ContrastSet; positions count
from each prompt's first token) and edits every forward run inside its block. Usually those
forwards are the prompts themselves, or ``k`` stacked copies of them (row ``r`` is prompt
``r % P``, copy-major). Generation changes three things, which :func:`mechlib.generate` declares
with :func:`decoding`:

* prompts are **left-padded** to one length, so a row's prompt position is its padded position
  minus its padding;
* with a **key/value cache**, a forward holds only the new tokens as queries (query ``i`` sits at
  padded position ``offset + i``) while attention sees every earlier key;
* a chunk of the prompts (``batch_size``) runs at a time, so row ``r`` is prompt ``rows[r]``.

Interventions read all of it through :func:`view`, which without a generation in progress gives
the plain layout above, so each edit is written once. Each intervention also declares, with
:func:`editing`, whether it can run on a key/value cache and on left-padded batches;
:func:`limits` tells :func:`mechlib.generate`, which recomputes the whole sequence (and/or runs
one prompt at a time) where an active edit cannot — with a warning and in the result's metadata.

Common misreading: positions given to an intervention (``positions=``, spans, ``query_pos``) are
always *prompt* positions, never padded ones; generated tokens have positions ``>= prompt length``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import Tensor


class LayoutError(ValueError):
    """A forward does not fit the prompts an intervention was set up for."""


@dataclass
class Decoding:
    """A generation in progress: row ``r`` of every forward is prompt ``rows[r]`` (of
    ``n_prompts``), left-padded by ``pad[r]`` tokens, with ``prompt_len[r]`` real prompt tokens
    (``tokens[r]``, unpadded). ``offset`` is the padded position of the current forward's first
    query (0 at the first step, or in every step without a cache); ``step`` counts forwards (0 =
    the prompt). ``state`` is scratch space for interventions, kept for the whole generation
    (e.g. what they decided on the prompt at the first step)."""

    rows: Tensor
    pad: Tensor
    prompt_len: Tensor
    n_prompts: int
    tokens: tuple[Tensor, ...]
    cached: bool
    offset: int = 0
    step: int = 0
    state: dict = field(default_factory=dict)


_STACK: list[Decoding] = []


@contextmanager
def decoding(rows: Tensor, pad: Tensor, prompt_len: Tensor, *, n_prompts: int, tokens, cached: bool) -> Iterator[Decoding]:
    """Declare a generation (what :func:`mechlib.generate` does around its forwards)."""
    d = Decoding(rows.cpu().long(), pad.cpu().long(), prompt_len.cpu().long(), int(n_prompts),
                 tuple(t.cpu() for t in tokens), bool(cached))
    _STACK.append(d)
    try:
        yield d
    finally:
        _STACK.remove(d)


def current() -> Optional[Decoding]:
    return _STACK[-1] if _STACK else None


@dataclass(frozen=True)
class View:
    """The current forward as seen by an intervention set up for ``n_prompts`` prompts.

    ``rows[b]``: the prompt of each row; ``qpos[b, q]`` and ``kpos[b, k]``: the prompt positions
    of the queries and keys (negative on left padding; ``>= prompt_len`` on generated tokens);
    ``prompt_len[b]`` (``None`` outside a generation: the intervention knows its prompts);
    ``decoding``: the generation in progress, if any."""

    rows: Tensor
    qpos: Tensor
    kpos: Tensor
    prompt_len: Optional[Tensor]
    decoding: Optional[Decoding]

    @property
    def generating(self) -> bool:
        return self.decoding is not None

    @property
    def first_step(self) -> bool:
        """True outside a generation and on its first forward (the prompt)."""
        return self.decoding is None or self.decoding.step == 0

    def gather(self, mask: Tensor, pos: Tensor, *, before=False, after=False) -> Tensor:
        """``mask[prompt, position]`` (per prompt, in prompt positions) read for each row at
        ``pos`` (``[b, n]``, prompt positions); positions before the prompt (padding) read
        ``before``, positions beyond ``mask``'s last column (generated tokens) read ``after``."""
        m = mask.to(pos.device)
        T = m.shape[1]
        rows = self.rows.to(pos.device)[:, None].expand_as(pos)
        got = m[rows, pos.clamp(0, T - 1)]
        fill_before = torch.as_tensor(before, dtype=m.dtype, device=pos.device)
        fill_after = torch.as_tensor(after, dtype=m.dtype, device=pos.device)
        return torch.where(pos < 0, fill_before, torch.where(pos >= T, fill_after, got))

    def real_keys(self) -> Tensor:
        """``[b, k]`` True on keys that are tokens (not left padding)."""
        return self.kpos >= 0


def view(b: int, *, q: int, k: Optional[int] = None, n_prompts: Optional[int] = None, device=None,
         prompts=None, what: str = "this intervention") -> View:
    """The layout of a forward of batch ``b`` with ``q`` query positions and ``k`` key positions
    (``k`` defaults to ``q``; attention patterns give both) for an intervention set up for
    ``n_prompts`` prompts (``None``: it edits every row alike).

    ``prompts`` (``(tokens [P, T], lengths [P])`` of the prompts the intervention was set up
    for) is checked once per generation against the prompts being generated from: an intervention
    decided on other prompts (another order, a chat template around them) would edit the wrong
    rows or positions."""
    k = q if k is None else k
    d = current()
    if d is None:
        if n_prompts and b % n_prompts:
            raise LayoutError(f"{what} was set up for {n_prompts} prompts; this forward has batch {b} (stack "
                              "copies of the prompts, copy-major, or generate from the same prompts)")
        rows = torch.arange(b, device=device) % (n_prompts or b)
        qpos = torch.arange(k - q, k, device=device).expand(b, q)
        kpos = torch.arange(k, device=device).expand(b, k)
        return View(rows, qpos, kpos, None, None)
    if len(d.rows) != b:
        raise LayoutError(f"{what}: a forward of batch {b} inside a generation of {len(d.rows)} rows")
    if n_prompts is not None and n_prompts != d.n_prompts:
        raise LayoutError(f"{what} was set up for {n_prompts} prompts but generate() got {d.n_prompts}: generate "
                          "from the same prompts, in the same order, inside the block")
    if prompts is not None:
        key = ("checked", id(prompts[0]))
        if key not in d.state:
            tokens, lengths = prompts
            bad = [int(p) for p in d.rows.unique()
                   if not torch.equal(tokens[int(p), : int(lengths[int(p)])].cpu(), d.tokens[int(p)])]
            if bad:
                raise LayoutError(f"{what} was set up for other prompts than generate() got (prompt(s) {bad[:5]} "
                                  "tokenize differently: another order, another text, or a chat template around "
                                  "them): generate from the prompts the block was set up with")
            d.state[key] = True
    pad = d.pad.to(device)
    qpos = (d.offset + torch.arange(q, device=device))[None, :] - pad[:, None]
    kpos = torch.arange(k, device=device)[None, :] - pad[:, None]
    return View(d.rows.to(device), qpos, kpos, d.prompt_len.to(device), d)


# --- what each active edit supports ------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    model_id: int
    name: str
    cache: bool = True
    padding: bool = True
    reason: str = ""
    suffix: bool = False
    hooks: tuple = ()


_ACTIVE: list[Edit] = []


@contextmanager
def editing(model, name: str, *, cache: bool = True, padding: bool = True, reason: str = "", suffix: bool = False,
            hooks=()) -> Iterator[Edit]:
    """Declare an edit active on ``model`` and what it supports, for the duration of its block.

    ``suffix``: the edit, attached at the hook points ``hooks``, is exact on a forward that
    recomputes only the prompt positions from some ``p`` on (outside a generation: attention
    patterns ``[b, h, q, k]`` with ``q < k``, queries at positions ``k − q ..``; the earlier ones
    from an unedited run), because it changes nothing before ``p`` — and it raises where it would
    (see :func:`mechlib.metrics.evaluate`'s ``from_pos``)."""
    e = Edit(id(model), name, cache, padding, reason, suffix, tuple(hooks))
    _ACTIVE.append(e)
    try:
        yield e
    finally:
        _ACTIVE.remove(e)


def limits(model) -> tuple[list[Edit], list[Edit]]:
    """The edits active on ``model`` that cannot run on a key/value cache, and those that cannot
    run on left-padded batches."""
    mine = [e for e in _ACTIVE if e.model_id == id(model)]
    return [e for e in mine if not e.cache], [e for e in mine if not e.padding]


def suffix_hooks(model) -> set[str]:
    """The hook points of the active edits on ``model`` that are exact on a recomputed suffix."""
    return {h for e in _ACTIVE if e.model_id == id(model) and e.suffix for h in e.hooks}
