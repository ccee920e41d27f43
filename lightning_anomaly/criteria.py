"""Settings of the anomaly-filter analysis and the rules that flag a filter.

One table, :data:`CONSTRAINTS`, states what each setting accepts. The constructor of
:class:`AnomalyCriteria` validates against it, the docs render it and the tests walk it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor

LayerStatistic = Literal["median", "mean"]


@dataclass(frozen=True)
class _Rule:
    kind: type | tuple[type, ...]
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[Any, ...] | None = None
    hint: str = ""
    optional: bool = False  # None is allowed too

    def describe(self) -> str:
        either = "None or " if self.optional else ""
        if self.choices is not None:
            return either + "one of " + ", ".join(repr(c) for c in self.choices)
        if self.low is None and self.high is None:
            return either + _kind_name(self.kind)
        lo = "(" if self.low_open else "["
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{either}{_kind_name(self.kind)} in {lo}{low}, {high}]"


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


#: What each scalar setting of :class:`AnomalyCriteria` accepts.
CONSTRAINTS: dict[str, _Rule] = {
    "min_cluster_size": _Rule(int, low=1, hint="the paper uses a handful of samples, e.g. 5"),
    "min_cluster_fraction": _Rule(
        (int, float), low=0.0, high=0.5, hint="a share of the probe, e.g. 0.2; 0 uses min_cluster_size alone"
    ),
    "label_free_fraction": _Rule(
        (int, float),
        low=0.0,
        high=0.5,
        hint="a share of the probe below one class's share, e.g. 0.05 for up to 10 balanced classes",
    ),
    "min_separation": _Rule(
        (int, float),
        low=0.0,
        hint="within-cluster standard deviations between the tiny cluster and the rest, e.g. 5; 0 turns it off",
    ),
    "score_separation": _Rule(
        (int, float),
        low=0.0,
        hint="a tail cut from one Gaussian blob scores 2-3, so 3 keeps such clusters out of the outlier score; 0 counts all",
    ),
    "ch_ratio": _Rule((int, float), low=0.0, low_open=True, hint="1.0 means 'above the layer's typical CH'"),
    "activation_ratio": _Rule(
        (int, float),
        low=0.0,
        hint="1.0 means 'above the layer's typical activation'; 0 turns the activation criterion off",
    ),
    "n_components": _Rule(
        int, low=1, high=2, hint="the paper projects to 2 dimensions; the closed-form mixture algebra covers 1 and 2"
    ),
    "layer_statistic": _Rule(str, choices=("median", "mean"), hint="'median' resists dead filters"),
    "max_iter": _Rule(int, low=1, hint="100 is scikit-learn's default"),
    "tol": _Rule((int, float), low=0.0, low_open=True, hint="1e-3 is scikit-learn's default"),
    "reg_covar": _Rule((int, float), low=0.0, hint="1e-6 is scikit-learn's default"),
    "kmeans_iter": _Rule(int, low=0, hint="a few Lloyd steps after k-means++ seeding"),
    "n_init": _Rule(int, low=1, high=32, hint="more initialisations make k more stable and cost time in proportion"),
    "class_purity": _Rule(
        (int, float), low=0.0, high=1.0, hint="share of a tiny cluster in one class, e.g. 0.8; 1 only pure clusters"
    ),
    "class_coverage": _Rule(
        (int, float), low=0.0, high=1.0, hint="share of that class's probe samples in the cluster, e.g. 0.5"
    ),
}


def check_setting(name: str, value: Any, table: dict[str, _Rule] | None = None) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the range and a hint when ``value`` breaks ``table[name]``.

    ``table`` is :data:`CONSTRAINTS` by default; the pruning callback passes its own.
    """
    rule = (CONSTRAINTS if table is None else table)[name]
    if value is None and rule.optional:
        return
    ok_type = isinstance(value, rule.kind) and not isinstance(value, bool)
    if not ok_type:
        raise TypeError(f"{name} must be {rule.describe()}, got {value!r} ({type(value).__name__}); {rule.hint}")
    if rule.choices is not None:
        if value not in rule.choices:
            raise ValueError(f"{name} must be {rule.describe()}, got {value!r}; {rule.hint}")
        return
    if not isinstance(value, (int, float)):  # a string or other non-number: its type is the whole rule
        return
    bad = not math.isfinite(float(value)) and not (rule.high is None and value == math.inf)
    if rule.low is not None and (value < rule.low or (rule.low_open and value == rule.low)):
        bad = True
    if rule.high is not None and value > rule.high:
        bad = True
    if bad:
        raise ValueError(f"{name} must be {rule.describe()}, got {value!r}; {rule.hint}")


@dataclass(frozen=True)
class AnomalyCriteria:
    """Validated settings of the analysis and the rules that flag an anomaly filter.

    A filter is an *anomaly filter* when all three hold (arXiv 2412.10457, section 3):

    * its best clustering is unbalanced: the smallest cluster holds at most
      ``max(min_cluster_size, floor(min_cluster_fraction * N))`` of the ``N`` probe samples;
    * its Calinski-Harabasz index is above ``ch_ratio`` (the paper's beta) times the layer's
      typical CH;
    * its activation (mean absolute value of its feature maps over the probe) is above
      ``activation_ratio`` (the paper's theta) times the layer's typical activation.

    "Typical" is the median (default) or the mean over the layer's non-degenerate filters.
    Degenerate filters (constant, dead, non-finite maps) are never flagged and never enter it.

    Defaults come from ``docs/RESULTS.md``: the paper's literal reading (:meth:`paper`: at most 5
    samples, layer means, beta = theta = 1) flagged no filter in any planted ground truth, while a
    tiny cluster of up to 10% of the probe gives non-trivial counts everywhere (E1 table); half the
    typical activation (theta = 0.5) recovers planted backdoor samples where theta = 1 misses them,
    because a filter that answers a rare trigger is quiet on most of the probe (E4 table).

    Example::

        >>> from lightning_anomaly import AnomalyCriteria
        >>> c = AnomalyCriteria(min_cluster_size=3, k_range=(2, 4))
        >>> c.k_values
        (2, 3, 4)
        >>> AnomalyCriteria(ch_ratio=0)
        Traceback (most recent call last):
        ...
        ValueError: ch_ratio must be int or float in (0, inf], got 0; 1.0 means 'above the layer's typical CH'

    Args:
        min_cluster_size: Largest size (in probe samples) of a cluster that counts as tiny.
        min_cluster_fraction: The same as a share of the probe; the larger of the two bounds applies
            (``max(min_cluster_size, floor(min_cluster_fraction * N))``).
        ch_ratio: Paper's beta: CH must exceed this multiple of the layer's typical CH.
        activation_ratio: Paper's theta: activation must exceed this multiple of the typical one.
        k_range: Inclusive ``(low, high)`` range of mixture sizes tried per filter; the k whose
            labelling maximises CH is kept.
        n_components: Dimensions of the per-filter PCA (the paper uses 2). Filters whose maps have
            fewer values (``H * W``) are clustered in ``H * W`` dimensions.
        layer_statistic: How a layer's typical CH and activation are computed.
        max_iter: Most EM iterations per mixture.
        tol: EM stops when the mean log-likelihood per sample changes by less than this.
        reg_covar: Added to covariance diagonals. Points are scaled to unit mean squared norm per
            filter first, so this is relative to the filter's spread.
        kmeans_iter: Lloyd iterations after k-means++ seeding, before EM.
        n_init: Initialisations per mixture; the best likelihood wins (scikit-learn's ``n_init``).
        class_conditional: With class labels, remove each class's mean map before the PCA, so a
            filter that answers a class has nothing left to split off (the flags use this view).
        class_purity: A tiny cluster with at least this share of one label ...
        class_coverage: ... that holds at least this share of the label's probe samples is
            *class-selective* (:meth:`class_selective`), not an anomaly.
        global_view: With class labels and ``class_conditional``, also cluster every filter's maps
            with only the whole probe's mean removed, and add that view's small clusters to the
            outlier score (not to the flags). A group that makes up most of its label's probe
            samples (a large backdoor) hides in the class-conditional view, which sets the label's few
            clean samples apart instead. Here the filters that answer it set it apart from every other
            sample; a cluster holding most of the label still counts as a class, but the parts of the
            group that the larger k split off (each under half the label) score. Shares the PCA's
            products and doubles the clustering; ``docs/FLAGS.md`` gives the evidence, PERFORMANCE the cost.
        score_separation: Clusters closer than this to the rest, in within-cluster standard
            deviations (:func:`~lightning_anomaly.engine.scores.separation`), add nothing to the outlier
            score: a tail cut from one Gaussian blob scores 2-3, and hundreds of them drown a planted group.

    Raises:
        TypeError: A setting has the wrong type.
        ValueError: A setting is out of its range; the message gives the range and a hint.
    """

    min_cluster_size: int = 5
    min_cluster_fraction: float = 0.2
    label_free_fraction: float = 0.05
    min_separation: float = 5.0
    ch_ratio: float = 1.0
    activation_ratio: float = 0.5
    k_range: tuple[int, int] = (2, 6)
    n_components: int = 2
    layer_statistic: LayerStatistic = "median"
    max_iter: int = 100
    tol: float = 1e-3
    reg_covar: float = 1e-6
    kmeans_iter: int = 10
    n_init: int = 1
    class_conditional: bool = True
    class_purity: float = 0.8
    class_coverage: float = 0.7
    global_view: bool = True
    score_separation: float = 3.0

    def __post_init__(self) -> None:
        for name in CONSTRAINTS:
            check_setting(name, getattr(self, name))
        for name in ("class_conditional", "global_view"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        k = self.k_range
        if (
            not isinstance(k, (tuple, list))
            or len(k) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in k)
        ):
            raise TypeError(f"k_range must be a pair of ints (low, high), got {k!r}; e.g. k_range=(2, 6)")
        if k[0] < 2 or k[1] < k[0]:
            raise ValueError(
                f"k_range must satisfy 2 <= low <= high, got {tuple(k)!r}; a mixture needs at least 2 "
                "components to split off a tiny cluster, e.g. k_range=(2, 6)"
            )
        object.__setattr__(self, "k_range", (int(k[0]), int(k[1])))

    @classmethod
    def paper(cls, **overrides: Any) -> AnomalyCriteria:
        """The literal reading of arXiv 2412.10457 (its thresholds are not published).

        Smallest cluster of at most 5 probe samples, CH and activation above the layer's *mean*
        (beta = theta = 1), k in 2..6, PCA to 2 dimensions. Kept as a preset for comparison; see
        ``docs/RESULTS.md`` for how it fares against ground truth.
        """
        settings: dict[str, Any] = {
            "min_cluster_size": 5,
            "min_cluster_fraction": 0.0,
            "label_free_fraction": 0.0,
            "min_separation": 0.0,
            "class_conditional": False,
            "ch_ratio": 1.0,
            "activation_ratio": 1.0,
            "layer_statistic": "mean",
            "k_range": (2, 6),
            "n_components": 2,
        }
        settings.update(overrides)
        return cls(**settings)

    @property
    def k_values(self) -> tuple[int, ...]:
        """Every mixture size tried, in increasing order."""
        return tuple(range(self.k_range[0], self.k_range[1] + 1))

    @property
    def min_probe_size(self) -> int:
        """Fewest probe samples the analysis accepts: ``max(k_range) + 1``."""
        return self.k_range[1] + 1

    def check_probe_size(self, n: int, what: str = "the probe") -> None:
        """The one probe-size rule: at least :attr:`min_probe_size` samples.

        Args:
            n: Samples the probe has, or will have.
            what: How the error names the probe (``"probe_size=8"``, ``"the training dataset's probe"``).

        Raises:
            ValueError: ``n`` is too small; the message names the fix.
        """
        need = self.min_probe_size
        if n < need:
            raise ValueError(
                f"{what}: {n} samples, fewer than max(k_range)+1={need}; use at least {need} samples (256 "
                "recommended) or a smaller k_range (the largest mixture needs a sample per component and one more)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-type view, suitable for JSON and checkpoints."""
        d = asdict(self)
        d["k_range"] = list(self.k_range)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnomalyCriteria:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        if "k_range" in data:
            data["k_range"] = tuple(data["k_range"])
        return cls(**data)

    def typical(self, values: Tensor, valid: Tensor) -> float:
        """A layer's typical value of ``values`` (shape ``(C,)``) over the ``valid`` filters.

        Returns NaN when no filter is valid.
        """
        v = values[valid].double()
        v = v[torch.isfinite(v)]
        if v.numel() == 0:
            return math.nan
        if self.layer_statistic == "median":
            return float(v.median())
        return float(v.mean())

    def tiny_cluster_limit(self, n_samples: int, labelled: bool = True) -> int:
        """Largest cluster, in samples, that counts as tiny for a probe of ``n_samples``.

        ``labelled``: the analysis knew the probe's classes and removed them (``class_conditional``),
        so ``min_cluster_fraction`` applies; otherwise ``label_free_fraction`` does, a bound kept
        below one class's share so that a class detector does not pass for a tiny cluster.
        """
        share = self.min_cluster_fraction if labelled else self.label_free_fraction
        return max(self.min_cluster_size, math.floor(share * n_samples))

    def class_selective(self, masks: Tensor, classes: Tensor) -> Tensor:
        """Which filters' tiny clusters are essentially one class of the probe.

        A cluster is *essentially class c* when at least ``class_purity`` of its members have label
        ``c`` and it holds at least ``class_coverage`` of the probe's class-``c`` samples: the filter
        detects a class (normal learning), it does not single out a handful of samples.

        Example::

            >>> import torch
            >>> classes = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
            >>> masks = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
            >>> AnomalyCriteria().class_selective(masks, classes).tolist()
            [True, False]

        Args:
            masks: ``(C, N)`` bool, members of each filter's smallest cluster.
            classes: ``(N,)`` int64 class ids in ``[0, G)``.

        Returns:
            ``(C,)`` bool.
        """
        if masks.numel() == 0:
            return torch.zeros(masks.shape[0], dtype=torch.bool)
        onehot = torch.nn.functional.one_hot(classes.long(), int(classes.max()) + 1).double()  # (N, G)
        return self.class_selective_counts(masks.double() @ onehot, onehot.sum(0))

    def class_selective_counts(self, counts: Tensor, class_sizes: Tensor) -> Tensor:
        """:meth:`class_selective` from each cluster's members per class.

        Args:
            counts: ``(..., G)`` members of each cluster with each label.
            class_sizes: ``(G,)`` the probe's samples with each label.

        Returns:
            ``(...)`` bool.
        """
        counts = counts.double()
        top, which = counts.max(-1)
        size = counts.sum(-1)
        per_class = class_sizes.double()[which]
        return (size > 0) & (top >= self.class_purity * size) & (top >= self.class_coverage * per_class)

    def flag(
        self,
        smallest_cluster: Tensor,
        ch: Tensor,
        activation: Tensor,
        degenerate: Tensor,
        n_samples: int = 0,
        class_selective: Tensor | None = None,
        separation: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Apply the three rules to one layer.

        Args:
            smallest_cluster: ``(C,)`` int, size of each filter's smallest non-empty cluster.
            ch: ``(C,)`` float, each filter's CH at its chosen k (NaN where degenerate).
            activation: ``(C,)`` float, each filter's activation.
            degenerate: ``(C,)`` bool.
            n_samples: Probe size, for ``min_cluster_fraction``.
            class_selective: ``(C,)`` bool from :meth:`class_selective`, or ``None`` when the
                analysis had no class labels (then ``label_free_fraction`` bounds a tiny cluster).
            separation: ``(C,)`` float, the tiny cluster's distance from the rest in within-cluster
                standard deviations; ``None`` skips the rule.

        Returns:
            Bool tensors ``(C,)``: ``unbalanced``, ``high_ch``, ``high_activation``,
            ``separated`` (separation at least ``min_separation``), ``class_selective`` (an
            unbalanced filter whose tiny cluster is a class) and ``anomaly`` (the first four and not
            class-selective; never true for a degenerate filter).
        """
        valid = ~degenerate
        ch_typical = self.typical(ch, valid)
        act_typical = self.typical(activation, valid)
        limit = self.tiny_cluster_limit(n_samples, labelled=class_selective is not None and self.class_conditional)
        unbalanced = (smallest_cluster <= limit) & valid
        separated = valid if separation is None else valid & separation.double().ge(self.min_separation)
        high_ch = valid & torch.nan_to_num(ch.double(), nan=-math.inf).gt(self.ch_ratio * ch_typical)
        high_act = valid & activation.double().gt(self.activation_ratio * act_typical)
        if math.isnan(ch_typical):
            high_ch = torch.zeros_like(valid)
        if math.isnan(act_typical):
            high_act = torch.zeros_like(valid)
        selective = unbalanced & class_selective if class_selective is not None else torch.zeros_like(unbalanced)
        return {
            "unbalanced": unbalanced,
            "high_ch": high_ch,
            "high_activation": high_act,
            "separated": separated,
            "class_selective": selective,
            "anomaly": unbalanced & high_ch & high_act & separated & ~selective,
        }

    def strength(
        self,
        smallest_cluster: Tensor,
        degenerate: Tensor,
        separation: Tensor,
        n_samples: int,
        class_selective: Tensor | None = None,
    ) -> Tensor:
        """How strongly each filter singles out the members of its tiny cluster at its chosen k.

        The squared separation of the tiny cluster from the rest (:attr:`LayerReport.separation`)
        for every filter with a tiny cluster that is not a class, 0 otherwise. A report keeps the
        points of the strongest filters for its plots. (The outlier score of the samples reads every
        k and two views instead: :func:`~lightning_anomaly.engine.outliers.view_score`.)

        Args:
            smallest_cluster: As in :meth:`flag`.
            degenerate: As in :meth:`flag`.
            separation: As in :meth:`flag`.
            n_samples: As in :meth:`flag`.
            class_selective: As in :meth:`flag`.

        Returns:
            ``(C,)`` float64, ``>= 0``.
        """
        limit = self.tiny_cluster_limit(n_samples, labelled=class_selective is not None and self.class_conditional)
        used = (smallest_cluster <= limit) & ~degenerate
        if class_selective is not None:
            used &= ~class_selective
        return torch.where(used, separation.double().square(), torch.zeros((), dtype=torch.float64))


def as_criteria(criteria: Any) -> AnomalyCriteria:
    """``criteria`` itself, or the defaults for ``None``; anything else is a ``TypeError`` naming the fix.

    Example::

        >>> as_criteria(None) == AnomalyCriteria()
        True
    """
    if criteria is None:
        return AnomalyCriteria()
    if not isinstance(criteria, AnomalyCriteria):
        hint = "; from a dict of settings, pass AnomalyCriteria(**settings)" if isinstance(criteria, dict) else ""
        raise TypeError(f"criteria must be an AnomalyCriteria, got {type(criteria).__name__}{hint}")
    return criteria
