import pytest
import torch

from mechlib import hooks, sites
from mechlib.sites import Site, SiteError

from conftest import assert_weights_equal, weights_snapshot


def test_unknown_site_suggests(tiny_llama):
    with pytest.raises(SiteError, match="Did you mean 'resid_pre'"):
        sites.site_spec("resid_pr")
    with pytest.raises(SiteError, match="Known sites"):
        Site("banana", 0)


def test_layer_and_head_ranges(tiny_llama):
    with pytest.raises(SiteError, match=r"layers 0\.\.1"):
        Site("resid_pre", 2).validate(tiny_llama)
    with pytest.raises(SiteError, match=r"heads 0\.\.3"):
        Site("head_out", 0, head=4).validate(tiny_llama)
    with pytest.raises(SiteError, match=r"KV heads 0\.\.1"):
        Site("head_k", 0, head=2).validate(tiny_llama)  # GQA: 2 KV heads
    assert Site("head_q", -1, head=-1).validate(tiny_llama) == Site("head_q", 1, head=3)
    with pytest.raises(SiteError, match="no head axis"):
        Site("resid_pre", 0, head=1)


def test_every_site_hook_exists_with_expected_head_axis(tiny_llama):
    tokens = tiny_llama.to_tokens("Mary gave a drink to")
    names = [spec.hook_name(1) for spec in sites.SITES.values()]
    _, acts = hooks.run_with_cache(tiny_llama, tokens, names)
    for kind, spec in sites.SITES.items():
        a = acts[spec.hook_name(1)]
        if spec.per_head:
            assert a.shape[spec.head_dim] == sites.n_heads(tiny_llama, kind), kind


def test_capture_matches_transformerlens_cache(model):
    tokens = model.to_tokens("The capital of France is")
    names = ["blocks.3.hook_resid_pre", "blocks.5.attn.hook_z", "blocks.7.attn.hook_pattern"]
    logits, ours = hooks.run_with_cache(model, tokens, names)
    ref_logits, ref = model.run_with_cache(tokens, names_filter=names)
    assert torch.allclose(logits, ref_logits)
    assert set(ours) == set(names)
    for n in names:
        assert torch.equal(ours[n], ref[n])


def test_attach_removes_exactly_its_hooks_even_on_error(tiny_llama):
    tokens = tiny_llama.to_tokens("Mary gave a drink to")
    user_calls = []
    hp = tiny_llama.hook_dict["blocks.0.hook_resid_pre"]
    user_handle = hp.add_hook(lambda x, hook: user_calls.append(1))
    before = hooks.active_hooks(tiny_llama)
    snap = weights_snapshot(tiny_llama)

    def boom(x, hook):
        raise RuntimeError("metric exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        hooks.forward(tiny_llama, tokens, hooks=[("blocks.1.attn.hook_z", boom),
                                                 ("blocks.0.hook_resid_pre", lambda x, hook: x * 2)])
    assert hooks.active_hooks(tiny_llama) == before  # ours gone, the user's kept
    tiny_llama(tokens)
    assert user_calls  # the user's hook still fires
    user_handle.hook.remove()
    hp.fwd_hooks.remove(user_handle)
    assert hooks.active_hooks(tiny_llama) == []
    assert_weights_equal(tiny_llama, snap)


def test_hooks_must_fire(tiny_llama):
    with pytest.raises(hooks.HookNotFiredError, match="never fired"):
        with hooks.attach(tiny_llama, [("blocks.1.hook_resid_post", lambda x, hook: x)]):
            pass  # no forward ran
    assert hooks.active_hooks(tiny_llama) == []
    with hooks.attach(tiny_llama, [("blocks.1.hook_resid_post", lambda x, hook: x)], must_fire=False):
        pass


def test_unknown_hook_name_is_refused_before_adding_anything(tiny_llama):
    with pytest.raises(KeyError, match="Close names"):
        with hooks.attach(tiny_llama, [("blocks.0.hook_resid_pre", lambda x, hook: x),
                                       ("blocks.0.hook_resid_pree", lambda x, hook: x)]):
            pass
    assert hooks.active_hooks(tiny_llama) == []


def test_patch_hook_changes_output_only_while_active(tiny_llama):
    tokens = tiny_llama.to_tokens("Mary gave a drink to")
    base = hooks.forward(tiny_llama, tokens)
    patched = hooks.forward(tiny_llama, tokens, hooks=[("blocks.0.hook_resid_pre", lambda x, hook: x * 0)])
    assert not torch.allclose(base, patched)
    assert torch.allclose(hooks.forward(tiny_llama, tokens), base)


def test_paused_silences_the_hooks_attached_before_it_only(tiny_llama):
    m, tokens = tiny_llama, torch.tensor([[1, 2, 3, 4]])
    plain = hooks.forward(m, tokens)
    zero = [("blocks.0.hook_resid_pre", lambda x, hook: x * 0)]
    with hooks.attach(m, zero) as fired:
        edited = hooks.forward(m, tokens)
        with hooks.paused(m):
            torch.testing.assert_close(hooks.forward(m, tokens), plain)  # the edit does nothing here
            assert fired["blocks.0.hook_resid_pre"] == 1  # and is not counted
            torch.testing.assert_close(hooks.forward(m, tokens, hooks=zero), edited)  # a hook added inside runs
            with hooks.paused(m):  # nested
                torch.testing.assert_close(hooks.forward(m, tokens), plain)
            torch.testing.assert_close(hooks.forward(m, tokens), plain)
        with pytest.raises(RuntimeError), hooks.paused(m):
            raise RuntimeError("inside")
        torch.testing.assert_close(hooks.forward(m, tokens), edited)  # active again after the block
    assert not torch.allclose(edited, plain)
    assert hooks.active_hooks(m) == []


def test_multimodal_model_without_pixels_is_refused(tiny_llava):
    tokens = tiny_llava.to_tokens("<image> <image> <image> <image> Mary gave a drink to")
    with pytest.raises(hooks.MissingModelInputError, match="pixel_values"):
        hooks.forward(tiny_llava, tokens)
    g = torch.Generator().manual_seed(0)
    a = hooks.forward(tiny_llava, tokens, extras={"pixel_values": torch.randn(1, 3, 16, 16, generator=g)})
    b = hooks.forward(tiny_llava, tokens, extras={"pixel_values": torch.randn(1, 3, 16, 16, generator=g)})
    assert not torch.allclose(a, b)  # the image really reaches the language model
