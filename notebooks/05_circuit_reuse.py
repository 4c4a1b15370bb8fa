# %% [markdown]
# # 05 · Circuit component reuse across tasks (IOI vs Colored Objects)
#
# **Merullo, Eickhoff & Pavlick (ICLR 2024), "Circuit Component Reuse Across Tasks in Transformer
# Language Models".** The IOI circuit of Wang et al. (name movers ← S-inhibition ← induction /
# duplicate-token heads), found again by path patching on GPT-2 medium, is largely reused for
# *Colored Objects* ("On the table, there is a red pen, a blue cup … What color is the cup?"):
# about 78% of the in-circuit heads are shared. Making four middle-layer heads behave as in IOI
# (attend to the wrong options, as S-inhibition heads attend to the repeated name) "repairs" the
# Colored Objects circuit: accuracy 49.6% → 93.7%.
#
# Here, on the embedded SmolLM2-135M (30 layers × 9 heads): discover both circuits with the same
# path-patching procedure, compare them against chance, and try the repair.

# %%
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("mechlib") is None:  # Colab: install from the repository
    repo = os.environ.get("MECHLIB_REPO_URL", "")
    if not repo:
        raise RuntimeError("mechlib is not installed: set MECHLIB_REPO_URL to the mechlib git URL, or pip install it")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"mechlib[notebooks] @ git+{repo}"], check=True)

# %% tags=["parameters"]
# parameters
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")   # "gpt2-medium" on a GPU with the hub
DEVICE = os.environ.get("MECHLIB_DEVICE") or None
N_PROMPTS = int(os.environ.get("MECHLIB_N_PROMPTS", 8))   # prompts per task for discovery
N_EVAL = 64           # Colored Objects prompts for the accuracy / repair evaluation
CANDIDATES = 12       # path-patch the top-K heads by attribution per stage; None = all heads (GPU)
MAX_HEADS = 5         # heads kept per stage
THRESHOLD = 0.05      # |path effect| as a share of the clean − corrupted logit-diff gap
N_CONTROLS = 4        # random head sets for the repair control

# %%
import random
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import metrics, tasks, viz
from mechlib.results import bootstrap_ci

torch.manual_seed(0)
model = mechlib.load_model(MODEL, device=DEVICE)
ioi = tasks.ioi(model, n=N_PROMPTS, seed=0)
co = tasks.colored_objects(model, n=N_PROMPTS, seed=0, n_shots=1)
ld_ioi, ld_co = metrics.logit_diff(ioi), metrics.logit_diff(co)
with torch.no_grad():
    base = {name: (metric(model(cs.clean_tokens)).mean().item(), metric(model(cs.corrupted_tokens)).mean().item())
            for name, cs, metric in [("IOI", ioi, ld_ioi), ("Colored Objects", co, ld_co)]}
pd.DataFrame(base, index=["clean logit diff", "corrupted logit diff"]).round(2)

# %% [markdown]
# Corruptions: IOI swaps the second subject mention (`s2_swap`), which flips the answer; Colored
# Objects asks about another object of the same scene, which flips the colour. The metric is
# logit(answer) − logit(wrong answer) at the last token.
#
# ## The IOI circuit
#
# `find_circuit` walks backwards from the logits: heads whose direct path carries the answer
# (name movers; *negative* when they push against it), then heads reaching the name movers'
# queries at the last token (S-inhibition), then heads reaching those heads' values
# (induction / duplicate-token). To stay within a CPU budget each stage path-patches the top
# `CANDIDATES` heads by attribution patching; `CANDIDATES=None` is exhaustive.

# %%
circuit_ioi = mechlib.find_circuit(model, ioi, ld_ioi, threshold=THRESHOLD, max_heads=MAX_HEADS,
                                   candidates=CANDIDATES)
print(circuit_ioi)
circuit_ioi.to_dataframe().round(3)

# %%
viz.circuit_diagram(circuit_ioi)

# %% [markdown]
# ## The Colored Objects circuit, found the same way

# %%
circuit_co = mechlib.find_circuit(model, co, ld_co, threshold=THRESHOLD, max_heads=MAX_HEADS,
                                  candidates=CANDIDATES)
print(circuit_co)
circuit_co.to_dataframe().round(3)

# %% [markdown]
# ## Overlap, against chance
#
# The paper's figure is the share of in-circuit heads found in both circuits. A share is only
# meaningful against what two random head sets of the same sizes would share in a model of this
# size (the null baseline), and with its uncertainty over prompts (a bootstrap that re-selects
# each circuit's heads from resampled prompts).

# %%
overlap = mechlib.circuit_overlap(circuit_ioi, circuit_co, n_null=10_000, n_boot=500)
print(overlap.summary())
print("shared:", [f"L{l}H{h}" for l, h in overlap.shared])
pd.DataFrame(overlap.per_class).T

# %%
viz.circuit_diagram(circuit_ioi, circuit_co)

# %% [markdown]
# ## Repair: make the IOI S-inhibition heads do their IOI job on Colored Objects
#
# In IOI, S-inhibition heads attend from the last token to the repeated name, and the name movers
# then avoid it. The paper's repair makes the Colored Objects inhibition heads attend to the
# *wrong* colour options instead. We steer the heads that play the S-inhibition role in *our*
# IOI circuit (chosen on IOI, not on Colored Objects accuracy) to attend, at the answer position,
# to the two wrong colours of the question's scene, on fresh Colored Objects prompts. Control:
# the same number of random heads from the same layers. Accuracy: the answer ranks first among
# all colours.

# %%
evalset = tasks.colored_objects(model, n=N_EVAL, seed=1, n_shots=1)
acc = metrics.accuracy(evalset)
wrong_options = evalset.option_positions(3)
inhibition = [h for h in circuit_ioi.heads if circuit_ioi.classes[h] == "s-inhibition"][:4]
if not inhibition:  # no positive S-inhibition head passed the thresholds: use the strongest stage-2 heads
    inhibition = [h for h in circuit_ioi.heads if "s-inhibition" in circuit_ioi.classes[h]][:4]
print("repaired heads:", [f"L{l}H{h}" for l, h in inhibition])


def accuracy_with(heads):
    with torch.no_grad():
        if not heads:
            return acc(model(evalset.clean_tokens))
        with mechlib.steer_attention(model, heads, wrong_options, query_pos=evalset.last_pos):
            return acc(model(evalset.clean_tokens))


before = accuracy_with([])
after = accuracy_with(inhibition)
rng = random.Random(0)
pool = [(l, h) for l in sorted({l for l, _ in inhibition}) for h in range(model.cfg.n_heads) if (l, h) not in inhibition]
controls = [accuracy_with(rng.sample(pool, len(inhibition))).mean().item() for _ in range(N_CONTROLS)]
lo, hi = bootstrap_ci(after - before)
print(f"accuracy before {before.mean():.1%}, after {after.mean():.1%} "
      f"(change {float((after - before).mean()):+.1%}, 95% CI [{lo:+.1%}, {hi:+.1%}]); "
      f"random heads: {sum(controls) / len(controls):.1%} (range {min(controls):.1%}–{max(controls):.1%})")

# %% [markdown]
# ## Checks of this notebook's findings

# %%
assert base["IOI"][0] > 2 and base["IOI"][1] < 0, base["IOI"]          # the model does IOI
movers = [h for h in circuit_ioi.heads if circuit_ioi.classes[h] == "name mover"]
assert movers and all(circuit_ioi.zscores[h] >= 2 for h in movers)     # significant name movers
assert overlap.overlap > float(torch.quantile(overlap.null[:, 0], 0.95)), overlap.summary()  # reuse beats chance
assert overlap.p_value() < 0.01
assert after.mean() > before.mean() and after.mean() > max(controls), (before.mean(), after.mean(), controls)

# %% [markdown]
# ## Paper vs ours

# %%
n_ioi = len(circuit_ioi)
n_co = len(circuit_co)
pd.DataFrame([
    ("IOI logit diff (clean / corrupted)", "n/r here (see paper)", f"{base['IOI'][0]:+.2f} / {base['IOI'][1]:+.2f}"),
    ("Colored Objects logit diff (clean)", "n/r here (see paper)", f"{base['Colored Objects'][0]:+.2f}"),
    ("circuit sizes (IOI / Colored Objects)", "n/r here (see paper)", f"{n_ioi} / {n_co} heads (≤{MAX_HEADS} per stage, 3 stages)"),
    ("overlap of in-circuit heads", "~78%", f"{overlap.overlap:.0%} of IOI's heads (chance {float(overlap.null[:, 0].mean()):.0%}, "
                                             f"bootstrap {overlap.interval()[0]:.0%}–{overlap.interval()[1]:.0%}); IoU {overlap.iou:.2f}"),
    ("Colored Objects accuracy before → after repair", "49.6% → 93.7% (4 heads)",
     f"{before.mean():.1%} → {after.mean():.1%} ({len(inhibition)} head(s); CI of change [{lo:+.1%}, {hi:+.1%}])"),
], columns=["quantity", "paper (GPT-2 medium)", f"ours ({MODEL}, {N_PROMPTS} prompts/task, top-{CANDIDATES} candidates)"])

# %% [markdown]
# **Reading.** On SmolLM2-135M the IOI circuit found by path patching is small (a handful of late
# name-mover heads around layer 23 and 29, one S-inhibition head, one induction/duplicate head),
# and most of its heads reappear in the Colored Objects circuit — far above chance for circuits of
# these sizes — in line with the paper's reuse claim. Classes do not always transfer: some IOI
# heads take a different role (or sign) on Colored Objects. The repair moves accuracy in the
# predicted direction and above every random-head control, but at 64 prompts the 95% CI of the
# change includes 0 (see the table), and the effect is far smaller than the paper's +44 points: this model is weak at the task
# (accuracy among all colours around a third), and its IOI circuit has fewer inhibition heads to
# transplant.
