# %% [markdown]
# # 06 · Mechanisms of factual recall
#
# **Lv et al. 2024, "Interpreting Key Mechanisms of Factual Recall in Transformer-Based Language
# Models".** On "The capital of France is": task-specific attention heads move the subject
# ("France") to the last position; MLPs amplify or erase what the heads wrote; a deep MLP writes a
# component toward the answer ("Paris"), visible by reading MLP outputs as tokens; and a
# final-layer "anti-overconfidence" mechanism suppresses the correct answer, which they mitigate
# to raise recall confidence.
#
# Here on the embedded SmolLM2-135M with the capitals in `data/capitals.json`.

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
N_PROMPTS = int(os.environ.get("MECHLIB_N_PROMPTS", 24))
TOP_HEADS = 5

# %%
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import metrics, tasks, viz
from mechlib.results import bootstrap_ci

torch.manual_seed(0)
model = mechlib.load_model(MODEL, device=DEVICE)
facts = tasks.factual_recall(model, n=N_PROMPTS, seed=0)
with torch.no_grad():
    logits = model(facts.clean_tokens)
p_answer = metrics.answer_prob(facts)(logits)
acc = metrics.accuracy(facts, among="vocab")(logits)
print(f"{len(facts)} prompts, e.g. {facts.clean_prompts[0]!r} → {facts.answers[0]!r}; "
      f"top-1 accuracy {acc.mean():.0%}, mean P(answer) {p_answer.mean():.2f}")

# %% [markdown]
# ## Direct logit attribution: which components write the answer
#
# The logit difference (answer − another country's capital) split exactly into heads, MLPs,
# embedding and biases, with the final norm's scale frozen.

# %%
dla = mechlib.direct_logit_attribution(model, facts)
print(f"sum of terms {float(dla.values.sum()):.3f} = logit diff {dla.baselines['logit_diff']:.3f}")
heads_dla = dla.heads()
fig = heads_dla.plot(title="DLA per head (answer − other capital)")
heads_dla.top(TOP_HEADS)

# %% [markdown]
# ## Do the top heads read the subject?
#
# Attention from the last token to the subject's tokens, for the heads with the largest DLA.
# A head that moves the subject attends there.

# %%
n_prefix = model.to_tokens("The capital of").shape[1]
top = [(int(r.layer), int(r.head)) for r in heads_dla.top(TOP_HEADS).itertuples()]
names = sorted({f"blocks.{l}.attn.hook_pattern" for l, _ in top})
_, acts = mechlib.hooks.run_with_cache(model, facts.clean_tokens, names)
rows = []
for l, h in top:
    A = acts[f"blocks.{l}.attn.hook_pattern"][:, h]  # [b, q, k]
    on_subject = torch.stack([A[i, int(facts.last_pos[i]), n_prefix:int(facts.last_pos[i])].sum()
                              for i in range(len(facts))])
    rows.append(dict(head=f"L{l}H{h}", dla=float(heads_dla.values[l, h]), attention_to_subject=float(on_subject.mean()),
                     attention_to_first_token=float(A[:, :, 0].gather(1, facts.last_pos[:, None]).mean())))
subject_heads = pd.DataFrame(rows)
subject_heads

# %%
viz.attention_view(model, facts.clean_prompts[0], top[0][0], heads=[top[0][1]])

# %% [markdown]
# ## MLP outputs read as tokens
#
# Each layer's MLP output at the last token, through the frozen final norm and the unembedding:
# its direct push on the answer and the tokens it promotes most.

# %%
mlp_tokens = mechlib.component_tokens(model, facts, site="mlp_out", layers=range(model.cfg.n_layers // 2, model.cfg.n_layers))
mlp_tokens.table().round(2)

# %% [markdown]
# ## Is the answer suppressed at the end?
#
# The logit lens follows P(answer) through the layers. Lv et al. find the answer's probability
# *drops* in the final layer (anti-overconfidence). We look for (a) the answer peaking before the
# final layer, and (b) last-layer heads whose direct effect on the answer is negative; the
# mitigation removes those heads' contribution.

# %%
lens = mechlib.logit_lens(model, facts)
ee = lens.early_excitation()
answer_ee = ee[ee.target == "answer"]
print(f"answer peaks before the final layer in {answer_ee.early.mean():.0%} of prompts; "
      f"P(answer) at the last three layers: {lens.values[-3:, 0].tolist()}")
fig = lens.plot_trajectories("answer")

# %%
last = model.cfg.n_layers - 1
suppressors = [(last, h) for h in range(model.cfg.n_heads) if heads_dla.values[last, h] < 0]
print("last-layer heads with negative DLA:", suppressors, [round(float(heads_dla.values[last, h]), 3) for _, h in suppressors])
with torch.no_grad(), mechlib.scale_heads(model, suppressors or [(last, 0)], 0.0 if suppressors else 1.0):
    logits_m = model(facts.clean_tokens)
p_after = metrics.answer_prob(facts)(logits_m)
acc_after = metrics.accuracy(facts, among="vocab")(logits_m)
d = p_after - p_answer
lo, hi = bootstrap_ci(d)
print(f"P(answer) {p_answer.mean():.3f} → {p_after.mean():.3f} (change {d.mean():+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]); "
      f"accuracy {acc.mean():.0%} → {acc_after.mean():.0%}")

# %% [markdown]
# ## Checks of this notebook's findings

# %%
assert acc.mean() >= 0.6                                       # the model knows most capitals
assert abs(float(dla.values.sum()) - dla.baselines["logit_diff"]) < 1e-2   # exact decomposition
assert heads_dla.values.max() > 0.5 and top[0][0] >= model.cfg.n_layers // 2  # late heads write the answer
assert subject_heads.attention_to_subject.max() > 0.3          # a top head reads the subject from the last token
assert mlp_tokens.values[:, 0].argmax() >= len(mlp_tokens.labels["layer"]) // 2   # a deep MLP pushes the answer most
# measured: no final-layer suppression in the lens on this model — the answer peaks at the last layer
assert answer_ee.early.mean() < 0.25, answer_ee.early.mean()
# ... but a last-layer head does push against the answer, and removing it raises P(answer)
assert heads_dla.values[last].min() < -0.5 and lo > 0, (heads_dla.values[last], lo)

# %% [markdown]
# ## Paper vs ours

# %%
pd.DataFrame([
    ("heads move the subject to the last position", "yes (task-specific heads)",
     f"{subject_heads.iloc[int(subject_heads.attention_to_subject.argmax())]['head']} puts "
     f"{subject_heads.attention_to_subject.max():.0%} of its last-token attention on the subject"),
    ("a deep MLP writes the answer (MLP output read as tokens)", "yes",
     f"strongest MLP push on the answer: {mlp_tokens.labels['layer'][int(mlp_tokens.values[:, 0].argmax())]} "
     f"({float(mlp_tokens.values[:, 0].max()):+.2f} logits)"),
    ("final-layer anti-overconfidence suppresses the answer", "yes (GPT-2, OPT-1.3B, Llama-2-7B)",
     f"partly: last-layer head(s) {', '.join(f'L{l}H{h}' for l, h in suppressors)} push against the answer "
     f"(DLA {float(heads_dla.values[last].min()):+.2f}), but in the lens the answer still peaks at the last "
     f"layer ({answer_ee.early.mean():.0%} of prompts peak earlier)"),
    ("mitigation raises recall confidence", "yes",
     f"removing {len(suppressors)} negative last-layer head(s): P(answer) {p_answer.mean():.3f} → {p_after.mean():.3f} "
     f"[{lo:+.3f}, {hi:+.3f}]"),
], columns=["finding", "paper", f"ours ({MODEL}, {len(facts)} capitals)"])
