"""Issue 13 evidence: does any aggregate of the analysis track overfitting, across runs and within a run?

    python experiments/overfit_signal.py [--epochs 10] [--every 2] [--out docs]

Many short runs that differ in how much they overfit: training-set size (100, 400, all ~1,260), label
noise (0, 40%) and regularisation (none, or weight decay 1e-3 with shift augmentation), on digits
and on shapes (the SmallCNN of the demo; BatchNorm for shapes). Every `--every` epochs the package's
`analyze` runs on a fixed 256-sample probe of the training set with its labels, and train and
validation accuracy are measured. For each candidate aggregate the script reports

* its Spearman correlation with the final train-val gap across runs, with a 95% bootstrap interval;
* its mean within-run Spearman correlation with the gap over the analysed epochs.

It writes docs/OVERFIT.md, experiments/overfit_signal.json, and replaces the cross-run section of
docs/RESULTS.md (between its markers). The last line printed is one JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr

from lightning_anomaly import AnalysisReport, analyze
from lightning_anomaly.demo import SmallCNN, digits_tensors
from lightning_anomaly.demo.data import shapes_tensors
from lightning_anomaly.demo.train import accuracy, train_plain

SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"data": digits_tensors, "model": {}},
    "shapes": {"data": shapes_tensors, "model": {"batch_norm": True}},
}
MARK_BEGIN = "<!-- cross-run: experiments/overfit_signal.py -->"
MARK_END = "<!-- /cross-run -->"


@dataclass(frozen=True)
class RunSpec:
    setting: str
    train_size: int | None  # None: the whole training split
    label_noise: float
    regularised: bool
    seed: int


def grid(seed: int = 0) -> list[RunSpec]:
    return [
        RunSpec(setting, size, noise, reg, seed)
        for setting in SETTINGS
        for size in (100, 400, None)
        for noise in (0.0, 0.4)
        for reg in (False, True)
    ]


def aggregates(report: AnalysisReport) -> dict[str, float]:
    """Every candidate indicator the analysis already computes, as one number each."""
    n = report.n_samples
    layer_log_ch = []
    for lr in report.layers.values():
        ch = lr.ch[~lr.degenerate]
        ch = ch[torch.isfinite(ch) & (ch > 0)]
        if ch.numel():
            layer_log_ch.append(float(ch.log().mean()))
    grads = report.grad_norms
    scores = report.outlier_scores if report.outlier_scores is not None else torch.zeros(n)
    return {
        "anomaly count": float(report.anomaly_count),
        "class-selective count": float(report.class_selective_count),
        "count incl. class-selective": float(report.anomaly_count + report.class_selective_count),
        "share of probe in anomaly tiny clusters": len(report.outlier_indices) / n,
        "mean log-CH per layer": float(np.mean(layer_log_ch)) if layer_log_ch else math.nan,
        "outlier-score mass": float(scores.sum()) / n,
        "outlier/normal gradient ratio": math.nan if report.gradient_ratio is None else report.gradient_ratio,
        "mean probe gradient norm": math.nan if grads is None else float(grads.mean()),
        "mean separation": float(
            np.mean([float(lr.separation[~lr.degenerate].mean()) for lr in report.layers.values()])
        ),
    }


def run_one(spec: RunSpec, epochs: int, every: int) -> dict[str, Any]:
    setting = SETTINGS[spec.setting]
    xtr, ytr, xva, yva, _ = setting["data"](seed=spec.seed, label_noise=spec.label_noise)
    if spec.train_size is not None:
        keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(spec.seed))[: spec.train_size]
        xtr, ytr = xtr[keep], ytr[keep]
    probe = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(1000 + spec.seed))[:256]
    torch.manual_seed(spec.seed)
    model = SmallCNN(**setting["model"])
    wd = 1e-3 if spec.regularised else 0.0
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=wd)
    rows = []
    # An "epoch" is a pass over ~1,260 samples whatever the set's size, so that small sets get as many
    # optimiser steps as large ones (and can memorise) instead of stopping underfitted.
    reps = max(1, round(1260 / len(ytr)))
    for epoch in range(epochs):
        train_plain(model, xtr, ytr, epochs=reps, seed=epoch, optimizer=opt, augment=spec.regularised)
        if (epoch + 1) % every and epoch != epochs - 1:
            continue
        report = analyze(model, xtr[probe], ytr[probe], seed=0)
        tr, va = accuracy(model, xtr, ytr), accuracy(model, xva, yva)
        rows.append({"epoch": epoch, "train_acc": tr, "val_acc": va, "gap": tr - va, **aggregates(report)})
    return {"spec": spec.__dict__, "rows": rows}


def _spearman(a: list[float], b: list[float], least: int = 3) -> float | None:
    x, y = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < least or np.all(x[ok] == x[ok][0]) or np.all(y[ok] == y[ok][0]):
        return None
    return float(spearmanr(x[ok], y[ok]).statistic)


def summarise(runs: list[dict[str, Any]], settings: list[str]) -> dict[str, dict[str, Any]]:
    names = [k for k in runs[0]["rows"][-1] if k not in ("epoch", "train_acc", "val_acc", "gap")]
    rng = np.random.default_rng(0)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        entry: dict[str, Any] = {}
        for setting in [*settings, "both"]:
            rs = [r for r in runs if setting in ("both", r["spec"]["setting"])]
            final = [r["rows"][-1][name] for r in rs]
            gaps = [r["rows"][-1]["gap"] for r in rs]
            # Across runs only where the aggregate is defined in at least 8 runs (the gradient ratio is
            # undefined without an anomaly filter).
            rho = _spearman(final, gaps, least=8)
            boot = []
            for _ in range(1000 if rho is not None else 0):
                idx = rng.integers(0, len(rs), len(rs))
                b = _spearman([final[i] for i in idx], [gaps[i] for i in idx], least=8)
                if b is not None:
                    boot.append(b)
            within = [_spearman([row[name] for row in r["rows"]], [row["gap"] for row in r["rows"]]) for r in rs]
            within_ok = [w for w in within if w is not None]
            entry[setting] = {
                "across": rho,
                "ci": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else None,
                "within": float(np.mean(within_ok)) if within_ok else None,
                "within_runs": len(within_ok),
                "defined_runs": int(np.isfinite(np.asarray(final, float)).sum()),
            }
        out[name] = entry
    return out


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def render(result: dict[str, Any]) -> str:
    runs, summary, cfg = result["runs"], result["summary"], result["config"]
    settings = sorted({r["spec"]["setting"] for r in runs})
    gaps = [r["rows"][-1]["gap"] for r in runs]
    lines = [
        MARK_BEGIN,
        "## Cross-run test of H1 (issue 13): `python experiments/overfit_signal.py`",
        "",
        f"{len(runs)} runs of {cfg['epochs']} epochs (analysis every {cfg['every']} epochs and at the last), "
        "differing in training-set size (100, 400, all; an epoch is ~1,260 samples' worth of steps whatever the size), label noise (0, 40%) and regularisation "
        "(none, or weight decay 1e-3 with shift augmentation), on digits and shapes. Final train-val gaps "
        f"range from {min(gaps):.2f} to {max(gaps):.2f} (median {np.median(gaps):.2f}); "
        f"{sum(g >= 0.2 for g in gaps)} runs end with a gap >= 0.2.",
        "",
        "Spearman correlation of each aggregate with the final gap across runs [95% bootstrap interval], and "
        "the mean within-run Spearman correlation with the gap over the analysed epochs; n = runs where the "
        "aggregate is defined at the end ('-' across runs when fewer than 8). Targets for an "
        "`overfit_index`: >= 0.7 across runs and >= 0.5 within runs.",
        "",
        "| aggregate | " + " | ".join(f"{s}: across [CI] / within" for s in [*settings, "both"]) + " |",
        "|---|" + "---|" * (len(settings) + 1),
    ]
    for name, entry in summary.items():
        cells = []
        for s in [*settings, "both"]:
            e = entry[s]
            ci = "" if e["ci"] is None else f" [{e['ci'][0]:+.2f}, {e['ci'][1]:+.2f}]"
            cells.append(f"{_f(e['across'])}{ci} / {_f(e['within'])} (n={e.get('defined_runs', '?')})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    meets = [n for n, e in summary.items() if (e["both"]["across"] or 0) >= 0.7 and (e["both"]["within"] or 0) >= 0.5]
    lines += [
        "",
        "Aggregates meeting both targets on the pooled runs: " + (", ".join(meets) if meets else "none") + ".",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    path = Path(__file__).with_name("overfit_signal.json")
    if args.render_only:  # summarise again: the statistics may have changed since the runs
        result = json.loads(path.read_text())
        result["summary"] = summarise(result["runs"], sorted(SETTINGS))
        path.write_text(json.dumps(result, indent=1))
    else:
        start = time.time()
        runs = []
        for spec in grid():
            runs.append(run_one(spec, args.epochs, args.every))
            last = runs[-1]["rows"][-1]
            print(
                f"[{time.time() - start:5.0f}s] {spec}: gap {last['gap']:.2f} count {last['anomaly count']:.0f}",
                flush=True,
            )
        settings = sorted(SETTINGS)
        result = {
            "config": {"epochs": args.epochs, "every": args.every},
            "runs": runs,
            "summary": summarise(runs, settings),
        }
        path.write_text(json.dumps(result, indent=1))
    text = render(result)
    (args.out / "OVERFIT.md").write_text(text)
    results_md = args.out / "RESULTS.md"
    if results_md.exists():
        old = results_md.read_text()
        if MARK_BEGIN in old and MARK_END in old:
            head, rest = old.split(MARK_BEGIN, 1)
            new = head + text + rest.split(MARK_END, 1)[1].lstrip("\n")
        else:
            new = old.rstrip("\n") + "\n\n" + text
        results_md.write_text(new)
    print(json.dumps({n: e["both"] for n, e in result["summary"].items()}))


if __name__ == "__main__":
    main()
