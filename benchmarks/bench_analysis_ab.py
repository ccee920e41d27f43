"""Same-process A/B of one whole analysis (issue 16): the engine before issue 16 beside the engine now.

One analysis is what the callback runs once per epoch: ``analyze(model, probe, targets)`` with
default settings but one view (``global_view=False``, as when issue 16 was filed; ``bench_views.py``
times the second view), which captures and reduces every conv's maps, clusters every filter for
k = 2..6, flags, and computes the per-sample gradient norms with ``per_sample_grad_norms``'s
defaults (the callback's own call).

The "before" arm runs the capture in a forward of its own, as the engine did, and swaps the engine code
as it stood before issue 16 into the package for its turn: ``bench_ab.py``'s ``_old_fit_batched`` and
``_old_batched_pca`` (mixture fit and PCA), and, copied below, the old ``capture.reduce_maps``,
``gradients._layer_sq_norm`` (unchanged before issue 16, see ``git log --
lightning_anomaly/engine/gradients.py``) and ``scores.calinski_harabasz`` (called once per k on the raw
points). The outlier score's ``outliers.view_score`` came after issue 16 was filed; the "before" arm
runs it as it stood on 2026-12-06 (367fde6, already batched over clusters), so the ratio counts only
what changed since. The arms alternate (order flipped every repetition); each figure is the median over
``--reps``. Timing is CPU time of this process with one intra-op thread (a second job on the machine
slows the wall clock, not these figures); wall-clock ratios are printed beside. Ratios are before /
after.

Models, probe of 256 digits (scikit-learn's, upscaled to 32x32, no download):
  * ``small_cnn``: four 3x3 convs at full 32x32 resolution (16 + 32 + 64 + 80 = 192 filters),
    trained ``--train-epochs`` on the other digits (``bench_ab.FourConvCNN``);
  * ``resnet18``: torchvision's ResNet-18 with random weights (4,800 filters, maps 16x16 to 1x1).

Per model: the whole analysis; the same engine with the capture in a probe forward of its own
(``unshared``: the gradient pass gathers no maps, as before the shared forward); each stage on its own
(probe forward, capture = forward + per-filter reduction and PCA, clustering and flags, gradient norms,
and a plain forward and backward of the probe); the floors (that forward and backward: what an analysis
with exact gradient norms costs at least; with the probe forward added: the least for one with its own
capture forward) and the best ratios they leave, before / floor; agreement of the arms' reports (same
k, same anomaly flags, same top outliers, largest relative difference of the gradient norms). With
``--compile``, ``analyze(..., compile=True)`` is timed too: its first call (warm-up, compilation
included) and the median of later calls, against the default.

Prints a table per model, then one JSON line last.

    OMP_NUM_THREADS=1 python benchmarks/bench_analysis_ab.py [--reps 5] [--compile] [--models small_cnn resnet18]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import bench_ab
import torch
import torchvision
from torch import Tensor, nn

import lightning_anomaly.engine.capture as capture
import lightning_anomaly.engine.gmm as gmm
import lightning_anomaly.engine.gradients as gradients
from lightning_anomaly import AnomalyCriteria
from lightning_anomaly.demo import digits_tensors
from lightning_anomaly.demo.train import train_plain
from lightning_anomaly.engine.outliers import _MAX_SEPARATION
from lightning_anomaly.engine.scores import cluster_sizes

analysis = importlib.import_module("lightning_anomaly.engine.analyze")  # the module, not the function
#: The settings issue 16 was measured with: one view (the global view of issue 12 came later and has
#: its own benchmark, bench_views.py); the old reduce_maps knows nothing of it.
ONE_VIEW = AnomalyCriteria(global_view=False)

# --------------------------------------------------------------------------------------------
# The "before" arm's reduction and gradient norm: the engine's code before issue 16, verbatim
# (docstrings shortened). The mixture fit and PCA come from bench_ab.py.
# --------------------------------------------------------------------------------------------

_OLD_REDUCE_CHUNK_BYTES = 64 << 20


def _old_reduce_maps(
    maps: Tensor, n_components: int, pca: Callable = bench_ab._old_batched_pca, groups: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, c = maps.shape[:2]
    d = maps[0, 0].numel()
    q = min(n_components, d, n)
    points = torch.zeros(c, n, q, dtype=torch.float32, device=maps.device)
    explained = torch.zeros(c, dtype=torch.float32, device=maps.device)
    activation = torch.zeros(c, dtype=torch.float64, device=maps.device)
    reason = torch.zeros(c, dtype=torch.int8, device=maps.device)
    step = max(1, _OLD_REDUCE_CHUNK_BYTES // max(1, n * d * 4))
    onehot = means_of = None
    if groups is not None:
        onehot = torch.nn.functional.one_hot(groups.to(maps.device), int(groups.max()) + 1).float()  # (N, G)
        means_of = onehot.mT / onehot.sum(0).clamp_min(1)[:, None]  # (G, N): each group's mean
    for lo in range(0, c, step):
        hi = min(c, lo + step)
        x = maps[:, lo:hi].float().reshape(n, hi - lo, d).transpose(0, 1)  # (c, N, D)
        finite = torch.isfinite(x).flatten(1).all(-1)
        x = torch.where(finite[:, None, None], x, torch.zeros((), device=x.device))
        activation[lo:hi] = x.abs().mean((1, 2)).double()
        centred = x - x.mean(1, keepdim=True)
        spread = centred.square().sum((1, 2))
        scale = x.square().sum((1, 2))
        constant = finite & (spread <= (capture._CONSTANT_RTOL**2) * scale)
        ok = finite & ~constant
        r = reason[lo:hi]
        r[~finite] = 1
        r[constant] = 2
        idx = ok.nonzero().squeeze(-1)
        if idx.numel() == 0:
            continue
        xs, used_spread = x[idx], spread[idx]
        if onehot is not None and means_of is not None:
            xs = xs - onehot @ (means_of @ xs)  # within-group residuals (zero mean overall)
            used_spread = xs.square().sum((1, 2))
        scores, var = pca(xs, q)
        norm = scores.square().sum(-1).mean(-1).sqrt()  # (c_ok,)
        lost = norm <= 0
        scores = scores / norm.clamp_min(torch.finfo(torch.float32).tiny)[:, None, None]
        points[lo + idx] = scores.float()
        explained[lo + idx] = (
            (var.sum(-1) * (n - 1) / used_spread.clamp_min(torch.finfo(torch.float32).tiny)).clamp(0, 1).float()
        )
        if bool(lost.any()):
            r[idx[lost]] = 2
            points[lo + idx[lost]] = 0
    return points, explained, activation, reason


def _old_sq_matmul_norm(a: Tensor, d: Tensor) -> Tensor:
    din, dout, t = a.shape[2], d.shape[2], a.shape[3]
    if t * t * (din + dout) < din * dout * t:
        a, d = a.double(), d.double()
        return ((a.mT @ a) * (d.mT @ d)).sum((1, 2, 3)).clamp_min(0.0)
    return (d @ a.mT).square().sum((1, 2, 3)).double()


def _old_layer_sq_norm(m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
    g_ = gradients
    dtype = g_._compute_dtype(x)
    x, d = x.to(dtype), d.to(dtype)
    n = x.shape[0]
    sq = x.new_zeros(n, dtype=torch.float64)
    if isinstance(m, nn.Conv2d | nn.Linear):
        if isinstance(m, nn.Conv2d):
            g = m.groups
            a = nn.functional.unfold(g_._pad_like_conv(m, x), m.kernel_size, m.dilation, 0, m.stride)
            a = a.reshape(n, g, a.shape[1] // g, a.shape[2])
            dd = d.reshape(n, g, d.shape[1] // g, -1)
        else:
            a = x.reshape(n, -1, x.shape[-1]).mT.unsqueeze(1)  # (n, 1, Din, T)
            dd = d.reshape(n, -1, d.shape[-1]).mT.unsqueeze(1)  # (n, 1, Dout, T)
        channels = (1, dd.shape[1], dd.shape[2], 1)
        if g_._trainable(m, "weight"):
            keep = g_._keep_view(m, "weight", channels, dtype)
            sq = sq + _old_sq_matmul_norm(a, dd if keep is None else dd * keep)
        if g_._trainable(m, "bias"):
            keep = g_._keep_view(m, "bias", channels, dtype)
            sq = sq + (dd if keep is None else dd * keep).sum(-1).double().square().sum((1, 2))
        return sq
    assert isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
    assert m.running_mean is not None and m.running_var is not None
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = m.running_mean.to(dtype).view(shape), m.running_var.to(dtype).view(shape)
    xhat = (x - mean) / (var + m.eps).sqrt()
    dims = tuple(range(2, x.ndim))
    per_channel = {
        "weight": (d * xhat).sum(dims) if g_._trainable(m, "weight") else None,
        "bias": d.sum(dims) if g_._trainable(m, "bias") else None,
    }
    for base, per_sample in per_channel.items():
        if per_sample is not None:
            keep = g_._keep_view(m, base, (1, -1), dtype)
            sq = sq + (per_sample if keep is None else per_sample * keep).double().square().sum(1)
    return sq


def _old_calinski_harabasz(points: Tensor, labels: Tensor, n_clusters: int) -> Tensor:
    """``scores.calinski_harabasz`` before issue 16: per call, its own float64 copy, mean and total."""
    x = points.double()
    n = x.shape[1]
    index = labels.long().unsqueeze(-1)
    counts = cluster_sizes(labels, n_clusters).double()
    sums = torch.zeros(x.shape[0], n_clusters, x.shape[2], dtype=x.dtype, device=x.device)
    sums.scatter_add_(1, index.expand_as(x), x)
    centroids = sums / counts.clamp_min(1).unsqueeze(-1)
    grand = x.mean(1, keepdim=True)
    ssb = (counts * (centroids - grand).square().sum(-1)).sum(-1)
    total = (x - grand).square().sum((1, 2))
    ssw = (total - ssb).clamp_min(0.0)
    k = (counts > 0).sum(-1).double()
    ch = ssb * (n - k) / (ssw * (k - 1.0))
    ch = torch.where(ssw <= 1e-12 * total, torch.ones_like(ch), ch)
    return torch.where((k < 2) | (k >= n), torch.full_like(ch, math.nan), ch)


def _old_centred(points: Tensor) -> tuple[Tensor]:
    """With :func:`_old_calinski_harabasz`: the old ``cluster_every_k`` passed the raw points to CH."""
    return (points,)


def _old_view_score(
    points: Tensor, labels: Tensor, limit: int, criteria: AnomalyCriteria, classes: Tensor | None = None
) -> Tensor:
    """``outliers.view_score`` as of 367fde6 (issue 12's score, later than issue 16's filing): one
    ``(filters, k, N)`` one-hot per k over every filter, the class rule on its masks, two ``bmm``s."""
    n = points.shape[1]
    score = torch.zeros(n, dtype=torch.float64)
    if points.shape[0] == 0 or labels.shape[0] == 0:
        return score
    weight = 1.0 / labels.shape[0]
    x = points.cpu().double()
    x = x - x.mean(1, keepdim=True)
    total_sq = x.square().sum((1, 2))
    dof = max(1, (n - 2) * x.shape[-1])
    tiny = torch.finfo(torch.float64).tiny
    for lab in labels.long().cpu():
        b = lab.shape[0]
        k = int(lab.max().clamp_min(0)) + 1
        clusters = torch.nn.functional.one_hot(lab.clamp_min(0), k).transpose(1, 2)
        sizes = clusters.sum(2)
        not_largest = torch.arange(k) != sizes.argmax(1, keepdim=True)
        used = (lab >= 0).all(1, keepdim=True) & (sizes > 0) & (sizes <= limit) & not_largest
        if classes is not None and bool(used.any()):
            used &= ~criteria.class_selective(clusters.reshape(b * k, n).bool(), classes).view(b, k)
        rows = used.any(1).nonzero().squeeze(1)
        if not rows.numel():
            continue
        used, xr = used[rows], x[rows]
        c = clusters[rows].double()
        n_in = sizes[rows].double()
        n_out = n - n_in
        sum_in = torch.bmm(c, xr)
        mean_in = sum_in / n_in.clamp_min(1).unsqueeze(-1)
        mean_out = -sum_in / n_out.clamp_min(1).unsqueeze(-1)
        within = total_sq[rows, None] - n_in * mean_in.square().sum(-1) - n_out * mean_out.square().sum(-1)
        sd = (within.clamp_min(0.0) / dof).clamp_min(tiny).sqrt()
        diff = mean_in - mean_out
        length = diff.norm(dim=-1)
        axis = diff / length.clamp_min(tiny).unsqueeze(-1)
        own = (torch.bmm(axis, xr.transpose(1, 2)) - (axis * mean_out).sum(-1, keepdim=True)) / sd.unsqueeze(-1)
        sep = (length / sd).clamp(max=_MAX_SEPARATION)
        sep = torch.where(used & (sep >= criteria.score_separation), sep, torch.zeros_like(sep))
        own = own.clamp(0.0, _MAX_SEPARATION)
        score += weight * (sep.unsqueeze(-1) * (sep.unsqueeze(-1) + own) / 2 * c).sum((0, 1))
    return score


@contextlib.contextmanager
def before_issue_16() -> Iterator[None]:
    """The engine as it stood before issue 16: old mixture fit, PCA, reduction and gradient norms."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(bench_ab.patched(gmm, "_fit_batched", bench_ab._old_fit_batched))
        stack.enter_context(bench_ab.patched(analysis, "batched_pca", bench_ab._old_batched_pca))
        stack.enter_context(bench_ab.patched(capture, "reduce_maps", _old_reduce_maps))
        stack.enter_context(bench_ab.patched(gradients, "_layer_sq_norm", _old_layer_sq_norm))
        # The old cluster_every_k gave CH the points themselves, once per k.
        stack.enter_context(bench_ab.patched(analysis, "centred", _old_centred))
        stack.enter_context(bench_ab.patched(analysis, "calinski_harabasz_centred", _old_calinski_harabasz))
        stack.enter_context(bench_ab.patched(analysis, "view_score", _old_view_score))
        stack.enter_context(separate_capture())  # the capture ran a probe forward of its own
        yield


@contextlib.contextmanager
def separate_capture() -> Iterator[None]:
    """The engine now, but the capture in a forward of its own (no maps gathered by the gradient pass)."""
    with bench_ab.patched(analysis, "_STASH_BYTES", 0):
        yield


# --------------------------------------------------------------------------------------------
# Models and timing
# --------------------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> dict[str, tuple[nn.Module, Tensor, Tensor]]:
    torch.manual_seed(args.seed)
    x, y, _, _, _ = digits_tensors(size=32, val_fraction=0.0, seed=args.seed)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    probe_idx, train_idx = order[: args.probe], order[args.probe :]
    probe, probe_y = x[probe_idx], y[probe_idx]
    out: dict[str, tuple[nn.Module, Tensor, Tensor]] = {}
    if "small_cnn" in args.models:
        small = bench_ab.FourConvCNN()
        if args.train_epochs:
            train_plain(small, x[train_idx], y[train_idx], epochs=args.train_epochs, seed=args.seed)
        out["small_cnn"] = (small.eval(), probe, probe_y)
    if "resnet18" in args.models:
        resnet = torchvision.models.resnet18(weights=None, num_classes=10).eval()
        out["resnet18"] = (resnet, probe.expand(-1, 3, -1, -1).contiguous(), probe_y)
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.process_time() - c, time.perf_counter() - t, out


def stages(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Callable[[], Any]]:
    """The stages of one analysis, each on its own (the capture's result feeds the clustering)."""
    crit = ONE_VIEW
    classes = analysis.class_ids(y)
    sites = capture.select_layers(model)
    state: dict[str, Any] = {}

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def capture_stage() -> None:
        state["caps"] = capture.capture_layers(
            model, x, sites, crit.n_components, pca=analysis.batched_pca, groups=classes
        )

    def cluster_stage() -> None:
        analysis._cluster_and_flag(state["caps"], crit, 0, "torch", x.shape[0], classes)

    def grad_stage() -> None:
        gradients.per_sample_grad_norms(model, x, y)

    def fwd_bwd() -> None:
        # The least work that sees every sample's gradient: one plain forward and backward of the probe.
        with torch.enable_grad():
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
            torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    return {
        "forward": forward,
        "capture": capture_stage,
        "cluster": cluster_stage,
        "grad": grad_stage,
        "fwd_bwd": fwd_bwd,
    }


def agreement(before: Any, after: Any) -> dict[str, Any]:
    k_b = torch.cat([lr.k for lr in before.layers.values()])
    k_a = torch.cat([lr.k for lr in after.layers.values()])
    an_b = torch.cat([lr.anomaly for lr in before.layers.values()])
    an_a = torch.cat([lr.anomaly for lr in after.layers.values()])
    top_b, top_a = before.top_outliers(32), after.top_outliers(32)
    g_b, g_a = before.grad_norms, after.grad_norms
    return {
        "same_k": round(float((k_b == k_a).double().mean()), 5),
        "anomalies_before": int(an_b.sum()),
        "anomalies_after": int(an_a.sum()),
        "anomaly_flags_differ": int((an_b != an_a).sum()),
        "top32_outliers_same": top_b == top_a,
        "top32_outliers_overlap": len(set(top_b) & set(top_a)),
        "outlier_counts_equal": bool(torch.equal(before.outlier_counts, after.outlier_counts)),
        "grad_norm_max_rel_diff": float(((g_b - g_a).abs() / g_b.abs().clamp_min(1e-30)).max()),
    }


def run_model(name: str, model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    def whole() -> Any:
        return analysis.analyze(model, x, y, criteria=ONE_VIEW)

    def whole_before() -> Any:
        with before_issue_16():
            return whole()

    def whole_unshared() -> Any:
        with separate_capture():
            return whole()

    arms = {"before": whole_before, "after": whole, "unshared": whole_unshared}
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    wall: dict[str, list[float]] = {a: [] for a in arms}
    reports: dict[str, Any] = {}
    stage_cpu: dict[str, dict[str, list[float]]] = {a: {} for a in arms}
    for rep in range(args.reps):
        for arm in list(arms) if rep % 2 == 0 else list(arms)[::-1]:
            c, w, reports[arm] = timed(arms[arm])
            cpu[arm].append(c)
            wall[arm].append(w)
            if arm == "unshared":
                continue  # its stages are the after arm's
            ctx = before_issue_16() if arm == "before" else contextlib.nullcontext()
            with ctx:
                for stage, fn in stages(model, x, y).items():
                    stage_cpu[arm].setdefault(stage, []).append(timed(fn)[0])
    med = {a: statistics.median(v) for a, v in cpu.items()}
    med_wall = {a: statistics.median(v) for a, v in wall.items()}
    st = {a: {s: round(statistics.median(v), 3) for s, v in d.items()} for a, d in stage_cpu.items()}
    out: dict[str, Any] = {
        "filters": sum(lr.n_filters for lr in reports["after"].layers.values()),
        "before_s": round(med["before"], 3),
        "after_s": round(med["after"], 3),
        "ratio": round(med["before"] / med["after"], 3),
        "ratio_wall": round(med_wall["before"] / med_wall["after"], 3),
        "unshared_s": round(med["unshared"], 3),
        "sharing_speedup": round(med["unshared"] / med["after"], 3),
        "stages_before_s": st["before"],
        "stages_after_s": st["after"],
        **agreement(reports["before"], reports["after"]),
        "unshared_agreement": agreement(reports["unshared"], reports["after"]),
    }
    # No analysis that keeps exact per-sample gradient norms can cost less than a plain forward and
    # backward of the probe, nor, with a capture forward of its own, less than that forward more: the
    # best ratios such engines could reach.
    floor = st["after"]["fwd_bwd"]
    floor_separate = st["after"]["forward"] + floor
    out["floor_s"] = round(floor, 3)
    out["ratio_bound"] = round(med["before"] / floor, 3)
    out["floor_separate_s"] = round(floor_separate, 3)
    out["ratio_bound_separate"] = round(med["before"] / floor_separate, 3)
    if args.compile:
        out["compile"] = compile_arm(model, x, y, args.reps, reports["after"])

    print(f"\n{name}: {out['filters']} filters, probe {x.shape[0]}, one whole analysis (CPU s, median of {args.reps})")
    print(f"{'':<10}{'whole':>8}" + "".join(f"{s:>10}" for s in st["after"]))
    for arm in arms:
        print(f"{arm:<10}{med[arm]:>8.3f}" + "".join(f"{v:>10.3f}" for v in st[arm].values()))
    print(f"ratio before / after: x{out['ratio']} (wall x{out['ratio_wall']})")
    print(
        f"capture in a forward of its own (unshared): {out['unshared_s']:.3f} s; the shared forward saves "
        f"x{out['sharing_speedup']} (same k {out['unshared_agreement']['same_k']:.4f}, top-32 overlap "
        f"{out['unshared_agreement']['top32_outliers_overlap']})"
    )
    print(
        f"floor (a plain forward and backward): {floor:.3f} s, so at best x{out['ratio_bound']}; with a capture "
        f"forward of its own {floor_separate:.3f} s, x{out['ratio_bound_separate']}"
    )
    print(
        f"agreement: same k {out['same_k']:.4f}; anomalies {out['anomalies_before']} -> {out['anomalies_after']} "
        f"({out['anomaly_flags_differ']} flags differ); top-32 outliers same: {out['top32_outliers_same']} "
        f"(overlap {out['top32_outliers_overlap']}); gradient norms max rel diff {out['grad_norm_max_rel_diff']:.1e}"
    )
    if args.compile:
        cmp = out["compile"]
        print(
            f"compile=True: first call {cmp['first_call_s']:.2f} s, then {cmp['steady_s']:.3f} s against "
            f"{cmp['eager_s']:.3f} s eager (x{cmp['steady_speedup']}); same k {cmp['same_k']:.4f}"
        )
    return out


def compile_arm(model: nn.Module, x: Tensor, y: Tensor, reps: int, eager_report: Any) -> dict[str, Any]:
    """``analyze(..., compile=True)``: first call (compilation) and steady state, against eager."""
    first, _, report = timed(lambda: analysis.analyze(model, x, y, criteria=ONE_VIEW, compile=True))
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for rep in range(reps):
        for arm in ("eager", "compiled") if rep % 2 == 0 else ("compiled", "eager"):
            times[arm].append(
                timed(lambda arm=arm: analysis.analyze(model, x, y, criteria=ONE_VIEW, compile=arm == "compiled"))[0]
            )
    eager, steady = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {
        "first_call_s": round(first, 2),
        "steady_s": round(steady, 3),
        "eager_s": round(eager, 3),
        "steady_speedup": round(eager / steady, 3),
        "same_k": agreement(eager_report, report)["same_k"],
    }


def run_over_models(
    bench: str, doc: str | None, run_model: Callable[[str, nn.Module, Tensor, Tensor, int], dict[str, Any]]
) -> None:
    """The command line shared by the benchmarks that time one model at a time on ``build``'s models.

    Parses ``--reps``, ``--models``, ``--probe``, ``--seed`` and ``--train-epochs``, runs
    ``run_model(name, model, x, y, reps)`` per model with one intra-op thread and prints the JSON line.
    """
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"], choices=["small_cnn", "resnet18"])
    p.add_argument("--probe", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-epochs", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(1)
    result: dict[str, Any] = {"bench": bench, "threads": 1, "reps": args.reps, "timer": "process_time"}
    result["torch"] = torch.__version__
    for name, (model, x, y) in build(args).items():
        result[name] = run_model(name, model, x, y, args.reps)
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5, help="repetitions per arm (median reported)")
    p.add_argument("--probe", type=int, default=256)
    p.add_argument("--train-epochs", type=int, default=1, help="epochs of the four-conv CNN on the other digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", nargs="+", default=["small_cnn", "resnet18"], choices=["small_cnn", "resnet18"])
    p.add_argument("--compile", action="store_true", help="also time analyze(..., compile=True)")
    args = p.parse_args()
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: OMP_NUM_THREADS is not 1; set it for timings comparable with docs/PERFORMANCE.md")
    torch.set_num_threads(1)
    out: dict[str, Any] = {
        "bench": "analysis_ab",
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "timer": "process_time",
        "torch": torch.__version__,
    }
    for name, (model, x, y) in build(args).items():
        out[name] = run_model(name, model, x, y, args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
