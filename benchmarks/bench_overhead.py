"""Cost of AnomalyFilterCallback as a fraction of a training epoch (same seed, one run each).

  (a) the demo's SmallCNN on scikit-learn's digits, a few epochs, analysis every epoch;
  (b) a torchvision ResNet-18 on 10,000 synthetic 32x32 images, ``--resnet-epochs`` epochs (5), with the
      default settings (every epoch analysed) and again with ``max_overhead=--budget`` (0.05).

For each: wall time of `trainer.fit` without and with the callback, their difference as a share
of the run without it, the analysis time the callback measured itself, the number of analyses and
the callback's own cumulative share (``monitor.overhead``). For (b), also one analysis of the trained
network stage by stage, beside a plain forward+backward of the probe (the floor of any exact
per-sample gradient norm) and 5% of the epoch. Prints one JSON line last.

    OMP_NUM_THREADS=1 python benchmarks/bench_overhead.py [--images 10000] [--resnet-epochs 5] [--budget 0.05] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_anomaly import AnomalyFilterCallback, analyze
from lightning_anomaly.demo import SmallCNN, digits_tensors
from lightning_anomaly.demo.module import ImageClassifier
from lightning_anomaly.engine import capture_layers, per_sample_grad_norms, select_layers
from lightning_anomaly.engine.analyze import class_ids


def timed_fit(make_model, train, val, epochs, callback, batch_size):
    seed_everything(0)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback] if callback else [],
        num_sanity_val_steps=0,
    )
    loaders = (DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=256))
    module = make_model()
    t0 = time.perf_counter()
    trainer.fit(module, *loaders)
    return time.perf_counter() - t0, module.net


def _best_of(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def stage_times(net, probe) -> dict:
    """Where one analysis of the trained network goes (best of 3), and a floor to compare it with.

    The stages are the callback's analysis (class labels, so both views) taken apart: the capture, the
    clustering and flags (an analysis with the labels but no targets, less the capture), and the gradient
    norms.

    ``fwd_bwd`` is one plain forward and backward of the probe with a summed loss: the least work
    that sees every sample's gradient, so no exact per-sample gradient norm can cost less.
    """
    x, y = probe
    net.eval()

    def forward():
        with torch.no_grad():
            net(x)

    def fwd_bwd():
        loss = torch.nn.functional.cross_entropy(net(x), y, reduction="sum")
        torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad])

    # As the callback analyses: class-conditional maps and the global view from the probe's labels.
    classes = class_ids(y)
    capture = _best_of(lambda: capture_layers(net, x, select_layers(net), 2, groups=classes, global_view=True))
    no_targets = _best_of(lambda: analyze(net, x, classes=y))
    return {
        "forward_s": _best_of(forward),
        "capture_and_pca_s": capture,
        "clustering_and_flags_s": no_targets - capture,
        "grad_norms_s": _best_of(lambda: per_sample_grad_norms(net, x, y)),
        "fwd_bwd_floor_s": _best_of(fwd_bwd),
    }


def measure(name, make_model, train, val, epochs, batch_size, probe_size, stages=False, base=None, **monitor_kw):
    if base is None:
        base, _ = timed_fit(make_model, train, val, epochs, None, batch_size)
    monitor = AnomalyFilterCallback(probe_size=probe_size, history_file=None, **monitor_kw)
    watched, net = timed_fit(make_model, train, val, epochs, monitor, batch_size)
    analysis = sum(h["seconds"] or 0.0 for h in monitor.history)
    out = {
        "epochs": epochs,
        "analyses": len(monitor.history),
        "filters": monitor.last_report.n_filters,
        "fit_s_without": base,
        "fit_s_with": watched,
        "overhead_fraction": (watched - base) / base,
        "analysis_s_total": analysis,
        "analysis_fraction_of_fit": analysis / base,
        "monitor_share": monitor.overhead,
        "analysed_epochs": [h["epoch"] for h in monitor.history],
        "settings": {k: v for k, v in monitor_kw.items()},
    }
    print(
        f"{name}: fit {base:.1f} s without, {watched:.1f} s with the callback -> overhead {100 * out['overhead_fraction']:.1f}% "
        f"(analyses {analysis:.2f} s = {100 * out['analysis_fraction_of_fit']:.1f}% of the fit)"
    )
    if stages:
        st = stage_times(net, monitor.probe)
        out["stages"] = st
        out["five_percent_budget_s"] = 0.05 * base / epochs
        print(
            "  one analysis, stage by stage (best of 3): "
            + ", ".join(f"{k} {v:.2f}" for k, v in st.items())
            + f"; 5% of an epoch is {out['five_percent_budget_s']:.2f} s"
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--digits-epochs", type=int, default=5)
    p.add_argument("--resnet-epochs", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.05, help="max_overhead of the budgeted ResNet-18 arm")
    p.add_argument("--skip-resnet", action="store_true")
    args = p.parse_args()
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}

    xtr, ytr, xva, yva, _ = digits_tensors(label_noise=0.2)
    result["small_cnn_digits"] = measure(
        "SmallCNN digits",
        lambda: ImageClassifier(SmallCNN()),
        TensorDataset(xtr, ytr),
        TensorDataset(xva, yva),
        args.digits_epochs,
        64,
        256,
    )
    if not args.skip_resnet:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.images, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args.images,), generator=g)
        args_resnet = (
            lambda: ImageClassifier(torchvision.models.resnet18(num_classes=10), optimizer="sgd", lr=0.05),
            TensorDataset(x, y),
            TensorDataset(x[:512], y[:512]),
            args.resnet_epochs,
            128,
            256,
        )
        result["resnet18_synthetic"] = measure("ResNet-18 synthetic 32x32", *args_resnet, stages=True)
        result["resnet18_synthetic_budget"] = measure(
            f"ResNet-18 synthetic 32x32, max_overhead={args.budget}",
            *args_resnet,
            base=result["resnet18_synthetic"]["fit_s_without"],
            max_overhead=args.budget,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
