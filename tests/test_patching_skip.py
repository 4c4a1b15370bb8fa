"""Patching computes only the cells whose answer is not already known: a cell whose clean and
corrupted activations are exactly equal is the corrupted run (TL's value too), and a patch that
first changes position p recomputes positions p.. only. These tests check that the shortcut is
exact where it bites hardest: prompts of different lengths whose first differences are at
different positions, a first difference at position 0, a VLM whose image differs while its tokens
do not, and metrics that read the whole vocabulary (rows slotted back into copies of the batch)."""

import warnings

import pytest
import torch
from transformer_lens import patching as tlp

import mechlib
from mechlib import ContrastSet, hooks, metrics, tasks

TL = {
    ("resid_pre", False): tlp.get_act_patch_resid_pre,
    ("mlp_out", False): tlp.get_act_patch_mlp_out,
    ("attn_out", False): tlp.get_act_patch_attn_out,
    ("head_out", False): tlp.get_act_patch_attn_head_out_all_pos,
    ("head_v", False): tlp.get_act_patch_attn_head_v_all_pos,
    ("pattern", False): tlp.get_act_patch_attn_head_pattern_all_pos,
    ("head_out", True): tlp.get_act_patch_attn_head_out_by_pos,
    ("head_q", True): tlp.get_act_patch_attn_head_q_by_pos,
    ("head_k", True): tlp.get_act_patch_attn_head_k_by_pos,
    ("pattern", True): tlp.get_act_patch_attn_head_pattern_by_pos,
}


def tl_values(model, cs, metric, site, by_position):
    _, clean_cache = model.run_with_cache(cs.clean_tokens)
    ref = TL[(site, by_position)](model, cs.corrupted_tokens, clean_cache, lambda lg: metric(lg).mean()).cpu()
    return ref.permute(0, 2, 1) if site == "pattern" and by_position else ref


def first_differences(cs):
    return [int((cs.clean_tokens[i] != cs.corrupted_tokens[i]).nonzero()[0]) for i in range(len(cs))]


def ragged(model):
    """Three prompts of different lengths (right-padded) whose first clean/corrupted difference is
    at three different positions: S2 swapped (late), all names replaced (early), and a template
    whose S2 comes at another position."""
    a = tasks.ioi(model, n=1, seed=0, templates=[0])
    b = tasks.ioi(model, n=1, seed=1, templates=[2], corruption="abc")
    c = tasks.ioi(model, n=1, seed=2, templates=[5])
    parts = [a, b, c]
    return ContrastSet.from_prompts(model, [p.clean_prompts[0] for p in parts], [p.corrupted_prompts[0] for p in parts],
                                    [p.answers[0] for p in parts], [p.wrong_answers[0] for p in parts])


@pytest.fixture(scope="module")
def tiny_ragged(tiny_llama):
    cs = ragged(tiny_llama)
    assert not cs.same_length and len(set(first_differences(cs))) == 3
    return cs


@pytest.mark.parametrize("site,by_position", list(TL))
def test_ragged_first_differences_equal_transformerlens(tiny_llama, tiny_ragged, site, by_position):
    ld = metrics.logit_diff(tiny_ragged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "prompts differ in length" (intended)
        ours = mechlib.activation_patching(tiny_llama, tiny_ragged, ld, site=site, by_position=by_position)
        plain = mechlib.activation_patching(tiny_llama, tiny_ragged, ld, site=site, by_position=by_position,
                                            resume=False)
    torch.testing.assert_close(ours.values, tl_values(tiny_llama, tiny_ragged, ld, site, by_position),
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.per_prompt, plain.per_prompt, atol=1e-5, rtol=1e-5)  # per prompt, too
    md = ours.metadata
    assert md["prefix_reuse"] and md["from_pos"] == min(first_differences(tiny_ragged))
    if "pos" in ours.axis_names:  # positions before a prompt's first difference: nothing to compute
        assert md["skipped_rows"] >= sum(first_differences(tiny_ragged)) * len(ours.labels["layer"])


def test_skipped_cells_are_the_corrupted_run_exactly(tiny_llama, tiny_ragged):
    """A cell computed for no prompt holds each prompt's corrupted value, bit for bit; a prompt whose
    patch changes nothing at a cell holds its own corrupted value there."""
    ld = metrics.logit_diff(tiny_ragged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = mechlib.activation_patching(tiny_llama, tiny_ragged, ld, site="resid_pre")
    diffs = first_differences(tiny_ragged)
    for i, p in enumerate(diffs):
        before = r.per_prompt[i, :, :p]  # every layer, positions before this prompt's first difference
        assert torch.equal(before, r.corrupted_per_prompt[i].expand_as(before))
    assert r.metadata["skipped_cells"] > 0 and r.metadata["skipped_rows"] > r.metadata["skipped_cells"]


def test_first_difference_at_position_zero(tiny_llama):
    """No BOS and the first token swapped: the all-positions sweep recomputes every position
    (nothing to skip, no prefix), and still equals TL."""
    clean = ["Mary and John went to the store, and John gave a drink to", "Anna and Tom went to the park, and Tom gave a ball to"]
    corr = ["John and Mary went to the store, and John gave a drink to", "Tom and Anna went to the park, and Tom gave a ball to"]
    cs = ContrastSet.from_prompts(tiny_llama, clean, corr, [" Mary", " Anna"], [" John", " Tom"], prepend_bos=False)
    assert first_differences(cs) == [0, 0]
    ld = metrics.logit_diff(cs)
    for site, by_position in [("head_out", False), ("pattern", False), ("resid_pre", False), ("head_out", True)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = mechlib.activation_patching(tiny_llama, cs, ld, site=site, by_position=by_position)
        torch.testing.assert_close(r.values, tl_values(tiny_llama, cs, ld, site, by_position), atol=1e-4, rtol=1e-4)
        # (a causal pattern's first query row is [1, 0, ...] in every run: the pattern sweep starts at 1)
        assert r.metadata["from_pos"] == (1 if site == "pattern" else 0)
        if site == "head_out" and not by_position:
            assert r.metadata["skipped_rows"] == 0 and not r.metadata["prefix_reuse"]


@pytest.mark.parametrize("make", [metrics.answer_prob, lambda cs: metrics.custom(
    cs, lambda last, c: last.log_softmax(-1)[torch.arange(len(last)), c.answer_ids.repeat(len(last) // len(c))],
    name="answer_logprob")])
def test_metrics_reading_the_whole_vocabulary(tiny_llama, tiny_ragged, make):
    """Metrics without declared columns get rows slotted back into copies of the batch."""
    metric = make(tiny_ragged)
    assert getattr(metric, "columns", None) is None
    for site, by_position in [("head_out", False), ("head_out", True), ("resid_pre", False)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = mechlib.activation_patching(tiny_llama, tiny_ragged, metric, site=site, by_position=by_position,
                                            memory_budget_mb=0.05)  # small chunks: several copies per walk
        assert r.metadata["readout"] == "vocabulary"
        torch.testing.assert_close(r.values, tl_values(tiny_llama, tiny_ragged, metric, site, by_position),
                                   atol=1e-4, rtol=1e-4)


def test_vlm_whose_image_differs_is_not_skipped(tiny_llava):
    """Same tokens, different images: skipping follows the activations, not the tokens, so image
    positions and everything after them are computed; the result equals full forwards that carry
    each run's pixel_values."""
    g = torch.Generator().manual_seed(0)
    prompt = "<image> <image> <image> <image> When Mary and John went to the store, John gave a drink to"
    cs = ContrastSet.from_prompts(tiny_llava, [prompt] * 2, [prompt] * 2, [" Mary"] * 2, [" John"] * 2,
                                  extras={"pixel_values": torch.randn(2, 3, 16, 16, generator=g)},
                                  corrupted_extras={"pixel_values": torch.randn(2, 3, 16, 16, generator=g)})
    assert torch.equal(cs.clean_tokens, cs.corrupted_tokens)
    ld = metrics.logit_diff(cs)
    image = int((cs.clean_tokens[0] == hooks.image_token_id(tiny_llava)).nonzero()[0])
    for site, kw in [("head_out", {}), ("resid_pre", {}), ("head_out", {"by_position": True})]:
        fast = mechlib.activation_patching(tiny_llava, cs, ld, site=site, **kw)
        full = mechlib.activation_patching(tiny_llava, cs, ld, site=site, resume=False, **kw)
        torch.testing.assert_close(fast.values, full.values, atol=1e-5, rtol=1e-5)
        assert fast.metadata["from_pos"] == image and fast.metadata["prefix_reuse"]
        assert fast.metadata["packed"] == (site == "resid_pre" or "by_position" in kw)
        assert not torch.allclose(fast.values, torch.full_like(fast.values, fast.baselines["corrupted"]))
    assert hooks.active_hooks(tiny_llava) == []


def test_benchmark_contrast_on_the_embedded_model(model):
    """SmolLM2, the benchmark's template (S2 at position 10): cells before S2 and layer-0 cells away
    from it are skipped, the head sweep recomputes from S2, and both equal TL's full forwards."""
    import pandas as pd

    cs = tasks.ioi(model, n=2, seed=0, templates=[15])
    ld = metrics.logit_diff(cs)
    assert first_differences(cs) == [10, 10]
    layers = [0, 14, 29]
    r = mechlib.activation_patching(model, cs, ld, site="resid_pre", layers=layers)
    # skipped: layer 0 everywhere but S2 (the same token embedding), positions < 10 at layers 14/29,
    # and at the last layer every position but the read one (14)... which resid_pre does not allow:
    # a residual patch at layer 29 reaches the read position through its keys and values
    assert r.metadata["skipped_cells"] == 14 + 10 + 10
    assert r.metadata["from_pos"] == 10 and r.metadata["readout"] == "columns" and r.metadata["read_row"]
    assert r.metadata["packed"] and r.metadata["pack_reason"] is None  # rows from 10..14 in one walk
    h = mechlib.activation_patching(model, cs, ld, site="head_out", layers=layers, by_position=True)
    # head outputs at the last layer reach only their own position: positions 10..13 are skipped too
    assert h.metadata["skipped_cells"] == 9 * (10 + 10 + 14) and h.metadata["packed"]
    a = mechlib.activation_patching(model, cs, ld, site="head_out", layers=layers)
    assert a.metadata["from_pos"] == 10 and a.metadata["walk_starts"] == [10]
    _, clean_cache = model.run_with_cache(cs.clean_tokens)
    for res, setter, act, axes in [(r, tlp.layer_pos_patch_setter, "resid_pre", ("layer", "pos")),
                                   (a, tlp.layer_head_vector_patch_setter, "z", ("layer", "head"))]:
        idx = pd.DataFrame([(l, j) for l in layers for j in range(res.values.shape[1])], columns=list(axes))
        ref = tlp.generic_activation_patch(model, cs.corrupted_tokens, clean_cache, lambda lg: ld(lg).mean(),
                                           setter, act, index_df=idx).reshape(res.values.shape)
        torch.testing.assert_close(res.values, ref.cpu(), atol=1e-4, rtol=1e-4)
    hl = mechlib.activation_patching(model, cs, ld, site="head_out", layers=[29], by_position=True, positions=[9, 12, 14])
    idx = pd.DataFrame([(29, p, hh) for p in (9, 12, 14) for hh in range(9)], columns=["layer", "pos", "head"])
    ref = tlp.generic_activation_patch(model, cs.corrupted_tokens, clean_cache, lambda lg: ld(lg).mean(),
                                       tlp.layer_pos_head_vector_patch_setter, "z", index_df=idx).reshape(hl.values.shape)
    torch.testing.assert_close(hl.values, ref.cpu(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("site", ["resid_pre", "head_out"])
def test_first_sweep_of_a_model_over_early_layers_only(site):
    """The once-per-model check of the resumed final block runs on whatever layers the first sweep
    records: a fresh model whose first sweep covers early layers only (no start at the last layer)
    gives TL's values (was: KeyError on the last layer), and a later full sweep is exact too."""
    m = mechlib.tiny_model("llama", seed=3, n_layers=4)  # a new model: nothing checked on it yet
    cs = tasks.ioi(m, n=3, seed=0, templates=[15])
    ld = metrics.logit_diff(cs)
    ref = tl_values(m, cs, ld, site, False)
    early = mechlib.activation_patching(m, cs, ld, site=site, layers=[0, 1])
    torch.testing.assert_close(early.values, ref[[0, 1]], atol=1e-4, rtol=1e-4)
    full = mechlib.activation_patching(m, cs, ld, site=site)
    torch.testing.assert_close(full.values, ref, atol=1e-4, rtol=1e-4)
    assert hooks.active_hooks(m) == []


def test_pack_layout():
    """Rows laid end to end: each row's positions fp..read in order in one sequence of its own
    prompt and layer, no slot used twice, sequences at most the cap unless one row is longer."""
    from mechlib.analyses.patching.packed import pack

    g = torch.Generator().manual_seed(0)
    last = torch.tensor([14, 11, 20])
    layer = torch.sort(torch.randint(0, 4, (60,), generator=g)).values
    b = torch.randint(0, 3, (60,), generator=g)
    fp = (torch.rand(60, generator=g) * (last[b] + 1)).long()
    pk = pack(layer, b, fp, last, seq_cap=24)
    q = last[b] - fp + 1
    assert int(pk.tok_row.numel()) == int(q.sum())
    assert len({(s, t) for s, t in zip(pk.tok_seq.tolist(), pk.tok_slot.tolist())}) == int(q.sum())
    for r in range(60):
        mine = pk.tok_row == r
        assert pk.tok_pos[mine].tolist() == list(range(int(fp[r]), int(last[b[r]]) + 1))
        assert set(pk.tok_seq[mine].tolist()) == {int(pk.row_seq[r])}
        assert pk.tok_slot[mine].tolist() == list(range(int(pk.row_first[r]), int(pk.row_read[r]) + 1))
        assert int(pk.seq_b[pk.row_seq[r]]) == int(b[r]) and int(pk.seq_layer[pk.row_seq[r]]) == int(layer[r])
    lengths = torch.bincount(pk.tok_seq, minlength=pk.n_seq)
    assert int(lengths.max()) == pk.n and int(lengths.min()) > 0
    assert int(lengths.max()) <= max(24, int(q.max()))  # never padded past the cap (or one row)
    assert torch.equal(pk.seq_layer, torch.sort(pk.seq_layer).values)  # sequences join in layer order


def test_packing_that_fails_its_check_warns_and_stays_exact(monkeypatch):
    """A model whose blocks would not keep packed rows apart (here: a mask that lets segments see
    each other) fails the once-per-model check: the sweep says so (warning, metadata) and runs
    unpacked walks, with TL's values."""
    from mechlib.analyses.patching import packed

    def leaky(m, pk, fp, batch, n_pos):
        own = torch.zeros(pk.n_seq, pk.n, pk.prefix + pk.n, dtype=m.dtype)
        return own.masked_fill(torch.ones(pk.n, pk.prefix + pk.n, dtype=torch.bool).triu(pk.prefix + 1),
                               torch.finfo(m.dtype).min)[:, None]

    monkeypatch.setattr(packed, "_packed_mask", leaky)
    m = mechlib.tiny_model("llama", seed=5, n_layers=3)  # a new model: its packing is checked now
    cs = tasks.ioi(m, n=3, seed=0, templates=[15])
    ld = metrics.logit_diff(cs)
    with pytest.warns(UserWarning, match="packed walks are off"):
        r = mechlib.activation_patching(m, cs, ld, site="resid_pre")
    assert not r.metadata["packed"] and "differs from the corrupted run" in r.metadata["pack_reason"]
    assert r.metadata["prefix_reuse"]
    torch.testing.assert_close(r.values, tl_values(m, cs, ld, "resid_pre", False), atol=1e-4, rtol=1e-4)
    assert hooks.active_hooks(m) == []


# ---------------------------------------------------------------------------------------------
# path patching: every patched run is the clean run before the senders' first difference
# ---------------------------------------------------------------------------------------------

PATHS = [("logits", "all"), ([(1, 2, "q"), (1, 0, "v")], "all"), ("logits", "last"), ([(1, 1, "k")], "last")]


def path_slow(model, cs, metric, sender, receivers, sender_positions):
    from reference import slow_path_patching

    return slow_path_patching(model, cs, metric, sender, receivers, sender_last=sender_positions == "last").cpu()


@pytest.mark.parametrize("receivers,sender_positions", PATHS)
def test_path_patching_recomputes_from_the_first_difference_on_ragged_prompts(tiny_llama, tiny_ragged, receivers,
                                                                             sender_positions):
    """Prompts of different lengths whose first differences lie at different positions: the patched
    runs recompute from the earliest one on (the clean keys and values stand in before it) and equal
    full forwards of every sender alone."""
    ld = metrics.logit_diff(tiny_ragged)
    senders = [(0, 1), (0, 3)] if receivers != "logits" else [(0, 1), (1, 2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = mechlib.path_patching(tiny_llama, tiny_ragged, ld, senders=senders, receivers=receivers,
                                  sender_positions=sender_positions)
    for l, h in senders:
        torch.testing.assert_close(r.per_prompt[:, l, h], path_slow(tiny_llama, tiny_ragged, ld, (l, h), receivers,
                                                                    sender_positions), atol=1e-4, rtol=1e-4)
    md = r.metadata
    want = min(first_differences(tiny_ragged)) if sender_positions == "all" else int(tiny_ragged.last_pos.min())
    assert md["prefix_reuse"] and md["from_pos"] == want > 0 and md["prefix_reason"] is None
    assert hooks.active_hooks(tiny_llama) == []


def test_path_patching_from_a_first_difference_at_position_zero(tiny_llama):
    """The first token swapped: nothing before the difference, every position recomputed, no
    warning (there was nothing to reuse), and still the slow reference."""
    clean = ["Mary and John went to the store, and John gave a drink to", "Anna and Tom went to the park, and Tom gave a ball to"]
    corr = ["John and Mary went to the store, and John gave a drink to", "Tom and Anna went to the park, and Tom gave a ball to"]
    cs = ContrastSet.from_prompts(tiny_llama, clean, corr, [" Mary", " Anna"], [" John", " Tom"], prepend_bos=False)
    ld = metrics.logit_diff(cs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = mechlib.path_patching(tiny_llama, cs, ld, senders=[(0, 0), (1, 3)])
    for l, h in [(0, 0), (1, 3)]:
        torch.testing.assert_close(r.per_prompt[:, l, h], path_slow(tiny_llama, cs, ld, (l, h), "logits", "all"),
                                   atol=1e-4, rtol=1e-4)
    assert r.metadata["from_pos"] == 0 and not r.metadata["prefix_reuse"] and r.metadata["prefix_reason"] is None


def test_path_patching_with_a_metric_that_reads_every_position_says_why_it_recomputes_everything(tiny_llama,
                                                                                                 tiny_ragged):
    ld = metrics.logit_diff(tiny_ragged)
    with pytest.warns(UserWarning, match="prefix reuse is off.*reads every position"):
        r = mechlib.path_patching(tiny_llama, tiny_ragged, lambda logits: ld(logits), senders=[(0, 1), (1, 2)])
    assert not r.metadata["prefix_reuse"] and "last_token_only" in r.metadata["prefix_reason"]
    fast = mechlib.path_patching(tiny_llama, tiny_ragged, ld, senders=[(0, 1), (1, 2)])
    torch.testing.assert_close(r.per_prompt, fast.per_prompt, atol=1e-5, rtol=1e-5)
