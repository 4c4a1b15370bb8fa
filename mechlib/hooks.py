"""The only module in mechlib that adds hooks.

* :func:`attach` — a context manager that adds forward hooks and removes exactly those hooks on
  exit (also when the body raises), leaving hooks the user added alone. By default it raises
  :class:`HookNotFiredError` if one of its hooks never ran: a patch that silently did nothing
  looks exactly like "this component does not matter".
* :func:`capture` / :func:`run_with_cache` — cache only the named hook points (the bridge caches
  ~1,400 tensors per forward otherwise).
* :func:`forward` — one no-grad forward with hooks and the extra model inputs (``pixel_values``),
  refusing to run a multimodal model without its image.

Hook functions take ``(activation, hook)`` and return ``None`` (observe) or a replacement tensor,
as in TransformerLens.
"""

from __future__ import annotations

import difflib
import itertools
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

HookFn = Callable[..., Optional[Tensor]]


class HookNotFiredError(RuntimeError):
    """A hook mechlib attached never ran during the forward it was meant for."""


class MissingModelInputError(ValueError):
    """A multimodal model was called without the inputs it needs (e.g. ``pixel_values``)."""


def hook_point(model, name: str):
    """The HookPoint called ``name`` (legacy names such as ``blocks.3.hook_resid_pre`` work)."""
    # the bridge's registry holds every name and alias; ``hook_dict`` rebuilds it on each access
    # (about a millisecond: a sweep's per-block hooks felt it), so it is the fallback only
    registry = getattr(model, "_hook_registry", None)
    hp = registry.get(name) if isinstance(registry, dict) else None
    if hp is None:
        hp = model.hook_dict.get(name)
    if hp is None:
        near = difflib.get_close_matches(name, list(model.hook_dict), n=3)
        hint = f" Close names: {near}." if near else ""
        raise KeyError(f"model has no hook point {name!r}.{hint}")
    return hp


def active_hooks(model) -> list[str]:
    """Names of hook points that currently carry any forward or backward hook (for leak checks)."""
    seen, out = set(), []
    for name, hp in model.hook_dict.items():
        if id(hp) in seen:
            continue
        seen.add(id(hp))
        if hp.fwd_hooks or hp.bwd_hooks or hp._forward_hooks or hp._backward_hooks:
            out.append(name)
    return out


_PAUSED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_ATTACHED = itertools.count()


@contextmanager
def paused(model) -> Iterator[None]:
    """Inside the block the hooks :func:`attach` added to ``model`` before it (every active mechlib
    edit's) do nothing, while hooks attached inside it run: for a forward of the unedited model in
    the middle of an edit's block (e.g. the inputs and keys and values
    :func:`mechlib.metrics.evaluate` resumes from)."""
    before = _PAUSED.get(model)
    _PAUSED[model] = next(_ATTACHED)
    try:
        yield
    finally:
        if before is None:
            _PAUSED.pop(model, None)
        else:
            _PAUSED[model] = before


@contextmanager
def attach(
    model, hooks: Sequence[tuple[str, HookFn]], *, must_fire: bool = True
) -> Iterator[dict[str, int]]:
    """Add forward hooks for the duration of a ``with`` block; yields ``{name: times fired}``.

    Args:
        hooks: ``(hook_name, fn)`` pairs; ``fn(activation, hook) -> None | Tensor``.
        must_fire: raise :class:`HookNotFiredError` at exit if a hook never ran.

    Example:
        >>> with attach(model, [("blocks.0.hook_resid_pre", lambda x, hook: x * 0)]):  # doctest: +SKIP
        ...     logits = model(tokens)
    """
    added: list[tuple[object, object]] = []
    fired: dict[str, int] = {name: 0 for name, _ in hooks}
    points = [(name, hook_point(model, name), fn) for name, fn in hooks]  # fail before adding any

    seq = next(_ATTACHED)

    def counted(name: str, fn: HookFn) -> HookFn:
        def wrapper(act, hook):
            if _PAUSED.get(model, -1) > seq:  # attached before a paused(model) block that is running
                return None
            fired[name] += 1
            return fn(act, hook=hook)

        return wrapper

    try:
        for name, hp, fn in points:
            handle = hp.add_hook(counted(name, fn), dir="fwd")
            added.append((hp, handle))
        yield fired
    finally:
        for hp, handle in added:
            handle.hook.remove()
            if handle in hp.fwd_hooks:
                hp.fwd_hooks.remove(handle)
    if must_fire:
        silent = [n for n, c in fired.items() if c == 0]
        if silent:
            raise HookNotFiredError(
                f"hooks on {silent} never fired: the forward did not pass through these points "
                f"(stopped early, or this bridge does not route them), so nothing was patched"
            )


def image_token_id(model) -> Optional[int]:
    """The image placeholder token of a VLM bridge (``None`` for a text model)."""
    cfg = getattr(getattr(model, "original_model", None), "config", None)
    return getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)


def _has_image_tokens(model, tokens: Optional[Tensor]) -> bool:
    tid = image_token_id(model)
    return tokens is None or tid is None or bool((tokens == tid).any())


def check_inputs(model, extras: Optional[Mapping[str, Tensor]], tokens: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Validate extra forward inputs: a multimodal model must get ``pixel_values`` (unless the
    ``tokens`` are known to hold no image token: a text-only run of a VLM is legitimate)."""
    extras = dict(extras or {})
    if (getattr(model.cfg, "is_multimodal", False) and extras.get("pixel_values") is None
            and _has_image_tokens(model, tokens)):
        raise MissingModelInputError(
            "this is a multimodal model but no pixel_values were given: its image tokens would be "
            "run without the image (TransformerLens does this silently). Pass pixel_values, e.g. "
            "ContrastSet.from_prompts(..., extras={'pixel_values': pixels}), or "
            "extras={'pixel_values': pixels} to the probes (attention_sinks, ...)"
        )
    return extras


def _on_device(model, extras: Mapping[str, Tensor]) -> dict[str, Tensor]:
    dev = model.cfg.device
    return {k: (v.to(dev) if isinstance(v, Tensor) else v) for k, v in extras.items()}


def forward(
    model,
    tokens: Tensor,
    *,
    hooks: Sequence[tuple[str, HookFn]] = (),
    extras: Optional[Mapping[str, Tensor]] = None,
    grad: bool = False,
    must_fire: bool = True,
) -> Tensor:
    """Logits ``[batch, pos, vocab]`` of one forward with ``hooks`` attached (no grad by default)."""
    extras = _on_device(model, check_inputs(model, extras, tokens))
    tokens = tokens.to(model.cfg.device)
    with torch.set_grad_enabled(grad), attach(model, hooks, must_fire=must_fire):
        return model(tokens, **extras)


class _StopForward(Exception):
    """Raised from a hook to end a forward early, carrying the activation it saw."""

    def __init__(self, value: Tensor):
        super().__init__("forward stopped early by mechlib")
        self.value = value


def forward_last(model, tokens: Tensor, read_pos: Tensor, *, hooks: Sequence[tuple[str, HookFn]] = (),
                 extras: Optional[Mapping[str, Tensor]] = None, grad: bool = False) -> Tensor:
    """Logits ``[batch, vocab]`` at one position per prompt (``read_pos``): the blocks run as usual,
    then the forward stops before the final norm and only those positions are unembedded — on a
    262k vocabulary (Gemma 3) the full unembedding is most of a short forward. ``grad=True`` keeps
    the graph (gradients flow from those positions' logits only, as they would from the full ones)."""
    x = _run_until(model, tokens, "ln_final.hook_in", hooks=hooks, extras=extras, grad=grad)
    rows = torch.arange(x.shape[0], device=x.device)
    with torch.set_grad_enabled(grad):
        return _logits_from_resid(model, x[rows, read_pos.to(x.device)][:, None])[:, 0]


def forward_read(model, tokens: Tensor, read_pos: Optional[Tensor], *, hooks: Sequence[tuple[str, HookFn]] = (),
                 extras: Optional[Mapping[str, Tensor]] = None, grad: bool = False) -> Tensor:
    """The logits a metric reads: ``[batch, vocab]`` at ``read_pos`` (:func:`forward_last`), or all
    of them, ``[batch, pos, vocab]``, when ``read_pos`` is ``None`` (:func:`forward`); see
    :func:`mechlib.metrics.read_positions`."""
    if read_pos is None:
        return forward(model, tokens, hooks=hooks, extras=extras, grad=grad)
    return forward_last(model, tokens, read_pos, hooks=hooks, extras=extras, grad=grad)


def _run_until(model, tokens: Tensor, stop: str, *, hooks: Sequence[tuple[str, HookFn]] = (),
               extras: Optional[Mapping[str, Tensor]] = None, grad: bool = False) -> Tensor:
    """Run a forward until hook point ``stop`` fires and return what it saw there; nothing after
    that point runs."""
    extras = _on_device(model, check_inputs(model, extras, tokens))

    def halt(x, hook):
        raise _StopForward(x)

    try:
        with torch.set_grad_enabled(grad), attach(model, list(hooks) + [(stop, halt)]):
            model(tokens.to(model.cfg.device), **extras)
    except _StopForward as done:
        return done.value
    raise HookNotFiredError(f"{stop} never fired: cannot stop this forward there")  # pragma: no cover


@contextmanager
def capture(model, names: Sequence[str], *, detach: bool = True) -> Iterator[dict[str, Tensor]]:
    """Record the named activations of the forwards run inside the block (last one wins).

    Example:
        >>> with capture(model, ["blocks.0.attn.hook_pattern"]) as acts:   # doctest: +SKIP
        ...     model(tokens)
        >>> acts["blocks.0.attn.hook_pattern"].shape
    """
    store: dict[str, Tensor] = {}

    def saver(name: str) -> HookFn:
        def fn(act, hook):
            store[name] = act.detach() if detach else act

        return fn

    with attach(model, [(n, saver(n)) for n in dict.fromkeys(names)]):
        yield store


def run_with_cache(
    model,
    tokens: Tensor,
    names: Sequence[str],
    *,
    extras: Optional[Mapping[str, Tensor]] = None,
    hooks: Sequence[tuple[str, HookFn]] = (),
):
    """``(logits, cache)`` caching only ``names`` (plus optional patch hooks). The cache is
    TransformerLens' ``ActivationCache`` (``cache[name]``, ``accumulated_resid``, ...), so what
    mechlib records can go straight into TL's tools, and a user's own cache can be handed to verbs
    that take ``cache=``."""
    from transformer_lens import ActivationCache

    with capture(model, names) as store:
        logits = forward(model, tokens, hooks=hooks, extras=extras)
    return logits, ActivationCache(dict(store), model)


def _stop_after(model, names: Sequence[str]) -> Optional[str]:
    """The hook point a forward reaches right after the last of ``names``: the next block's input,
    or the final norm's input after the last block; ``None`` when a name lies past the blocks (or
    the bridge has no such point), so the whole forward must run."""
    layers = []
    for n in names:
        parts = n.split(".")
        if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
            layers.append(int(parts[1]))
        elif n in ("hook_embed", "hook_pos_embed"):
            layers.append(-1)
        else:
            return None
    k = max(layers, default=model.cfg.n_layers) + 1
    stop = f"blocks.{k}.hook_resid_pre" if k < model.cfg.n_layers else "ln_final.hook_in"
    try:
        hook_point(model, stop)
    except Exception:  # noqa: BLE001 - no such point on this bridge: run the whole forward
        return None
    return stop


def activations(
    model,
    tokens: Tensor,
    names: Sequence[str],
    *,
    extras: Optional[Mapping[str, Tensor]] = None,
    hooks: Sequence[tuple[str, HookFn]] = (),
):
    """The activations at ``names`` of one forward, as :func:`run_with_cache`'s cache, without the
    logits: the forward stops once the last of them is computed, so no later block, final norm or
    unembedding runs (a probe of layer 3 of 30 runs four blocks; on Gemma 3's 262k vocabulary the
    unembedding alone is most of a short forward). Names past the blocks run the whole forward."""
    from transformer_lens import ActivationCache

    stop = _stop_after(model, names)
    if stop is None:
        return run_with_cache(model, tokens, names, extras=extras, hooks=hooks)[1]

    with capture(model, names) as store:
        _run_until(model, tokens, stop, hooks=hooks, extras=extras)
    missing = [n for n in names if n not in store]
    if missing:
        raise HookNotFiredError(f"hooks on {missing} never fired before {stop}: this bridge does not route them")
    return ActivationCache(dict(store), model)


def cached(model, cache, names: Sequence[str], n_prompts: int):
    """Activations ``{name: tensor}`` from a user's cache (an ``ActivationCache`` or dict), checked
    to hold every needed hook for the prompts (batch axis first)."""
    have = set(cache.keys())
    missing = [n for n in names if n not in have]
    if missing:
        raise KeyError(f"the cache lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}: run the model with "
                       f"names_filter covering them, or drop cache= to let mechlib run it")
    out = {n: cache[n] for n in names}
    bad = [n for n, v in out.items() if v.shape[0] != n_prompts]
    if bad:
        raise ValueError(f"cached {bad[0]} has batch {out[bad[0]].shape[0]} but there are {n_prompts} prompts "
                         "(a cache made with remove_batch_dim=True, or for other prompts)")
    return out


# ------------------------------------------------------------------------------------------
# Resuming a forward at a block (compute actually saved, unlike the bridge's start_at_layer)
# ------------------------------------------------------------------------------------------


class BlockInputs:
    """What the blocks received during a forward, from block ``layer`` on: the residual entering
    ``layer`` and every later block's keyword arguments (attention mask, rotary embeddings, position
    ids — they differ between layers on models with local/global attention, e.g. Gemma 2/3).
    :func:`run_from` replays the rest of the model from here, for ``k`` stacked copies of the
    batch, without recomputing earlier blocks."""

    def __init__(self, resid: Tensor, layer: int, kwargs_by_layer: dict[int, dict], batch: int):
        self.resid = resid
        self.layer = layer
        self.kwargs_by_layer = kwargs_by_layer  # shared by the BlockInputs of one recording
        self.batch = batch

    @property
    def kwargs(self) -> dict:
        return self.kwargs_by_layer[self.layer]

    def expanded_kwargs(self, k: int, layer: Optional[int] = None) -> dict:
        """Keyword arguments of block ``layer`` (default: the start block) for ``k`` stacked copies:
        batch-sized tensors are tiled copy-major, broadcastable ones (first axis 1 while the batch
        is larger) are left alone."""

        def rep(v):
            if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == self.batch and k > 1:
                return v.repeat(k, *([1] * (v.ndim - 1)))
            if isinstance(v, tuple):
                return tuple(rep(x) for x in v)
            return v

        kw = self.kwargs_by_layer[self.layer if layer is None else layer]
        return {key: rep(v) for key, v in kw.items()}


_NOT_REPLAYED = ("hidden_states", "cache", "past_key_values", "past_key_value", "use_cache", "layer_past")


@contextmanager
def record_block_inputs(model, layers: Sequence[int]) -> Iterator[dict[int, BlockInputs]]:
    """Record the inputs of ``model.blocks[l]`` for ``l in layers`` during the forward in the block
    (and the keyword arguments of every later block, which :func:`run_from` needs).

    Uses plain PyTorch forward-pre-hooks on the block modules (removed on exit, exactly).
    """
    store: dict[int, BlockInputs] = {}
    wanted = set(layers)
    handles = []
    if not wanted:
        yield store
        return
    kwargs_by_layer: dict[int, dict] = {}

    def make(layer: int):
        def pre(module, args, kwargs):
            kwargs_by_layer[layer] = {k: v for k, v in kwargs.items() if k not in _NOT_REPLAYED}
            if layer in wanted:
                resid = args[0] if args else kwargs.get("hidden_states")
                store[layer] = BlockInputs(resid.detach(), layer, kwargs_by_layer, int(resid.shape[0]))

        return pre

    try:
        for l in range(min(wanted), model.cfg.n_layers):
            handles.append(model.blocks[l].register_forward_pre_hook(make(l), with_kwargs=True))
        yield store
    finally:
        for h in handles:
            h.remove()


def _logits_from_resid(model, x: Tensor) -> Tensor:
    """Final norm, unembedding and the architecture's output transform (Gemma 2's soft cap)."""
    from mechlib.arch import output_device

    logits = model.unembed(model.ln_final(x.to(output_device(model))))
    return model.adapter.apply_output_logits_transform(logits)


def run_from(
    model,
    start: BlockInputs,
    layer: int,
    *,
    copies: int = 1,
    hooks: Sequence[tuple[str, HookFn]] = (),
    read_pos: Optional[Tensor] = None,
    resid: Optional[Tensor] = None,
    prefix: Optional["Prefix"] = None,
    from_pos: int = 0,
    until: Optional[int] = None,
) -> Optional[Tensor]:
    """Logits of the model resumed at block ``layer`` from recorded inputs, for ``copies`` stacked
    copies of the batch (rows ``[k*B:(k+1)*B]`` are copy ``k``), with ``hooks`` attached.

    Blocks before ``layer`` are not run; each later block gets its own recorded keyword arguments
    (masks and rotary embeddings differ between local and global layers). With ``read_pos``
    (``[batch]`` positions, tiled over the copies), the final norm and unembedding run at those
    positions only and the result is ``[copies*batch, vocab]``. ``resid`` replaces the recorded
    residual entering ``layer`` (``[copies*batch, pos, d_model]``). Callers should check once that
    resuming reproduces the model's own logits (:func:`resume_matches`).

    Causal prefix reuse: with ``prefix`` (the keys and values of the recorded run, see
    :func:`record_prefix`) and ``from_pos = p``, only positions ``p, p+1, ...`` are recomputed —
    attention reads the earlier positions' keys and values from the recorded run, which is exact
    when nothing before ``p`` differs from it (causal attention). Hook activations then cover
    positions ``p..`` only (``resid`` too), and every ``read_pos`` must be ``>= p``. Check once per
    model with :func:`prefix_check`.

    ``until``: run blocks ``layer..until`` only and return ``None`` — for a pass whose hooks
    capture what they need inside those blocks (no later block, final norm or unembedding runs).
    """
    from mechlib.arch import block_device

    if layer != start.layer:
        raise ValueError(f"these inputs were recorded at block {start.layer}, not {layer}")
    x = start.resid if resid is None else resid
    if resid is None and from_pos:
        x = x[:, from_pos:]
    if copies > 1 and resid is None:
        x = x.repeat(copies, *([1] * (x.ndim - 1)))
    cache = None if prefix is None or not from_pos else _PrefixCache(prefix, from_pos, copies)
    with torch.no_grad(), attach(model, hooks), _cache_reaches_attention(model, layer, cache is not None):
        last = model.cfg.n_layers - 1 if until is None else until
        if not layer <= last < model.cfg.n_layers:
            raise ValueError(f"until={until} must lie in [{layer}, {model.cfg.n_layers - 1}]")
        for l in range(layer, last + 1):
            dev = block_device(model, l)
            kwargs = _to_device(start.expanded_kwargs(copies, l), dev)
            if cache is not None:
                kwargs = {k: _suffix(k, v, from_pos) for k, v in kwargs.items()}
                kwargs["cache"] = cache
            out = model.blocks[l](x.to(dev), use_cache=False, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
        if until is not None:
            return None
        if read_pos is not None:
            rows = torch.arange(x.shape[0], device=x.device)
            at = read_pos.to(x.device).repeat(x.shape[0] // read_pos.shape[0]) - from_pos
            if bool((at < 0).any()):
                raise ValueError(f"read_pos {int(at.min()) + from_pos} lies before from_pos={from_pos}")
            x = x[rows, at][:, None]
            return _logits_from_resid(model, x)[:, 0]
        return _logits_from_resid(model, x)


# ------------------------------------------------------------------------------------------
# Causal prefix reuse: keys and values of a recorded run stand in for unchanged early positions
# ------------------------------------------------------------------------------------------


class Prefix:
    """Keys and values ``{layer: (k, v)}`` (``[batch, kv_head, pos, d_head]``, as the attention
    caches them: after RoPE and q/k norms) that a recorded forward computed, from a start layer on."""

    def __init__(self, kv: dict[int, tuple[Tensor, Tensor]], batch: int):
        self.kv = kv
        self.batch = batch


class _RecordingCache:
    """A key/value cache that only records what each layer's attention puts in it."""

    def __init__(self):
        self.kv: dict[int, tuple[Tensor, Tensor]] = {}
        self.calls: dict[int, int] = {}

    def update(self, k, v, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (k.detach(), v.detach())
        self.calls[layer_idx] = self.calls.get(layer_idx, 0) + 1
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class _PrefixCache:
    """A key/value cache holding positions ``< pos`` of a recorded run, tiled over ``copies`` —
    or, when ``copies`` is a tensor, one row per entry: the recorded prompt each row continues."""

    def __init__(self, prefix: Prefix, pos: int, copies):
        self.prefix, self.pos, self.copies = prefix, pos, copies
        self.calls = 0

    def update(self, k, v, layer_idx, *args, **kwargs):
        self.calls += 1
        pk, pv = self.prefix.kv[layer_idx]

        def head(t):
            t = t[..., :self.pos, :].to(k.device)
            if isinstance(self.copies, Tensor):
                return t.index_select(0, self.copies.to(t.device))
            return t.repeat(self.copies, *([1] * (t.ndim - 1))) if self.copies > 1 else t

        return torch.cat([head(pk), k], dim=-2), torch.cat([head(pv), v], dim=-2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.pos


_SLICED = {"attention_mask", "position_ids", "cache_position", "position_embeddings"}


class PrefixUnsupported(RuntimeError):
    """Causal prefix reuse cannot be used on this model (the message says why)."""


def _suffix(key: str, v, p: int):
    """Block keyword argument ``key`` for query positions ``p..`` only."""
    if v is None or not isinstance(v, (Tensor, tuple)):
        return v
    if key == "attention_mask":
        if not isinstance(v, Tensor) or v.ndim != 4:
            raise PrefixUnsupported(f"the blocks get a {getattr(v, 'ndim', type(v).__name__)}-d attention mask, "
                                    "not a [batch, 1, query, key] one")
        return v[:, :, p:, :]
    if key == "position_ids":
        return v[..., p:]
    if key == "cache_position":
        return v[p:]
    if key == "position_embeddings":
        return tuple(x[:, p:] for x in v)
    raise PrefixUnsupported(f"the blocks get a positional input {key!r} mechlib does not know how to cut")


@contextmanager
def _cache_reaches_attention(model, layer: int, on: bool):
    """TransformerLens' attention bridges read a cache called ``past_key_values`` while
    transformers 5 decoder layers pass it on as ``cache``: hand it over under both names."""
    handles = []

    def pre(module, args, kwargs):
        if kwargs.get("cache") is not None and kwargs.get("past_key_values") is None:
            kwargs = dict(kwargs)
            kwargs["past_key_values"] = kwargs["cache"]
            return args, kwargs
        return None

    try:
        if on:
            for l in range(layer, model.cfg.n_layers):
                attn = getattr(model.blocks[l], "attn", None)
                if attn is not None:
                    handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def record_keys_values(model, layer: int) -> Iterator[_RecordingCache]:
    """Record the keys and values every attention from block ``layer`` on computes in the forward
    run inside the block (what :func:`record_prefix` replays a forward for); turn the recording into
    a :class:`Prefix` with :func:`prefix_from`."""
    rec = _RecordingCache()
    handles = []

    def pre(module, args, kwargs):
        if kwargs.get("past_key_values") is None:  # (TL's bridges read it before ``layer_past``)
            return args, {**kwargs, "past_key_values": rec}
        return None

    try:
        for l in range(layer, model.cfg.n_layers):
            attn = getattr(model.blocks[l], "attn", None)
            if attn is not None:
                handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        yield rec
    finally:
        for h in handles:
            h.remove()


def prefix_from(model, rec: _RecordingCache, layer: int, n_pos: int, rows=slice(None)) -> Prefix:
    """The :class:`Prefix` of batch rows ``rows`` from a recording of every block from ``layer`` on
    (raises :class:`PrefixUnsupported` when a block's attention did not use the cache as expected)."""
    missing = [l for l in range(layer, model.cfg.n_layers) if l not in rec.kv]
    if missing:
        raise PrefixUnsupported(f"the attention of block(s) {missing[:3]} does not take a key/value cache")
    if any(c != 1 for c in rec.calls.values()):
        raise PrefixUnsupported("a block's attention wrote to the key/value cache more than once")
    if any(k.shape[-2] != n_pos for k, _ in rec.kv.values()):
        raise PrefixUnsupported("the cached keys are not [batch, head, pos, d_head]")
    kv = {l: (k[rows], v[rows]) for l, (k, v) in rec.kv.items()}
    return Prefix(kv, int(next(iter(kv.values()))[0].shape[0]))


def record_prefix(model, start: BlockInputs) -> Prefix:
    """The keys and values every block from ``start.layer`` on computes when the recorded forward
    is replayed (one extra forward from that layer). Raises :class:`PrefixUnsupported` when a
    block's attention does not take a key/value cache."""
    from mechlib.arch import block_device

    rec = _RecordingCache()
    x = start.resid
    with torch.no_grad(), _cache_reaches_attention(model, start.layer, True):
        for l in range(start.layer, model.cfg.n_layers):
            dev = block_device(model, l)
            kwargs = _to_device(start.expanded_kwargs(1, l), dev)
            for k, v in kwargs.items():
                if k not in _SLICED and isinstance(v, Tensor) and v.ndim >= 1 and x.shape[1] in v.shape[1:]:
                    raise PrefixUnsupported(f"the blocks get a positional input {k!r} mechlib does not know how to cut")
            out = model.blocks[l](x.to(dev), use_cache=False, cache=rec, **kwargs)
            x = out[0] if isinstance(out, tuple) else out
    missing = [l for l in range(start.layer, model.cfg.n_layers) if l not in rec.kv]
    if missing:
        raise PrefixUnsupported(f"the attention of block(s) {missing[:3]} does not take a key/value cache")
    if any(c != 1 for c in rec.calls.values()):
        raise PrefixUnsupported("a block's attention wrote to the key/value cache more than once")
    T = x.shape[1]
    if any(k.shape[-2] != T for k, _ in rec.kv.values()):
        raise PrefixUnsupported("the cached keys are not [batch, head, pos, d_head]")
    return Prefix(rec.kv, int(x.shape[0]))


_PREFIX_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def prefix_check(model, start: BlockInputs, prefix: Prefix, read_pos: Tensor, reference: Tensor,
                 atol: float = 1e-4) -> Optional[str]:
    """``None`` when replaying from ``start`` with only the positions from ``min(read_pos)//2`` on
    recomputed reproduces ``reference`` (``[batch, vocab]`` logits at ``read_pos``), else why not.
    A success is remembered per model (it is a property of the architecture)."""
    if _PREFIX_OK.get(model):
        return None
    if int(read_pos.min()) < 1:
        return "a one-token prompt leaves no earlier position to check the reuse on"
    p = max(1, int(read_pos.min()) // 2)
    try:
        logits = run_from(model, start, start.layer, read_pos=read_pos, prefix=prefix, from_pos=p)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot reuse the prefix"
        return f"recomputing only positions >= {p} raised {type(e).__name__}: {e}"
    err = float((logits - reference.to(logits.device)).abs().max())
    tol = atol + 1e-4 * float(reference.abs().max())
    if not err <= tol:
        return f"recomputing only positions >= {p} changes the logits by up to {err:.3g} (> {tol:.2g})"
    _PREFIX_OK[model] = True
    return None


def prefix_verified(model) -> bool:
    """Whether :func:`prefix_check` already verified causal prefix reuse on ``model``."""
    return bool(_PREFIX_OK.get(model))


def _to_device(v, dev):
    if isinstance(v, Tensor):
        return v if v.device == dev else v.to(dev)
    if isinstance(v, tuple):
        return tuple(_to_device(x, dev) for x in v)
    if isinstance(v, dict):
        return {k: _to_device(x, dev) for k, x in v.items()}
    return v


_RESUME_OK: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def resume_check(model, start: BlockInputs, layer: int, reference_logits: Tensor,
                 atol: float = 1e-4) -> Optional[str]:
    """``None`` when resuming at ``layer`` reproduces ``reference_logits`` (the full forward's),
    else why not (for the warning and the result's metadata).

    A success is remembered per model and layer (it is a property of the architecture), so
    repeated sweeps on one model pay for the check once.
    """
    if layer in _RESUME_OK.get(model, ()):
        return None
    try:
        logits = run_from(model, start, layer)
    except Exception as e:  # noqa: BLE001 - any failure means "cannot resume"
        return f"replaying the blocks from layer {layer} raised {type(e).__name__}: {e}"
    if logits.shape != reference_logits.shape:
        return f"resumed logits have shape {tuple(logits.shape)}, the model's {tuple(reference_logits.shape)}"
    err = float((logits - reference_logits.to(logits.device)).abs().max())
    tol = atol + 1e-4 * float(reference_logits.abs().max())
    if not err <= tol:
        return (f"resuming at layer {layer} changes the logits by up to {err:.3g} (> {tol:.2g}): this "
                "architecture computes something outside its blocks, final norm and unembedding")
    _RESUME_OK.setdefault(model, set()).add(layer)
    return None


def resume_verified(model, layer: int) -> bool:
    """Whether :func:`resume_check` already verified resuming ``model`` at ``layer``."""
    return layer in _RESUME_OK.get(model, ())


def resume_matches(model, start: BlockInputs, layer: int, reference_logits: Tensor, atol: float = 1e-4) -> bool:
    """True when resuming at ``layer`` reproduces ``reference_logits`` (see :func:`resume_check`)."""
    return resume_check(model, start, layer, reference_logits, atol) is None
