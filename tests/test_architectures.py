"""Every public verb on every architecture family: a matrix of tiny random models (GPT-2, Pythia,
Llama, Qwen2, Qwen3, Gemma 2, Gemma 3, Mistral, Phi-3, OLMo-2 and the LLaVA text tower), each
checked against a reference — TransformerLens' own patching functions, a slow full-forward path
patching, the model's own logits — and for invariants (fast path used, nothing left behind,
same numbers for any batch size)."""

import warnings

import pytest
import torch
from transformer_lens import patching as tlp

import mechlib
from mechlib import arch, hooks, interventions, metrics, tasks
from mechlib.models import FAMILIES

from conftest import assert_weights_equal, weights_snapshot
from reference import slow_path_patching

ROPE = [f for f in FAMILIES if f != "gpt2"]
_MODELS = {}


def tiny(family):
    if family not in _MODELS:
        _MODELS[family] = mechlib.tiny_model(family, seed=0)
    return _MODELS[family]


def ioi(m, n=3, templates=(0,)):
    return tasks.ioi(m, n=n, seed=0, templates=list(templates))


TL = {("resid_pre", False): tlp.get_act_patch_resid_pre, ("head_out", False): tlp.get_act_patch_attn_head_out_all_pos,
      ("head_v", True): tlp.get_act_patch_attn_head_v_by_pos, ("pattern", False): tlp.get_act_patch_attn_head_pattern_all_pos,
      ("mlp_out", False): tlp.get_act_patch_mlp_out}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("site,by_position", list(TL))
def test_activation_patching_equals_transformerlens_on_the_fast_path(family, site, by_position):
    m = tiny(family)
    cs = ioi(m)
    ld = metrics.logit_diff(cs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a silent or announced fallback both fail here
        ours = mechlib.activation_patching(m, cs, ld, site=site, by_position=by_position)
    assert ours.metadata["path"] == "resumed" and ours.metadata["resumed"]
    assert ours.metadata["prefix_reuse"]  # causal prefix reused (from the patched or first changed position)
    _, clean_cache = m.run_with_cache(cs.clean_tokens)
    ref = TL[(site, by_position)](m, cs.corrupted_tokens, clean_cache, lambda lg: ld(lg).mean())
    torch.testing.assert_close(ours.values, ref.cpu(), atol=1e-4, rtol=1e-4)


BY_POS = {"resid_pre": tlp.get_act_patch_resid_pre, "resid_mid": tlp.get_act_patch_resid_mid,
          "attn_out": tlp.get_act_patch_attn_out, "mlp_out": tlp.get_act_patch_mlp_out,
          "head_out": tlp.get_act_patch_attn_head_out_by_pos, "head_q": tlp.get_act_patch_attn_head_q_by_pos,
          "pattern": tlp.get_act_patch_attn_head_pattern_by_pos}


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_reuse_equals_transformerlens_on_padded_prompts(family):
    """By-position sweeps recompute only positions >= the patched one; on prompts of different
    lengths (right padding, some answers read before the patched position) every site still equals
    TL's full forwards, and equals the sweep without prefix reuse."""
    m = tiny(family)
    cs = ioi(m, n=4, templates=(0, 1, 2))
    assert not cs.same_length
    ld = metrics.logit_diff(cs)
    _, clean_cache = m.run_with_cache(cs.clean_tokens)
    for site, tl_fn in BY_POS.items():
        if site == "resid_mid" and arch.describe(m).parallel:
            continue  # parallel attention + MLP: no residual between them
        kw = {"by_position": True} if site.startswith(("head", "pattern")) else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "prompts differ in length" (intended here)
            ours = mechlib.activation_patching(m, cs, ld, site=site, layers=[0, m.cfg.n_layers - 1], **kw)
        assert ours.metadata["prefix_reuse"], site
        ref = tl_fn(m, cs.corrupted_tokens, clean_cache, lambda lg: ld(lg).mean())[[0, -1]].cpu()
        ref = ref.permute(0, 2, 1) if site == "pattern" else ref  # TL: [layer, head, dest pos]
        torch.testing.assert_close(ours.values, ref, atol=1e-4, rtol=1e-4, msg=site)
        if site in ("resid_pre", "head_out"):  # per prompt, too: the same as without the reuse
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plain = mechlib.activation_patching(m, cs, ld, site=site, layers=[0, m.cfg.n_layers - 1],
                                                    reuse_prefix=False, **kw)
            # rows of every first position in one packed walk, each row from its own position on
            assert ours.metadata["packed"], (site, ours.metadata["pack_reason"])
            assert not plain.metadata["packed"] and plain.metadata["pack_reason"] is None
            torch.testing.assert_close(ours.per_prompt, plain.per_prompt, atol=1e-5, rtol=1e-5, msg=site)


@pytest.mark.parametrize("family", FAMILIES)
def test_path_patching_equals_the_slow_reference(family):
    m = tiny(family)
    cs = ioi(m, n=2, templates=(2,))
    ld = metrics.logit_diff(cs)
    for receivers, senders in [("logits", [(0, 0), (0, 3), (1, 1)]), ([(1, 2, "q"), (1, 1, "v")], [(0, 1), (0, 2)])]:
        r = mechlib.path_patching(m, cs, ld, senders=senders, receivers=receivers)
        for l, h in senders:
            ref = slow_path_patching(m, cs, ld, (l, h), receivers)
            torch.testing.assert_close(r.per_prompt[:, l, h], ref.cpu(), atol=1e-4, rtol=1e-4)
        # the patched runs recompute from the senders' first difference (S2) on: the clean run's
        # keys and values stand in for the earlier positions
        assert r.metadata["prefix_reuse"] and r.metadata["from_pos"] > 0, r.metadata["prefix_reason"]
    last = mechlib.path_patching(m, cs, ld, senders=[(0, 2)], receivers="logits", sender_positions="last")
    ref = slow_path_patching(m, cs, ld, (0, 2), "logits", sender_last=True)
    torch.testing.assert_close(last.per_prompt[:, 0, 2], ref.cpu(), atol=1e-4, rtol=1e-4)
    assert hooks.active_hooks(m) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_dla_terms_sum_to_the_logit_difference(family):
    m = tiny(family)
    cs = ioi(m, n=4, templates=(0, 3))
    dla = mechlib.direct_logit_attribution(m, cs)
    target = dla.baselines["logit_diff_before_softcap"]
    assert abs(float(dla.values.sum()) - target) < 1e-4
    assert dla.metadata["max_sum_error"] < 1e-4
    if arch.describe(m).logit_softcap is None:
        assert dla.baselines["logit_diff"] == pytest.approx(target, abs=1e-5)
    else:  # the terms decompose the logits before the soft cap; the cap keeps the sign
        assert abs(dla.baselines["logit_diff"]) <= abs(target) + 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_logit_lens_last_layer_equals_the_model(family):
    m = tiny(family)
    prompts = ["When Mary and John went to the store , John gave a drink to", "Mary gave a drink to"]
    lens = mechlib.logit_lens(m, prompts, targets=[" Mary", " John"] if family == "gpt2" else ["Mary", "John"])
    batch = mechlib.PromptBatch.from_prompts(m, prompts)
    with torch.no_grad():
        probs = batch.at_last(m(batch.tokens)).softmax(-1)
    ids = lens.metadata["target_ids"]
    torch.testing.assert_close(lens.per_prompt[:, -1], probs[:, ids].cpu(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_probes_and_interventions_run_and_restore_the_model(family):
    m = tiny(family)
    prompts = ["When Mary and John went to the store , John gave a drink to", "Mary gave a drink to John ."]
    toks = m.to_tokens(prompts[0])
    with torch.no_grad():
        before = m(toks)
    snap = weights_snapshot(m)
    sinks = mechlib.attention_sinks(m, prompts)
    assert sinks.alpha.shape[:3] == (2, 2, m.cfg.n_heads) and 0 <= sinks.sink_rate() <= 1
    mechlib.massive_activations(m, prompts)
    mechlib.sink_dimensions(m, prompts, layers=[0, 1])
    heads = [(1, 0), (0, 2)]
    L = int(toks.shape[1])
    edits = [
        interventions.calibrate_attention(m, heads, sink_positions=[2]),
        interventions.redistribute_attention(m, heads, span=(2, 6), sink_positions=[0]),
        interventions.scale_heads(m, heads, 2.0),
        interventions.steer_attention(m, heads, torch.zeros(1, L, dtype=torch.bool).index_fill(1, torch.tensor([2]), True),
                                      query_pos=torch.tensor([L - 1])),
        interventions.ablate_massive(m, [1, 3], layer=0),
        interventions.steer_residual(m, {0: torch.randn(m.cfg.d_model, generator=torch.Generator().manual_seed(0))}),
    ]
    for ctx in edits:
        with torch.no_grad(), ctx:
            edited = m(toks)
        assert not torch.allclose(edited, before, atol=1e-6), ctx.gen.__name__
    with torch.no_grad():
        torch.testing.assert_close(m(toks), before)
    assert hooks.active_hooks(m) == []
    assert_weights_equal(m, snap)


def _assemble(pre, segs, suf, order, bos):
    parts, spans, at = [pre], [], len(pre)
    if bos is not None:
        parts, at = [torch.tensor([bos]), pre], at + 1
    for k in order:
        spans.append((at, at + len(segs[k])))
        parts.append(segs[k])
        at += len(segs[k])
    return torch.cat(parts + [suf])[None], spans


@pytest.mark.parametrize("family", ROPE)
def test_pine_is_exactly_order_invariant_on_every_rope_family(family):
    """Per-layer RoPE bases (Gemma), partial rotary (Pythia), sliding windows shorter than the prompt
    (Gemma, Mistral), q/k norms, soft caps: the segments' order no longer matters."""
    m = tiny(family)
    g = torch.Generator().manual_seed(2)
    segs = [torch.randint(5, 60, (n,), generator=g) for n in (3, 5, 4)]
    pre, suf = torch.randint(5, 60, (3,), generator=g), torch.randint(5, 60, (4,), generator=g)
    outs, base = [], []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        toks, spans = _assemble(pre, segs, suf, order, m.tokenizer.bos_token_id)
        with torch.no_grad():
            base.append(m(toks)[0, -1])
            with interventions.position_invariant(m, spans) as fired:
                outs.append(m(toks)[0, -1])
        assert sum(fired.values()) >= 5 * m.cfg.n_layers
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-4)
    assert max(float((b - base[0]).abs().max()) for b in base[1:]) > 1e-3  # the plain model does care


def test_pine_refuses_a_model_without_rope():
    with pytest.raises(interventions.UnsupportedBridgeError, match="rotary"):
        with interventions.position_invariant(tiny("gpt2"), [(1, 3), (3, 5)]):
            pass


@pytest.mark.parametrize("family", ["llama", "gemma3", "neox", "gpt2"])
def test_same_numbers_for_any_batch_size(family):
    m = tiny(family)
    cs = tasks.ioi(m, n=5, seed=1, templates=[0, 4])  # two templates: mixed lengths and padding
    ld = metrics.logit_diff(cs)

    def both(verb, **kw):
        return verb(batch_size=None, **kw), verb(batch_size=2, **kw)

    for a, b in [
        both(lambda **k: mechlib.activation_patching(m, cs, ld, site="head_out", **k)),
        both(lambda **k: mechlib.activation_patching(m, cs, ld, site="resid_pre", **k)),
        both(lambda **k: mechlib.attribution_patching(m, cs, ld, site="head_out", **k)),
        both(lambda **k: mechlib.path_patching(m, cs, ld, senders=[(0, 1), (1, 2)], **k)),
        both(lambda **k: mechlib.direct_logit_attribution(m, cs, **k)),
        both(lambda **k: mechlib.logit_lens(m, cs, **k)),
        both(lambda **k: mechlib.attention_sinks(m, cs, **k)),
        both(lambda **k: mechlib.massive_activations(m, cs, **k)),
        both(lambda **k: mechlib.head_divergence(m, cs, span=(1, 3), **k)),
    ]:
        assert a.per_prompt.shape[0] == len(cs)
        torch.testing.assert_close(a.per_prompt, b.per_prompt, atol=1e-5, rtol=1e-4)
        mem = b.metadata.get("peak_memory")
        assert mem is not None and "method" in mem, type(b).__name__


def test_custom_metrics_split_only_when_built_for_it():
    m = tiny("llama")
    cs = tasks.ioi(m, n=4, seed=1, templates=[0])
    plain = lambda logits: metrics.logit_diff(cs)(logits)  # noqa: E731
    with pytest.raises(metrics.MetricError, match="plain function.*metrics.custom"):
        mechlib.activation_patching(m, cs, plain, site="head_out", batch_size=2)
    def fn(last, c):
        rows = torch.arange(len(last))
        return last[rows, c.answer_ids.repeat(len(last) // len(c))] - last[rows, c.wrong_ids.repeat(len(last) // len(c))]
    custom = metrics.custom(cs, fn, name="ld")
    a = mechlib.activation_patching(m, cs, custom, site="head_out", batch_size=2)
    b = mechlib.activation_patching(m, cs, metrics.logit_diff(cs), site="head_out")
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)


def test_gradient_verbs_work_under_no_grad_and_refuse_inference_mode():
    m = tiny("llama")
    cs = ioi(m)
    ld = metrics.logit_diff(cs)
    ref = mechlib.attribution_patching(m, cs, ld, site="head_out")
    with torch.no_grad():
        a = mechlib.attribution_patching(m, cs, ld, site="head_out")
    torch.set_grad_enabled(False)
    try:
        b = mechlib.attribution_patching(m, cs, ld, site="head_out")
        c = mechlib.find_circuit(m, cs, ld, threshold=0.0, min_z=0.0, max_heads=2, candidates=3, edges=False)
    finally:
        torch.set_grad_enabled(True)
    torch.testing.assert_close(a.values, ref.values)
    torch.testing.assert_close(b.values, ref.values)
    assert len(c.heads) >= 1
    assert all(p.grad is None for p in m.parameters())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        mechlib.attribution_patching(m, cs, ld, site="head_out")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_a_model_split_by_a_device_map_gives_the_same_results(family):
    """The path of a user whose model spans several devices: accelerate's dispatch hooks on every
    block (forced on this CPU-only machine), TransformerLens booted on the dispatched model."""
    single = tiny(family)
    n = single.cfg.n_layers
    device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n)},
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    from accelerate import dispatch_model

    hf, tok = mechlib.models.tiny.tiny_hf_model(family, seed=0)
    hf = dispatch_model(hf, device_map=device_map, force_hooks=True)
    assert hasattr(hf.model.layers[0], "_hf_hook")  # the split path really runs
    split = mechlib.models._common.boot("tiny-split", hf, tok, device=None, dtype=torch.float32)
    cs = ioi(single, n=3, templates=(0, 2))
    ld = metrics.logit_diff(cs)
    for verb in [lambda mm: mechlib.activation_patching(mm, cs, ld, site="head_out"),
                 lambda mm: mechlib.activation_patching(mm, cs, ld, site="resid_pre"),
                 lambda mm: mechlib.path_patching(mm, cs, ld, senders=[(0, 1), (1, 0)]),
                 lambda mm: mechlib.attribution_patching(mm, cs, ld, site="head_out"),
                 lambda mm: mechlib.direct_logit_attribution(mm, cs),
                 lambda mm: mechlib.logit_lens(mm, cs),
                 lambda mm: mechlib.attention_sinks(mm, cs)]:
        a, b = verb(single), verb(split)
        torch.testing.assert_close(a.per_prompt, b.per_prompt, atol=1e-5, rtol=1e-4)
    assert mechlib.activation_patching(split, cs, ld, site="head_out").metadata["path"] == "resumed"


@pytest.mark.parametrize("family", FAMILIES)
def test_activations_stop_the_forward_after_the_last_named_hook(family):
    """hooks.activations gives run_with_cache's values and runs no block after the last named one
    (nor the final norm and unembedding after the last block)."""
    m = tiny(family)
    cs = ioi(m)
    L = m.cfg.n_layers
    for names in (["blocks.0.attn.hook_pattern"], ["blocks.0.hook_resid_post", f"blocks.{L - 1}.attn.hook_z"],
                  ["ln_final.hook_in"]):
        _, ref = hooks.run_with_cache(m, cs.clean_tokens, names)
        with hooks.attach(m, [(f"blocks.{L - 1}.hook_resid_post", lambda x, hook: None),
                              ("ln_final.hook_out", lambda x, hook: None)], must_fire=False) as fired:
            got = hooks.activations(m, cs.clean_tokens, names)
        for n in names:
            torch.testing.assert_close(got[n], ref[n], atol=0, rtol=0)
        last_block = max(int(n.split(".")[1]) if n.startswith("blocks.") else L for n in names)
        assert fired[f"blocks.{L - 1}.hook_resid_post"] == (last_block >= L - 1 or names == ["ln_final.hook_in"])
        assert fired["ln_final.hook_out"] == (names == ["ln_final.hook_in"])  # a name past the blocks: whole forward
    assert hooks.active_hooks(m) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_recomputing_only_the_steered_positions_equals_the_full_forward(family):
    """evaluate(start_layer=, from_pos=) under steer_attention at each prompt's last query: the blocks
    recompute positions from_pos.. only, the unedited run's keys and values standing in before it."""
    m = tiny(family)
    cs = ioi(m, n=4, templates=(0, 1))
    ld = metrics.logit_diff(cs)
    keys = torch.zeros(len(cs), cs.n_pos, dtype=torch.bool)
    keys[:, 1] = True
    L = m.cfg.n_layers
    heads = [(L - 1, 0), (max(L - 2, 0), 1)]
    plain = metrics.evaluate(m, cs, ld)
    with mechlib.steer_attention(m, heads, keys, query_pos=cs.last_pos):
        full = metrics.evaluate(m, cs, ld)
        for p in (int(cs.last_pos.min()), 2):
            fast = metrics.evaluate(m, cs, ld, start_layer=max(L - 2, 0), from_pos=p)
            torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(full, plain, atol=1e-3)  # the steering changed the metric
    assert hooks.active_hooks(m) == []
