# %% [markdown]
# # mechlib quickstart
#
# mechlib is a small mechanistic-interpretability toolkit on TransformerLens 4.3 hook points.
# This notebook loads the embedded model (SmolLM2-135M-Instruct, offline), builds an Indirect
# Object Identification (IOI) contrast set, measures the logit difference on clean and corrupted
# prompts, and shows one attention pattern.
#
# Runs offline on a CPU in about a minute; on Colab set `MODEL` to a hub model.

# %%
# Setup: in Colab, install mechlib from its repository; locally (`make lab`) it is already there.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("mechlib") is None:
    repo = os.environ.get("MECHLIB_REPO_URL", "")
    if not repo:
        raise RuntimeError("mechlib is not installed: set MECHLIB_REPO_URL to the mechlib git URL, or pip install it")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"mechlib[notebooks] @ git+{repo}"], check=True)

# %%
# parameters
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")   # e.g. "gpt2-medium" on a GPU box with hub access
N_PROMPTS = int(os.environ.get("MECHLIB_N_PROMPTS", "32"))
DEVICE = os.environ.get("MECHLIB_DEVICE") or None          # None: CUDA if available, else CPU
SEED = 0

# %%
import torch
import mechlib
from mechlib import metrics, tasks, viz

torch.manual_seed(SEED)
model = mechlib.load_model(MODEL, device=DEVICE)
print(model.cfg.n_layers, "layers,", model.cfg.n_heads, "heads, d_model", model.cfg.d_model)
prediction = model.tokenizer.decode([int(model(model.to_tokens("The capital of France is"))[0, -1].argmax())])
print("The capital of France is ->", repr(prediction))

# %% [markdown]
# ## An IOI contrast set
#
# Clean prompts name the indirect object (IO) once and the subject (S) twice; the corrupted prompt
# repeats IO instead, which flips the answer. The metric is `logit(IO) - logit(S)` at each
# prompt's own last token.

# %%
ioi = tasks.ioi(model, n=N_PROMPTS, seed=SEED)
ioi.to_dataframe().head()

# %%
ld = metrics.logit_diff(ioi)
clean = metrics.evaluate(model, ioi, ld)
corrupted = metrics.evaluate(model, ioi, ld, side="corrupted")
print(f"logit diff IO-S  clean: {clean.mean():.2f} ± {clean.std() / len(clean) ** 0.5:.2f}   "
      f"corrupted: {corrupted.mean():.2f} ± {corrupted.std() / len(corrupted) ** 0.5:.2f}")
print(f"IO preferred over S on {(clean > 0).float().mean():.0%} of clean prompts")

# %% [markdown]
# ## One attention pattern
#
# Which layer's heads, at the final token, look most at the indirect object? (Name-mover heads
# in the IOI circuit do.) We read `hook_pattern` with a cache restricted to the patterns only.

# %%
names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
sub = ioi.subset(range(8))
_, acts = mechlib.hooks.run_with_cache(model, sub.clean_tokens, names)
# position of the first mention of IO in each prompt, and each prompt's own last token
io_pos = torch.tensor([sub.str_tokens(model, i).index(sub.answers[i]) for i in range(len(sub))])
rows = torch.arange(len(sub))
to_io = torch.stack([acts[n][rows, :, sub.last_pos, io_pos].mean(0) for n in names])  # [layer, head]
layer, head = divmod(int(to_io.argmax()), model.cfg.n_heads)
print(f"strongest final-token attention to IO (mean over {len(sub)} prompts): L{layer}H{head} = {to_io.max():.2f}")
viz.attention_view(model, ioi.clean_prompts[0], layer)

# %% [markdown]
# ## Activation patching: where does the clean behaviour come back?
#
# Patch each residual-stream position (and each head's output) from the clean run into the
# corrupted run and measure the recovered logit difference (0 = corrupted, 1 = clean). The
# information starts at the changed S2 token and moves to the final token in the late layers. mechlib
# batches the patched variants and resumes each forward at the patched layer; the values equal
# TransformerLens' `get_act_patch_*` (see `tests/test_patching.py`).

# %%
one_template = tasks.ioi(model, n=min(N_PROMPTS, 4), seed=SEED, templates=[15])  # position-aligned
ld1 = metrics.logit_diff(one_template)
resid = mechlib.activation_patching(model, one_template, ld1, site="resid_pre")
recovery = resid.normalized().values                      # [layer, pos]
s2 = int((one_template.clean_tokens[0] != one_template.corrupted_tokens[0]).nonzero()[0])  # the changed token
print(f"recovery at the S2 token: layer 0 {recovery[0, s2]:.2f}, last layer {recovery[-1, s2]:.2f}; "
      f"at the final token: last layer {recovery[-1, -1]:.2f}")
fig = resid.normalized().plot(title="resid_pre patching: recovered share of the logit difference")

# %%
heads = mechlib.activation_patching(model, one_template, ld1, site="head_out")
heads.normalized().top(5)

# %% [markdown]
# Attribution patching estimates the same table from one forward and one backward:

# %%
approx = mechlib.attribution_patching(model, one_template, ld1, site="head_out")
r_attr = float(torch.corrcoef(torch.stack([approx.values.flatten(), heads.values.flatten()]))[0, 1])
print(f"correlation of attribution patching with exact head patching: r = {r_attr:.2f}")

# %% [markdown]
# Path patching (Wang et al.): which late heads carry the answer straight to the logits?

# %%
senders = [(l, h) for l in range(20, model.cfg.n_layers) for h in range(model.cfg.n_heads)]
paths = mechlib.path_patching(model, one_template, ld1, senders=senders, receivers="logits")
paths.effect().top(5, largest=False)

# %% [markdown]
# ## Checks and comparison
#
# The asserts fail if the findings above do not reproduce on the model.

# %%
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full

assert prediction == " Paris"
assert clean.mean() >= 2.0, "IOI clean logit difference should be clearly positive"
assert corrupted.mean() <= 0.0, "the S2->IO corruption should flip the preference"
assert to_io.max() > 0.3, "some head should attend strongly from the end to the IO name"
assert abs(recovery[0, s2] - 1) < 1e-3, "at layer 0 only the changed token carries the difference"
assert recovery[-1, s2] < 0.2 and recovery[-1, -1] > 0.8, "by the last layer it has moved to the final token"
assert r_attr > 0.5, "attribution patching should track exact patching"
top_path = paths.effect().top(1, largest=False).iloc[0]
assert top_path["value"] < -1.0, "some late head's direct path should carry the answer"

pd.DataFrame([
    {"quantity": "IOI logit diff IO-S (clean)", "paper (Wang et al. 2022, GPT-2 small)": 3.56,
     f"ours ({MODEL}, n={N_PROMPTS})": round(float(clean.mean()), 2)},
    {"quantity": "strongest direct path to logits (path patching, effect on logit diff)",
     "paper (Wang et al. 2022, GPT-2 small)": "name movers 9.9, 9.6, 10.0",
     f"ours ({MODEL}, n={N_PROMPTS})": f"{top_path['layer_label']}{top_path['head_label']}: {top_path['value']:.2f}"},
    {"quantity": "max final-token attention to IO (any head)", "paper (Wang et al. 2022, GPT-2 small)": "name movers, e.g. 9.9",
     f"ours ({MODEL}, n={N_PROMPTS})": f"L{layer}H{head}: {to_io.max():.2f}"},
])
