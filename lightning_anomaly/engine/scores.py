"""Batched Calinski-Harabasz index."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "calinski_harabasz",
    "calinski_harabasz_centred",
    "centred",
    "cluster_sizes",
    "member_distance",
    "separation",
    "separation_parts",
]


def cluster_sizes(labels: Tensor, n_clusters: int) -> Tensor:
    """Count the members of each cluster.

    Args:
        labels: ``(B, N)`` integer labels in ``[0, n_clusters)``.
        n_clusters: Number of possible labels.

    Returns:
        ``(B, n_clusters)`` int64 counts.
    """
    counts = torch.zeros(labels.shape[0], n_clusters, dtype=torch.long, device=labels.device)
    return counts.scatter_add_(1, labels.long(), torch.ones_like(labels, dtype=torch.long))


def calinski_harabasz(points: Tensor, labels: Tensor, n_clusters: int) -> Tensor:
    """Calinski-Harabasz index of ``B`` labellings at once.

    ``CH = [SSB / (k - 1)] / [SSW / (N - k)]`` with ``k`` the number of non-empty clusters, as in
    :func:`sklearn.metrics.calinski_harabasz_score`, computed in float64. Conventions follow
    scikit-learn where it defines the value (``SSW == 0`` gives 1.0); where scikit-learn raises
    (``k < 2`` or ``k == N``) the result is NaN instead, so one bad problem does not stop a batch.
    Invariant to permutations of the labels.

    Example::

        >>> import torch
        >>> pts = torch.tensor([[[0.0], [0.5], [5.0], [5.5]]])
        >>> calinski_harabasz(pts, torch.tensor([[0, 0, 1, 1]]), 2)
        tensor([200.], dtype=torch.float64)

    Args:
        points: ``(B, N, d)`` float points.
        labels: ``(B, N)`` integer labels in ``[0, n_clusters)``.
        n_clusters: Number of possible labels.

    Returns:
        ``(B,)`` float64.
    """
    return calinski_harabasz_centred(*centred(points), labels, n_clusters)


def centred(points: Tensor) -> tuple[Tensor, Tensor]:
    """``(B, N, d)`` points in float64 less each problem's mean, and each problem's total scatter ``(B,)``.

    What :func:`calinski_harabasz_centred` takes: compute it once for every labelling of the same points.
    """
    x = points.double()
    x = x - x.mean(1, keepdim=True)
    return x, x.square().sum((1, 2))


def calinski_harabasz_centred(x: Tensor, total: Tensor, labels: Tensor, n_clusters: int) -> Tensor:
    """:func:`calinski_harabasz` of points given as :func:`centred` returns them."""
    n = x.shape[1]
    counts = cluster_sizes(labels, n_clusters).double()  # (B, K)
    sums = x.new_zeros(x.shape[0], n_clusters, x.shape[2])
    sums.scatter_add_(1, labels.long().unsqueeze(-1).expand_as(x), x)
    # Between-cluster scatter about the grand mean (0: x is centred): sum over clusters of |sum|^2 / count.
    ssb = (sums.square().sum(-1) / counts.clamp_min(1)).sum(-1)
    # Within-cluster scatter by the parallel-axis theorem: total minus between-cluster scatter.
    ssw = (total - ssb).clamp_min(0.0)
    k = (counts > 0).sum(-1).double()
    ch = ssb * (n - k) / (ssw * (k - 1.0))
    # Cancellation leaves ~1e-16 * total where the scatter is really zero (k point masses).
    zero = ssw <= 1e-12 * total
    ch = torch.where(zero, torch.ones_like(ch), ch)
    undefined = (k < 2) | (k >= n)
    return torch.where(undefined, torch.full_like(ch, math.nan), ch)


def _group_geometry(points: Tensor, members: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A group's geometry against the rest of its points.

    Returns:
        The group's and the rest's means ``(B, d)``, the pooled within-group standard deviation
        ``(B,)``, and whether both sides hold a point ``(B,)``.
    """
    x = points.double()
    m = members.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    n_in = m.sum(1)  # (B, 1)
    n_out = x.shape[1] - n_in
    mean_in = (x * m).sum(1) / n_in.clamp_min(1)
    mean_out = (x * (1 - m)).sum(1) / n_out.clamp_min(1)
    resid = x - torch.where(m.bool(), mean_in.unsqueeze(1), mean_out.unsqueeze(1))
    dof = (x.shape[1] - 2) * x.shape[-1]
    pooled = resid.square().sum((1, 2)) / max(1, dof)
    sd = pooled.clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    ok = (n_in.squeeze(-1) > 0) & (n_out.squeeze(-1) > 0)
    return mean_in, mean_out, sd, ok


def separation(points: Tensor, members: Tensor) -> Tensor:
    """How far a group of points lies from the rest, in within-group standard deviations.

    The distance between the group's mean and the other points' mean, divided by the pooled
    within-group standard deviation per dimension. A tail cut from one Gaussian blob scores about
    2-3; a group that a filter answers apart from everything else scores much higher.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> pts = torch.randn(1, 100, 2, generator=g)
        >>> pts[0, :5] += 20.0
        >>> members = torch.zeros(1, 100, dtype=torch.bool)
        >>> members[0, :5] = True
        >>> bool(separation(pts, members)[0] > 10)
        True

    Args:
        points: ``(B, N, d)`` float points.
        members: ``(B, N)`` bool group membership.

    Returns:
        ``(B,)`` float64; 0 where the group or the rest has fewer than one point.
    """
    mean_in, mean_out, sd, ok = _group_geometry(points, members)
    sep = (mean_in - mean_out).norm(dim=-1) / sd
    return torch.where(ok, sep, torch.zeros_like(sep))


def member_distance(points: Tensor, members: Tensor) -> Tensor:
    """How far each point lies from the rest's mean, along the line from the rest's mean to the group's.

    In the units of :func:`separation` (pooled within-group standard deviations), clamped at 0 for
    points on the far side of the rest. The group's members average exactly their group's
    separation before the clamp; what this adds is which members lie further out than others.

    Example::

        >>> pts = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [4.0, 0.0], [6.0, 0.0]]])
        >>> members = torch.tensor([[False, False, True, True]])
        >>> d = member_distance(pts, members)[0]
        >>> bool(d[3] > d[2] > 0), round(float(d[2:].mean() / separation(pts, members)[0]), 9)
        (True, 1.0)

    Args:
        points: ``(B, N, d)`` float points.
        members: ``(B, N)`` bool group membership.

    Returns:
        ``(B, N)`` float64, ``>= 0``; 0 throughout where the group or the rest has no point.
    """
    return separation_parts(points, members)[1]


def separation_parts(points: Tensor, members: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`separation` ``(B,)`` and :func:`member_distance` ``(B, N)`` from one pass over the points."""
    mean_in, mean_out, sd, ok = _group_geometry(points, members)
    diff = mean_in - mean_out
    length = diff.norm(dim=-1)
    axis = diff / length.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(-1)
    dist = ((points.double() - mean_out.unsqueeze(1)) * axis.unsqueeze(1)).sum(-1) / sd.unsqueeze(-1)
    sep = torch.where(ok, length / sd, torch.zeros_like(length))
    return sep, torch.where(ok.unsqueeze(-1), dist.clamp_min(0.0), torch.zeros_like(dist))
