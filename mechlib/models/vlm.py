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
    same token length after expansion (use one template); for prompts of different lengths use
    :func:`vlm_batch`, which right-pads them and records each length.
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
        mask = enc.get("attention_mask")
        if mask is not None and not bool(mask.bool().all()):
            raise ValueError(_DIFFERENT_LENGTHS)
        return enc["input_ids"], {"pixel_values": enc["pixel_values"]}
    from PIL import Image

    hf_cfg = model.original_model.config
    vc = hf_cfg.vision_config
    n_tokens = (vc.image_size // vc.patch_size) ** 2
    if getattr(hf_cfg, "vision_feature_select_strategy", "default") == "full":
        n_tokens += 1
    seqs = [model.to_tokens(p.replace("<image>", "<image>" * n_tokens))[0] for p in prompts]
    if len({len(t) for t in seqs}) != 1:
        raise ValueError(_DIFFERENT_LENGTHS)
    pil = [img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img, dtype=np.uint8)) for img in images]
    return torch.stack(seqs).cpu(), {"pixel_values": clip_processor(vc.image_size)(pil, return_tensors="pt")["pixel_values"]}


_DIFFERENT_LENGTHS = ("prompts have different token lengths: build them from one template, or use "
                      "mechlib.vlm_batch(model, prompts, images), which right-pads them and records each length")


def vlm_batch(model, prompts: Sequence[str], images):
    """Prompts of any token lengths with one image each, as one right-padded
    :class:`~mechlib.PromptBatch` (``lengths`` per prompt, ``extras["pixel_values"]``) — what
    :func:`~mechlib.generate`, the interventions and the probes take. Each prompt is prepared alone
    by :func:`vlm_inputs` (so no padding reaches the model as a token), then padded on the right
    with the model's pad id."""
    from mechlib.tasks.contrast import PromptBatch, _check_strings, _pad_id, _pad_right

    prompts = _check_strings("prompts", [prompts] if isinstance(prompts, str) else prompts)
    images = list(images)
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images: give one image per prompt")
    seqs, pix = [], []
    for p, img in zip(prompts, images):
        t, e = vlm_inputs(model, [p], [img])
        seqs.append(t[0].cpu())
        pix.append(e["pixel_values"])
    return PromptBatch(_pad_right(seqs, _pad_id(model)), torch.tensor([len(t) for t in seqs]), tuple(prompts),
                       {"pixel_values": torch.cat(pix)})


def clip_processor(size: int):
    """The CLIP image processor LLaVA uses (resize the shortest edge to ``size``, centre crop,
    CLIP mean/std), built offline from its settings rather than fetched from the hub."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                              do_center_crop=True, image_mean=list(_CLIP_MEAN), image_std=list(_CLIP_STD),
                              do_convert_rgb=True)
