"""Generation under mechlib's interventions: batched (left padding), greedy or sampled, on a
key/value cache, with every active intervention applied to every new token.

The bridge's own cached path (``TransformerBridge.generate(use_past_kv_cache=True)``) is broken
with transformers 5.x: transformers' decoder layers hand the cache to attention as ``cache``
while TransformerLens' attention bridges read ``past_key_values``, so the cache never fills and
every token after the first attends to itself only. mechlib hands the cache over under both names
(:func:`mechlib.hooks._cache_reaches_attention`, the same handover its causal prefix reuse uses)
and drives the bridge's forward with Hugging Face's ``DynamicCache`` (filled in place); the hooks — and so the
interventions — fire on every step's new tokens.

Interventions are set up for prompts and read, through :mod:`mechlib.layout`, which prompt and
which prompt position each row and column of a forward is (left padding, cached steps, chunks of
``batch_size`` prompts). An intervention that cannot run on a cache (PINE re-positions every key
for every query) or on padded batches makes :func:`generate` recompute the whole sequence, or run
one prompt at a time, with a warning and a note in the result's ``metadata``.
"""

from __future__ import annotations

import time
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


class Generations(list):
    """The continuations (strings, one per prompt, the prompt not included), with ``tokens`` (the
    new token ids of each, ``[n]`` tensors), ``finish_reasons`` (``"eos"``, ``"stop"`` — a stop
    string, which the text is cut before — or ``"length"``) and ``metadata`` (whether the key/value
    cache and batching were used and why not, forwards run, new tokens, seconds)."""

    def __init__(self, texts, tokens, finish_reasons, metadata):
        super().__init__(texts)
        self.tokens = tokens
        self.finish_reasons = finish_reasons
        self.metadata = metadata


def _prompt_sequences(model, prompts, *, chat: bool, extras) -> tuple[list[Tensor], dict, bool]:
    """The prompts as unpadded token sequences (tokenized as interventions tokenize them), their
    batch-first extra inputs, and whether a single string was given."""
    from mechlib.tasks.contrast import ContrastSet, PromptBatch

    if isinstance(prompts, (PromptBatch, ContrastSet)) or isinstance(prompts, Tensor):
        if chat:
            raise ValueError("chat=True applies the chat template to strings; these prompts are already tokens")
        batch = PromptBatch.from_prompts(model, prompts, extras=extras)
        return [batch.tokens[i, : int(batch.lengths[i])] for i in range(len(batch))], dict(batch.extras), False
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("prompts must be a string, a non-empty list of strings, a PromptBatch, a ContrastSet "
                         "or a [batch, pos] token tensor")
    seqs = []
    for t in texts:
        if chat:
            text = model.tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                                       add_generation_prompt=True)
            seqs.append(model.to_tokens(text, prepend_bos=False)[0].cpu())
        else:
            seqs.append(model.to_tokens(t)[0].cpu())
    return seqs, dict(extras or {}), single


def _eos_ids(model) -> set[int]:
    ids = set()
    for src in (model.tokenizer, getattr(getattr(model, "original_model", None), "generation_config", None)):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


def _sla_config(model, sla) -> Optional[dict]:
    if sla is None or sla is False:
        return None
    from mechlib.analyses.lens import sla_layers
    from mechlib.sites import check_layer

    cfg = dict(gamma=0.3, window=5, variant="paper", layers=None)
    if sla is not True:
        if not isinstance(sla, dict) or set(sla) - set(cfg):
            raise ValueError(f"sla={sla!r}: True, or a dict with keys {sorted(cfg)}")
        cfg.update(sla)
    if not 0 <= cfg["gamma"] <= 1:
        raise ValueError(f"sla gamma={cfg['gamma']} must be in [0, 1]")
    if cfg["variant"] not in ("paper", "code"):
        raise ValueError(f"sla variant={cfg['variant']!r}: choose 'paper' or 'code'")
    cfg["layers"] = (sla_layers(model, cfg["variant"], cfg["window"]) if cfg["layers"] is None
                     else [check_layer(model, int(l)) for l in cfg["layers"]])
    if not cfg["layers"]:
        raise ValueError("sla layers is empty")
    return cfg


def _choose(logits: Tensor, *, do_sample: bool, temperature: float, top_k, top_p, gen) -> Tensor:
    """Next tokens ``[b]`` from last-position logits ``[b, vocab]``."""
    if not do_sample:
        return logits.argmax(-1)
    x = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(x, min(int(top_k), x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        srt, idx = torch.sort(x, descending=True, dim=-1)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) > top_p  # keep the smallest set reaching top_p (the first always)
        x = x.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, -1)
    return torch.multinomial(probs.cpu() if gen is not None else probs, 1, generator=gen)[:, 0].to(logits.device)


@torch.no_grad()
def generate(
    model,
    prompts,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Union[None, str, Sequence[str]] = None,
    stop_at_eos: bool = True,
    chat: bool = False,
    extras: Optional[dict] = None,
    batch_size: Optional[int] = None,
    use_cache: bool = True,
    sla=None,
    progress: Optional[bool] = None,
    details: bool = False,
) -> Union[str, Generations]:
    """Continue prompts, batched and on a key/value cache, under whatever interventions are active.

    Greedy by default (the papers' CHAIR/POPE setting). Inside an intervention block (``vhr``,
    ``vista``, ``var``, ``calibrate_attention``, ``scale_heads``, ``position_invariant``, ...) every
    forward — the prompt and each new token — is edited, each prompt with its own selection or
    vector: generate from the prompts the block was set up with, in the same order.

    Args:
        prompts: a string, a list of strings, a PromptBatch / ContrastSet (its clean prompts and
            ``extras``) or a ``[batch, pos]`` token tensor.
        max_new_tokens: at most this many new tokens per prompt.
        do_sample, temperature, top_k, top_p, seed: sampling instead of greedy decoding (seeded
            draws; a draw depends on ``batch_size``, greedy decoding does not).
        stop: strings that end a continuation (cut before the first occurrence); ``stop_at_eos``
            ends it at the model's end-of-sequence tokens.
        chat: wrap each prompt in the tokenizer's chat template (instruct models).
        extras: forward inputs of the prompts (``pixel_values``), batch-first.
        batch_size: prompts per forward (default all); the result does not depend on it.
        use_cache: reuse keys and values (default). ``False`` recomputes the whole sequence at every
            step (the slow reference; tokens are the same).
        sla: VISTA's self-logits augmentation as the decoding rule: ``True`` (the paper's γ = 0.3,
            window 5) or ``dict(gamma=, window=, variant="paper"|"code", layers=)`` — each step's
            logits are ``(1 − γ)·final + γ·mean_l H(h^l)`` (see
            :func:`~mechlib.analyses.lens.self_logits_augmentation`).
        progress: a progress bar (default: for long generations).
        details: return a :class:`Generations` even for a single string.

    Returns:
        the continuation (a string) for a single string prompt; otherwise :class:`Generations`, a
        list of strings with ``tokens``, ``finish_reasons`` and ``metadata``.

    Example:
        >>> mechlib.generate(model, "The capital of France is", max_new_tokens=5)   # doctest: +SKIP
        ' Paris.\\n\\n...'
        >>> with mechlib.vhr(model, prompts, span="image", extras=ex):              # doctest: +SKIP
        ...     captions = mechlib.generate(model, prompts, extras=ex, max_new_tokens=512)
    """
    from tqdm.auto import tqdm

    from mechlib import hooks, layout
    from mechlib.tasks.contrast import _pad_id

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"stop={stop!r}: non-empty strings")
    seqs, extras, single = _prompt_sequences(model, prompts, chat=chat, extras=extras)
    P = len(seqs)
    for k, v in extras.items():
        if isinstance(v, Tensor) and v.ndim and v.shape[0] != P:
            raise ValueError(f"extras[{k!r}] has {v.shape[0]} rows for {P} prompts")
    sla_cfg = _sla_config(model, sla)
    no_cache, no_pad = layout.limits(model)
    meta = dict(cache=bool(use_cache), cache_reason=None, batched=True, batch_reason=None, forwards=0)
    if use_cache and no_cache:
        why = "; ".join(f"{e.name}: {e.reason}" for e in no_cache)
        warnings.warn(f"mechlib.generate: recomputing the whole sequence at every step, no key/value cache ({why})",
                      stacklevel=2)
        meta.update(cache=False, cache_reason=why)
    size = P if batch_size is None else int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1 (or None: all prompts in one forward)")
    if no_pad and size > 1 and P > 1:
        why = "; ".join(f"{e.name}: {e.reason}" for e in no_pad)
        warnings.warn(f"mechlib.generate: one prompt per forward, no padding ({why})", stacklevel=2)
        meta.update(batched=False, batch_reason=why)
        size = 1
    cached = meta["cache"]
    eos = _eos_ids(model) if stop_at_eos else set()
    pad_id = _pad_id(model)
    dev = model.cfg.device
    tok = model.tokenizer
    if progress is None:
        progress = P * max_new_tokens >= 512
    bar = tqdm(total=P * max_new_tokens, desc="generate", unit="tok", disable=not progress)
    out_tokens: list[Optional[Tensor]] = [None] * P
    reasons: list[str] = ["length"] * P
    t0 = time.perf_counter()
    sla_store: dict[int, Tensor] = {}

    def keep_last(x, hook, layer):
        sla_store[layer] = x[:, -1]

    sla_hooks = [] if sla_cfg is None else [
        (f"blocks.{l}.hook_resid_post", lambda x, hook, l=l: keep_last(x, hook, l)) for l in sla_cfg["layers"]]
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))

    for start in range(0, P, size):
        idx = list(range(start, min(start + size, P)))
        b = len(idx)
        lens = torch.tensor([len(seqs[i]) for i in idx])
        T = int(lens.max())
        pad = T - lens
        tokens = torch.full((b, T), pad_id, dtype=torch.long)
        for r, i in enumerate(idx):
            tokens[r, int(pad[r]):] = seqs[i]
        mask = (torch.arange(T)[None, :] >= pad[:, None]).long()
        ex = {k: (v[idx] if isinstance(v, Tensor) and v.ndim and v.shape[0] == P else v) for k, v in extras.items()}
        ex = hooks._on_device(model, hooks.check_inputs(model, ex, tokens))
        tokens, mask = tokens.to(dev), mask.to(dev)
        new = torch.zeros(b, 0, dtype=torch.long, device=dev)
        done = torch.zeros(b, dtype=torch.bool)
        n_new = torch.zeros(b, dtype=torch.long)  # tokens a finished row generated, its last one included
        past = None
        with layout.decoding(torch.tensor(idx), pad, lens, n_prompts=P, tokens=seqs, cached=cached) as dec, \
                hooks.attach(model, sla_hooks), hooks._cache_reaches_attention(model, 0, cached):
            for step in range(max_new_tokens):
                dec.step = step
                if cached:
                    from transformers import DynamicCache

                    if step == 0:
                        dec.offset, inp, kw = 0, tokens, ex
                        past = DynamicCache()
                    else:
                        dec.offset, inp, kw = T + step - 1, new[:, -1:], {}
                    logits = model(inp, attention_mask=mask, cache=past, use_cache=True, **kw)
                else:
                    dec.offset = 0
                    logits = model(torch.cat([tokens, new], 1), attention_mask=mask, **ex)
                meta["forwards"] += 1
                nl = logits[:, -1]
                if sla_cfg is not None:
                    from mechlib.analyses.lens import sla_logits

                    h = torch.stack([sla_store.pop(l) for l in sla_cfg["layers"]], 1)  # [b, layers, d]
                    nl = sla_logits(model, nl, h, gamma=sla_cfg["gamma"], variant=sla_cfg["variant"])
                nxt = _choose(nl, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, gen=gen)
                nxt = torch.where(done.to(nxt.device), torch.full_like(nxt, pad_id), nxt)
                new = torch.cat([new, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype, device=dev)], 1)
                bar.update(int((~done).sum()))
                for r in range(b):
                    if done[r]:
                        continue
                    if int(nxt[r]) in eos:
                        done[r], n_new[r], reasons[idx[r]] = True, step + 1, "eos"
                    elif stops and any(s in tok.decode(new[r].tolist(), skip_special_tokens=True) for s in stops):
                        done[r], n_new[r], reasons[idx[r]] = True, step + 1, "stop"
                if bool(done.all()):
                    break
        for r, i in enumerate(idx):
            out_tokens[i] = new[r, : int(n_new[r]) if done[r] else new.shape[1]].cpu()
    bar.close()
    texts = []
    for i in range(P):
        ids = out_tokens[i].tolist()
        if reasons[i] == "eos":
            ids = ids[:-1]
        text = tok.decode(ids, skip_special_tokens=True)
        if reasons[i] == "stop":
            text = text[: min(text.index(s) for s in stops if s in text)]
        texts.append(text)
    meta.update(new_tokens=int(sum(len(t) for t in out_tokens)), seconds=round(time.perf_counter() - t0, 3),
                batch_size=size, sla=sla_cfg, do_sample=do_sample)
    if single and not details:
        return texts[0]
    return Generations(texts, out_tokens, reasons, meta)
