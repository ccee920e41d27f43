"""Batched, deterministic PCA of many small data matrices at once."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batched_pca", "batched_pca_with_global", "top_eigh"]

# Matrices up to this size go straight to a dense eigendecomposition.
_DENSE_MAX = 48
_OVERSAMPLE = 6
_RTOL = 1e-4
# Largest share of a problem's sum of squares its mean may hold for the products to skip centring.
_CENTRED_RTOL = 1e-4


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
    for it in range(1, max_iter + 2):
        # One product with A per iteration: it feeds the Rayleigh-Ritz check of the current basis
        # (B^T A B and the residual A v = (A B) s) and then the next basis, so a check costs no
        # extra pass over the (b, m, m) matrices, which is what the time goes to.
        prod = sub @ basis
        if (it > 1 and (it - 1) % 5 == 0) or it == max_iter + 1:
            w, s = torch.linalg.eigh(basis.mT @ prod)
            w, s = w[:, -q:].flip(-1), s[..., -q:].flip(-1)
            v = basis @ s
            resid = (prod @ s - v * w.unsqueeze(1)).norm(dim=1)  # (b, q)
            scale = w[:, :1].abs().clamp_min(torch.finfo(a.dtype).tiny)
            done = (resid <= _RTOL * scale).all(-1)
            if bool(done.any()):
                vals[todo[done]], vecs[todo[done]] = w[done], v[done]
                keep = ~done
                todo, sub, prod = todo[keep], sub[keep], prod[keep]
                if todo.numel() == 0:
                    return vals, vecs
            if it == max_iter + 1:
                break
        basis = torch.linalg.qr(prod).Q
    w, v = torch.linalg.eigh(sub)
    vals[todo], vecs[todo] = w[:, -q:].flip(-1), v[..., -q:].flip(-1)
    return vals, vecs


def _centred_gram(x: Tensor, mean: Tensor) -> Tensor:
    """``(B, N, D)`` data, ``(B, 1, D)`` means over samples -> ``(B, N, N)`` Gram matrix of the centred data.

    Data that are already centred (the class-conditional residuals ``analyze`` passes) are
    multiplied as they are, with the mean's exact correction ``- v 1^T - 1 v^T + |mean|^2``
    (``v = x mean^T``): no centred copy of a large ``x``, which costs about as much as the product.
    Data whose mean holds more than ``_CENTRED_RTOL`` of their sum of squares are centred first:
    the correction would cancel there, and float32 would lose the spread.
    """
    n = x.shape[1]
    mean_sq = mean.square().sum(-1, keepdim=True)  # (B, 1, 1)
    energy = torch.linalg.vector_norm(x, dim=(1, 2)).square()
    if bool((n * mean_sq.flatten() <= _CENTRED_RTOL * energy).all()):
        along = x @ mean.mT  # (B, N, 1)
        return _gram(x) - along - along.mT + mean_sq
    return _gram(x - mean)


def _gram(x: Tensor) -> Tensor:
    """``(B, N, D)`` -> ``(B, N, N)`` ``x @ x^T``, its off-diagonal block computed once.

    Three half-size products instead of one full one: a quarter fewer multiply-adds, and each
    entry is still one dot product over ``D``.
    """
    b, n, _ = x.shape
    h = n // 2
    top, bottom = x[:, :h], x[:, h:]
    g = x.new_empty(b, n, n)
    g[:, :h, :h] = top @ top.mT
    lower = bottom @ top.mT
    g[:, h:, :h] = lower
    g[:, :h, h:] = lower.mT
    g[:, h:, h:] = bottom @ bottom.mT
    return g


def batched_pca(x: Tensor, n_components: int) -> tuple[Tensor, Tensor]:
    """Project each of ``B`` data matrices onto its own top principal components.

    The eigendecomposition runs on whichever is smaller: the ``D x D`` covariance or the ``N x N``
    Gram matrix (large maps, ``D > N``: the scores are then the Gram matrix's top eigenvectors
    scaled by the square roots of their eigenvalues, and no ``D x D`` matrix is formed). No random
    numbers are drawn (``torch.pca_lowrank`` would draw from the global RNG). Signs are fixed so
    that, per component, the score of largest magnitude is positive, which makes the result
    deterministic.

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
    x = x.float()
    mean = x.mean(dim=1, keepdim=True)  # (B, 1, D)
    if d <= n:
        xc = x - mean
        _, top = top_eigh(xc.mT @ xc, q)  # (B, D, q), largest first
        scores = xc @ top
    else:
        top_vals, top_vecs = top_eigh(_centred_gram(x, mean), q)  # (B, N, q)
        scores = top_vecs * top_vals.clamp_min(0).sqrt().unsqueeze(1)
    return _signed(scores, n)


def _signed(scores: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Scores with a deterministic sign (the largest-magnitude score of each component is positive), and their variance."""
    idx = scores.abs().argmax(dim=1, keepdim=True)
    sign = torch.gather(scores, 1, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    scores = scores * sign
    var = scores.square().sum(dim=1) / max(n - 1, 1)
    return scores, var


def batched_pca_with_global(
    residuals: Tensor, between: Tensor, onehot: Tensor, n_components: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """:func:`batched_pca` of group residuals, and of the same data with only the overall mean removed.

    The globally centred data are ``residuals + onehot @ between``. Both views share the expensive
    product (``D x D`` or ``N x N``): because residuals sum to zero within each group, the global
    covariance is the residuals' plus the groups' between-scatter, and the global Gram matrix is the
    residuals' plus terms of rank at most ``2 G``. The first result equals ``batched_pca(residuals)``.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(3, 40, 6, generator=g)
        >>> onehot = torch.nn.functional.one_hot(torch.arange(40) % 4, 4).float()
        >>> means = onehot.mT @ x / onehot.sum(0)[:, None]  # (3, 4, 6) group means
        >>> resid = x - onehot @ means
        >>> between = means - x.mean(1, keepdim=True)
        >>> _, (scores, _) = batched_pca_with_global(resid, between, onehot, 2)
        >>> ref, _ = batched_pca(x, 2)
        >>> torch.allclose(scores, ref, atol=1e-4)
        True

    Args:
        residuals: ``(B, N, D)`` data minus their group's mean.
        between: ``(B, G, D)`` each group's mean minus the overall mean.
        onehot: ``(N, G)`` float group membership (one 1 per row).
        n_components: As in :func:`batched_pca`.

    Returns:
        ``(scores, variance)`` of the residuals and ``(scores, variance)`` of the global view, each as
        :func:`batched_pca` returns them.
    """
    if residuals.ndim != 3:
        raise ValueError(f"residuals must have shape (B, N, D), got {tuple(residuals.shape)}")
    n, d = residuals.shape[1:]
    q = min(n_components, d, n)
    x = residuals.float()
    between = between.float()
    onehot = onehot.to(x)
    mean = x.mean(dim=1, keepdim=True)  # zero up to rounding: residuals sum to zero within each group
    sizes = onehot.sum(0)  # (G,)
    if d <= n:
        xc = x - mean
        cov = xc.mT @ xc
        _, top = top_eigh(cov, q)
        scores = xc @ top
        cov_g = cov + between.mT @ (between * sizes[:, None])
        _, top_g = top_eigh(cov_g, q)
        scores_g = xc @ top_g + onehot @ (between @ top_g)
    else:
        gram = _centred_gram(x, mean)
        top_vals, top_vecs = top_eigh(gram, q)
        scores = top_vecs * top_vals.clamp_min(0).sqrt().unsqueeze(1)
        # xg xg^T = xc xc^T + xc b^T + b xc^T + b b^T with b = onehot @ between: no (B, N, D) copy.
        cross = (x @ between.mT - mean @ between.mT) @ onehot.mT  # (B, N, N), rank <= G
        gram_g = gram + cross + cross.mT + onehot @ (between @ between.mT) @ onehot.mT
        vals_g, vecs_g = top_eigh(gram_g, q)
        scores_g = vecs_g * vals_g.clamp_min(0).sqrt().unsqueeze(1)
    return _signed(scores, n), _signed(scores_g, n)
