"""Seeded generators for the standard contrast tasks (templates and word lists in ``data/``)."""

from __future__ import annotations

import functools
import random
from dataclasses import replace
from typing import Literal, Optional, Sequence, Union

import torch

from mechlib.tasks.contrast import ContrastSet, ContrastSetError, _text_token_ids
from mechlib.tasks.data import load_data


def _single_token_words(model, words: Sequence[str], *, what: str, need: int) -> list[str]:
    """Words that are one token with a leading space (" Mary") for this tokenizer."""
    ok = [w for w in words if len(_text_token_ids(model.tokenizer, " " + w)) == 1]
    if len(ok) < need:
        raise ContrastSetError(
            f"only {len(ok)} of the {len(words)} {what} in data/ are single tokens for this "
            f"tokenizer ({ok}); need at least {need}: add single-token {what} to the data file"
        )
    return ok


def ioi(
    model,
    n: int = 32,
    *,
    seed: int = 0,
    corruption: Literal["s2_swap", "abc"] = "s2_swap",
    order: Literal["mixed", "ABBA", "BABA"] = "mixed",
    templates: Optional[Sequence[int]] = None,
    prepend_bos: Union[bool, str] = True,
) -> ContrastSet:
    """Indirect Object Identification prompts (Wang et al. 2022).

    Clean: "When Mary and John went to the store, John gave a drink to" → answer " Mary" (the
    indirect object, IO), wrong answer " John" (the subject, S). ABBA puts IO first in the first
    clause, BABA puts S first; ``order="mixed"`` alternates them.

    Corruptions (same token length as clean, seeded):
        ``"s2_swap"``: the second mention of S becomes IO ("..., Mary gave a drink to"), which
            flips the correct answer: the logit difference IO − S turns negative.
        ``"abc"``: the three name slots get three fresh names (Wang et al.'s ABC distribution), so
            nothing in the corrupted prompt says which of IO/S is the answer.

    Names, places and objects are restricted to single tokens for this tokenizer, so prompts from
    one template all have the same length (``templates=[i]`` gives a position-aligned set).
    Labels are ``"ABBA"``/``"BABA"`` per prompt. ``prepend_bos=False`` tokenizes without BOS, as
    Merullo et al.'s GPT-2 scripts do; ``"hf"`` as the model's own tokenizer does by default.
    """
    if prepend_bos == "hf":
        prepend_bos = hf_adds_bos(model)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if corruption not in ("s2_swap", "abc"):
        raise ValueError(f"corruption={corruption!r}: choose 's2_swap' or 'abc'")
    if order not in ("mixed", "ABBA", "BABA"):
        raise ValueError(f"order={order!r}: choose 'mixed', 'ABBA' or 'BABA'")
    data = load_data("ioi")
    rng = random.Random(seed)
    names = _single_token_words(model, data["names"], what="names", need=5)
    # single-token places and objects too, so every prompt of one template has one token length
    # (position-resolved patching then compares like with like, as in Wang et al.'s dataset)
    places = _single_token_words(model, data["places"], what="places", need=2)
    objects = _single_token_words(model, data["objects"], what="objects", need=2)
    all_templates = data["templates"]
    idx = list(templates) if templates is not None else list(range(len(all_templates)))
    bad = [i for i in idx if not 0 <= i < len(all_templates)]
    if bad:
        raise ValueError(f"templates {bad} out of range: data/ioi.json has {len(all_templates)}")
    clean, corrupted, answers, wrong, labels = [], [], [], [], []
    for i in range(n):
        t = all_templates[idx[i % len(idx)]]
        io, s, c1, c2, c3 = rng.sample(names, 5)
        form = order if order != "mixed" else ("ABBA" if i % 2 == 0 else "BABA")
        n1, n2 = (io, s) if form == "ABBA" else (s, io)
        fill = dict(PLACE=rng.choice(places), OBJECT=rng.choice(objects))
        clean.append(t.format(N1=n1, N2=n2, S2=s, **fill))
        if corruption == "s2_swap":
            corrupted.append(t.format(N1=n1, N2=n2, S2=io, **fill))
        else:
            corrupted.append(t.format(N1=c1, N2=c2, S2=c3, **fill))
        answers.append(" " + io)
        wrong.append(" " + s)
        labels.append(form)
    return ContrastSet.from_prompts(model, clean, corrupted, answers, wrong, labels=labels,
                                    task=f"ioi/{corruption}", prepend_bos=prepend_bos)


def colored_objects(model, n: int = 32, *, seed: int = 0, n_shots: int = 1, format: str = "paper") -> ContrastSet:
    """Colored Objects (BIG-bench "reasoning about colored objects", one-token colour answers).

    ``format="paper"`` (default) follows Merullo et al.'s generator (jmerullo/circuit_reuse
    ``cobjs_data.py``): "Q: On the table, I see an orange textbook, a red puzzle, and a purple cup.
    What color is the textbook?\nA: Orange\nQ: On the desk, there is a blue pencil, ... What
    color is the pencil?\nA:" → " Blue" — 8 colours, 17 objects, 3 surfaces, 3 subject starts,
    a/an by the colour, Title-case answers, shots separated by one newline, the example sharing no
    colour or object with the question, and BOS only where the model's own tokenizer adds it (their
    GPT-2 scripts use ``prepend_bos=False``, GPT-2's default; Gemma's tokenizer adds BOS and the model
    needs it).
    ``format="simple"`` is mechlib's earlier variant (lower-case answers, "there is" only, blank
    lines between shots, 12 colours, BOS first).

    The corrupted prompt asks about another object of the same scene (their "mindiff" pairs), so the
    wrong answer is that object's colour. ``options`` are the scene's three colours, for the
    paper-style accuracy among them (``metrics.accuracy(cs, among="options")``: chance 1/3, the
    paper's "35% chance" level).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if format not in ("paper", "simple"):
        raise ValueError(f"format={format!r}: choose 'paper' (Merullo et al.'s generator) or 'simple'")
    rng = random.Random(seed)
    if format == "simple":
        return _colored_objects_simple(model, n, rng, n_shots)
    data = load_data("colored_objects")["paper"]
    colors = [c for c in data["colors"] if _is_one_token(model, " " + c.title())]
    objects = [o for o in data["objects"] if _is_one_token(model, " " + o)]
    if len(colors) < 6 or len(objects) < 6:
        raise ValueError(f"this tokenizer has only {len(colors)} one-token Title-case colours and {len(objects)} "
                         "one-token objects; 6 of each are needed (a question and an example sharing none)")

    def items(cols, objs):
        parts = [f"a{'n' if c[0] in 'aeiou' else ''} {c} {o}" for c, o in zip(cols, objs)]
        return ", ".join(parts[:-1]) + ", and " + parts[-1]

    def question(cols, objs, q, surf, ss):
        return data["template"].format(surf=surf, ss=ss, items=items(cols, objs), q_object=objs[q])

    clean, corrupted, answers, wrong, options, where = [], [], [], [], [], []
    for _ in range(n):
        # the question's scene first; every solved example shares no colour or object with it
        cols, objs = rng.sample(colors, 3), rng.sample(objects, 3)
        surf, ss = rng.choice(data["surfaces"]), rng.choice(data["subject_starts"])
        q = rng.randrange(3)
        d = rng.choice([i for i in range(3) if i != q])
        free_c = [c for c in colors if c not in cols]
        free_o = [o for o in objects if o not in objs]
        text = ""
        for _ in range(n_shots):
            s_cols, s_objs = rng.sample(free_c, 3), rng.sample(free_o, 3)
            sq = rng.randrange(3)
            text += question(s_cols, s_objs, sq, rng.choice(data["surfaces"]), rng.choice(data["subject_starts"]))
            text += " " + s_cols[sq].title() + "\n"
        clean.append(text + question(cols, objs, q, surf, ss))
        corrupted.append(text + question(cols, objs, d, surf, ss))
        answers.append(" " + cols[q].title())
        wrong.append(" " + cols[d].title())
        options.append([" " + c.title() for c in cols])
        where.append(_word_positions(model, clean[-1], [f" {c} {o}" for c, o in zip(cols, objs)], start=len(text)))
    bos = hf_adds_bos(model)
    if bos:
        where = [[p + 1 for p in row] for row in where]
    return ContrastSet.from_prompts(model, clean, corrupted, answers, wrong, task="colored_objects",
                                    options=options, option_pos=where, prepend_bos=bos)


def _word_positions(model, text: str, phrases: Sequence[str], *, start: int = 0, prepend_bos: bool = False) -> list[int]:
    """Token position of the first word of each phrase (searched in order from character ``start``)."""
    enc = model.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets, out, at = enc["offset_mapping"], [], start
    for ph in phrases:
        c = text.index(ph, at) + (len(ph) - len(ph.lstrip()))
        tok = next(i for i, (a, b) in enumerate(offsets) if a <= c < b or (a >= c and b > a))
        out.append(tok + int(prepend_bos))
        at = c + 1
    return out


def _is_one_token(model, text: str) -> bool:
    return len(_text_token_ids(model.tokenizer, text)) == 1


def _colored_objects_simple(model, n: int, rng: random.Random, n_shots: int) -> ContrastSet:
    data = load_data("colored_objects")
    colors = _single_token_words(model, data["colors"], what="colors", need=3)
    objects = _single_token_words(model, data["objects"], what="objects", need=3)
    template = data["template"]

    def scene():
        objs = rng.sample(objects, 3)
        cols = rng.sample(colors, 3)
        return objs, cols, dict(SURFACE=rng.choice(data["surfaces"]),
                                **{f"O{k+1}": objs[k] for k in range(3)},
                                **{f"C{k+1}": cols[k] for k in range(3)})

    clean, corrupted, answers, wrong, options = [], [], [], [], []
    for _ in range(n):
        shots = []
        for _ in range(n_shots):
            objs, cols, fill = scene()
            q = rng.randrange(3)
            shots.append(template.format(OQ=objs[q], **fill) + " " + cols[q])
        prefix = "\n\n".join(shots) + ("\n\n" if shots else "")
        objs, cols, fill = scene()
        q, d = rng.sample(range(3), 2)
        clean.append(prefix + template.format(OQ=objs[q], **fill))
        corrupted.append(prefix + template.format(OQ=objs[d], **fill))
        answers.append(" " + cols[q])
        wrong.append(" " + cols[d])
        options.append([" " + c for c in cols])
    return ContrastSet.from_prompts(model, clean, corrupted, answers, wrong, task="colored_objects/simple",
                                    options=options)


def factual_recall(model, n: Optional[int] = None, *, seed: int = 0) -> ContrastSet:
    """"The capital of France is" → " Paris" (wrong: the corrupted subject's capital).

    Only facts whose answer is a single token are used. Each clean subject is paired with another
    subject of the same token length; the corrupted prompt asks about that subject, so its capital
    is the contrasting answer. ``n=None`` uses every usable fact.
    """
    data = load_data("capitals")
    rng = random.Random(seed)
    template = data["template"]
    facts = [(s, c) for s, c in data["facts"]
             if len(_text_token_ids(model.tokenizer, " " + c)) == 1]
    by_len: dict[int, list[tuple[str, str]]] = {}
    for s, c in facts:
        by_len.setdefault(len(model.to_tokens(template.format(subject=s))[0]), []).append((s, c))
    pairs = []
    for group in by_len.values():
        if len(group) < 2:
            continue
        other = group[1:] + group[:1]  # a derangement within the group
        pairs += list(zip(group, other))
    if not pairs:
        raise ContrastSetError("no two capital facts share a token length for this tokenizer")
    rng.shuffle(pairs)
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        pairs = [pairs[i % len(pairs)] for i in range(n)]
    clean = [template.format(subject=a[0]) for a, _ in pairs]
    corrupted = [template.format(subject=b[0]) for _, b in pairs]
    return ContrastSet.from_prompts(model, clean, corrupted, [" " + a[1] for a, _ in pairs],
                                    [" " + b[1] for _, b in pairs], labels=[a[0] for a, _ in pairs],
                                    task="factual_recall")


def sentiment(model, n: Optional[int] = None, *, seed: int = 0, n_shots: int = 2) -> ContrastSet:
    """Few-shot binary sentiment classification (reviews in ``data/sentiment.json``).

    Answer: the label token (" positive"/" negative"); wrong answer: the other label. This is a
    classification set, not a contrast: ``corrupted`` repeats ``clean`` (use it for accuracy under
    interventions, not for patching). ``n=None`` uses every item; labels are the gold labels.
    """
    data = load_data("sentiment")
    rng = random.Random(seed)
    items = list(data["items"])
    rng.shuffle(items)
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        items = items[:n]
    shots = data["shots"][:n_shots]
    prefix = "".join(data["template"].format(text=t) + data["labels"][l] + "\n\n" for t, l in shots)
    prompts = [prefix + data["template"].format(text=t) for t, _ in items]
    other = {"positive": "negative", "negative": "positive"}
    answers = [data["labels"][l] for _, l in items]
    wrong = [data["labels"][other[l]] for _, l in items]
    return ContrastSet.from_prompts(model, prompts, prompts, answers, wrong,
                                    labels=[l for _, l in items], task="sentiment")


def context_qa(model, n: Optional[int] = None, *, seed: int = 0) -> ContrastSet:
    """Counterfactual context QA: the context states a capital that contradicts the model's prior.

    Clean: "France's capital is Tokyo.\nQuestion: What is the capital of France?\nAnswer:" → " Tokyo"
    (context-faithful); wrong answer: " Paris" (the prior). Corrupted: the same prompt with the true
    capital in the context. ``spans`` hold each prompt's context-sentence tokens (what
    :func:`mechlib.head_divergence` removes). Faithfulness = logit(context answer) > logit(prior).
    """
    data = load_data("context_qa")
    facts = [(s, c) for s, c in load_data(data["facts_from"])["facts"]
             if len(_text_token_ids(model.tokenizer, " " + c)) == 1]
    if len(facts) < 2:
        raise ContrastSetError("fewer than two capital facts have one-token answers for this tokenizer")
    rng = random.Random(seed)
    order = list(range(len(facts)))
    rng.shuffle(order)
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        order = [order[i % len(order)] for i in range(n)]
    clean, corrupted, answers, wrong, spans, labels = [], [], [], [], [], []
    for k, i in enumerate(order):
        subject, true = facts[i]
        fake = facts[(i + 1 + rng.randrange(len(facts) - 1)) % len(facts)][1]
        ctx = data["context"].format(subject=subject, capital=fake)
        q = data["question"].format(subject=subject)
        clean.append(ctx + q)
        corrupted.append(data["context"].format(subject=subject, capital=true) + q)
        answers.append(" " + fake)
        wrong.append(" " + true)
        labels.append(subject)
        n_ctx = model.to_tokens(ctx).shape[1]
        full = model.to_tokens(ctx + q)[0]
        if not torch.equal(full[:n_ctx], model.to_tokens(ctx)[0]):
            raise ContrastSetError(f"the context of prompt {k} does not tokenize as a prefix: {ctx!r}")
        spans.append((1, n_ctx))
    cs = ContrastSet.from_prompts(model, clean, corrupted, answers, wrong, labels=labels, task="context_qa")
    return replace(cs, spans=tuple(spans))


def colored_shapes(n: int = 8, *, size: int = 336, seed: int = 0):
    """Synthetic images for vision-language probes: one filled square of a named colour (from
    ``data/shapes.json``) at a random place and size on a light background.

    Returns ``(images, colors)``: ``[n, size, size, 3]`` uint8 arrays and the colour names; colours
    cycle through the list so every colour appears before any repeats.
    """
    import numpy as np

    data = load_data("shapes")
    names = list(data["colors"])
    if n < 1 or size < 8:
        raise ContrastSetError(f"colored_shapes needs n >= 1 and size >= 8 (got n={n}, size={size})")
    rng = np.random.default_rng(seed)
    order = [names[i] for i in rng.permutation(len(names))]
    images, colors = [], []
    for i in range(n):
        color = order[i % len(order)]
        img = np.empty((size, size, 3), dtype=np.uint8)
        img[:] = data["background"]
        side = int(rng.integers(size // 3, size * 2 // 3))
        y, x = (int(v) for v in rng.integers(0, size - side, 2))
        img[y:y + side, x:x + side] = data["colors"][color]
        images.append(img)
        colors.append(color)
    return np.stack(images), colors


def natural_text(model, n: int = 100, *, length: int = 64, bos: str = "hf", seed: int = 0):
    """``n`` natural-text sequences of exactly ``length`` tokens, as Gu et al. measure sinks (100
    sequences, T = 64) and Sun et al. evaluate the massive-activation edits (chunks of text).

    The text is the prose of the Python reference manual shipped with every CPython
    (``pydoc_data.topics``: paragraphs of at least 400 characters, code examples left out, cut into
    consecutive windows of ``length`` tokens) — the
    one sizeable body of natural English on an offline machine. ``bos``: ``"hf"`` tokenizes as the
    model's Hugging Face tokenizer does by default (Gu et al.'s protocol: Gemma and Llama-2 get BOS,
    GPT-2, Pythia and SmolLM2 do not), ``"always"`` prepends BOS (TransformerLens' default),
    ``"never"`` adds none (Sun et al.'s ``add_special_tokens=False`` chunks).

    Returns a :class:`~mechlib.tasks.contrast.PromptBatch` of ``[n, length]`` tokens.
    """
    import pydoc_data.topics as topics
    import re

    import torch

    from mechlib.tasks.contrast import PromptBatch

    if bos not in ("hf", "always", "never"):
        raise ValueError(f"bos={bos!r}: choose 'hf' (the tokenizer's default), 'always' or 'never'")
    paras = []
    for _, text in sorted(topics.topics.items()):
        for p in re.split(r"\n\s*\n", text):
            p = " ".join(p.split())
            if len(p) > 400 and not p.startswith((">>>", "...")) and p.count("(") < 8:
                paras.append(p)
    rng = random.Random(seed)
    rng.shuffle(paras)
    tok = model.tokenizer
    bos_id = tok.bos_token_id
    add_bos = bos == "always" or (bos == "hf" and hf_adds_bos(model))
    rows, texts = [], []
    body = length - 1 if add_bos and bos_id is not None else length
    for p in paras:  # consecutive windows of each paragraph
        ids = tok(p, add_special_tokens=False)["input_ids"]
        for w in range(len(ids) // body):
            chunk = ids[w * body:(w + 1) * body]
            rows.append(torch.tensor(([bos_id] if body < length else []) + chunk))
            texts.append(tok.decode(chunk, skip_special_tokens=True))
            if len(rows) == n:
                break
        if len(rows) == n:
            break
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} passages reach {length} tokens with this tokenizer; ask for fewer or shorter")
    return PromptBatch(torch.stack(rows), torch.full((n,), length), tuple(texts))


def hf_adds_bos(model) -> bool:
    """Whether the model's own Hugging Face tokenizer puts BOS first by default (TransformerLens
    re-creates tokenizers with ``add_bos_token=True``, so ask the saved original)."""
    tok = model.tokenizer
    saved = _saved_adds_bos(getattr(tok, "name_or_path", ""))
    return _adds_bos(tok) if saved is None else saved


def _adds_bos(tok) -> bool:
    ids = tok("a")["input_ids"]
    return bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id


@functools.lru_cache(maxsize=None)
def _saved_adds_bos(src: str) -> Optional[bool]:
    """:func:`hf_adds_bos` of the tokenizer saved at ``src`` (read once per process: Gemma 3's takes
    seconds to load), or ``None`` when there is no local copy."""
    from transformers import AutoTokenizer

    try:
        return _adds_bos(AutoTokenizer.from_pretrained(src, local_files_only=True))
    except Exception:  # noqa: BLE001 - no local copy: the caller falls back on the loaded tokenizer's setting
        return None
