"""Batched engine vs the scikit-learn reference (the paper's per-filter recipe).

Two settings, same model and probe for both backends:
  * a torchvision ResNet-18 (random weights, 10 classes) at 32x32 with a 256-sample probe of
    upscaled digits: 4,800 filters. The reference is timed on a stratified sample of filters and
    extrapolated (the JSON says so); agreement is measured on that sample.
  * the demo's SmallCNN trained on digits (every filter, both backends in full).

Prints a human summary, then one JSON line last.

    python benchmarks/bench_engine.py [--sample 48] [--probe 256] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import torch
import torchvision
from scipy.stats import spearmanr

from lightning_anomaly import AnomalyCriteria, analyze
from lightning_anomaly.demo import SmallCNN, digits_tensors
from lightning_anomaly.demo.train import train_plain
from lightning_anomaly.engine import capture_layers, cluster_points, select_layers


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _agreement(k_a, ch_a, k_b, ch_b) -> dict:
    ok = (k_a > 0) & (k_b > 0)
    if int(ok.sum()) < 3:
        return {"same_k": None, "ch_spearman": None, "n": int(ok.sum())}
    rho = spearmanr(ch_a[ok].numpy(), ch_b[ok].numpy()).statistic
    return {"same_k": float((k_a[ok] == k_b[ok]).double().mean()), "ch_spearman": float(rho), "n": int(ok.sum())}


def probe_images(n: int, size: int, channels: int, seed: int) -> torch.Tensor:
    x, _, _, _, _ = digits_tensors(size=size, val_fraction=0.0, seed=seed)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx].expand(-1, channels, -1, -1).contiguous()


def bench_resnet(args) -> dict:
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = probe_images(args.probe, 32, 3, args.seed)
    crit = AnomalyCriteria()
    analyze(model, x[: crit.min_probe_size * 2], criteria=crit)  # warm-up of kernels and allocator
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    report = analyze(model, x, criteria=crit, seed=args.seed)
    engine_s = time.perf_counter() - t0
    rss1 = _rss_mb()
    n_filters = report.n_filters

    # Reference on a stratified sample of filters: the same PCA points, clustered by scikit-learn.
    caps = capture_layers(model, x, select_layers(model), crit.n_components)
    g = torch.Generator().manual_seed(args.seed)
    per_layer = max(1, args.sample // len(caps))
    picks = []
    for cap in caps:
        ok = (cap.reason == 0).nonzero().flatten()
        sel = ok[torch.randperm(len(ok), generator=g)[:per_layer]]
        picks.append(cap.points[sel])
    pts = torch.cat([torch.nn.functional.pad(p, (0, 2 - p.shape[-1])) for p in picks])
    t0 = time.perf_counter()
    k_ref, ch_ref, _, _ = cluster_points(pts, crit, seed=args.seed, backend="sklearn")
    ref_per_filter = (time.perf_counter() - t0) / len(pts)
    t0 = time.perf_counter()
    k_t, ch_t, _, _ = cluster_points(pts, crit, seed=args.seed)
    ref_total = ref_per_filter * n_filters
    return {
        "filters": n_filters,
        "probe": args.probe,
        "engine_analyze_s": engine_s,
        "engine_per_filter_ms": 1e3 * engine_s / n_filters,
        "reference_per_filter_ms": 1e3 * ref_per_filter,
        "reference_sampled_filters": len(pts),
        "reference_total_s_extrapolated": ref_total,
        "speedup": ref_total / engine_s,
        "agreement_on_sample": _agreement(k_t, ch_t, k_ref, ch_ref),
        "anomalies_engine": report.anomaly_count,
        "degenerate_engine": report.degenerate_count,
        "peak_rss_mb": rss1,
        "rss_growth_mb": rss1 - rss0,
    }


def bench_small(args) -> dict:
    xtr, ytr, _, _, _ = digits_tensors(size=16, label_noise=0.2, seed=args.seed)
    torch.manual_seed(args.seed)
    model = train_plain(SmallCNN(), xtr, ytr, epochs=15, seed=args.seed)
    idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(args.seed))[: args.probe]
    crit = AnomalyCriteria()
    t0 = time.perf_counter()
    eng = analyze(model, xtr[idx], ytr[idx], criteria=crit, seed=args.seed)
    engine_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = analyze(model, xtr[idx], ytr[idx], criteria=crit, seed=args.seed, backend="sklearn")
    ref_s = time.perf_counter() - t0
    # The reference against itself with another seed: how stable the method is, a ceiling for agreement.
    ref2 = analyze(model, xtr[idx], criteria=crit, seed=args.seed + 1, backend="sklearn")
    k_e = torch.cat([lr.k for lr in eng.layers.values()])
    k_r = torch.cat([lr.k for lr in ref.layers.values()])
    ch_e = torch.cat([lr.ch for lr in eng.layers.values()])
    ch_r = torch.cat([lr.ch for lr in ref.layers.values()])
    a_e, a_r = eng.anomaly_count, ref.anomaly_count
    k_r2 = torch.cat([lr.k for lr in ref2.layers.values()])
    ch_r2 = torch.cat([lr.ch for lr in ref2.layers.values()])

    def unbalanced(rep):
        return int(sum(lr.unbalanced.sum() for lr in rep.layers.values()))

    # The literal defaults flag nothing on this model; a share-based tiny cluster (10% of the probe)
    # gives counts worth comparing, re-judged from the same clusterings.
    share = AnomalyCriteria(min_cluster_size=max(crit.min_cluster_size, len(idx) // 10))
    a_e10, a_r10 = eng.reflag(share).anomaly_count, ref.reflag(share).anomaly_count

    return {
        "filters": eng.n_filters,
        "probe": len(idx),
        "engine_s": engine_s,
        "reference_s": ref_s,
        "speedup": ref_s / engine_s,
        "agreement": _agreement(k_e, ch_e, k_r, ch_r),
        "reference_self_agreement_other_seed": _agreement(k_r2, ch_r2, k_r, ch_r),
        "unbalanced_engine": unbalanced(eng),
        "min_cluster_size_10pct": share.min_cluster_size,
        "anomalies_engine_10pct": a_e10,
        "anomalies_reference_10pct": a_r10,
        "anomaly_count_rel_diff_10pct": abs(a_e10 - a_r10) / max(a_r10, 1),
        "unbalanced_reference": unbalanced(ref),
        "anomalies_engine": a_e,
        "anomalies_reference": a_r,
        "anomaly_count_rel_diff": abs(a_e - a_r) / max(a_r, 1) if (a_e or a_r) else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sample", type=int, default=48, help="filters timed with the reference on ResNet-18")
    p.add_argument("--probe", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-small", action="store_true")
    p.add_argument("--skip-resnet", action="store_true")
    args = p.parse_args()
    out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if not args.skip_resnet:
        out["resnet18_32px"] = r = bench_resnet(args)
        print(
            f"ResNet-18 32x32, {r['filters']} filters, probe {r['probe']}: engine {r['engine_analyze_s']:.2f} s "
            f"({r['engine_per_filter_ms']:.3f} ms/filter); reference {r['reference_per_filter_ms']:.1f} ms/filter "
            f"(sampled {r['reference_sampled_filters']}) -> speed-up x{r['speedup']:.0f}; "
            f"agreement {r['agreement_on_sample']}"
        )
    if not args.skip_small:
        out["small_cnn_digits"] = bench_small(args)
        s = out["small_cnn_digits"]
        print(
            f"SmallCNN digits, {s['filters']} filters: engine {s['engine_s']:.2f} s, reference {s['reference_s']:.1f} s, "
            f"x{s['speedup']:.0f}; agreement {s['agreement']} (reference vs itself, other seed: "
            f"{s['reference_self_agreement_other_seed']}); anomalies {s['anomalies_engine']} vs {s['anomalies_reference']}; "
            f"unbalanced {s['unbalanced_engine']} vs {s['unbalanced_reference']}; with min_cluster_size="
            f"{s['min_cluster_size_10pct']}: anomalies {s['anomalies_engine_10pct']} vs {s['anomalies_reference_10pct']}"
        )
    print(json.dumps(out, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))


if __name__ == "__main__":
    main()
