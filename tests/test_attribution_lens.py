"""Head divergence (VHD), direct logit attribution and the logit lens."""

import pytest
import torch

import mechlib
from mechlib import hooks, metrics, tasks
from mechlib.tasks import ContrastSetError

from conftest import assert_weights_equal, weights_snapshot


# ---------------------------------------------------------------------------------- VHD
def test_vhd_known_answer_head_reading_only_the_span_scores_highest(tiny_llama):
    model = tiny_llama
    prompt = "When Mary and John went to the store, John gave a drink to"
    P = model.to_tokens(prompt).shape[1]
    span = (2, 6)

    def force(A, hook):
        A = A.clone()
        Q, K = A.shape[-2:]
        A[:, 0] = 0.0
        A[:, 0, :, 0] = 1.0  # head 0 reads only the first token, with or without the span
        A[:, 2] = 0.0
        if K == P:  # span present: head 2 reads only the span
            A[:, 2, :, span[0]:span[1]] = 1.0 / (span[1] - span[0])
        else:
            A[:, 2, :, 0] = 1.0
        return A

    snap = weights_snapshot(model)
    with hooks.attach(model, [("blocks.1.attn.hook_pattern", force)]), \
            mechlib.scale_heads(model, [(1, 2)], 50.0):
        vhd = mechlib.head_divergence(model, [prompt, prompt], span=span)
    assert vhd.top_heads(1) == [(1, 2)]
    assert float(vhd.values[1, 0]) < 1e-5  # a head that never reads the span does not move
    assert vhd.per_prompt.shape == (2, model.cfg.n_layers, model.cfg.n_heads)
    assert hooks.active_hooks(model) == []
    assert_weights_equal(model, snap)


def test_vhd_on_the_image_path_of_a_tiny_llava(tiny_llava):
    g = torch.Generator().manual_seed(0)
    prompt = "<image> <image> <image> <image> When Mary and John went to the store, John gave a drink to"
    pix = torch.randn(2, 3, 16, 16, generator=g)
    a = mechlib.head_divergence(tiny_llava, [prompt, prompt], span="image", extras={"pixel_values": pix})
    b = mechlib.head_divergence(tiny_llava, [prompt, prompt], span="image", extras={"pixel_values": pix * 3})
    assert (a.values > 0).any() and not torch.allclose(a.values, b.values)  # depends on the image
    with pytest.raises(hooks.MissingModelInputError, match="pixel_values"):
        mechlib.head_divergence(tiny_llava, [prompt], span="image")


def test_vhd_bad_spans(tiny_llama):
    p = ["When Mary and John went to the store, John gave a drink to"]
    with pytest.raises(ValueError, match="VLM"):
        mechlib.head_divergence(tiny_llama, p, span="image")
    with pytest.raises(ValueError, match="span"):
        mechlib.head_divergence(tiny_llama, p, span=(0, 3))
    with pytest.raises(ValueError, match="span"):
        mechlib.head_divergence(tiny_llama, p, span=(3, 99))
    with pytest.raises(ValueError, match="span is required"):
        mechlib.head_divergence(tiny_llama, p)


def test_context_qa_spans_are_the_context(model):
    qa = tasks.context_qa(model, n=4)
    for i in range(4):
        s, e = qa.spans[i]
        text = "".join(qa.str_tokens(model, i)[s:e])
        assert text.endswith(".") and qa.answers[i].strip() in text and qa.wrong_answers[i].strip() not in text
    vhd = mechlib.head_divergence(model, qa)  # spans from the set
    assert vhd.values.shape == (model.cfg.n_layers, model.cfg.n_heads) and (vhd.values > 0).all()


# ---------------------------------------------------------------------------------- DLA
@pytest.mark.parametrize("which", ["embedded", "gpt2"])
def test_dla_sums_to_the_logit_difference(which, model, tiny_gpt2):
    m = model if which == "embedded" else tiny_gpt2
    cs = tasks.factual_recall(m, n=6) if which == "embedded" else tasks.ioi(m, n=3, templates=[0])
    dla = mechlib.direct_logit_attribution(m, cs)
    with torch.no_grad():
        ld = metrics.logit_diff(cs)(m(cs.clean_tokens))
    assert torch.allclose(dla.per_prompt.sum(1), ld.float().cpu(), atol=1e-3 * max(1.0, float(ld.abs().max())))
    assert dla.heads().values.shape == (m.cfg.n_layers, m.cfg.n_heads)
    assert dla.mlps().values.shape == (m.cfg.n_layers,)


def test_dla_equals_transformerlens_in_compatibility_mode():
    from transformer_lens.tools.analysis import direct_logit_attribution as tl_dla

    raw = mechlib.tiny_model("gpt2", seed=3)
    compat = mechlib.tiny_model("gpt2", seed=3)
    compat.enable_compatibility_mode()
    cs = tasks.ioi(raw, n=1, templates=[0])
    ours = mechlib.direct_logit_attribution(raw, cs).heads()
    ref = tl_dla(compat, cs.clean_tokens, answer_tokens=cs.answer_ids, incorrect_tokens=cs.wrong_ids, unit="head")
    import re

    tl = ref.attribution.reshape(len(ref.labels), -1)[:, 0].float().cpu()
    pairs = [(k, re.fullmatch(r"L(\d+)H(\d+)", lab)) for k, lab in enumerate(ref.labels)]
    pairs = [(k, int(m[1]), int(m[2])) for k, m in pairs if m]
    assert len(pairs) == raw.cfg.n_layers * raw.cfg.n_heads
    ours_flat = torch.tensor([float(ours.values[l, h]) for _, l, h in pairs])
    assert torch.allclose(ours_flat, tl[[k for k, _, _ in pairs]], atol=1e-4), (ours_flat, tl)


# ---------------------------------------------------------------------------------- logit lens
def test_logit_lens_last_layer_equals_the_models_output(model):
    prompts = ["The capital of France is", "Paris is the capital of the country called"]
    lens = mechlib.logit_lens(model, prompts, targets=[" Paris", " France"])
    for i, p in enumerate(prompts):
        with torch.no_grad():
            logits = model(model.to_tokens(p))[0, -1]
        probs = logits.softmax(-1)
        ids = [model.to_single_token(" Paris"), model.to_single_token(" France")]
        assert torch.allclose(lens.per_prompt[i, -1], probs[ids].float().cpu(), atol=1e-5)
        for k, t in enumerate(ids):
            assert int(lens.ranks[i, -1, k]) == int((logits > logits[t]).sum())
    assert lens.labels["layer"][-1] == "final_post" and len(lens.labels["layer"]) == model.cfg.n_layers + 1
    assert lens.top_tokens[0][-1][0] == " Paris"
    assert lens.tokens(0, "final_post") == lens.top_tokens[0][-1] and lens.tokens(1, 3) == lens.top_tokens[1][3]
    ee = lens.early_excitation()
    assert set(ee.columns) >= {"peak_layer", "peak_prob", "final_prob", "early"} and len(ee) == 4


def test_component_tokens_match_dla_and_sla_limits(model):
    fr = tasks.factual_recall(model, n=4)
    ct = mechlib.component_tokens(model, fr)
    dla = mechlib.direct_logit_attribution(model, fr).mlps()
    assert torch.allclose(ct.values[:, 0] - ct.values[:, 1], dla.values, atol=1e-3)
    with torch.no_grad():
        final = metrics.last_token_logits(model(fr.clean_tokens), fr)
    sla0 = mechlib.self_logits_augmentation(model, fr, layers=[20], gamma=0.0)
    sla_last = mechlib.self_logits_augmentation(model, fr, layers=[model.cfg.n_layers - 1], gamma=1.0)
    assert torch.allclose(sla0, final, atol=1e-4) and torch.allclose(sla_last, final, atol=1e-3)
    assert not torch.allclose(mechlib.self_logits_augmentation(model, fr, layers=[20], gamma=0.5), final)
    # tokens(layer) by layer number, whatever layers were read (top_tokens itself is by position)
    late = mechlib.component_tokens(model, fr, layers=range(20, 30))
    assert late.tokens(25) == late.tokens("L25") == late.top_tokens[5] == ct.top_tokens[25]
    with pytest.raises(ValueError, match="no layer 40"):
        late.tokens(40)


def test_lens_bad_inputs(model):
    with pytest.raises(ContrastSetError, match="one token|single"):
        mechlib.logit_lens(model, ["The capital of France is"], targets=[" Parisian capital"])
    with pytest.raises(ValueError, match="targets are required"):
        mechlib.logit_lens(model, ["The capital of France is"])
    with pytest.raises(ValueError, match="gamma"):
        mechlib.self_logits_augmentation(model, ["a"], layers=[1], gamma=2)
    with pytest.raises(ValueError, match="site"):
        mechlib.component_tokens(model, ["a b"], site="resid", targets=[" a"])
