"""Anomaly pruning vs no pruning vs Lightning's ModelPruning (L1, structured), same number of filters.

Ground truths from the evidence experiments (digits, SmallCNN): G1 (20% label noise) and G2 (backdoor
in 3% of the training images) on the whole training split, where the train-val gap stays small; and
the same two on 200 training images with 40% label noise / a 5% backdoor / 30% label noise plus a 5%
backdoor ("gap" cases), where the gap can reach 0.2-0.4 (the backdoor alone stays near 0.1). In the first two, the anomaly arm prunes once at `--prune-epoch` (trigger "epochs");
in the gap cases the arm uses the package defaults (trigger "overfit": it prunes only once val_acc
stalls while train_acc climbs, or never). ModelPruning masks the same share of every conv layer's
filters as the anomaly arm masked in total, at the same epoch (the anomaly arm's first prune; none
when it never pruned). Prints per-seed rows, then one JSON line with means: final validation
accuracy, train-val gap and, for backdoors, attack success rate.

    python benchmarks/bench_prune.py [--seeds 3] [--epochs 15] [--prune-epoch 5] [--cases gap] [--only TEXT]
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

CASES = {
    "G1 label noise": {"label_noise": 0.2},
    "G2 backdoor": {"backdoor": 0.03},
    "gap: 200 images, 40% label noise": {"label_noise": 0.4, "train_size": 200},
    "gap: 200 images, 5% backdoor": {"backdoor": 0.05, "train_size": 200},
    "gap: 200 images, 30% label noise + 5% backdoor": {"label_noise": 0.3, "backdoor": 0.05, "train_size": 200},
}


def fit(arm: str, data: dict, seed: int, epochs: int, prune_epoch: int | None, amount: float | None):
    seed_everything(seed, verbose=False)
    data = dict(data)
    size = data.pop("train_size", None)
    xtr, ytr, xva, yva, _ = digits_tensors(seed=seed, **data)
    if size is not None:
        keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed))[:size]
        xtr, ytr = xtr[keep], ytr[keep]
    # A small set repeated (the probe may then hold a sample twice) so that an epoch holds ~1,260 samples' worth of steps, as the whole split
    # does: with 4 steps an epoch the model stays underfitted and no gap opens.
    reps = max(1, round(1260 / len(ytr)))
    model = ImageClassifier(SmallCNN())
    callbacks = []
    pruner = None
    if arm == "anomaly":
        monitor = AnomalyFilterCallback(probe_size=256, seed=seed, criteria=AnomalyCriteria(), history_file=None)
        pruner = AnomalyPruneCallback(
            monitor, trigger="epochs", epochs=[prune_epoch], max_fraction_per_layer=0.2, max_total_fraction=0.1
        )
        callbacks = [monitor, pruner]
    elif arm == "overfit":
        monitor = AnomalyFilterCallback(probe_size=256, seed=seed, history_file=None)
        pruner = AnomalyPruneCallback(monitor)  # the defaults: trigger "overfit"
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
                apply_pruning=lambda epoch: prune_epoch is not None and epoch == prune_epoch,
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
        DataLoader(TensorDataset(xtr.repeat(reps, 1, 1, 1), ytr.repeat(reps)), batch_size=64, shuffle=True),
        DataLoader(TensorDataset(xva, yva), batch_size=512),
    )
    model.eval()
    with torch.no_grad():
        val = float((model(xva).argmax(-1) == yva).float().mean())
        train = float((model(xtr).argmax(-1) == ytr).float().mean())
        asr = float((model(stamp_trigger(xva[yva != 0])).argmax(-1) == 0).float().mean())
    total = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    share = (pruner.n_pruned / total) if pruner is not None else None
    first = pruner.events[0]["epoch"] if pruner is not None and pruner.events else None
    reason = pruner.events[0].get("reason") if pruner is not None and pruner.events else None
    # Epochs at which the trigger fired on an analysis that flagged nothing (so nothing was masked).
    unmasked = [e["epoch"] for e in pruner.unmasked] if pruner is not None else []
    return {
        "val_acc": val,
        "gap": train - val,
        "asr": asr,
        "pruned_share": share,
        "prune_epoch": first,
        "reason": reason,
        "fired_unmasked": unmasked,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--prune-epoch", type=int, default=5)
    p.add_argument("--cases", choices=("all", "gap", "whole"), default="all", help="gap: only the small noisy sets")
    p.add_argument("--only", default="", help="run only the cases whose name contains this text")
    args = p.parse_args()
    out: dict = {}
    for case, data in CASES.items():
        gap_case = "train_size" in data
        if (args.cases == "gap" and not gap_case) or (args.cases == "whole" and gap_case) or args.only not in case:
            continue
        arm = "overfit" if gap_case else "anomaly"
        rows: dict[str, list] = {"none": [], arm: [], "modelpruning": []}
        for seed in range(args.seeds):
            rows["none"].append(fit("none", data, seed, args.epochs, None, None))
            pruned = fit(arm, data, seed, args.epochs, args.prune_epoch, None)
            rows[arm].append(pruned)
            rows["modelpruning"].append(
                fit("modelpruning", data, seed, args.epochs, pruned["prune_epoch"], pruned["pruned_share"])
            )
            print(case, seed, {k: v[-1] for k, v in rows.items()}, flush=True)
        out[case] = {
            a: {key: float(np.mean([r[key] for r in rs])) for key in ("val_acc", "gap", "asr")}
            for a, rs in rows.items()
        }
        out[case]["prune_epochs"] = [r["prune_epoch"] for r in rows[arm]]
        out[case]["reasons"] = [r["reason"] for r in rows[arm]]
        out[case]["fired_unmasked"] = [r["fired_unmasked"] for r in rows[arm]]
        out[case]["pruned_share"] = float(np.mean([r["pruned_share"] for r in rows[arm]]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
