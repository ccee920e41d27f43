"""Offline image data with planted ground truth: scikit-learn's digits and generated shapes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["digits_tensors", "plant", "shapes_tensors", "stamp_trigger"]

SHAPE_NAMES = ("disk", "ring", "square", "frame", "hbar", "vbar", "diagonal", "antidiagonal", "plus", "cross")


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
        val_fraction: See :func:`plant`.
        label_noise: See :func:`plant`.
        backdoor: See :func:`plant`.
        backdoor_target: See :func:`plant`.
        rare: See :func:`plant`.
        seed: See :func:`plant` (for :func:`shapes_tensors`, also the seed of the images).

    Returns:
        As :func:`plant`.

    Raises:
        ValueError: A share outside ``[0, 1)``.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.target, dtype=torch.long)
    return plant(
        x,
        y,
        val_fraction=val_fraction,
        label_noise=label_noise,
        backdoor=backdoor,
        backdoor_target=backdoor_target,
        rare=rare,
        seed=seed,
    )


def shapes_tensors(
    *,
    n: int = 1800,
    size: int = 16,
    noise: float = 0.15,
    val_fraction: float = 0.3,
    label_noise: float = 0.0,
    backdoor: float = 0.0,
    backdoor_target: int = 0,
    rare: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Generated grayscale shapes in ten classes (:data:`SHAPE_NAMES`), with planted ground truth.

    Each image holds one shape (disk, ring, filled square, square frame, horizontal or vertical bar,
    two diagonals, plus, cross) at a random position, size and brightness, plus Gaussian pixel
    noise. The images depend only on ``n``, ``size``, ``noise`` and ``seed``; the split and the
    planted changes are those of :func:`plant`.

    Example::

        >>> xtr, ytr, xva, yva, planted = shapes_tensors(n=200, backdoor=0.05)
        >>> xtr.shape[1:], int(planted.sum())
        (torch.Size([1, 16, 16]), 7)

    Args:
        n: Images generated (balanced over the classes).
        size: Side of the square images (at least 12).
        noise: Standard deviation of the pixel noise, before scaling to ``[-1, 1]``.
        val_fraction: See :func:`plant`.
        label_noise: See :func:`plant`.
        backdoor: See :func:`plant`.
        backdoor_target: See :func:`plant`.
        rare: See :func:`plant`.
        seed: See :func:`plant` (for :func:`shapes_tensors`, also the seed of the images).

    Returns:
        As :func:`plant`.

    Raises:
        ValueError: ``size`` below 12, ``n`` below 10 or a share out of range.
    """
    if size < 12:
        raise ValueError(f"size must be at least 12 pixels, got {size}")
    if n < len(SHAPE_NAMES):
        raise ValueError(f"n must be at least {len(SHAPE_NAMES)} (one image per class), got {n}")
    g = torch.Generator().manual_seed(10_000 + seed)
    y = torch.arange(n) % len(SHAPE_NAMES)
    y = y[torch.randperm(n, generator=g)]
    half = size / 2
    cx = half - 0.5 + (torch.rand(n, generator=g) - 0.5) * size * 0.3
    cy = half - 0.5 + (torch.rand(n, generator=g) - 0.5) * size * 0.3
    r = size * (0.18 + 0.12 * torch.rand(n, generator=g))
    bright = 0.6 + 0.4 * torch.rand(n, generator=g)
    grid = torch.arange(size, dtype=torch.float32)
    dx = grid.view(1, 1, size) - cx.view(n, 1, 1)
    dy = grid.view(1, size, 1) - cy.view(n, 1, 1)
    rr = r.view(n, 1, 1)
    w = 0.75  # half-width of strokes, in pixels
    dist = (dx.square() + dy.square()).sqrt()
    box = torch.maximum(dx.abs(), dy.abs())
    along, across = (dx + dy) / math.sqrt(2), (dx - dy) / math.sqrt(2)
    hbar = (dy.abs() <= w) & (dx.abs() <= rr)
    vbar = (dx.abs() <= w) & (dy.abs() <= rr)
    diag = (across.abs() <= w) & (along.abs() <= rr)
    anti = (along.abs() <= w) & (across.abs() <= rr)
    masks = torch.stack(
        [
            dist <= rr,
            (dist - rr).abs() <= w,
            box <= 0.8 * rr,
            (box - 0.8 * rr).abs() <= w,
            hbar,
            vbar,
            diag,
            anti,
            hbar | vbar,
            diag | anti,
        ],
        dim=1,
    )  # (n, classes, size, size)
    shape = masks[torch.arange(n), y].float() * bright.view(n, 1, 1)
    img = shape + noise * torch.randn(n, size, size, generator=g)
    x = (2.0 * img - 1.0).clamp(-1.0, 1.0).unsqueeze(1)
    return plant(
        x,
        y,
        val_fraction=val_fraction,
        label_noise=label_noise,
        backdoor=backdoor,
        backdoor_target=backdoor_target,
        rare=rare,
        seed=seed,
    )


def plant(
    x: Tensor,
    y: Tensor,
    *,
    val_fraction: float = 0.3,
    label_noise: float = 0.0,
    backdoor: float = 0.0,
    backdoor_target: int = 0,
    rare: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Split images ``(N, C, H, W)`` in ``[-1, 1]`` with labels ``(N,)`` and plant ground truth in the training part.

    Example::

        >>> x, y = torch.zeros(100, 1, 8, 8), torch.arange(100) % 10
        >>> xtr, ytr, xva, yva, planted = plant(x, y, rare=0.1, seed=1)
        >>> len(ytr), len(yva), int(planted.sum())
        (70, 30, 7)

    Args:
        x: All images.
        y: Their integer labels.
        val_fraction: Share of the samples held out for validation (split by a private generator).
        label_noise: Share of training labels replaced by a different, random class.
        backdoor: Share of training images (of classes other than ``backdoor_target``) stamped with a
            3x3 checkerboard trigger in the bottom-right corner (:func:`stamp_trigger`) and relabelled
            ``backdoor_target``.
        backdoor_target: Class the trigger maps to.
        rare: Share of training images made atypical (inverted contrast), labels kept.
        seed: Seed of the split and of every planted change.

    Returns:
        ``x_train``, ``y_train``, ``x_val``, ``y_val`` and ``planted`` (bool mask over the training
        samples that were changed: flipped, triggered or made rare).

    Raises:
        ValueError: A share outside ``[0, 1)``.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    for name, share in (("label_noise", label_noise), ("backdoor", backdoor), ("rare", rare)):
        if not 0 <= share < 1:
            raise ValueError(f"{name} must be in [0, 1), got {share}")
    n_classes = int(y.max()) + 1
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    n_val = round(val_fraction * len(y))
    val, train = order[:n_val], order[n_val:]
    xtr, ytr = x[train].clone(), y[train].clone()
    planted = torch.zeros(len(train), dtype=torch.bool)
    flipped = torch.rand(len(train), generator=g) < label_noise
    shift = torch.randint(1, n_classes, (len(train),), generator=g)
    ytr[flipped] = (ytr[flipped] + shift[flipped]) % n_classes
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
