"""A fixed probe from a dataset: chosen by index with a private generator, read once.

Nothing here iterates a dataloader or draws from the global random number generators.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_anomaly.criteria import AnomalyCriteria

__all__ = [
    "check_probe",
    "dataset_labels",
    "drop_non_finite",
    "gradient_targets",
    "map_style_dataset",
    "non_finite_rows",
    "read_probe",
    "stratified_indices",
]

_INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")
_TARGET_KEYS = ("label", "labels", "target", "targets", "y")


def _as_label_tensor(values: Any) -> Tensor | None:
    try:
        t = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        return None
    if t.ndim != 1 or t.is_floating_point() or t.is_complex():
        return None
    return t.long()


def dataset_labels(dataset: Any) -> Tensor | None:
    """Integer class labels of ``dataset`` when they can be had without reading its items.

    Looks at ``targets``/``labels`` attributes (torchvision), the last tensor of a
    :class:`~torch.utils.data.TensorDataset`, and follows :class:`~torch.utils.data.Subset`.

    Returns:
        ``(len(dataset),)`` int64, or ``None`` when no cheap source of labels exists.
    """
    from torch.utils.data import Subset, TensorDataset

    if isinstance(dataset, Subset):
        parent = dataset_labels(dataset.dataset)
        return None if parent is None else parent[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return _as_label_tensor(dataset.tensors[-1])
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None:
            labels = _as_label_tensor(values)
            if labels is not None and len(labels) == len(dataset):
                return labels
    return None


def stratified_indices(n: int, size: int, generator: torch.Generator, labels: Tensor | None = None) -> list[int]:
    """Pick ``size`` of ``n`` indices, in proportion to the classes of ``labels`` when given.

    Each class gets its share of the probe (largest remainders break ties, every class present
    gets at least one slot while slots remain); members are drawn uniformly within each class.

    Example::

        >>> import torch
        >>> labels = torch.tensor([0] * 90 + [1] * 10)
        >>> idx = stratified_indices(100, 20, torch.Generator().manual_seed(0), labels)
        >>> len(idx), sum(1 for i in idx if labels[i] == 1)
        (20, 2)

    Returns:
        Sorted dataset indices.
    """
    if size >= n:
        return list(range(n))
    if labels is None:
        return sorted(torch.randperm(n, generator=generator)[:size].tolist())
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.double() * size / n
    alloc = quota.floor().long().clamp_min(1).clamp_max(counts)
    # More classes than slots: trim the largest allocations, ties broken at random (by the
    # generator), so that no range of class ids is left out systematically.
    if int(alloc.sum()) > size:
        tiebreak = torch.rand(len(classes), generator=generator, dtype=torch.float64) * 0.5
        while int(alloc.sum()) > size:
            alloc[int((alloc.double() + tiebreak).argmax())] -= 1
    remainder = quota - quota.floor()
    for c in remainder.argsort(descending=True).tolist():
        if int(alloc.sum()) >= size:
            break
        if alloc[c] < counts[c]:
            alloc[c] += 1
    out: list[int] = []
    for c, take in zip(classes.tolist(), alloc.tolist(), strict=True):
        members = (labels == c).nonzero().flatten()
        out.extend(members[torch.randperm(len(members), generator=generator)[:take]].tolist())
    return sorted(out)


def _split_item(item: Any) -> tuple[Any, Any]:
    if isinstance(item, Mapping):
        x = next((item[k] for k in _INPUT_KEYS if k in item), None)
        y = next((item[k] for k in _TARGET_KEYS if k in item), None)
        if x is None:
            raise ValueError(
                f"dataset items are dicts with keys {sorted(item)}; none is an input key {_INPUT_KEYS}. "
                "Pass probe=(inputs, targets) to the callback instead"
            )
        return x, y
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and not isinstance(item, Tensor):
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


def read_probe(dataset: Any, indices: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """Read ``dataset[i]`` for each index and stack inputs (and targets when every item has one).

    Raises:
        ValueError: Items hold no tensor input (e.g. PIL images without ``ToTensor``).
    """
    xs: list[Tensor] = []
    ys: list[Any] = []
    for i in indices:
        x, y = _split_item(dataset[i])
        if type(x).__module__ == "numpy":  # arrays, as default_collate takes them
            x = torch.as_tensor(x)
        if not isinstance(x, Tensor):
            raise ValueError(
                f"dataset item {i} has an input of type {type(x).__name__}, not a tensor; add a ToTensor "
                "transform or pass probe=(inputs, targets) to the callback"
            )
        xs.append(x)
        ys.append(y)
    inputs = torch.stack(xs)
    if any(y is None for y in ys):
        return inputs, None
    try:
        targets = torch.stack([torch.as_tensor(y) for y in ys])
    except (TypeError, RuntimeError, ValueError):
        return inputs, None
    return inputs, targets


def non_finite_rows(x: Tensor) -> list[int]:
    """Positions of the samples of ``x`` that hold NaN or Inf (none for integer inputs)."""
    if not (x.is_floating_point() or x.is_complex()) or x.numel() == 0:
        return []
    return (~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).nonzero().flatten().tolist()


def check_probe(probe: Any, criteria: AnomalyCriteria) -> tuple[Tensor, Tensor | None]:
    """An explicit ``(inputs, targets)`` probe, checked and moved to the CPU.

    Raises:
        TypeError: Not a pair with a tensor of inputs.
        ValueError: Fewer samples than ``criteria`` needs, targets of another length, or non-finite inputs.
    """
    if not isinstance(probe, (tuple, list)) or len(probe) != 2 or not isinstance(probe[0], Tensor):
        raise TypeError("probe must be a pair (inputs, targets) with inputs a tensor (N, ...); targets may be None")
    x, y = probe
    n = int(x.shape[0])
    criteria.check_probe_size(n, "probe=(inputs, targets)")
    if y is not None and (not isinstance(y, Tensor) or y.shape[0] != n):
        raise ValueError(f"probe targets must be a tensor with {n} entries, got {y!r:.80}")
    bad = non_finite_rows(x)
    if bad:
        raise ValueError(
            f"probe inputs hold NaN or Inf in samples {bad[:10]}{' ...' if len(bad) > 10 else ''}; "
            "drop or repair those samples (one bad sample makes every filter's maps degenerate)"
        )
    return x.detach().cpu(), None if y is None else y.detach().cpu()


def drop_non_finite(
    x: Tensor, y: Tensor | None, indices: Sequence[int]
) -> tuple[Tensor, Tensor | None, list[int], list[int]]:
    """Leave out the samples with NaN or Inf: ``(inputs, targets, kept indices, dropped indices)``.

    Example::

        >>> x = torch.tensor([[0.0], [float("nan")], [1.0]])
        >>> drop_non_finite(x, torch.tensor([0, 1, 2]), [10, 11, 12])[2:]
        ([10, 12], [11])
    """
    bad = set(non_finite_rows(x))
    if not bad:
        return x, y, list(indices), []
    keep = [i for i in range(len(x)) if i not in bad]
    dropped = [indices[i] for i in sorted(bad)]
    return x[keep], None if y is None else y[keep], [indices[i] for i in keep], dropped


def map_style_dataset(loaders: Any) -> Any:
    """The dataset of the first training dataloader, which must be map-style.

    Raises:
        ValueError: No dataset, or an iterable-style one (no indices to draw a probe by).
    """
    from torch.utils.data import IterableDataset

    while isinstance(loaders, (list, tuple, dict)) and loaders:
        loaders = next(iter(loaders.values())) if isinstance(loaders, dict) else loaders[0]
    dataset = getattr(loaders, "dataset", None)
    if (
        dataset is None
        or isinstance(dataset, IterableDataset)
        or not hasattr(dataset, "__len__")
        or not hasattr(dataset, "__getitem__")
    ):
        raise ValueError(
            "AnomalyFilterCallback needs a map-style training dataset (with __len__ and __getitem__) to draw "
            f"its probe from, got {type(dataset).__name__}; pass probe=(inputs, targets) instead"
        )
    return dataset


def gradient_targets(
    targets: Tensor | None, output: Any, *, custom_loss: bool, output_transform: Any = None, trainable: bool = True
) -> tuple[Tensor | None, str | None]:
    """The targets the per-sample gradient norms take, or ``None`` with the reason they are skipped.

    With a custom loss, the targets go as they are. The default loss is cross-entropy, which needs
    integer class labels ``(N,)`` within the model's ``(N, classes)`` scores (after
    ``output_transform``).

    Example::

        >>> gradient_targets(torch.tensor([0, 2]), torch.zeros(2, 3), custom_loss=False)[0]
        tensor([0, 2])
        >>> gradient_targets(torch.tensor([0, 5]), torch.zeros(2, 3), custom_loss=False)[1]
        'the probe labels span 0..5 but the model gives 3 class scores: per-sample gradient norms are skipped; pass loss_fn=... that takes these targets'
    """
    if targets is not None and not trainable:
        return None, "the model has no trainable parameter; per-sample gradient norms are skipped"
    if targets is None or custom_loss:
        return targets, None
    skip = "per-sample gradient norms are skipped; pass loss_fn=... that takes these targets"
    y = targets
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        return None, (
            f"the probe targets ({tuple(y.shape)} {y.dtype}) are not class labels, and the default loss is "
            f"cross-entropy: {skip}"
        )
    scores = output_transform(output) if output_transform is not None else output
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        return None, (
            f"the model's output ({shape}) is not (N, classes) scores for the default cross-entropy; per-sample "
            "gradient norms are skipped; pass output_transform=... (tuple or dict outputs) or loss_fn=..."
        )
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= scores.shape[1]:
        return None, f"the probe labels span {low}..{high} but the model gives {scores.shape[1]} class scores: {skip}"
    return y.long(), None
