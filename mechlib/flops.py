"""How many floating-point operations a forward (or a patching sweep) must do, and what the
machine can do: for reading a speed figure as a fraction of the machine's limit.

Counted: every matrix multiply — the blocks' linear layers (per token, measured once per model with
``torch.utils.flop_counter``, so gated MLPs, fused projections and grouped-query attention need no
per-family formula), attention scores and the weighted sum of values (``4 x heads x d_head`` per
query-key pair) and the unembedding (``2 x d_model x d_vocab`` per position unembedded).
Element-wise work (norms, rotary, softmax) is left out, as ``torch.utils.flop_counter`` leaves it
out; on a tiny model the two counts agree exactly (tested).

:func:`matmul_peak` measures the machine's own dense float32 throughput in the running process —
the denominator of "fraction of peak" — instead of trusting a spec sheet.
"""

from __future__ import annotations

import time
import weakref
from typing import Optional

import torch

_PER_TOKEN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _linear_per_token(model) -> list[int]:
    """Per block: FLOPs of its linear layers for one token — measured once per model with
    ``torch.utils.flop_counter`` on an 8-token forward (the known attention and unembedding terms
    subtracted), so fused or split projections count as the model actually runs them."""
    if model not in _PER_TOKEN:
        from torch.utils.flop_counter import FlopCounterMode

        T, cfg = 8, model.cfg
        tokens = torch.full((1, T), int(getattr(model.tokenizer, "eos_token_id", None) or 1), dtype=torch.long)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(tokens.to(cfg.device))
        total = counter.get_total_flops()
        known = cfg.n_layers * 4 * cfg.n_heads * cfg.d_head * T * T + T * 2 * cfg.d_model * cfg.d_vocab
        _PER_TOKEN[model] = [int(round((total - known) / (cfg.n_layers * T)))] * cfg.n_layers
    return _PER_TOKEN[model]


def forward_flops(model, rows: int, queries: int, keys: Optional[int] = None, *, start_layer: int = 0,
                  unembedded: Optional[int] = None) -> int:
    """Matmul FLOPs of running blocks ``start_layer..`` on ``rows`` sequences, each with ``queries``
    recomputed positions attending to ``keys`` positions (default: ``queries``), then unembedding
    ``unembedded`` positions in all (default: every recomputed position of every row)."""
    keys = queries if keys is None else keys
    cfg = model.cfg
    per_layer = _linear_per_token(model)
    d_head = cfg.d_head
    attn = 4 * cfg.n_heads * d_head * keys  # q.k scores and pattern @ v, per query
    total = sum(rows * queries * (per_layer[l] + attn) for l in range(start_layer, cfg.n_layers))
    n_out = rows * queries if unembedded is None else unembedded
    return int(total + n_out * 2 * cfg.d_model * cfg.d_vocab)


def block_flops(model, layer: int, rows: int, queries: int, keys: int) -> int:
    """Matmul FLOPs of block ``layer`` on ``rows`` sequences of ``queries`` positions attending to
    ``keys`` positions each (the layer-major schedule runs each block on a different number of rows)."""
    cfg = model.cfg
    return int(rows * queries * (_linear_per_token(model)[layer] + 4 * cfg.n_heads * cfg.d_head * keys))


def qkv_flops_per_token(model) -> int:
    """Matmul FLOPs of one position's query, key and value projections (grouped-query models
    project ``n_key_value_heads`` keys and values)."""
    cfg = model.cfg
    kv = int(getattr(cfg, "n_key_value_heads", None) or cfg.n_heads)
    return int(2 * cfg.d_model * cfg.d_head * (cfg.n_heads + 2 * kv))


def unembed_flops(model, rows: int, columns: Optional[int] = None) -> int:
    """Matmul FLOPs of unembedding ``rows`` positions, at every vocabulary entry or at ``columns``
    entries per row (a metric that reads only a few logits, e.g. a logit difference)."""
    return int(rows * 2 * model.cfg.d_model * (model.cfg.d_vocab if columns is None else columns))


def matmul_peak(device=None, n: int = 2048, repeats: int = 5) -> float:
    """The machine's dense float32 matmul throughput (FLOP/s): best of ``repeats`` ``n x n`` products,
    measured now, in this process, with torch's current thread settings."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best
