"""The papers' interventions as the papers define them — known answers written from their equations
and slow step-by-step references: VHR (Algorithm 1), VISTA (norm-preserving, per-input vectors;
the code's MLP variant), SLA (paper and code windows), VAR (per-layer sinks, per-row head
selection, the share moved under both readings of p)."""

import pytest
import torch

import mechlib
from mechlib import hooks, interventions
from mechlib.interventions.heads import _vhr_select

from conftest import assert_weights_equal, weights_snapshot

PROMPTS = ["When Mary and John went to the store , John gave a drink to",
           "Mary gave a drink to John and the store was warm",
           "John went to the store and Mary gave a drink to",
           "The store was warm and John gave a drink to Mary"]
SPAN = (2, 6)  # the "image": tokens 2..5 of each prompt (text analogue)


@pytest.fixture(scope="module")
def m4():
    return mechlib.tiny_model("llama", seed=0, n_layers=4)


# ------------------------------------------------------------------------------------------- VHR


def test_vhr_selection_rule_known_answers():
    vhd = torch.tensor([[1.0, 2.0, 3.0, 4.0, 9.0]])
    ta = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    sel, v = _vhr_select(vhd, ta, outliers=False)
    assert sel.tolist() == [[False, False, False, True, True]]  # above the median (3)
    ta_hi = torch.tensor([[1.0, 1.0, 1.0, 1.0, 50.0]])  # head 4: VHD and TA both above mean + std -> zeroed
    sel, v = _vhr_select(vhd, ta_hi, outliers=True)
    # the median of the zeroed scores [1, 2, 3, 4, 0] is 2
    assert v[0].tolist() == [1.0, 2.0, 3.0, 4.0, 0.0] and sel.tolist() == [[False, False, True, True, False]]
    sel, _ = _vhr_select(vhd, torch.tensor([[50.0, 1.0, 1.0, 1.0, 1.0]]), outliers=True)  # TA high, VHD low: kept
    assert sel.tolist() == [[False, False, False, True, True]]


def test_vhr_layers_follow_the_paper():
    assert interventions.vhr_layers(mechlib.tiny_model("llama", n_layers=32)) == [1] + list(range(18, 32))
    assert interventions.vhr_layers(mechlib.tiny_model("llama", n_layers=4)) == [1, 2, 3]


def test_vhr_equals_a_layer_by_layer_reference(m4):
    """Algorithm 1 step by step: for each reinforced layer in order, two fresh forwards (with and
    without the span) under the heads chosen so far, VHD at the last token, outliers, median."""
    layers = [1, 2, 3]
    batch = mechlib.PromptBatch.from_prompts(m4, PROMPTS)
    wo = batch.without(m4, batch.span_positions(m4, SPAN))
    mask = torch.zeros(len(PROMPTS), 4, 4, dtype=torch.bool)
    for l in layers:
        name = f"blocks.{l}.attn.hook_z"
        with interventions.reinforce_heads(m4, mask, 2.0):
            _, a = hooks.run_with_cache(m4, batch.tokens, [name])
            _, b = hooks.run_with_cache(m4, wo.tokens, [name])
        zw, zo = batch.at_last(a[name]).float(), wo.at_last(b[name]).float()
        sel, _ = _vhr_select((zw - zo).norm(dim=-1), zo.pow(2).sum(-1), True)
        mask[:, l] = sel
    snap = weights_snapshot(m4)
    with interventions.vhr(m4, PROMPTS, span=SPAN, layers=layers) as chosen:
        logits = m4(batch.tokens)
    assert torch.equal(chosen.per_prompt.bool(), mask)
    assert chosen.per_prompt[:, 0].sum() == 0  # only the chosen layers
    assert (chosen.per_prompt[:, layers].sum(-1) == 2).all()  # top half of 4 heads per layer
    assert len({tuple(map(tuple, chosen.heads(i))) for i in range(len(PROMPTS))}) > 1  # per sample
    with interventions.reinforce_heads(m4, mask, 2.0):
        ref = m4(batch.tokens)
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(chosen.logits, batch.at_last(logits).float())  # the first step is the same
    with interventions.vhr(m4, PROMPTS, span=SPAN, layers=layers, batch_size=3) as split:
        pass
    assert torch.equal(split.per_prompt, chosen.per_prompt)
    assert hooks.active_hooks(m4) == []
    assert_weights_equal(m4, snap)


# ----------------------------------------------------------------------------------------- VISTA


def test_steering_vectors_are_per_input_differences(m4):
    vsv = interventions.steering_vectors(m4, PROMPTS, span=SPAN)
    batch = mechlib.PromptBatch.from_prompts(m4, PROMPTS)
    wo = batch.without(m4, batch.span_positions(m4, SPAN))
    name = "blocks.2.hook_resid_post"
    _, a = hooks.run_with_cache(m4, batch.tokens, [name])
    _, b = hooks.run_with_cache(m4, wo.tokens, [name])
    torch.testing.assert_close(vsv.vectors[:, 2], (batch.at_last(a[name]) - wo.at_last(b[name])).float())
    assert not torch.allclose(vsv.vectors[0], vsv.vectors[1])


@pytest.mark.parametrize("variant,site", [("paper", "hook_resid_post"), ("code", "hook_mlp_out")])
def test_vista_keeps_each_token_norm_and_moves_towards_v(m4, variant, site):
    vsv = interventions.steering_vectors(m4, PROMPTS, span=SPAN)
    batch = mechlib.PromptBatch.from_prompts(m4, PROMPTS)
    name = f"blocks.1.{site}"
    seen = {}

    def before(x, hook):
        seen["before"] = x.detach().clone()

    def after(x, hook):
        seen["after"] = x.detach().clone()

    with hooks.attach(m4, [(name, before)]):
        with interventions.vista(m4, vsv, lam=0.5, variant=variant):
            with hooks.attach(m4, [(name, after)]):
                m4(batch.tokens)
    b, a = seen["before"].float(), seen["after"].float()
    torch.testing.assert_close(a.norm(dim=-1), b.norm(dim=-1), atol=1e-4, rtol=1e-5)
    v = vsv.vectors[:, 1][:, None, :]
    cos = lambda x: torch.nn.functional.cosine_similarity(x, v.expand_as(x), dim=-1)  # noqa: E731
    assert (cos(a) > cos(b) - 1e-6).all()  # every token turned towards its prompt's v
    with interventions.vista(m4, vsv, lam=0.0, variant=variant):
        torch.testing.assert_close(m4(batch.tokens), m4(batch.tokens))


def test_sla_code_variant_equals_the_released_code_on_hf_hidden_states():
    """VISTA's llava_llama.py, ported: ``hidden_states[1:]`` (the embedding entry dropped), then
    ``--logits-layers 25,30`` = entries 25..30, raw ``lm_head``, ``α·aug + (1 − α)·logits``. On a
    32-layer model that is the outputs of blocks 25..30 (L−7..L−2) — not 24..29."""
    from mechlib.models.tiny import tiny_hf_model

    m32 = mechlib.tiny_model("llama", seed=0, n_layers=32)
    assert mechlib.analyses.lens.sla_layers(m32, "paper") == list(range(26, 31))  # h^{L-5}..h^{L-1}, 1-indexed
    assert mechlib.analyses.lens.sla_layers(m32, "code") == list(range(25, 31))
    hf, _ = tiny_hf_model("llama", seed=0, n_layers=32)  # the same weights, run by transformers itself
    batch = mechlib.PromptBatch.from_prompts(m32, PROMPTS)
    ours = mechlib.self_logits_augmentation(m32, PROMPTS, gamma=0.3, variant="code")
    for i in range(len(PROMPTS)):
        ids = batch.tokens[i:i + 1, :int(batch.lengths[i])]
        with torch.no_grad():
            out = hf(input_ids=ids, output_hidden_states=True)
            all_hidden_states = out.hidden_states[1:]  # "ignore embedding layer"
            aug = torch.stack([hf.lm_head(all_hidden_states[idx]) for idx in range(25, 30 + 1)]).mean(0)
            ref = (0.3 * aug + 0.7 * out.logits)[0, -1]
        torch.testing.assert_close(ours[i], ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="variant"):
        mechlib.analyses.lens.sla_layers(m32, "codes")


def test_sla_windows_and_readouts(m4):
    L = m4.cfg.n_layers
    batch = mechlib.PromptBatch.from_prompts(m4, PROMPTS)
    names = [f"blocks.{l}.hook_resid_post" for l in range(L)]
    logits, acts = hooks.run_with_cache(m4, batch.tokens, names)
    final = batch.at_last(logits)
    h = lambda l: batch.at_last(acts[names[l]])  # noqa: E731
    paper = mechlib.self_logits_augmentation(m4, PROMPTS, gamma=0.3, window=2)
    lens = torch.stack([m4.unembed(m4.ln_final(h(l))) for l in (1, 2)]).mean(0)
    torch.testing.assert_close(paper, 0.7 * final + 0.3 * lens, atol=1e-5, rtol=1e-5)
    code = mechlib.self_logits_augmentation(m4, PROMPTS, gamma=0.3, variant="code", layers=[1, 2])
    raw = torch.stack([h(l) @ m4.W_U + (m4.b_U if m4.b_U is not None else 0) for l in (1, 2)]).mean(0)
    torch.testing.assert_close(code, 0.7 * final + 0.3 * raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mechlib.self_logits_augmentation(m4, PROMPTS, gamma=0.0), final)


# ------------------------------------------------------------------------------------------- VAR


@pytest.mark.parametrize("variant,moved", [("paper", 0.6), ("code", 0.4)])
def test_var_moves_exactly_the_stated_share_in_image_centric_rows(m4, variant, moved):
    batch = mechlib.PromptBatch.from_prompts(m4, PROMPTS)
    layer = 2
    _, acts = hooks.run_with_cache(m4, batch.tokens, [f"blocks.{layer}.hook_resid_pre"])
    score = interventions.rms_sink_scores(acts[f"blocks.{layer}.hook_resid_pre"], [7])
    tau = float(score[:, SPAN[0]:SPAN[1]].median())  # about half of the image tokens are sinks
    name = f"blocks.{layer}.attn.hook_pattern"
    seen = {}
    with hooks.attach(m4, [(name, lambda A, hook: seen.__setitem__("before", A.detach().clone()))]):
        with interventions.var(m4, PROMPTS, dims=[7], span=SPAN, tau=tau, rho=1.0, summ=0.0, p=0.6,
                               variant=variant, layers=[layer]) as rec:
            with hooks.attach(m4, [(name, lambda A, hook: seen.__setitem__("after", A.detach().clone()))]):
                m4(batch.tokens)
    before, after = seen["before"], seen["after"]
    sinks, rows = rec["sinks"][layer], rec["rows"][layer]  # [b, T], [b, H, T]
    torch.testing.assert_close(sinks, score > tau)
    image = torch.zeros_like(sinks)
    image[:, SPAN[0]:SPAN[1]] = True
    assert rows.any() and not rows[:, :, :SPAN[1]].any()  # only rows after the image
    for b, h, q in rows.nonzero().tolist():
        s_b = sinks[b]
        old, new = before[b, h, q], after[b, h, q]
        torch.testing.assert_close(new[s_b].sum(), (1 - moved) * old[s_b].sum())  # sinks keep 1 - moved
        rec_ = image[b] & ~s_b
        gain = (new - old)[rec_]
        torch.testing.assert_close(gain.sum(), moved * old[s_b].sum(), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(gain, moved * old[s_b].sum() * old[rec_] / old[rec_].sum(), atol=1e-6, rtol=1e-4)
    untouched = ~rows[..., None].expand_as(before)
    assert torch.equal(after[untouched], before[untouched])
    assert hooks.active_hooks(m4) == []


def test_var_selects_rows_by_image_attention_and_sink_share(m4):
    batch = mechlib.PromptBatch.from_prompts(m4, PROMPTS)
    layer = 2
    name = f"blocks.{layer}.attn.hook_pattern"
    _, acts = hooks.run_with_cache(m4, batch.tokens, [f"blocks.{layer}.hook_resid_pre", name])
    score = interventions.rms_sink_scores(acts[f"blocks.{layer}.hook_resid_pre"], [7])
    tau = float(score[:, SPAN[0]:SPAN[1]].median())
    with interventions.var(m4, PROMPTS, dims=[7], span=SPAN, tau=tau, layers=[layer]) as rec:
        m4(batch.tokens)
    A, sinks = acts[name], score > tau
    image = torch.zeros_like(sinks)
    image[:, SPAN[0]:SPAN[1]] = True
    on_img = (A * image[:, None, None]).sum(-1)
    share = (A * (sinks & image)[:, None, None]).sum(-1) / (on_img + 4e-6)
    after = torch.zeros_like(image)
    after[:, SPAN[1]:] = True
    after &= batch.mask
    expect = (on_img >= 0.2) & (share <= 0.5) & after[:, None, :] & (sinks & image).any(-1)[:, None, None]
    assert torch.equal(rec["rows"][layer], expect)
