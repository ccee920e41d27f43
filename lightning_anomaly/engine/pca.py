"""Batched, deterministic PCA of many small data matrices at once."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batched_pca"]


def batched_pca(x: Tensor, n_components: int) -> tuple[Tensor, Tensor]:
    """Project each of ``B`` data matrices onto its own top principal components.

    The eigendecomposition runs on whichever is smaller: the ``D x D`` covariance or the ``N x N``
    Gram matrix. No random numbers are drawn (``torch.pca_lowrank`` would draw from the global
    RNG). Signs are fixed so that, per component, the score of largest magnitude is positive, which
    makes the result deterministic.

    Example::

        >>> import torch
        >>> x = torch.randn(3, 50, 10, generator=torch.Generator().manual_seed(0))
        >>> scores, var = batched_pca(x, 2)
        >>> scores.shape, var.shape
        (torch.Size([3, 50, 2]), torch.Size([3, 2]))

    Args:
        x: ``(B, N, D)`` floating tensor: ``B`` problems, ``N`` samples, ``D`` features.
        n_components: Components to keep; clipped to ``min(D, N)``.

    Returns:
        ``scores`` ``(B, N, q)`` float32 and ``explained_variance`` ``(B, q)`` float32 (sum of
        squares of the scores over samples, divided by ``N - 1``), with ``q = min(n_components, D, N)``.

    Raises:
        ValueError: ``x`` is not 3-D.
    """
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, N, D), got {tuple(x.shape)}")
    n, d = x.shape[1:]
    q = min(n_components, d, n)
    xc = x.float()
    xc = xc - xc.mean(dim=1, keepdim=True)
    if d <= n:
        cov = xc.mT @ xc  # (B, D, D)
        evals, evecs = torch.linalg.eigh(cov)
        top = evecs[..., -q:].flip(-1)  # (B, D, q), largest first
        scores = xc @ top
    else:
        gram = xc @ xc.mT  # (B, N, N)
        evals, evecs = torch.linalg.eigh(gram)
        top_vals = evals[..., -q:].flip(-1).clamp_min(0)
        scores = evecs[..., -q:].flip(-1) * top_vals.sqrt().unsqueeze(1)
    # Deterministic sign: the largest-magnitude score of each component is positive.
    idx = scores.abs().argmax(dim=1, keepdim=True)
    sign = torch.gather(scores, 1, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    scores = scores * sign
    var = scores.square().sum(dim=1) / max(n - 1, 1)
    return scores, var
