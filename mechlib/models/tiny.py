"""Tiny random-init models of every architecture family the tests cover, booted offline in a second.

``tiny_model(family)`` builds the family's Hugging Face class from a small config (random weights,
like tuned-lens' ``random_small_model`` fixture) with a word-level tokenizer over mechlib's task
vocabulary, and boots it as a TransformerBridge. What each family exercises:

===========  ==================================================================================
``gpt2``     LayerNorm, learned positions, fused QKV with biases
``neox``     GPT-NeoX/Pythia: parallel attention + MLP, partial rotary (a quarter of d_head)
``llama``    RMSNorm, RoPE, GQA (4 query heads, 2 KV heads)
``qwen2``    Llama-like with q/k/v biases
``qwen3``    q/k norms
``gemma2``   (1 + w) RMSNorm, post-norms, attention and logit soft-capping, local/global layers
``gemma3``   q/k norms, post-norms, embedding scale, local/global layers with two RoPE bases
``mistral``  sliding-window attention on every layer (window 8: shorter than the test prompts)
``phi3``     fused QKV and gate/up projections
``olmo2``    post-norms only (no norm before attention or MLP), q/k norms
``llava``    a tiny CLIP vision tower + projector + Llama text tower (image token ``"<image>"``)
===========  ==================================================================================
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import torch

from mechlib.models._common import boot, cache_dir, resolve_dtype

_TINY_SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>", "<image>"]

FAMILIES = ("gpt2", "neox", "llama", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3", "olmo2", "llava")


def _tiny_vocab() -> list[str]:
    from mechlib.tasks import vocabulary_words

    return _TINY_SPECIALS + sorted(set(vocabulary_words()))


def tiny_tokenizer():
    """A word-level tokenizer (whitespace + punctuation split) over mechlib's task vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_tiny_vocab())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    # TransformerLens re-reads the tokenizer from its name_or_path, so it must live on disk:
    # keep one copy per vocabulary in the cache dir, written atomically.
    key = hashlib.sha256("\n".join(vocab).encode()).hexdigest()[:12]
    dest = cache_dir() / f"tiny-tokenizer-{key}"
    if not (dest / "tokenizer.json").is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return PreTrainedTokenizerFast.from_pretrained(str(dest))


def tiny_hf_model(family: str = "llama", seed: int = 0, *, n_layers: int = 2):
    """``(hf_model, tokenizer)``: the family's Hugging Face model with random weights (eval mode)."""
    import transformers as T

    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: tiny_model knows {', '.join(FAMILIES)}")
    tok = tiny_tokenizer()
    V = len(tok)
    sp = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **sp)
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    table = {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel",
                 dict(vocab_size=V, n_embd=64, n_layer=n_layers, n_head=4, n_positions=256, **sp)),
        "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                      num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25, **sp)),
        "llama": ("LlamaConfig", "LlamaForCausalLM", base),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", base),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(base, head_dim=16)),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
                   dict(base, head_dim=16, sliding_window=6, layer_types=alternating,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                   dict(base, head_dim=16, sliding_window=6, layer_types=alternating)),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(base, sliding_window=8)),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", base),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", base),
    }
    torch.manual_seed(seed)
    if family == "llava":
        vision = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, image_size=16, patch_size=8)
        text = T.LlamaConfig(**base, architectures=["LlamaForCausalLM"])
        cfg = T.LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                            architectures=["LlavaForConditionalGeneration"], vision_feature_select_strategy="default")
        cfg._attn_implementation = "eager"
        hf = T.LlavaForConditionalGeneration(cfg)
    else:
        cfg_cls, model_cls, kw = table[family]
        cfg = getattr(T, cfg_cls)(**kw, architectures=[model_cls])
        cfg._attn_implementation = "eager"
        hf = getattr(T, model_cls)(cfg)
    hf.eval()
    return hf, tok


def tiny_model(family: str = "llama", seed: int = 0, *, n_layers: int = 2, device: str = "cpu", device_map=None,
               dtype: Union[None, str, torch.dtype] = None):
    """A tiny random-init model of one architecture family that boots offline in about a second.

    Args:
        family: one of :data:`FAMILIES` (see the module docstring for what each exercises).
        seed: weights are a deterministic function of (family, seed, n_layers).
        device_map: an accelerate device map (e.g. ``{"model.embed_tokens": "cpu", ...}``) to split
            the model across devices, as a user with a model larger than one GPU would.
        dtype: the weights' dtype (``None``: float32); ``"bfloat16"``/``"float16"`` cast the same
            float32 initialisation, so a stand-in runs in the dtype of the model it stands in for.

    Example:
        >>> m = tiny_model("gemma3"); m.cfg.n_layers
        2
    """
    hf, tok = tiny_hf_model(family, seed, n_layers=n_layers)
    if device_map is not None:
        from accelerate import dispatch_model

        hf = dispatch_model(hf, device_map=device_map)
    return boot(f"tiny-{family}", hf, tok, device=None if device_map is not None else device,
                dtype=resolve_dtype(dtype))
