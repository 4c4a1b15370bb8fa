"""Typed results: frozen dataclasses of CPU tensors with named, labelled axes.

Every analysis returns a :class:`Result` (or a subclass) whose ``values`` are averaged over
prompts and whose ``per_prompt`` keeps the prompt axis first. The base gives:

* ``to_dataframe()`` — one row per cell (axis labels + value, and stderr when per-prompt values exist),
* ``top(k)`` — the k largest (or largest-|value|) cells,
* ``locate(axis, key)`` / ``select(axis, key)`` — a cell by its label; on a ``layer`` axis by the
  layer number (a result over ``layers=[15]`` has one entry, labelled ``L15``: ask for 15),
* ``ci()`` — bootstrap confidence intervals over prompts,
* ``plot()`` — a matplotlib figure (heatmap for 2-D, line for 1-D), returned, never shown,
* ``save(path)`` / ``Result.load(path)`` — one safetensors file (tensors + JSON metadata), written
  atomically, never pickled,
* ``_repr_html_`` — a compact summary in notebooks.

Computation happens when a result is built, never when it is plotted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from mechlib.numerics import widen

_REGISTRY: dict[str, type] = {}


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make reports unreadable to others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def bootstrap_ci(x: Tensor, *, level: float = 0.95, n_boot: int = 9999, seed: int = 0) -> tuple[float, float]:
    """BCa bootstrap CI of the mean of ``x`` (``[n]``, e.g. per-prompt paired differences); see
    :func:`mechlib.stats.bootstrap_ci`."""
    from mechlib.stats import bootstrap_ci as _ci

    return _ci(torch.as_tensor(x).float().flatten(), level=level, n_resamples=n_boot, seed=seed)


def layer_number(label: str) -> Optional[int]:
    """The layer a ``layer``-axis label names (``"L15"`` or ``"15"`` → 15), or ``None`` (e.g. the
    logit lens's ``"15_pre"``, which is a point of the residual stream, not a layer's output)."""
    m = re.fullmatch(r"L?(\d+)", str(label))
    return int(m.group(1)) if m else None


def _is_int(label) -> bool:
    return isinstance(label, str) and label.lstrip("-").isdigit()


@dataclass(frozen=True)
class Result:
    """Base result. Subclasses add fields; tensors are stored on the CPU, detached, half
    precision as float32 (tables of a bf16/fp16 model read into numpy and pandas as any other).

    Attributes:
        values: the table, averaged over prompts, with ``len(axis_names)`` axes.
        axis_names: e.g. ``("layer", "head")``.
        labels: per-axis labels, e.g. ``{"head": ("H0", ...)}``; missing axes get indices.
        per_prompt: ``[prompt, *values.shape]`` or ``None``.
        baselines: named reference values (``clean``, ``corrupted`` ...).
        metadata: JSON-able facts about how it was computed (model, site, options).
    """

    values: Tensor
    axis_names: tuple[str, ...]
    labels: Mapping[str, Sequence[str]] = field(default_factory=dict)
    per_prompt: Optional[Tensor] = None
    baselines: Mapping[str, float] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = "result"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        _REGISTRY[cls.__name__] = cls

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                object.__setattr__(self, f.name, widen(v.detach().cpu()))
        object.__setattr__(self, "axis_names", tuple(self.axis_names))
        if self.values.ndim != len(self.axis_names):
            raise ValueError(f"values has {self.values.ndim} axes but axis_names is {self.axis_names}")
        if self.per_prompt is not None and tuple(self.per_prompt.shape[1:]) != tuple(self.values.shape):
            raise ValueError(
                f"per_prompt shape {tuple(self.per_prompt.shape)} does not match values "
                f"{tuple(self.values.shape)} with a leading prompt axis"
            )
        labels = {}
        for ax, n in zip(self.axis_names, self.values.shape):
            lab = tuple(str(x) for x in self.labels.get(ax, range(n)))
            if len(lab) != n:
                raise ValueError(f"axis {ax!r} has {n} entries but {len(lab)} labels")
            labels[ax] = lab
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "baselines", {k: float(v) for k, v in self.baselines.items()})

    # ------------------------------------------------------------------ statistics
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def n_prompts(self) -> Optional[int]:
        return None if self.per_prompt is None else int(self.per_prompt.shape[0])

    def stderr(self) -> Optional[Tensor]:
        """Standard error of the mean over prompts (None without per-prompt values)."""
        if self.per_prompt is None or self.per_prompt.shape[0] < 2:
            return None
        return self.per_prompt.float().std(0) / math.sqrt(self.per_prompt.shape[0])

    def ci(self, level: float = 0.95, n_boot: int = 9999, seed: int = 0) -> tuple[Tensor, Tensor]:
        """BCa bootstrap CI of the mean over prompts (scipy): ``(low, high)``, each like ``values``."""
        from mechlib.stats import bootstrap_ci as _ci

        if self.per_prompt is None:
            raise ValueError("this result has no per-prompt values to bootstrap")
        n = self.per_prompt.shape[0]
        lo, hi = _ci(self.per_prompt.float().reshape(n, -1), level=level, n_resamples=n_boot, seed=seed)
        as_t = lambda a: torch.as_tensor(a, dtype=torch.float32).reshape(self.values.shape)  # noqa: E731
        return as_t(lo), as_t(hi)

    # ------------------------------------------------------------------ tables
    def to_dataframe(self):
        """Long format: one row per cell, axis label columns, ``value`` (and ``stderr``).

        Each axis gives a column of positions and one of labels (``head``, ``head_label``); a
        ``layer`` axis labelled by layer gives the layer number itself (``layer`` 15 for the entry
        ``L15``, whatever its position), so a result over a few layers names them right."""
        import pandas as pd

        grids = torch.meshgrid(*[torch.arange(n) for n in self.values.shape], indexing="ij")
        data: dict[str, Any] = {}
        for ax, g in zip(self.axis_names, grids):
            flat = g.flatten().tolist()
            numbers_ = self._layer_numbers(ax)
            data[ax] = flat if numbers_ is None else [numbers_[i] for i in flat]
            data[f"{ax}_label"] = [self.labels[ax][i] for i in flat]
        data["value"] = self.values.flatten().float().tolist()
        se = self.stderr()
        if se is not None:
            data["stderr"] = se.flatten().tolist()
        return pd.DataFrame(data)

    def top(self, k: int = 10, *, by_abs: bool = False, largest: bool = True):
        """The ``k`` cells with the largest value (or |value|, or the smallest), as a DataFrame."""
        df = self.to_dataframe()
        key = df["value"].abs() if by_abs else df["value"]
        order = key.sort_values(ascending=not largest).index[:k]
        return df.loc[order].reset_index(drop=True)

    # ------------------------------------------------------------------ plotting
    def plot(self, ax=None, *, title: Optional[str] = None, cmap: str = "RdBu_r", **kw):
        """A matplotlib figure: heatmap (2-D, symmetric colour scale) or line (1-D)."""
        import matplotlib.pyplot as plt

        if ax is None:
            fig, ax = plt.subplots(figsize=kw.pop("figsize", (7, 4.5)))
        else:
            fig = ax.figure
        v = self.values.float()
        title = title or self.metadata.get("title") or type(self).__name__
        if v.ndim == 1:
            ax.plot(range(len(v)), v.numpy(), marker="o", **kw)
            ax.set_xlabel(self.axis_names[0])
            if len(v) <= 40:
                ax.set_xticks(range(len(v)), self.labels[self.axis_names[0]], rotation=90)
        elif v.ndim == 2:
            lim = float(v.abs().max()) or 1.0
            im = ax.imshow(v.numpy(), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto", **kw)
            ax.set_ylabel(self.axis_names[0])
            ax.set_xlabel(self.axis_names[1])
            cols = self.labels[self.axis_names[1]]
            if len(cols) <= 40:
                ax.set_xticks(range(len(cols)), cols, rotation=90)
            fig.colorbar(im, ax=ax)
        else:
            plt.close(fig)
            raise ValueError(
                f"plot() draws 1-D and 2-D results; this one has axes {self.axis_names}: select a "
                f"slice first, e.g. result.select({self.axis_names[0]!r}, 0).plot()"
            )
        ax.set_title(title)
        fig.tight_layout()
        return fig

    def to_plotly(self, *, title: Optional[str] = None):
        """An interactive plotly figure (``pip install mechlib[plotly]``): a heatmap for 2-D results
        with hover labels naming each cell (e.g. layer and head, or layer and token), a line for
        1-D. matplotlib (:meth:`plot`) stays the default for offline reports."""
        try:
            import plotly.graph_objects as go
        except ImportError:
            raise ImportError("to_plotly needs plotly: pip install 'mechlib[plotly]' (or pip install plotly)") from None
        v = self.values.float()
        title = title or self.metadata.get("title") or type(self).__name__
        if v.ndim == 1:
            ax = self.axis_names[0]
            fig = go.Figure(go.Scatter(x=list(self.labels[ax]), y=v.tolist(), mode="lines+markers",
                                       hovertemplate=f"{ax} %{{x}}<br>value %{{y:.4g}}<extra></extra>"))
            fig.update_layout(xaxis_title=ax)
        elif v.ndim == 2:
            a0, a1 = self.axis_names
            lim = float(v.abs().max()) or 1.0
            fig = go.Figure(go.Heatmap(z=v.tolist(), x=list(self.labels[a1]), y=list(self.labels[a0]), zmin=-lim,
                                       zmax=lim, colorscale="RdBu", reversescale=True,
                                       hovertemplate=f"{a0} %{{y}}<br>{a1} %{{x}}<br>value %{{z:.4g}}<extra></extra>"))
            fig.update_layout(xaxis_title=a1, yaxis_title=a0, yaxis_autorange="reversed")
        else:
            raise ValueError(f"to_plotly draws 1-D and 2-D results; this one has axes {self.axis_names}: select() a slice")
        fig.update_layout(title=title)
        return fig

    def _layer_numbers(self, axis: str) -> Optional[list[int]]:
        """The layer numbers of a ``layer`` axis whose labels name layers (else ``None``)."""
        if axis != "layer":
            return None
        found = [layer_number(lab) for lab in self.labels[axis]]
        return None if any(n is None for n in found) else found

    def locate(self, axis: str, key: Union[int, str]) -> int:
        """The position along ``axis`` of ``key``.

        ``key`` is a label (``"L15"``, ``"H3"``, a token) or an integer. On a ``layer`` axis an
        integer is the **layer number**: a probe over ``layers=[15]`` has one entry, and
        ``locate("layer", 15)`` is 0; likewise on an axis labelled by numbers (a faithfulness
        curve's ``size``: ``locate("size", 300)`` is the 300-edge circuit). An integer that is not
        one of those numbers but is a valid position still reads as the position, with a warning
        (it is ambiguous); on other axes an integer is the position (negative counts from the end).

        Raises:
            ValueError: naming the axis and its labels, when ``key`` is neither.

        Example:
            >>> r = mechlib.probe(model, prompts, labels, layers=[15])       # doctest: +SKIP
            >>> r.locate("layer", 15), r.locate("layer", "L15")
            (0, 0)
        """
        if axis not in self.axis_names:
            raise ValueError(f"no axis {axis!r}; axes are {self.axis_names}")
        labels = list(self.labels[axis])
        n = len(labels)
        shown = ", ".join(labels[:12]) + (f", … ({n} in all)" if n > 12 else "")
        layers = self._layer_numbers(axis)
        if layers is None and axis != "layer":  # an axis labelled by numbers (a curve's "size"): the number
            layers = [int(lab) for lab in labels] if labels and all(_is_int(lab) for lab in labels) else None
        word = "layer" if axis == "layer" else axis
        if isinstance(key, str):
            if key in labels:
                return labels.index(key)
            if layers is not None and layer_number(key) in layers:  # "15" or "L15" for a layer labelled otherwise
                return layers.index(layer_number(key))
            raise ValueError(f"{type(self).__name__} has no {axis} {key!r}; its {axis} labels are {shown}")
        if isinstance(key, Tensor) and key.ndim == 0 and not key.is_floating_point() and key.dtype != torch.bool:
            key = int(key)
        if isinstance(key, bool) or not isinstance(key, numbers.Integral):
            raise TypeError(f"{axis}={key!r}: give a label (e.g. {labels[0]!r}) or an integer")
        key = int(key)
        if layers is not None:
            if key in layers:
                return layers.index(key)
            if 0 <= key < n:
                warnings.warn(f"{type(self).__name__} has no {word} {key} (its {word}s: {shown}); reading {key} as "
                              f"the position of {labels[key]} — pass the {word} number ({layers[key]}) instead",
                              stacklevel=3)
                return key
            if -n <= key < 0:
                return key % n
            raise ValueError(f"{type(self).__name__} has no {word} {key}: its {word}s are {shown} (pass one of "
                             f"these {word} numbers or labels)")
        if -n <= key < n:
            return key % n
        raise ValueError(f"{axis} position {key} is out of range: {type(self).__name__} has {n} along {axis!r} "
                         f"({shown}); pass a position or a label")

    def select(self, axis: str, key: Union[int, str]) -> "Result":
        """A plain :class:`Result` with one axis fixed at ``key``: a label, or on a ``layer`` axis
        the layer number (see :meth:`locate`)."""
        i = self.locate(axis, key)
        d = self.axis_names.index(axis)
        return Result(
            values=self.values.select(d, i),
            axis_names=tuple(a for a in self.axis_names if a != axis),
            labels={a: l for a, l in self.labels.items() if a != axis},
            per_prompt=None if self.per_prompt is None else self.per_prompt.select(d + 1, i),
            baselines=self.baselines,
            metadata={**self.metadata, "selected": {axis: self.labels[axis][i]}},
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, Path]) -> Path:
        """Write one ``.safetensors`` file (tensors + JSON metadata) atomically."""
        from safetensors.torch import save

        tensors, meta = {}, {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                tensors[f.name] = v.contiguous()
            else:
                meta[f.name] = _jsonable(v)
        header = {"mechlib_class": type(self).__name__, "fields": json.dumps(meta)}
        path = Path(path)
        atomic_write_bytes(path, save(tensors, metadata=header))
        return path

    @staticmethod
    def load(path: Union[str, Path], model=None) -> "Result":
        """Read a file written by :meth:`save`, as the class that wrote it. With ``model``, warn when
        it is not the model the result was made with (its weights digest differs)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "mechlib_class" not in header:
            raise ValueError(f"{path} is not a mechlib result file (no mechlib_class in its header)")
        cls = _REGISTRY.get(header["mechlib_class"], Result)
        meta = json.loads(header["fields"])
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in tensors:
                kwargs[f.name] = tensors[f.name]
            elif f.name in meta:
                kwargs[f.name] = meta[f.name]
        kwargs["axis_names"] = tuple(kwargs["axis_names"])
        out = cls(**kwargs)
        prov = out.metadata.get("provenance")
        if model is not None and prov:
            import warnings

            from mechlib.provenance import weights_digest

            if prov.get("weights") != weights_digest(model):
                warnings.warn(f"{path} was made with {prov.get('model')!r} (weights {prov.get('weights')}), not with "
                              f"this model (weights {weights_digest(model)}): its numbers describe another model",
                              stacklevel=2)
        return out

    @property
    def provenance(self) -> dict:
        """How this result was made (verb, arguments, model and weights digest, inputs, versions)."""
        return dict(self.metadata.get("provenance", {}))

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        dims = " × ".join(f"{a}={n}" for a, n in zip(self.axis_names, self.values.shape))
        base = ", ".join(f"{k}={v:.3g}" for k, v in self.baselines.items())
        prompts = f", {self.n_prompts} prompts" if self.n_prompts else ""
        prov = self.metadata.get("provenance") or {}
        made = f"; {prov['verb']} on {prov['model']}" if prov else ""
        return f"{type(self).__name__}({dims}{prompts}{', ' + base if base else ''}{made})"

    def __repr__(self) -> str:
        return self.summary()

    def _repr_html_(self) -> str:
        top = self.top(5, by_abs=True)
        return f"<p><b>{self.summary()}</b></p>" + top.to_html(index=False, float_format="%.4g")


_REGISTRY["Result"] = Result
