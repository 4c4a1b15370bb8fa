"""How a result was made: recorded by every verb into ``result.metadata["provenance"]`` and saved
with it, so a table read back months later says which model, weights, inputs and options made it.

Recorded: mechlib / TransformerLens / torch / transformers versions, the model's name and a digest
of its weights (sampled: shapes, dtypes and a strided sample of every tensor — cheap, and different
for any two checkpoints that differ materially), dtype, device, the torch seed, a hash of the
inputs' tokens, the verb and its keyword arguments (as text where they are not JSON).
:meth:`mechlib.results.Result.load` shows it and warns when the model passed to it differs.
"""

from __future__ import annotations

import functools
import hashlib
import weakref
from typing import Any, Callable

import torch

_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def weights_digest(model) -> str:
    """A sampled sha256 of the model's weights (cached per model object)."""
    hit = _DIGESTS.get(model)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // 4096)
                h.update(flat[::step].float().cpu().numpy().tobytes())
    digest = h.hexdigest()[:16]
    _DIGESTS[model] = digest
    return digest


def inputs_digest(inputs) -> str:
    """A hash of the token ids (and any image tensors) a verb ran on."""
    from mechlib.tasks.contrast import ContrastSet, PromptBatch

    h = hashlib.sha256()
    if isinstance(inputs, ContrastSet):
        parts = [inputs.clean_tokens, inputs.corrupted_tokens, inputs.answer_ids, inputs.wrong_ids]
    elif isinstance(inputs, PromptBatch):
        parts = [inputs.tokens, inputs.lengths]
    elif isinstance(inputs, torch.Tensor):
        parts = [inputs]
    elif isinstance(inputs, (list, tuple)) and all(isinstance(x, str) for x in inputs):
        h.update("\x00".join(inputs).encode())
        parts = []
    else:
        parts = [t for t in (getattr(inputs, "tokens", None),) if isinstance(t, torch.Tensor)]
    for t in parts:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    for t in getattr(inputs, "extras", {}).values() if hasattr(inputs, "extras") else ():
        if isinstance(t, torch.Tensor):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes()[:1 << 20])
    return h.hexdigest()[:16]


def _jsonish(v: Any):
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)) and len(v) <= 64:
        return [_jsonish(x) for x in v]
    if isinstance(v, dict) and len(v) <= 64:
        return {str(k): _jsonish(x) for k, x in v.items()}
    text = getattr(v, "__name__", None) or type(v).__name__
    return f"<{text}>"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("mechlib", "transformer-lens", "torch", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "?"
    return out


def describe(model, inputs, verb: str, kwargs: dict) -> dict:
    """The provenance record of one call."""
    cfg = model.cfg
    return dict(
        verb=verb, versions=versions(),
        model=str(getattr(cfg, "model_name", None) or type(model).__name__), weights=weights_digest(model),
        dtype=str(getattr(cfg, "dtype", "")), device=str(getattr(cfg, "device", "")),
        torch_seed=int(torch.initial_seed()), inputs=inputs_digest(inputs),
        arguments={k: _jsonish(v) for k, v in kwargs.items()},
    )


def records(verb: Callable) -> Callable:
    """Decorator for a verb ``verb(model, inputs, ...)``: attach its provenance to the result's
    metadata (results and circuits alike)."""

    @functools.wraps(verb)
    def wrapper(model, *args, **kwargs):
        out = verb(model, *args, **kwargs)
        meta = getattr(out, "metadata", None)
        if isinstance(meta, dict) or hasattr(meta, "items"):
            rec = describe(model, args[0] if args else kwargs.get("prompts"), verb.__name__, kwargs)
            object.__setattr__(out, "metadata", {**dict(meta), "provenance": rec})
        return out

    return wrapper
