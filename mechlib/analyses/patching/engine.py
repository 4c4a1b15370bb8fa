"""The sweep engine of activation patching: which variants need a forward, grouped into layer-major
walks over the blocks, each resumed from its first changed position on a key/value prefix (rows of
different first positions packed into one walk)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.analyses.patching.common import _Plan, _write_cells
from mechlib.analyses.patching.packed import PackUnsupported, pack, packed_kwargs
from mechlib.flops import block_flops, forward_flops, qkv_flops_per_token, unembed_flops
from mechlib.metrics import check_metric_values
from mechlib.sites import SiteSpec
from mechlib.tasks.contrast import ContrastSet

# ----------------------------------------------------------------------------------------------
# the sweep engine
# ----------------------------------------------------------------------------------------------
#
# A sweep is a table of (layer, cell, prompt) variants, and most of them need no forward:
#   * a variant whose clean and corrupted activations at the patched site are exactly equal writes
#     the value that is already there, so its value is the corrupted run's (and TL's);
#   * with causal attention (verified once per model), a patch at position p cannot reach a read
#     position before p; and at the last layer, a patch that acts on its own position only (head
#     outputs and queries, pattern rows, attention/MLP outputs, resid_mid/post) reaches the read
#     position only at the read position.
# The others ("rows", one per variant) are grouped by the first position they change: everything
# earlier is exactly the corrupted run, whose keys and values stand in for it (causal prefix
# reuse). Each group runs layer-major: one walk over the blocks in which every row joins at its own
# patched layer, so each block runs once per walk, on every row patched at or before it (large
# matmuls, few calls). By-position rows, whose first positions differ, are packed instead: the rows
# of one prompt and layer end to end in one sequence, kept apart by the attention mask, so one walk
# runs every row on its own positions only (``packed.py``; checked once per model). The final block
# computes the read row only (the other rows' keys and values), and a metric that names the logits
# it reads (``columns``: a logit difference reads two) is handed only those.

# sites whose patch at position p changes, from that layer on, only position p's own residual
_LOCAL_AFTER = frozenset({"resid_mid", "resid_post", "attn_out", "mlp_out", "head_out", "head_q", "pattern"})

# Per block call, the overhead in token-rows (one position of one row through one block): the cost
# model that groups rows into walks trades these against positions recomputed for nothing (measured
# on SmolLM2 on the CPU: a block call on one position takes as long as ~50 positions' arithmetic).
_BLOCK_OVERHEAD_ROWS = {"cpu": 48, "cuda": 1024}
# Most token-rows per block call: past a few thousand on the CPU the matmuls' operands leave the
# caches and throughput drops (measured: 4,000 x 576 @ 576 x 1536 runs at ~90% of peak, 8,000 at ~60%).
_TOKEN_ROWS = {"cpu": 4096, "cuda": 1 << 20}
# Positions per packed sequence (at least the prompt's length): attention over a packed sequence
# costs its length times the keys, the linears only its length, so sequences stay short
_PACKED_SEQ = 64


def _changed(spec: SiteSpec, clean: Tensor, corr: Tensor) -> Tensor:
    """Where the clean activation differs from the corrupted one (exact comparison):
    ``[batch, pos]``, or ``[batch, pos, head]`` for per-head sites (``pos`` = query for patterns)."""
    ne = clean.to(corr.device) != corr
    if spec.per_head and spec.head_dim == 1:  # pattern [b, head, q, k]
        return ne.any(-1).transpose(1, 2)
    return ne.any(-1)


@dataclass
class _Rows:
    """The variants that need a forward, one per row: the swept layer's index ``li`` and number
    ``layer``, the cell's index ``ci`` in ``plan.cells()``, the prompt ``b``, and ``fp``, the first
    position at which the patched run differs from the corrupted one."""

    li: Tensor
    ci: Tensor
    b: Tensor
    fp: Tensor
    layer: Tensor

    def __len__(self) -> int:
        return int(self.b.numel())

    def take(self, idx) -> "_Rows":
        return _Rows(self.li[idx], self.ci[idx], self.b[idx], self.fp[idx], self.layer[idx])


def _select_rows(plan: _Plan, changed: list[Tensor], last: Optional[Tensor], causal: bool, n_layers: int) -> _Rows:
    """The rows of a sweep that need a forward (``causal``: the model's attention is verified
    causal, so patches after the read position, or away from it at the last layer, are no-ops)."""
    cells = plan.cells()
    B = changed[0].shape[0]
    last = last.cpu() if last is not None else None
    parts = []
    for li, layer in enumerate(plan.layers):
        ch = changed[li].cpu()
        if plan.spec.per_head and not plan.by_position:  # (head,) cells over all positions
            m = ch[:, :, torch.tensor([c[0] for c in cells])]  # [b, pos, cell]
            need = m.any(1)
            fp = (m.cumsum(1) == 0).sum(1)  # first changed position (T where none)
        else:  # (pos,) or (pos, head) cells
            pos = torch.tensor([c[0] for c in cells])
            need = ch[:, pos] if not plan.spec.per_head else ch[:, pos, torch.tensor([c[1] for c in cells])]
            fp = pos.expand(B, -1)
            if causal and layer == n_layers - 1 and plan.spec.kind in _LOCAL_AFTER:
                need = need & (pos[None] == last[:, None])
        if causal:
            need = need & (fp <= last[:, None])
        else:
            fp = torch.zeros_like(fp)
        b, c = need.nonzero(as_tuple=True)
        parts.append((torch.full_like(b, li), c, b, fp[b, c], torch.full_like(b, layer)))
    return _Rows(*(torch.cat(t) for t in zip(*parts)))


def _walks(rows: _Rows, n_layers: int, n_pos: int, max_rows: int, overhead: int,
           split_last: bool = False, token_rows: Optional[int] = None) -> list[tuple[int, Tensor]]:
    """Group rows into layer-major walks ``(from_pos, row indices)``: contiguous runs of first
    positions, chosen to minimise the token-rows recomputed (a row from ``from_pos`` on, through
    every block from its layer) plus ``overhead`` per block call; each walk holds at most
    ``max_rows`` rows (and ``token_rows`` rows x positions), sorted by layer. ``split_last``: rows
    patched at the last layer walk separately (the final block's read-row shortcut cannot patch)."""
    if len(rows) == 0:
        return []
    ps = sorted(set(rows.fp.tolist()))
    work = [int((n_layers - rows.layer[rows.fp == p]).sum()) for p in ps]
    count = [int((rows.fp == p).sum()) for p in ps]
    low = [int(rows.layer[rows.fp == p].min()) for p in ps]
    cap = lambda p: max(1, min(max_rows, (token_rows or 1 << 62) // (n_pos - p)))  # noqa: E731
    best, cut = [0.0] + [float("inf")] * len(ps), [0] * (len(ps) + 1)
    for j in range(1, len(ps) + 1):
        w = n = 0
        lo = n_layers
        for i in range(j - 1, -1, -1):
            w, n, lo = w + work[i], n + count[i], min(lo, low[i])
            cost = best[i] + (n_pos - ps[i]) * w + overhead * (n_layers - lo) * -(-n // cap(ps[i]))
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], len(ps)
    while j > 0:
        i = cut[j]
        sel = ((rows.fp >= ps[i]) & (rows.fp <= ps[j - 1])).nonzero().flatten()
        sel = sel[torch.argsort(rows.layer[sel], stable=True)]
        pieces = [sel]
        if split_last:
            at_last = rows.layer[sel] == n_layers - 1
            pieces = [sel[~at_last], sel[at_last]]
        size = cap(ps[i])
        for piece in pieces:
            out += [(ps[i], piece[k:k + size]) for k in range(0, len(piece), size)]
        j = i
    return [w for w in out[::-1] if len(w[1])]


def _runs(values: list[int]) -> dict[int, tuple[int, int]]:
    """``{value: (first index, end index)}`` of the runs of equal values in a sorted list."""
    out: dict[int, tuple[int, int]] = {}
    for k, v in enumerate(values):
        out[v] = (out.get(v, (k,))[0], k + 1)
    return out


class _KeyValueSeen(Exception):
    """Raised by :class:`_KeyValueProbe` to end a block once its attention has its keys and values."""

    def __init__(self, k: Tensor, v: Tensor, layer_idx: int):
        super().__init__("keys and values recorded")
        self.k, self.v, self.layer_idx = k, v, layer_idx


class _KeyValueProbe:
    """A key/value cache that stops the block at the first update: the keys and values of the
    positions given, at the cost of the query/key/value projections only."""

    def __init__(self, pos: int):
        self.pos = pos

    def update(self, k, v, layer_idx, *args, **kwargs):
        raise _KeyValueSeen(k, v, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pos


class _FixedKeyValues:
    """A key/value cache that hands the attention fixed keys and values (every position)."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    def update(self, k, v, layer_idx, *args, **kwargs):
        return self.k.to(k.device), self.v.to(v.device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.k.shape[-2]) - 1


class _NotAtRows(Exception):
    """A block input the read-row shortcut cannot cut to one query per row."""


def _row_kwargs(kw: dict, src: Tensor, batch: int) -> dict:
    """A block's recorded keyword arguments for rows continuing prompts ``src``."""

    def pick(key, v):
        if isinstance(v, Tensor) and key != "cache_position" and v.ndim >= 1 and v.shape[0] == batch:
            return v.index_select(0, src.to(v.device))
        if isinstance(v, tuple):
            return tuple(pick(key, x) for x in v)
        return v

    return {k: pick(k, v) for k, v in kw.items()}


def _at_rows(key: str, v, at: Tensor):
    """Block keyword argument ``key`` for one query per row, at position ``at[row]``."""
    if v is None or not isinstance(v, (Tensor, tuple)):
        return v
    n = at.shape[0]
    r = torch.arange(n, device=at.device)
    if key == "attention_mask":
        if not isinstance(v, Tensor) or v.ndim != 4:
            raise _NotAtRows("the attention mask is not [batch, 1, query, key]")
        return v.expand(n, *v.shape[1:])[r, :, at][:, :, None]
    if key == "position_ids":
        return v.expand(n, v.shape[-1])[r, at][:, None]
    if key == "cache_position":
        if not bool((at == at[0]).all()):
            raise _NotAtRows("cache_position cannot give each row its own query position")
        return v[int(at[0]):int(at[0]) + 1]
    if key == "position_embeddings":
        if any(not isinstance(x, Tensor) or x.ndim != 3 for x in v):
            raise _NotAtRows("the rotary embeddings are not [batch, pos, dim]")
        return tuple(x.expand(n, *x.shape[1:])[r, at][:, None] for x in v)
    return v


_ENGINE_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Engine:
    """Runs rows of one sweep batch (see "the sweep engine") and counts their matmul FLOPs."""

    def __init__(self, model, plan: _Plan, contrast: ContrastSet, starts: dict, clean_acts, prefix,
                 last: Optional[Tensor], max_rows: int):
        self.model, self.plan, self.contrast, self.starts = model, plan, contrast, starts
        self.clean, self.prefix, self.last, self.max_rows = clean_acts, prefix, last, max_rows
        self.B, self.T, self.L = len(contrast), contrast.n_pos, model.cfg.n_layers
        cells = plan.cells()
        self.cell_pos = torch.tensor([c[0] for c in cells]) if "pos" in plan.axis_names else None
        self.cell_head = torch.tensor([c[-1] for c in cells]) if plan.spec.per_head else None
        self.flops = 0
        self.read_row = False
        self.columns = None
        self.packed, self.pack_reason = False, "packing needs causal prefix reuse, which is off for this sweep"

    # ---------------------------------------------------------------- checks (once per model)
    def check(self, corr_read: Tensor, metric) -> None:
        """Turn on the read-row final block and the column readout where they reproduce the
        corrupted run's logits at the read positions (checked once per model)."""
        ok = _ENGINE_OK.get(self.model)
        grad = torch.is_grad_enabled()
        tol = 1e-4 + 1e-4 * float(corr_read.abs().max())
        below = [l for l in self.starts if l < self.L - 1]
        if ok is None:
            ok = {"read_row": False, "columns": False, "packed": None, "pack_reason": None}
            # resume from the latest recorded layer below the last block, so the walk reaches the
            # read-row final block (rows patched at the last block never use it); this sweep's
            # starts are all there is (a sweep over early layers records no later one)
            layer = max(below) if below else max(self.starts)
            rows = _Rows(*(torch.zeros(self.B, dtype=torch.long),) * 2, torch.arange(self.B),
                         torch.zeros(self.B, dtype=torch.long), torch.full((self.B,), layer))
            p0 = min(1, int(self.last.min())) if self.prefix is not None else 0
            try:
                self.read_row = True
                torch.set_grad_enabled(False)
                x = self.walk(rows, p0, patch=False, resid=True)
                ok["read_row"] = float((hooks._logits_from_resid(self.model, x[:, None])[:, 0]
                                        - corr_read.to(x.device)).abs().max()) <= tol
                ids = torch.stack([self.contrast.answer_ids, self.contrast.wrong_ids], 1)
                cols = self._columns(x, torch.arange(self.B), ids)
                want = corr_read.gather(1, ids.to(corr_read.device))
                ok["columns"] = float((cols - want.to(cols.device)).abs().max()) <= tol
            except (_NotAtRows, hooks.PrefixUnsupported):
                pass
            finally:
                self.flops = 0
                torch.set_grad_enabled(grad)
            # kept for the model only once the read-row block was tried (a sweep of the last layer
            # alone never runs it: the next sweep checks again)
            if below and (self.prefix is not None or not ok["read_row"]):
                _ENGINE_OK[self.model] = ok
        self.read_row = ok["read_row"]
        if ok["packed"] is None and self.prefix is not None and below:  # once per model, on a sweep with a prefix
            ok["packed"], ok["pack_reason"] = self._check_packed(max(below), corr_read, tol)
        if self.prefix is not None and ok["packed"] is not None:
            self.packed, self.pack_reason = ok["packed"], ok["pack_reason"]
        cols = getattr(metric, "columns", None)
        if ok["columns"] and cols is not None and callable(getattr(metric, "from_columns", None)):
            self.columns = (cols, metric.from_columns)

    # ---------------------------------------------------------------- patching
    def _patch(self, layer: int, part: _Rows, first_row: int, p0: int):
        """The hook that writes the clean values of ``part``'s cells into rows ``first_row..``."""
        spec = self.plan.spec
        source = self.clean[spec.hook_name(layer)]
        dev = source.device
        n = len(part)
        idx = (torch.arange(first_row, first_row + n, device=dev), part.b.to(dev),
               None if self.cell_pos is None else self.cell_pos[part.ci].to(dev),
               None if self.cell_head is None else self.cell_head[part.ci].to(dev))
        return (spec.hook_name(layer), lambda act, hook: _write_cells(spec, act, source, idx, p0))

    def walk(self, rows: _Rows, p0: int, *, patch: bool = True, resid: bool = False) -> Tensor:
        """Outputs of ``rows`` (sorted by layer) run layer-major from position ``p0`` on: logits at
        the read position (``[row, vocab]``, or ``[row, k]`` for a column readout), or at every
        position without a read position; ``resid``: the final residual at the read position."""
        from mechlib.arch import block_device

        model, L, T = self.model, self.L, self.T
        layers = rows.layer.tolist()
        first = layers[0]
        kwl = self.starts[first].kwargs_by_layer
        batch = self.starts[first].batch
        q = T - p0
        use_prefix = self.prefix is not None and p0 > 0
        read_row = self.read_row and self.last is not None and layers[-1] < L - 1 and q > 1
        bounds = _runs(layers)
        x, src, out = None, None, None
        with torch.no_grad(), hooks._cache_reaches_attention(model, first, use_prefix or read_row):
            for j in range(first, L):
                dev = block_device(model, j)
                patches = []
                if j in bounds:
                    a, b = bounds[j]
                    part = rows.take(slice(a, b))
                    new = self.starts[j].resid.index_select(0, part.b.to(self.starts[j].resid.device))[:, p0:]
                    x = new.to(dev) if x is None else torch.cat([x.to(dev), new.to(dev)])
                    src = part.b if src is None else torch.cat([src, part.b])
                    if patch:
                        patches.append(self._patch(j, part, a, p0))
                kw = hooks._to_device(_row_kwargs(kwl[j], src, batch), dev)
                if j == L - 1 and read_row:
                    try:
                        out = self._final_read_row(x.to(dev), kw, src, p0)
                        break
                    except _NotAtRows:
                        if resid:
                            raise
                        read_row = False
                if use_prefix:
                    kw = {k: hooks._suffix(k, v, p0) for k, v in kw.items()}
                    kw["cache"] = hooks._PrefixCache(self.prefix, p0, src)
                with hooks.attach(model, patches):
                    y = model.blocks[j](x.to(dev), use_cache=False, **kw)
                x = y[0] if isinstance(y, tuple) else y
                self.flops += block_flops(model, j, len(src), q, T)
        if self.last is None:
            self.flops += unembed_flops(model, len(src) * q)
            return hooks._logits_from_resid(model, x)
        if out is None:
            at = self.last.to(x.device)[src.to(x.device)] - p0
            out = x[torch.arange(len(src), device=x.device), at]
        if resid:
            return out
        return self._read(out, src)

    def _check_packed(self, layer: int, corr_read: Tensor, tol: float) -> tuple[bool, Optional[str]]:
        """Whether packed walks reproduce the corrupted run's logits at the read positions: per
        prompt a row from position 0 and one from its read position in one sequence (and a third
        on the first prompt, so the others carry padding), resumed at ``layer``, unpatched."""
        last = self.last.cpu()
        b = torch.cat([torch.arange(self.B), torch.arange(self.B), torch.zeros(1, dtype=torch.long)])
        fp = torch.cat([torch.zeros(self.B, dtype=torch.long), last, last[:1].clamp(max=1)])
        rows = _Rows(torch.zeros_like(b), torch.zeros_like(b), b, fp, torch.full_like(b, layer))
        grad = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            x = self.walk_packed(rows, patch=False, resid=True)
            logits = hooks._logits_from_resid(self.model, x[:, None])[:, 0]
            err = float((logits - corr_read.to(logits.device)[b.to(logits.device)]).abs().max())
        except (PackUnsupported, hooks.PrefixUnsupported, _NotAtRows) as e:
            return False, str(e)
        finally:
            self.flops = 0
            torch.set_grad_enabled(grad)
        if not err <= tol:
            return False, (f"a packed walk differs from the corrupted run by {err:.2g} in the logits (the blocks do "
                           "not take the attention mask as given)")
        return True, None

    def walk_packed(self, rows: _Rows, *, patch: bool = True, resid: bool = False) -> Tensor:
        """Like :meth:`walk`, on rows of any first positions packed into sequences (see
        :mod:`mechlib.analyses.patching.packed`); each row from its own first position to its read
        position. Rows are sorted by layer; the cells are by position."""
        from mechlib.arch import block_device

        model, L, T = self.model, self.L, self.T
        pk = pack(rows.layer, rows.b, rows.fp, self.last.cpu(), seq_cap=max(T, _PACKED_SEQ))
        first = int(rows.layer[0])
        kwl, batch = self.starts[first].kwargs_by_layer, self.starts[first].batch
        dtype = self.starts[first].resid.dtype
        seq_bounds, row_bounds = _runs(pk.seq_layer.tolist()), _runs(rows.layer.tolist())
        seq_pos, seq_b = pk.grid(pk.tok_pos, 0), pk.seq_b[:, None].expand(-1, pk.n)
        packed_kw: dict = {}
        x = None
        with torch.no_grad(), hooks._cache_reaches_attention(model, first, True):
            for j in range(first, L):
                dev = block_device(model, j)
                patches = []
                if j in seq_bounds:
                    a, b = seq_bounds[j]
                    start = self.starts[j].resid
                    new = start[seq_b[a:b].to(start.device), seq_pos[a:b].to(start.device)]
                    x = new.to(dev) if x is None else torch.cat([x.to(dev), new.to(dev)])
                    if patch and j in row_bounds:
                        patches.append(self._patch_packed(j, rows.take(slice(*row_bounds[j])), pk, *row_bounds[j]))
                k = x.shape[0]
                key = (str(dev), *((name, id(v)) for name, v in kwl[j].items()))
                if key not in packed_kw:
                    packed_kw[key] = hooks._to_device(packed_kwargs(kwl[j], pk, rows.fp, batch, T, dtype), dev)
                kw = {name: (v[:k] if isinstance(v, Tensor) and v.ndim >= 2 and v.shape[0] == pk.n_seq
                             else tuple(t[:k] for t in v) if isinstance(v, tuple) else v)
                      for name, v in packed_kw[key].items()}
                if j == L - 1 and self.read_row and not patches:
                    out = self._final_read_row_packed(x.to(dev), kw, pk)
                    break
                kw["cache"] = hooks._PrefixCache(self.prefix, pk.prefix, pk.seq_b[:k])
                with hooks.attach(model, patches):
                    y = model.blocks[j](x.to(dev), use_cache=False, **kw)
                x = y[0] if isinstance(y, tuple) else y
                self.flops += block_flops(model, j, k, pk.n, pk.prefix + pk.n)
            else:
                out = x.reshape(-1, x.shape[-1])[(pk.row_seq * pk.n + pk.row_read).to(x.device)]
        if resid:
            return out
        return self._read(out, rows.b)

    def _final_read_row_packed(self, x: Tensor, kw: dict, pk) -> Tensor:
        """The last block on packed sequences ``x``, at each row's read position only (rows in
        ``pk`` order): every position's keys and values (query/key/value projections), then the
        whole block on the read positions, ``[sequence, row of it]``."""
        block = self.model.blocks[self.L - 1]
        k, v = self._final_keys_values(x, dict(kw), pk.prefix, pk.seq_b)
        # the read slots of each sequence's rows, [sequence, rank]; spare ranks repeat the first
        S, n_rows = pk.n_seq, int(pk.row_seq.numel())
        order = torch.argsort(pk.row_seq, stable=True)
        counts = torch.bincount(pk.row_seq, minlength=S)
        rank = torch.empty(n_rows, dtype=torch.long)
        firsts = torch.cumsum(counts, 0) - counts
        rank[order] = torch.arange(n_rows) - firsts[pk.row_seq[order]]
        slots = pk.row_read[order[firsts]][:, None].repeat(1, int(counts.max()))
        slots[pk.row_seq, rank] = pk.row_read
        sl = slots.to(x.device)
        seq = torch.arange(S, device=x.device)[:, None]

        def at(key, val):
            if key == "attention_mask":
                return val[seq, :, sl.to(val.device)].transpose(1, 2) if val.shape[0] == S else val
            if key == "position_ids":
                return val[seq, sl.to(val.device)]
            if key == "position_embeddings":
                return tuple(t[seq, sl.to(t.device)] for t in val)
            if key == "cache_position":
                return val[:sl.shape[1]]
            return val

        kw2 = {key: at(key, val) for key, val in kw.items()}
        kw2["cache"] = _FixedKeyValues(k, v)
        y = block(x[seq, sl], use_cache=False, **kw2)
        y = y[0] if isinstance(y, tuple) else y
        self.flops += S * pk.n * qkv_flops_per_token(self.model) + block_flops(
            self.model, self.L - 1, S, sl.shape[1], pk.prefix + pk.n)
        return y[pk.row_seq.to(y.device), rank.to(y.device)]

    def _patch_packed(self, layer: int, part: _Rows, pk, a: int, b: int):
        """The hook that writes the clean values of ``part``'s by-position cells into their rows'
        first positions (rows ``a..b`` of the packed walk ``pk``): :func:`_write_cells` into
        sequences, each row's position ``pos`` at its slot (offset ``pos - slot``)."""
        spec = self.plan.spec
        source = self.clean[spec.hook_name(layer)]
        dev = source.device
        pos = self.cell_pos[part.ci].to(dev)
        idx = (pk.row_seq[a:b].to(dev), part.b.to(dev), pos,
               None if self.cell_head is None else self.cell_head[part.ci].to(dev))
        offset = pos - pk.row_first[a:b].to(dev)
        return (spec.hook_name(layer), lambda act, hook: _write_cells(spec, act, source, idx, offset))

    def _final_keys_values(self, x: Tensor, kw: dict, p0: int, src: Tensor) -> tuple[Tensor, Tensor]:
        """The last block's keys and values of rows ``x`` (positions ``p0..``; query/key/value
        projections only), after the corrupted run's positions ``< p0`` of prompts ``src``."""
        kw["cache"] = _KeyValueProbe(p0)
        try:
            self.model.blocks[self.L - 1](x, use_cache=False, **kw)
        except _KeyValueSeen as seen:
            k, v, layer_idx = seen.k, seen.v, seen.layer_idx
        else:
            raise _NotAtRows("the final block's attention never read its key/value cache")
        if p0:
            pk, pv = self.prefix.kv[layer_idx]
            s = src.to(pk.device)
            k = torch.cat([pk[..., :p0, :].index_select(0, s).to(k.device), k], dim=-2)
            v = torch.cat([pv[..., :p0, :].index_select(0, s).to(v.device), v], dim=-2)
        return k, v

    def _final_read_row(self, x: Tensor, kw: dict, src: Tensor, p0: int) -> Tensor:
        """The last block's output at each row's read position only: the other positions give
        their keys and values (query/key/value projections), the read row runs the whole block."""
        model, T = self.model, self.T
        block = model.blocks[self.L - 1]
        at = self.last.to(x.device)[src.to(x.device)]
        kw2 = {k: _at_rows(k, v, at.to(v.device) if isinstance(v, Tensor) else at) for k, v in kw.items()}
        if kw.get("attention_mask") is None and not bool((at == T - 1).all()):
            raise _NotAtRows("without an attention mask the read row must be the last position")
        kw1 = {name: hooks._suffix(name, val, p0) for name, val in kw.items()} if p0 else dict(kw)
        k, v = self._final_keys_values(x, kw1, p0, src)
        kw2["cache"] = _FixedKeyValues(k, v)
        rows = torch.arange(x.shape[0], device=x.device)
        y = block(x[rows, at - p0][:, None], use_cache=False, **kw2)
        y = y[0] if isinstance(y, tuple) else y
        self.flops += x.shape[0] * (T - p0) * qkv_flops_per_token(model) + block_flops(model, self.L - 1, x.shape[0], 1, T)
        return y[:, 0]

    def _columns(self, x: Tensor, src: Tensor, ids: Tensor) -> Tensor:
        """Logits ``[row, k]`` of the token ids ``ids[src]`` only, from final residuals ``[row, d]``."""
        from mechlib.arch import output_device

        model = self.model
        x = model.ln_final(x.to(output_device(model))[:, None])[:, 0]
        lin = model.unembed.original_component
        cols = ids.to(x.device)[src.to(x.device)]  # [row, k]
        logits = torch.bmm(lin.weight[cols], x[:, :, None])[..., 0]
        if getattr(lin, "bias", None) is not None:
            logits = logits + lin.bias[cols]
        self.flops += unembed_flops(model, x.shape[0], cols.shape[1])
        return model.adapter.apply_output_logits_transform(logits)

    def _read(self, x: Tensor, src: Tensor) -> Tensor:
        if self.columns is not None:
            return self._columns(x, src, self.columns[0])
        self.flops += unembed_flops(self.model, x.shape[0])
        return hooks._logits_from_resid(self.model, x[:, None])[:, 0]

    def full(self, rows: _Rows, extras: dict) -> Tensor:
        """Outputs of ``rows`` from full forwards of the corrupted prompts (when resuming cannot be
        verified): every row's patch at its own layer, ``pixel_values`` and other inputs carried."""
        model = self.model
        dev = model.cfg.device
        src = rows.b
        patches = []
        for layer in sorted(set(rows.layer.tolist())):  # rows are sorted by layer
            sel = (rows.layer == layer).nonzero().flatten()
            patches.append(self._patch(layer, rows.take(sel), int(sel[0]), 0))
        tokens = self.contrast.corrupted_tokens.to(dev)[src.to(dev)]
        ex = {k: v.index_select(0, src.to(v.device)) if isinstance(v, Tensor) else v for k, v in extras.items()}
        logits = hooks.forward(model, tokens, hooks=patches, extras=ex)
        self.flops += forward_flops(model, len(src), self.T)
        if self.last is None:
            return logits
        return logits[torch.arange(len(src), device=logits.device), self.last.to(logits.device)[src.to(logits.device)]]

    # ---------------------------------------------------------------- metric values
    def values(self, out: Tensor, src: Tensor, metric, name: str, fill: Tensor) -> Tensor:
        """Per-row metric values. Metrics take copy-major stacks of the whole batch, so rows are
        slotted into copies, the slots no row fills holding the corrupted run's logits (``fill``)."""
        n = len(src)
        if self.columns is not None:
            return check_metric_values(self.columns[1](out), n, name=name)
        order = torch.argsort(src, stable=True)
        counts = torch.bincount(src, minlength=self.B)
        starts = torch.cumsum(counts, 0) - counts
        occ = torch.empty(n, dtype=torch.long)
        occ[order] = torch.arange(n) - starts[src[order]]
        vals = torch.empty(n)
        copies = max(1, self.max_rows // self.B)
        for k0 in range(0, int(occ.max()) + 1, copies):
            sel = ((occ >= k0) & (occ < k0 + copies)).nonzero().flatten()
            k = min(copies, int(occ.max()) + 1 - k0)
            stack = fill.repeat(k, *([1] * (fill.ndim - 1)))
            where = (occ[sel] - k0) * self.B + src[sel]
            stack[where.to(stack.device)] = out[sel.to(out.device)].to(stack.device, stack.dtype)
            v = check_metric_values(metric(stack), k * self.B, name=name)
            vals[sel] = v[where.to(v.device)].detach().float().cpu()
        return vals
