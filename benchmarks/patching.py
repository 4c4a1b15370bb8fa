"""Patching speed: TransformerLens 4.3 vs mechlib, same inputs, one process, as ratios — and how
close mechlib runs to the machine's limit.

    python benchmarks/patching.py                       # SmolLM2 at 1, 4, 16 prompts; Gemma 3 at 1, 4
    python benchmarks/patching.py --models smollm2-135m --n 4
    python benchmarks/patching.py --device cuda         # the same on a GPU

Two contrast sets of IOI prompts (template 15, 15 tokens): the default S2 swap, whose clean and
corrupted prompts first differ at S2 (position 10), at every prompt count; and ``abc`` (all three
names replaced, first difference at position 2) at ``--early-n`` prompts. mechlib skips every cell
whose patch changes nothing and recomputes each patch from its first changed position, so its gain
depends on where the contrast set's prompts first differ — each line names that position.

Per model, contrast set and prompt count, for each sweep: seconds for TL and for mechlib and their
ratio (a mechlib sweep under ``SHORT`` seconds is run three times and the median taken); the FLOPs TL's sweep does over the FLOPs mechlib's does (one full forward per cell vs
mechlib's patched rows plus its fixed clean, corrupted and key/value passes: the ceiling of the
ratio if both ran at the same throughput); mechlib's achieved throughput as a fraction of the
machine's own float32 matmul peak (:func:`mechlib.flops.matmul_peak`), measured just before and
just after that sweep and the higher of the two taken (a shared machine's peak drifts by 2x over
a run: one reading at the start would flatter or shame every later line); the
largest difference of the two tables; and the peak extra memory of each (the allocator's high-water
mark on CUDA; on the CPU the kernel's RSS high-water mark, reset before each call —
:mod:`mechlib.memory`).

TL's sweeps cost the same per cell (one full forward each), so where TL would take more than
``--tl-budget`` forwards it runs on three layers (first, middle, last) and its time is scaled to all
layers; such lines say "est." and the difference is measured on those three layers. Above
``--by-position-layers-up-to`` prompts the head-by-position sweep runs on those three layers on both
sides (like for like, no scaling).
Per model, a yardstick for the fraction of peak: the model's own forward on one 64 x 64 batch, no
patching, read against the peak the same way — what its blocks reach with their element-wise work
(norms, rotary, softmax, copies) between the matmuls, and so the most a sweep made of them can reach.
Timings on shared machines are noisy; the ratio within one run is the figure to read.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import mechlib  # noqa: E402
from mechlib import metrics, tasks  # noqa: E402
from mechlib.flops import matmul_peak  # noqa: E402

DEVICE = None
ROWS: list[dict] = []
CEILING: dict[str, tuple] = {}  # model -> its plain forward's fraction of peak, the peak, its FLOP/s; the sustained rate
SUSTAIN = 8.0  # seconds of back-to-back products in the sustained matmul rate
SHORT = 10.0  # seconds: mechlib's sweeps shorter than this are timed three times and the median taken


def measure(fn):
    """(result, seconds, peak extra memory in MiB) of fn()."""
    from mechlib.memory import peak_memory

    with peak_memory(DEVICE) as mem:
        t0 = time.perf_counter()
        out = fn()
        if DEVICE is not None and torch.device(DEVICE).type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    return out, secs, mem["peak_extra_mib"] or 0.0


def machine() -> str:
    if DEVICE is not None and torch.device(DEVICE).type == "cuda":
        return torch.cuda.get_device_name(torch.device(DEVICE))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=None, help="IOI prompts per forward (default 1 4 16)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma-3-270m"])
    ap.add_argument("--tl-budget", type=int, default=300, help="most full forwards TL runs per sweep before "
                                                                 "it is timed on three layers and scaled")
    ap.add_argument("--by-position-layers-up-to", type=int, default=4,
                    help="above this many prompts, the head-by-position sweep runs on three layers (both sides)")
    ap.add_argument("--early-n", type=int, nargs="*", default=[4],
                    help="prompt counts at which the early-difference contrast set (corruption='abc') runs too")
    ap.add_argument("--no-edges", action="store_true", help="skip the attribution and EAP-IG lines")
    args = ap.parse_args(argv)
    global DEVICE
    DEVICE = args.device or mechlib.models.default_device()
    torch.set_grad_enabled(False)
    peak = matmul_peak(DEVICE)
    print(f"machine: {machine()}; torch {torch.__version__}; float32 matmul peak measured now: "
          f"{peak / 1e9:.0f} GFLOP/s (read again around every sweep)", flush=True)
    for name in args.models:
        counts = args.n or [1, 4, 16]
        bench_model(name, counts, args)
    print_table()
    return 0


def bench_model(name, counts, args) -> None:
    torch.manual_seed(0)
    model = mechlib.load_model(name, device=args.device)
    print(f"\nmodel: {name} ({model.cfg.n_layers} layers x {model.cfg.n_heads} heads, vocab {model.cfg.d_vocab}) "
          f"on {model.cfg.device}", flush=True)
    bench_ceiling(model, name)
    for n in counts:
        bench_prompts(model, name, n, args)
    for n in args.early_n:
        bench_prompts(model, name, n, args, corruption="abc")
    if not args.no_edges:
        bench_attribution(model)
        bench_edges(model)


def bench_ceiling(model, name, rows: int = 64, n_pos: int = 64) -> None:
    """The yardstick for "% of peak": the model's own forward, no patching, on one large batch
    (``rows`` x ``n_pos`` = 4,096 positions, the most mechlib's engine runs per block call on the CPU;
    the final norm and unembedding at the last position only, as the engine reads), as a fraction of
    the same matmul peak read the same way. What the blocks themselves reach — their norms, rotary,
    softmax and copies run between the matmuls — is the most a sweep made of those blocks can reach."""
    from mechlib.flops import forward_flops
    from mechlib.hooks import forward_last

    tokens = torch.randint(100, min(model.cfg.d_vocab, 20000), (rows, n_pos), generator=torch.Generator().manual_seed(0))
    last = torch.full((rows,), n_pos - 1)
    run = lambda: forward_last(model, tokens, last)  # noqa: E731
    run()  # warm
    peak_before = matmul_peak(DEVICE)
    t = sorted(measure(run)[1] for _ in range(3))[1]
    peak = max(peak_before, matmul_peak(DEVICE))
    frac = forward_flops(model, rows, n_pos, unembedded=rows) / t / peak
    CEILING[name] = (frac, peak, forward_flops(model, rows, n_pos, unembedded=rows) / t, sustained_matmul())
    print(f"  plain forward, {rows} x {n_pos} positions, no patching: {t:.2f} s, {CEILING[name][2] / 1e9:.0f} GFLOP/s = "
          f"{frac:.0%} of peak {peak / 1e9:.0f} GFLOP/s (the ceiling of a sweep built from these blocks); the same "
          f"2048 x 2048 products back to back for {SUSTAIN:.0f} s: {CEILING[name][3] / 1e9:.0f} GFLOP/s", flush=True)


def sustained_matmul() -> float:
    """FLOP/s of ``matmul_peak``'s 2048 x 2048 float32 products run back to back for ``SUSTAIN``
    seconds: what a sweep of many seconds can draw on, where ``matmul_peak`` (best of five single
    products) also catches a shared machine's short bursts."""
    a = torch.randn(2048, 2048, device=DEVICE)
    b = torch.randn(2048, 2048, device=DEVICE)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < SUSTAIN:
        a @ b
        n += 1
        if DEVICE is not None and torch.device(DEVICE).type == "cuda":
            torch.cuda.synchronize()
    return n * 2 * 2048 ** 3 / (time.perf_counter() - t0)


def bench_prompts(model, name, n, args, corruption="s2_swap") -> None:
    from transformer_lens import patching as tlp

    # "When A and B went to the P, ..." (15 tokens)
    cs = tasks.ioi(model, n=n, seed=0, templates=[15], corruption=corruption)
    ld = metrics.logit_diff(cs)
    tl_metric = lambda logits: ld(logits).mean()  # noqa: E731
    _, clean_cache = model.run_with_cache(cs.clean_tokens)
    L, H, T = model.cfg.n_layers, model.cfg.n_heads, cs.n_pos
    three = [0, L // 2, L - 1]
    first = int((cs.clean_tokens != cs.corrupted_tokens).any(0).nonzero()[0])
    print(f"  {n} IOI prompt(s) of {T} tokens, corruption {corruption!r}: clean and corrupted first differ at "
          f"position {first}", flush=True)

    def tl_cells(setter, act, per_layer_cells, shape, layers):
        import pandas as pd

        if act == "resid_pre":
            idx = pd.DataFrame([(l, p) for l in layers for p in range(T)], columns=["layer", "pos"])
        elif per_layer_cells == H:
            idx = pd.DataFrame([(l, h) for l in layers for h in range(H)], columns=["layer", "head"])
        else:
            idx = pd.DataFrame([(l, p, h) for l in layers for p in range(T) for h in range(H)],
                               columns=["layer", "pos", "head"])
        flat = tlp.generic_activation_patch(model, cs.corrupted_tokens, clean_cache, tl_metric, setter, act,
                                            index_df=idx)
        return flat.reshape(len(layers), *shape)

    sweeps = [
        ("head outputs, all positions", "head_out", {}, tlp.layer_head_vector_patch_setter, "z", H, (H,)),
        ("resid_pre by position", "resid_pre", {}, tlp.layer_pos_patch_setter, "resid_pre", T, (T,)),
        ("head outputs by position", "head_out", {"by_position": True}, tlp.layer_pos_head_vector_patch_setter,
         "z", T * H, (T, H)),
    ]
    for label, site, kw, setter, act, per_layer, shape in sweeps:
        if kw and n > args.by_position_layers_up_to:  # both on three layers: ~10 min of mechlib on 2 CPU cores
            kw, label = {**kw, "layers": three}, label + ", 3 layers"
        peak_before = matmul_peak(DEVICE)
        run = lambda site=site, kw=kw: mechlib.activation_patching(model, cs, ld, site=site, progress=False, **kw)  # noqa: E731
        ours, t_ours, m_ours = measure(run)
        if t_ours < SHORT:  # a few seconds: one stall of a shared machine is a large share; the median of three
            t_ours = sorted([t_ours] + [measure(run)[1] for _ in range(2)])[1]
        peak = max(peak_before, matmul_peak(DEVICE))  # the higher reading: the lower fraction
        estimated = L * per_layer > args.tl_budget and "layers" not in kw
        layers = three if estimated or "layers" in kw else list(range(L))
        ref, t_tl, m_tl = measure(lambda a=(setter, act, per_layer, shape, layers): tl_cells(*a))
        if estimated:
            t_tl *= L / len(layers)
        diff = float((ours.values[layers if "layers" not in kw else slice(None)] - ref.cpu()).abs().max())
        f_ours, f_tl = ours.metadata["flops"], ours.metadata["flops_one_forward_per_cell"]
        row = dict(model=name, n=n, contrast=corruption, first=first, sweep=label, shape=list(ours.values.shape),
                   t_tl=t_tl, est=estimated, skipped=ours.metadata["skipped_cells"],
                   cells=int(ours.values.numel()),
                   t_ours=t_ours, ratio=t_tl / t_ours, flop_ratio=f_tl / f_ours,
                   frac=f_ours / t_ours / peak, frac_tl=f_tl / t_tl / peak, diff=diff, m_tl=m_tl, m_ours=m_ours,
                   prefix=ours.metadata["prefix_reuse"], peak=peak)
        ROWS.append(row)
        print(f"    {label:<30} TL {t_tl:7.1f} s{'*' if estimated else ' '} mechlib {t_ours:6.1f} s  "
              f"ratio {row['ratio']:5.1f}x (FLOPs {row['flop_ratio']:4.1f}x; {row['skipped']}/{row['cells']} cells "
              f"skipped)  mechlib at {f_ours / t_ours / 1e9:.0f} GFLOP/s = {row['frac']:4.0%} of peak {peak / 1e9:.0f} GFLOP/s "
              f"(TL {row['frac_tl']:4.0%})  max|diff| {diff:.1e}  peak extra memory TL {m_tl:5.0f} / "
              f"mechlib {m_ours:5.0f} MiB", flush=True)


def bench_attribution(model) -> None:
    cs = tasks.ioi(model, n=4, seed=0, templates=[15])
    ld = metrics.logit_diff(cs)
    for site in ("resid_pre", "head_out"):
        attr, t_attr, _ = measure(lambda site=site: mechlib.attribution_patching(model, cs, ld, site=site))
        exact, t_exact, _ = measure(lambda site=site: mechlib.activation_patching(model, cs, ld, site=site,
                                                                                 progress=False))
        r = float(torch.corrcoef(torch.stack([attr.values.flatten(), exact.values.flatten()]))[0, 1])
        print(f"    attribution patching {site:<10} {t_attr:5.2f} s vs exact {t_exact:5.1f} s "
              f"({t_exact / t_attr:.0f}x faster); correlation with exact r = {r:.3f}", flush=True)


def bench_edges(model) -> None:
    """EAP-IG over every edge on 8 IOI prompts, as a multiple of one forward and against exact edge
    patching of the same edges (measured on a sample and scaled)."""
    ioi8 = tasks.ioi(model, n=8, seed=0)
    ld8 = metrics.logit_diff(ioi8)
    measure(lambda: model(ioi8.clean_tokens))
    _, t_fwd, _ = measure(lambda: model(ioi8.clean_tokens))  # warm
    scores, t_ig, m_ig = measure(lambda: mechlib.edge_attribution(model, ioi8, ld8, ig_steps=5))
    n = scores.spec.n_edges
    sample = [scores.labels["edge"][i] for i in torch.randperm(n, generator=torch.Generator().manual_seed(0))[:64].tolist()]
    _, t_ex, _ = measure(lambda: mechlib.edge_attribution(model, ioi8, ld8, method="exact", edges=sample))
    t_all_exact = t_ex / len(sample) * n
    print(f"    EAP-IG (5 steps), all {n:,} edges, 8 prompts: {t_ig:6.1f} s = {t_ig / t_fwd:.0f} forwards; exact "
          f"patching of the same edges ≈ {t_all_exact:,.0f} s (from {len(sample)} edges): {t_all_exact / t_ig:,.0f}x; "
          f"peak extra {m_ig:.0f} MiB", flush=True)


def print_table() -> None:
    """The rows as a Markdown table (for the README)."""
    print("\n| model | prompts | contrast (first difference) | sweep | TL 4.3 | mechlib | speed-up | FLOPs TL / mechlib "
          "| cells skipped | mechlib GFLOP/s | mechlib % of peak (peak GFLOP/s, read around the sweep) | max \\|diff\\| "
          "| peak extra MiB TL / mechlib |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in ROWS:
        shape = "×".join(map(str, r["shape"]))
        print(f"| {r['model']} | {r['n']} | {r['contrast']} (pos {r['first']}) | {r['sweep']} `[{shape}]` "
              f"| {r['t_tl']:.1f} s{' (est.)' if r['est'] else ''} | {r['t_ours']:.1f} s | **{r['ratio']:.1f}×** "
              f"| {r['flop_ratio']:.1f}× | {r['skipped']}/{r['cells']} | {r['frac'] * r['peak'] / 1e9:.0f} "
              f"| {r['frac']:.0%} ({r['peak'] / 1e9:.0f}) "
              f"| {r['diff']:.1e} "
              f"| {r['m_tl']:.0f} / {r['m_ours']:.0f} |")
    for name, (frac, peak, achieved, sustained) in CEILING.items():
        print(f"\n{name}: its plain forward (4,096 positions, no patching) ran at {achieved / 1e9:.0f} GFLOP/s = "
              f"{frac:.0%} of peak ({peak / 1e9:.0f} GFLOP/s); matmuls back to back for {SUSTAIN:.0f} s: "
              f"{sustained / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    sys.exit(main())
