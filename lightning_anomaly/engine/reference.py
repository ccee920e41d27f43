"""The paper's recipe with scikit-learn, one filter and one k at a time.

This is the reference the batched engine is tested and benchmarked against: scikit-learn's
``PCA``, ``GaussianMixture`` (full covariance) and ``calinski_harabasz_score`` per filter and per
k. A fit that scikit-learn refuses (ill-defined covariance, too few distinct points) leaves that k
out for that filter; a filter with no usable k is reported degenerate, never fatal. Convergence
warnings are caught and recorded per filter.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["sklearn_cluster", "sklearn_pca"]


def sklearn_pca(x: Tensor, n_components: int) -> tuple[Tensor, Tensor]:
    """scikit-learn ``PCA`` on each of ``B`` matrices; same contract as :func:`batched_pca`.

    Args:
        x: ``(B, N, D)`` float tensor.
        n_components: Components to keep (clipped to ``min(D, N)``).

    Returns:
        ``scores`` ``(B, N, q)`` float32 and ``explained_variance`` ``(B, q)`` float32.
    """
    from sklearn.decomposition import PCA

    b, n, d = x.shape
    q = min(n_components, d, n)
    arr = x.detach().double().cpu().numpy()
    scores = np.zeros((b, n, q))
    var = np.zeros((b, q))
    for i in range(b):
        pca = PCA(n_components=q, svd_solver="full")
        scores[i] = pca.fit_transform(arr[i])
        var[i] = pca.explained_variance_
    return torch.from_numpy(scores).float().to(x.device), torch.from_numpy(var).float().to(x.device)


def sklearn_cluster(
    points: Tensor,
    k_values: Sequence[int],
    *,
    seed: int = 0,
    reg_covar: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-3,
    n_init: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per filter: fit ``GaussianMixture`` for every k and keep the k of largest CH.

    Args:
        points: ``(B, N, q)`` float points, one problem per filter.
        k_values: Mixture sizes to try.
        seed: ``random_state`` of every ``GaussianMixture``.
        reg_covar: Covariance regularisation.
        max_iter: EM iteration limit.
        tol: EM tolerance.
        n_init: Initialisations per mixture (scikit-learn's ``n_init``).

    Returns:
        ``k`` ``(B,)`` int64 (0 when no k worked), ``ch`` ``(B,)`` float64 (NaN when none worked),
        ``labels`` ``(B, N)`` int64 (-1 when none worked) and ``converged`` ``(B,)`` bool.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import calinski_harabasz_score
    from sklearn.mixture import GaussianMixture

    arr = points.detach().double().cpu().numpy()
    b, n, _ = arr.shape
    best_k = np.zeros(b, dtype=np.int64)
    best_ch = np.full(b, math.nan)
    best_labels = np.full((b, n), -1, dtype=np.int64)
    converged = np.zeros(b, dtype=bool)
    for i in range(b):
        for k in k_values:
            gm = GaussianMixture(
                n_components=k,
                covariance_type="full",
                reg_covar=reg_covar,
                max_iter=max_iter,
                tol=tol,
                n_init=n_init,
                random_state=seed,
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                try:
                    labels = gm.fit_predict(arr[i])
                except (ValueError, FloatingPointError, np.linalg.LinAlgError):
                    continue
            n_labels = len(np.unique(labels))
            if not 2 <= n_labels < n:
                continue
            ch = float(calinski_harabasz_score(arr[i], labels))
            if math.isnan(best_ch[i]) or ch > best_ch[i]:
                best_k[i], best_ch[i], best_labels[i] = k, ch, labels
                converged[i] = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return (
        torch.from_numpy(best_k),
        torch.from_numpy(best_ch),
        torch.from_numpy(best_labels),
        torch.from_numpy(converged),
    )
