# %% [markdown]
# # 01 · Attention sinks and massive activations
#
# Two papers, one phenomenon:
#
# * **Gu et al. 2024, "When Attention Sink Emerges in Language Models"** — many heads put most of
#   their attention on the first token. Sink metric: α_k^{l,h} = mean over queries t ≥ k of
#   A^{l,h}[t, k]; head (l, h) has a sink at k if α_k > ε (ε = 0.3); Sink_k^ε = share of heads.
#   The sink behaves like a key bias: large attention, small value vector.
# * **Sun et al. 2024, "Massive Activations in Large Language Models"** — a few residual-stream
#   entries are enormous (> 100 and > 1000× the median), sit in fixed dimensions on the first
#   token, appear abruptly in an early layer; zeroing them breaks the model, setting them to their
#   mean does not.
#
# We reproduce both on the embedded SmolLM2-135M-Instruct (offline, CPU, ~1 minute).

# %%
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("mechlib") is None:  # Colab: install from the repository
    repo = os.environ.get("MECHLIB_REPO_URL", "")
    if not repo:
        raise RuntimeError("mechlib is not installed: set MECHLIB_REPO_URL to the mechlib git URL, or pip install it")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"mechlib[notebooks] @ git+{repo}"], check=True)

# %% tags=["parameters"]
# parameters
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")   # "llama-2-7b" on a GPU box with hub access
N_PROMPTS = int(os.environ.get("MECHLIB_N_PROMPTS", "12"))
DEVICE = os.environ.get("MECHLIB_DEVICE") or None
EPSILON = 0.3

# %%
import math
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import metrics
from mechlib.tasks import load_data

torch.manual_seed(0)
model = mechlib.load_model(MODEL, device=DEVICE)
passages = load_data("passages")["passages"][:N_PROMPTS]
print(len(passages), "passages;", model.cfg.n_layers, "layers ×", model.cfg.n_heads, "heads")

# %% [markdown]
# ## Attention sinks (Gu et al.)

# %%
sinks = mechlib.attention_sinks(model, passages, epsilon=EPSILON)
by_layer = sinks.rate_by_layer()
print(f"Sink_0^{EPSILON} = {sinks.sink_rate():.2f} (share of heads whose mean attention to the first token exceeds {EPSILON})")
fig = by_layer.plot(title=f"share of heads with a first-token sink (ε={EPSILON}) by layer")

# %%
fig = sinks.plot(title="α_0: mean attention to the first token", cmap="viridis")

# %% [markdown]
# Sinks as key biases: heads attend to the first token, but its value vectors are small compared
# with the other tokens' (ratio < 1), so little is written from it.

# %%
ratio = sinks.value_norm_ratio
strong = sinks.values > 0.8
print(f"‖v(first token)‖ / mean ‖v(other tokens)‖: all heads {ratio.mean():.2f}, heads with α_0 > 0.8: {ratio[strong].mean():.2f}")

# %% [markdown]
# Non-initial sinks (studied by ACT, notebook 02): tokens after the first that many heads treat as
# sinks — often punctuation.

# %%
sinks.hidden_sinks(min_heads=5).head(10)

# %% [markdown]
# ## Massive activations (Sun et al.)

# %%
massive = mechlib.massive_activations(model, passages)
fig = massive.plot(title="largest |residual entry| per layer (resid_post)")
massive.entries().query("rank == 0").groupby("layer").first().head(12)[["value", "token", "dim", "ratio_to_median", "massive"]]

# %%
dims = massive.massive_dims()
first = massive.first_layer()
top0 = massive.entries().query("rank == 0")
appear = int(top0[top0["value"].abs() > 100]["layer"].min())   # first layer with an entry > 100
print("massive dims:", dims, "| first layer meeting both criteria:", first, "| first layer with |a| > 100:", appear)
print("tokens carrying massive entries:", sorted(set(massive.entries(massive_only=True)["token"])))

# %% [markdown]
# ## Interventions: zero vs mean, and removing the sink's value
#
# Next-token loss on the passages: unchanged model; the massive entry zeroed in every layer from
# where it appears (zeroing it in one layer is not enough here: the next layer rebuilds it); set
# to its per-layer mean over prompts; and the first token's value vectors zeroed in every layer
# (attention to it kept).

# %%
d0 = dims[0]
edit_layers = list(range(appear, model.cfg.n_layers))
names = [f"blocks.{l}.hook_resid_post" for l in edit_layers]
_, acts = mechlib.hooks.run_with_cache(model, mechlib.PromptBatch.from_prompts(model, passages).tokens, names)
means = torch.stack([acts[n][:, 0, d0].mean() for n in names])[:, None]   # [layer, 1]
loss = {"original": metrics.next_token_loss(model, passages)}
with mechlib.ablate_massive(model, [d0], positions=[0], layers=[appear]):
    loss["massive → 0 (one layer)"] = metrics.next_token_loss(model, passages)
with mechlib.ablate_massive(model, [d0], positions=[0], layers=edit_layers):
    loss["massive → 0"] = metrics.next_token_loss(model, passages)
with mechlib.ablate_massive(model, [d0], positions=[0], layers=edit_layers, mode="mean", values=means):
    loss["massive → mean"] = metrics.next_token_loss(model, passages)
with mechlib.ablate_sink_values(model, positions=[0]):
    loss["sink values → 0"] = metrics.next_token_loss(model, passages)
ppl = {k: math.exp(float(v.mean())) for k, v in loss.items()}
pd.DataFrame({"perplexity": ppl})

# %% [markdown]
# Setting the first token's massive entry to its mean over prompts changes nothing here at all:
# in a causal model the first token only sees itself, so its activation is the same in every
# prompt and its mean equals itself. Sun et al.'s "mean" result is about the entry being a
# constant bias; on the first token that is automatic.

# %% [markdown]
# ## Checks and comparison

# %%
assert sinks.sink_rate() > 0.5, "most heads should have a first-token sink"
assert ratio[strong].mean() < 1.0, "sink heads' first-token values should be small (key-bias view)"
assert dims and first is not None, "a massive dimension should exist on this model"
assert set(massive.entries(massive_only=True)["pos"]) == {0}, "massive entries sit on the first token"
assert ppl["massive → 0"] > 2 * ppl["original"], "zeroing the massive entry should break the model"
assert abs(ppl["massive → mean"] - ppl["original"]) < 0.01 * ppl["original"], "mean-setting should not"
assert ppl["sink values → 0"] < ppl["massive → 0"], "removing the sink's values hurts less than zeroing the massive entry"
assert ppl["sink values → 0"] > 1.5 * ppl["original"], "on this 135M model the sink's values DO matter (see below)"

ours = f"ours ({MODEL}, {len(passages)} passages)"
pd.DataFrame([
    {"quantity": f"Sink_0^ε, ε={EPSILON}", "paper": "sinks in all pretrained LMs studied (Gu et al.)", ours: f"{sinks.sink_rate():.2f}"},
    {"quantity": "massive dims", "paper": "Llama-2-7B: 1415, 2533 (Sun et al.)", ours: ", ".join(map(str, dims))},
    {"quantity": "layer where they appear", "paper": "Llama-2-7B: layer 2 (Sun et al.)", ours: f"|a|>100 from layer {appear}; ratio>1000× from layer {first}"},
    {"quantity": "largest magnitude", "paper": "Llama-2-7B: ≈ 2.6k", ours: f"{massive.values.max():.0f}"},
    {"quantity": "perplexity: original / zero / mean", "paper": "Llama-2-7B WikiText: 5.47 / inf / 5.47 (Sun et al., Table 1)",
     ours: f"{ppl['original']:.1f} / {ppl['massive → 0']:.1f} / {ppl['massive → mean']:.1f}"},
    {"quantity": "perplexity with sink values zeroed", "paper": "small change (sink ≈ key bias, Gu et al.)", ours: f"{ppl['sink values → 0']:.1f}"},
])

# %% [markdown]
# **What reproduces and what does not on SmolLM2-135M.** Sinks are everywhere (most heads, most
# layers, with two sink-free layers in the middle where the massive entry also shrinks), and the
# sink tokens' value vectors are small. The massive entry sits in one dimension on the first
# token; zeroing it from its first layer on breaks the model while its mean leaves it intact.
# It passes Sun et al.'s absolute threshold from layer 1 but their 1000×-median ratio only from
# layer 11. **Not reproduced:** removing the sink's value contribution is *not* harmless here —
# perplexity rises several-fold. At 135M parameters the heads' small per-head writes from the
# first token add up; the pure key-bias picture is an approximation for this model.
