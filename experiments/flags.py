"""Issue 12 evidence: are the flags class-aware, size-robust and stable? Judged at the top of the list.

    python experiments/flags.py [--seeds 3] [--epochs 15] [--probe 256] [--out docs]

For each setting (digits, shapes), ground truth (G2 backdoor, G3 rare inputs, G1 label noise) and
planted share (1%, 3%, 5%, 10%, 15% of the training set), plus a clean control, one SmallCNN is
trained per seed (models are cached under experiments/.cache), a uniform probe is drawn from the
training set, and the package's `analyze` runs with its targets. Per analysis it records:

* precision@k of `top_outliers(k)`, k = planted samples in the probe (the primary metric), recall and
  precision of the outlier set at its own size, and AUROC of the ranking (secondary);
* the class-selective share of the anomaly flags: tiny cluster >= 80% one label holding >= 50% of that
  label's probe samples;
* the same precision@k for baselines: loss, EL2N, GraNd, Activation Clustering (Chen et al. 2018) and
  Spectral Signatures (Tran et al. 2018), both on the penultimate activations, per class;
* stability over clustering seeds 0/1/2 on the same model and probe: flag-set Jaccard and top-10 overlap.

Writes experiments/flags.json and prints one JSON summary line last.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from lightning_anomaly import AnalysisReport, AnomalyCriteria, analyze
from lightning_anomaly.demo import SmallCNN, digits_tensors
from lightning_anomaly.demo.data import shapes_tensors
from lightning_anomaly.demo.train import accuracy, train_plain

SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"data": digits_tensors, "model": {}},
    "shapes": {"data": shapes_tensors, "model": {"batch_norm": True}},
}
TRUTHS = {"G2 backdoor": "backdoor", "G3 rare": "rare", "G1 label noise": "label_noise"}
SHARES = (0.01, 0.03, 0.05, 0.10, 0.15)
CACHE = Path(__file__).with_name(".cache")


@dataclass(frozen=True)
class Config:
    seeds: int = 3
    epochs: int = 15
    probe: int = 256
    shares: tuple[float, ...] = SHARES
    settings: tuple[str, ...] = ("digits", "shapes")
    truths: tuple[str, ...] = tuple(TRUTHS)
    compare: bool = False  # also analyse with class_conditional=False


@dataclass
class Trained:
    model: torch.nn.Module
    px: torch.Tensor
    py: torch.Tensor
    truth: np.ndarray
    train_acc: float
    val_acc: float


def train(setting: str, truth: str | None, share: float, seed: int, cfg: Config) -> Trained:
    spec = SETTINGS[setting]
    kwargs = {TRUTHS[truth]: share} if truth else {}
    xtr, ytr, xva, yva, planted = spec["data"](seed=seed, **kwargs)
    probe = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(1000 + seed))[: cfg.probe]
    model = SmallCNN(**spec["model"])
    key = f"{setting}-{truth or 'control'}-{share}-{seed}-{cfg.epochs}.pt"
    path = CACHE / key.replace(" ", "_")
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        torch.manual_seed(seed)
        model = SmallCNN(**spec["model"])
        train_plain(model, xtr, ytr, epochs=cfg.epochs, seed=seed)
        CACHE.mkdir(exist_ok=True)
        torch.save(model.state_dict(), path)
    model.eval()
    return Trained(
        model, xtr[probe], ytr[probe], planted[probe].numpy(), accuracy(model, xtr, ytr), accuracy(model, xva, yva)
    )


def precision_at_k(truth: np.ndarray, ranked: list[int]) -> float | None:
    k = int(truth.sum())
    return float(truth[ranked[:k]].sum() / k) if k else None


def ranked_by(score: np.ndarray) -> list[int]:
    return np.argsort(-score, kind="stable").tolist()


def class_selective_share(report: AnalysisReport, labels: np.ndarray) -> float | None:
    """Share of anomaly filters whose tiny cluster is >= 80% one label and holds >= 50% of that label."""
    per_class = np.bincount(labels, minlength=labels.max() + 1)
    flagged = selective = 0
    for lr in report.layers.values():
        idx = lr.anomaly.nonzero().flatten()
        if not idx.numel():
            continue
        masks = lr.small_cluster_masks(idx).numpy()
        for m in masks:
            flagged += 1
            counts = np.bincount(labels[m], minlength=len(per_class))
            top = int(counts.argmax())
            if counts[top] >= 0.8 * m.sum() and counts[top] >= 0.5 * per_class[top]:
                selective += 1
    return selective / flagged if flagged else None


def penultimate(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.flatten(model.features(x), 1)


def activation_clustering(feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class: ICA-free variant of Chen et al. 2018 - PCA to 10-D, 2-means; score = smaller cluster membership."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    score = np.zeros(len(labels))
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        if len(idx) < 4:
            continue
        z = PCA(n_components=min(10, len(idx) - 1), random_state=0).fit_transform(feats[idx])
        lab = KMeans(2, n_init=10, random_state=0).fit_predict(z)
        sizes = np.bincount(lab, minlength=2)
        small = int(sizes.argmin())
        # Rank by how small the cluster is relative to its class (AC flags by relative size).
        score[idx[lab == small]] = 1.0 - sizes[small] / len(idx)
    return score


def spectral_signatures(feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per class: squared projection of centred representations on the top singular vector."""
    score = np.zeros(len(labels))
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        if len(idx) < 2:
            continue
        r = feats[idx] - feats[idx].mean(0)
        v = np.linalg.svd(r, full_matrices=False)[2][0]
        s = (r @ v) ** 2
        score[idx] = s / (s.max() + 1e-12)
    return score


def baselines(t: Trained, report: AnalysisReport) -> dict[str, np.ndarray]:
    with torch.no_grad():
        logits = t.model(t.px)
        loss = torch.nn.functional.cross_entropy(logits, t.py, reduction="none")
        el2n = (logits.softmax(-1) - torch.nn.functional.one_hot(t.py, logits.shape[-1])).norm(dim=-1)
    feats = penultimate(t.model, t.px).numpy()
    labels = t.py.numpy()
    assert report.grad_norms is not None
    return {
        "loss": loss.numpy(),
        "EL2N": el2n.numpy(),
        "GraNd": report.grad_norms.numpy(),
        "AC": activation_clustering(feats, labels),
        "SS": spectral_signatures(feats, labels),
    }


def judge(report: AnalysisReport, t: Trained) -> dict[str, Any]:
    k = int(t.truth.sum())
    top = report.top_outliers(max(k, 10))
    out_set = np.zeros(len(t.truth), dtype=bool)
    out_set[report.outlier_indices] = True
    scores = report.outlier_scores.numpy() if report.outlier_scores is not None else np.zeros(len(t.truth))
    tp = int((out_set & t.truth).sum())
    return {
        "precision_at_k": precision_at_k(t.truth, top),
        "set_size": int(out_set.sum()),
        "set_precision": tp / out_set.sum() if out_set.any() else None,
        "set_recall": tp / k if k else None,
        "auroc": float(roc_auc_score(t.truth, scores)) if 0 < k < len(t.truth) and scores.std() > 0 else None,
        "anomaly_count": report.anomaly_count,
        "anomaly_fraction": report.anomaly_count / max(1, report.n_filters),
        "class_selective_share": class_selective_share(report, t.py.numpy()),
    }


def stability(model: torch.nn.Module, px: torch.Tensor, py: torch.Tensor, crit: AnomalyCriteria) -> dict[str, Any]:
    start = time.perf_counter()
    reports = [analyze(model, px, py, criteria=crit, seed=s) for s in (0, 1, 2)]
    seconds = (time.perf_counter() - start) / 3
    sets = [{(n, int(i)) for n, lr in r.layers.items() for i in lr.anomaly_indices} for r in reports]
    tops = [set(r.top_outliers(10)) for r in reports]
    pairs = [(0, 1), (0, 2), (1, 2)]
    # Two empty flag sets agree perfectly.
    jac = [len(sets[a] & sets[b]) / len(sets[a] | sets[b]) if sets[a] | sets[b] else 1.0 for a, b in pairs]
    overlap = [len(tops[a] & tops[b]) for a, b in pairs]
    return {"jaccard": jac, "top10_overlap": overlap, "counts": [len(s) for s in sets], "seconds": seconds}


def _scaled(v: np.ndarray) -> np.ndarray:
    return v / v.max() if v.max() > 0 else v


#: Ways to combine the class-conditional (a) and global (b) views' raw scores into one ranking;
#: the package uses "root, scaled, added" (`score_outliers`).
COMBINATIONS = {
    "sum, scaled, added": lambda a, b: _scaled(a) + _scaled(b),
    "root, scaled, added": lambda a, b: _scaled(np.sqrt(a)) + _scaled(np.sqrt(b)),
    "ranks added": lambda a, b: (a.argsort().argsort() * (a > 0) + b.argsort().argsort() * (b > 0)).astype(float),
    "maximum of scaled": lambda a, b: np.maximum(_scaled(a), _scaled(b)),
    "class-conditional only": lambda a, b: a,
    "global only": lambda a, b: b,
}


def combinations(report: AnalysisReport, truth: np.ndarray) -> dict[str, float | None]:
    """precision@k of each way to combine the report's two views (its layers' `score_parts`)."""
    parts = torch.stack([lr.score_parts for lr in report.layers.values()]).sum(0).numpy()
    if parts.shape[0] < 2:
        return {}
    out = {}
    for name, combine in COMBINATIONS.items():
        score = combine(parts[0], parts[1])
        out[name] = precision_at_k(truth, [i for i in ranked_by(score) if score[i] > 0])
    return out


#: Separation floors of the outlier score compared in the sweep (`AnomalyCriteria.score_separation`).
FLOORS = (0.0, 2.0, 3.0, 4.0, 5.0)


def floor_sweep(cfg: Config) -> list[dict[str, Any]]:
    """precision@k of the default analysis under each separation floor, on seeds 0 .. 2 * cfg.seeds - 1."""
    rows = []
    for setting in cfg.settings:
        for truth in ("G2 backdoor", "G3 rare"):
            for share in cfg.shares:
                for seed in range(2 * cfg.seeds):
                    t = train(setting, truth, share, seed, cfg)
                    k = int(t.truth.sum())
                    if not k:
                        continue
                    row: dict[str, Any] = {"setting": setting, "truth": truth, "share": share, "seed": seed}
                    for floor in FLOORS:
                        r = analyze(t.model, t.px, t.py, criteria=AnomalyCriteria(score_separation=floor), seed=0)
                        row[f"{floor:g}"] = precision_at_k(t.truth, r.top_outliers(k))
                    rows.append(row)
    return rows


def held_out(cfg: Config) -> list[dict[str, Any]]:
    """The combinations on models of seeds no choice was made on (2 * cfg.seeds .. 3 * cfg.seeds - 1)."""
    rows = []
    for setting in cfg.settings:
        for truth in ("G2 backdoor", "G3 rare"):
            for share in cfg.shares:
                for seed in range(2 * cfg.seeds, 3 * cfg.seeds):
                    t = train(setting, truth, share, seed, cfg)
                    if t.truth.sum():
                        r = analyze(t.model, t.px, t.py, seed=0)
                        rows.append(
                            {
                                "setting": setting,
                                "truth": truth,
                                "share": share,
                                "seed": seed,
                                **combinations(r, t.truth),
                            }
                        )
    return rows


VARIANTS = ("default", "one view", "global PCA", "no targets")
STABILITY_MODELS = (
    ("digits", "G2 backdoor", 0.03),
    ("digits", "G1 label noise", 0.10),
    ("shapes", "G3 rare", 0.05),
    ("shapes", "G2 backdoor", 0.10),
)
BASELINES = ("loss", "EL2N", "GraNd", "AC", "SS")
#: The default first; two initialisations beside it show what consensus over initialisations buys and costs.
STABILITY_N_INIT = (AnomalyCriteria().n_init, 2)


def run(cfg: Config) -> dict[str, Any]:
    rows = []
    start = time.time()
    # Label noise stays a loss-based task (see the table): one share is enough to show it.
    runs = [(s, tr, sh) for s in cfg.settings for tr in cfg.truths for sh in cfg.shares if tr != "G1 label noise"]
    runs += [(s, "G1 label noise", 0.10) for s in cfg.settings]
    runs += [(s, None, 0.0) for s in cfg.settings]
    for setting, truth, share in runs:
        for seed in range(cfg.seeds):
            t = train(setting, truth, share, seed, cfg)
            reports = {"default": analyze(t.model, t.px, t.py, seed=0)}
            reports["one view"] = analyze(t.model, t.px, t.py, criteria=AnomalyCriteria(global_view=False), seed=0)
            if cfg.compare:
                crit = AnomalyCriteria(class_conditional=False)
                reports["global PCA"] = analyze(t.model, t.px, t.py, criteria=crit, seed=0)
            reports["no targets"] = analyze(t.model, t.px, seed=0)
            row: dict[str, Any] = {
                "setting": setting,
                "truth": truth or "C control",
                "share": share,
                "seed": seed,
                "planted_in_probe": int(t.truth.sum()),
                "gap": t.train_acc - t.val_acc,
                "seconds": reports["default"].seconds,
                "seconds_one_view": reports["one view"].seconds,
                "combinations": combinations(reports["default"], t.truth),
                "variants": {name: judge(r, t) for name, r in reports.items()},
                "baselines": {
                    n: precision_at_k(t.truth, ranked_by(s)) for n, s in baselines(t, reports["default"]).items()
                },
            }
            rows.append(row)
            v = row["variants"]["default"]
            print(
                f"[{time.time() - start:5.0f}s] {setting} {row['truth']} {share:.2f} seed {seed}: p@k {v['precision_at_k']} "
                f"flags {v['anomaly_count']} cs {v['class_selective_share']} | base {row['baselines']}",
                flush=True,
            )
    stab = []
    # Seed 0's models and, held out, seed 6's; each with the default n_init and with two initialisations.
    for seed in (0, 2 * cfg.seeds):
        for setting, truth, share in STABILITY_MODELS:
            t = train(setting, truth, share, seed, cfg)
            for n_init in STABILITY_N_INIT:
                crit = AnomalyCriteria(n_init=n_init)
                entry = {"model": f"{setting} {truth} {share:.0%} (model seed {seed})", "n_init": n_init}
                stab.append({**entry, **stability(t.model, t.px, t.py, crit)})
                print(stab[-1], flush=True)
    held = held_out(cfg)
    floors = floor_sweep(cfg)
    return {
        "config": {"seeds": cfg.seeds, "epochs": cfg.epochs, "probe": cfg.probe},
        "rows": rows,
        "stability": stab,
        "held_out": held,
        "floors": floors,
    }


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def render(result: dict[str, Any]) -> str:
    rows = result["rows"]
    cfg = result["config"]
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["truth"], r["share"]), []).append(r)
    out = [
        "## Flags that mean something (issue 12): `python experiments/flags.py`",
        "",
        f"SmallCNN trained {cfg['epochs']} epochs per run, {cfg['seeds']} seeds, a uniform probe of {cfg['probe']} training "
        "samples with their (possibly planted) labels. Primary column: precision@k of `top_outliers(k)`, k = planted "
        "samples in the probe (mean over seeds). The default score adds two views of every filter: its maps with "
        "each class's mean removed (class-conditional) and with only the probe's mean removed (global); `one view`: "
        "`global_view=False`, the class-conditional view alone; `no targets`: `analyze` without labels (one global "
        "view, label-free bound). Baselines are "
        "precision@k of their own rankings: per-sample loss, EL2N, GraNd, Activation Clustering (AC) and Spectral "
        "Signatures (SS) on the penultimate activations, per class. Base rate: the planted share of the probe. "
        "`set P/R`: precision and recall of the outlier set (members of anomaly filters' tiny clusters) at its own "
        "size. `flags`: anomaly filters (mean); `cs`: class-selective share of them (tiny cluster >= 80% one label "
        "and >= 50% of that label's probe samples).",
        "",
        "| setting | truth | share | k | p@k default | p@k one view | p@k no targets | best baseline | base rate "
        "| set P/R | AUROC | flags | cs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (setting, truth, share), rs in groups.items():
        d = [r["variants"]["default"] for r in rs]
        best = max(BASELINES, key=lambda b: _mean([r["baselines"][b] for r in rs]) or 0.0)
        k = _mean([r["planted_in_probe"] for r in rs]) or 0.0
        out.append(
            f"| {setting} | {truth} | {share:.0%} | {k:.1f} | **{_fmt(_mean([x['precision_at_k'] for x in d]))}** "
            f"| {_fmt(_mean([r['variants']['one view']['precision_at_k'] for r in rs]))} "
            f"| {_fmt(_mean([r['variants']['no targets']['precision_at_k'] for r in rs]))} "
            f"| {best} {_fmt(_mean([r['baselines'][best] for r in rs]))} | {k / cfg['probe']:.2f} "
            f"| {_fmt(_mean([x['set_precision'] for x in d]))}/{_fmt(_mean([x['set_recall'] for x in d]))} "
            f"| {_fmt(_mean([x['auroc'] for x in d]))} | {_mean([x['anomaly_count'] for x in d]):.1f} "
            f"| {_fmt(_mean([x['class_selective_share'] for x in d]))} |"
        )
    ctrl = [r for r in rows if r["truth"] == "C control"]
    out += [
        "",
        "Clean control, anomaly filters as a share of analysed filters ("
        + " / ".join(VARIANTS)
        + "): "
        + ", ".join(
            f"{r['setting']} seed {r['seed']}: "
            + " / ".join(f"{r['variants'][v]['anomaly_fraction']:.3f}" if v in r["variants"] else "-" for v in VARIANTS)
            for r in ctrl
        )
        + ".",
        "",
        "Stability across clustering seeds 0/1/2 (same model and probe): flag-set Jaccard and top-10 overlap per "
        "pair of seeds (two empty flag sets count as Jaccard 1), with the default `n_init` and with two "
        "initialisations (the best likelihood kept); seconds per analysis. Model seed 6 played no part in choosing the "
        "default `n_init`. The score's member ranking (a member adds `sep * (sep + d) / 2`, half its cluster's "
        "separation and half its own distance) was chosen on the overlap and precision@k of models of seeds 0, 1 and "
        "6 in a one-off script, against 0, a quarter and all of its own distance.",
        "",
        "| model | n_init | Jaccard | top-10 overlap | flags per seed | s per analysis |",
        "|---|---|---|---|---|---|",
    ]
    for s in result["stability"]:
        out.append(
            f"| {s['model']} | {s['n_init']} | {', '.join(f'{j:.2f}' for j in s['jaccard'])} | "
            f"{', '.join(str(o) for o in s['top10_overlap'])} | {', '.join(str(c) for c in s['counts'])} | "
            f"{s['seconds']:.2f} |"
        )
    base_s, other_s = (
        float(np.median([s["seconds"] for s in result["stability"] if s["n_init"] == n])) for n in STABILITY_N_INIT
    )
    out += [
        "",
        f"Median seconds per analysis: {base_s:.2f} with n_init={STABILITY_N_INIT[0]} (the default), {other_s:.2f} "
        f"with n_init={STABILITY_N_INIT[1]} (x{other_s / base_s:.2f}).",
    ]
    secs = [r["seconds"] for r in rows]
    one = [r["seconds_one_view"] for r in rows]
    out += [
        "",
        f"Median analysis time with gradient norms, per probe of {cfg['probe']}: {np.median(secs):.2f} s with both "
        f"views (the default), {np.median(one):.2f} s with one view (`global_view=False`), x{np.median(secs) / np.median(one):.2f}.",
        "",
        *_combination_table(rows, result.get("held_out", []), cfg),
        "",
        *_floor_table(result.get("floors", []), result.get("held_out", []), cfg),
        "",
        *_targets(result),
    ]
    return "\n".join(out) + "\n"


def _combination_table(rows: list[dict[str, Any]], held: list[dict[str, Any]], cfg: dict[str, Any]) -> list[str]:
    """precision@k of each way to combine the views, per planted group and share, on the seeds above and held out."""
    cols = [(s, t, sh) for s in ("digits", "shapes") for t in ("G2 backdoor", "G3 rare") for sh in SHARES]
    head = " | ".join(f"{s[0]} {t[:2]} {sh:.0%}" for s, t, sh in cols)
    out = [
        "How the two views are combined: precision@k (mean over seeds) of each combination of the views' raw scores, "
        f"on the models above (seeds 0-{cfg['seeds'] - 1}, where the package's choice was made) and on models of "
        f"seeds {2 * cfg['seeds']}-{3 * cfg['seeds'] - 1} that played no part in choosing it (held out; they were seen "
        "when `class_coverage` was raised to 0.7, and seed 6 when the member ranking was chosen). The package "
        "uses `root, scaled, added`.",
        "",
        f"| combination | models | {head} |",
        "|---|---|" + "---|" * len(cols),
    ]
    for name in COMBINATIONS:
        for label, source in (("seeds above", [{**r["combinations"], **r} for r in rows]), ("held out", held)):
            cells = []
            for s, t, sh in cols:
                v = [r.get(name) for r in source if (r["setting"], r["truth"], r["share"]) == (s, t, sh)]
                cells.append(_fmt(_mean(v)))
            out.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return out


def _floor_table(floors: list[dict[str, Any]], held: list[dict[str, Any]], cfg: dict[str, Any]) -> list[str]:
    """precision@k of the default under each separation floor (the sweep), and the default on held-out seeds."""
    if not floors:
        return []
    cols = [(s, t, sh) for s in ("digits", "shapes") for t in ("G2 backdoor", "G3 rare") for sh in SHARES]
    head = " | ".join(f"{s[0]} {t[:2]} {sh:.0%}" for s, t, sh in cols)
    out = [
        "The outlier score's separation floor (`score_separation`): precision@k (mean over seeds "
        f"0-{2 * cfg['seeds'] - 1}, where the floor was chosen) for each floor, and the default (floor 3) on held-out "
        f"seeds {2 * cfg['seeds']}-{3 * cfg['seeds'] - 1}. A tail cut from one Gaussian blob scores 2-3.",
        "",
        f"| floor | seeds | {head} |",
        "|---|---|" + "---|" * len(cols),
    ]

    def cell(source: list[dict[str, Any]], key: str, col: tuple[str, str, float]) -> str:
        return _fmt(_mean([r.get(key) for r in source if (r["setting"], r["truth"], r["share"]) == col]))

    for floor in FLOORS:
        out.append(
            f"| {floor:g} | 0-{2 * cfg['seeds'] - 1} | "
            + " | ".join(cell(floors, f"{floor:g}", c) for c in cols)
            + " |"
        )
    out.append(
        f"| 3 (default) | {2 * cfg['seeds']}-{3 * cfg['seeds'] - 1} held out | "
        + " | ".join(cell(held, "root, scaled, added", c) for c in cols)
        + " |"
    )
    return out


def _targets(result: dict[str, Any]) -> list[str]:
    """Issue 12's targets, met or not, from the numbers above."""
    rows, stab = result["rows"], result["stability"]

    def pak(setting: str, truth: str, share: float) -> float:
        return (
            _mean(
                [
                    r["variants"]["default"]["precision_at_k"]
                    for r in rows
                    if (r["setting"], r["truth"], r["share"]) == (setting, truth, share)
                ]
            )
            or 0.0
        )

    lines = ["Targets (issue 12), default settings:", ""]
    for truth, bar in (("G2 backdoor", 0.5), ("G3 rare", 0.8)):
        vals = {(s, sh): pak(s, truth, sh) for s in ("digits", "shapes") for sh in SHARES if 0.03 <= sh <= 0.15}
        worst = min(vals, key=lambda key: vals[key])
        ok = vals[worst] >= bar
        lines.append(
            f"- {truth}, precision@k >= {bar} at every share from 3% to 15%, both settings: "
            f"**{'met' if ok else 'not met'}** (lowest {vals[worst]:.2f}, {worst[0]} {worst[1]:.0%})."
        )
    held = result.get("held_out", [])
    for truth, bar in (("G2 backdoor", 0.5), ("G3 rare", 0.8)):
        cells = {
            (s, sh): _mean(
                [r["root, scaled, added"] for r in held if (r["setting"], r["truth"], r["share"]) == (s, truth, sh)]
            )
            for s in ("digits", "shapes")
            for sh in SHARES
            if 0.03 <= sh <= 0.15
        }
        known = {key: v for key, v in cells.items() if v is not None}
        if known:
            worst = min(known, key=lambda key: known[key])
            lines.append(
                f"- The same on held-out seeds (seen only for `class_coverage` and the member ranking): {truth} "
                f"**{'met' if known[worst] >= bar else 'not met'}** (lowest {known[worst]:.2f}, {worst[0]} {worst[1]:.0%})."
            )
    cs = [r["variants"]["default"]["class_selective_share"] for r in rows]
    cs_max = max((c for c in cs if c is not None), default=0.0)
    lines.append(
        f"- Class-selective share of anomaly flags <= 10% in every setting: **{'met' if cs_max <= 0.1 else 'not met'}** (largest {cs_max:.2f})."
    )
    ctrl = [r["variants"]["default"]["anomaly_fraction"] for r in rows if r["truth"] == "C control"]
    lines.append(
        f"- Clean control, anomaly filters <= 2% of analysed filters: **{'met' if max(ctrl, default=0) <= 0.02 else 'not met'}** (largest {max(ctrl, default=0):.3f})."
    )
    other = [s for s in stab if s["n_init"] == STABILITY_N_INIT[1]]
    stab = [s for s in stab if s["n_init"] == STABILITY_N_INIT[0]]
    jac = min(j for s in stab for j in s["jaccard"])
    ovl = min(o for s in stab for o in s["top10_overlap"])
    lines.append(
        f"- Stability across clustering seeds, flag-set Jaccard >= 0.8: **{'met' if jac >= 0.8 else 'not met'}** (lowest {jac:.2f})."
    )
    lines.append(
        f"- Stability across clustering seeds, top-10 overlap >= 8: **{'met' if ovl >= 8 else 'not met'}** (lowest {ovl})."
    )
    if other:
        o_jac = min(j for s in other for j in s["jaccard"])
        o_ovl = min(o for s in other for o in s["top10_overlap"])
        lines.append(
            f"  - With n_init={STABILITY_N_INIT[1]} instead: Jaccard lowest {o_jac:.2f}, top-10 overlap lowest {o_ovl} "
            "(a Jaccard of 0 can be one flag that one seed of three adds to sets otherwise empty)."
        )
    below = []
    for r in rows:
        p = r["variants"]["default"]["precision_at_k"]
        if p is not None and p < r["planted_in_probe"] / result["config"]["probe"]:
            below.append(f"{r['setting']} {r['truth']} {r['share']:.0%} seed {r['seed']}")
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["truth"], r["share"]), []).append(r)
    below_rows = []
    for (setting, truth, share), rs in groups.items():
        mean = _mean([r["variants"]["default"]["precision_at_k"] for r in rs])
        base = (_mean([r["planted_in_probe"] for r in rs]) or 0.0) / result["config"]["probe"]
        if mean is not None and mean < base:
            below_rows.append(f"{setting} {truth} {share:.0%}")
    lines.append(
        f"- Never below the base rate, per row of the table (mean over seeds): **{'met' if not below_rows else 'not met'}**"
        + (f" ({', '.join(below_rows)})." if below_rows else ".")
        + f" Per run: {len(below)} of {len(rows)} runs fall below it"
        + (f" ({', '.join(below)})." if below else ".")
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--probe", type=int, default=256)
    parser.add_argument("--compare", action="store_true", help="also analyse with class_conditional=False")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs")
    parser.add_argument("--render-only", action="store_true", help="re-render docs from experiments/flags.json")
    args = parser.parse_args()
    path = Path(__file__).with_name("flags.json")
    if args.render_only:
        result = json.loads(path.read_text())
    else:
        result = run(Config(seeds=args.seeds, epochs=args.epochs, probe=args.probe, compare=args.compare))
        path.write_text(json.dumps(result, indent=1))
    (args.out / "FLAGS.md").write_text(render(result))
    print(json.dumps({"runs": len(result["rows"]), "stability": result["stability"]}))


if __name__ == "__main__":
    main()
