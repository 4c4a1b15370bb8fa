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

    def __repr__(self) -> str:
        return f"HTMLView({self.title!r}, {len(self.html):,} characters of HTML)"

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


# ----------------------------------------------------------------------------------------------
# circuit diagrams
# ----------------------------------------------------------------------------------------------

_CLASS_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#8172B3", "#937860", "#DA8BC3"]
_MEMBER_COLORS = {"both": "#B39DDB", "a": "#90CAF9", "b": "#FFCC80"}


def _stage_of(cls: str, order: Sequence[str]) -> int:
    base = cls[len("negative "):] if cls.startswith("negative ") else cls
    return order.index(base) if base in order else len(order)


def _diagram_graph(circuits: Sequence, names: Sequence[str]):
    """Nodes ``{label: dict(column, layer, cls, member)}`` and edges ``[(src, dst, w, k)]``."""
    from mechlib.analyses.circuits import head_label

    order: list[str] = []
    for c in circuits:
        for s in c.metadata.get("stages", []) or [st.name for st in c.stages]:
            if s not in order:
                order.append(s)
    n_cols = len(order) + 1
    nodes: dict[str, dict] = {"logits": dict(column=n_cols - 1, layer=10 ** 6, cls="logits", member="both")}
    for k, c in enumerate(circuits):
        for h in c.heads:
            lab = head_label(h)
            col = n_cols - 2 - _stage_of(c.classes[h], order)
            if lab in nodes:
                nodes[lab]["member"] = "both"
            else:
                nodes[lab] = dict(column=max(col, 0), layer=h[0], cls=c.classes[h],
                                  member=names[k] if len(circuits) > 1 else "both",
                                  score=c.scores[h])
    edges = [(s, d, w, k) for k, c in enumerate(circuits) for s, d, w in c.edges if s in nodes and d in nodes]
    return nodes, edges, order


def _edge_width(w: float, wmax: float) -> float:
    return 0.8 + 5.0 * min(abs(w) / wmax, 1.0) if wmax > 0 else 1.0


def _dot_source(nodes, edges, order, title: str) -> str:
    classes = sorted({n["cls"] for n in nodes.values() if n["cls"] != "logits"},
                     key=lambda c: (_stage_of(c, order), c))
    color = {c: _CLASS_COLORS[_stage_of(c, order) % len(_CLASS_COLORS)] for c in classes}
    wmax = max((abs(e[2]) for e in edges), default=0.0)
    multi = len({n["member"] for n in nodes.values()}) > 1
    lines = ["digraph circuit {", "  rankdir=LR; splines=true; nodesep=0.15; ranksep=0.9;",
             f'  label="{title}"; labelloc=t; fontname="Helvetica";',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];',
             '  logits [shape=doubleoctagon, fillcolor="#eeeeee"];']
    for i, c in enumerate(classes):
        lines.append(f'  subgraph cluster_{i} {{ label="{c}"; color="{color[c]}"; fontcolor="{color[c]}"; style=rounded;')
        for lab, n in sorted(nodes.items(), key=lambda kv: kv[1]["layer"]):
            if n["cls"] == c:
                fill = _MEMBER_COLORS[n["member"]] if multi else "#ffffff"
                lines.append(f'    "{lab}" [fillcolor="{fill}", color="{color[c]}", penwidth=2];')
        lines.append("  }")
    for s, d, w, k in edges:
        col = "#2E7D32" if w > 0 else "#C62828"
        style = "solid" if k == 0 else "dashed"
        lines.append(f'  "{s}" -> "{d}" [penwidth={_edge_width(w, wmax):.2f}, color="{col}", style={style}, '
                     f'tooltip="{s} → {d}: {w:+.3f}"];')
    lines.append("}")
    return "\n".join(lines)


def _svg_fallback(nodes, edges, order, title: str) -> str:
    """A dependency-free SVG: one column per stage (earliest left, logits right), heads by layer."""
    W, H_ROW, COL_W, BOX_W, BOX_H, TOP = 0, 34, 190, 92, 24, 56
    cols: dict[int, list[str]] = {}
    for lab, n in sorted(nodes.items(), key=lambda kv: kv[1]["layer"]):
        cols.setdefault(n["column"], []).append(lab)
    n_cols = max(cols) + 1
    W = n_cols * COL_W + 20
    height = TOP + max(len(v) for v in cols.values()) * H_ROW + 30
    pos = {}
    for c, labs in cols.items():
        y0 = TOP + (height - TOP - 30 - len(labs) * H_ROW) / 2
        for i, lab in enumerate(labs):
            pos[lab] = (20 + c * COL_W, y0 + i * H_ROW)
    wmax = max((abs(e[2]) for e in edges), default=0.0)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
           f'viewBox="0 0 {W} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{_html.escape(title)}</text>']
    for c in range(n_cols - 1):
        name = order[n_cols - 2 - c] if 0 <= n_cols - 2 - c < len(order) else ""
        out.append(f'<text x="{20 + c * COL_W + BOX_W / 2}" y="40" text-anchor="middle" '
                   f'fill="{_CLASS_COLORS[(n_cols - 2 - c) % len(_CLASS_COLORS)]}">{_html.escape(name)}</text>')
    for s, d, w, k in edges:
        (x1, y1), (x2, y2) = pos[s], pos[d]
        col = "#2E7D32" if w > 0 else "#C62828"
        dash = "" if k == 0 else ' stroke-dasharray="5,3"'
        out.append(f'<path d="M{x1 + BOX_W},{y1 + BOX_H / 2} C{x1 + BOX_W + 40},{y1 + BOX_H / 2} '
                   f'{x2 - 40},{y2 + BOX_H / 2} {x2},{y2 + BOX_H / 2}" fill="none" stroke="{col}" '
                   f'stroke-opacity="0.7" stroke-width="{_edge_width(w, wmax):.2f}"{dash}>'
                   f'<title>{s} → {d}: {w:+.3f}</title></path>')
    multi = len({n["member"] for n in nodes.values()}) > 1
    for lab, (x, y) in pos.items():
        n = nodes[lab]
        stroke = "#555" if n["cls"] == "logits" else _CLASS_COLORS[_stage_of(n["cls"], order) % len(_CLASS_COLORS)]
        fill = _MEMBER_COLORS[n["member"]] if multi else ("#eeeeee" if lab == "logits" else "#ffffff")
        dash = ' stroke-dasharray="3,2"' if n["cls"].startswith("negative ") else ""
        out.append(f'<g class="node"><rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" '
                   f'fill="{fill}" stroke="{stroke}" stroke-width="2"{dash}/>'
                   f'<text x="{x + BOX_W / 2}" y="{y + 16}" text-anchor="middle">{_html.escape(lab)}</text>'
                   f'<title>{_html.escape(lab)}: {_html.escape(n["cls"])}</title></g>')
    out.append("</svg>")
    return "".join(out)


def _legend(names: Sequence[str], circuits: Sequence, labels: Optional[Sequence[str]] = None) -> str:
    if len(circuits) < 2:
        return ""
    a, b = labels or (circuits[0].task, circuits[1].task)
    items = [("both", "in both"), ("a", f"only {a}"), ("b", f"only {b}")]
    return "<div style='font:12px sans-serif'>" + " ".join(
        f"<span style='background:{_MEMBER_COLORS[k]};padding:1px 6px;border-radius:4px'>{_html.escape(t)}</span>"
        for k, t in items) + " &nbsp; edges: solid = first circuit, dashed = second; green supports the answer, red opposes</div>"


def circuit_diagram(circuit, other=None, *, layout: str = "overlay", engine: str = "auto",
                    title: Optional[str] = None, labels: Optional[Sequence[str]] = None) -> HTMLView:
    """An SVG circuit diagram: heads grouped by class (stage) and ordered by layer, edges weighted
    by their path effect (green: supports the clean answer, red: opposes it).

    Args:
        other: a second circuit on the same model — ``layout="overlay"`` colours each head by
            membership (both / only the first / only the second); ``"side_by_side"`` draws two
            diagrams next to each other.
        engine: ``"dot"`` (graphviz, needs the ``dot`` program), ``"python"`` (built-in SVG
            layout, no dependency) or ``"auto"`` (dot when installed).
        labels: names of the two circuits in the legend (default: their tasks).

    An edge graph (:class:`mechlib.analyses.edges.Graph`, from :func:`mechlib.edge_attribution`)
    is drawn by :func:`edge_diagram`.

    Returns:
        an :class:`HTMLView` with the inline SVG (``.html``), displayed by Jupyter.
    """
    from mechlib.analyses.edges import Graph

    if isinstance(circuit, Graph):
        if other is not None:
            raise ValueError("circuit_diagram draws one edge graph at a time; compare two with "
                             "mechlib.circuit_overlap(a, b) or draw each")
        return edge_diagram(circuit, engine=engine, title=title)
    import shutil

    if engine not in ("auto", "dot", "python"):
        raise ValueError(f"engine={engine!r}: choose 'auto', 'dot' or 'python'")
    if layout not in ("overlay", "side_by_side"):
        raise ValueError(f"layout={layout!r}: choose 'overlay' or 'side_by_side'")
    use_dot = engine == "dot" or (engine == "auto" and shutil.which("dot") is not None)
    if engine == "dot" and shutil.which("dot") is None:
        raise RuntimeError("engine='dot' needs graphviz's `dot` program (Debian: apt-get install graphviz; "
                           "`make setup` installs it); engine='python' needs nothing")
    if other is not None and layout == "side_by_side":
        left = circuit_diagram(circuit, engine=engine, title=title)
        right = circuit_diagram(other, engine=engine, title=None)
        return HTMLView(f"<div style='display:flex;gap:16px;align-items:flex-start'>{left.html}{right.html}</div>",
                        title="circuits")
    circuits = [circuit] if other is None else [circuit, other]
    if other is not None and (circuit.n_layers, circuit.n_heads) != (other.n_layers, other.n_heads):
        raise ValueError("the two circuits come from different models; use layout='side_by_side'")
    names = ["a", "b"]
    nodes, edges, order = _diagram_graph(circuits, names)
    title = title or (f"{circuit.task} circuit ({len(circuit)} heads)" if other is None
                      else f"{circuit.task} vs {other.task}")
    if use_dot:
        import graphviz

        svg = graphviz.Source(_dot_source(nodes, edges, order, title)).pipe(format="svg").decode()
        svg = svg[svg.find("<svg"):]
    else:
        svg = _svg_fallback(nodes, edges, order, title)
    if labels is not None and len(labels) != 2:
        raise ValueError(f"labels={labels!r}: give two names, one per circuit")
    return HTMLView(svg + _legend(names, circuits, labels), title=title)


# ----------------------------------------------------------------------------------------------
# explorers: ipywidgets controls over precomputed results, with a static fallback
# ----------------------------------------------------------------------------------------------

_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def widget_frontend() -> bool:
    """Whether explorers should offer live widgets: inside a Jupyter kernel with ipywidgets
    installed, unless ``MECHLIB_STATIC_VIEWS`` is set (headless execution such as
    ``tools/run_notebooks.py`` has no widget frontend and sets it)."""
    import os

    if os.environ.get("MECHLIB_STATIC_VIEWS"):
        return False
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class Explorer:
    """Dropdown controls over a drawing function, shown as an ipywidgets panel where a widget
    frontend exists and as a static figure of the current selection everywhere else (HTML
    exports, GitHub, plain Python). ``explorer.figure(**selection)`` draws any selection."""

    def __init__(self, title: str, controls: dict, draw, *, figsize=(7.5, 4.2)):
        self.title = title
        self.controls = {k: [(str(lab), val) for lab, val in opts] for k, opts in controls.items()}
        for k, opts in self.controls.items():
            if not opts:
                raise ValueError(f"control {k!r} has no options")
        self.selection = {k: opts[0][1] for k, opts in self.controls.items()}
        self._draw = draw
        self.figsize = figsize

    def _check(self, selection: dict) -> dict:
        sel = dict(self.selection)
        for k, v in selection.items():
            if k not in self.controls:
                raise ValueError(f"unknown control {k!r}; controls: {list(self.controls)}")
            if v not in [val for _, val in self.controls[k]]:
                raise ValueError(f"{k}={v!r} is not an option; choose from {[val for _, val in self.controls[k]]}")
            sel[k] = v
        return sel

    def figure(self, **selection):
        """A matplotlib figure of ``selection`` (missing controls keep the current choice)."""
        import matplotlib.pyplot as plt

        sel = self._check(selection)
        fig = plt.figure(figsize=self.figsize)
        self._draw(fig, **sel)
        return fig

    def widget(self):
        """The ipywidgets panel: one dropdown per control above the figure."""
        import ipywidgets as w
        import matplotlib.pyplot as plt
        from IPython.display import display

        drop = {k: w.Dropdown(options=opts, value=self.selection[k], description=k)
                for k, opts in self.controls.items()}

        def show(**sel):
            self.selection.update(sel)
            fig = self.figure(**sel)
            display(fig)
            plt.close(fig)

        out = w.interactive_output(show, drop)
        return w.VBox([w.HTML(f"<b>{_html.escape(self.title)}</b>"), w.HBox(list(drop.values())), out])

    def static_html(self) -> str:
        """The current selection as an inline PNG with a caption naming the selection."""
        import base64
        import io

        import matplotlib.pyplot as plt

        fig = self.figure()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        labels = {k: next(lab for lab, val in self.controls[k] if val == v) for k, v in self.selection.items()}
        sel = ", ".join(f"{k} = {_html.escape(v)}" for k, v in labels.items())
        return (f"<figure class='mechlib-explorer'><img alt='{_html.escape(self.title)}' "
                f"src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'/>"
                f"<figcaption>{_html.escape(self.title)} — static view ({sel}). Interactive in Jupyter "
                f"with ipywidgets; here call <code>.figure(...)</code> for another selection.</figcaption></figure>")

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = {"text/plain": repr(self), "text/html": self.static_html()}
        if widget_frontend():
            bundle.update(self.widget()._repr_mimebundle_())
            bundle["text/html"] = bundle.get("text/html") or self.static_html()
        return bundle

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}: {len(v)}" for k, v in self.controls.items())
        return f"Explorer({self.title!r}; {opts})"


def _token_labels(model, tokens) -> list[str]:
    from mechlib.tasks.contrast import _decode_each

    return [t.replace("\n", "\\n") for t in _decode_each(model, tokens)]


def attention_explorer(model, prompts, *, layers: Optional[Sequence[int]] = None,
                       max_tokens: int = 40) -> Explorer:
    """Pick a prompt, layer and head → that head's attention pattern with the prompt's tokens.

    Patterns are computed once (only ``hook_pattern`` of the chosen layers is cached) and cropped to
    each prompt's last ``max_tokens`` tokens."""
    from mechlib.hooks import run_with_cache
    from mechlib.sites import check_layer
    from mechlib.tasks.contrast import PromptBatch

    batch = PromptBatch.from_prompts(model, prompts)
    layers = list(range(model.cfg.n_layers)) if layers is None else [check_layer(model, l) for l in layers]
    names = [f"blocks.{l}.attn.hook_pattern" for l in layers]
    _, acts = run_with_cache(model, batch.tokens, names, extras=batch.extras)
    pats, toks = [], []
    for i in range(len(batch)):
        n = int(batch.lengths[i])
        lo = max(0, n - max_tokens)
        pats.append(torch.stack([acts[nm][i, :, lo:n, lo:n].float().cpu() for nm in names]))  # [L, H, q, k]
        toks.append(_token_labels(model, batch.tokens[i, lo:n]))

    def draw(fig, prompt, layer, head):
        ax = fig.add_subplot(111)
        A = pats[prompt][layers.index(layer), head].numpy()
        im = ax.imshow(A, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(toks[prompt])), toks[prompt], rotation=90, fontsize=7)
        ax.set_yticks(range(len(toks[prompt])), toks[prompt], fontsize=7)
        ax.set(xlabel="key", ylabel="query", title=f"L{layer}H{head} attention, prompt {prompt}")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()

    return Explorer("attention patterns", {
        "prompt": [(f"{i}: {p[:40]!r}", i) for i, p in enumerate(batch.prompts)],
        "layer": [(f"L{l}", l) for l in layers],
        "head": [(f"H{h}", h) for h in range(model.cfg.n_heads)],
    }, draw, figsize=(7, 6))


def patching_explorer(results) -> Explorer:
    """Pick a patching (or any 2-D) result → its heatmap; position axes are labelled with the
    prompt's tokens. ``results``: one :class:`~mechlib.results.Result` or ``{name: result}``;
    results with a ``normalized()`` view also offer it."""
    from mechlib.results import Result

    if isinstance(results, Result):
        results = {type(results).__name__: results}
    if not results:
        raise ValueError("results is empty: give a Result or {name: Result}")
    for name, r in results.items():
        if r.values.ndim != 2:
            raise ValueError(f"result {name!r} has axes {r.axis_names}; the explorer shows 2-D tables "
                             f"(select one slice first, e.g. r.select({r.axis_names[-1]!r}, 0))")
    views = [("recovered share (normalized)", "normalized"), ("raw metric", "raw")]

    def draw(fig, result, view):
        r = results[result]
        if view == "normalized" and hasattr(r, "normalized"):
            r = r.normalized()
        r.plot(ax=fig.add_subplot(111), title=f"{result} ({view})")

    return Explorer("patching results", {"result": [(k, k) for k in results], "view": views}, draw)


def lens_explorer(model, prompts, *, tokens: Optional[Sequence[str]] = None, top_k: int = 3) -> Explorer:
    """Pick a prompt and a token → its logit-lens trajectory (probability and rank per layer).

    The tokens offered are ``tokens`` plus each prompt's ``top_k`` final predictions."""
    from mechlib.analyses.lens import logit_lens
    from mechlib.hooks import forward
    from mechlib.tasks.contrast import PromptBatch, single_token_id

    batch = PromptBatch.from_prompts(model, prompts)
    ids = [single_token_id(model, t, what=f"token {t!r}") for t in (tokens or [])]
    final = batch.at_last(forward(model, batch.tokens, extras=batch.extras))
    for row in final.topk(top_k, dim=-1).indices.tolist():
        ids += [i for i in row if i not in ids]
    lens = logit_lens(model, batch, targets=ids)
    names = lens.labels["target"]

    def draw(fig, prompt, token):
        k = names.index(token)
        p = lens.per_prompt[prompt, :, k].numpy()
        r = lens.ranks[prompt, :, k].numpy() + 1
        ax1 = fig.add_subplot(121)
        ax1.plot(p, marker=".")
        ax1.set(xlabel="layer", ylabel="probability", title=f"{token!r}: probability")
        ax2 = fig.add_subplot(122)
        ax2.plot(r, marker=".", color="C3")
        ax2.set_yscale("log")
        ax2.invert_yaxis()
        ax2.set(xlabel="layer", ylabel="rank + 1", title=f"{token!r}: rank")
        fig.suptitle(f"logit lens, prompt {prompt}: {batch.prompts[prompt][-50:]!r}", fontsize=9)
        fig.tight_layout()

    ex = Explorer("logit-lens trajectories", {
        "prompt": [(f"{i}: {p[:40]!r}", i) for i, p in enumerate(batch.prompts)],
        "token": [(repr(t), t) for t in names],
    }, draw, figsize=(9, 3.4))
    ex.lens = lens
    return ex


# ------------------------------------------------------------------------------------------------
# the notebooks' report card (read by the reports gallery)
# ------------------------------------------------------------------------------------------------

REPORT_MIME = "application/vnd.mechlib.report+json"
VERDICTS = ("reproduced", "partly", "not reproduced")


class ReportCard:
    """A notebook's one-line summary: the paper, the finding, the verdict, the model and settings.
    Displays as a small HTML box and carries a JSON bundle the reports gallery reads."""

    def __init__(self, *, paper: str, finding: str, status: str, model: str):
        if status not in VERDICTS:
            raise ValueError(f"status={status!r}: one of {VERDICTS}")
        self.data = dict(paper=paper, finding=finding, status=status, model=model)

    def _repr_mimebundle_(self, include=None, exclude=None):
        import html

        d = {k: html.escape(v) for k, v in self.data.items()}
        box = (f"<div style='border:1px solid #ccc;border-radius:6px;padding:.6em'><b>{d['status']}</b> — "
               f"{d['finding']}<br><i>{d['paper']}</i><br><small>{d['model']}</small></div>")
        return {REPORT_MIME: self.data, "text/html": box,
                "text/plain": f"[{self.data['status']}] {self.data['finding']} ({self.data['model']})"}


def effects_plot(effects, *, color=None, xlabel: str = "", title: str = "", figsize=(7.5, 4.0), fontsize: int = 8):
    """A forest plot of named effects with their CIs (``{name: stats.Effect}``, top to bottom in
    order), a line at 0; ``color(name)`` picks each point's colour (default ``"C0"``). Returns the figure."""
    import matplotlib.pyplot as plt

    names = list(effects)
    fig, ax = plt.subplots(figsize=figsize)
    for i, name in enumerate(names):
        e = effects[name]
        ax.errorbar(e.mean, i, xerr=[[e.mean - e.low], [e.high - e.mean]], fmt="o", capsize=3,
                    color=color(name) if color else "C0")
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=fontsize)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    fig.tight_layout()
    return fig


def finding(ok, text: str, *, strict: bool = True) -> bool:
    """Print a notebook's finding as ✓/✗ and return whether it holds. With ``strict`` (the model the
    finding was established on, checked in CI) a finding that fails raises ``AssertionError``; on
    another model (``MODEL=...``) it is reported, not fatal — a finding that does not carry over is
    a result, not a crash.

    Example:
        >>> viz.finding(iou > chance, "reuse beats chance", strict=MODEL == "smollm2-135m")  # doctest: +SKIP
    """
    ok = bool(ok)
    print(("✓ " if ok else "✗ ") + text)
    if strict and not ok:
        raise AssertionError(text)
    return ok


def report_card(*, paper: str, finding: str, status: str, model: str) -> ReportCard:
    """The summary a notebook ends with (``status``: reproduced / partly / not reproduced)."""
    return ReportCard(paper=paper, finding=finding, status=status, model=model)


# ------------------------------------------------------------------------------------------------
# edge circuits (mechlib.analyses.edges.Graph)
# ------------------------------------------------------------------------------------------------


def edge_diagram(graph, *, engine: str = "auto", title: Optional[str] = None) -> HTMLView:
    """An SVG of an edge circuit (:class:`mechlib.analyses.edges.Graph`): one column per layer's
    heads and per MLP, input on the left, logits on the right; an edge is drawn from its writer
    to the node whose input it feeds (solid: a query, MLP or logits input; dashed: a key or value
    input — on grouped-query models to every head of the KV group in the graph), green when its
    score supports the clean answer, red when it opposes it, wider for larger |score|.

    Args:
        engine: ``"dot"`` (graphviz's ``dot`` program), ``"python"`` (built-in SVG layout, no
            dependency) or ``"auto"`` (dot when installed), as :func:`circuit_diagram`.
        title: default ``"edge circuit (N edges)"``.

    Returns:
        an :class:`HTMLView` with the inline SVG (``.html``), displayed by Jupyter.

    Example:
        >>> viz.edge_diagram(scores.graph(50))          # doctest: +SKIP
    """
    import shutil

    from mechlib.analyses.edges import Graph

    if not isinstance(graph, Graph):
        raise TypeError(f"edge_diagram draws an edge Graph (EdgeScores.graph(...)), got {type(graph).__name__}; "
                        "for a head Circuit use viz.circuit_diagram")
    if engine not in ("auto", "dot", "python"):
        raise ValueError(f"engine={engine!r}: choose 'auto', 'dot' or 'python'")
    if engine == "dot" and shutil.which("dot") is None:
        raise RuntimeError("engine='dot' needs graphviz's `dot` program (Debian: apt-get install graphviz; "
                           "`make setup` installs it); engine='python' needs nothing")
    use_dot = engine == "dot" or (engine == "auto" and shutil.which("dot") is not None)
    spec = graph.spec
    L = spec.n_layers

    def column(name: str) -> int:
        if name == "input":
            return 0
        if name == "logits":
            return 2 * L + 1
        if name.startswith("M"):
            return 2 + 2 * int(name[1:])
        return 1 + 2 * int(name[1:].split("H")[0])

    def column_name(c: int) -> str:
        if c == 0:
            return "input"
        layer, r = divmod(c - 1, 2)
        return f"L{layer} heads" if r == 0 else f"M{layer}"

    n_cols = 2 * L + 2
    order = [column_name(n_cols - 2 - i) for i in range(n_cols - 1)]
    nodes: dict[str, dict] = {}
    for name in graph.node_names(exclude_io=False) + ["input", "logits"]:
        c = column(name)
        nodes[name] = dict(column=c, layer=c, member="both",
                           cls="logits" if name == "logits" else column_name(c))
    edges = []
    scores = graph.scores
    for e in graph.mask.nonzero().flatten().tolist():
        src, dst = spec.edge_names[e].split("->")
        w = float(scores[e]) if scores is not None else 1.0
        slot = int(spec.edge_dst[e])
        kind = 1 if dst.endswith(("<k>", "<v>")) else 0
        targets = [spec.node_names_all[n] for n in spec.slot_nodes[slot]]
        for t in targets:
            if t in nodes:
                edges.append((src, t, w, kind))
    title = title or f"edge circuit ({len(graph)} edges)"
    if use_dot:
        import graphviz

        svg = graphviz.Source(_dot_source(nodes, edges, order, title)).pipe(format="svg").decode()
        svg = svg[svg.find("<svg"):]
    else:
        svg = _svg_fallback(nodes, edges, order, title)
    legend = ("<div style='font:12px sans-serif'>edges: solid = query / MLP / logits input, dashed = key or "
              "value input; green supports the clean answer, red opposes it; width ∝ |score|</div>")
    return HTMLView(svg + legend, title=title)
