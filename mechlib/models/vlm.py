"""Inputs for vision-language models: tokens with the image placeholder expanded, and pixels."""

from __future__ import annotations

from typing import Sequence, Union

import torch

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vlm_inputs(model, prompts: Union[str, Sequence[str]], images) -> tuple[torch.Tensor, dict]:
    """Tokens ``[batch, pos]`` and ``{"pixel_values": ...}`` for a vision-language model.

    Each prompt contains one ``"<image>"`` placeholder; ``images`` are ``[H, W, 3]`` uint8 arrays or
    PIL images (one per prompt, or ``[batch, H, W, 3]``). With the model's processor (loaded with
    a hub LLaVA) the processor does everything; otherwise (the tiny LLaVA, or a processor that
    could not be loaded) the placeholder is expanded to the number of patch tokens and images go
    through transformers' ``CLIPImageProcessor`` with LLaVA's settings (shortest edge resized to
    the vision tower's size, centre crop, CLIP mean/std), built offline. Prompts must have the
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
    pil = [img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8)) for img in images]
    return torch.stack(seqs).cpu(), {"pixel_values": clip_processor(vc.image_size)(pil, return_tensors="pt")["pixel_values"]}


def clip_processor(size: int):
    """The CLIP image processor LLaVA uses (resize the shortest edge to ``size``, centre crop,
    CLIP mean/std), built offline from its settings rather than fetched from the hub."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              do_center_crop=True, image_mean=list(_CLIP_MEAN), image_std=list(_CLIP_STD),
                              do_convert_rgb=True)
