"""A self-contained HTML report (or PNG plots) from a run's saved anomaly history."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Literal

import torch

from lightning_anomaly.artifacts import (
    GALLERY_SIZE,
    HISTORY_FILE,
    IMAGES_PER_FILTER,
    PROBE_FILE,
    THUMBNAILS_FILE,
    samples_from_thumbnails,
    scatter_images,
    scatter_picks,
    tiny_members,
)
from lightning_anomaly.history import read_history

__all__ = ["build_report", "find_history"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "the report needs matplotlib, an optional extra: pip install 'lightning-anomaly[viz]'"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def find_history(run_dir: str | Path) -> Path:
    """The ``anomaly_history.json`` in ``run_dir`` (or the newest one below it).

    Raises:
        FileNotFoundError: ``run_dir`` does not exist or holds no history.
    """
    root = Path(run_dir)
    if root.is_file() and root.suffix in (".json", ".ckpt"):
        return root
    if not root.exists():
        raise FileNotFoundError(f"run directory {str(root)!r} does not exist")
    found = sorted(root.rglob(HISTORY_FILE), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no {HISTORY_FILE} under {str(root)!r}; it is written by AnomalyFilterCallback into the Trainer's log "
            "directory (history_file=...)"
        )
    return found[-1]


def _ch_over_epochs(plt: Any, history: list[dict[str, Any]], epochs: list[int] | None) -> Any:
    """log10-CH histograms per layer at a few epochs (first, middle, last analysis by default)."""
    with_hist = [h for h in history if h.get("layer_ch_hist")]
    if not with_hist:
        return None
    if epochs:
        chosen = [h for h in with_hist if h["epoch"] in set(epochs)]
        missing = sorted(set(epochs) - {h["epoch"] for h in chosen})
        if missing:
            raise ValueError(f"no analysis at epochs {missing}; analysed epochs: {[h['epoch'] for h in with_hist]}")
    else:
        picks = sorted({0, len(with_hist) // 2, len(with_hist) - 1})
        chosen = [with_hist[i] for i in picks]
    layers = list(chosen[-1]["layer_ch_hist"])[:12]
    fig, axes = _grid(plt, len(layers), 4, (2.8, 2.4))
    for ax, layer in zip(axes, layers, strict=True):
        for i, h in enumerate(chosen):
            hist = h["layer_ch_hist"].get(layer)
            if hist:
                ax.stairs(hist["counts"], hist["edges"], color=f"C{i}", label=f"epoch {h['epoch']}")
        ax.set_title(layer, fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle("log10 CH per filter, by layer, at chosen epochs", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def _grid(plt: Any, n: int, max_cols: int, cell: tuple[float, float]) -> tuple[Any, list[Any]]:
    """A figure of ``n`` panels in rows of at most ``max_cols``, each ``cell`` inches; unused panels hidden."""
    cols = max(1, min(max_cols, n))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _integer_ticks() -> Any:
    """Epoch axes show whole epochs only (matplotlib would draw 1.2, 1.4, ... on short runs)."""
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _layer_sizes(doc: dict[str, Any]) -> dict[str, int]:
    """Filters per layer: from the last history entry, else the last report (older histories)."""
    history = doc.get("history") or [{}]
    if history[-1].get("layer_n_filters"):
        return {str(k): int(v) for k, v in history[-1]["layer_n_filters"].items()}
    last = doc.get("last_report") or {}
    return {layer["name"]: int(layer.get("n_filters") or len(layer["ch"])) for layer in last.get("layers", [])}


def _has(probe: dict[str, Any], i: int) -> bool:
    inputs = probe["inputs"]
    return i in inputs if isinstance(inputs, dict) else 0 <= i < len(inputs)


def _figures(
    doc: dict[str, Any], probe: dict[str, Any] | None, ch_epochs: list[int] | None = None, gallery: bool = True
) -> dict[str, Any]:
    plt = _pyplot()
    history = doc["history"]
    figs: dict[str, Any] = {}
    epochs = [h["epoch"] for h in history]
    prunes = [h["epoch"] for h in history if h.get("prune_event")]

    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.plot(epochs, [h["anomaly_count"] for h in history], "o-", color="C3", label="anomaly filters")
    ax.set_xlabel("epoch (0-based)")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel("anomaly filters", color="C3")
    ax2 = ax.twinx()
    for key, style in (("train_acc", "C0-"), ("val_acc", "C2-")):
        vals = [h.get("metrics", {}).get(key) for h in history]
        if any(v is not None for v in vals):
            ax2.plot(epochs, [math.nan if v is None else v for v in vals], style, label=key)
    ax2.set_ylabel("accuracy")
    for e in prunes:
        ax.axvline(e, color="k", ls=":", lw=1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    # Below the axes, so the legend never covers a line.
    ax.legend(
        lines[0] + lines2[0], lines[1] + lines2[1], loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=8
    )
    ax.set_title("anomaly filters vs accuracy" + (" (dotted: prune events)" if prunes else ""))
    fig.tight_layout()
    figs["curves"] = fig

    layers = list(history[-1]["layer_anomaly_counts"]) if history else []
    if layers:
        sizes = _layer_sizes(doc)
        grid = [
            [h["layer_anomaly_counts"].get(layer, 0) / max(1, sizes.get(layer, 1)) for h in history] for layer in layers
        ]
        known = all(layer in sizes for layer in layers)
        top = max(max(row) for row in grid)
        fig, ax = plt.subplots(figsize=(7, 0.4 * len(layers) + 1.5))
        im = ax.imshow(grid, aspect="auto", cmap="Reds", interpolation="nearest", vmin=0, vmax=max(top, 1e-9))
        ax.set_yticks(
            range(len(layers)),
            [f"{layer} ({sizes[layer]})" if layer in sizes else layer for layer in layers],
            fontsize=7,
        )
        ax.set_xticks(range(len(epochs)), epochs, fontsize=7)
        ax.set_xlabel("epoch (0-based)")
        if len(layers) * len(epochs) <= 400:  # each cell's value, so the darkest cells still read exactly
            for r, row in enumerate(grid):
                for c, value in enumerate(row):
                    if value > 0:
                        text = f"{value:.0%}" if known else f"{value:g}"
                        ax.text(c, r, text, ha="center", va="center", fontsize=6, color="w" if value > top / 2 else "k")
        fig.colorbar(im, ax=ax, label="share of the layer's filters" if known else "anomaly filters")
        ax.set_title("anomaly filters per layer (share of its filters; white = none)")
        fig.tight_layout()
        figs["layers"] = fig

    over_epochs = _ch_over_epochs(plt, history, ch_epochs)
    if over_epochs is not None:
        figs["ch_epochs"] = over_epochs

    last = doc.get("last_report")
    if last:
        # A grid: one row of 20 layers would be scaled down to unreadable.
        fig, axes = _grid(plt, len(last["layers"]), 4, (2.8, 2.4))
        for ax, layer in zip(axes, last["layers"], strict=True):
            ch = [c for c, d in zip(layer["ch"], layer["degenerate"], strict=True) if c is not None and not d and c > 0]
            flagged = [c for c, a in zip(layer["ch"], layer["anomaly"], strict=True) if a and c is not None and c > 0]
            if ch:
                ax.hist([math.log10(c) for c in ch], bins=20, color="C7")
            for c in flagged:
                ax.axvline(math.log10(c), color="C3", lw=1)
            ax.set_title(layer["name"], fontsize=8)
            ax.set_xlabel("log10 CH", fontsize=7)
        fig.suptitle("CH per filter at the last analysis (red: anomaly filters)", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.96))
        figs["ch"] = fig

    if last:
        scatter = _scatter(plt, last, probe)
        if scatter is not None:
            figs["filters"] = scatter

    out_g = [h.get("outlier_grad_norm") for h in history]
    norm_g = [h.get("normal_grad_norm") for h in history]
    if any(v is not None for v in out_g):
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(epochs, [math.nan if v is None else v for v in out_g], "o-", color="C3", label="outlier samples")
        ax.plot(epochs, [math.nan if v is None else v for v in norm_g], "o-", color="C0", label="other probe samples")
        ax.set_xlabel("epoch (0-based)")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.set_ylabel("mean per-sample gradient norm")
        ax.legend(fontsize=8)
        ax.set_title("gradient norms: outlier vs normal (the paper's H2)")
        figs["grads"] = fig

    if gallery and probe is not None and history and history[-1].get("top_outliers"):
        # The package's own ranking (AnalysisReport.top_outliers) at the last analysis.
        top = [i for i in list(history[-1]["top_outliers"])[:GALLERY_SIZE] if _has(probe, i)]
        if top:
            fig, axes = _grid(plt, len(top), 8, (1.3, 1.7))
            for ax, i in zip(axes, top, strict=True):
                _show(ax, probe, i)
            fig.suptitle("most suspicious probe samples at the last analysis (top_outliers)", fontsize=9)
            fig.tight_layout(rect=(0, 0, 1, 0.95), h_pad=1.2)
            figs["outliers"] = fig
    return figs


def _scatter(plt: Any, last: dict[str, Any], probe: dict[str, Any] | None = None) -> Any:
    """2-D points of the filters that single out samples most strongly, their tiny cluster in red, and its first images."""
    chosen = scatter_picks(last)
    if not chosen:
        return None
    shown = IMAGES_PER_FILTER if probe is not None else 0  # images of the tiny cluster beside each scatter
    if shown:
        rows, cols = len(chosen), 1 + shown
        size = (2.6 + 1.2 * shown, 2.3 * rows)
        ratios = [2.2] + [1] * shown
    else:  # no images: a grid of scatters, not one narrow column
        cols = min(4, len(chosen))
        rows = math.ceil(len(chosen) / cols)
        size, ratios = (2.6 * cols, 2.4 * rows), [1] * cols
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, gridspec_kw={"width_ratios": ratios})
    for ax in axes.flat:
        ax.axis("off")
    slots = [list(row) for row in axes] if shown else [[ax] for ax in axes.flat]
    images = scatter_images(chosen)
    for row, (ratio, layer, j, f), picked in zip(slots, chosen, images, strict=False):
        ax = row[0]
        pts = torch.tensor(layer["points"][j], dtype=torch.float32)
        members = tiny_members(layer["point_labels"][j])
        tiny = torch.zeros(pts.shape[0], dtype=torch.bool)
        tiny[members] = True
        x = pts[:, 0]
        y = pts[:, 1] if pts.shape[1] > 1 else torch.zeros_like(x)
        ax.axis("on")
        ax.scatter(x[~tiny], y[~tiny], s=6, color="C7")
        ax.scatter(x[tiny], y[tiny], s=14, color="C3")
        ax.set_title(f"{layer['name']} #{f}: separation {ratio:.1f}, {len(members)} in red", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
        if probe is not None:
            for img_ax, i in zip(row[1:], [i for i in picked if _has(probe, i)], strict=False):
                _show(img_ax, probe, i)
    fig.suptitle(
        "filters that single samples out most (anomaly filters first): PCA space, tiny cluster in red", fontsize=9
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig


def _image(probe: dict[str, Any], i: int) -> Any:
    """Probe image ``i`` as an ``(H, W)`` or ``(H, W, 3)`` array in [0, 1]."""
    img = torch.as_tensor(probe["inputs"][i]).float()
    arr = img.permute(1, 2, 0) if img.ndim == 3 and img.shape[0] in (3, 4) else img.reshape(-1, *img.shape[-2:])[0]
    arr = (arr - arr.min()) / (arr.max() - arr.min() + 1e-12)
    return arr.numpy()


def _caption(probe: dict[str, Any], i: int) -> str:
    """``#<dataset index> y=<label>`` of probe sample ``i`` (what is known of it)."""
    targets, indices = probe.get("targets"), probe.get("indices")
    label = ""
    if targets is not None:
        t = torch.as_tensor(targets[i])
        if t.numel() == 1:
            label = f" y={t.item():g}" if t.is_floating_point() else f" y={int(t)}"
        elif t.ndim == 1:  # one-hot or scores: the class
            label = f" y={int(t.argmax())}"
    ds = f"probe {i}" if indices is None else f"#{indices[i]}"
    return f"{ds}{label}"


def _show(ax: Any, probe: dict[str, Any], i: int) -> None:
    """Probe image ``i`` on ``ax``, titled with its dataset index and label."""
    arr = _image(probe, i)
    ax.imshow(arr, cmap="gray" if arr.ndim == 2 else None)
    ax.set_title(_caption(probe, i), fontsize=7)
    ax.axis("off")


def _gallery_html(doc: dict[str, Any], probe: dict[str, Any] | None, source: str) -> str:
    """The ``top_outliers`` of the last analysis as captioned images (dataset index and label)."""
    top = list(doc["history"][-1].get("top_outliers") or [])[:GALLERY_SIZE]
    if probe is None:
        return (
            "<p class='hint'>No sample images: this run saved neither thumbnails nor the probe (newer runs "
            "write <code>anomaly_thumbnails.pt</code> beside the history; <code>save_probe=True</code> saves the "
            "whole probe).</p>"
        )
    shown = [i for i in top if _has(probe, i)]
    if not shown:
        return "<p class='hint'>The last analysis singled out no sample.</p>"
    plt = _pyplot()
    in_set = set(doc["history"][-1].get("outlier_indices") or [])
    cells = []
    for i in shown:
        buf = io.BytesIO()
        arr = _image(probe, i)
        plt.imsave(buf, arr, format="png", cmap="gray" if arr.ndim == 2 else None)
        b64 = base64.b64encode(buf.getvalue()).decode()
        cap = html.escape(_caption(probe, i))
        kind = "sample flagged" if i in in_set else "sample"
        cells.append(
            f'<figure class="{kind}"><img alt="{cap}" src="data:image/png;base64,{b64}"><figcaption>{cap}</figcaption></figure>'
        )
    flagged = sum(i in in_set for i in shown)
    return (
        f"<p>The package's ranking (<code>monitor.top_outliers()</code>, most suspicious first), "
        f"captioned with dataset index and label ({html.escape(source)}). Framed in red: the {flagged} of these "
        f"{len(shown)} that an anomaly filter's tiny cluster holds (the outlier set, {len(in_set)} samples in "
        "all); the others rank by their outlier score alone. The ranking is the score (how far the small clusters "
        "that hold a sample lie from the rest, over all filters and every k tried), not membership: a member of the outlier set that one weak "
        "filter holds can rank below samples that several filters nearly flag.</p>"
        f'<div class="gallery">{"".join(cells)}</div>'
    )


def _samples(history_path: Path) -> tuple[dict[str, Any] | None, str]:
    """The saved probe, else the thumbnails, beside a history; ``(None, "")`` when neither exists."""
    # Beside the history; for a checkpoint, also in the run's log directory above Lightning's checkpoints/.
    places = [history_path.parent]
    if history_path.suffix == ".ckpt":
        places.append(history_path.parent.parent)
    for place in places:
        if (place / PROBE_FILE).exists():
            return torch.load(place / PROBE_FILE, weights_only=True), PROBE_FILE
        if (place / THUMBNAILS_FILE).exists():
            return samples_from_thumbnails(torch.load(place / THUMBNAILS_FILE, weights_only=True)), THUMBNAILS_FILE
    return None, ""


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    fmt: Literal["html", "png"] = "html",
    epochs: list[int] | None = None,
) -> Path:
    """Turn a run's ``anomaly_history.json`` into one self-contained HTML file, or PNG plots.

    Args:
        run_dir: The run's log directory (or the history file itself).
        out: Output file (HTML) or directory (PNG); next to the history by default.
        fmt: ``"html"`` (images embedded) or ``"png"``.
        epochs: 0-based epochs (Lightning's current_epoch, as in the history) whose CH histograms to compare (first, middle and last by default).

    Returns:
        The HTML file or the PNG directory.

    Raises:
        FileNotFoundError: No history found.
        ValueError: The history holds no analysis yet, or none at the requested ``epochs``.
        ImportError: matplotlib is missing (the message names the extra to install).
    """
    path = find_history(run_dir)
    doc = read_history(path)
    if not doc["history"]:
        raise ValueError(f"{path} holds no analysis yet; run at least one epoch with AnomalyFilterCallback")
    probe, source = _samples(path)
    plt = _pyplot()
    figs = _figures(doc, probe, epochs, gallery=fmt == "png")
    if fmt == "png":
        target = Path(out) if out is not None else path.parent / "report_png"
        target.mkdir(parents=True, exist_ok=True)
        for name, fig in figs.items():
            (target / f"{name}.png").write_bytes(_png(fig))
            plt.close(fig)
        return target
    images = {name: base64.b64encode(_png(fig)).decode() for name, fig in figs.items()}
    for fig in figs.values():
        plt.close(fig)
    last = doc["history"][-1]
    crit = doc.get("criteria", {})
    rows = "".join(
        f"<tr><td>{h['epoch']}</td><td>{h['anomaly_count']}</td><td>{h['outlier_count']}</td>"
        f"<td>{_f(h.get('gradient_ratio'))}</td><td>{_f(h.get('metrics', {}).get('train_acc'))}</td>"
        f"<td>{_f(h.get('metrics', {}).get('val_acc'))}</td><td>{_event(h)}</td></tr>"
        for h in doc["history"]
    )
    body = "".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{b64}"></figure>' for name, b64 in images.items()
    )
    gallery = _gallery_html(doc, probe, source)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lightning-anomaly report</title>
<style>body{{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;color:#222}}
img{{max-width:100%}}table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
code{{background:#f4f4f4;padding:1px 4px}}
.gallery{{display:grid;grid-template-columns:repeat(auto-fill,minmax(96px,1fr));gap:10px}}
.sample.flagged img{{outline:3px solid #d62728}}
figure.sample{{margin:0;text-align:center}}figure.sample img{{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;border:1px solid #ddd}}
figcaption{{font-size:12px}}.hint{{color:#666}}</style></head><body>
<h1>Anomaly filters: {html.escape(str(path.parent))}</h1>
<p>{len(doc["history"])} analyses; last: <b>{last["anomaly_count"]}</b> anomaly filters of {last["n_filters"]},
{last["outlier_count"]} outlier probe samples, gradient ratio {_f(last.get("gradient_ratio"))}.
Criteria: <code>{html.escape(json.dumps(crit))}</code></p>
<h2>Most suspicious samples</h2>
{gallery}
{body}
<h2>History</h2><table><tr><th>epoch</th><th>anomaly filters</th><th>outliers</th><th>grad ratio</th><th>train acc</th><th>val acc</th><th>event</th></tr>{rows}</table>
<script>
// Lets a headless browser check that every embedded image decoded.
window.addEventListener("load", () => {{
  const imgs = Array.from(document.images);
  document.body.dataset.images = imgs.length;
  document.body.dataset.imagesLoaded = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
}});
</script>
</body></html>
"""
    target = Path(out) if out is not None else path.parent / "report.html"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page)
    return target


def _event(entry: dict[str, Any]) -> str:
    """The history table's event cell: how many filters were pruned, and why."""
    event = entry.get("prune_event")
    if not event:
        return ""
    reason = event.get("reason")
    return f"pruned {event['n_pruned']}" + (f" ({html.escape(str(reason))})" if reason else "")


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"
