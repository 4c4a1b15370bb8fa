"""Visualization: attention views that render offline, and small figure helpers.

circuitsvis 1.43 probes google.com on every display and otherwise loads its JavaScript from a
CDN. :func:`attention_view` renders from the bundle inside the installed package instead (no
network), crops to the last ``max_tokens`` tokens and rounds the pattern so a view stays small;
``mode="cdn"`` gives the small CDN form for online notebooks.
"""

from __future__ import annotations

import html as _html
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


class HTMLView:
    """HTML that Jupyter displays inline (``_repr_html_``) and that can be written to a file."""

    def __init__(self, html: str, *, title: str = ""):
        self.html = html
        self.title = title

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def __len__(self) -> int:
        return len(self.html)

    def save(self, path) -> None:
        from mechlib.results import atomic_write_bytes

        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_html.escape(self.title)}"
                f"</title></head><body>{self.html}</body></html>")
        atomic_write_bytes(path, page.encode())


def _render(component: str, mode: str, **props) -> str:
    from circuitsvis.utils import render as cv_render

    if mode == "inline":
        return cv_render.render_local(component, **props)
    if mode == "cdn":
        return cv_render.render_cdn(component, **props)
    raise ValueError(f"mode={mode!r}: choose 'inline' (offline, default) or 'cdn'")


def attention_view(
    model,
    prompt: Union[str, Tensor],
    layer: int,
    *,
    heads: Optional[Sequence[int]] = None,
    max_tokens: int = 64,
    decimals: int = 3,
    mode: str = "inline",
    extras: Optional[dict] = None,
) -> HTMLView:
    """circuitsvis ``attention_heads`` view of one layer's patterns for one prompt.

    Args:
        prompt: a string (tokenized with ``model.to_tokens``) or a ``[1, pos]`` token tensor.
        layer: which layer; ``heads`` a subset of heads (default all).
        max_tokens: keep only the last ``max_tokens`` query/key positions (size control).
        decimals: round attention weights (a 4×100×100 view drops from ~2 MB to ~0.3 MB of props).
        mode: ``"inline"`` (offline, embeds the JS bundle) or ``"cdn"``.
    """
    from mechlib.hooks import run_with_cache
    from mechlib.sites import check_head, check_layer

    layer = check_layer(model, layer)
    tokens = model.to_tokens(prompt) if isinstance(prompt, str) else prompt
    if tokens.ndim != 2 or tokens.shape[0] != 1:
        raise ValueError(f"attention_view shows one prompt; got tokens of shape {tuple(tokens.shape)}")
    name = f"blocks.{layer}.attn.hook_pattern"
    _, acts = run_with_cache(model, tokens, [name], extras=extras)
    pattern = acts[name][0]  # [head, q, k]
    heads = list(range(pattern.shape[0])) if heads is None else [check_head(model, "pattern", h) for h in heads]
    pattern = pattern[heads, -max_tokens:, -max_tokens:].float().cpu()
    scale = 10 ** decimals
    pattern = torch.round(pattern * scale) / scale
    str_tokens = [model.tokenizer.decode([int(t)]) for t in tokens[0, -max_tokens:]]
    html = _render(
        "AttentionHeads", mode,
        attention=pattern.tolist(), tokens=str_tokens,
        attentionHeadNames=[f"L{layer}H{h}" for h in heads],
    )
    return HTMLView(html, title=f"attention L{layer}")
