"""Batched, deterministic PCA of many small data matrices at once."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batched_pca", "top_eigh"]

# Matrices up to this size go straight to a dense eigendecomposition.
_DENSE_MAX = 48
_OVERSAMPLE = 6
_RTOL = 1e-4


def top_eigh(a: Tensor, q: int, *, max_iter: int = 60) -> tuple[Tensor, Tensor]:
    """Largest ``q`` eigenpairs of a batch of symmetric positive semi-definite matrices.

    Small matrices use :func:`torch.linalg.eigh`. Larger ones use block subspace iteration with
    Rayleigh-Ritz (a deterministic start from a private generator, so nothing is drawn from the
    global RNG); any problem whose residual ``||A v - lambda v||`` is not below ``1e-4 * lambda_1``
    within ``max_iter`` iterations is finished with the dense solver, so the result is always
    converged.

    Example::

        >>> import torch
        >>> m = torch.randn(2, 80, 80, generator=torch.Generator().manual_seed(0))
        >>> a = m @ m.mT
        >>> vals, _ = top_eigh(a, 2)
        >>> torch.allclose(vals, torch.linalg.eigvalsh(a)[:, -2:].flip(-1), rtol=1e-4)
        True

    Args:
        a: ``(B, M, M)`` symmetric PSD matrices.
        q: Number of eigenpairs.
        max_iter: Subspace iterations before falling back to the dense solver.

    Returns:
        ``values`` ``(B, q)`` descending and ``vectors`` ``(B, M, q)``.
    """
    b, m, _ = a.shape
    if m <= _DENSE_MAX or q + _OVERSAMPLE >= m:
        vals, vecs = torch.linalg.eigh(a)
        return vals[:, -q:].flip(-1), vecs[..., -q:].flip(-1)
    width = q + _OVERSAMPLE
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(m, width, generator=gen, dtype=a.dtype).to(a.device).expand(b, m, width)
    basis = torch.linalg.qr(a @ basis).Q
    vals = torch.zeros(b, q, dtype=basis.dtype, device=a.device)
    vecs = torch.zeros(b, m, q, dtype=basis.dtype, device=a.device)
    todo = torch.arange(b, device=a.device)
    sub = a
    for it in range(1, max_iter + 1):
        basis = torch.linalg.qr(sub @ basis).Q
        if it % 5 and it != max_iter:
            continue
        # Rayleigh-Ritz on the current subspace, then a residual check per problem.
        small = basis.mT @ sub @ basis
        w, v = torch.linalg.eigh(small)
        w, v = w[:, -q:].flip(-1), basis @ v[..., -q:].flip(-1)
        resid = (sub @ v - v * w.unsqueeze(1)).norm(dim=1)  # (b, q)
        scale = w[:, :1].abs().clamp_min(torch.finfo(a.dtype).tiny)
        done = (resid <= _RTOL * scale).all(-1)
        if bool(done.any()):
            vals[todo[done]], vecs[todo[done]] = w[done], v[done]
            keep = ~done
            todo, sub, basis = todo[keep], sub[keep], basis[keep]
            if todo.numel() == 0:
                return vals, vecs
    w, v = torch.linalg.eigh(sub)
    vals[todo], vecs[todo] = w[:, -q:].flip(-1), v[..., -q:].flip(-1)
    return vals, vecs


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
        _, top = top_eigh(xc.mT @ xc, q)  # (B, D, q), largest first
        scores = xc @ top
    else:
        top_vals, top_vecs = top_eigh(xc @ xc.mT, q)  # Gram matrix (B, N, N)
        scores = top_vecs * top_vals.clamp_min(0).sqrt().unsqueeze(1)
    # Deterministic sign: the largest-magnitude score of each component is positive.
    idx = scores.abs().argmax(dim=1, keepdim=True)
    sign = torch.gather(scores, 1, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    scores = scores * sign
    var = scores.square().sum(dim=1) / max(n - 1, 1)
    return scores, var
