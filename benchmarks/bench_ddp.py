"""Analysis split across DDP ranks vs one process: wall time and equality of the reports.

A torchvision ResNet-18 (32x32, probe 256) is fitted for one tiny epoch with `AnomalyFilterCallback`
(one analysis at its end) with `strategy="ddp_spawn", devices=2` on the CPU (gloo), twice: rank 0
analysing alone and broadcasting (`distribute=False`), and the layers split across both ranks
(`distribute=True`). Same seed and training, so the reports must be identical. Each run records the
wall time of `run_analysis` on rank 0. Prints one JSON line last.

    python benchmarks/bench_ddp.py [--probe 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader, TensorDataset

from lightning_anomaly import AnomalyFilterCallback
from lightning_anomaly.demo import ImageClassifier


class TimedMonitor(AnomalyFilterCallback):
    def __init__(self, out: str, **kw) -> None:
        super().__init__(**kw)
        self.out = out

    def run_analysis(self, trainer, pl_module):
        t0 = time.perf_counter()
        report = super().run_analysis(trainer, pl_module)
        seconds = time.perf_counter() - t0
        if trainer.is_global_zero:
            digest = {n: [lr.k.tolist(), lr.anomaly.tolist(), lr.labels.tolist()] for n, lr in report.layers.items()}
            Path(self.out).write_text(json.dumps({"seconds": seconds, "report": digest, "world": trainer.world_size}))
        return report


def run(distribute: bool, probe: int, out: str) -> dict:
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(512, 3, 32, 32, generator=g), torch.randint(0, 10, (512,), generator=g))
    monitor = TimedMonitor(out, probe_size=probe, distribute=distribute)
    trainer = Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
    )
    trainer.fit(ImageClassifier(torchvision.models.resnet18(num_classes=10), lr=0.0), DataLoader(data, batch_size=64))
    return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", type=int, default=256)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(False, args.probe, str(Path(tmp) / "one.json"))
        two = run(True, args.probe, str(Path(tmp) / "two.json"))
    same = one["report"] == two["report"]
    result = {
        "probe": args.probe,
        "rank0_alone_s": one["seconds"],
        "split_two_ranks_s": two["seconds"],
        "speedup": one["seconds"] / two["seconds"],
        "identical_reports": same,
        "threads_per_process": torch.get_num_threads(),
    }
    print(
        f"ResNet-18 analysis under ddp_spawn x2: rank 0 alone {one['seconds']:.2f} s, split over both ranks "
        f"{two['seconds']:.2f} s "
        f"(x{result['speedup']:.2f}); identical reports: {same}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
