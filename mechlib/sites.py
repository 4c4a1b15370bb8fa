"""One vocabulary for locations in the model: ``Site`` over canonical TransformerLens hook names.

A *site kind* (``"resid_pre"``, ``"head_out"``, ...) is a row in :data:`SITES`: its hook-name
template, whether it is split by head, and along which axis. A :class:`Site` is one concrete
location (kind, layer, and for per-head kinds a head). Adding a site is adding a row.

Per-head kinds index *query* heads except ``head_k``/``head_v``, which on grouped-query models
(SmolLM2: 9 query heads share 3 KV heads) index KV heads: a "k head" is shared by
``n_heads // n_key_value_heads`` query heads.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Optional


class SiteError(ValueError):
    """Unknown site kind, or a layer/head out of range for this model."""


@dataclass(frozen=True)
class SiteSpec:
    """A row of the site table.

    Attributes:
        kind: the public name (``"resid_pre"``).
        hook: hook-name template with ``{layer}``.
        per_head: the activation has a head axis.
        head_dim: index of the head axis in the hooked tensor (2 for ``[batch,pos,head,d]``,
            1 for patterns ``[batch,head,q_pos,k_pos]``).
        kv: the head axis counts KV heads (``n_key_value_heads``).
        tl_name: TransformerLens' activation name for the same thing (``get_act_name``).
    """

    kind: str
    hook: str
    per_head: bool = False
    head_dim: int = 2
    kv: bool = False
    tl_name: str = ""

    def hook_name(self, layer: int) -> str:
        return self.hook.format(layer=layer)


SITES: dict[str, SiteSpec] = {
    s.kind: s
    for s in [
        SiteSpec("resid_pre", "blocks.{layer}.hook_resid_pre", tl_name="resid_pre"),
        SiteSpec("resid_mid", "blocks.{layer}.hook_resid_mid", tl_name="resid_mid"),
        SiteSpec("resid_post", "blocks.{layer}.hook_resid_post", tl_name="resid_post"),
        SiteSpec("attn_out", "blocks.{layer}.hook_attn_out", tl_name="attn_out"),
        SiteSpec("mlp_out", "blocks.{layer}.hook_mlp_out", tl_name="mlp_out"),
        SiteSpec("head_out", "blocks.{layer}.attn.hook_z", per_head=True, tl_name="z"),
        SiteSpec("head_q", "blocks.{layer}.attn.hook_q", per_head=True, tl_name="q"),
        SiteSpec("head_k", "blocks.{layer}.attn.hook_k", per_head=True, kv=True, tl_name="k"),
        SiteSpec("head_v", "blocks.{layer}.attn.hook_v", per_head=True, kv=True, tl_name="v"),
        SiteSpec("pattern", "blocks.{layer}.attn.hook_pattern", per_head=True, head_dim=1,
                 tl_name="pattern"),
    ]
}


def site_spec(kind: str) -> SiteSpec:
    """The table row for ``kind``, or an error listing the known kinds."""
    if isinstance(kind, SiteSpec):
        return kind
    if kind not in SITES:
        near = difflib.get_close_matches(str(kind), SITES, n=2)
        hint = f" Did you mean {' or '.join(map(repr, near))}?" if near else ""
        raise SiteError(f"unknown site {kind!r}.{hint} Known sites: {', '.join(SITES)}")
    return SITES[kind]


def n_heads(model, kind: str) -> int:
    """Size of the head axis of ``kind`` on ``model`` (KV heads for head_k/head_v)."""
    spec = site_spec(kind)
    if spec.kv:
        return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
    return int(model.cfg.n_heads)


def check_layer(model, layer: int, *, what: str = "layer") -> int:
    n = int(model.cfg.n_layers)
    if not isinstance(layer, int) or isinstance(layer, bool) or not -n <= layer < n:
        raise SiteError(f"{what}={layer!r} is out of range: this model has layers 0..{n - 1}")
    return layer % n


def check_head(model, kind: str, head: int) -> int:
    h = n_heads(model, kind)
    if not isinstance(head, int) or isinstance(head, bool) or not -h <= head < h:
        which = "KV heads" if site_spec(kind).kv else "heads"
        raise SiteError(f"head={head!r} is out of range for site {kind!r}: this model has {which} 0..{h - 1}")
    return head % h


@dataclass(frozen=True)
class Site:
    """One location: a site kind at a layer (and a head for per-head kinds).

    Example:
        >>> Site("head_out", 9, head=6).hook_name
        'blocks.9.attn.hook_z'
    """

    kind: str
    layer: int
    head: Optional[int] = None

    def __post_init__(self):
        spec = site_spec(self.kind)
        if self.head is not None and not spec.per_head:
            raise SiteError(f"site {self.kind!r} has no head axis; drop head={self.head}")

    @property
    def spec(self) -> SiteSpec:
        return site_spec(self.kind)

    @property
    def hook_name(self) -> str:
        return self.spec.hook_name(self.layer)

    def validate(self, model) -> "Site":
        """This site with negative indices resolved, or an error naming the bad index."""
        layer = check_layer(model, self.layer)
        head = check_head(model, self.kind, self.head) if self.head is not None else None
        return Site(self.kind, layer, head)

    def __str__(self) -> str:
        return f"{self.kind}@L{self.layer}" + (f"H{self.head}" if self.head is not None else "")
