"""Exploration for issue 12: does label consistency among neighbours find large planted groups?

    OMP_NUM_THREADS=1 python experiments/label_consistency.py [--seeds 3]

On the cached flags.py models (run experiments/flags.py first), for backdoor and rare inputs at every
planted share, prints precision@k (k = planted samples in the probe) of: the package's top_outliers;
kNN label disagreement (share of a sample's k nearest probe neighbours with another label) in several
feature spaces (the conv layers' maps and the input, pooled); and combinations of the two. Writes
experiments/label_consistency.json and docs/LABEL_CONSISTENCY.md (`--from-json FILE` renders a saved run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flags import SHARES, Config, precision_at_k, ranked_by, train

from lightning_anomaly import analyze


def layer_features(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each conv's output, average-pooled to 4x4 and flattened, plus the input pixels."""
    feats: dict[str, np.ndarray] = {"input": torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1).numpy()}
    hooks = []
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for i, m in enumerate(convs):
        name = f"conv{i + 1}"
        if True:
            hooks.append(
                m.register_forward_hook(
                    lambda _m, _a, out, name=name: feats.__setitem__(
                        name, torch.nn.functional.adaptive_avg_pool2d(out, 4).flatten(1).numpy()
                    )
                )
            )
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return feats


def disagreement(feats: np.ndarray, labels: np.ndarray, k: int = 10) -> np.ndarray:
    """Share of each sample's k nearest neighbours (standardised features, Euclidean) with another label."""
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
    d = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nn_idx = np.argsort(d, axis=1)[:, :k]
    return (labels[nn_idx] != labels[:, None]).mean(1)


COLUMNS = (
    ("package", "package `top_outliers`"),
    ("score x dis conv1", "x (dis + 0.1), conv1"),
    ("score x (dis+r) conv1", "x (dis + r), conv1"),
    ("score x (dis+r) input", "x (dis + r), input"),
    ("score x (dis+r) conv3", "x (dis + r), last conv"),
    ("knn conv1", "dis alone, conv1"),
)


def render(out: list[dict], command: str) -> str:
    """The mean precision@k per setting, truth and share as a markdown page."""
    lines = [
        f"## Label consistency among neighbours (issue 12, not adopted): `{command}`",
        "",
        "Exploration on the cached `experiments/flags.py` models (same probes, `analyze` with targets, seed 0),",
        "mean precision@k over seeds (k = planted samples in the probe). *dis* is the share of a sample's 10",
        "nearest probe neighbours (standardised conv maps average-pooled to 4x4, or the pooled input) that carry",
        "another label; *r* is its mean over the probe. The package's outlier score is multiplied by the weight",
        "named in the column. The idea: a backdoor's samples look like their source class in early features,",
        "so their neighbours disagree with their label, while the clean target-class samples that become the",
        "tiny cluster at 10-15% do not.",
        "",
        "| setting | truth | share | " + " | ".join(title for _, title in COLUMNS) + " | r (conv1) |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    for setting in ("digits", "shapes"):
        for truth in ("G2 backdoor", "G3 rare"):
            for share in SHARES:
                rows = [r for r in out if r["setting"] == setting and r["truth"] == truth and r["share"] == share]
                cells = []
                for key, _ in (*COLUMNS, ("r conv1", "")):
                    values = [r[key] for r in rows if r.get(key) is not None]
                    cells.append(f"{np.mean(values):.2f}" if values else "-")
                lines.append(f"| {setting} | {truth} | {share:.0%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Verdict: on digits the weight lifts the 15% backdoor from 0.32 to 0.89-0.91 and costs nothing",
        "elsewhere; on shapes, whose early features do not carry the class (random positions, sizes and",
        "brightness: *dis* alone finds nothing, r = 0.6-0.7), it cuts the 10% backdoor's precision from 0.69 to 0.37-0.53. Scaling",
        "by the space's own disagreement rate r does not rescue it. A signal that helps one data set and hurts",
        "the other is not a default; the package's ranking is unchanged.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--from-json", type=Path, help="render docs/LABEL_CONSISTENCY.md from a saved run")
    args = p.parse_args()
    docs = Path(__file__).resolve().parent.parent / "docs" / "LABEL_CONSISTENCY.md"
    command = "OMP_NUM_THREADS=1 python experiments/label_consistency.py" + (
        f" --seeds {args.seeds}" if args.seeds != 3 else ""
    )
    if args.from_json is not None:
        docs.write_text(render(json.loads(args.from_json.read_text()), command))
        return
    cfg = Config()
    out = []
    for setting in ("digits", "shapes"):
        for truth in ("G2 backdoor", "G3 rare"):
            for share in SHARES:
                for seed in range(args.seeds):
                    t = train(setting, truth, share, seed, cfg)
                    labels = t.py.numpy()
                    report = analyze(t.model, t.px, t.py, seed=0)
                    score = report.outlier_scores.numpy()
                    row = {"setting": setting, "truth": truth, "share": share, "seed": seed}
                    row["package"] = precision_at_k(t.truth, report.top_outliers(len(labels)))
                    feats = layer_features(t.model, t.px)
                    for name, f in feats.items():
                        dis = disagreement(f, labels)
                        row[f"knn {name}"] = precision_at_k(t.truth, ranked_by(dis))
                        row[f"score x dis {name}"] = precision_at_k(t.truth, ranked_by(score * (dis + 0.1)))
                        r = float(dis.mean())  # how often a neighbour disagrees at all: the space's label noise
                        row[f"score x (dis+r) {name}"] = precision_at_k(t.truth, ranked_by(score * (dis + r)))
                        row[f"r {name}"] = r
                        for k in (5, 20):
                            dk = disagreement(f, labels, k)
                            row[f"score x dis{k} {name}"] = precision_at_k(t.truth, ranked_by(score * (dk + 1 / k)))
                    out.append(row)
                    print(
                        json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}),
                        flush=True,
                    )
    keys = [k for k in out[0] if k not in ("setting", "truth", "share", "seed")]
    Path(__file__).with_name("label_consistency.json").write_text(json.dumps(out))
    docs.write_text(render(out, command))
    print("\nmean precision@k over seeds")
    for setting in ("digits", "shapes"):
        for truth in ("G2 backdoor", "G3 rare"):
            for share in SHARES:
                rows = [r for r in out if r["setting"] == setting and r["truth"] == truth and r["share"] == share]
                cells = " ".join(f"{k}={np.mean([r[k] for r in rows if r[k] is not None]):.2f}" for k in keys)
                print(f"{setting} {truth} {share:.2f}: {cells}")


if __name__ == "__main__":
    main()
