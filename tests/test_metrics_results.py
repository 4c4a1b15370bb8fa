import math

import pytest
import torch

import mechlib
from mechlib import ContrastSet, Result, metrics
from mechlib.results import atomic_write_bytes


@pytest.fixture(scope="module")
def cs(tiny_llama):
    return ContrastSet.from_prompts(
        tiny_llama,
        ["When Mary and John went to the store, John gave a drink to", "Mary gave a drink to"],
        ["When Mary and John went to the store, Mary gave a drink to", "John gave a drink to"],
        [" Mary", " John"], [" John", " Mary"],
    )


def test_logit_diff_reads_each_prompts_last_token(cs):
    logits = torch.randn(2, cs.n_pos, 300)
    got = metrics.logit_diff(cs)(logits)
    for i in range(2):
        p = int(cs.last_pos[i])
        want = logits[i, p, cs.answer_ids[i]] - logits[i, p, cs.wrong_ids[i]]
        assert torch.isclose(got[i], want)
    stacked = torch.cat([logits, logits * 2])  # k=2 copies, copy-major
    assert torch.allclose(metrics.logit_diff(cs)(stacked), torch.cat([got, got * 2]))
    with pytest.raises(metrics.MetricError, match="not a multiple"):
        metrics.logit_diff(cs)(torch.randn(3, cs.n_pos, 300))


def test_answer_prob_and_kl(cs):
    logits = torch.randn(2, cs.n_pos, 300)
    p = metrics.answer_prob(cs)(logits)
    assert ((p > 0) & (p < 1)).all()
    kl = metrics.kl_to_clean(cs, logits)
    assert torch.allclose(kl(logits), torch.zeros(2), atol=1e-6)
    assert (kl(torch.randn(2, cs.n_pos, 300)) < 0).all()


def test_metric_value_checks():
    with pytest.raises(metrics.MetricError, match=r"shape \(\)"):
        metrics.check_metric_values(torch.tensor(1.0), 4)
    with pytest.raises(metrics.MetricError, match=r"NaN/inf for prompts \[1\]"):
        metrics.check_metric_values(torch.tensor([0.0, math.nan]), 2)
    with pytest.raises(metrics.MetricError, match="coincide"):
        metrics.normalized(torch.tensor(1.0), 2.0, 2.0)
    assert metrics.normalized(torch.tensor(1.5), 2.0, 1.0) == 0.5


def _result():
    g = torch.Generator().manual_seed(0)
    per = torch.randn(6, 3, 4, generator=g)
    return Result(values=per.mean(0), axis_names=("layer", "head"), per_prompt=per,
                  labels={"head": [f"H{i}" for i in range(4)]}, baselines={"clean": 2.5},
                  metadata={"model": "tiny", "site": "head_out"})


def test_result_table_top_and_ci():
    r = _result()
    df = r.to_dataframe()
    assert len(df) == 12 and {"layer", "head_label", "value", "stderr"} <= set(df.columns)
    top = r.top(3)
    assert top["value"].tolist() == sorted(r.values.flatten().tolist(), reverse=True)[:3]
    lo, hi = r.ci()
    assert (lo <= r.values + 1e-6).all() and (r.values <= hi + 1e-6).all()
    assert "head=4" in repr(r) and "<b>" in r._repr_html_()


def test_results_over_some_layers_are_addressed_by_layer_number():
    per = torch.arange(6 * 3 * 2, dtype=torch.float32).reshape(6, 3, 2)
    r = Result(values=per.mean(0), axis_names=("layer", "head"), per_prompt=per,
               labels={"layer": ["L3", "L5", "L9"], "head": ["H0", "H1"]})
    assert torch.equal(r.select("layer", 5).values, r.values[1])  # layer 5 is the second entry
    assert torch.equal(r.select("layer", "L9").values, r.values[2]) and r.locate("layer", -1) == 2
    assert r.select("layer", 9).metadata["selected"] == {"layer": "L9"} and r.locate("layer", torch.tensor(9)) == 2
    assert torch.equal(r.select("head", 1).per_prompt, per[:, :, 1]) and r.locate("head", "H1") == 1
    df = r.to_dataframe()
    assert df["layer"].tolist() == [3, 3, 5, 5, 9, 9] and df["layer_label"].tolist()[2] == "L5"
    assert r.top(1)["layer"].tolist() == [9]  # the largest value sits in layer 9, not "layer 2"
    with pytest.raises(ValueError, match="no layer 4: its layers are L3, L5, L9"):
        r.select("layer", 4)
    with pytest.warns(UserWarning, match="reading 1 as the position of L5"):
        assert torch.equal(r.select("layer", 1).values, r.values[1])
    with pytest.raises(ValueError, match="head position 2 is out of range"):
        r.select("head", 2)
    with pytest.raises(ValueError, match="no axis 'pos'"):
        r.select("pos", 0)
    with pytest.raises(TypeError, match="label"):
        r.locate("layer", 1.5)
    # labels that are not layer numbers (the logit lens's residual points): integers are positions
    lens = Result(values=torch.zeros(3), axis_names=("layer",), labels={"layer": ["0_pre", "1_pre", "final_post"]})
    assert lens.locate("layer", 2) == 2 and lens.to_dataframe()["layer"].tolist() == [0, 1, 2]
    # an axis labelled by numbers (a faithfulness curve's circuit sizes): an integer is the number
    curve = Result(values=torch.tensor([0.2, 0.5, 0.9]), axis_names=("size",), labels={"size": ["30", "100", "300"]})
    assert curve.locate("size", 300) == 2 and float(curve.select("size", 100).values) == 0.5
    with pytest.raises(ValueError, match="no size 50: its sizes are 30, 100, 300"):
        curve.locate("size", 50)
    with pytest.warns(UserWarning, match="reading 1 as the position of 100"):
        assert curve.locate("size", 1) == 1


def test_a_verb_over_chosen_layers_reports_layer_numbers(tiny_llama):
    prompts = ["When Mary and John went to the store, John gave a drink to", "Mary gave a drink to John"]
    r = mechlib.attention_sinks(tiny_llama, prompts, layers=[1])
    assert r.select("layer", 1).values.shape == (tiny_llama.cfg.n_heads,)
    assert set(r.to_dataframe()["layer"]) == {1}


def test_result_validates_shapes():
    with pytest.raises(ValueError, match="axis_names"):
        Result(values=torch.zeros(2, 2), axis_names=("layer",))
    with pytest.raises(ValueError, match="labels"):
        Result(values=torch.zeros(2), axis_names=("layer",), labels={"layer": ["a"]})


def test_save_load_roundtrip_without_pickle(tmp_path):
    r = _result()
    path = r.save(tmp_path / "r.safetensors")
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    back = Result.load(path)
    assert torch.equal(back.values, r.values) and torch.equal(back.per_prompt, r.per_prompt)
    assert back.axis_names == r.axis_names and back.labels == r.labels
    assert back.baselines == r.baselines and back.metadata == r.metadata
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]  # no temp files left


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.bin"
    path.write_bytes(b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_plot_returns_a_figure():
    import matplotlib

    matplotlib.use("Agg")
    r = _result()
    fig = r.plot()
    assert fig.axes and fig.axes[0].get_title()
    fig1d = r.select("layer", 0).plot()
    assert fig1d.axes[0].get_xlabel() == "head"
    with pytest.raises(ValueError, match="select"):
        Result(values=torch.zeros(2, 2, 2), axis_names=("a", "b", "c")).plot()


def test_load_rejects_foreign_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "f.safetensors"))
    with pytest.raises(ValueError, match="not a mechlib result"):
        Result.load(tmp_path / "f.safetensors")


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    from mechlib.results import bootstrap_ci

    g = torch.Generator().manual_seed(1)
    small, big = torch.randn(20, generator=g) + 1.0, torch.randn(2000, generator=g) + 1.0
    lo_s, hi_s = bootstrap_ci(small)
    lo_b, hi_b = bootstrap_ci(big, n_boot=300)
    assert lo_s < float(small.mean()) < hi_s and lo_b < float(big.mean()) < hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) and lo_b < 1.0 < hi_b
    assert bootstrap_ci(torch.ones(5)) == (1.0, 1.0)
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_ci(torch.ones(1))


def test_results_remember_how_they_were_made(tmp_path, tiny_llama):
    import warnings

    r = mechlib.attention_sinks(tiny_llama, ["Mary gave a drink to John"], epsilon=0.2)
    prov = r.provenance
    assert prov["verb"] == "attention_sinks" and prov["arguments"] == {"epsilon": 0.2}
    assert prov["model"] == "tiny-llama" and len(prov["weights"]) == 16 and prov["versions"]["torch"]
    back = mechlib.Result.load(r.save(tmp_path / "r.safetensors"), model=tiny_llama)
    assert back.provenance == prov and "attention_sinks on tiny-llama" in back.summary()
    other = mechlib.tiny_model("llama", seed=9)
    with pytest.warns(UserWarning, match="not with this model"):
        mechlib.Result.load(tmp_path / "r.safetensors", model=other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mechlib.Result.load(tmp_path / "r.safetensors", model=tiny_llama)
    again = mechlib.attention_sinks(tiny_llama, ["Mary gave a drink to"], epsilon=0.2)
    assert again.provenance["inputs"] != prov["inputs"]


def test_statistics_from_scipy():
    from mechlib import stats

    x = torch.tensor([0.5, 1.0, 1.5, 0.7, 1.2, 0.9, 1.1, 0.8])
    lo, hi = stats.bootstrap_ci(x)
    assert lo < float(x.mean()) < hi
    assert stats.bootstrap_ci(torch.ones(4)) == (1.0, 1.0)  # degenerate: the interval collapses
    # exact sign-flip p-value: all 8 positive -> only the all-positive and all-negative flips are as extreme
    assert stats.sign_flip_pvalue(x) == pytest.approx(2 / 2 ** 8)
    e = stats.paired(torch.zeros(8), x)
    assert e.mean == pytest.approx(float(x.mean())) and e.p == pytest.approx(2 / 256)
    assert stats.empirical_p(3.0, [1.0, 2.0, 4.0]) == pytest.approx(2 / 4)


def test_random_head_sets_and_comparison(tiny_llama):
    heads = [(0, 1), (1, 2), (1, 3)]
    sets = mechlib.random_head_sets(tiny_llama, heads, n=5, seed=1)
    assert len(sets) == 5 and all(len(s) == 3 for s in sets)
    for s in sets:
        assert not set(s) & set(heads)
        assert sorted(l for l, _ in s) == [0, 1, 1]  # depth matched
    assert mechlib.random_head_sets(tiny_llama, heads, n=5, seed=1) == sets
    cmp = mechlib.compare_with_random(lambda hs: float(sum(h for _, h in hs)), heads, sets)
    assert cmp.values[0] == 6.0 and cmp.p == pytest.approx((1 + int((cmp.random >= 6).sum())) / 6)
    crowded = mechlib.random_head_sets(tiny_llama, [(0, h) for h in range(3)], n=3, seed=0)  # 3 of layer 0's 4 heads
    assert all(sum(l == 0 for l, _ in s) == 1 and sum(l == 1 for l, _ in s) == 2 for s in crowded)  # nearest layer fills in


def test_evaluate_from_a_late_layer_equals_the_full_forward():
    m = mechlib.tiny_model("llama", n_layers=4)
    cs = mechlib.tasks.ioi(m, n=4, seed=0)
    ld = metrics.logit_diff(cs)
    torch.testing.assert_close(metrics.evaluate(m, cs, ld, start_layer=2), metrics.evaluate(m, cs, ld))
    with mechlib.scale_heads(m, [(3, 1)], 0.0):
        edited = metrics.evaluate(m, cs, ld)
        torch.testing.assert_close(metrics.evaluate(m, cs, ld, start_layer=2), edited)
    assert not torch.allclose(edited, metrics.evaluate(m, cs, ld))
    with pytest.raises(ValueError, match="before start_layer"), mechlib.scale_heads(m, [(1, 1)], 0.0):
        metrics.evaluate(m, cs, ld, start_layer=2)


def test_evaluate_from_pos_refuses_what_it_cannot_make_exact():
    m = mechlib.tiny_model("llama", n_layers=4)
    cs = mechlib.tasks.ioi(m, n=4, seed=0, templates=[0])
    ld = metrics.logit_diff(cs)
    last = int(cs.last_pos.min())
    keys = torch.zeros(len(cs), cs.n_pos, dtype=torch.bool)
    keys[:, 1] = True
    with pytest.raises(ValueError, match="needs start_layer"):
        metrics.evaluate(m, cs, ld, from_pos=last)
    with pytest.raises(ValueError, match="reads the last token only"):
        metrics.evaluate(m, cs, lambda logits: ld(logits), start_layer=2, from_pos=last)
    with pytest.raises(ValueError, match="must lie in"):
        metrics.evaluate(m, cs, ld, start_layer=2, from_pos=last + 1)
    with mechlib.scale_heads(m, [(3, 1)], 0.0), pytest.raises(ValueError, match="not from an edit"):
        metrics.evaluate(m, cs, ld, start_layer=2, from_pos=last)
    # steering a query the forward does not recompute would be dropped: the edit raises instead
    with mechlib.steer_attention(m, [(3, 0)], keys, query_pos=torch.full((len(cs),), 3)), \
            pytest.raises(ValueError, match="before the first position"):
        metrics.evaluate(m, cs, ld, start_layer=2, from_pos=last)
    assert mechlib.hooks.active_hooks(m) == []


@pytest.mark.embedded
def test_evaluate_from_the_last_position_on_the_embedded_model(model):
    """Notebook 05's repair evaluation: steering heads at the last query of Colored Objects prompts,
    recomputing only that position from the first steered layer on, equals the full forward."""
    cs = mechlib.tasks.colored_objects(model, n=8, seed=3)
    acc = metrics.accuracy(cs, among="options")
    ld = metrics.logit_diff(cs)
    heads = [(9, 3), (12, 0), (20, 5)]
    plain = metrics.evaluate(model, cs, ld)
    with mechlib.steer_attention(model, heads, cs.option_positions(3), query_pos=cs.last_pos):
        full = metrics.evaluate(model, cs, ld)
        fast = metrics.evaluate(model, cs, ld, start_layer=9, from_pos=int(cs.last_pos.min()))
        torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(metrics.evaluate(model, cs, acc, start_layer=9, from_pos=int(cs.last_pos.min())),
                                   metrics.evaluate(model, cs, acc))
    assert float((full - plain).abs().max()) > 1e-2


def test_to_plotly_has_hover_labels():
    pytest.importorskip("plotly")
    r = Result(values=torch.tensor([[1.0, -2.0], [0.5, 0.0]]), axis_names=("layer", "head"),
               labels={"layer": ["L0", "L1"], "head": ["H0", "H1"]})
    fig = r.to_plotly()
    assert list(fig.data[0].x) == ["H0", "H1"] and list(fig.data[0].y) == ["L0", "L1"]
    assert "layer %{y}" in fig.data[0].hovertemplate
    line = Result(values=torch.tensor([1.0, 2.0]), axis_names=("layer",)).to_plotly()
    assert list(line.data[0].y) == [1.0, 2.0]


def test_next_token_loss_is_each_prompts_mean_cross_entropy(tiny_llama):
    """From the definition, one prompt and one position at a time (prompts of different lengths:
    padding neither counted nor read), and the same for any batch size."""
    prompts = ["When Mary and John went to the store, John gave a drink to", "Mary gave a drink to", "The cat"]
    got = metrics.next_token_loss(tiny_llama, prompts)
    for i, text in enumerate(prompts):
        toks = tiny_llama.to_tokens(text)
        logp = torch.log_softmax(tiny_llama(toks)[0].double(), -1)
        want = -torch.stack([logp[p, toks[0, p + 1]] for p in range(toks.shape[1] - 1)]).mean()
        assert math.isclose(float(got[i]), float(want), rel_tol=1e-5), (i, float(got[i]), float(want))
    torch.testing.assert_close(metrics.next_token_loss(tiny_llama, prompts, batch_size=1), got, atol=1e-6, rtol=1e-6)
