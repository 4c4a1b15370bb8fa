"""Greedy generation that keeps mechlib's hooks active on every generated token."""

from __future__ import annotations

from typing import Sequence, Union

import torch


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
