# %% [markdown]
# # 04 · Vision-aware heads: VHD scores and VHR reinforcement
#
# **He et al. 2024, "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
# Divergence".** VHD scores each attention head by how far its output moves when the image is
# taken away (same text); heads with high VHD are "vision-aware". Hallucination goes with the
# model leaning on its language prior instead of these heads, so VHR *reinforces* the top-VHD
# heads (scales their outputs up) during generation, which lowers hallucination on CHAIR/POPE.
#
# Offline, the same code runs on the **text analogue**: the "image" is a context sentence that
# contradicts the model's prior ("Japan's capital is Lima. … What is the capital of Japan?"),
# and "hallucination" is answering from the prior (Tokyo) instead of the context (Lima). The
# image path itself runs on a tiny random LLaVA (its numbers mean nothing; the code path does).

# %%
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("mechlib") is None:  # Colab: install from the repository
    repo = os.environ.get("MECHLIB_REPO_URL", "")
    if not repo:
        raise RuntimeError("mechlib is not installed: set MECHLIB_REPO_URL to the mechlib git URL, or pip install it")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"mechlib[notebooks] @ git+{repo}"], check=True)

# %% tags=["parameters"]
# parameters
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")
DEVICE = os.environ.get("MECHLIB_DEVICE") or None
N_CALIB = 12          # prompts used to score heads; the rest are held out for VHR
TOP_K = 8             # heads reinforced
ALPHA = 2.0           # VHR scale (*check* the paper's value)
N_CONTROLS = 5

# %%
import random
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import metrics, tasks
from mechlib.results import bootstrap_ci

torch.manual_seed(0)
model = mechlib.load_model(MODEL, device=DEVICE)
qa = tasks.context_qa(model, seed=0)
calib, held = qa.subset(range(N_CALIB)), qa.subset(range(N_CALIB, len(qa)))
print(len(calib), "scoring prompts,", len(held), "held out. Example:\n" + qa.clean_prompts[0], "→", qa.answers[0], "(prior:", qa.wrong_answers[0] + ")")

# %% [markdown]
# ## VHD scores
#
# For each head: ‖z(with context) − z(without context)‖₂ of its output at the answer position.
# Raw distances favour heads with large outputs; the relative score divides by ‖z(with)‖.

# %%
vhd = mechlib.head_divergence(model, calib)
vhd_rel = mechlib.head_divergence(model, calib, relative=True)
fig = vhd.plot(title="VHD (raw) per head", cmap="viridis")
print("top raw:", vhd.top_heads(TOP_K))
print("top relative:", vhd_rel.top_heads(TOP_K))

# %% [markdown]
# ## VHR on held-out prompts: context faithfulness before and after
#
# Faithful = logit(context answer) > logit(prior answer). Control: the same number of random heads.

# %%
ld = metrics.logit_diff(held)


def faithful(heads=None, alpha=ALPHA):
    with torch.no_grad():
        if not heads:
            return (ld(model(held.clean_tokens)) > 0).float()
        with mechlib.scale_heads(model, heads, alpha):
            return (ld(model(held.clean_tokens)) > 0).float()


def paired_ci(a, b):
    return float((a - b).mean()), *bootstrap_ci(a - b)


base = faithful()
raw = faithful(vhd.top_heads(TOP_K))
rel = faithful(vhd_rel.top_heads(TOP_K))
rng = random.Random(0)
H, L = model.cfg.n_heads, model.cfg.n_layers
controls = [faithful([(rng.randrange(L), rng.randrange(H)) for _ in range(TOP_K)]).mean().item() for _ in range(N_CONTROLS)]
rows = [("no intervention", base.mean().item(), "")]
for name, x in [("VHR, top raw-VHD heads", raw), ("VHR, top relative-VHD heads", rel)]:
    d, lo, hi = paired_ci(x, base)
    rows.append((name, x.mean().item(), f"{d:+.1%} [{lo:+.1%}, {hi:+.1%}]"))
rows.append((f"random {TOP_K} heads ×{ALPHA} (mean of {N_CONTROLS})", sum(controls) / len(controls), ""))
table = pd.DataFrame(rows, columns=["condition", "context-faithful rate", "change, 95% CI"])
table

# %% [markdown]
# ## The image path, on a tiny random LLaVA
#
# `span="image"` removes the image tokens and drops `pixel_values`; VHD then depends on the image.

# %%
tiny = mechlib.tiny_model("llava", seed=0)
prompt = "<image> <image> <image> <image> When Mary and John went to the store, John gave a drink to"
g = torch.Generator().manual_seed(0)
pix = torch.randn(2, 3, 16, 16, generator=g)
tiny_vhd = mechlib.head_divergence(tiny, [prompt, prompt], span="image", extras={"pixel_values": pix})
tiny_vhd2 = mechlib.head_divergence(tiny, [prompt, prompt], span="image", extras={"pixel_values": 2 * pix})
print("tiny LLaVA VHD:", tiny_vhd.values.round(decimals=3).tolist())

# %% [markdown]
# ## Checks of this notebook's findings

# %%
assert (vhd.values > 0).all() and vhd.values.max() > 5 * vhd.values.median()   # a few heads dominate VHD
assert 0.2 < base.mean() < 0.9          # context and prior genuinely compete on this set
late = sum(l >= L // 2 for l, _ in vhd.top_heads(TOP_K))
assert late >= TOP_K // 2, vhd.top_heads(TOP_K)   # context-aware heads sit in the upper half
# measured: reinforcing the top raw-VHD heads does *not* raise faithfulness on this model
assert raw.mean() <= base.mean(), (raw.mean(), base.mean())
assert not torch.allclose(tiny_vhd.values, tiny_vhd2.values)   # the image path reads the image

# %% [markdown]
# ## Paper vs ours

# %%
pd.DataFrame([
    ("model / task", "LLaVA-1.5-7B etc. / CHAIR, POPE (images)", f"{MODEL} / counterfactual context QA (text analogue), {len(held)} held-out prompts"),
    ("vision-aware heads exist (few heads with high VHD)", "yes", f"yes: top head {vhd.top_heads(1)[0]} VHD {vhd.values.max():.2f} vs median {vhd.values.median():.2f}"),
    ("VHR reduces hallucination", "yes (CHAIR_S/CHAIR_I down)",
     f"not reproduced: faithful {base.mean():.0%} → {raw.mean():.0%} (raw VHD) / {rel.mean():.0%} (relative VHD), α={ALPHA}, {TOP_K} heads"),
], columns=["quantity", "paper", "ours"])

# %% [markdown]
# **Reading.** VHD is concentrated in a few late heads (the ones that also carry IOI names and
# capitals to the output — the copying heads). Scaling them up does not make this 135M model more
# context-faithful: it amplifies whatever they copy, prior included. The paper's gains are on 7B
# VLMs with images; the text analogue at this scale does not reproduce them, and the notebook says
# so. On a GPU set `MECHLIB_MODEL` to a LLaVA checkpoint and use `span="image"` with `pixel_values`.
