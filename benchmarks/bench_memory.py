"""Peak memory of `analyze` on a torchvision ResNet-50 at 224x224 with a 128-sample probe (CPU).

Each measurement runs in a fresh subprocess and reads its peak resident set size:
  base     model and probe in memory
  forward  a plain `torch.no_grad()` forward of the probe
  analyze  `analyze(model, probe)` (no targets)
The engine's own cost is the analyze peak minus the plain forward's peak (the forward's working set,
residual branches and allocator caches included, is the model's, not the engine's); it is checked
against 1.5 x the largest single layer's probe activations + O(filters x N) (per-filter points,
labels and statistics). Prints one JSON line last.

    python benchmarks/bench_memory.py [--probe 128] [--size 224] [--arch resnet50]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(stage: str, arch: str, probe: int, size: int) -> dict:
    import torch
    import torchvision

    from lightning_anomaly import analyze

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    x = torch.randn(probe, 3, size, size)
    largest = 0
    info = {}
    if stage == "forward":
        with torch.no_grad():
            model(x)
    elif stage == "analyze":
        t0 = time.perf_counter()
        report = analyze(model, x)
        info = {"seconds": time.perf_counter() - t0, "filters": report.n_filters, "degenerate": report.degenerate_count}
    elif stage == "shapes":
        sizes = []
        hooks = [
            m.register_forward_hook(lambda m, a, o: sizes.append(o.numel() * o.element_size()))
            for m in model.modules()
            if isinstance(m, torch.nn.Conv2d)
        ]
        with torch.no_grad():
            model(x[:1])
        for h in hooks:
            h.remove()
        largest = max(sizes) * probe
        info = {"filters": sum(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"stage": stage, "peak_bytes": peak, "largest_layer_bytes": largest, **info}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--probe", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--child", default=None)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.arch, args.probe, args.size)))
        return
    res = {}
    for stage in ("shapes", "base", "forward", "analyze"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            stage,
            "--arch",
            args.arch,
            "--probe",
            str(args.probe),
            "--size",
            str(args.size),
        ]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        res[stage] = json.loads(line)
    mb = 1 << 20
    largest = res["shapes"]["largest_layer_bytes"]
    filters = res["shapes"]["filters"]
    per_filter_sample = 2 * 4 + 1 + 8  # points (float32 x 2), labels (int8), working int64 labels
    bound = 1.5 * largest + filters * args.probe * per_filter_sample * 5  # 5 k-values in flight
    extra = res["analyze"]["peak_bytes"] - res["base"]["peak_bytes"]
    over_forward = res["analyze"]["peak_bytes"] - res["forward"]["peak_bytes"]
    out = {
        "arch": args.arch,
        "probe": args.probe,
        "size": args.size,
        "filters": filters,
        "analyze_seconds": res["analyze"]["seconds"],
        "largest_layer_activation_mb": largest / mb,
        "peak_extra_forward_mb": (res["forward"]["peak_bytes"] - res["base"]["peak_bytes"]) / mb,
        "peak_extra_analyze_mb": extra / mb,
        "engine_extra_over_forward_mb": over_forward / mb,
        "bound_mb": bound / mb,
        "within_bound": over_forward <= bound,
    }
    print(
        f"{args.arch} {args.size}px probe {args.probe}: {filters} filters in {out['analyze_seconds']:.1f} s; peak extra "
        f"{out['peak_extra_analyze_mb']:.0f} MB (plain forward {out['peak_extra_forward_mb']:.0f} MB, engine on top "
        f"{out['engine_extra_over_forward_mb']:.0f} MB); largest layer {out['largest_layer_activation_mb']:.0f} MB; "
        f"bound {out['bound_mb']:.0f} MB -> {'within' if out['within_bound'] else 'OVER'}"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
