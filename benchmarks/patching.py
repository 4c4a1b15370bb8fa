"""Patching speed: TransformerLens 4.3 vs mechlib, same inputs, one process, as ratios.

    python benchmarks/patching.py            # both embedded models, one 15-token IOI prompt
    python benchmarks/patching.py --models smollm2-135m --n 8
    python benchmarks/patching.py --full     # also TL's full head-out-by-position sweep (~11 min)

Prints, per model and sweep: seconds for TL and for mechlib, the speed ratio, max |difference| of
the two tables, and the peak extra memory of each call (the kernel's RSS high-water mark on the
CPU, the allocator's peak on CUDA; :mod:`mechlib.memory`). Timings on shared machines are noisy;
the ratio within one run is the figure to read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mechlib  # noqa: E402
from mechlib import metrics, tasks  # noqa: E402

DEVICE = None


def measure(fn):
    """(result, seconds, peak extra memory in MiB) of fn()."""
    from mechlib.memory import peak_memory

    with peak_memory(DEVICE) as mem:
        t0 = time.perf_counter()
        out = fn()
        secs = time.perf_counter() - t0
    return out, secs, mem["peak_extra_mib"] or 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1, help="IOI prompts")
    ap.add_argument("--full", action="store_true", help="run TL's full by-position head sweep")
    ap.add_argument("--device", default=None)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device or mechlib.models.default_device()
    torch.set_grad_enabled(False)
    for name in args.models:
        bench_model(name, args)
    return 0


def bench_model(name, args) -> None:
    from transformer_lens import patching as tlp

    torch.manual_seed(0)
    model = mechlib.load_model(name, device=args.device)
    cs = tasks.ioi(model, n=args.n, seed=0, templates=[15])  # "When A and B went to the P, ..." (15 tokens)
    ld = metrics.logit_diff(cs)
    tl_metric = lambda logits: ld(logits).mean()  # noqa: E731
    print(f"\nmodel: {name} ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads, vocab {model.cfg.d_vocab}) on "
          f"{model.cfg.device}; {len(cs)} IOI prompt(s) of {cs.n_pos} tokens; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    _, clean_cache = model.run_with_cache(cs.clean_tokens)
    rows = []

    def compare(label, tl_call, ours_call, permute=None):
        ref, t_tl, m_tl = measure(tl_call)
        ours, t_ours, m_ours = measure(ours_call)
        ref = ref.permute(*permute) if permute else ref
        diff = float((ours.values - ref.cpu()).abs().max())
        rows.append((label, t_tl, t_ours, t_tl / t_ours, diff, m_tl, m_ours))
        print(f"{label:<34} TL {t_tl:7.1f} s   mechlib {t_ours:6.1f} s   ratio {t_tl / t_ours:5.1f}x   "
              f"max|diff| {diff:.1e}   peak extra memory TL {m_tl:6.0f} MiB / mechlib {m_ours:6.0f} MiB", flush=True)
        return ours

    compare("head_out, all positions [L,H]",
            lambda: tlp.get_act_patch_attn_head_out_all_pos(model, cs.corrupted_tokens, clean_cache, tl_metric),
            lambda: mechlib.activation_patching(model, cs, ld, site="head_out", progress=False))
    compare("resid_pre by position [L,pos]",
            lambda: tlp.get_act_patch_resid_pre(model, cs.corrupted_tokens, clean_cache, tl_metric),
            lambda: mechlib.activation_patching(model, cs, ld, site="resid_pre", progress=False))
    if args.full:
        compare("head_out by position [L,pos,H]",
                lambda: tlp.get_act_patch_attn_head_out_by_pos(model, cs.corrupted_tokens, clean_cache, tl_metric),
                lambda: mechlib.activation_patching(model, cs, ld, site="head_out", by_position=True, progress=False))
    else:
        # TL on three layers only (its per-cell cost is flat), mechlib on the same cells
        import pandas as pd

        L = model.cfg.n_layers
        layers = [0, L // 2, L - 1]
        idx = pd.DataFrame([(l, p, h) for l in layers for p in range(cs.n_pos) for h in range(model.cfg.n_heads)],
                           columns=["layer", "pos", "head"])
        def tl_sub():
            flat = tlp.generic_activation_patch(
                model, cs.corrupted_tokens, clean_cache, tl_metric, tlp.layer_pos_head_vector_patch_setter,
                "z", index_df=idx)
            return flat.reshape(len(layers), cs.n_pos, model.cfg.n_heads)
        compare("head_out by position, 3 layers",
                tl_sub, lambda: mechlib.activation_patching(model, cs, ld, site="head_out", by_position=True,
                                                            layers=layers, progress=False))
        full, t_full, _ = measure(lambda: mechlib.activation_patching(model, cs, ld, site="head_out",
                                                                      by_position=True, progress=False))
        t_tl_est = rows[-1][1] * L / len(layers)  # TL's per-cell cost is flat
        print(f"{'head_out by position, all layers':<34} mechlib {t_full:6.1f} s (TL estimated {t_tl_est:.0f} s "
              f"from its 3-layer time: {t_tl_est / t_full:.1f}x)")

    # attribution patching: speed and agreement with exact patching
    attr, t_attr, m_attr = measure(lambda: mechlib.attribution_patching(model, cs, ld, site="resid_pre"))
    exact, t_exact, _ = measure(lambda: mechlib.activation_patching(model, cs, ld, site="resid_pre", progress=False))
    r = torch.corrcoef(torch.stack([attr.values.flatten(), exact.values.flatten()]))[0, 1]
    print(f"{'attribution patching resid_pre':<34} {t_attr:6.2f} s vs exact {t_exact:6.1f} s "
          f"({t_exact / t_attr:.0f}x faster); correlation with exact r = {r:.3f}; peak extra {m_attr:.0f} MiB")
    attr_h = mechlib.attribution_patching(model, cs, ld, site="head_out")
    exact_h = mechlib.activation_patching(model, cs, ld, site="head_out", progress=False)
    rh = torch.corrcoef(torch.stack([attr_h.values.flatten(), exact_h.values.flatten()]))[0, 1]
    print(f"{'attribution patching head_out':<34} correlation with exact r = {rh:.3f}")
    bench_edges(model, args)


def bench_edges(model, args) -> None:
    """EAP-IG over every edge on 8 IOI prompts, as a multiple of one forward and against exact edge
    patching of the same edges (measured on a sample and scaled)."""
    ioi8 = tasks.ioi(model, n=8, seed=0)
    ld8 = metrics.logit_diff(ioi8)
    _, t_fwd, _ = measure(lambda: model(ioi8.clean_tokens))
    _, t_fwd, _ = measure(lambda: model(ioi8.clean_tokens))   # warm
    scores, t_ig, m_ig = measure(lambda: mechlib.edge_attribution(model, ioi8, ld8, ig_steps=5))
    n = scores.spec.n_edges
    sample = [scores.labels["edge"][i] for i in torch.randperm(n, generator=torch.Generator().manual_seed(0))[:64].tolist()]
    _, t_ex, _ = measure(lambda: mechlib.edge_attribution(model, ioi8, ld8, method="exact", edges=sample))
    t_all_exact = t_ex / len(sample) * n
    print(f"{'EAP-IG (5 steps), all edges, 8 prompts':<34} {t_ig:6.1f} s for {n:,} edges = {t_ig / t_fwd:.0f} forwards; "
          f"exact patching of the same edges ≈ {t_all_exact:,.0f} s (from {len(sample)} edges): {t_all_exact / t_ig:,.0f}x; "
          f"peak extra {m_ig:.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
