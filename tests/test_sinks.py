import pytest
import torch

import mechlib
from mechlib import hooks, interventions
from mechlib.tasks import ContrastSetError

PROMPTS = ["When Mary and John went to the store , John gave a drink to Mary",
           "The capital of France is Paris . The capital of Italy is Rome"]


def test_planted_massive_activation_is_found(tiny_llama):
    def plant(h, hook):
        h = h.clone()
        h[:, 0, 7] = 500.0
        return h

    with hooks.attach(tiny_llama, [("blocks.0.hook_resid_post", plant)]):
        r = mechlib.massive_activations(tiny_llama, PROMPTS)
    assert r.massive_dims() == [7]
    assert r.first_layer() == 0
    top = r.entries(massive_only=True)
    assert set(top["pos"]) == {0} and set(top["dim"]) == {7} and (top["value"] > 499).all()  # carried on by the residual stream
    strict = mechlib.massive_activations(tiny_llama, PROMPTS, abs_threshold=1e4)
    assert strict.massive_dims() == [] and strict.first_layer() is None
    assert hooks.active_hooks(tiny_llama) == []


def test_planted_sinks_are_found(tiny_llama):
    def plant(A, hook):
        A = A.clone()
        A[:, 1] = 0.0  # head 1: every query attends only to the first token
        A[:, 1, :, 0] = 1.0
        A[:, 2, 4:] *= 0.1  # head 2: from query 4 on, 90% of the attention on token 3
        A[:, 2, 4:, 3] += 0.9
        return A

    with hooks.attach(tiny_llama, [("blocks.1.attn.hook_pattern", plant)]):
        r = mechlib.attention_sinks(tiny_llama, PROMPTS, epsilon=0.5)
    assert torch.allclose(r.values[1, 1], torch.tensor(1.0))
    assert r.alpha[:, 1, 2, 3].min() > 0.5
    hidden = r.hidden_sinks()
    assert ((hidden["pos"] == 3) & (hidden["n_heads"] >= 1)).sum() == 2  # both prompts
    assert 0 < r.sink_rate() <= 1 and r.baselines["sink_rate"] == r.sink_rate()
    assert r.rate_by_layer().values.shape == (2,)


def test_planted_sink_dimension_is_found(tiny_llama):
    """A massive entry in dim 5 of the first token's block input: |h/rms(h)| there approaches
    sqrt(d_model) = 8 on this 64-dim model (τ scaled to it), and only that token is a sink."""
    def plant(x, hook):
        x = x.clone()
        x[:, 0, 5] = 1000.0
        return x

    names = [f"blocks.{l}.hook_resid_pre" for l in range(2)]
    with hooks.attach(tiny_llama, [(n, plant) for n in names]):
        r = mechlib.sink_dimensions(tiny_llama, PROMPTS, layers=[0, 1], tau=6.0)
    assert r.sink_dims == [5]
    assert r.is_sink[:, 0].all() and not r.is_sink[:, 1:].any()
    assert set(r.sink_tokens()["pos"]) == {0}


def test_probe_input_errors(tiny_llama):
    with pytest.raises(ContrastSetError, match="empty"):
        mechlib.attention_sinks(tiny_llama, [])
    with pytest.raises(ContrastSetError, match=r"prompts\[1\] is empty"):
        mechlib.massive_activations(tiny_llama, ["Mary", " "])
    with pytest.raises(ValueError, match="epsilon"):
        mechlib.attention_sinks(tiny_llama, PROMPTS, epsilon=1.5)
    with pytest.raises(mechlib.sites.SiteError, match="layers 0..1"):
        mechlib.massive_activations(tiny_llama, PROMPTS, layers=[5])


def _pattern(model, tokens, layer):
    with hooks.capture(model, [f"blocks.{layer}.attn.hook_pattern"]) as seen:
        logits = model(tokens)
    return logits, seen[f"blocks.{layer}.attn.hook_pattern"]


def test_redistribute_attention_moves_the_share_p(tiny_llama):
    tokens = tiny_llama.to_tokens(PROMPTS[0])
    base_logits, base = _pattern(tiny_llama, tokens, 1)
    with mechlib.redistribute_attention(tiny_llama, [(1, 2)], span=(3, 9), sink_positions=[0], p=0.6):
        logits, edited = _pattern(tiny_llama, tokens, 1)
    q = slice(9, None)  # queries that see the whole span
    assert torch.allclose(edited[0, 2, q, 0], base[0, 2, q, 0] * 0.4, atol=1e-6)
    assert torch.allclose(edited.sum(-1), torch.ones_like(edited.sum(-1)), atol=1e-5)
    gained = (edited[0, 2, q, 3:9] - base[0, 2, q, 3:9]).sum(-1)
    assert torch.allclose(gained, base[0, 2, q, 0] * 0.6, atol=1e-5)
    assert torch.equal(edited[0, [0, 1, 3]], base[0, [0, 1, 3]])  # other heads untouched
    assert not torch.allclose(logits, base_logits)
    assert torch.allclose(tiny_llama(tokens), base_logits)  # restored on exit
    assert hooks.active_hooks(tiny_llama) == []


def test_calibrate_attention_scales_non_initial_sinks(tiny_llama):
    tokens = tiny_llama.to_tokens(PROMPTS[1])
    _, base = _pattern(tiny_llama, tokens, 0)
    with mechlib.calibrate_attention(tiny_llama, [(0, 0), (0, 3)], beta=0.25, sink_positions=[4]):
        _, edited = _pattern(tiny_llama, tokens, 0)
    for h in (0, 3):
        assert torch.allclose(edited[0, h, 5:, 4], base[0, h, 5:, 4] * 0.25, atol=1e-6)
    assert torch.allclose(edited.sum(-1), torch.ones_like(edited.sum(-1)), atol=1e-5)
    assert torch.equal(edited[0, 1], base[0, 1])
    # adaptive mode finds sinks itself and still keeps rows normalised
    with mechlib.calibrate_attention(tiny_llama, [(0, h) for h in range(4)], epsilon=0.05) as fired:
        _, adaptive = _pattern(tiny_llama, tokens, 0)
    assert fired["blocks.0.attn.hook_pattern"] == 1
    assert torch.allclose(adaptive.sum(-1), torch.ones_like(adaptive.sum(-1)), atol=1e-5)


def test_ablate_massive_writes_zero_or_mean(tiny_llama):
    tokens = tiny_llama.to_tokens(PROMPTS[0])
    name = "blocks.0.hook_resid_post"
    with mechlib.ablate_massive(tiny_llama, [3, 9], positions=[0], layer=0):
        with hooks.capture(tiny_llama, [name]) as seen:
            tiny_llama(tokens)
    assert (seen[name][0, 0, [3, 9]] == 0).all() and (seen[name][0, 1, [3, 9]] != 0).all()
    with mechlib.ablate_massive(tiny_llama, [3], layers=[0, 1], mode="mean", values=torch.tensor([2.5]), positions=None):
        with hooks.capture(tiny_llama, [name]) as seen:
            tiny_llama(tokens)
    assert (seen[name][0, :, 3] == 2.5).all()
    with pytest.raises(ValueError, match="needs values"):
        with mechlib.ablate_massive(tiny_llama, [3], layer=0, mode="mean"):
            pass
    with pytest.raises(ValueError, match="within 0..63"):
        with mechlib.ablate_massive(tiny_llama, [64], layer=0):
            pass
    with pytest.raises(ValueError, match="first_layer"):
        with mechlib.ablate_massive(tiny_llama, [3]):
            pass


def test_ablate_massive_paper_default_touches_one_layer_at_two_positions():
    """Sun et al.'s edit: the emergence layer only, at token 0 and at the input's largest-activation
    position (planted at 4 here), with a different mean per position; earlier layers untouched."""
    m = mechlib.tiny_model("llama", seed=1, n_layers=3)
    tokens = m.to_tokens(PROMPTS[0])
    names = [f"blocks.{l}.hook_resid_post" for l in range(3)]

    def plant(h, hook):
        h = h.clone()
        h[:, 4, 5] = 500.0
        return h

    with hooks.attach(m, [(names[1], plant)]):
        with hooks.capture(m, names) as base:
            m(tokens)
        base = {k: v.clone() for k, v in base.items()}
        means = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # first token, delimiter
        with mechlib.ablate_massive(m, [5, 9], layer=1, mode="mean", values=means):
            with hooks.capture(m, names) as seen:
                m(tokens)
    assert torch.equal(seen[names[0]], base[names[0]])  # before the edited layer: untouched
    changed = (seen[names[1]] != base[names[1]])[0]  # [pos, d]
    assert set(changed.nonzero()[:, 0].tolist()) <= {0, 4} and set(changed.nonzero()[:, 1].tolist()) <= {5, 9}
    assert seen[names[1]][0, 0, [5, 9]].tolist() == [1.0, 2.0] and seen[names[1]][0, 4, [5, 9]].tolist() == [3.0, 4.0]
    assert not torch.allclose(seen[names[2]], base[names[2]])  # later layers run on the edited stream
    assert mechlib.interventions.massive_positions(base[names[1]], [5, 9]).tolist() == [[0, 4]]


def test_massive_means_per_position(tiny_llama):
    means = mechlib.massive_means(tiny_llama, PROMPTS, [3, 7], layer=1)
    _, acts = hooks.run_with_cache(tiny_llama, tiny_llama.to_tokens(PROMPTS[0]), ["blocks.1.hook_resid_post"])
    assert means.shape == (2, 2) and torch.isfinite(means).all()
    single = mechlib.massive_means(tiny_llama, PROMPTS[:1], [3, 7], layer=1)
    torch.testing.assert_close(single[0], acts["blocks.1.hook_resid_post"][0, 0, [3, 7]])


def test_intervention_errors(tiny_llama, monkeypatch):
    tokens = tiny_llama.to_tokens(PROMPTS[0])
    with pytest.raises(IndexError, match="exceed"):
        with mechlib.redistribute_attention(tiny_llama, [(1, 0)], span=(3, 99), sink_positions=[0]):
            tiny_llama(tokens)
    assert hooks.active_hooks(tiny_llama) == []
    with pytest.raises(mechlib.sites.SiteError, match="head=9"):
        with mechlib.calibrate_attention(tiny_llama, [(0, 9)]):
            pass
    with pytest.raises(ValueError, match="span"):
        with mechlib.redistribute_attention(tiny_llama, [(1, 0)], span=(5, 2), sink_positions=[0]):
            pass
    monkeypatch.setattr(mechlib.arch, "_pattern_editable", lambda attn: False)  # an HF-delegating bridge
    with pytest.raises(interventions.UnsupportedBridgeError, match="silently discarded"):
        with mechlib.calibrate_attention(tiny_llama, [(0, 0)]):
            pass


def test_smollm2_has_sinks_and_a_massive_dimension(model):
    prompts = ["The quick brown fox jumps over the lazy dog. It was a sunny day.",
               "Summer is warm. Winter is cold.\nSpring is mild, and autumn is cool."]
    s = mechlib.attention_sinks(model, prompts)
    assert s.sink_rate() > 0.5
    assert float(s.value_norm_ratio.mean()) < 1.0  # the sink's values are small: a key bias
    m = mechlib.massive_activations(model, prompts)
    assert m.massive_dims()[:1] == [507]
    assert set(m.entries(massive_only=True)["pos"]) == {0}
    d = mechlib.sink_dimensions(model, prompts)
    assert 507 in d.sink_dims
    assert d.is_sink[:, 0].all()


def test_act_head_search_equals_calibrating_each_head_alone(model):
    calib = mechlib.tasks.sentiment(model, n=8, n_shots=0, seed=0)
    s = mechlib.act_head_search(model, calib, layers=[10, 11], progress=False)
    acc, ld = mechlib.metrics.accuracy(calib), mechlib.metrics.logit_diff(calib)
    base = hooks.forward(model, calib.clean_tokens)
    assert s.baselines["accuracy"] == pytest.approx(float(acc(base).mean()))
    for l in (10, 11):
        for h in range(model.cfg.n_heads):
            with mechlib.calibrate_attention(model, [(l, h)], lengths=calib.lengths):
                out = hooks.forward(model, calib.clean_tokens)
            assert float(s.values[l, h]) == pytest.approx(float(acc(out).mean() - acc(base).mean()), abs=1e-6)
            assert float(s.margin_gain[l, h]) == pytest.approx(float(ld(out).mean() - ld(base).mean()), abs=1e-4)
    assert s.values[:10].isnan().all() and not s.values[10:12].isnan().any()
    gains = [float(s.values[h]) for h in s.selected]
    assert all(g > 0 for g in gains) and gains == sorted(gains, reverse=True)
    assert set(s.selected) == {(l, h) for l in (10, 11) for h in range(model.cfg.n_heads) if s.values[l, h] > 0}
    assert hooks.active_hooks(model) == []
    split = mechlib.act_head_search(model, calib, layers=[10, 11], progress=False, batch_size=3)
    torch.testing.assert_close(split.values, s.values, equal_nan=True)
    torch.testing.assert_close(split.margin_gain, s.margin_gain, equal_nan=True, atol=1e-4, rtol=1e-4)
    # no key reaches epsilon: every calibration is the identity, so nothing runs and nothing changes
    none = mechlib.act_head_search(model, calib, layers=[10], epsilon=1.0, progress=False)
    assert none.metadata["skipped"] == model.cfg.n_heads and (none.values[10] == 0).all()
    assert (none.margin_gain[10] == 0).all() and none.selected == []


def test_calibrate_attention_ignores_padding_queries(tiny_llama):
    """With lengths, a right-padded prompt is calibrated exactly as when run alone."""
    short = torch.randint(5, 60, (1, 7), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1)
    heads = [(0, h) for h in range(4)] + [(1, h) for h in range(4)]
    with mechlib.calibrate_attention(tiny_llama, heads, epsilon=0.05):
        alone = tiny_llama(short)[0, -1]
    with mechlib.calibrate_attention(tiny_llama, heads, epsilon=0.05, lengths=torch.tensor([7])):
        pad = tiny_llama(padded)[0, 6]
    torch.testing.assert_close(pad, alone, atol=1e-5, rtol=1e-4)


def test_act_sink_rule_paper_and_code_variants():
    """α_k = mean of A[t, k] over t >= k (t = k included, written out as loops here); ACT flags
    α_k > 0.1 absolutely, so late keys (few queries, their own row included) can be flagged; the
    paper excludes the first token, the authors' code drops the first *flagged* key instead."""
    T = 12
    logits = torch.randn(T, T, generator=torch.Generator().manual_seed(3))
    logits[:, 0] -= 6.0  # the first token gets little attention, so the first flagged key is later
    logits[:, 4] += 3.0  # a hidden sink at key 4
    logits = logits.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    A = logits.softmax(-1)[None, None]
    alpha = [sum(float(A[0, 0, t, k]) for t in range(k, T)) / (T - k) for k in range(T)]
    flagged = [k for k in range(T) if alpha[k] > 0.1]
    assert flagged[0] != 0 and 4 in flagged and flagged[-1] >= T - 2  # the set-up the variants differ on
    paper = mechlib.interventions.act_sinks(A, epsilon=0.1).nonzero()[:, -1].tolist()
    code = mechlib.interventions.act_sinks(A, epsilon=0.1, variant="code").nonzero()[:, -1].tolist()
    guarded = mechlib.interventions.act_sinks(A, epsilon=0.1, min_queries=3).nonzero()[:, -1].tolist()
    assert paper == flagged and code == flagged[1:]
    assert guarded == [k for k in flagged if k < T - 2]  # the last two keys rest on one or two queries
    out = mechlib.interventions.act_calibrate(A, mechlib.interventions.act_sinks(A, epsilon=0.1), 0.4)
    torch.testing.assert_close(out.sum(-1), torch.ones(1, 1, T))
    assert torch.equal(out[0, 0, 0], A[0, 0, 0])  # row 0 keeps its single key
    k = flagged[0]
    torch.testing.assert_close(out[0, 0, T - 1, k], 0.4 * A[0, 0, T - 1, k])  # β = 0.4 on a sink column
