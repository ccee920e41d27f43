"""Whole-analysis time of a torchvision ResNet-50 on one GPU, and CPU/GPU agreement.

ResNet-50 (26,560 conv filters), probe 256 at 224x224, random weights, on `cuda:0`: one warm-up
analysis on a small probe, then the timed `analyze` (synchronised). Agreement: the layers matching
`--agree-layers` are analysed on both devices with the same seed; the share of filters with the same
k and the same anomaly flag is reported (the CPU side of the whole network would take minutes).
Prints one JSON line last; without a GPU it prints a JSON line saying it was skipped.

    python benchmarks/bench_gpu.py [--probe 256] [--size 224] [--agree-layers "layer4.*"]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision

from lightning_anomaly import analyze


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--agree-layers", default="layer4.*")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    x = torch.randn(args.probe, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    gpu_model = model.to("cuda")
    analyze(gpu_model, x[:16])  # warm-up: kernels, cuBLAS/cuSOLVER handles, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    report = analyze(gpu_model, x)
    torch.cuda.synchronize()
    gpu_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30
    layers = [args.agree_layers]
    on_gpu = analyze(gpu_model, x, layers=layers)
    on_cpu = analyze(model.to("cpu"), x, layers=layers)
    k_gpu = torch.cat([lr.k for lr in on_gpu.layers.values()])
    k_cpu = torch.cat([lr.k for lr in on_cpu.layers.values()])
    a_gpu = torch.cat([lr.anomaly for lr in on_gpu.layers.values()])
    a_cpu = torch.cat([lr.anomaly for lr in on_cpu.layers.values()])
    out = {
        "device": torch.cuda.get_device_name(0),
        "filters": report.n_filters,
        "probe": args.probe,
        "size": args.size,
        "analyze_s": gpu_s,
        "peak_gpu_gib": peak,
        "agreement_layers": args.agree_layers,
        "agreement_filters": int(k_gpu.numel()),
        "same_k": float((k_gpu == k_cpu).double().mean()),
        "same_anomaly_flag": float((a_gpu == a_cpu).double().mean()),
        "anomalies_gpu_cpu": [int(a_gpu.sum()), int(a_cpu.sum())],
    }
    print(f"ResNet-50 {args.size}px probe {args.probe} on {out['device']}: {gpu_s:.2f} s, peak {peak:.1f} GiB; {out}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
