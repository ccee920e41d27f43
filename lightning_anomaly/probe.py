"""A fixed probe from a dataset: chosen by index with a private generator, read once.

Nothing here iterates a dataloader or draws from the global random number generators.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["dataset_labels", "read_probe", "stratified_indices"]

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
