"""Cost of AnomalyFilterCallback as a fraction of a training epoch (same seed, one run each).

  (a) the demo's SmallCNN on scikit-learn's digits, a few epochs, analysis every epoch;
  (b) a torchvision ResNet-18 on 10,000 synthetic 32x32 images, one epoch, analysis at its end.

For each: wall time of `trainer.fit` without and with the callback, their difference as a share
of the run without it, and the analysis time the callback measured itself. Prints one JSON line last.

    python benchmarks/bench_overhead.py [--images 10000] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchvision
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_anomaly import AnomalyFilterCallback
from lightning_anomaly.demo import SmallCNN, digits_tensors
from lightning_anomaly.demo.module import ImageClassifier


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
    t0 = time.perf_counter()
    trainer.fit(make_model(), *loaders)
    return time.perf_counter() - t0


def measure(name, make_model, train, val, epochs, batch_size, probe_size):
    base = timed_fit(make_model, train, val, epochs, None, batch_size)
    monitor = AnomalyFilterCallback(probe_size=probe_size)
    watched = timed_fit(make_model, train, val, epochs, monitor, batch_size)
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
    }
    print(
        f"{name}: fit {base:.1f} s without, {watched:.1f} s with the callback -> overhead {100 * out['overhead_fraction']:.1f}% "
        f"(analyses {analysis:.2f} s = {100 * out['analysis_fraction_of_fit']:.1f}% of the fit)"
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--digits-epochs", type=int, default=5)
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
        result["resnet18_synthetic"] = measure(
            "ResNet-18 synthetic 32x32",
            lambda: ImageClassifier(torchvision.models.resnet18(num_classes=10), optimizer="sgd", lr=0.05),
            TensorDataset(x, y),
            TensorDataset(x[:512], y[:512]),
            1,
            128,
            256,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
