"""PINE (position_invariant), segmented prompts and the position-bias measures."""

import pytest
import torch

import mechlib
from mechlib import hooks, interventions
from mechlib.tasks import OptionPrompts, SegmentedPrompts

from conftest import assert_weights_equal, weights_snapshot


def _layout(seg_lens, prefix=3, suffix=4, seed=0):
    """Random tokens laid out as BOS+prefix | segments | suffix; returns (tokens, spans)."""
    g = torch.Generator().manual_seed(seed)
    segs = [torch.randint(5, 60, (n,), generator=g) for n in seg_lens]
    pre = torch.randint(5, 60, (prefix,), generator=g)
    suf = torch.randint(5, 60, (suffix,), generator=g)
    return pre, segs, suf


def _assemble(pre, segs, suf, order):
    parts, spans, at = [torch.tensor([1]), pre], [], 1 + len(pre)
    for k in order:
        spans.append((at, at + len(segs[k])))
        parts.append(segs[k])
        at += len(segs[k])
    return torch.cat(parts + [suf])[None], spans


def test_rope_reconstruction_matches_the_bridge(tiny_llama):
    """With no position change, PINE's score function reproduces the bridge's own scores."""
    toks = torch.randint(5, 60, (1, 12), generator=torch.Generator().manual_seed(1))
    names = ["blocks.1.attn.hook_rot_q", "blocks.1.attn.hook_rot_k", "blocks.1.attn.hook_attn_scores",
             "blocks.1.attn.hook_cos", "blocks.1.attn.hook_sin"]
    _, acts = hooks.run_with_cache(tiny_llama, toks, names)
    qr, kr = acts[names[0]][0], acts[names[1]][0]
    H = qr.shape[1]
    kr = kr.repeat_interleave(H // kr.shape[1], dim=1)
    inv = interventions.rope_frequencies(acts[names[3]], acts[names[4]])
    hf_rope = tiny_llama.original_model.model.rotary_emb.inv_freq.float()
    torch.testing.assert_close(inv, hf_rope, atol=1e-6, rtol=1e-5)  # read off cos/sin = HF's own frequencies
    scale = tiny_llama.blocks[1].attn.original_component.scaling
    ours = interventions._rope_scores(qr, kr, torch.zeros(H, 12, 12, dtype=torch.long), inv) * scale
    ref = acts[names[2]][0]
    keep = torch.ones(12, 12).tril().bool()
    torch.testing.assert_close(ours[:, keep], ref[:, keep], atol=1e-5, rtol=1e-5)
    # shift = i - j removes position entirely: scores equal un-rotated q·k
    pos = torch.arange(12)
    plain = interventions._rope_scores(qr, kr, (pos[:, None] - pos[None, :]).expand(H, 12, 12), inv)
    again = interventions._rope_scores(qr.roll(1, 0), kr.roll(1, 0), (pos[:, None] - pos[None, :]).expand(H, 12, 12), inv)
    assert not torch.allclose(plain, again, atol=1e-3)  # sanity: inputs matter


def test_single_segment_changes_nothing(tiny_llama):
    pre, segs, suf = _layout([6])
    toks, spans = _assemble(pre, segs, suf, [0])
    base = tiny_llama(toks)
    with interventions.position_invariant(tiny_llama, spans) as fired:
        out = tiny_llama(toks)
    assert all(v == 1 for v in fired.values())
    torch.testing.assert_close(out, base, atol=1e-5, rtol=1e-5)


def test_permuting_segments_leaves_the_answer_unchanged(tiny_llama):
    """PINE's defining property; without it the model is order-sensitive."""
    pre, segs, suf = _layout([3, 5, 4], seed=2)
    outs, base = [], []
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]):
        toks, spans = _assemble(pre, segs, suf, order)
        base.append(tiny_llama(toks)[0, -1])
        with interventions.position_invariant(tiny_llama, spans):
            outs.append(tiny_llama(toks)[0, -1])
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-4)
    assert max((b - base[0]).abs().max() for b in base[1:]) > 1e-3


def test_segments_attend_to_each_other_and_prefix_is_untouched(tiny_llama):
    pre, segs, suf = _layout([4, 4], seed=3)
    toks, spans = _assemble(pre, segs, suf, [0, 1])
    name = "blocks.0.attn.hook_pattern"
    _, plain = hooks.run_with_cache(tiny_llama, toks, [name])
    with interventions.position_invariant(tiny_llama, spans):
        _, pine = hooks.run_with_cache(tiny_llama, toks, [name])
    A, B = plain[name][0], pine[name][0]
    (a0, b0), (a1, b1) = spans
    assert (B[:, a0:b0, a1:b1].sum(-1) > 0.01).all()  # the first segment now sees the second
    assert (A[:, a0:b0, a1:b1] == 0).all()
    assert (B[:, a0:b0, b1:] == 0).all()  # but not the suffix
    torch.testing.assert_close(B[:, :a0], A[:, :a0], atol=1e-6, rtol=1e-5)  # prefix rows unchanged
    torch.testing.assert_close(B.sum(-1), torch.ones_like(B.sum(-1)))


def _tiny_llama_in(dtype):
    """The tiny Llama of the ``tiny_llama`` fixture (same weights), run in ``dtype``."""
    from mechlib.models._common import boot
    from mechlib.models.tiny import tiny_hf_model

    hf, tok = tiny_hf_model("llama", 0)
    return boot("tiny-llama", hf.to(dtype), tok, device=None, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pine_in_half_precision(tiny_llama, dtype, monkeypatch):
    """In half precision the reconstruction check compares scores within their rounding: PINE runs,
    gives the float32 model's PINE output up to half-precision error and stays order-blind; a wrong
    reconstruction (scores 5% off) is still refused, and so are frequencies that do not give the
    cos/sin the model applied."""
    half = _tiny_llama_in(dtype)
    pre, segs, suf = _layout([3, 5, 4], seed=2)
    outs = []
    for order in ([0, 1, 2], [2, 0, 1]):
        toks, spans = _assemble(pre, segs, suf, order)
        with interventions.position_invariant(half, spans):
            outs.append(half(toks)[0, -1].float())
        with interventions.position_invariant(tiny_llama, spans):
            ref = tiny_llama(toks)[0, -1]
        assert float((outs[-1] - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert float((outs[1] - outs[0]).abs().max()) < 0.05 * float(outs[0].abs().max())
    real = interventions.position._rope_scores
    with monkeypatch.context() as m:
        m.setattr(interventions.position, "_rope_scores", lambda *a: real(*a) * 1.05)
        with pytest.raises(interventions.UnsupportedBridgeError, match="beyond the rounding bound"):
            with interventions.position_invariant(half, spans):
                half(toks)
    _, acts = hooks.run_with_cache(half, toks, ["blocks.0.attn.hook_cos", "blocks.0.attn.hook_sin"])
    cos, sin = acts["blocks.0.attn.hook_cos"], acts["blocks.0.attn.hook_sin"]
    assert cos.dtype == dtype
    inv = half.original_model.model.rotary_emb.inv_freq.float()
    torch.testing.assert_close(interventions.rope_frequencies(cos, sin, [inv * 1.02, inv]), inv)
    with pytest.raises(interventions.UnsupportedBridgeError, match="not rotate-half"):
        interventions.rope_frequencies(cos, sin, [inv * 1.02])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_pine_in_half_precision_finds_each_layer_types_frequencies(dtype):
    """Gemma 3 keeps one frequency buffer per layer type (``sliding_attention_inv_freq``,
    ``full_attention_inv_freq``, float32 as loaded): half-precision PINE finds each layer's among
    them and stays order-blind."""
    m = mechlib.tiny_model("gemma3", dtype=dtype)
    pre, segs, suf = _layout([3, 5, 4], seed=2)
    outs = []
    for order in ([0, 1, 2], [2, 0, 1]):
        toks, spans = _assemble(pre, segs, suf, order)
        with interventions.position_invariant(m, spans):
            outs.append(m(toks)[0, -1].float())
    assert float((outs[1] - outs[0]).abs().max()) < 0.05 * float(outs[0].abs().max())


def test_pine_bad_inputs_and_cleanup(tiny_llama, tiny_gpt2):
    pre, segs, suf = _layout([3, 3])
    toks, spans = _assemble(pre, segs, suf, [0, 1])
    snap = weights_snapshot(tiny_llama)
    with pytest.raises(ValueError, match="contiguous"):
        with interventions.position_invariant(tiny_llama, [(4, 6), (7, 9)]):
            tiny_llama(toks)
    with pytest.raises(ValueError, match="out of range"):
        with interventions.position_invariant(tiny_llama, [(4, 7), (7, 99)]):
            tiny_llama(toks)
    with pytest.raises(ValueError, match="2 prompts; this forward has batch 3"):
        with interventions.position_invariant(tiny_llama, [spans, spans]):
            tiny_llama(toks.repeat(3, 1))
    with pytest.raises(interventions.UnsupportedBridgeError):
        with interventions.position_invariant(tiny_gpt2, spans):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with interventions.position_invariant(tiny_llama, spans):
            raise RuntimeError("boom")
    assert hooks.active_hooks(tiny_llama) == []
    assert_weights_equal(tiny_llama, snap)


def test_segmented_prompts_spans_and_batches(model):
    sp = SegmentedPrompts.from_parts(model, ["Pick one:\n", "Q\n"], [["- apple\n", "- hammer\n"], ["x\n"]],
                                     ["Answer:", "A:"])
    for i, spans in enumerate(sp.segments):
        text = "".join(model.tokenizer.decode(sp.tokens[i, a:b]) for a, b in spans)
        assert text == ("- apple\n- hammer\n" if i == 0 else "x\n")
        assert spans[-1][1] < int(sp.lengths[i])
    parts = list(sp.batches(1))
    assert [len(p) for p in parts] == [1, 1] and isinstance(parts[1], SegmentedPrompts)
    assert parts[1].segments == (sp.segments[1],) and parts[1].tokens.shape[1] == int(sp.lengths[1])
    with pytest.raises(mechlib.ContrastSetError, match="segments\\[1\\]"):
        SegmentedPrompts.from_parts(model, ["a", "b"], [["x"], []], ["c", "d"])


def test_pine_on_smollm2_removes_order_dependence(model):
    opts = mechlib.tasks.pairwise_choice(model, n=8, seed=1)
    assert isinstance(opts, OptionPrompts) and len(opts) == 16
    assert opts.correct_slot.tolist() == [0, 1] * 8
    base = mechlib.position_bias(model, opts)
    pine = mechlib.position_bias(model, opts, pine=True, batch_size=5)
    s = pine.stats()
    assert s["consistency"][0] == 1.0 and s["first_slot_rate"][0] == 0.5
    assert abs(s["first_slot_logit"][0]) < 1e-3
    assert abs(base.stats()["first_slot_logit"][0]) > 0.05  # the plain model does care about order
    att = mechlib.segment_attention(model, opts, pine=True)
    assert att.values.shape == (model.cfg.n_layers, model.cfg.n_heads, 2)
    assert (att.per_prompt.sum(-1) <= 1 + 1e-5).all()
    # PINE: the same content gets the same attention in either slot
    per = att.per_prompt.view(8, 2, *att.values.shape)  # [item, order, L, H, slot]
    torch.testing.assert_close(per[:, 0, ..., 0], per[:, 1, ..., 1], atol=1e-4, rtol=1e-3)
    with pytest.raises(TypeError, match="OptionPrompts"):
        mechlib.position_bias(model, SegmentedPrompts.from_parts(model, ["a"], [["b", "c"]], ["d"]))
    with pytest.raises(ValueError, match="format"):
        mechlib.tasks.pairwise_choice(model, format="essay")


def test_order_shift_puts_the_most_important_segment_closest():
    imp = torch.tensor([[0.1, 0.5, 0.3], [float("inf"), 0.0, 0.2]])
    lens = torch.tensor([2, 3, 4])
    shift = interventions._order_shift(imp, lens)
    # row 0: order 1, 2, 0 -> doc1 stays, doc2 moves back by 3, doc0 by 3 + 4
    assert shift.tolist() == [[7, 0, 3], [0, 6, 2]]


def test_position_bias_and_segment_attention_equal_full_forwards(tiny_llama):
    """Both read the last token only (the forward is unembedded there alone); the numbers are the
    full forward's, with and without PINE, in batches of any size."""
    from contextlib import nullcontext

    m = tiny_llama
    opts = mechlib.tasks.pairwise_choice(m, n=3, seed=2)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(m.cfg.n_layers)]
    for pine in (False, True):
        ld, att = [], []
        for chunk in opts.batches(1):   # one prompt per full forward: the reference
            with interventions.position_invariant(m, chunk) if pine else nullcontext():
                logits, cache = hooks.run_with_cache(m, chunk.tokens, names)
            ld.append(chunk.logit_diff(logits)[0])
            rows = torch.stack([chunk.at_last(cache[n].transpose(1, 2))[0] for n in names])  # [L, H, pos]
            seg = torch.zeros(chunk.tokens.shape[1], 2)
            for k, (a, b) in enumerate(chunk.segments[0]):
                seg[a:b, k] = 1.0
            att.append(rows @ seg)
        per = torch.zeros(3, 2)
        per[opts.item, opts.correct_slot] = torch.stack(ld)
        bias = mechlib.position_bias(m, opts, pine=pine, batch_size=4)
        torch.testing.assert_close(bias.per_prompt, per, atol=1e-5, rtol=1e-5)
        seg_att = mechlib.segment_attention(m, opts, pine=pine, batch_size=4)
        torch.testing.assert_close(seg_att.per_prompt, torch.stack(att), atol=1e-5, rtol=1e-5)
    assert hooks.active_hooks(m) == []
