"""scikit-learn's digits as image tensors, with optional planted label noise. No download."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["digits_tensors"]


def digits_tensors(
    *, size: int = 16, val_fraction: float = 0.3, label_noise: float = 0.0, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Load the 1,797 8x8 digits shipped with scikit-learn as ``(N, 1, size, size)`` tensors.

    Example::

        >>> xtr, ytr, xva, yva, flipped = digits_tensors(size=16, label_noise=0.2)
        >>> xtr.shape[1:], int(flipped.sum()) > 0
        (torch.Size([1, 16, 16]), True)

    Args:
        size: Side of the (bilinearly upscaled) images.
        val_fraction: Share of the samples held out for validation (split by a private generator).
        label_noise: Share of training labels replaced by a different, random class.
        seed: Seed of the split and of the noise.

    Returns:
        ``x_train``, ``y_train``, ``x_val``, ``y_val`` and ``flipped`` (bool mask over the
        training samples whose label was changed).

    Raises:
        ValueError: ``val_fraction`` or ``label_noise`` outside ``[0, 1)``.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= label_noise < 1:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
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
    ytr = y[train].clone()
    flipped = torch.rand(len(train), generator=g) < label_noise
    shift = torch.randint(1, 10, (len(train),), generator=g)
    ytr[flipped] = (ytr[flipped] + shift[flipped]) % 10
    return x[train], ytr, x[val], y[val], flipped
