"""Results of one analysis: per-layer tensors and a model-wide summary (data only).

The engine computes them (:mod:`lightning_anomaly.engine.analyze`, :mod:`lightning_anomaly.engine.outliers`);
the types here hold them and give derived views (counts, rankings, summaries, plain-type forms).

Reports convert to and from plain Python types and tensors only (:meth:`AnalysisReport.to_dict`),
so they survive ``torch.save``/``torch.load(weights_only=True)`` and JSON (with ``tensors="list"``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_anomaly.criteria import AnomalyCriteria

__all__ = ["CLUSTERING_SETTINGS", "AnalysisReport", "LayerReport"]

#: Settings of :class:`AnomalyCriteria` that change the clustering itself, or only the outlier score
#: (which ``reflag`` keeps); the others change the flags.
CLUSTERING_SETTINGS = (
    "k_range",
    "n_components",
    "max_iter",
    "tol",
    "reg_covar",
    "kmeans_iter",
    "n_init",
    "class_conditional",
    "global_view",
    "score_separation",  # the outlier score only, which reflag keeps as the analysis made it
)

#: Per-filter tensors of a LayerReport and their dtypes: one table for to_dict and from_dict.
_TENSOR_DTYPES: dict[str, torch.dtype] = {
    "k": torch.long,
    "ch": torch.float64,
    "activation": torch.float64,
    "min_cluster_size": torch.long,
    "degenerate": torch.bool,
    "reason": torch.int8,
    "explained": torch.float32,
    "converged": torch.bool,
    "unbalanced": torch.bool,
    "high_ch": torch.bool,
    "high_activation": torch.bool,
    "anomaly": torch.bool,
    "class_selective": torch.bool,
    "separation": torch.float64,
    "separated": torch.bool,
    "labels": torch.int8,
}
#: The plotted points, kept for a few filters only, and the layer's share of the outlier score.
_POINT_DTYPES: dict[str, torch.dtype] = {
    "point_filters": torch.long,
    "points": torch.float32,
    "point_labels": torch.int8,
    "score_parts": torch.float64,
}


@dataclass
class LayerReport:
    """Per-filter results of one analysed layer.

    A *layer* is one call of a conv module in the probe forward: the first call keeps the module's
    name, a module called again gives a layer per call, named ``name#i`` for its i-th repeated call.

    Every tensor has one entry per filter (output channel) on the CPU; ``labels`` has one row per
    filter and one column per probe sample.

    Attributes:
        name: Layer name (module name, ``#i`` appended for a module's i-th repeated call).
        n_filters: Number of filters ``C``.
        n_components: Dimensions the filters were clustered in (``min(n_components, H * W)``).
        map_shape: ``(H, W)`` of the layer's feature maps.
        k: ``(C,)`` int64, chosen number of mixture components (0 where degenerate).
        ch: ``(C,)`` float64, Calinski-Harabasz index at ``k`` (NaN where degenerate).
        activation: ``(C,)`` float64, mean absolute activation over the probe.
        min_cluster_size: ``(C,)`` int64, size of the smallest non-empty cluster (0 where degenerate).
        degenerate: ``(C,)`` bool, the filter could not be clustered (see ``reason``).
        reason: ``(C,)`` int8 code from :data:`lightning_anomaly.engine.capture.DEGENERATE_REASONS`.
        explained: ``(C,)`` float32, share of the maps' variance kept by the PCA.
        converged: ``(C,)`` bool, EM met its tolerance at the chosen ``k``.
        unbalanced: ``(C,)`` bool, smallest cluster within ``criteria.min_cluster_size``.
        high_ch: ``(C,)`` bool, CH above ``ch_ratio`` x the layer's typical CH.
        high_activation: ``(C,)`` bool, activation above ``activation_ratio`` x typical.
        anomaly: ``(C,)`` bool, all three criteria hold and the tiny cluster is not a class.
        separation: ``(C,)`` float64, distance of the smallest cluster from the rest of the probe
            in pooled within-cluster standard deviations (:func:`~lightning_anomaly.engine.scores.separation`).
        separated: ``(C,)`` bool, ``separation`` at least ``criteria.min_separation``.
        class_selective: ``(C,)`` bool, the filter has a tiny cluster that is essentially one class
            of the probe (see :meth:`AnomalyCriteria.class_selective`): a class detector, not an
            anomaly. All false without class labels.
        labels: ``(C, N)`` int8, cluster of each probe sample at the chosen ``k`` (-1 where degenerate).
        ch_typical: The layer's typical CH (median or mean over non-degenerate filters).
        activation_typical: The layer's typical activation.
        point_filters: ``(A,)`` int64, the anomaly filters (up to 8, highest CH first) whose points are kept.
        points: ``(A, N, q)`` float32, their 2-D (or 1-D) PCA points, for plots.
        point_labels: ``(A, N)`` int8, their cluster labels.
        score_parts: ``(V, N)`` float64, this layer's share of each view's raw outlier score
            (:func:`~lightning_anomaly.engine.outliers.view_score`); ``(0, 0)`` in reports saved
            before it existed.
        module: Name of the module in ``model.named_modules()`` (masks and pruning act on it).
        call: Which call of that module this layer is (0 for the first; ``name`` ends ``#call`` after it).
    """

    name: str
    n_filters: int
    n_components: int
    map_shape: tuple[int, int]
    k: Tensor
    ch: Tensor
    activation: Tensor
    min_cluster_size: Tensor
    degenerate: Tensor
    reason: Tensor
    explained: Tensor
    converged: Tensor
    unbalanced: Tensor
    high_ch: Tensor
    high_activation: Tensor
    anomaly: Tensor
    labels: Tensor
    ch_typical: float = math.nan
    activation_typical: float = math.nan
    point_filters: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    points: Tensor = field(default_factory=lambda: torch.zeros(0, 0, 2))
    point_labels: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.int8))
    class_selective: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    separation: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    separated: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    score_parts: Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.float64))
    module: str = ""
    call: int = 0

    def __post_init__(self) -> None:
        if not self.module:  # reports saved before the field: the layer name says it
            base, _, call = self.name.partition("#")
            self.module, self.call = base, int(call or 0)
        if self.separated.numel() == 0 and self.n_filters > 0:
            self.separated = ~self.degenerate  # reports from before the rule: it did not apply
        if self.class_selective.numel() == 0 and self.n_filters > 0:
            self.class_selective = torch.zeros(self.n_filters, dtype=torch.bool)
        if self.separation.numel() == 0 and self.n_filters > 0:
            self.separation = torch.zeros(self.n_filters, dtype=torch.float64)

    @property
    def anomaly_count(self) -> int:
        """Number of anomaly filters in this layer."""
        return int(self.anomaly.sum())

    @property
    def class_selective_count(self) -> int:
        """Number of class-selective filters in this layer."""
        return int(self.class_selective.sum())

    @property
    def degenerate_count(self) -> int:
        """Number of filters that could not be clustered."""
        return int(self.degenerate.sum())

    @property
    def anomaly_indices(self) -> list[int]:
        """Indices of the anomaly filters."""
        return self.anomaly.nonzero().flatten().tolist()

    def small_cluster_members(self, filter_index: int) -> Tensor:
        """Bool mask ``(N,)`` of the probe samples in the smallest cluster of one filter."""
        return self.small_cluster_masks(torch.tensor([filter_index]))[0]

    def small_cluster_masks(self, filters: Tensor) -> Tensor:
        """Bool ``(F, N)``: for each filter index in ``filters``, the members of its smallest cluster.

        Raises:
            ValueError: The report was saved without labels (``to_dict(labels=False)``).
        """
        if self.labels.shape[-1] == 0 and self.n_filters > 0:
            raise ValueError(
                f"layer {self.name!r} has no cluster labels (saved with to_dict(labels=False), as in the JSON "
                "history); use a report saved with labels, e.g. the callback's last_report or state_dict"
            )
        lab = self.labels[filters].long()  # (F, N), -1 where degenerate
        if lab.numel() == 0:
            return torch.zeros(lab.shape, dtype=torch.bool)
        k = int(lab.max().clamp_min(0)) + 1
        sizes = torch.zeros(lab.shape[0], k + 1, dtype=torch.long).scatter_add_(1, lab + 1, torch.ones_like(lab))
        sizes = sizes[:, 1:]  # drop the -1 column
        sizes = torch.where(sizes > 0, sizes, torch.full_like(sizes, lab.shape[1] + 1))
        smallest = sizes.argmin(1, keepdim=True)  # first label on ties, as small_cluster_members
        return (lab == smallest) & (lab >= 0).all(1, keepdim=True)

    def to_dict(self, tensors: Literal["tensor", "list"] = "tensor", labels: bool = True) -> dict[str, Any]:
        """Plain-type view; ``tensors="list"`` gives JSON-ready lists (NaN becomes ``None``)."""
        out: dict[str, Any] = {
            "name": self.name,
            "module": self.module,
            "call": self.call,
            "n_filters": self.n_filters,
            "n_components": self.n_components,
            "map_shape": list(self.map_shape),
            "ch_typical": _plain_float(self.ch_typical),
            "activation_typical": _plain_float(self.activation_typical),
        }
        for f in (*_TENSOR_DTYPES, *_POINT_DTYPES):
            if f == "labels" and not labels:
                continue
            t: Tensor = getattr(self, f)
            out[f] = t.clone() if tensors == "tensor" else _to_list(t)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerReport:
        """Inverse of :meth:`to_dict` (either tensor form)."""
        c = int(data["n_filters"])
        fields: dict[str, Any] = {}
        for f, dt in _TENSOR_DTYPES.items():
            v = data.get(f)
            if v is None:
                fields[f] = torch.full((c, 0), -1, dtype=dt) if f == "labels" else torch.zeros(c, dtype=dt)
            elif isinstance(v, Tensor):
                fields[f] = v.to(dt)
            else:
                fields[f] = torch.tensor([math.nan if e is None else e for e in v] if f == "ch" else v, dtype=dt)
        extras: dict[str, Any] = {}
        for f, dt in _POINT_DTYPES.items():
            if data.get(f) is not None:
                v = data[f]
                extras[f] = v.to(dt) if isinstance(v, Tensor) else torch.tensor(v, dtype=dt)
        return cls(
            name=str(data["name"]),
            module=str(data.get("module") or ""),
            call=int(data.get("call") or 0),
            n_filters=c,
            n_components=int(data["n_components"]),
            map_shape=(int(data["map_shape"][0]), int(data["map_shape"][1])),
            ch_typical=_from_plain(data.get("ch_typical")),
            activation_typical=_from_plain(data.get("activation_typical")),
            **fields,
            **extras,
        )


@dataclass
class AnalysisReport:
    """What one analysis found, over all analysed layers.

    Attributes:
        layers: Ordered mapping layer name -> :class:`LayerReport`, in forward order.
        n_samples: Probe size ``N``.
        outlier_counts: ``(N,)`` int64: for each probe sample, the number of anomaly filters whose
            smallest cluster it belongs to.
        grad_norms: ``(N,)`` float64 per-sample gradient norms, or ``None`` without targets.
        outlier_scores: ``(N,)`` float64 continuous outlier score
            (:func:`~lightning_anomaly.engine.outliers.score_outliers`): how far the small clusters
            that hold each sample lie from the rest, over every k tried and, with class labels, two
            views of each filter. ``None`` for reports saved before it existed.
        criteria: The :class:`~lightning_anomaly.AnomalyCriteria` settings used, as a dict.
        backend: ``"torch"`` or ``"sklearn"``.
        seed: Seed of the mixture initialisation.
        seconds: Wall time of the analysis.
        classes: ``(N,)`` int64 class id of each probe sample (from the targets), or ``None`` when
            the analysis had no class labels (then no filter is class-selective).
    """

    layers: OrderedDict[str, LayerReport]
    n_samples: int
    outlier_counts: Tensor
    grad_norms: Tensor | None = None
    outlier_scores: Tensor | None = None
    criteria: dict[str, Any] = field(default_factory=dict)
    backend: str = "torch"
    seed: int = 0
    seconds: float = math.nan
    classes: Tensor | None = None

    @property
    def n_filters(self) -> int:
        """Filters analysed, over all layers."""
        return sum(lr.n_filters for lr in self.layers.values())

    @property
    def anomaly_count(self) -> int:
        """Anomaly filters over all layers."""
        return sum(lr.anomaly_count for lr in self.layers.values())

    @property
    def class_selective_count(self) -> int:
        """Class-selective filters (a tiny cluster that is one class), over all layers."""
        return sum(lr.class_selective_count for lr in self.layers.values())

    @property
    def degenerate_count(self) -> int:
        """Filters that could not be clustered, over all layers."""
        return sum(lr.degenerate_count for lr in self.layers.values())

    @property
    def outlier_indices(self) -> list[int]:
        """Probe indices of the outlier samples: members of an anomaly filter's smallest cluster."""
        return self.outlier_counts.nonzero().flatten().tolist()

    def top_outliers(self, k: int = 32) -> list[int]:
        """Probe indices of up to ``k`` suspicious samples, most suspicious first.

        Ranked by ``outlier_scores`` (how far the small clusters that hold a sample lie from the
        rest, :func:`~lightning_anomaly.engine.outliers.score_outliers`), ties broken by
        ``outlier_counts`` (anomaly filters), then by index; samples with neither are left out. The
        score does not hinge on the hard flags, so a planted group keeps its rank whatever its size
        relative to the tiny-cluster bound (``docs/FLAGS.md``, precision@k across planted shares).
        """
        counts = self.outlier_counts.tolist()
        scores = self.outlier_scores.tolist() if self.outlier_scores is not None else [0.0] * len(counts)
        order = sorted(range(len(counts)), key=lambda i: (-scores[i], -counts[i], i))
        return [i for i in order[:k] if counts[i] > 0 or scores[i] > 0]

    @property
    def outlier_grad_norm(self) -> float | None:
        """Mean gradient norm of the outlier samples, or ``None`` (no targets or no outlier)."""
        return self._mean_grad(outlier=True)

    @property
    def normal_grad_norm(self) -> float | None:
        """Mean gradient norm of the other probe samples, or ``None``."""
        return self._mean_grad(outlier=False)

    @property
    def gradient_ratio(self) -> float | None:
        """Outlier over normal mean gradient norm (the paper's H2), or ``None`` when undefined."""
        out, norm = self.outlier_grad_norm, self.normal_grad_norm
        if out is None or norm is None or norm <= 0:
            return None
        ratio = out / norm
        return ratio if math.isfinite(ratio) else None

    def reflag(self, criteria: AnomalyCriteria) -> AnalysisReport:
        """The same analysis judged by other flagging rules, without clustering again.

        Same as :func:`lightning_anomaly.engine.outliers.reflag`.

        Raises:
            ValueError: ``criteria`` changes a clustering setting (:data:`CLUSTERING_SETTINGS`).
        """
        from lightning_anomaly.engine.outliers import reflag  # the engine imports this module

        return reflag(self, criteria)

    def _mean_grad(self, outlier: bool) -> float | None:
        mask = self.outlier_counts > 0
        # Both groups must be non-empty for the comparison to mean anything.
        if self.grad_norms is None or bool(mask.all()) or not bool(mask.any()):
            return None
        value = float(self.grad_norms[mask if outlier else ~mask].double().mean())
        return value if math.isfinite(value) else None  # a diverged model: undefined, not NaN

    def summary(self) -> dict[str, Any]:
        """Scalars of this report as plain types (what the callback logs and keeps in history)."""
        return {
            "n_filters": self.n_filters,
            "anomaly_count": self.anomaly_count,
            "anomaly_fraction": self.anomaly_count / max(1, self.n_filters),
            "class_selective_count": self.class_selective_count if self.classes is not None else None,
            "layer_class_selective_counts": {n: lr.class_selective_count for n, lr in self.layers.items()},
            "degenerate_count": self.degenerate_count,
            "layer_anomaly_counts": {n: lr.anomaly_count for n, lr in self.layers.items()},
            "layer_n_filters": {n: lr.n_filters for n, lr in self.layers.items()},
            "layer_mean_ch": {n: _plain_float(_nanmean(lr.ch[~lr.degenerate])) for n, lr in self.layers.items()},
            "layer_ch_hist": {n: _log10_hist(lr.ch[~lr.degenerate]) for n, lr in self.layers.items()},
            "outlier_count": len(self.outlier_indices),
            "outlier_indices": self.outlier_indices,
            "top_outliers": self.top_outliers(),
            "outlier_grad_norm": self.outlier_grad_norm,
            "normal_grad_norm": self.normal_grad_norm,
            "gradient_ratio": self.gradient_ratio,
        }

    def to_dict(self, tensors: Literal["tensor", "list"] = "tensor", labels: bool = True) -> dict[str, Any]:
        """Plain-type view: tensors and Python types only (``tensors="list"`` for JSON)."""
        conv = (lambda t: t.clone()) if tensors == "tensor" else _to_list
        return {
            "layers": [lr.to_dict(tensors, labels) for lr in self.layers.values()],
            "n_samples": self.n_samples,
            "outlier_counts": conv(self.outlier_counts),
            "grad_norms": None if self.grad_norms is None else conv(self.grad_norms),
            "outlier_scores": None if self.outlier_scores is None else conv(self.outlier_scores),
            "criteria": dict(self.criteria),
            "backend": self.backend,
            "seed": self.seed,
            "classes": None if self.classes is None else conv(self.classes),
            "seconds": _plain_float(self.seconds),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnalysisReport:
        """Inverse of :meth:`to_dict` (either tensor form)."""
        layers = OrderedDict((d["name"], LayerReport.from_dict(d)) for d in data["layers"])
        grads = data.get("grad_norms")
        scores = data.get("outlier_scores")
        return cls(
            layers=layers,
            n_samples=int(data["n_samples"]),
            outlier_counts=torch.as_tensor(data["outlier_counts"], dtype=torch.long),
            grad_norms=None if grads is None else torch.as_tensor(grads, dtype=torch.float64),
            outlier_scores=None if scores is None else torch.as_tensor(scores, dtype=torch.float64),
            criteria=dict(data.get("criteria", {})),
            backend=str(data.get("backend", "torch")),
            seed=int(data.get("seed", 0)),
            classes=None if data.get("classes") is None else torch.as_tensor(data["classes"], dtype=torch.long),
            seconds=_from_plain(data.get("seconds")),
        )

    def __repr__(self) -> str:
        return (
            f"AnalysisReport(layers={len(self.layers)}, filters={self.n_filters}, anomalies={self.anomaly_count}, "
            f"degenerate={self.degenerate_count}, outliers={len(self.outlier_indices)}/{self.n_samples}, "
            f"gradient_ratio={_fmt(self.gradient_ratio)})"
        )

    def format(self) -> str:
        """A human-readable table of the per-layer results."""
        rows = [
            f"{'layer':<28} {'filters':>7} {'dims':>4} {'anomaly':>7} {'degen':>5} {'median CH':>11} {'median k':>8}"
        ]
        for name, lr in self.layers.items():
            ok = ~lr.degenerate
            med_ch = float(lr.ch[ok].median()) if bool(ok.any()) else math.nan
            med_k = int(lr.k[ok].median()) if bool(ok.any()) else 0
            rows.append(
                f"{name[:28]:<28} {lr.n_filters:>7} {lr.n_components:>4} {lr.anomaly_count:>7} "
                f"{lr.degenerate_count:>5} {med_ch:>11.4g} {med_k:>8}"
            )
        rows.append(repr(self))
        return "\n".join(rows)


def _log10_hist(ch: Tensor, bins: int = 16) -> dict[str, list[float]] | None:
    """Histogram of log10 CH (finite, positive values) as plain lists: ``edges`` and ``counts``."""
    v = ch.double()
    v = v[torch.isfinite(v) & (v > 0)].log10()
    if v.numel() == 0:
        return None
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return {"edges": [round(e, 5) for e in edges.tolist()], "counts": [int(c) for c in counts.tolist()]}


def _nanmean(t: Tensor) -> float:
    t = t.double()
    t = t[torch.isfinite(t)]
    return float(t.mean()) if t.numel() else math.nan


def _plain_float(v: float | None) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(v)


def _from_plain(v: Any) -> float:
    return math.nan if v is None else float(v)


def _to_list(t: Tensor) -> list[Any]:
    """``t.tolist()``, with NaN and infinities as ``None`` (JSON has neither)."""
    values = t.tolist()
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return values
    return _none_for_nonfinite(values)


def _none_for_nonfinite(values: Any) -> Any:
    if isinstance(values, list):
        return [_none_for_nonfinite(v) for v in values]
    return values if math.isfinite(values) else None


def _fmt(v: float | None) -> str:
    return "None" if v is None else f"{v:.3g}"
