"""Generation speed: mechlib.generate on a key/value cache against recomputing the whole sequence at
every step (``use_cache=False``), both batched, in one process, with and without an intervention.

    python benchmarks/generation.py [--device cuda] [--prompts 8] [--new 64]

Per row: the seconds of each, the speed-up, the tokens per second, and whether the two produced
the same tokens (greedy decoding: they must). ``stop_at_eos=False`` so every row generates the
same number of tokens in both. Timings on a shared machine vary between runs; the ratio within
one run is the figure to read.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import mechlib

PROMPTS = [
    "The capital of France is",
    "When Mary and John went to the store, John gave a drink to",
    "Once upon a time, in a small village by the sea,",
    "The three primary colours are",
    "Here is a short poem about the moon:",
    "To make a cup of tea, first",
    "The most important idea in physics is",
    "def fibonacci(n):",
    "In 1969, astronauts",
    "My favourite book is",
    "The weather today is",
    "A good way to learn a language is",
    "The Eiffel Tower is",
    "Photosynthesis is the process by which",
    "The best thing about summer is",
    "Water boils at",
]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = mechlib.load_model(args.model, device=args.device)
    prompts = (PROMPTS * ((args.prompts + len(PROMPTS) - 1) // len(PROMPTS)))[: args.prompts]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    heads = [(l, h) for l in range(2, L - 1) for h in range(H)][::3]  # a third of the heads of layers 2..L-2
    kw = dict(max_new_tokens=args.new, stop_at_eos=False, progress=False)
    mechlib.generate(model, prompts[:2], max_new_tokens=2)  # warm-up (lazy hooks, kernels)
    print(f"model {args.model} on {args.device} ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}); {len(prompts)} prompts × {args.new} new tokens, "
          "greedy, batched")
    print()
    print("| block | full recompute (use_cache=False) | key/value cache | speed-up | tokens/s (cache) | same tokens |")
    print("|---|---|---|---|---|---|")
    rows = [("none", None),
            (f"calibrate_attention ({len(heads)} heads, layers 2..L−2)",
             lambda: mechlib.calibrate_attention(model, heads, beta=0.4, epsilon=0.1))]
    ok = True
    for name, block in rows:
        def run(use_cache, block=block):
            if block is None:
                return mechlib.generate(model, prompts, use_cache=use_cache, **kw)
            with block():
                return mechlib.generate(model, prompts, use_cache=use_cache, **kw)
        full, t_full = timed(lambda: run(False))
        cached, t_cached = timed(lambda: run(True))
        same = all(torch.equal(a, b) for a, b in zip(full.tokens, cached.tokens))
        ok &= same
        n = sum(len(t) for t in cached.tokens)
        print(f"| {name} | {t_full:.1f} s | {t_cached:.1f} s | **{t_full / t_cached:.1f}×** | {n / t_cached:.0f} | "
              f"{'yes' if same else 'NO'} |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
