"""A plain PyTorch training loop for the demo model (no Lightning), used by benchmarks and tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["accuracy", "shift_augment", "train_plain"]


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` in eval mode (modes restored)."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            correct += int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    model.train(was)
    return correct / max(1, len(y))


def shift_augment(x: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction (private generator)."""
    shifts = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2), generator=generator)
    out = x.clone()
    for dy, dx in torch.unique(shifts, dim=0).tolist():  # one roll per distinct shift, not per image
        rows = ((shifts[:, 0] == dy) & (shifts[:, 1] == dx)).nonzero().flatten()
        out[rows] = x[rows].roll((dy, dx), dims=(-2, -1))
    return out


def train_plain(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    augment: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """Train ``model`` with Adam and cross-entropy on ``(x, y)``; shuffling uses a private generator.

    Pass the same ``optimizer`` across calls to keep its state between epochs.

    Example::

        >>> import torch
        >>> from lightning_anomaly.demo import SmallCNN, digits_tensors
        >>> xtr, ytr, xva, yva, _ = digits_tensors()
        >>> net = train_plain(SmallCNN(), xtr, ytr, epochs=1)
        >>> accuracy(net, xva, yva) > 0.5
        True
    """
    g = torch.Generator().manual_seed(seed)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = order[i : i + batch_size]
            xb = shift_augment(x[idx], g) if augment else x[idx]
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
    model.eval()
    return model
