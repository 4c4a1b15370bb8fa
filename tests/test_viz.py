"""Explorers (ipywidgets with a static fallback) and the offline attention view."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

import mechlib  # noqa: E402
from mechlib import hooks, viz  # noqa: E402

PROMPTS = ["When Mary and John went to the store , John gave a drink to",
           "The capital of France is Paris . The capital of Italy is"]


def _axes_image(fig):
    return fig.axes[0].images[0].get_array()


def test_attention_explorer_shows_the_cached_pattern(model):
    ex = viz.attention_explorer(model, PROMPTS, layers=[0, 3], max_tokens=8)
    assert set(ex.controls) == {"prompt", "layer", "head"} and len(ex.controls["layer"]) == 2
    fig = ex.figure(prompt=1, layer=3, head=2)
    _, acts = hooks.run_with_cache(model, model.to_tokens(PROMPTS[1]), ["blocks.3.attn.hook_pattern"])
    want = acts["blocks.3.attn.hook_pattern"][0, 2, -8:, -8:]
    torch.testing.assert_close(torch.as_tensor(_axes_image(fig)), want.float(), atol=1e-6, rtol=1e-5)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()][-1] == model.tokenizer.decode(
        [int(model.to_tokens(PROMPTS[1])[0, -1])])
    with pytest.raises(ValueError, match="layer=5"):
        ex.figure(layer=5)
    with pytest.raises(ValueError, match="unknown control"):
        ex.figure(colour="red")
    assert hooks.active_hooks(model) == []


def test_static_fallback_and_widget(model, monkeypatch):
    ex = viz.attention_explorer(model, PROMPTS[:1], layers=[1])
    monkeypatch.setenv("MECHLIB_STATIC_VIEWS", "1")
    bundle = ex._repr_mimebundle_()
    assert viz._WIDGET_MIME not in bundle and "data:image/png;base64," in bundle["text/html"]
    assert "layer = L1" in bundle["text/html"]
    monkeypatch.delenv("MECHLIB_STATIC_VIEWS")
    monkeypatch.setattr(viz, "widget_frontend", lambda: True)
    bundle = ex._repr_mimebundle_()
    assert viz._WIDGET_MIME in bundle and "data:image/png" in bundle["text/html"]  # fallback kept
    w = ex.widget()
    head = w.children[1].children[2]
    head.value = 4  # the dropdown drives the selection and redraws
    assert ex.selection["head"] == 4


def test_patching_and_lens_explorers(model):
    ioi = mechlib.tasks.ioi(model, n=2, seed=0, templates=[15])
    ld = mechlib.metrics.logit_diff(ioi)
    r = mechlib.activation_patching(model, ioi, ld, site="resid_pre", layers=[0, 10])
    ex = viz.patching_explorer({"resid": r})
    fig = ex.figure(view="normalized")
    torch.testing.assert_close(torch.as_tensor(_axes_image(fig)), r.normalized().values.float())
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(r.labels["pos"])
    heads = mechlib.activation_patching(model, ioi, ld, site="head_out", layers=[0], by_position=True)
    with pytest.raises(ValueError, match="2-D"):
        viz.patching_explorer(heads)
    lens = viz.lens_explorer(model, ["The capital of France is"], tokens=[" Paris"])
    assert lens.controls["token"][0][1] == " Paris"
    fig = lens.figure(token=" Paris")
    want = lens.lens.per_prompt[0, :, 0]
    torch.testing.assert_close(torch.as_tensor(fig.axes[0].lines[0].get_ydata()).float(), want)


def test_effects_plot_draws_each_effect_with_its_interval():
    import matplotlib.pyplot as plt

    from mechlib.stats import Effect

    fig = viz.effects_plot({"a": Effect(1.0, 0.5, 1.5, 0.01), "b": Effect(-0.2, -0.4, 0.1, 0.3)},
                           color=lambda n: "C3" if n == "a" else "C0", title="t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"] and ax.get_title() == "t"
    bars = [c for c in ax.containers]
    assert len(bars) == 2 and bars[0].lines[0].get_xdata()[0] == 1.0
    plt.close(fig)


def test_vlm_or_tiny_gives_the_tiny_llava_without_cuda():
    import torch

    vlm, loaded = mechlib.models.vlm_or_tiny("llava-1.5-7b", tiny_layers=4)
    assert not loaded or torch.cuda.is_available()
    if not loaded:
        assert vlm.cfg.n_layers == 4 and vlm.cfg.is_multimodal
