"""The second embedded model, Gemma 3 270M: a real architecture that differs from SmolLM2 in
every way the verbs care about (local/global attention with two RoPE bases, (1 + w) norms,
post-norms, q/k norms, one KV head, a 262k vocabulary). Every verb runs on its fast path and
equals its reference here too."""

import pandas as pd
import pytest
import torch
from transformer_lens import patching as tlp

import mechlib
from mechlib import hooks, metrics, tasks

from reference import slow_path_patching

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def g_ioi(gemma):
    return tasks.ioi(gemma, n=2, seed=0, templates=[15])


def test_gemma_is_the_second_embedded_model(gemma):
    cfg = gemma.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.n_key_value_heads, cfg.d_model, cfg.d_vocab) == (18, 4, 1, 640, 262144)
    a = mechlib.arch.describe(gemma)
    assert a.family == "gemma3_text" and a.norm_offset == 1.0 and a.post_norms and a.qk_norm
    assert a.windows.count(None) == 3 and set(a.windows) == {512, None}  # 15 local layers, 3 global
    ioi = tasks.ioi(gemma, n=8, seed=0)
    ld = metrics.logit_diff(ioi)
    with torch.no_grad():
        clean, corr = ld(gemma(ioi.clean_tokens)).mean(), ld(gemma(ioi.corrupted_tokens)).mean()
    assert clean > 2 and corr < -2, (clean, corr)


@pytest.mark.parametrize("site,activation,setter,axes", [
    ("head_out", "z", tlp.layer_head_vector_patch_setter, ("layer", "head")),
    ("resid_pre", "resid_pre", tlp.layer_pos_patch_setter, ("layer", "pos")),
])
def test_patching_equals_transformerlens_on_the_fast_path(gemma, g_ioi, site, activation, setter, axes):
    ld = metrics.logit_diff(g_ioi)
    layers = [0, 5, 11, 17]  # local, global, global, global
    ours = mechlib.activation_patching(gemma, g_ioi, ld, site=site, layers=layers)
    assert ours.metadata["path"] == "resumed"
    assert ours.metadata["prefix_reuse"]  # local + global layers: prefix reused (from the first difference)
    _, clean_cache = gemma.run_with_cache(g_ioi.clean_tokens, names_filter=[f"blocks.{l}.{'attn.hook_z' if activation == 'z' else 'hook_resid_pre'}" for l in layers])
    idx = pd.DataFrame([(l, j) for l in layers for j in range(ours.values.shape[1])], columns=list(axes))
    ref = tlp.generic_activation_patch(gemma, g_ioi.corrupted_tokens, clean_cache, lambda lg: ld(lg).mean(),
                                       setter, activation, index_df=idx).reshape(ours.values.shape)
    torch.testing.assert_close(ours.values, ref.cpu(), atol=1e-4, rtol=1e-4)


def test_path_patching_equals_the_slow_reference(gemma, g_ioi):
    ld = metrics.logit_diff(g_ioi)
    senders = [(11, 3), (15, 2)]
    r = mechlib.path_patching(gemma, g_ioi, ld, senders=senders)
    for l, h in senders:
        torch.testing.assert_close(r.per_prompt[:, l, h], slow_path_patching(gemma, g_ioi, ld, (l, h), "logits").cpu(),
                                   atol=1e-4, rtol=1e-4)
    assert hooks.active_hooks(gemma) == []


def test_dla_sums_and_agrees_with_patching_on_the_top_head(gemma):
    ioi = tasks.ioi(gemma, n=8, seed=0)
    dla = mechlib.direct_logit_attribution(gemma, ioi)
    assert dla.metadata["max_sum_error"] < 1e-3
    assert abs(float(dla.values.sum()) - dla.baselines["logit_diff"]) < 1e-3
    top_dla = dla.heads().top(1).iloc[0]
    patched = mechlib.activation_patching(gemma, ioi, metrics.logit_diff(ioi), site="head_out").normalized()
    top_patch = patched.top(1).iloc[0]
    assert (top_dla["layer"], top_dla["head"]) == (top_patch["layer"], top_patch["head"])  # measured: L11H3 both ways


def test_lens_last_layer_is_the_model(gemma, g_ioi):
    lens = mechlib.logit_lens(gemma, g_ioi)
    with torch.no_grad():
        probs = mechlib.PromptBatch.from_prompts(gemma, g_ioi).at_last(gemma(g_ioi.clean_tokens)).softmax(-1)
    ref = torch.stack([probs[torch.arange(2), g_ioi.answer_ids], probs[torch.arange(2), g_ioi.wrong_ids]], 1)
    torch.testing.assert_close(lens.per_prompt[:, -1], ref.cpu(), atol=1e-5, rtol=1e-4)


def test_sinks_and_massive_activations(gemma):
    prompts = ["The quick brown fox jumps over the lazy dog. It was a sunny day.",
               "Summer is warm. Winter is cold.\nSpring is mild, and autumn is cool."]
    s = mechlib.attention_sinks(gemma, prompts)
    assert s.sink_rate() > 0.5 and float(s.value_norm_ratio.mean()) < 1.0  # measured 0.93 and 0.26
    ma = mechlib.massive_activations(gemma, prompts)
    assert ma.massive_dims() and ma.first_layer() is not None


def test_pine_makes_pairwise_choices_order_invariant(gemma):
    items = tasks.pairwise_choice(gemma, n=6, seed=0)
    plain = mechlib.position_bias(gemma, items)
    pine = mechlib.position_bias(gemma, items, pine=True)
    assert pine.per_prompt.shape == (6, 2)
    assert float((pine.per_prompt[:, 0] - pine.per_prompt[:, 1]).abs().max()) < 1e-3
    assert float((plain.per_prompt[:, 0] - plain.per_prompt[:, 1]).abs().max()) > 0.05


def test_hf_adds_bos_reads_each_saved_tokenizer(gemma, model):
    """bos="hf" follows each model's own Hugging Face tokenizer (TransformerLens re-creates both
    with add_bos_token=True): Gemma 3's puts BOS first, SmolLM2's does not; read once per path."""
    from mechlib.tasks.generators import _saved_adds_bos, hf_adds_bos

    assert gemma.tokenizer("a")["input_ids"][0] == gemma.tokenizer.bos_token_id
    assert hf_adds_bos(gemma) and not hf_adds_bos(model)
    hits = _saved_adds_bos.cache_info().hits
    assert hf_adds_bos(gemma) and _saved_adds_bos.cache_info().hits == hits + 1
