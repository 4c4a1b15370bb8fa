# %% [markdown]
# # 03 · Visual attention sink and attention redistribution (VAR)
#
# **Kang et al. 2025, "See What You Are Told: Visual Attention Sink in Large Multimodal Models"
# (VAR).** Some image tokens receive high attention but carry little: they are *sink tokens*,
# recognisable by massive values in the base LLM's sink dimensions (a token is a sink if
# max_{d ∈ D_sink} |RMSNorm(h)_d| > τ, τ = 20). Removing them barely changes the output. VAR finds
# image-centric heads (image attention ≥ summ = 0.2, non-sink share ≥ ρ = 0.5) and moves a share
# p = 0.6 of the attention on sink tokens to the non-sink image tokens.
#
# Offline we run the same code on a **text analogue** with the embedded SmolLM2-135M: the
# "image" is the scene description of a Colored Objects prompt, and the task is answering from
# it. The last section runs VAR on a vision-language model with synthetic images: LLaVA-1.5 when
# a GPU and its weights are available (`VLM`), otherwise a tiny random LLaVA that runs every line
# of the image path (its numbers mean nothing).

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
N_PROMPTS = int(os.environ.get("MECHLIB_N_PROMPTS", "48"))
TAU, RHO, SUMM, P = 20.0, 0.5, 0.2, 0.6     # VAR's defaults
VLM = os.environ.get("MECHLIB_VLM", "llava-1.5-7b")   # used when CUDA and its weights are present
N_IMAGES = 8

# %%
import pandas as pd
pd.set_option("display.max_colwidth", None)   # show the paper-vs-ours tables in full
import torch
import mechlib
from mechlib import hooks, metrics, tasks
from mechlib.results import Result

torch.manual_seed(0)
model = mechlib.load_model(MODEL, device=DEVICE)
co = tasks.colored_objects(model, n=N_PROMPTS, seed=0, n_shots=1)

def scene_span(i):
    """Token span of the final question's scene description (the 'image' of the analogue)."""
    toks = co.str_tokens(model, i)
    what = max(j for j, t in enumerate(toks) if t.strip() == "What")
    start = max(j for j, t in enumerate(toks[:what]) if t.strip() == "Q")
    return start, what

spans = [scene_span(i) for i in range(len(co))]
print(repr(co.clean_prompts[0][-140:]), "\nscene span of prompt 0:", spans[0])

# %% [markdown]
# ## Sink dimensions and sink tokens
#
# mechlib discovers D_sink from data instead of hard-coding it (VAR's code hard-codes e.g.
# [2533, 1415] for Llama-2-7B).

# %%
sd = mechlib.sink_dimensions(model, list(co.clean_prompts[:8]), tau=TAU)
flags = sd.sink_tokens()
print("sink dims:", sd.sink_dims, "| sink tokens found:", sorted(set(flags["token"])))
in_span = [(r.prompt, r.pos) for r in flags.itertuples() if spans[r.prompt][0] <= r.pos < spans[r.prompt][1]]
print("sink tokens inside the scene span:", len(in_span))

# %% [markdown]
# On SmolLM2 the only sink token is the first one: no token inside the scene qualifies, so the
# sink attention VAR redistributes is the attention on the first token.
#
# ## Does the sink carry information? Remove the attention to it
#
# VAR's observation: masking attention to sink tokens barely changes the output. We move *all*
# of the first token's attention onto the scene span in every head (p = 1) and compare outputs.

# %%
ld = metrics.logit_diff(co)
base = metrics.evaluate(model, co, ld)

def accuracy(v):
    return float((v > 0).float().mean())

def run_redistributed(heads, p):
    out = torch.empty(len(co))
    for i in range(len(co)):
        one = co.subset([i])
        with mechlib.redistribute_attention(model, heads, span=spans[i], sink_positions=[0], p=p,
                                            queries=(spans[i][1], int(one.lengths[0]))):
            out[i] = metrics.evaluate(model, one, metrics.logit_diff(one))[0]
    return out

all_heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
removed = run_redistributed(all_heads, 1.0)
print(f"accuracy {accuracy(base):.1%} → {accuracy(removed):.1%} with the sink's attention moved to the scene in every head")

# %% [markdown]
# ## Context-centric heads and VAR
#
# From the question tokens, each head's attention to the scene span (summ) and the non-sink share
# of it (ρ). VAR's selection: summ ≥ 0.2 and ρ ≥ 0.5.

# %%
names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
span_att = torch.zeros(len(co), model.cfg.n_layers, model.cfg.n_heads)
for i in range(len(co)):
    one = co.subset([i])
    _, acts = hooks.run_with_cache(model, one.clean_tokens, names)
    s, e = spans[i]
    for l, n in enumerate(names):
        q = acts[n][0, :, e:int(one.lengths[0])]           # [head, question queries, keys]
        span_att[i, l] = q[..., s:e].sum(-1).mean(-1)
summ = span_att.mean(0)
nonsink_share = torch.ones_like(summ)   # no sink tokens inside the span on this model
selected = [tuple(x) for x in ((summ >= SUMM) & (nonsink_share >= RHO)).nonzero().tolist()]
print(f"{len(selected)} context-centric heads, e.g. {selected[:8]}")
var = run_redistributed(selected, P) if selected else base.clone()
change = Result(values=((var > 0).float() - (base > 0).float()).mean(), axis_names=(),
                per_prompt=(var > 0).float() - (base > 0).float())
lo, hi = change.ci(n_boot=2000)
print(f"VAR (p={P}) in {len(selected)} heads: accuracy {accuracy(base):.1%} → {accuracy(var):.1%} "
      f"(change {change.values:+.1%}, 95% CI {lo:+.1%} … {hi:+.1%}); margin {base.mean():.2f} → {var.mean():.2f}")

# %% [markdown]
# ## VAR on a vision-language model
#
# The same analysis on real image tokens. Images are synthetic coloured squares
# (`tasks.colored_shapes`) and the prompt asks for the square's colour; the answer is scored
# among the colour words. On LLaVA-1.5 (GPU with weights) this is the paper's setting in
# miniature; on the tiny random LLaVA every line runs — pixel values go through every forward,
# image tokens are found from `image_token_id` — but the numbers mean nothing.

# %%
real_vlm = False
if torch.cuda.is_available() and VLM != "tiny-llava":
    try:
        vlm = mechlib.load_model(VLM, device=DEVICE)
        real_vlm = True
    except (mechlib.ModelNotAvailableOffline, mechlib.ModelLoadError) as e:
        print(f"{VLM} is not available here ({type(e).__name__}); using the tiny random LLaVA")
if not real_vlm:
    vlm = mechlib.tiny_model("llava")
vlm_name = VLM if real_vlm else "tiny random LLaVA"
shape_data = tasks.load_data("shapes")
template = shape_data["templates"]["llava" if real_vlm else "plain"].format(shape=shape_data["shape"])
images, colours = tasks.colored_shapes(N_IMAGES, seed=0)
vl_tokens, vl_extras = mechlib.vlm_inputs(vlm, [template] * N_IMAGES, images)
img_pos = (vl_tokens[0] == hooks.image_token_id(vlm)).nonzero().flatten()
img_span = (int(img_pos[0]), int(img_pos[-1]) + 1)
T = vl_tokens.shape[1]
colour_ids = torch.tensor([tasks.single_token_id(vlm, " " + c) for c in shape_data["colors"]])
answer_idx = torch.tensor([list(shape_data["colors"]).index(c) for c in colours])


def colour_readout(logits):
    """P(correct colour) among the colour words, and whether it is the top colour, per image."""
    probs = logits[:, -1, colour_ids].float().softmax(-1).cpu()
    return probs[torch.arange(len(probs)), answer_idx], (probs.argmax(-1) == answer_idx).float()


vl_logits = hooks.forward(vlm, vl_tokens, extras=vl_extras)
p_base, acc_base = colour_readout(vl_logits)
swapped = hooks.forward(vlm, vl_tokens, extras={"pixel_values": vl_extras["pixel_values"].roll(1, 0)})
print(f"{vlm_name}: {len(img_pos)} image tokens per prompt at {img_span}; colour accuracy {acc_base.mean():.0%}, "
      f"mean P(correct colour) {p_base.mean():.2f}")

# %% [markdown]
# Sink dimensions and visual sink tokens, found the same way as above:

# %%
vl_sd = mechlib.sink_dimensions(vlm, vl_tokens, extras=vl_extras, tau=TAU)
vl_flags = vl_sd.sink_tokens()
sink_pos = {i: sorted({0} | set(vl_flags[vl_flags.prompt == i].pos.tolist())) for i in range(N_IMAGES)}
visual_sinks = {i: [p for p in sink_pos[i] if img_span[0] <= p < img_span[1]] for i in range(N_IMAGES)}
visual_share = sum(len(v) for v in visual_sinks.values()) / (N_IMAGES * len(img_pos))
print(f"sink dims {vl_sd.sink_dims}; visual sink tokens: {visual_share:.1%} of image tokens")

# %% [markdown]
# Removing the visual sinks: move all attention on them to the other image tokens (p = 1, every
# head) and measure how much the answer distribution moves (KL at the last token), against
# removing the same number of random non-sink image tokens.

# %%
all_vl_heads = [(l, h) for l in range(vlm.cfg.n_layers) for h in range(vlm.cfg.n_heads)]
g = torch.Generator().manual_seed(0)


def kl_after_removing(i, positions):
    with mechlib.redistribute_attention(vlm, all_vl_heads, span=img_span, sink_positions=positions, p=1.0):
        out = hooks.forward(vlm, vl_tokens[i:i + 1], extras={"pixel_values": vl_extras["pixel_values"][i:i + 1]})
    return float(torch.nn.functional.kl_div(out[0, -1].float().log_softmax(-1), vl_logits[i, -1].float().log_softmax(-1),
                                            log_target=True, reduction="sum"))


kl_sink, kl_random = [], []
for i in range(N_IMAGES):
    if not visual_sinks[i]:
        continue
    others = [int(p) for p in img_pos if int(p) not in visual_sinks[i]]
    rand = [others[j] for j in torch.randperm(len(others), generator=g)[:len(visual_sinks[i])].tolist()]
    kl_sink.append(kl_after_removing(i, visual_sinks[i]))
    kl_random.append(kl_after_removing(i, rand))
if kl_sink:
    print(f"KL after removing visual sinks {sum(kl_sink) / len(kl_sink):.4f} vs random image tokens {sum(kl_random) / len(kl_random):.4f}")
else:
    print("no visual sink tokens on this model: nothing to remove")

# %% [markdown]
# Image-centric heads (attention from the text after the image to the image ≥ summ, non-sink
# share ≥ ρ) and VAR (p = 0.6) in them:

# %%
names_vl = [f"blocks.{l}.attn.hook_pattern" for l in range(vlm.cfg.n_layers)]
_, vl_acts = hooks.run_with_cache(vlm, vl_tokens, names_vl, extras=vl_extras)
img_mask = torch.zeros(N_IMAGES, T, dtype=torch.bool)
img_mask[:, img_span[0]:img_span[1]] = True
nonsink_mask = img_mask.clone()
for i, v in visual_sinks.items():
    nonsink_mask[i, v] = False
q_att = torch.stack([vl_acts[n][:, :, img_span[1]:].float().cpu() for n in names_vl], 1)  # [img, L, H, q, k]
to_img = (q_att * img_mask[:, None, None, None]).sum(-1).mean(-1)
to_nonsink = (q_att * nonsink_mask[:, None, None, None]).sum(-1).mean(-1)
vl_summ, vl_rho = to_img.mean(0), (to_nonsink / to_img.clamp(min=1e-9)).mean(0)
vl_heads = [tuple(x) for x in ((vl_summ >= SUMM) & (vl_rho >= RHO)).nonzero().tolist()]
p_var, acc_var = p_base.clone(), acc_base.clone()
if vl_heads:
    for i in range(N_IMAGES):
        with mechlib.redistribute_attention(vlm, vl_heads, span=img_span, sink_positions=sink_pos[i], p=P,
                                            queries=(img_span[1], T)):
            out = hooks.forward(vlm, vl_tokens[i:i + 1], extras={"pixel_values": vl_extras["pixel_values"][i:i + 1]})
        p_var[i], acc_var[i] = (x[0] for x in colour_readout(out))
restored_vl = hooks.forward(vlm, vl_tokens, extras=vl_extras)
print(f"{len(vl_heads)} image-centric heads; VAR: colour accuracy {acc_base.mean():.0%} → {acc_var.mean():.0%}, "
      f"mean P(correct) {p_base.mean():.3f} → {p_var.mean():.3f}")

# %% [markdown]
# ## Checks and comparison

# %%
assert 507 in sd.sink_dims or sd.sink_dims, "a sink dimension should be discovered"
assert flags["pos"].eq(0).all(), "on SmolLM2 the sink tokens are first tokens only"
assert len(in_span) == 0
# the image path: pixel values reach the output, and VAR edits only while active
assert not torch.allclose(swapped, vl_logits), "the answer must depend on the image"
assert torch.allclose(restored_vl, vl_logits), "the model is restored after VAR"
assert not vl_heads or not torch.allclose(p_var, p_base), "VAR in image-centric heads changes the readout"
if real_vlm:  # VAR's findings on LLaVA-1.5 (not checkable offline: needs a GPU and the weights)
    assert visual_share > 0, "LLaVA should have visual sink tokens"
    assert sum(kl_sink) < sum(kl_random), "removing visual sinks should move the output less than random image tokens"
assert float(lo) <= float(change.values) <= float(hi)
removal_drop = accuracy(base) - accuracy(removed)
print(f"moving all sink attention to the scene: accuracy change {-removal_drop:+.1%}")
assert removal_drop > 0, "measured here: the first-token sink's attention is not disposable on this model"

ours = f"ours ({MODEL}, Colored Objects text analogue, n={len(co)})"
pd.DataFrame([
    {"quantity": "sink dimensions", "paper": "Llama-2-7B: 1415, 2533 (hard-coded in VAR's code)", ours: ", ".join(map(str, sd.sink_dims))},
    {"quantity": "sink tokens inside the image/span", "paper": "a few visual tokens per image", ours: f"{len(in_span)} (only the first token is a sink)"},
    {"quantity": "removing sink attention", "paper": "output nearly unchanged", ours: f"accuracy {accuracy(base):.0%} → {accuracy(removed):.0%}"},
    {"quantity": "image/context-centric heads", "paper": "selected with ρ=0.5, summ=0.2", ours: f"{len(selected)} heads"},
    {"quantity": "VAR effect", "paper": "gains on general VL, hallucination and vision-centric benchmarks (LLaVA-1.5)",
     ours: f"{change.values:+.1%} accuracy [{lo:+.1%}, {hi:+.1%}]"},
])

# %%
vl_col = f"ours ({vlm_name}, {N_IMAGES} synthetic colour images)" + ("" if real_vlm else " — random weights: the code path runs, the numbers mean nothing")
pd.DataFrame([
    {"quantity": "visual sink tokens (share of image tokens)", "paper": "a few per image (LLaVA-1.5)", vl_col: f"{visual_share:.1%}"},
    {"quantity": "removing visual sinks: KL at the answer", "paper": "output nearly unchanged",
     vl_col: (f"{sum(kl_sink) / len(kl_sink):.4f} vs {sum(kl_random) / len(kl_random):.4f} for random image tokens" if kl_sink else "no visual sinks")},
    {"quantity": "image-centric heads", "paper": "selected with ρ=0.5, summ=0.2", vl_col: f"{len(vl_heads)}"},
    {"quantity": "VAR on the colour question", "paper": "gains on VL benchmarks", vl_col: f"accuracy {acc_base.mean():.0%} → {acc_var.mean():.0%}"},
])

# %% [markdown]
# **What reproduces on a 135M text model:** sink dimensions exist and are found automatically
# (one dimension, 507), and the sink criterion separates the first token cleanly. **What does
# not transfer:** there are no sink tokens *inside* the context span — the visual-sink phenomenon
# needs image tokens — so the "visual sink" VAR recycles is here the first-token sink, and it is
# *not* disposable: moving all of its attention onto the context lowers accuracy, unlike VAR's
# visual sinks whose removal leaves LLaVA's output nearly unchanged. Whether the milder VAR
# redistribution (p = 0.6 in context-centric heads) helps is what its CI says — here it does not
# help — and we claim no more.
