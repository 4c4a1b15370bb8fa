"""mechlib.generate: batched (left padding) = one prompt at a time, cached = full recompute, token for
token, on several families and SmolLM2 — and the same inside every intervention block, each
prompt with its own selection or vector, the edit applied to every new token."""

import warnings

import pytest
import torch

import mechlib
from mechlib import hooks, interventions, layout

PROMPTS = ["When Mary and John went to the store, John gave a drink to",
           "The capital of France is",
           "Mary and John",
           "Then, John and Mary had a long argument. Afterwards Mary said to"]
N_NEW = 6


def _tokens(out):
    return [t.tolist() for t in out.tokens]


def _one_by_one(model, prompts, block=None, **kw):
    """The reference: each prompt alone (its own block, when per-prompt), no padding, no cache."""
    out = []
    for i, p in enumerate(prompts):
        if block is None:
            out.append(mechlib.generate(model, p, details=True, use_cache=False, **kw).tokens[0].tolist())
        else:
            with block([i]):
                out.append(mechlib.generate(model, [p], use_cache=False, **kw).tokens[0].tolist())
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3", "neox", "qwen2", "olmo2"])
def test_batched_cached_equals_one_prompt_at_a_time(family):
    m = mechlib.tiny_model(family, seed=0)
    ref = _one_by_one(m, PROMPTS, max_new_tokens=N_NEW)
    out = mechlib.generate(m, PROMPTS, max_new_tokens=N_NEW)
    assert _tokens(out) == ref
    assert out.metadata["cache"] and out.metadata["batched"] and out.metadata["forwards"] == N_NEW
    assert _tokens(mechlib.generate(m, PROMPTS, max_new_tokens=N_NEW, batch_size=3)) == ref
    assert hooks.active_hooks(m) == []


@pytest.mark.embedded
def test_smollm2_batched_cached_equals_reference(model):
    prompts = PROMPTS + ["Once upon a time", "1, 2, 3, 4,", "The Eiffel Tower is in", "def add(a, b):"]
    out = mechlib.generate(model, prompts, max_new_tokens=8)
    assert _tokens(out) == [mechlib.generate(model, p, max_new_tokens=8, details=True).tokens[0].tolist() for p in prompts]
    assert _tokens(out) == _tokens(mechlib.generate(model, prompts, max_new_tokens=8, use_cache=False))
    assert out[1].startswith(" Paris")
    logits = model(model.to_tokens(prompts[1]))[0, -1]  # the first new token is the model's own argmax
    assert out.tokens[1][0] == int(logits.argmax())


def test_stop_strings_eos_sampling_and_bad_input(tiny_llama):
    m = tiny_llama
    free = mechlib.generate(m, PROMPTS[:2], max_new_tokens=N_NEW)
    word = free[0].split()[1] if len(free[0].split()) > 1 else free[0].split()[0]
    cut = mechlib.generate(m, PROMPTS[:2], max_new_tokens=N_NEW, stop=word)
    assert cut.finish_reasons[0] == "stop" and word not in cut[0] and free[0].startswith(cut[0])
    assert cut.tokens[1].tolist() == free.tokens[1].tolist()  # the other row is unaffected
    eos = int(free.tokens[0][2])  # pretend the third token is end-of-sequence
    m.tokenizer.eos_token_id, old = eos, m.tokenizer.eos_token_id
    try:
        ended = mechlib.generate(m, PROMPTS[:1], max_new_tokens=N_NEW)
    finally:
        m.tokenizer.eos_token_id = old
    assert ended.finish_reasons == ["eos"] and ended.tokens[0].tolist() == free.tokens[0][:3].tolist()
    a = mechlib.generate(m, PROMPTS, max_new_tokens=N_NEW, do_sample=True, temperature=1.5, top_k=20, seed=3)
    b = mechlib.generate(m, PROMPTS, max_new_tokens=N_NEW, do_sample=True, temperature=1.5, top_k=20, seed=3)
    assert list(a) == list(b) and _tokens(a) != _tokens(free)
    for bad in (dict(max_new_tokens=-1), dict(top_p=0), dict(do_sample=True, temperature=0), dict(stop=[""]),
                dict(batch_size=0), dict(sla={"gama": 0.3})):
        with pytest.raises(ValueError):
            mechlib.generate(m, PROMPTS, **bad)
    assert isinstance(mechlib.generate(m, PROMPTS[0], max_new_tokens=2), str)


def test_sla_decoding_is_the_papers_mix_at_every_step(tiny_llama):
    m = tiny_llama
    for variant in ("paper", "code"):
        out = mechlib.generate(m, PROMPTS, max_new_tokens=3, sla=dict(variant=variant, window=2))
        first = mechlib.self_logits_augmentation(m, PROMPTS, variant=variant, window=2).argmax(-1)
        assert [t[0] for t in _tokens(out)] == first.tolist()
        assert _tokens(mechlib.generate(m, PROMPTS, max_new_tokens=3, use_cache=False,
                                        sla=dict(variant=variant, window=2))) == _tokens(out)
    plain = mechlib.generate(m, PROMPTS, max_new_tokens=3)
    strong = mechlib.generate(m, PROMPTS, max_new_tokens=3, sla=dict(gamma=1.0, window=2))
    assert _tokens(strong) != _tokens(plain)


# --- inside every intervention block ----------------------------------------------------------


@pytest.fixture(scope="module")
def qa(tiny_llama):
    return mechlib.tasks.context_qa(tiny_llama, n=4, seed=0)


def _check_block(m, prompts, block, *, n_new=N_NEW, expect_warning=None):
    """Inside ``block(rows)`` (set up for those prompts): batched + cached generation equals the
    one-by-one reference, the edit fired on every forward, and it changed something."""
    ref = _one_by_one(m, prompts, block, max_new_tokens=n_new)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if expect_warning is None else "ignore")
        with block(list(range(len(prompts)))) as fired:
            out = mechlib.generate(m, prompts, max_new_tokens=n_new)
            chunked = mechlib.generate(m, prompts, max_new_tokens=n_new, batch_size=3)
    assert _tokens(out) == ref and _tokens(chunked) == ref
    if isinstance(fired, dict) and fired:
        assert min(fired.values()) >= out.metadata["forwards"], fired
    plain = [mechlib.generate(m, [p], max_new_tokens=n_new).tokens[0].tolist() for p in prompts]
    assert ref != plain, "the intervention changed nothing: the test could not fail"
    assert hooks.active_hooks(m) == []
    return out


def test_generate_inside_vhr_vista_and_static_head_edits(tiny_llama, qa):
    m = tiny_llama
    prompts = list(qa.clean_prompts)
    _check_block(m, prompts, lambda rows: mechlib.vhr(m, qa.subset(rows, trim=False), alpha=8.0))
    vsv = mechlib.steering_vectors(m, qa)
    for variant in ("paper", "code"):
        def block(rows, variant=variant):
            sub = mechlib.steering_vectors(m, qa.subset(rows, trim=False)) if len(rows) < len(qa) else vsv
            return mechlib.vista(m, sub, lam=2.0, variant=variant)
        _check_block(m, prompts, block)
    _check_block(m, prompts, lambda rows: mechlib.scale_heads(m, [(0, 1), (1, 2)], 6.0, positions=[1, 2, 3]))
    _check_block(m, prompts, lambda rows: mechlib.steer_residual(m, {0: torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4},
                                                                positions=[2, 5]))


def test_generate_inside_attention_edits(tiny_llama, qa):
    m = tiny_llama
    prompts = list(qa.clean_prompts)
    heads = [(l, h) for l in range(m.cfg.n_layers) for h in range(m.cfg.n_heads)]
    _check_block(m, prompts, lambda rows: mechlib.calibrate_attention(m, heads, beta=0.0, epsilon=0.05))
    _check_block(m, prompts, lambda rows: mechlib.calibrate_attention(m, heads, beta=0.0, epsilon=0.05, variant="code"))
    _check_block(m, prompts, lambda rows: mechlib.redistribute_attention(m, heads, span=(2, 6), sink_positions=[0, 1], p=0.9))
    _check_block(m, prompts, lambda rows: interventions.ablate_sink_values(m, positions=[0, 1]))
    _check_block(m, prompts, lambda rows: mechlib.ablate_massive(m, list(range(0, 64, 2)), layers=[0, 1], mode="mean",
                                                                values=torch.full((32,), 30.0)))
    keys = torch.zeros(len(qa), qa.clean_tokens.shape[1], dtype=torch.bool)
    keys[:, 3] = True
    _check_block(m, prompts, lambda rows: mechlib.steer_attention(m, heads, keys[rows], query_pos=qa.last_pos[rows]))


def test_generate_inside_var(tiny_llama, qa):
    m = tiny_llama
    prompts = list(qa.clean_prompts)
    records = []

    def block(rows):
        cm = mechlib.var(m, qa.subset(rows, trim=False), dims=[0, 1, 2, 3], tau=1.7, summ=0.05, rho=0.5, p=0.9,
                         layers=[1])
        return _Recording(cm, records)

    _check_block(m, prompts, block)
    assert any(bool(r.any()) for rec in records for r in rec["rows"].values()), "VAR edited no row"


class _Recording:
    """Wraps a context manager and keeps what it yields."""

    def __init__(self, cm, store):
        self.cm, self.store = cm, store

    def __enter__(self):
        out = self.cm.__enter__()
        self.store.append(out)
        return None

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


def test_generate_inside_pine_recomputes_one_prompt_at_a_time(tiny_llama):
    m = tiny_llama
    segs = mechlib.tasks.SegmentedPrompts.from_parts(
        m, ["Answer:", "Pick:"], [[" Mary went home", " John"], [" the store", " a drink to", " Paris"]], [" so", " then"])
    prompts = list(segs.prompts)

    def block(rows):
        return mechlib.position_invariant(m, [segs.segments[r] for r in rows])

    with pytest.warns(UserWarning, match="position_invariant"):
        with block([0, 1]):
            out = mechlib.generate(m, prompts, max_new_tokens=4)
    assert not out.metadata["cache"] and not out.metadata["batched"]
    assert "position_invariant" in out.metadata["cache_reason"]
    _check_block(m, prompts, block, n_new=4, expect_warning=True)


def test_generate_on_a_vlm_with_left_padding(tiny_llava):
    m = tiny_llava
    images, _ = mechlib.tasks.colored_shapes(2, size=24, seed=1)
    prompts = ["<image> What colour?", "<image> What colour is the square in this picture?"]
    t0, ex0 = mechlib.vlm_inputs(m, prompts[:1], images[:1])
    t1, ex1 = mechlib.vlm_inputs(m, prompts[1:], images[1:])
    assert t0.shape[1] != t1.shape[1]
    batch = mechlib.vlm_batch(m, prompts, images)   # right-padded, each length recorded
    out = mechlib.generate(m, batch, max_new_tokens=4)
    ref = [mechlib.generate(m, t, extras=e, max_new_tokens=4, use_cache=False, details=True).tokens[0].tolist()
           for t, e in ((t0, ex0), (t1, ex1))]
    assert _tokens(out) == ref
    with mechlib.vhr(m, batch, span="image", alpha=8.0):
        inside = mechlib.generate(m, batch, max_new_tokens=4)
    single = []
    for t, e in ((t0, ex0), (t1, ex1)):
        with mechlib.vhr(m, t, span="image", extras=e, alpha=8.0):
            single.append(mechlib.generate(m, t, extras=e, max_new_tokens=4, use_cache=False).tokens[0].tolist())
    assert _tokens(inside) == single
    with pytest.raises(mechlib.hooks.MissingModelInputError):
        mechlib.generate(m, t0, max_new_tokens=2)


def test_generate_refuses_prompts_the_block_was_not_set_up_for(tiny_llama, qa):
    m = tiny_llama
    with mechlib.vhr(m, qa) as sel:
        assert sel.per_prompt.shape[0] == len(qa)
        with pytest.raises(layout.LayoutError, match="set up for 4 prompts but generate"):
            mechlib.generate(m, list(qa.clean_prompts)[:3], max_new_tokens=2)
        with pytest.raises(layout.LayoutError, match="tokenize differently"):
            mechlib.generate(m, list(qa.clean_prompts)[::-1], max_new_tokens=2)
    assert hooks.active_hooks(m) == []
