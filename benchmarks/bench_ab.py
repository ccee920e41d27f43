"""Same-process A/B of the engine changes of issue 16 (part 2): the code before beside the code now.

Each change is timed against the code before it, on the same inputs, in this one process, with the
arms alternating over repetitions (the order flips every repetition):

  * ``one_copy`` (kept): the mixture fit keeps one ``(B, 6, N)`` copy of the quadratic features
    instead of a ``(B, N, 6)`` copy and its transpose (``gmm._fit_batched``). The M-step reads the
    copy through a transposed view, which sums in another order: agreement is reported.
  * ``pca`` (kept): ``pca.batched_pca`` on the very inputs ``reduce_maps`` hands it; on large maps
    (``H*W > N``) the centred Gram matrix is formed without a centred copy of the maps and with
    its off-diagonal block once, and the subspace iteration reuses each product with A for its
    Rayleigh-Ritz check.
  * ``lloyd`` (measured, not kept): per-problem retirement of the Lloyd steps after k-means++
    seeding. Its labels are bit-identical to the package's ``gmm._kmeans_labels``; the row says
    whether they are, and how many steps problems take to their fixed point.

The "before" arm is the old code, copied below verbatim (``_old_*``) and swapped into the engine
for its turn; the rejected Lloyd candidate lives here too (``_candidate_*``). The package itself
holds only the code it runs.

Inputs, one probe of 256 digits (scikit-learn's, upscaled to 32x32; no download):
  * a torchvision ResNet-18 (``weights=None``, 10 classes): 4,800 filters, maps of 16x16 down to 1x1;
  * a four-conv CNN (16 + 32 + 64 + 80 = 192 filters, every map 32x32), trained for
    ``--train-epochs`` on the other digits.
As ``analyze`` does with targets, each class's mean map is removed before the PCA, and the
clustering runs k = 2..6 over all filters of a model in one batch (``cluster_points``).

Timing is CPU time of this process (``time.process_time``) with one intra-op thread, so a second
job on the machine slows the wall clock but not the figures; wall-clock ratios are printed beside.
Ratios are before / after, medians over ``--reps`` repetitions. Agreement: share of filters whose
final labels are identical, share with the same k, and the largest absolute difference between the
PCA points the clustering sees (each filter's scores scaled to unit mean squared norm, sign-aligned).

Prints one row per change and model, then one JSON line last.

    OMP_NUM_THREADS=1 python benchmarks/bench_ab.py [--reps 5] [--train-epochs 1] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

import lightning_anomaly.engine.gmm as gmm
import lightning_anomaly.engine.pca as pca
from lightning_anomaly import AnomalyCriteria
from lightning_anomaly.demo import digits_tensors
from lightning_anomaly.demo.train import train_plain
from lightning_anomaly.engine import capture_layers, cluster_points, select_layers
from lightning_anomaly.engine.analyze import class_ids

# --------------------------------------------------------------------------------------------
# The candidate that was measured and not kept: per-problem Lloyd retirement. The package's
# ``gmm._kmeans_labels`` (unchanged) is its "before" arm.
# --------------------------------------------------------------------------------------------


def _candidate_closest(cen: Tensor, x1t: Tensor) -> Tensor:
    """``(B, k, 2)`` centres, ``(B, 3, N)`` points with a ones row -> ``(B, k, N)`` nearest-centre mask.

    Closeness ``-||x - c||^2`` up to the per-point constant ``||x||^2``, as one product, then a
    one-hot float mask; an exact tie (duplicate centres) counts the point for each tied centre,
    which keeps every centre at the mean of the points it holds.
    """
    coef = torch.cat([2.0 * cen, -cen.square().sum(-1, keepdim=True)], dim=-1)  # (B, k, 3)
    return gmm._max_mask(torch.bmm(coef, x1t))


def _candidate_kmeans_labels(x: Tensor, k: int, n_iter: int, uniforms: Tensor) -> Tensor:
    """Greedy k-means++ seeding, then up to ``n_iter`` Lloyd steps.

    Each new centre is the best (lowest total squared distance) of ``_n_trials(k)`` candidates
    drawn with probability proportional to the squared distance to the nearest chosen centre.

    Args:
        x: ``(B, N, 2)`` points.
        k: Number of centres.
        n_iter: Most Lloyd steps; each problem stops as soon as its centres stop moving.
        uniforms: ``(B, 1 + (k - 1) * _n_trials(k))`` uniform draws in ``[0, 1)``.
    """
    bsz, n, _ = x.shape
    trials = gmm._n_trials(k)
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
    labels = torch.empty(bsz, n, dtype=torch.long, device=x.device)
    active = rows  # batch rows of the problems still iterated
    assign = _candidate_closest(cen, x1t)
    for _ in range(n_iter):
        sums = torch.bmm(assign, x1t.mT)  # (B, k, 3): sums and counts
        counts = sums[..., 2:]
        new_cen = torch.where(counts > 0, sums[..., :2] / counts.clamp_min(1), cen)
        # Centres that did not move give the same assignment again, and so on at every later step:
        # such a problem holds its final labels. Per problem, because a whole-batch test (one
        # problem still moving keeps all the others iterating) almost never fires; on the centres,
        # because comparing (B, k, 2) costs nothing next to comparing (B, k, N) assignments.
        moving = (new_cen != cen).flatten(1).any(1)
        n_moving = int(moving.sum())
        # Settled problems ride along (their centres stay put) until dropping them pays for a copy.
        if (len(active) - n_moving) * 8 >= len(active):
            settled = (~moving).nonzero().squeeze(1)
            labels[active[settled]] = gmm._argmax_dim1(assign.index_select(0, settled))
            if n_moving == 0:
                return labels
            keep = moving.nonzero().squeeze(1)
            active, x1t, new_cen = active[keep], x1t.index_select(0, keep), new_cen.index_select(0, keep)
        cen = new_cen
        assign = _candidate_closest(cen, x1t)
    labels[active] = gmm._argmax_dim1(assign)
    return labels


LloydFn = Callable[[Tensor, int, int, Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# The "before" arm: the engine code these changes replaced, verbatim (docstrings shortened).
# --------------------------------------------------------------------------------------------


def _old_features(x: Tensor) -> Tensor:
    px, py = x[..., 0], x[..., 1]
    return torch.stack([px * px, px * py, py * py, px, py, torch.ones_like(px)], dim=-1)


class _OldWork:
    def __init__(
        self, x: Tensor, idx: Tensor, k: int, uniforms: Tensor, reg: float, kmeans_iter: int, lloyd: LloydFn
    ) -> None:
        n = x.shape[1]
        self.idx = idx
        self.feats = _old_features(x)  # (B, N, 6) for the M-step
        self.feats_t = self.feats.mT.contiguous()  # (B, 6, N) for the E-step
        init = lloyd(x, k, kmeans_iter, uniforms)
        self.weights, self.means, self.cov = gmm._m_step(
            torch.bmm(gmm._onehot(init, k, self.feats.dtype), self.feats), n, reg
        )
        self.prev = torch.full((len(idx),), -math.inf, dtype=torch.float64, device=x.device)
        self.iters = torch.zeros(len(idx), dtype=torch.long, device=x.device)
        self.alive = torch.ones(len(idx), dtype=torch.bool, device=x.device)

    def __len__(self) -> int:
        return int(self.idx.shape[0])

    _FIELDS = ("idx", "feats", "feats_t", "weights", "means", "cov", "prev", "iters", "alive")

    def select(self, keep: Tensor) -> None:
        for name in self._FIELDS:
            setattr(self, name, getattr(self, name).index_select(0, keep))

    def extend(self, other: _OldWork) -> None:
        for name in self._FIELDS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))


def _old_fit_batched(
    x: Tensor,
    k: int,
    uniforms: Tensor,
    max_iter: int,
    tol: float,
    reg: float,
    kmeans_iter: int,
    chunk: int,
    steps: Any = None,  # the package's eager/compiled step functions; the old code has none
    *,
    lloyd: LloydFn = gmm._kmeans_labels,
) -> gmm.MixtureFit:
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
    work: _OldWork | None = None
    while True:
        if queued < bsz and alive < chunk // 2:
            take = min(bsz - queued, chunk - alive)
            idx = torch.arange(queued, queued + take, device=dev)
            fresh = _OldWork(
                x[queued : queued + take], idx, k, uniforms[queued : queued + take], reg, kmeans_iter, lloyd
            )
            queued += take
            alive += take
            if work is None:
                work = fresh
            else:
                work.extend(fresh)
        if work is None or alive == 0:
            break
        w = gmm._log_density_weights(work.weights, work.means, work.cov, work.feats.dtype)
        resp, lb = gmm._e_step(work.feats_t, w)
        work.iters += 1
        done = (lb - work.prev).abs() < tol
        finished = work.alive & (done | (work.iters >= max_iter))
        n_finished = int(finished.sum())
        if n_finished:
            fin = finished.nonzero().squeeze(1)
            rows = work.idx[fin]
            labels[rows] = gmm._argmax_dim1(resp.index_select(0, fin))
            out_w[rows] = work.weights[fin]
            out_m[rows] = work.means[fin]
            lower[rows] = lb[fin]
            n_iter[rows] = work.iters[fin]
            converged[rows] = done[fin]
            work.alive &= ~finished
            alive -= n_finished
            if alive == 0 or (len(work) - alive) * 8 >= len(work):
                keep = work.alive.nonzero().squeeze(1)
                work.select(keep)
                resp, lb = resp.index_select(0, keep), lb[keep]
                if alive == 0:
                    work = None
                    continue
        work.prev = lb
        work.weights, work.means, work.cov = gmm._m_step(torch.bmm(resp, work.feats), n, reg)
    return gmm.MixtureFit(labels, out_w, out_m, lower, n_iter, converged)


_OLD_DENSE_MAX = 48
_OLD_OVERSAMPLE = 6
_OLD_RTOL = 1e-4


def _old_top_eigh(a: Tensor, q: int, *, max_iter: int = 60) -> tuple[Tensor, Tensor]:
    b, m, _ = a.shape
    if m <= _OLD_DENSE_MAX or q + _OLD_OVERSAMPLE >= m:
        vals, vecs = torch.linalg.eigh(a)
        return vals[:, -q:].flip(-1), vecs[..., -q:].flip(-1)
    width = q + _OLD_OVERSAMPLE
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
        small = basis.mT @ sub @ basis
        w, v = torch.linalg.eigh(small)
        w, v = w[:, -q:].flip(-1), basis @ v[..., -q:].flip(-1)
        resid = (sub @ v - v * w.unsqueeze(1)).norm(dim=1)  # (b, q)
        scale = w[:, :1].abs().clamp_min(torch.finfo(a.dtype).tiny)
        done = (resid <= _OLD_RTOL * scale).all(-1)
        if bool(done.any()):
            vals[todo[done]], vecs[todo[done]] = w[done], v[done]
            keep = ~done
            todo, sub, basis = todo[keep], sub[keep], basis[keep]
            if todo.numel() == 0:
                return vals, vecs
    w, v = torch.linalg.eigh(sub)
    vals[todo], vecs[todo] = w[:, -q:].flip(-1), v[..., -q:].flip(-1)
    return vals, vecs


def _old_batched_pca(x: Tensor, n_components: int) -> tuple[Tensor, Tensor]:
    if x.ndim != 3:
        raise ValueError(f"x must have shape (B, N, D), got {tuple(x.shape)}")
    n, d = x.shape[1:]
    q = min(n_components, d, n)
    xc = x.float()
    xc = xc - xc.mean(dim=1, keepdim=True)
    if d <= n:
        _, top = _old_top_eigh(xc.mT @ xc, q)  # (B, D, q), largest first
        scores = xc @ top
    else:
        top_vals, top_vecs = _old_top_eigh(xc @ xc.mT, q)  # Gram matrix (B, N, N)
        scores = top_vecs * top_vals.clamp_min(0).sqrt().unsqueeze(1)
    idx = scores.abs().argmax(dim=1, keepdim=True)
    sign = torch.gather(scores, 1, idx).sign()
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    scores = scores * sign
    var = scores.square().sum(dim=1) / max(n - 1, 1)
    return scores, var


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


class FourConvCNN(nn.Module):
    """Four 3x3 convs at full 32x32 resolution (16 + 32 + 64 + 80 = 192 filters), pooled head."""

    def __init__(self) -> None:
        super().__init__()
        chans = [1, 16, 32, 64, 80]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in itertools.pairwise(chans))
        self.head = nn.Linear(chans[-1], 10)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean((2, 3)))


class _Recorder:
    """A PCA function that records its inputs and answers with the package's ``batched_pca``."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, int]] = []

    def __call__(self, x: Tensor, q: int) -> tuple[Tensor, Tensor]:
        self.calls.append((x.clone(), q))
        return pca.batched_pca(x, q)


def make_case(model: nn.Module, probe: Tensor, labels: Tensor) -> dict[str, Any]:
    """Probe forward through the engine's capture: PCA inputs as recorded, and the points to cluster."""
    classes = class_ids(labels)
    rec = _Recorder()
    caps = capture_layers(model, probe, select_layers(model), 2, pca=rec, groups=classes)
    padded = [nn.functional.pad(c.points[c.reason == 0], (0, 2 - c.points.shape[-1])) for c in caps]
    points = torch.cat(padded)
    groups = [(c.name, int(p.shape[0])) for c, p in zip(caps, padded, strict=True)]
    return {"pca_inputs": rec.calls, "points": points, "groups": groups, "filters": int(points.shape[0])}


def build_cases(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    torch.manual_seed(args.seed)
    x, y, _, _, _ = digits_tensors(size=32, val_fraction=0.0, seed=args.seed)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    probe_idx, train_idx = order[: args.probe], order[args.probe :]
    probe, probe_y = x[probe_idx], y[probe_idx]
    resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    small = FourConvCNN()
    if args.train_epochs:
        train_plain(small, x[train_idx], y[train_idx], epochs=args.train_epochs, seed=args.seed)
    small.eval()
    return {
        "resnet18": make_case(resnet, probe.expand(-1, 3, -1, -1).contiguous(), probe_y),
        "small_cnn": make_case(small, probe, probe_y),
    }


# --------------------------------------------------------------------------------------------
# A/B machinery
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def patched(module: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def alternate(arms: dict[str, Callable[[], Any]], reps: int) -> tuple[dict[str, float], dict[str, float], dict]:
    """Run every arm ``reps`` times, order flipped each repetition; median CPU and wall seconds, last results."""
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    wall: dict[str, list[float]] = {a: [] for a in arms}
    out: dict[str, Any] = {}
    names = list(arms)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            t, c = time.perf_counter(), time.process_time()
            out[name] = arms[name]()
            cpu[name].append(time.process_time() - c)
            wall[name].append(time.perf_counter() - t)
    return (
        {a: statistics.median(v) for a, v in cpu.items()},
        {a: statistics.median(v) for a, v in wall.items()},
        out,
    )


def lloyd_chunks(points: Tensor, crit: AnomalyCriteria, seed: int, groups: list) -> list[tuple[Tensor, int, Tensor]]:
    """The ``(x, k, uniforms)`` chunks ``fit_gmm`` hands the Lloyd stage for every k (no refills)."""
    from lightning_anomaly.engine.analyze import _group_uniforms

    chunks = []
    n = points.shape[1]
    for k in crit.k_values:
        u = _group_uniforms(groups, k, crit.n_init, seed)
        step = max(8, gmm._CPU_CHUNK_ELEMENTS // (n * k))
        chunks += [(points[i : i + step], k, u[i : i + step]) for i in range(0, len(points), step)]
    return chunks


def agreement(before: tuple, after: tuple) -> dict[str, float]:
    k_a, _, lab_a, _ = before
    k_b, _, lab_b, _ = after
    return {
        "same_labels": float((lab_a == lab_b).all(1).double().mean()),
        "same_k": float((k_a == k_b).double().mean()),
    }


def unit_points(scores: Tensor) -> Tensor:
    norm = scores.square().sum(-1).mean(-1).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    return scores / norm[:, None, None]


def pca_max_diff(inputs: list[tuple[Tensor, int]], old: list, new: list) -> float:
    worst = 0.0
    for (_, _), (s_old, _), (s_new, _) in zip(inputs, old, new, strict=True):
        a, b = unit_points(s_old.double()), unit_points(s_new.double())
        sign = torch.where((a * b).sum(1, keepdim=True) < 0, -1.0, 1.0)
        worst = max(worst, float((a - b * sign).abs().max()) if a.numel() else 0.0)
    return worst


def run_case(name: str, case: dict[str, Any], reps: int, seed: int) -> dict[str, Any]:
    crit = AnomalyCriteria()
    pts, groups = case["points"], case["groups"]

    def cluster() -> tuple:
        return cluster_points(pts, crit, seed=seed, groups=groups)

    def before() -> tuple:
        with patched(gmm, "_fit_batched", _old_fit_batched):
            return cluster()

    def lloyd_candidate() -> tuple:
        with patched(gmm, "_fit_batched", functools.partial(_old_fit_batched, lloyd=_candidate_kmeans_labels)):
            return cluster()

    cpu, wall, res = alternate({"before": before, "lloyd": lloyd_candidate, "after": cluster}, reps)

    chunks = lloyd_chunks(pts.float(), crit, seed, groups)

    def lloyd_stage(fn: LloydFn, n_iter: int) -> Callable[[], list[Tensor]]:
        return lambda: [fn(x, k, n_iter, u) for x, k, u in chunks]

    l_cpu, l_wall, l_res = alternate(
        {
            "seeding": lloyd_stage(gmm._kmeans_labels, 0),
            "before": lloyd_stage(gmm._kmeans_labels, crit.kmeans_iter),
            "lloyd": lloyd_stage(_candidate_kmeans_labels, crit.kmeans_iter),
        },
        reps,
    )
    lloyd_identical = all(torch.equal(a, b) for a, b in zip(l_res["before"], l_res["lloyd"], strict=True))
    # Lloyd steps each problem needs to reach its fixed point (capped at 4 * kmeans_iter).
    final = [gmm._kmeans_labels(x, k, 4 * crit.kmeans_iter, u) for x, k, u in chunks]
    reached = [torch.full((len(f),), 4 * crit.kmeans_iter) for f in final]
    for t in range(4 * crit.kmeans_iter - 1, -1, -1):
        for (x, k, u), f, r in zip(chunks, final, reached, strict=True):
            r[(gmm._kmeans_labels(x, k, t, u) == f).all(1)] = t
    steps = torch.cat(reached).double()

    inputs = case["pca_inputs"]
    p_cpu, p_wall, p_res = alternate(
        {
            "before": lambda: [_old_batched_pca(x, q) for x, q in inputs],
            "after": lambda: [pca.batched_pca(x, q) for x, q in inputs],
        },
        reps,
    )

    def ratio(t: dict[str, float], a: str, b: str) -> float:
        return round(t[a] / t[b], 3)

    steps_before = l_cpu["before"] - l_cpu["seeding"]
    steps_lloyd = l_cpu["lloyd"] - l_cpu["seeding"]
    out = {
        "filters": case["filters"],
        "pca_problems": sum(int(x.shape[0]) for x, _ in inputs),
        "lloyd_steps_median": float(steps.median()),
        "lloyd_share_past_kmeans_iter": round(float((steps > crit.kmeans_iter).double().mean()), 4),
        "lloyd_stage_ratio": ratio(l_cpu, "before", "lloyd"),
        "lloyd_steps_ratio": round(steps_before / steps_lloyd, 3) if steps_lloyd > 0 else None,
        "lloyd_labels_identical": lloyd_identical,
        "cluster_ratio_lloyd": ratio(cpu, "before", "lloyd"),
        "cluster_ratio_one_copy": ratio(cpu, "before", "after"),
        "cluster_ratio_one_copy_wall": ratio(wall, "before", "after"),
        "pca_ratio": ratio(p_cpu, "before", "after"),
        "pca_ratio_wall": ratio(p_wall, "before", "after"),
        "pca_max_abs_diff": pca_max_diff(inputs, p_res["before"], p_res["after"]),
    }
    for label, arm in {"lloyd": "lloyd", "one_copy": "after"}.items():
        for key, v in agreement(res["before"], res[arm]).items():
            out[f"{key}_{label}"] = v

    print(f"\n{name}: {case['filters']} filters clustered for k = 2..6, {out['pca_problems']} filters through the PCA")
    print(
        f"Lloyd steps to the fixed point: median {out['lloyd_steps_median']:.0f}, "
        f"{out['lloyd_share_past_kmeans_iter']:.1%} of problems need more than kmeans_iter={crit.kmeans_iter}"
    )
    print(f"{'change':<28}{'before s':>10}{'after s':>10}{'ratio':>8}{'wall ratio':>12}  agreement")
    print(
        f"{'lloyd retirement (stage)':<28}{l_cpu['before']:>10.3f}{l_cpu['lloyd']:>10.3f}"
        f"{out['lloyd_stage_ratio']:>8.2f}{ratio(l_wall, 'before', 'lloyd'):>12.2f}  "
        f"labels bit-identical: {lloyd_identical}; steps alone (seeding's {l_cpu['seeding']:.3f} s off): "
        f"x{out['lloyd_steps_ratio']}"
    )
    for label, arm, key in (
        ("lloyd retirement (cluster)", "lloyd", "lloyd"),
        ("one copy (cluster)", "after", "one_copy"),
    ):
        print(
            f"{label:<28}{cpu['before']:>10.3f}{cpu[arm]:>10.3f}{ratio(cpu, 'before', arm):>8.2f}"
            f"{ratio(wall, 'before', arm):>12.2f}  same labels {out['same_labels_' + key]:.4f}, "
            f"same k {out['same_k_' + key]:.4f}"
        )
    print(
        f"{'pca':<28}{p_cpu['before']:>10.3f}{p_cpu['after']:>10.3f}{out['pca_ratio']:>8.2f}"
        f"{out['pca_ratio_wall']:>12.2f}  max |points before - after| {out['pca_max_abs_diff']:.2e}"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="repetitions per arm (median reported)")
    p.add_argument("--probe", type=int, default=256)
    p.add_argument("--train-epochs", type=int, default=1, help="epochs of the four-conv CNN on the other digits")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: OMP_NUM_THREADS is not 1; set it for timings comparable with docs/PERFORMANCE.md")
    torch.set_num_threads(1)
    cases = build_cases(args)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "reps": args.reps, "timer": "process_time"}
    for name, case in cases.items():
        out[name] = run_case(name, case, args.reps, args.seed)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
