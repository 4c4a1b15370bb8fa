import pandas as pd
import pytest
import torch
from transformer_lens import patching as tlp

import mechlib
from mechlib import ContrastSet, hooks, metrics, tasks
from mechlib.metrics import MetricError
from mechlib.sites import Site, SiteError

from conftest import assert_weights_equal, weights_snapshot
from reference import slow_path_patching

TL_FUNCS = {
    ("resid_pre", False): tlp.get_act_patch_resid_pre,
    ("resid_mid", False): tlp.get_act_patch_resid_mid,
    ("attn_out", False): tlp.get_act_patch_attn_out,
    ("mlp_out", False): tlp.get_act_patch_mlp_out,
    ("head_out", False): tlp.get_act_patch_attn_head_out_all_pos,
    ("head_q", False): tlp.get_act_patch_attn_head_q_all_pos,
    ("head_k", False): tlp.get_act_patch_attn_head_k_all_pos,
    ("head_v", False): tlp.get_act_patch_attn_head_v_all_pos,
    ("pattern", False): tlp.get_act_patch_attn_head_pattern_all_pos,
    ("head_out", True): tlp.get_act_patch_attn_head_out_by_pos,
    ("head_q", True): tlp.get_act_patch_attn_head_q_by_pos,
    ("head_k", True): tlp.get_act_patch_attn_head_k_by_pos,
    ("head_v", True): tlp.get_act_patch_attn_head_v_by_pos,
    ("pattern", True): tlp.get_act_patch_attn_head_pattern_by_pos,
}


def tl_reference(model, cs, metric, site, by_position):
    _, clean_cache = model.run_with_cache(cs.clean_tokens)
    scalar = lambda logits: metric(logits).mean()  # noqa: E731
    if site == "resid_post":
        return tlp.generic_activation_patch(model, cs.corrupted_tokens, clean_cache, scalar,
                                            tlp.layer_pos_patch_setter, "resid_post",
                                            index_axis_names=("layer", "pos"))
    ref = TL_FUNCS[(site, by_position)](model, cs.corrupted_tokens, clean_cache, scalar)
    return ref.permute(0, 2, 1) if site == "pattern" and by_position else ref


@pytest.fixture(scope="module")
def tiny_ioi(tiny_llama):
    return tasks.ioi(tiny_llama, n=3, seed=0, templates=[0])


@pytest.mark.parametrize("site,by_position", [("resid_post", False)] + list(TL_FUNCS))
def test_equals_transformerlens_on_tiny_gqa_llama(tiny_llama, tiny_ioi, site, by_position):
    ld = metrics.logit_diff(tiny_ioi)
    ours = mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site=site, by_position=by_position)
    ref = tl_reference(tiny_llama, tiny_ioi, ld, site, by_position)
    assert ours.values.shape == ref.shape
    assert torch.allclose(ours.values, ref.cpu(), atol=1e-4), float((ours.values - ref).abs().max())
    assert ours.metadata["resumed"]


@pytest.mark.parametrize("site,by_position", [("resid_pre", False), ("head_out", False), ("head_v", True), ("pattern", False)])
def test_equals_transformerlens_on_tiny_gpt2(tiny_gpt2, site, by_position):
    cs = tasks.ioi(tiny_gpt2, n=2, seed=1, templates=[5])
    ld = metrics.logit_diff(cs)
    ours = mechlib.activation_patching(tiny_gpt2, cs, ld, site=site, by_position=by_position)
    ref = tl_reference(tiny_gpt2, cs, ld, site, by_position)
    assert torch.allclose(ours.values, ref.cpu(), atol=1e-4)


@pytest.mark.parametrize("site,activation,setter,axes", [
    ("head_out", "z", tlp.layer_head_vector_patch_setter, ("layer", "head")),
    ("head_k", "k", tlp.layer_head_vector_patch_setter, ("layer", "head")),
    ("resid_pre", "resid_pre", tlp.layer_pos_patch_setter, ("layer", "pos")),
])
def test_equals_transformerlens_on_the_embedded_model(model, site, activation, setter, axes):
    cs = tasks.ioi(model, n=2, seed=0, templates=[15])
    ld = metrics.logit_diff(cs)
    layers = [0, 9, 29]
    ours = mechlib.activation_patching(model, cs, ld, site=site, layers=layers)
    assert ours.metadata["prefix_reuse"] and ours.metadata["from_pos"] == 10  # S2, the first difference
    _, clean_cache = model.run_with_cache(cs.clean_tokens)
    second = range(ours.values.shape[1])
    idx = pd.DataFrame([(l, j) for l in layers for j in second], columns=list(axes))
    ref = tlp.generic_activation_patch(model, cs.corrupted_tokens, clean_cache, lambda lg: ld(lg).mean(),
                                       setter, activation, index_df=idx).reshape(ours.values.shape)
    assert torch.allclose(ours.values, ref.cpu(), atol=1e-4), float((ours.values - ref).abs().max())


def test_known_answers_on_single_token_corruption(model):
    """IOI s2_swap changes one token. Layer-0 resid_pre: patching that position restores exactly the
    clean metric, any other position leaves exactly the corrupted one; the final layer's resid_post
    at the answer position restores the clean metric too."""
    cs = tasks.ioi(model, n=4, seed=3, templates=[15])
    assert cs.same_length
    ld = metrics.logit_diff(cs)
    r = mechlib.activation_patching(model, cs, ld, site="resid_pre", layers=[0])
    clean, corr = r.clean_per_prompt, r.corrupted_per_prompt
    for i in range(len(cs)):
        diff = (cs.clean_tokens[i] != cs.corrupted_tokens[i]).nonzero().flatten().tolist()
        assert len(diff) == 1
        p = diff[0]
        assert torch.allclose(r.per_prompt[i, 0, p], clean[i], atol=1e-4)
        others = [q for q in range(int(cs.lengths[i])) if q != p]
        assert torch.allclose(r.per_prompt[i, 0, others], corr[i].expand(len(others)), atol=1e-4)
    last = mechlib.activation_patching(model, cs, ld, site="resid_post", layers=[-1], positions=[-1])
    assert torch.allclose(last.per_prompt[:, 0, 0], clean, atol=1e-4)
    assert torch.allclose(last.normalized().values, torch.ones(1, 1), atol=1e-4)


def test_self_patching_changes_nothing(tiny_llama):
    clean = ["When Mary and John went to the store, John gave a drink to"]
    cs = ContrastSet.from_prompts(tiny_llama, clean, clean, [" Mary"], [" John"])
    ld = metrics.logit_diff(cs)
    for site in ("resid_mid", "head_v", "pattern"):
        r = mechlib.activation_patching(tiny_llama, cs, ld, site=site)
        assert torch.allclose(r.values, torch.full_like(r.values, r.baselines["clean"]), atol=1e-5)
        a = mechlib.attribution_patching(tiny_llama, cs, ld, site=site)
        assert torch.allclose(a.values, torch.full_like(a.values, a.baselines["clean"]), atol=1e-5)



def test_unembedding_the_read_position_only_changes_nothing():
    """logit_diff declares that it reads the answer position only, so attribution and path patching
    unembed that position alone (and path patching's receiver pass stops after its last receiver);
    the same metric as a plain function (read as needing every position) gets the full logits."""
    m = mechlib.tiny_model("llama", seed=1, n_layers=4)
    cs = tasks.ioi(m, n=3, seed=0, templates=[0])
    ld = metrics.logit_diff(cs)

    def everywhere(logits):
        return ld(logits)

    assert ld.last_token_only and not hasattr(everywhere, "last_token_only")
    for site, kw in (("head_out", {}), ("resid_pre", {}), ("head_v", {"by_position": True})):
        fast = mechlib.attribution_patching(m, cs, ld, site=site, **kw)
        full = mechlib.attribution_patching(m, cs, everywhere, site=site, **kw)
        torch.testing.assert_close(fast.per_prompt, full.per_prompt, atol=1e-5, rtol=1e-5, msg=site)
    for receivers in ("logits", [(2, 1, "q"), (1, 0, "k")]):  # the receiver pass stops after layer 2 of 4
        fast = mechlib.path_patching(m, cs, ld, receivers=receivers)
        with pytest.warns(UserWarning, match="prefix reuse is off"):
            full = mechlib.path_patching(m, cs, everywhere, receivers=receivers)
        torch.testing.assert_close(fast.per_prompt, full.per_prompt, atol=1e-5, rtol=1e-5)

def test_resumed_chunked_and_full_forwards_agree(tiny_llama, tiny_ioi):
    ld = metrics.logit_diff(tiny_ioi)
    a = mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site="head_q", by_position=True)
    b = mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site="head_q", by_position=True,
                                    resume=False, memory_budget_mb=1e-6)
    assert a.metadata["resumed"] and not b.metadata["resumed"] and b.metadata["chunk"] == 1
    assert torch.allclose(a.values, b.values, atol=1e-5)


def test_prefix_reuse_never_switches_off_silently(tiny_llama, tiny_ioi, monkeypatch):
    ld = metrics.logit_diff(tiny_ioi)
    every_position = lambda logits: ld(logits[:, -1])  # noqa: E731  (same-length prompts)
    with pytest.warns(UserWarning, match="prefix reuse is off.*reads every position"):
        r = mechlib.activation_patching(tiny_llama, tiny_ioi, every_position, site="resid_pre")
    assert r.metadata["resumed"] and not r.metadata["prefix_reuse"] and "every position" in r.metadata["prefix_reason"]
    fast = mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site="resid_pre")
    assert torch.allclose(r.values, fast.values, atol=1e-5)
    # a model whose prefix replay does not reproduce its logits: warned, recorded, and still exact
    monkeypatch.setattr(hooks, "_PREFIX_OK", __import__("weakref").WeakKeyDictionary())
    monkeypatch.setattr(hooks, "_suffix", lambda key, v, p: v[..., p:] if key == "position_ids" and v is not None
                        else (tuple(x[:, :-p] for x in v) if key == "position_embeddings" else
                              v[:, :, p:, :] if key == "attention_mask" and v is not None else v))
    with pytest.warns(UserWarning, match="prefix reuse is off.*changes the logits"):
        bad = mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site="head_out", by_position=True)
    assert not bad.metadata["prefix_reuse"] and "changes the logits" in bad.metadata["prefix_reason"]
    plain = mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site="head_out", by_position=True, reuse_prefix=False)
    assert torch.allclose(bad.values, plain.values, atol=1e-5)
    assert hooks.active_hooks(tiny_llama) == []


@pytest.mark.parametrize("site,kw", [("resid_pre", {}), ("head_out", {"by_position": True}), ("head_out", {})])
def test_sweep_flops_are_what_the_forwards_do(tiny_llama, tiny_ioi, site, kw):
    """metadata["flops"] (counted from the shapes each forward runs: the clean and corrupted runs,
    the key/value recording and every walk) equals torch's own FLOP counter over the sweep."""
    from torch.utils.flop_counter import FlopCounterMode

    ld = metrics.logit_diff(tiny_ioi)
    mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site=site, **kw)  # checks are made once per model
    with FlopCounterMode(display=False) as counter:
        r = mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site=site, **kw)
    assert counter.get_total_flops() == r.metadata["flops"]
    assert r.metadata["flops"] < r.metadata["flops_one_forward_per_cell"]
    assert r.metadata["read_row"] and r.metadata["readout"] == "columns"


def test_walks_cover_every_row_once():
    from mechlib.analyses.patching.engine import _Rows, _walks

    g = torch.Generator().manual_seed(0)
    n = 60
    layer = torch.randint(0, 6, (n,), generator=g)
    fp = torch.tensor([5, 0, 3, 3, 9, 1])[torch.randint(0, 6, (n,), generator=g)]
    rows = _Rows(layer, torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), fp, layer)
    for overhead in (0, 16, 10**6):
        for split_last in (False, True):
            walks = _walks(rows, 6, 10, max_rows=7, overhead=overhead, split_last=split_last)
            members = sorted(i for _, w in walks for i in w.tolist())
            assert members == list(range(n))
            for p0, w in walks:
                assert len(w) <= 7 and bool((fp[w] >= p0).all()) and bool((layer[w].diff() >= 0).all())
                assert not split_last or len(set((layer[w] == 5).tolist())) == 1  # last-layer rows walk alone
    assert {p0 for p0, _ in _walks(rows, 6, 10, 1000, overhead=0)} == set(fp.tolist())  # free calls: one walk per position
    assert {p0 for p0, _ in _walks(rows, 6, 10, 1000, overhead=10**6)} == {0}  # costly calls: one walk


def test_position_sweeps_on_mixed_lengths_warn(tiny_llama):
    cs = tasks.ioi(tiny_llama, n=2, seed=0, templates=[0, 2])
    assert not cs.same_length
    with pytest.warns(UserWarning, match="differ in length"):
        mechlib.activation_patching(tiny_llama, cs, metrics.logit_diff(cs), site="resid_pre")


def test_mixed_length_prompts_match_one_by_one(model):
    cs = tasks.ioi(model, n=3, seed=5, templates=[0, 4, 15])
    assert not cs.same_length
    ld = metrics.logit_diff(cs)
    together = mechlib.activation_patching(model, cs, ld, site="head_out", layers=[20, 25])
    for i in range(3):
        one = cs.subset([i])
        alone = mechlib.activation_patching(model, one, metrics.logit_diff(one), site="head_out", layers=[20, 25])
        assert torch.allclose(together.per_prompt[i], alone.per_prompt[0], atol=1e-4)


def test_result_has_stats_and_labels(model):
    cs = tasks.ioi(model, n=6, seed=0, templates=[15])
    r = mechlib.activation_patching(model, cs, metrics.logit_diff(cs), site="resid_pre", layers=[0, 5])
    assert r.per_prompt.shape == (6, 2, cs.n_pos)
    assert r.labels["pos"][-1].endswith(" to") and r.labels["layer"] == ("L0", "L5")
    lo, hi = r.ci()
    assert (lo <= r.values + 1e-6).all() and (hi >= r.values - 1e-6).all()
    assert r.baselines["clean"] > 2 > r.baselines["corrupted"]
    back = mechlib.Result.load(r.save(__import__("tempfile").mkdtemp() + "/r.safetensors"))
    assert isinstance(back, mechlib.PatchingResult) and torch.equal(back.clean_per_prompt, r.clean_per_prompt)


def test_attribution_tracks_exact_patching(tiny_llama, tiny_ioi):
    ld = metrics.logit_diff(tiny_ioi)
    # (resid sites on a random tiny model move the metric by ~1e-3: too flat to correlate)
    for site, bp in [("head_out", False), ("head_q", False), ("head_v", True)]:
        exact = mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site=site, by_position=bp)
        approx = mechlib.attribution_patching(tiny_llama, tiny_ioi, ld, site=site, by_position=bp)
        assert approx.values.shape == exact.values.shape and approx.axis_names == exact.axis_names
        r = torch.corrcoef(torch.stack([approx.values.flatten(), exact.values.flatten()]))[0, 1]
        assert r > 0.9, (site, float(r))
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_attribution_tracks_exact_patching_on_the_embedded_model(model):
    cs = tasks.ioi(model, n=4, seed=0, templates=[15])
    ld = metrics.logit_diff(cs)
    layers = list(range(16, 30))
    exact = mechlib.activation_patching(model, cs, ld, site="head_out", layers=layers)
    approx = mechlib.attribution_patching(model, cs, ld, site="head_out", layers=layers)
    r = torch.corrcoef(torch.stack([approx.values.flatten(), exact.values.flatten()]))[0, 1]
    print(f"attribution vs exact, head_out L16-29: r = {r:.3f}")
    assert r > 0.6  # measured 0.76 here: a useful but rough approximation on head outputs


# ------------------------------------------------------------------------------ path patching


# the last case: receivers in layers 0 and 2, senders in layer 1 — the layer-0 receiver is below every
# sender (no path reaches it), as a four-stage circuit search's previous-token stage meets it
@pytest.mark.parametrize("receivers", ["logits", [(1, 2, "q")], [(1, 1, "k"), (1, 0, "v")],
                                       [(0, 1, "k"), (2, 0, "q")]])
def test_path_patching_matches_slow_reference(receivers):
    model = mechlib.tiny_model("llama", seed=2, n_layers=3)
    cs = tasks.ioi(model, n=2, seed=0, templates=[2])
    ld = metrics.logit_diff(cs)
    senders = ([(0, 0), (0, 3), (1, 1)] if receivers == "logits" else [(1, 0), (1, 3)] if receivers[0][0] == 0
               else [(0, 0), (0, 2)])
    r = mechlib.path_patching(model, cs, ld, senders=senders, receivers=receivers, max_chunk=2)
    for l, h in senders:
        ref = slow_path_patching(model, cs, ld, (l, h), receivers)
        assert torch.allclose(r.per_prompt[:, l, h], ref, atol=1e-4), ((l, h), r.per_prompt[:, l, h], ref)
    untouched = r.values[2] if receivers == "logits" else r.values[0] if receivers[0][0] == 0 else r.values[1]
    assert torch.allclose(untouched, torch.full_like(untouched, r.baselines["clean"]))
    assert hooks.active_hooks(model) == []


def test_path_patching_receivers_at_the_last_token_only():
    model = mechlib.tiny_model("llama", seed=2, n_layers=3)
    cs = tasks.ioi(model, n=2, seed=0, templates=[2])
    ld = metrics.logit_diff(cs)
    receivers = [(2, 1, "q"), (2, 0, "k")]
    r = mechlib.path_patching(model, cs, ld, senders=[(0, 1), (1, 2)], receivers=receivers,
                              receiver_positions="last")
    everywhere = mechlib.path_patching(model, cs, ld, senders=[(0, 1), (1, 2)], receivers=receivers)
    for l, h in [(0, 1), (1, 2)]:
        ref = slow_path_patching(model, cs, ld, (l, h), receivers, last_only=True)
        assert torch.allclose(r.per_prompt[:, l, h], ref, atol=1e-4)
    assert not torch.allclose(r.values, everywhere.values)
    with pytest.raises(ValueError, match="receiver_positions"):
        mechlib.path_patching(model, cs, ld, receivers=receivers, receiver_positions="end")


def test_path_patching_on_the_embedded_model_finds_late_heads(model):
    cs = tasks.ioi(model, n=4, seed=0, templates=[15])
    ld = metrics.logit_diff(cs)
    senders = [(l, h) for l in (21, 23, 25) for h in range(model.cfg.n_heads)]
    r = mechlib.path_patching(model, cs, ld, senders=senders, receivers="logits")
    eff = r.effect()
    # Measured on SmolLM2-135M: L23H3 carries the IOI answer to the logits (name-mover-like);
    # noising its path alone drops the logit difference by ~4 of the clean ~3.9.
    top = eff.top(1, largest=False)
    assert (top.loc[0, "layer"], top.loc[0, "head"]) == (23, 3)
    assert float(eff.values.min()) < -2.0
    assert r.metadata["direction"] == "noising"


def test_path_patching_input_errors(tiny_llama, tiny_ioi):
    ld = metrics.logit_diff(tiny_ioi)
    with pytest.raises(SiteError, match="not before the last receiver"):
        mechlib.path_patching(tiny_llama, tiny_ioi, ld, senders=[(1, 0)], receivers=[(1, 0, "q")])
    with pytest.raises(SiteError, match="tuples are"):
        mechlib.path_patching(tiny_llama, tiny_ioi, ld, receivers=[(1, 0, "z")])
    with pytest.raises(SiteError, match="KV heads"):
        mechlib.path_patching(tiny_llama, tiny_ioi, ld, receivers=[Site("head_k", 1, head=3)])


# ------------------------------------------------------------------------------ VLM safety


def _llava_set(m, pixels):
    prompt = "<image> <image> <image> <image> When Mary and John went to the store, John gave a drink to"
    corrupt = "<image> <image> <image> <image> When Mary and John went to the store, Mary gave a drink to"
    return ContrastSet.from_prompts(m, [prompt, prompt], [corrupt, corrupt], [" Mary"] * 2, [" John"] * 2,
                                    extras={"pixel_values": pixels})


def test_vlm_sweeps_carry_the_image(tiny_llava):
    g = torch.Generator().manual_seed(0)
    a = _llava_set(tiny_llava, torch.randn(2, 3, 16, 16, generator=g))
    b = _llava_set(tiny_llava, torch.randn(2, 3, 16, 16, generator=g))
    ra = mechlib.activation_patching(tiny_llava, a, metrics.logit_diff(a), site="head_out")
    rb = mechlib.activation_patching(tiny_llava, b, metrics.logit_diff(b), site="head_out")
    assert not torch.allclose(ra.values, rb.values)
    full = mechlib.activation_patching(tiny_llava, a, metrics.logit_diff(a), site="head_out", resume=False)
    assert torch.allclose(full.values, ra.values, atol=1e-5)  # full forwards tile pixel_values
    at = mechlib.attribution_patching(tiny_llava, a, metrics.logit_diff(a), site="head_out")
    assert at.values.shape == ra.values.shape
    no_image = dataclasses_replace(a, extras={})
    for verb in (mechlib.activation_patching, mechlib.attribution_patching):
        with pytest.raises(hooks.MissingModelInputError, match="pixel_values"):
            verb(tiny_llava, no_image, metrics.logit_diff(no_image), site="resid_pre")
    assert hooks.active_hooks(tiny_llava) == []


def test_vlm_by_position_sweeps_reuse_a_prefix_holding_the_image(tiny_llava):
    """Positions before the patched one (image tokens included) come from the corrupted run's keys
    and values; the sweep equals full forwards that carry pixel_values."""
    g = torch.Generator().manual_seed(0)
    a = _llava_set(tiny_llava, torch.randn(2, 3, 16, 16, generator=g))
    ld = metrics.logit_diff(a)
    for site, kw in (("resid_pre", {}), ("head_out", {"by_position": True})):
        fast = mechlib.activation_patching(tiny_llava, a, ld, site=site, **kw)
        full = mechlib.activation_patching(tiny_llava, a, ld, site=site, resume=False, **kw)
        assert fast.metadata["prefix_reuse"] and not full.metadata["prefix_reuse"]
        torch.testing.assert_close(fast.values, full.values, atol=1e-5, rtol=1e-5)
    assert hooks.active_hooks(tiny_llava) == []


def dataclasses_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


# ------------------------------------------------------------------------------ bad input


def test_bad_sites_layers_heads(tiny_llama, tiny_ioi):
    ld = metrics.logit_diff(tiny_ioi)
    with pytest.raises(SiteError, match="unknown site 'resid'"):
        mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site="resid")
    with pytest.raises(SiteError, match=r"layer=7 is out of range: this model has layers 0\.\.1"):
        mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site="resid_pre", layers=[7])
    with pytest.raises(SiteError, match=r"head=5 is out of range"):
        mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site="head_out", heads=[5])
    with pytest.raises(SiteError, match="position 99"):
        mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site="resid_pre", positions=[99])
    with pytest.raises(SiteError, match="already resolved by position"):
        mechlib.activation_patching(tiny_llama, tiny_ioi, ld, site="resid_pre", by_position=True)
    with pytest.raises(TypeError, match="ContrastSet"):
        mechlib.activation_patching(tiny_llama, tiny_ioi.clean_tokens, ld, site="resid_pre")


@pytest.mark.parametrize("verb", ["activation_patching", "attribution_patching", "path_patching"])
def test_bad_metrics_leave_no_hooks_and_no_weight_change(tiny_llama, tiny_ioi, verb):
    fn = getattr(mechlib, verb)
    kw = {} if verb == "path_patching" else {"site": "head_out"}
    snap = weights_snapshot(tiny_llama)
    ld = metrics.logit_diff(tiny_ioi)
    calls = []
    later = 1 if verb == "attribution_patching" else 2  # attribution calls the metric twice

    def scalar(logits):
        return ld(logits).mean()

    def nan_later(logits):
        calls.append(1)
        out = ld(logits)
        return out * float("nan") if len(calls) > later else out

    def raises_later(logits):
        calls.append(1)
        if len(calls) > later:
            raise RuntimeError("metric failed")
        return ld(logits)

    with pytest.raises(MetricError, match=r"shape \(\)"):
        fn(tiny_llama, tiny_ioi, scalar, **kw)
    calls.clear()
    with pytest.raises(MetricError, match="NaN"):
        fn(tiny_llama, tiny_ioi, nan_later, **kw)
    calls.clear()
    with pytest.raises(RuntimeError, match="metric failed"):
        fn(tiny_llama, tiny_ioi, raises_later, **kw)
    assert hooks.active_hooks(tiny_llama) == []
    assert_weights_equal(tiny_llama, snap)
    assert all(p.grad is None for p in tiny_llama.parameters())
