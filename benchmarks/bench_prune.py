"""Anomaly pruning vs no pruning vs Lightning's ModelPruning (L1, structured), same number of filters.

Ground truths from the evidence experiments (digits, SmallCNN): G1 (20% label noise) and G2 (backdoor
in 3% of the training images). Both pruning arms act once, at `--prune-epoch`; ModelPruning masks the
same share of every conv layer's filters as the anomaly arm masked in total. Prints per-seed rows, then
one JSON line with means: final validation accuracy and, for G2, attack success rate.

    python benchmarks/bench_prune.py [--seeds 3] [--epochs 15] [--prune-epoch 5]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_anomaly import AnomalyCriteria, AnomalyFilterCallback, AnomalyPruneCallback
from lightning_anomaly.demo import ImageClassifier, SmallCNN, digits_tensors
from lightning_anomaly.demo.data import stamp_trigger

CASES = {"G1 label noise": {"label_noise": 0.2}, "G2 backdoor": {"backdoor": 0.03}}


def fit(arm: str, data: dict, seed: int, epochs: int, prune_epoch: int, amount: float | None):
    seed_everything(seed, verbose=False)
    xtr, ytr, xva, yva, _ = digits_tensors(seed=seed, **data)
    model = ImageClassifier(SmallCNN())
    callbacks = []
    pruner = None
    if arm == "anomaly":
        monitor = AnomalyFilterCallback(probe_size=256, seed=seed, criteria=AnomalyCriteria(min_cluster_fraction=0.1))
        pruner = AnomalyPruneCallback(
            monitor, trigger="epochs", epochs=[prune_epoch], max_fraction_per_layer=0.2, max_total_fraction=0.1
        )
        callbacks = [monitor, pruner]
    elif arm == "modelpruning":
        convs = [(m, "weight") for m in model.modules() if isinstance(m, nn.Conv2d)]
        callbacks = [
            ModelPruning(
                pruning_fn="ln_structured",
                parameters_to_prune=convs,
                amount=amount or 0.0,
                pruning_dim=0,
                pruning_norm=1,
                apply_pruning=lambda epoch: epoch == prune_epoch,
                use_global_unstructured=False,
                make_pruning_permanent=True,
                verbose=0,
            )
        ]
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    trainer.fit(
        model,
        DataLoader(TensorDataset(xtr, ytr), batch_size=64, shuffle=True),
        DataLoader(TensorDataset(xva, yva), batch_size=512),
    )
    model.eval()
    with torch.no_grad():
        val = float((model(xva).argmax(-1) == yva).float().mean())
        asr = float((model(stamp_trigger(xva[yva != 0])).argmax(-1) == 0).float().mean())
    total = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    share = (pruner.n_pruned / total) if pruner is not None else None
    return {"val_acc": val, "asr": asr, "pruned_share": share}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--prune-epoch", type=int, default=5)
    args = p.parse_args()
    out: dict = {}
    for case, data in CASES.items():
        rows = {"none": [], "anomaly": [], "modelpruning": []}
        for seed in range(args.seeds):
            rows["none"].append(fit("none", data, seed, args.epochs, args.prune_epoch, None))
            anomaly = fit("anomaly", data, seed, args.epochs, args.prune_epoch, None)
            rows["anomaly"].append(anomaly)
            rows["modelpruning"].append(
                fit("modelpruning", data, seed, args.epochs, args.prune_epoch, anomaly["pruned_share"])
            )
            print(case, seed, {k: v[-1] for k, v in rows.items()}, flush=True)
        out[case] = {
            arm: {key: float(np.mean([r[key] for r in rs])) for key in ("val_acc", "asr")} for arm, rs in rows.items()
        }
        out[case]["pruned_share"] = float(np.mean([r["pruned_share"] for r in rows["anomaly"]]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
