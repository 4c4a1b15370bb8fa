"""Packed walks: the rows of a by-position sweep, whatever their first changed position, in one
layer-major walk, each row computing only its own positions.

A by-position row patched at position ``p`` recomputes positions ``p..read`` on the corrupted run's
keys and values before ``p`` (causal prefix reuse). Rows with different ``p`` cannot share a
``[row, position]`` batch without recomputing positions for nothing, and walks of a few short rows
run small, memory-bound matmuls (on SmolLM2 a block call on one position costs as much as ~50
positions of arithmetic). Packing lays the rows of one prompt and one patched layer end to end in
one sequence ("segments"); the sequences of a walk are padded to one length. Every block then runs
on every position of every row at once, and the attention sees, per position, exactly what it sees
in the row's own run:

* keys ``0..P-1`` of the corrupted run (the prefix cache), visible to a segment below its first
  position only;
* the packed positions' own keys, visible within their segment only;
* in both, the recorded attention mask of the real position (causality, padding, sliding windows),
  and the real position's ids and rotary embeddings.

The mask is the only thing that separates the segments, so packing is used on a model only after a
packed walk has reproduced the corrupted run's logits there (checked once per model, as the other
shortcuts of the engine are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


class PackUnsupported(RuntimeError):
    """The blocks' inputs cannot be packed (the message says why)."""


@dataclass
class _Pack:
    """Layout of one packed walk. Rows are the walk's rows (sorted by layer); sequences are sorted by
    the layer they join at. Per position (``tok_*``, real positions only): its sequence, slot,
    row, and real position; per row: its sequence and the slot of its first and read positions."""

    n: int  # positions per sequence (padded)
    prefix: int  # corrupted keys 0..prefix-1 are handed to every sequence
    seq_b: Tensor  # [S] prompt of each sequence
    seq_layer: Tensor  # [S] layer each sequence joins at
    tok_seq: Tensor
    tok_slot: Tensor
    tok_row: Tensor
    tok_pos: Tensor
    row_seq: Tensor
    row_first: Tensor
    row_read: Tensor

    @property
    def n_seq(self) -> int:
        return int(self.seq_b.numel())

    def grid(self, values: Tensor, pad) -> Tensor:
        """Per-position ``values`` laid out ``[S, n]`` (``pad`` in the padding slots)."""
        out = torch.full((self.n_seq, self.n), pad, dtype=values.dtype)
        out[self.tok_seq, self.tok_slot] = values
        return out


def pack(layer: Tensor, b: Tensor, fp: Tensor, last: Tensor, seq_cap: int) -> _Pack:
    """Lay rows (``layer``, prompt ``b``, first position ``fp``; sorted by layer) out in sequences:
    the rows of one prompt and layer end to end, cut into sequences of about one length (at most
    ``seq_cap`` positions, or the longest row; chosen to leave the fewest padding slots), filled
    evenly."""
    n_rows = int(b.numel())
    q = (last[b] - fp + 1).tolist()
    if min(q, default=1) < 1:
        raise ValueError("a packed row starts after its read position")
    row_seq, row_first = [0] * n_rows, [0] * n_rows
    seq_b, seq_layer, seq_len = [], [], []
    groups: dict[tuple[int, int], list[int]] = {}
    for r, key in enumerate(zip(layer.tolist(), b.tolist())):
        groups.setdefault(key, []).append(r)
    # every sequence is padded to the longest: the length aimed at (at most the cap) is the one that
    # leaves the fewest slots in all, each group cut into as few sequences as it allows
    total = {k: sum(q[r] for r in m) for k, m in groups.items()}
    longest = {k: max(q[r] for r in m) for k, m in groups.items()}

    def slots(aim: int) -> int:
        cuts = {k: -(-t // aim) for k, t in total.items()}
        return sum(cuts.values()) * max(max(-(-total[k] // cuts[k]), longest[k]) for k in total)

    aim = min(range(max(q, default=1), max(seq_cap, max(q, default=1)) + 1), key=slots) if groups else 1
    for (l, bb), members in groups.items():  # in layer order (rows are)
        # filled evenly, longest row first into the shortest sequence; one more sequence while that
        # overshoots the length aimed at (it cannot with one row each)
        order = sorted(members, key=lambda r: -q[r])
        n_seq = -(-total[(l, bb)] // aim)
        while True:
            fill, where = [0] * n_seq, {}
            for r in order:
                k = min(range(n_seq), key=fill.__getitem__)
                where[r], fill[k] = (k, fill[k]), fill[k] + q[r]
            if max(fill) <= aim:
                break
            n_seq += 1
        base = len(seq_b)
        seq_b += [bb] * n_seq
        seq_layer += [l] * n_seq
        seq_len += fill
        for r, (k, at) in where.items():
            row_seq[r], row_first[r] = base + k, at
    qt = torch.tensor(q)
    tok_row = torch.repeat_interleave(torch.arange(n_rows), qt)
    within = torch.arange(int(qt.sum())) - torch.repeat_interleave(torch.cumsum(qt, 0) - qt, qt)
    rs, rf = torch.tensor(row_seq), torch.tensor(row_first)
    return _Pack(n=max(seq_len), prefix=int(fp.max()), seq_b=torch.tensor(seq_b), seq_layer=torch.tensor(seq_layer),
                 tok_seq=rs[tok_row], tok_slot=rf[tok_row] + within, tok_row=tok_row, tok_pos=fp[tok_row] + within,
                 row_seq=rs, row_first=rf, row_read=rf + qt - 1)


def packed_walks(layer: Tensor, b: Tensor, fp: Tensor, last: Tensor, token_cap: int, max_rows: int,
                 last_layer: Optional[int] = None) -> list[Tensor]:
    """Row indices of the packed walks of a sweep: rows in layer order, cut so that a walk holds at
    most ``token_cap`` positions (its last blocks run on all of them) and ``max_rows`` rows; rows
    patched at ``last_layer`` walk apart (the read-row final block cannot patch)."""
    order = torch.argsort(layer, stable=True)
    pieces = [order]
    if last_layer is not None:
        at = layer[order] == last_layer
        pieces = [order[~at], order[at]]
    out = []
    for piece in pieces:
        q = (last[b] - fp + 1)[piece]
        start, total = 0, 0
        for k, n in enumerate(q.tolist()):
            if k > start and (total + n > token_cap or k - start >= max_rows):
                out.append(piece[start:k])
                start, total = k, 0
            total += n
        if len(piece):
            out.append(piece[start:])
    return out


def packed_kwargs(kw: dict, pk: _Pack, fp: Tensor, batch: int, n_pos: int, dtype: torch.dtype) -> dict:
    """A block's recorded keyword arguments (for the ``batch`` corrupted prompts of ``n_pos``
    positions) for the sequences of ``pk``: per position those of its real position, and the
    attention mask of the packed layout (keys: the prefix, then the packed positions). Blocks that
    get no mask (GPT-2: the attention masks causally by itself) get the causal one, in ``dtype``."""
    seq_pos = pk.grid(pk.tok_pos, 0)  # padding slots take position 0 (they see only themselves)
    seq_b = pk.seq_b[:, None].expand(-1, pk.n)

    def gather(v: Tensor) -> Tensor:
        if v.shape[0] not in (1, batch) or v.ndim < 2 or v.shape[1] != n_pos:
            raise PackUnsupported(f"a block input of shape {tuple(v.shape)} is not [batch, pos, ...]")
        full = v.expand(batch, *v.shape[1:])
        return full[seq_b.to(v.device), seq_pos.to(v.device)]

    out = {}
    if kw.get("attention_mask") is None:
        kw = {**kw, "attention_mask": torch.zeros(1, 1, n_pos, n_pos, dtype=dtype).masked_fill(
            torch.ones(n_pos, n_pos, dtype=torch.bool).triu(1), torch.finfo(dtype).min)}
    for key, v in kw.items():
        if v is None or not isinstance(v, (Tensor, tuple)):
            out[key] = v
        elif key == "attention_mask":
            out[key] = _packed_mask(v, pk, fp, batch, n_pos)
        elif key == "position_ids":
            out[key] = gather(v.reshape(-1, v.shape[-1]))
        elif key == "position_embeddings":
            out[key] = tuple(gather(x) for x in v)
        elif key == "cache_position":  # where the queries sit in the key axis (packed after the prefix)
            out[key] = torch.arange(pk.prefix, pk.prefix + pk.n, device=v.device)
        elif isinstance(v, Tensor) and v.ndim >= 2 and n_pos in v.shape[1:]:
            raise PackUnsupported(f"the blocks get a positional input {key!r} mechlib does not know how to pack")
        else:
            out[key] = v
    return out


def _packed_mask(m, pk: _Pack, fp: Tensor, batch: int, n_pos: int) -> Tensor:
    if not isinstance(m, Tensor) or m.ndim != 4 or m.shape[-1] != n_pos or m.shape[-2] != n_pos:
        raise PackUnsupported(f"the blocks get an attention mask of shape {tuple(getattr(m, 'shape', ()))}, "
                              "not [batch, 1, pos, pos]")
    dev = m.device
    blocked = False if m.dtype == torch.bool else torch.finfo(m.dtype).min
    seen = True if m.dtype == torch.bool else 0.0
    full = m.expand(batch, *m.shape[1:])[:, 0]  # [batch, q, k]
    pos = pk.grid(pk.tok_pos, 0).to(dev)
    row = pk.grid(pk.tok_row, -1).to(dev)
    row = torch.where(row < 0, -2 - torch.arange(pk.n, device=dev)[None], row)  # each padding slot its own row
    start = pk.grid(fp[pk.tok_row], 0).to(dev)  # first position of each slot's row (padding: no prefix)
    sb = pk.seq_b.to(dev)[:, None]
    prefix = full[sb[:, :, None], pos[:, :, None], torch.arange(pk.prefix, device=dev)[None, None]]
    prefix = prefix.masked_fill(torch.arange(pk.prefix, device=dev)[None, None] >= start[:, :, None], blocked)
    own = full[sb[:, :, None], pos[:, :, None], pos[:, None, :]]
    own = own.masked_fill(row[:, :, None] != row[:, None, :], blocked)
    pad = (row < 0)[:, :, None] & torch.eye(pk.n, dtype=torch.bool, device=dev)[None]
    own = own.masked_fill(pad, seen)
    return torch.cat([prefix, own], dim=-1)[:, None]
