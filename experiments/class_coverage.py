"""How ``AnomalyCriteria.class_coverage`` moves the outlier score's precision@k (issue 12).

A cluster that is ``class_purity`` pure in one label and holds at least ``class_coverage`` of that
label's probe samples counts as a class: it is not flagged and adds nothing to the outlier score. A
planted backdoor relabelled into one class can be most of that label's probe samples, so a low coverage
bound hides it. This sweeps the bound on the models of ``experiments/flags.py`` (its cache; the models
are trained there when missing): seeds 0-2 and 6-8, backdoor and rare inputs at several shares, label
noise at 10%. Precision@k of ``top_outliers`` (k = planted samples in the probe), mean per seed group.

    OMP_NUM_THREADS=1 python experiments/class_coverage.py [--coverages 0.5 0.7 0.9]

Writes ``experiments/class_coverage.json`` and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import flags
import numpy as np

from lightning_anomaly import AnomalyCriteria, analyze

CASES = (
    ("G2 backdoor", (0.01, 0.03, 0.05, 0.10, 0.15)),
    ("G3 rare", (0.03, 0.15)),
    ("G1 label noise", (0.10,)),
)
SEED_GROUPS = {"0-2": (0, 1, 2), "6-8": (6, 7, 8)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--coverages", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    args = parser.parse_args()
    cfg = flags.Config()
    rows = []
    for setting in ("digits", "shapes"):
        for truth, shares in CASES:
            for share in shares:
                row = {"setting": setting, "truth": truth, "share": share, "precision_at_k": {}}
                for cov in args.coverages:
                    crit = AnomalyCriteria(class_coverage=cov)
                    per_group = {}
                    for group, seeds in SEED_GROUPS.items():
                        values = []
                        for seed in seeds:
                            t = flags.train(setting, truth, share, seed, cfg)
                            if t.truth.sum():
                                r = analyze(t.model, t.px, t.py, criteria=crit, seed=0)
                                values.append(flags.precision_at_k(t.truth, r.top_outliers(int(t.truth.sum()))))
                        per_group[group] = round(float(np.mean(values)), 3) if values else None
                    row["precision_at_k"][str(cov)] = per_group
                rows.append(row)
                print(setting, truth, share, row["precision_at_k"], flush=True)
    out = {"coverages": args.coverages, "rows": rows}
    Path(__file__).with_name("class_coverage.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
