"""scikit-learn's digits as image tensors, with optional planted label noise. No download."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["digits_tensors", "stamp_trigger"]


def digits_tensors(
    *,
    size: int = 16,
    val_fraction: float = 0.3,
    label_noise: float = 0.0,
    backdoor: float = 0.0,
    backdoor_target: int = 0,
    rare: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Load the 1,797 8x8 digits shipped with scikit-learn as ``(N, 1, size, size)`` tensors.

    Example::

        >>> xtr, ytr, xva, yva, planted = digits_tensors(size=16, label_noise=0.2)
        >>> xtr.shape[1:], int(planted.sum()) > 0
        (torch.Size([1, 16, 16]), True)

    Args:
        size: Side of the (bilinearly upscaled) images.
        val_fraction: Share of the samples held out for validation (split by a private generator).
        label_noise: Share of training labels replaced by a different, random class.
        backdoor: Share of training images (of classes other than ``backdoor_target``) stamped with a
            bright 3x3 trigger patch in the bottom-right corner and relabelled ``backdoor_target``.
        backdoor_target: Class the trigger maps to.
        rare: Share of training images made atypical (inverted contrast), labels kept.
        seed: Seed of the split and of every planted change.

    Returns:
        ``x_train``, ``y_train``, ``x_val``, ``y_val`` and ``planted`` (bool mask over the training
        samples that were changed: flipped, triggered or made rare).

    Raises:
        ValueError: ``val_fraction`` or ``label_noise`` outside ``[0, 1)``.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name, share in (("label_noise", label_noise), ("backdoor", backdoor), ("rare", rare)):
        if not 0 <= share < 1:
            raise ValueError(f"{name} must be in [0, 1), got {share}")
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    n_val = round(val_fraction * len(y))
    val, train = order[:n_val], order[n_val:]
    xtr, ytr = x[train].clone(), y[train].clone()
    planted = torch.zeros(len(train), dtype=torch.bool)
    flipped = torch.rand(len(train), generator=g) < label_noise
    shift = torch.randint(1, 10, (len(train),), generator=g)
    ytr[flipped] = (ytr[flipped] + shift[flipped]) % 10
    planted |= flipped
    if backdoor > 0:
        candidates = ((ytr != backdoor_target) & ~planted).nonzero().flatten()
        k = round(backdoor * len(train))
        hit = candidates[torch.randperm(len(candidates), generator=g)[:k]]
        xtr[hit] = stamp_trigger(xtr[hit])
        ytr[hit] = backdoor_target
        planted[hit] = True
    if rare > 0:
        candidates = (~planted).nonzero().flatten()
        hit = candidates[torch.randperm(len(candidates), generator=g)[: round(rare * len(train))]]
        xtr[hit] = -xtr[hit]
        planted[hit] = True
    return xtr, ytr, x[val], y[val], planted


def stamp_trigger(x: Tensor, value: float = 1.0) -> Tensor:
    """Images ``(N, C, H, W)`` in [-1, 1] with a 3x3 checkerboard trigger in the bottom-right corner."""
    out = x.clone()
    patch = torch.tensor([[1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]) * value
    out[..., -4:-1, -4:-1] = patch
    return out
