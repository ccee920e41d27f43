"""Batched EM for many small two-dimensional Gaussian mixtures at once.

Every filter of a CNN gives one tiny clustering problem (a few hundred 2-D points, a handful of
components). Fitting them one by one with scikit-learn costs tens of milliseconds each; here
thousands are fitted together.

How it stays fast:

* **Quadratic features.** With ``f(x) = [x^2, xy, y^2, x, y, 1]`` the log-density of a 2-D
  Gaussian (times its weight) is linear in ``f``: ``log pi_j N(x | mu_j, S_j) = f(x) . w_j``.
  The E-step is one batched matrix product ``F @ W`` and the M-step's sufficient statistics
  (counts, first and second moments) are another, ``R^T @ F``. No ``(B, N, K, 2)`` temporaries.
* **One copy of the features**, laid out ``(B, 6, N)`` for the E-step; the M-step reads it through a
  transposed view, so retiring and refilling problems copies half as much.
* **Cache-sized chunks** of problems on the CPU (the whole batch on a GPU).
* **Per-problem convergence.** A problem whose mean log-likelihood changes by less than ``tol``
  is retired with its labels; the active set is compacted as problems converge.
* **Closed-form 2 x 2 algebra** in float64 for the parameters (inverse, log-determinant).
* **Optionally compiled.** ``compile=True`` runs the Lloyd, E and M steps through ``torch.compile``
  (fused element-wise loops, shapes dynamic so retirement does not recompile); off by default.

One-dimensional problems (filters with ``1 x 1`` maps) are padded with a zero coordinate: the
padding adds the same constant to every component's log-density, so the fit is exactly a 1-D fit.

Initialisation is k-means++ seeding followed by a few Lloyd steps, like scikit-learn's default.
All random numbers come from a CPU :class:`torch.Generator` seeded by the caller and are drawn for
the whole batch up front, so results do not depend on the chunk size or the device.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["MixtureFit", "fit_gmm", "uniform_width"]

_LOG_2PI = math.log(2.0 * math.pi)
_EPS = 10.0 * torch.finfo(torch.float64).eps
_LOG_TINY = -80.0  # exp() stays a normal float32 (smallest normal ~1.2e-38, e^-87.3)
# Problems x samples x components held at once on a CPU: keeps E-step temporaries in cache.
_CPU_CHUNK_ELEMENTS = 1 << 20
# Same bound on an accelerator, where bigger batches are better but memory is finite.
_ACCEL_CHUNK_ELEMENTS = 1 << 28


@dataclass
class MixtureFit:
    """Result of :func:`fit_gmm` for ``B`` problems of ``N`` points and ``k`` components.

    Attributes:
        labels: ``(B, N)`` int64, most responsible component of each point.
        weights: ``(B, k)`` float64 mixture weights.
        means: ``(B, k, 2)`` float64 component means (second coordinate 0 for 1-D problems).
        lower_bound: ``(B,)`` float64 mean log-likelihood per point at the last iteration.
        n_iter: ``(B,)`` int64 EM iterations run.
        converged: ``(B,)`` bool, whether EM met ``tol`` before ``max_iter``.
    """

    labels: Tensor
    weights: Tensor
    means: Tensor
    lower_bound: Tensor
    n_iter: Tensor
    converged: Tensor


def _features_t(x: Tensor) -> Tensor:
    """``(B, N, 2)`` points -> ``(B, 6, N)`` quadratic features ``[x^2, xy, y^2, x, y, 1]``, one row each.

    The only copy of the features: the E-step reads it as it is (``W @ F^T``), the M-step through
    a transposed view (``R @ F``), which the batched matrix product takes without a copy.
    """
    px, py = x[..., 0], x[..., 1]
    return torch.stack([px * px, px * py, py * py, px, py, torch.ones_like(px)], dim=1)


def _max_mask(scores: Tensor) -> Tensor:
    """``(B, K, N)`` scores -> float mask, 1 where a score equals the largest over dim 1, else 0.

    Built from float arithmetic only: on the CPU, comparisons that produce ``bool`` tensors and
    casts from ``bool`` are several times slower than a subtraction and a ``sign``.
    """
    return (scores - scores.amax(1, keepdim=True)).sign_().add_(1.0)


def _argmax_dim1(scores: Tensor) -> Tensor:
    """Argmax over dim 1 of ``(B, K, N)`` finite scores, first index on ties.

    ``Tensor.argmax(1)`` is slow on the CPU when the reduced dimension is not the innermost one;
    the largest of the maximal positions' reversed ranks is not.
    """
    k = scores.shape[1]
    rank = torch.arange(k, 0, -1, dtype=scores.dtype, device=scores.device).view(1, k, 1)
    return (k - _max_mask(scores).mul_(rank).amax(1)).long()


def _onehot(labels: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """``(B, N)`` labels -> ``(B, K, N)`` one-hot."""
    return (labels.unsqueeze(1) == torch.arange(k, device=labels.device).view(1, k, 1)).to(dtype)


def _m_step(stats: Tensor, n: int, reg: float) -> tuple[Tensor, Tensor, Tensor]:
    """Sufficient statistics ``(B, K, 6)`` -> weights ``(B, K)``, means ``(B, K, 2)``, cov ``(B, K, 3)``.

    The covariance is returned as ``(a, b, c)`` for ``[[a, b], [b, c]]``, regularised and kept
    positive definite.
    """
    s = stats.double()
    nk = s[..., 5] + _EPS
    mx = s[..., 3] / nk
    my = s[..., 4] / nk
    a = (s[..., 0] / nk - mx * mx).clamp_min(0.0) + reg
    c = (s[..., 2] / nk - my * my).clamp_min(0.0) + reg
    b = s[..., 1] / nk - mx * my
    bound = (a * c).sqrt() * (1.0 - 1e-9)
    b = torch.maximum(torch.minimum(b, bound), -bound)
    weights = nk / (n + _EPS * nk.shape[-1])
    return weights, torch.stack([mx, my], dim=-1), torch.stack([a, b, c], dim=-1)


def _log_density_weights(weights: Tensor, means: Tensor, cov: Tensor, dtype: torch.dtype) -> Tensor:
    """Parameters -> ``(B, K, 6)`` matrix ``W`` with ``W @ F^T = log(pi_j N(x | mu_j, S_j))``."""
    a, b, c = cov.unbind(-1)
    det = a * c - b * b
    p11, p12, p22 = c / det, -b / det, a / det
    mx, my = means.unbind(-1)
    w3 = p11 * mx + p12 * my
    w4 = p12 * mx + p22 * my
    w5 = -0.5 * (mx * w3 + my * w4) - 0.5 * det.log() - _LOG_2PI + weights.log()
    return torch.stack([-0.5 * p11, -p12, -0.5 * p22, w3, w4, w5], dim=-1).to(dtype)


def _e_step(feats_t: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """Responsibilities ``(B, K, N)`` and mean log-likelihood per problem ``(B,)`` (float64)."""
    resp = torch.bmm(w, feats_t)  # log-densities, turned into responsibilities in place
    top = resp.amax(dim=1, keepdim=True)
    # Clamped above float32's underflow: exp of such arguments is tens of times slower on CPUs, and
    # a responsibility of exp(-80) ~ 2e-35 next to the largest one (1) changes no sum.
    resp.sub_(top).clamp_(min=_LOG_TINY).exp_()
    total = resp.sum(dim=1, keepdim=True)
    resp.div_(total)
    loglik = (top + total.log()).squeeze(1)
    return resp, loglik.double().mean(dim=-1)


def uniform_width(k: int) -> int:
    """Uniform draws one problem's initialisation takes for ``k`` components."""
    return 1 + (k - 1) * _n_trials(k)


def _n_trials(k: int) -> int:
    """Candidates per k-means++ centre, as in scikit-learn's greedy k-means++."""
    return 2 + int(math.log(k))


def _lloyd_assign(cen: Tensor, x1t: Tensor) -> Tensor:
    """``(B, k, 2)`` centres, ``(B, 3, N)`` points with a ones row -> ``(B, k, N)`` nearest-centre mask.

    Closeness ``-||x - c||^2`` up to the per-point constant ``||x||^2``, as one product, then a
    one-hot float mask; an exact tie (duplicate centres) counts the point for each tied centre,
    which keeps every centre at the mean of the points it holds.
    """
    coef = torch.cat([2.0 * cen, -cen.square().sum(-1, keepdim=True)], dim=-1)  # (B, k, 3)
    return _max_mask(torch.bmm(coef, x1t))


def _lloyd_step(assign: Tensor, cen: Tensor, x1t: Tensor) -> tuple[Tensor, Tensor]:
    """One Lloyd step: centres to the means of their points (empty ones stay), then the new assignment."""
    sums = torch.bmm(assign, x1t.mT)  # (B, k, 3): sums and counts
    counts = sums[..., 2:]
    cen = torch.where(counts > 0, sums[..., :2] / counts.clamp_min(1), cen)
    return _lloyd_assign(cen, x1t), cen


def _e_step_from(weights: Tensor, means: Tensor, cov: Tensor, feats_t: Tensor) -> tuple[Tensor, Tensor]:
    """Parameters and ``(B, 6, N)`` features -> responsibilities ``(B, K, N)`` and mean log-likelihood ``(B,)``."""
    return _e_step(feats_t, _log_density_weights(weights, means, cov, feats_t.dtype))


def _m_step_from(resp: Tensor, feats_t: Tensor, n: int, reg: float) -> tuple[Tensor, Tensor, Tensor]:
    """Responsibilities and features -> weights, means and covariances (see :func:`_m_step`)."""
    return _m_step(torch.bmm(resp, feats_t.mT), n, reg)


@dataclass(frozen=True)
class _Steps:
    """The hot steps of the fit, eager or compiled with ``torch.compile``."""

    lloyd: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] = _lloyd_step
    e_step: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] = _e_step_from
    m_step: Callable[[Tensor, Tensor, int, float], tuple[Tensor, Tensor, Tensor]] = _m_step_from


_EAGER = _Steps()


class _FirstCallChecked:
    """A ``torch.compile``d function whose first call turns a compiler failure into a clear error."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn: Callable[..., Any] = torch.compile(fn, dynamic=True)
        self._checked = False

    def __call__(self, *args: Any) -> Any:
        if self._checked:
            return self._fn(*args)
        try:
            out = self._fn(*args)
        except Exception as err:  # inductor raises several types; all mean the same to a user
            raise RuntimeError(
                f"compile=True: torch.compile could not build the clustering steps ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); on a CPU the inductor backend needs a working "
                "C++ compiler (install g++ or clang, or point $CXX at one), or use compile=False"
            ) from err
        self._checked = True
        return out


def _steps(compile: bool) -> _Steps:
    """The eager steps, or the compiled ones (built on first use; a missing C++ compiler is an error)."""
    return _compiled_steps() if compile else _EAGER


@functools.cache
def _compiled_steps() -> _Steps:
    """The steps through ``torch.compile``, built once per process (a failure is not cached)."""
    cxx = os.environ.get("CXX")
    if not any(shutil.which(c) for c in ([cxx] if cxx else ["g++", "c++", "clang++"])):
        raise RuntimeError(
            "compile=True needs a C++ compiler for torch.compile's CPU backend and none was found "
            f"({'$CXX=' + repr(cxx) if cxx else 'g++, c++, clang++'} not on PATH); install g++ or clang "
            "(or set $CXX), or use compile=False"
        )
    return _Steps(
        lloyd=_FirstCallChecked(_lloyd_step),
        e_step=_FirstCallChecked(_e_step_from),
        m_step=_FirstCallChecked(_m_step_from),
    )


def _kmeans_labels(x: Tensor, k: int, n_iter: int, uniforms: Tensor, steps: _Steps = _EAGER) -> Tensor:
    """Greedy k-means++ seeding, then up to ``n_iter`` Lloyd steps.

    Each new centre is the best (lowest total squared distance) of ``_n_trials(k)`` candidates
    drawn with probability proportional to the squared distance to the nearest chosen centre.

    Args:
        x: ``(B, N, 2)`` points.
        k: Number of centres.
        n_iter: Most Lloyd steps (stops early once no label changes).
        uniforms: ``(B, 1 + (k - 1) * _n_trials(k))`` uniform draws in ``[0, 1)``.
        steps: Eager or compiled step functions.
    """
    bsz, n, _ = x.shape
    trials = _n_trials(k)
    rows = torch.arange(bsz, device=x.device)
    px, py = x[..., 0], x[..., 1]  # (B, N) each: no reductions over a size-2 dimension
    first = (uniforms[:, 0] * n).long().clamp_max(n - 1)
    centers = [x[rows, first]]  # list of (B, 2)
    d2 = (px - centers[0][:, :1]).square_() + (py - centers[0][:, 1:]).square_()
    for j in range(1, k):
        total = d2.sum(-1, keepdim=True)
        # All points on the chosen centres: any point will do, take a uniform one.
        probs = torch.where(total > 0, d2, torch.ones_like(d2))
        cdf = probs.cumsum(-1)
        u = uniforms[:, 1 + (j - 1) * trials : 1 + j * trials].to(cdf.dtype)
        cand = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_max(n - 1)  # (B, T)
        cx, cy = torch.gather(px, 1, cand), torch.gather(py, 1, cand)  # (B, T)
        cand_d2 = (px.unsqueeze(1) - cx.unsqueeze(-1)).square_() + (py.unsqueeze(1) - cy.unsqueeze(-1)).square_()
        cand_d2 = torch.minimum(cand_d2, d2.unsqueeze(1))  # (B, T, N)
        best = cand_d2.sum(-1).argmin(-1)  # (B,)
        centers.append(torch.stack([cx[rows, best], cy[rows, best]], dim=-1))
        d2 = cand_d2[rows, best]
    cen = torch.stack(centers, dim=1)  # (B, k, 2)
    x1t = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1).mT.contiguous()  # (B, 3, N)

    assign = _lloyd_assign(cen, x1t)
    for _ in range(n_iter):
        new_assign, cen = steps.lloyd(assign, cen, x1t)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return _argmax_dim1(assign)


class _Work:
    """The problems being iterated on: a batch that is refilled as problems retire."""

    def __init__(
        self,
        x: Tensor,
        idx: Tensor,
        k: int,
        uniforms: Tensor,
        reg: float,
        kmeans_iter: int,
        steps: _Steps = _EAGER,
    ) -> None:
        n = x.shape[1]
        self.idx = idx
        self.feats_t = _features_t(x)  # (B, 6, N)
        init = _kmeans_labels(x, k, kmeans_iter, uniforms, steps)
        self.weights, self.means, self.cov = steps.m_step(_onehot(init, k, x.dtype), self.feats_t, n, reg)
        self.prev = torch.full((len(idx),), -math.inf, dtype=torch.float64, device=x.device)
        self.iters = torch.zeros(len(idx), dtype=torch.long, device=x.device)
        self.alive = torch.ones(len(idx), dtype=torch.bool, device=x.device)

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    _FIELDS = ("idx", "feats_t", "weights", "means", "cov", "prev", "iters", "alive")

    def select(self, keep: Tensor) -> None:
        """Keep the rows ``keep`` (int64 indices)."""
        for name in self._FIELDS:
            setattr(self, name, getattr(self, name).index_select(0, keep))

    def extend(self, other: _Work) -> None:
        for name in self._FIELDS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))


def _fit_batched(
    x: Tensor,
    k: int,
    uniforms: Tensor,
    max_iter: int,
    tol: float,
    reg: float,
    kmeans_iter: int,
    chunk: int,
    steps: _Steps = _EAGER,
) -> MixtureFit:
    """EM over all problems with a working batch of about ``chunk`` problems.

    Problems retire individually when they converge; the working batch is refilled from the queue
    whenever it falls below half its size, so the per-iteration overhead is paid for full batches
    and never for a long tail of stragglers in a mostly converged chunk.
    """
    bsz, n, _ = x.shape
    dev = x.device
    labels = torch.zeros(bsz, n, dtype=torch.long, device=dev)
    out_w = torch.zeros(bsz, k, dtype=torch.float64, device=dev)
    out_m = torch.zeros(bsz, k, 2, dtype=torch.float64, device=dev)
    lower = torch.full((bsz,), -math.inf, dtype=torch.float64, device=dev)
    n_iter = torch.zeros(bsz, dtype=torch.long, device=dev)
    converged = torch.zeros(bsz, dtype=torch.bool, device=dev)

    queued = 0
    alive = 0
    work: _Work | None = None
    while True:
        if queued < bsz and alive < chunk // 2:
            take = min(bsz - queued, chunk - alive)
            idx = torch.arange(queued, queued + take, device=dev)
            fresh = _Work(x[queued : queued + take], idx, k, uniforms[queued : queued + take], reg, kmeans_iter, steps)
            queued += take
            alive += take
            if work is None:
                work = fresh
            else:
                work.extend(fresh)
        if work is None or alive == 0:
            break
        resp, lb = steps.e_step(work.weights, work.means, work.cov, work.feats_t)
        work.iters += 1
        done = (lb - work.prev).abs() < tol
        finished = work.alive & (done | (work.iters >= max_iter))
        # One host sync per iteration decides whether anything retires; on a GPU this is the
        # only round trip, and it saves every later iteration for the retired problems.
        n_finished = int(finished.sum())
        if n_finished:
            # Integer indices, computed once: boolean-mask indexing repeats a nonzero() per use.
            fin = finished.nonzero().squeeze(1)
            rows = work.idx[fin]
            labels[rows] = _argmax_dim1(resp.index_select(0, fin))
            out_w[rows] = work.weights[fin]
            out_m[rows] = work.means[fin]
            lower[rows] = lb[fin]
            n_iter[rows] = work.iters[fin]
            converged[rows] = done[fin]
            work.alive &= ~finished
            alive -= n_finished
            # Retired problems ride along until enough of them make a copy worthwhile.
            if alive == 0 or (len(work) - alive) * 8 >= len(work):
                keep = work.alive.nonzero().squeeze(1)
                work.select(keep)
                resp, lb = resp.index_select(0, keep), lb[keep]
                if alive == 0:
                    work = None
                    continue
        work.prev = lb
        work.weights, work.means, work.cov = steps.m_step(resp, work.feats_t, n, reg)
    return MixtureFit(labels, out_w, out_m, lower, n_iter, converged)


def fit_gmm(
    points: Tensor,
    k: int,
    *,
    generator: torch.Generator | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
    kmeans_iter: int = 10,
    n_init: int = 1,
    chunk_size: int | None = None,
    uniforms: Tensor | None = None,
    compile: bool = False,
) -> MixtureFit:
    """Fit one full-covariance Gaussian mixture of ``k`` components to each of ``B`` point sets.

    Example::

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(2, 40, 2, generator=g)
        >>> pts = torch.cat([a, a[:, :3] * 0.01 + 8.0], dim=1)  # a tight 3-point cluster far away
        >>> fit = fit_gmm(pts, 2, generator=torch.Generator().manual_seed(0))
        >>> torch.bincount(fit.labels[0]).sort().values.tolist()
        [3, 40]

    Args:
        points: ``(B, N, d)`` float tensor with ``d`` in ``{1, 2}``, finite. Any device.
        k: Number of components, ``2 <= k < N``.
        generator: CPU generator for the initialisation; a fixed seed (0) when omitted.
        max_iter: Most EM iterations per problem.
        tol: Convergence threshold on the change of the mean log-likelihood per point.
        reg_covar: Added to each covariance diagonal.
        kmeans_iter: Lloyd iterations after k-means++ seeding.
        n_init: Initialisations per problem; the fit with the best lower bound is kept.
        uniforms: Pre-drawn ``(n_init * B, uniform_width(k))`` initialisation draws in ``[0, 1)``
            (init-major rows); drawn from ``generator`` when omitted.
        chunk_size: Problems fitted together; by default sized to the CPU cache, or the whole
            batch on an accelerator.
        compile: Run the Lloyd, E and M steps through ``torch.compile`` (fused element-wise
            loops). The first call compiles (tens of seconds); later calls in the process reuse it.

    Returns:
        A :class:`MixtureFit`; no field holds NaN.

    Raises:
        ValueError: Wrong shape, ``k`` out of range, or non-finite points.
        TypeError: ``compile`` is not a bool.
        RuntimeError: ``compile=True`` and ``torch.compile`` cannot build the steps (no C++ compiler).
    """
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {compile!r}")
    if points.ndim != 3 or points.shape[-1] not in (1, 2):
        raise ValueError(f"points must have shape (B, N, 1 or 2), got {tuple(points.shape)}")
    bsz, n, d = points.shape
    if not 2 <= k < n:
        raise ValueError(f"k must satisfy 2 <= k < N={n}, got k={k}; use more points or a smaller k")
    if not bool(torch.isfinite(points).all()):
        raise ValueError("points contain NaN or Inf; drop those problems before fitting (see analyze's degenerate)")
    x = points.float()
    if d == 1:
        x = torch.cat([x, torch.zeros_like(x)], dim=-1)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if n_init > 1:
        x = x.repeat(n_init, 1, 1)  # init-major: rows i, B + i, 2B + i are one problem
    total = x.shape[0]
    width = uniform_width(k)
    if uniforms is None:
        uniforms = torch.rand(total, width, generator=gen, dtype=torch.float64)
    elif tuple(uniforms.shape) != (total, width):
        raise ValueError(f"uniforms must have shape {(total, width)}, got {tuple(uniforms.shape)}")
    uniforms = uniforms.to(x.device)
    if chunk_size is None:
        budget = _CPU_CHUNK_ELEMENTS if x.device.type == "cpu" else _ACCEL_CHUNK_ELEMENTS
        chunk_size = max(8, budget // (n * k))
    fit = _fit_batched(x, k, uniforms, max_iter, tol, reg_covar, kmeans_iter, chunk_size, _steps(compile))
    if n_init == 1:
        return fit
    best = fit.lower_bound.view(n_init, bsz).argmax(0) * bsz + torch.arange(bsz, device=x.device)
    return MixtureFit(
        *(t[best] for t in (fit.labels, fit.weights, fit.means, fit.lower_bound, fit.n_iter, fit.converged))
    )
