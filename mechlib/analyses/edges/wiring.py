"""Wiring an edge graph to a model: which hook points carry each writer and reader slot, the
writers' activations of a run, and the masked forward that ablates any set of edges in stacked
copies of a batch — shared by scoring (:mod:`.scoring`) and faithfulness (:mod:`.faithfulness`).
"""

from __future__ import annotations

import bisect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from mechlib import hooks
from mechlib.analyses.edges.graph import GraphSpec
from mechlib.numerics import accumulation_bound, unit_roundoff


@dataclass
class _PostNorm:
    """A post-attention norm linearised with the statistics of each run (see module docstring)."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    eps: float
    center: bool

    def scale(self, raw: Tensor) -> Tensor:
        x = raw.float()
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).rsqrt()  # [b, p, 1]

    def share(self, parts: Tensor, scale: Tensor) -> Tensor:
        """``parts [b, p, H, d]`` → their linear shares of the norm's output (scale frozen)."""
        c = parts.float()
        if self.center:
            c = c - c.mean(-1, keepdim=True)
        c = c * scale[:, :, None]
        return (c * self.weight if self.weight is not None else c).to(parts.dtype)

    def apply(self, raw: Tensor) -> Tensor:
        out = self.share(raw[:, :, None], self.scale(raw))[:, :, 0]
        return out + self.bias if self.bias is not None else out


@dataclass(frozen=True)
class _Slot:
    """A reader hook: one activation feeding ``cols`` (consecutive reader slots) from writers
    ``[:prev]``; ``flat`` activations have no head axis."""

    hook: str
    cols: tuple[int, ...]
    prev: int
    flat: bool


@dataclass
class _Wiring:
    spec: GraphSpec
    family: str
    embed: str
    z: list
    mlp_out: list
    attn_out: list
    W_O: list
    post: list  # per layer: None or (raw hook, _PostNorm)
    slots: list  # [_Slot]

    @property
    def post_norm(self) -> bool:
        return any(p is not None for p in self.post)

    def source_names(self) -> list[str]:
        names = [self.embed] + self.z + self.mlp_out
        names += [p[0] for p in self.post if p is not None]
        return names


def _post_norm_of(model, layer: int, arch) -> _PostNorm:
    norm = model.blocks[layer].ln1_post
    hf = getattr(norm, "original_component", None)
    eps = float(getattr(hf, "eps", None) or getattr(hf, "variance_epsilon", None) or getattr(model.cfg, "eps", 1e-5))
    params = dict(norm.named_parameters())
    w = next((v.detach() for k, v in params.items() if k.endswith("weight")), None)
    b = next((v.detach() for k, v in params.items() if k.endswith("bias")), None)
    if str(getattr(model.cfg, "normalization_type", "")).endswith("Pre"):
        w = b = None
    elif w is not None:
        w = w.float() + arch.norm_offset
    return _PostNorm(w, None if b is None else b.float(), eps, arch.norm == "LN")


def _wiring(model) -> _Wiring:
    """Hook names of every writer and reader on this model (fails early, naming the family)."""
    from mechlib.arch import describe

    arch = describe(model)
    spec = GraphSpec.from_model(model)
    if not arch.pattern_editable:
        raise NotImplementedError(
            f"edge attribution needs separate query/key/value inputs per head, which TransformerLens' "
            f"bridge exposes only where it re-implements attention; this {arch.family} bridge delegates "
            f"attention to Hugging Face ({arch.attention_bridge}), so its q/k/v edges cannot be read or "
            f"patched. Use head-level tools (attribution_patching, path_patching) on this model")
    L = spec.n_layers
    slots = []
    for l in range(L):
        first = 1 + l * (spec.n_heads + 1)
        slots.append(_Slot(f"blocks.{l}.attn.hook_q_input", tuple(spec.q_slot(l, h) for h in range(spec.n_heads)),
                           first, False))
        slots.append(_Slot(f"blocks.{l}.attn.hook_k_input",
                           tuple(spec.k_slot(l, g) for g in range(spec.n_kv_heads)), first, False))
        slots.append(_Slot(f"blocks.{l}.attn.hook_v_input",
                           tuple(spec.v_slot(l, g) for g in range(spec.n_kv_heads)), first, False))
        children = dict(model.blocks[l].named_children())
        if "ln2" in children:
            mlp_in = f"blocks.{l}.ln2.hook_in"
        elif not arch.pre_norm and not arch.parallel:  # OLMo-2: the MLP reads the raw residual
            mlp_in = f"blocks.{l}.mlp.hook_in"
        else:
            raise NotImplementedError(
                f"{arch.family}: block {l} has no separate pre-MLP norm (ln2), so the MLP's residual input "
                f"cannot be told apart from the attention's; edge attribution does not support this block form")
        slots.append(_Slot(mlp_in, (spec.mlp_slot(l),), spec.prev(spec.mlp_slot(l)), True))
    slots.append(_Slot("ln_final.hook_in", (spec.logits_slot,), spec.n_forward, True))
    post = []
    for l in range(L):
        has_post = "ln1_post" in dict(model.blocks[l].named_children())
        post.append((f"blocks.{l}.ln1_post.hook_in", _post_norm_of(model, l, arch)) if has_post else None)
    w = _Wiring(
        spec=spec, family=arch.family, embed="blocks.0.hook_resid_pre",
        z=[f"blocks.{l}.attn.hook_z" for l in range(L)],
        mlp_out=[f"blocks.{l}.hook_mlp_out" for l in range(L)],
        attn_out=[f"blocks.{l}.hook_attn_out" for l in range(L)],
        W_O=[model.blocks[l].attn.W_O.detach() for l in range(L)],  # [H, d_head, d_model]
        post=post, slots=slots,
    )
    for name in w.source_names() + w.attn_out + [s.hook for s in slots]:
        hooks.hook_point(model, name)  # KeyError naming close hook names
    return w


@contextmanager
def _split_qkv(model) -> Iterator[None]:
    """Separate residual copies for every head's q/k/v input (``hook_q_input`` ...), restored after."""
    before = bool(getattr(model.cfg, "use_split_qkv_input", False))
    try:
        if not before:
            model.set_use_split_qkv_input(True)
        yield
    finally:
        if bool(getattr(model.cfg, "use_split_qkv_input", False)) != before:
            model.set_use_split_qkv_input(before)


def _head_writes(w: _Wiring, layer: int, z: Tensor, raw: Optional[Tensor]) -> Tensor:
    """``z [b, p, H, d_head]`` → each head's write to the residual ``[b, p, H, d_model]``."""
    W_O = w.W_O[layer].to(z.device, z.dtype)
    heads = torch.einsum("bphe,hed->bphd", z, W_O)
    if w.post[layer] is not None:
        norm = w.post[layer][1]
        heads = norm.share(heads, norm.scale(raw))
    return heads


def _assemble(w: _Wiring, cache: Mapping[str, Tensor]) -> Tensor:
    """Writer activations ``[b, p, n_forward, d_model]`` from one run's cache."""
    spec = w.spec
    embed = cache[w.embed]
    b, p, d = embed.shape
    acts = embed.new_empty((b, p, spec.n_forward, d))
    acts[:, :, 0] = embed
    for l in range(spec.n_layers):
        raw = cache[w.post[l][0]] if w.post[l] is not None else None
        i = spec.head_index(l, 0)
        acts[:, :, i:i + spec.n_heads] = _head_writes(w, l, cache[w.z[l]], raw)
        acts[:, :, spec.mlp_index(l)] = cache[w.mlp_out[l]]
    return acts


def _record(model, w: _Wiring, tokens: Tensor, extras, *, extra_names: Sequence[str] = ()):
    """``(logits, writers [b, p, F, d], cache)`` of a plain no-grad forward."""
    names = list(dict.fromkeys(w.source_names() + list(extra_names)))
    logits, cache = hooks.run_with_cache(model, tokens, names, extras=extras)
    return logits, _assemble(w, cache), cache


def _check_additive(model, w: _Wiring, tokens: Tensor, extras) -> None:
    """Once per call: the final residual and every MLP input are the sums of the writers (plus
    constant biases); otherwise edge ablation would be silently wrong on this architecture."""
    spec = w.spec
    mlp_slots = [s for s in w.slots if s.cols == (spec.mlp_slot(0),)]
    names = w.attn_out + [mlp_slots[0].hook, "ln_final.hook_in"]
    _, acts, cache = _record(model, w, tokens, extras, extra_names=names)
    bias = sum(cache[w.attn_out[l]] - acts[:, :, spec.head_index(l, 0):spec.head_index(l, 0) + spec.n_heads].sum(2)
               for l in range(spec.n_layers))
    final = acts.sum(2) + bias
    target = cache["ln_final.hook_in"]
    tol = 1e-3 * float(target.abs().max()) + 1e-4
    # half precision: the stream's own rounding of each addition (embedding, then attention and MLP per layer)
    stream = [cache[w.embed]] + [cache[n] for l in range(spec.n_layers) for n in (w.attn_out[l], w.mlp_out[l])]
    over = (final - target).abs() - accumulation_bound(stream, model.cfg.dtype)
    err = float((final - target).abs().max())
    if float(over.max()) > tol:
        raise NotImplementedError(f"{w.family}: the final residual is not the sum of the embedding, head, MLP "
                                  f"and bias writes (off by {err:.3g}), so edges cannot be ablated exactly here")
    first = cache[w.embed] if spec.parallel else cache[w.embed] + cache[w.attn_out[0]]
    err = float((cache[mlp_slots[0].hook] - first).abs().max())
    if err > tol + float(unit_roundoff(model.cfg.dtype)) * float(first.abs().max()):
        raise NotImplementedError(f"{w.family}: the MLP's input hook ({mlp_slots[0].hook}) is not the residual "
                                  f"stream the MLP reads (off by {err:.3g}); edge attribution cannot use it")
    for l, p in enumerate(w.post):
        if p is None:
            continue
        want = cache[w.attn_out[l]]
        scale = 1e-3 * float(want.abs().max()) + 1e-5
        if not torch.allclose(p[1].apply(cache[p[0]]).float(), want.float(), atol=scale,
                              rtol=4 * unit_roundoff(model.cfg.dtype)):
            raise NotImplementedError(f"{w.family}: could not reproduce layer {l}'s post-attention norm from "
                                      "its input, so per-head writes cannot be linearised exactly")
        i = spec.head_index(l, 0)
        rest = float((want - acts[:, :, i:i + spec.n_heads].sum(2)).abs().max())
        if rest > scale:
            warnings.warn(f"{w.family}: layer {l}'s attention has an output bias, and its share of the post-norm "
                          "output changes with each run's norm scale; it is a constant of no node, never ablated, "
                          "so the empty graph is not exactly the corrupted run", stacklevel=3)


def _masked_logits(model, w: _Wiring, tokens: Tensor, extras, ablated: Tensor, notin: Tensor) -> Tensor:
    """Logits of ``C`` stacked copies of the batch (copy-major), copy ``c`` with the edges
    ``notin[c]`` (``[C, n_forward, n_backward]`` bool) ablated: every reader input is rebuilt as
    ``input − Σ_{ablated edges u→v} (a_u(this run) − a_u(ablated))``.

    Only the writers some ablated edge leaves from are tracked (exact patching ablates one edge per
    copy: a handful of writers, not all of them), and only the readers it enters are rebuilt."""
    spec = w.spec
    C, b = notin.shape[0], tokens.shape[0]
    notin = notin.to(model.cfg.device)
    if not bool(notin.any()):
        return hooks.forward(model, tokens.repeat(C, 1), extras=_tile(extras, C))
    used = notin.any(-1).any(0).nonzero().flatten()  # the tracked writers, in order
    tracked = used.tolist()

    def any_tracked(first: int, n: int) -> bool:  # a tracked writer among first..first+n-1
        return bisect.bisect_left(tracked, first) < bisect.bisect_left(tracked, first + n)

    # buf["d"]: [C, n_tracked, b, p, d] = a(this run) − a(ablated) of the tracked writers, filled as
    # they fire; writer-major so that each reader's correction is one batched matmul over the copies
    buf: dict[str, Tensor] = {}
    zs: dict[int, Tensor] = {}

    def write(first: int, value: Tensor) -> None:  # value [C*b, p, n, d]: writers first..first+n-1
        lo, hi = bisect.bisect_left(tracked, first), bisect.bisect_left(tracked, first + value.shape[2])
        if lo == hi:
            return
        ws = tracked[lo:hi]
        if ws[-1] - ws[0] == hi - lo - 1:  # a run of writers: slices, no copies
            cols, rows = slice(ws[0] - first, ws[-1] - first + 1), slice(ws[0], ws[-1] + 1)
        else:
            cols, rows = [w - first for w in ws], ws
        abl = ablated[:, :, rows].to(value.device, value.dtype)
        diff = value[:, :, cols].reshape(C, b, value.shape[1], hi - lo, value.shape[-1]) - abl[None]
        buf["d"][:, lo:hi] = diff.permute(0, 3, 1, 2, 4)

    def on_embed(x, hook):
        buf["d"] = x.new_zeros((C, len(tracked), b, x.shape[1], x.shape[-1]))
        write(0, x[:, :, None])

    def on_z(x, hook, l):
        if w.post[l] is not None:  # the write needs this run's post-norm scale: finish at its input
            zs[l] = x
            return None
        write(spec.head_index(l, 0), _head_writes(w, l, x, None))

    def on_raw(x, hook, l):
        write(spec.head_index(l, 0), _head_writes(w, l, zs.pop(l), x))

    def on_mlp(x, hook, l):
        write(spec.mlp_index(l), x[:, :, None])

    def on_reader(x, hook, slot: _Slot, n: int, weights: Tensor):
        d = buf["d"][:, :n]  # [C, n, b, p, d]: the tracked writers before this reader
        k = weights.shape[-1]
        corr = torch.bmm(weights.transpose(1, 2).to(d.dtype), d.reshape(C, n, -1))  # [C, k, b·p·d]
        corr = corr.reshape(C, k, b, d.shape[3], d.shape[4]).permute(0, 2, 3, 1, 4).reshape(C * b, d.shape[3], k, -1)
        return x - (corr[:, :, 0] if slot.flat else corr)

    hk = [(w.embed, on_embed)]
    for l in range(spec.n_layers):
        i = spec.head_index(l, 0)
        if any_tracked(i, spec.n_heads):
            hk.append((w.z[l], lambda x, hook, l=l: on_z(x, hook, l)))
            if w.post[l] is not None:
                hk.append((w.post[l][0], lambda x, hook, l=l: on_raw(x, hook, l)))
        if any_tracked(spec.mlp_index(l), 1):
            hk.append((w.mlp_out[l], lambda x, hook, l=l: on_mlp(x, hook, l)))
    for s in w.slots:
        n = int((used < s.prev).sum())
        weights = notin[:, used[:n]][:, :, list(s.cols)]
        if bool(weights.any()):
            hk.append((s.hook, lambda x, hook, s=s, n=n, wt=weights: on_reader(x, hook, s, n, wt)))
    return hooks.forward(model, tokens.repeat(C, 1), hooks=hk, extras=_tile(extras, C))


def _tile(extras: Mapping[str, Tensor], C: int) -> dict:
    return {k: v.repeat(C, *([1] * (v.ndim - 1))) if isinstance(v, Tensor) else v for k, v in (extras or {}).items()}


def _chunk(model, b: int, p: int, per_copy_floats: int, budget_mb: float = 1024, cap: int = 256) -> int:
    """Copies of a batch per forward under a memory budget."""
    bits = torch.finfo(model.cfg.dtype).bits if model.cfg.dtype.is_floating_point else 32
    per_copy = b * p * (per_copy_floats + model.cfg.d_vocab) * bits // 8
    return int(max(1, min(cap, budget_mb * 2**20 // max(per_copy, 1))))


def _check_inputs(model, contrast, metric, verb: str) -> None:
    from mechlib.analyses.patching.common import _check_contrast

    _check_contrast(model, contrast)
    if not callable(metric):
        raise TypeError(f"{verb}: metric must be a function logits -> [batch] (e.g. mechlib.metrics.logit_diff("
                        f"contrast)), got {type(metric).__name__}")


def _metric_name(metric) -> str:
    return getattr(metric, "__name__", type(metric).__name__)


def _rows(extras: Mapping[str, Tensor], idx: Sequence[int]) -> dict:
    t = torch.as_tensor(list(idx))
    return {k: v[t] if isinstance(v, Tensor) else v for k, v in (extras or {}).items()}
