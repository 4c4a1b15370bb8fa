"""The verbs on bf16/fp16 models, as the papers' settings and most users' 7B models run them.

Every exactness check mechlib makes (resumed and packed patching, DLA's frozen norm, the additivity
edge attribution needs) allows for half precision's rounding, and nothing else: here each verb runs
on tiny models of four families in bfloat16 and float16 and is compared with TransformerLens's own
function on the same half-precision model, with the float32 model's result (to a few units of the
dtype's rounding) and, for DLA, with the model's own logit difference. Tables come back float32.
A bridge that cannot run in half precision (TL 4.3's OLMo-2) is refused at load, saying what to do.
"""

from __future__ import annotations

import pytest
import torch
from transformer_lens import patching as tlp

import mechlib
from mechlib import metrics, tasks

FAMILIES = ["llama", "gpt2", "gemma3", "neox"]
DTYPES = [torch.bfloat16, torch.float16]
_FP32: dict = {}


def _fp32(family):
    """The float32 model's results (once per family) and the contrast set they share."""
    if family not in _FP32:
        m = mechlib.tiny_model(family, n_layers=3)
        cs = tasks.ioi(m, n=4, seed=0, templates=[0])
        ld = metrics.logit_diff(cs)
        _FP32[family] = dict(
            cs=cs, ld=ld,
            act=mechlib.activation_patching(m, cs, ld, site="head_out", by_position=True, progress=False).values,
            path=mechlib.path_patching(m, cs, ld, progress=False).values,
            eap=mechlib.edge_attribution(m, cs, ld, method="eap", progress=False).values)
    return _FP32[family]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_verbs_in_half_precision(family, dtype):
    ref = _fp32(family)
    cs, ld = ref["cs"], ref["ld"]
    m = mechlib.tiny_model(family, n_layers=3, dtype=dtype)
    eps = float(torch.finfo(dtype).eps)

    # activation patching (resumed, packed, read-row, column readout: all on) = TL's on this model
    act = mechlib.activation_patching(m, cs, ld, site="head_out", by_position=True, progress=False)
    assert act.values.dtype == torch.float32 and act.metadata["resumed"] and act.metadata["packed"]
    _, clean = m.run_with_cache(cs.clean_tokens)
    tl = tlp.get_act_patch_attn_head_out_by_pos(m, cs.corrupted_tokens, clean, lambda lg: ld(lg).mean())
    scale = float(ref["act"].abs().max())
    assert float((act.values - tl.float()).abs().max()) <= 4 * eps * scale
    assert float((act.values - ref["act"]).abs().max()) <= 8 * eps * scale
    assert len(act.to_dataframe()) > 0 and act.ci()[0].dtype == torch.float32  # bf16 does not reach numpy

    # path patching (used to fail writing half values into its float32 table)
    path = mechlib.path_patching(m, cs, ld, progress=False).values
    assert float((path - ref["path"]).abs().max()) <= 8 * eps * float(ref["path"].abs().max())

    # DLA: the frozen norm and the sum of terms hold to the rounding (used to be refused as non-additive)
    dla = mechlib.direct_logit_attribution(m, cs)
    with torch.no_grad():
        true = ld(m(cs.clean_tokens))
    assert true.dtype == torch.float32  # metric values are float32 whatever the logits' dtype
    assert float((dla.per_prompt.sum(-1) - true).abs().max()) <= 8 * eps * float(true.abs().max())

    # edge attribution: the additivity check allows the stream's rounding (it used to refuse)
    eap = mechlib.edge_attribution(m, cs, ld, method="eap", progress=False).values
    assert float(torch.corrcoef(torch.stack([eap, ref["eap"]]))[0, 1]) > 0.99


@pytest.mark.parametrize("dropped", ["blocks.1.hook_mlp_out", "blocks.2.hook_attn_out"])
def test_additivity_check_still_refuses_a_real_mismatch_in_half_precision(monkeypatch, dropped):
    """The rounding allowance is per element and first order: a write the decomposition misses
    (one block's output zeroed in what DLA reads, not in the model) is still refused in bfloat16."""
    from mechlib.analyses import attribution

    m = mechlib.tiny_model("llama", n_layers=3, dtype="bfloat16")
    cs = tasks.ioi(m, n=2, seed=0, templates=[0])
    mechlib.direct_logit_attribution(m, cs)  # as is: accepted
    real = attribution.hooks.run_with_cache

    def missing_one(model, tokens, names, **kw):
        logits, acts = real(model, tokens, names, **kw)
        return logits, {**acts, dropped: acts[dropped] * 0}

    monkeypatch.setattr(attribution.hooks, "run_with_cache", missing_one)
    with pytest.raises(NotImplementedError, match="not the sum"):
        mechlib.direct_logit_attribution(m, cs)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_bridge_that_cannot_run_in_half_precision_is_refused_at_load(dtype):
    """TransformerLens 4.3 applies OLMo-2's rotary embedding in float32 and never casts back, so a
    half-precision OLMo-2 fails in its first attention; mechlib says so at load, with the fix."""
    with pytest.raises(mechlib.ModelLoadError, match=r"does not run in torch\.(bfloat16|float16).*float32"):
        mechlib.tiny_model("olmo2", dtype=dtype)
    assert mechlib.tiny_model("olmo2").cfg.dtype == torch.float32
