"""Files a monitored run leaves beside its log, and which probe samples the report shows.

A bottom-layer module (torch only): the callback writes these files, the report and the CLI read
them, and neither side imports the other.

* :data:`HISTORY_FILE`: the JSON history, one entry per analysis.
* :data:`PROBE_FILE`: the whole probe at full size (``save_probe=True``).
* :data:`THUMBNAILS_FILE`: small uint8 thumbnails of only the samples the report shows, written
  with the history at each analysis by default, so the report has images at a bounded cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

HISTORY_FILE = "anomaly_history.json"
PROBE_FILE = "anomaly_probe.pt"
THUMBNAILS_FILE = "anomaly_thumbnails.pt"

#: Samples of the report's gallery (``top_outliers`` at the last analysis).
GALLERY_SIZE = 16
#: Filters drawn in the report's PCA scatters, and tiny-cluster images shown beside each.
SCATTER_FILTERS = 8
IMAGES_PER_FILTER = 4
#: Longest side of a thumbnail, in pixels.
THUMBNAIL_SIDE = 64


def scatter_picks(last_report: dict[str, Any], most: int = SCATTER_FILTERS) -> list[tuple[float, dict, int, int]]:
    """Filters whose 2-D points the report draws: anomaly filters first, then by separation.

    Args:
        last_report: ``AnalysisReport.to_dict(tensors="list")`` of the last analysis.
        most: How many filters.

    Returns:
        ``(strength, layer dict, point row, filter index)`` per chosen filter.
    """
    picks = []
    for layer in last_report.get("layers", []):
        seps = layer.get("separation")
        for j, f in enumerate(layer.get("point_filters") or []):
            strength = seps[f] if seps is not None else layer["ch"][f]
            if strength is not None:
                picks.append((bool(layer["anomaly"][f]), float(strength), layer, j, f))
    picks.sort(key=lambda t: (not t[0], -t[1]))
    return [(s, layer, j, f) for _, s, layer, j, f in picks[:most]]


def tiny_members(point_labels: Sequence[int]) -> list[int]:
    """Probe positions in the smallest non-empty cluster of one filter's point labels."""
    labels = torch.as_tensor(point_labels, dtype=torch.long)
    counts = torch.bincount(labels.clamp_min(0))
    counts = torch.where(counts > 0, counts, torch.full_like(counts, labels.numel() + 1))
    return (labels == int(counts.argmin())).nonzero().flatten().tolist()


def scatter_images(
    picks: Sequence[tuple[float, dict, int, int]], per_filter: int = IMAGES_PER_FILTER
) -> list[list[int]]:
    """Which tiny-cluster members to show beside each picked filter's scatter.

    Members not shown beside an earlier scatter come first, so filters that single out the same group
    show different samples of it rather than the same few again.

    Example::

        >>> picks = [(9.0, {"point_labels": [[0, 1, 1, 0, 1]]}, 0, 3), (8.0, {"point_labels": [[1, 0, 0, 1, 0]]}, 0, 4)]
        >>> scatter_images(picks, per_filter=1)
        [[0], [3]]
    """
    seen: set[int] = set()
    out = []
    for _, layer, j, _ in picks:
        members = tiny_members(layer["point_labels"][j])
        chosen = ([m for m in members if m not in seen] + [m for m in members if m in seen])[:per_filter]
        seen.update(chosen)
        out.append(chosen)
    return out


def shown_samples(last_report: dict[str, Any] | None, top_outliers: Sequence[int]) -> list[int]:
    """Probe positions whose images the report shows: the gallery and each scatter's tiny cluster."""
    shown = set(list(top_outliers)[:GALLERY_SIZE])
    if last_report:
        for images in scatter_images(scatter_picks(last_report)):
            shown.update(images)
    return sorted(shown)


def thumbnails(inputs: Tensor, side: int = THUMBNAIL_SIDE) -> Tensor:
    """Inputs ``(n, C, H, W)`` as uint8 images, each stretched to its own 0-255 range, at most ``side`` pixels.

    Example::

        >>> thumbnails(torch.randn(3, 1, 128, 96)).shape, thumbnails(torch.randn(3, 1, 128, 96)).dtype
        (torch.Size([3, 1, 64, 48]), torch.uint8)

    Non-image inputs (not 4-D) give ``(n, 0, 0, 0)``: nothing to show.
    """
    if inputs.ndim != 4 or inputs.shape[0] == 0:
        return torch.zeros((inputs.shape[0] if inputs.ndim else 0, 0, 0, 0), dtype=torch.uint8)
    x = inputs.detach().float().cpu()
    if x.shape[1] not in (1, 3):
        x = x[:, :1]  # feature planes, not colours: the first one
    h, w = x.shape[-2:]
    if max(h, w) > side:
        scale = side / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = torch.nn.functional.interpolate(x, size=size, mode="area")
    flat = x.flatten(1)
    low = flat.min(1).values.view(-1, 1, 1, 1)
    high = flat.max(1).values.view(-1, 1, 1, 1)
    x = torch.nan_to_num((x - low) / (high - low).clamp_min(1e-12), nan=0.0)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def thumbnail_document(
    inputs: Tensor, targets: Tensor | None, dataset_indices: Sequence[int] | None, positions: Sequence[int]
) -> dict[str, Any]:
    """What :data:`THUMBNAILS_FILE` holds: thumbnails, targets and dataset indices of ``positions``."""
    rows = torch.as_tensor(list(positions), dtype=torch.long)
    return {
        "positions": rows.tolist(),
        "images": thumbnails(inputs[rows.to(inputs.device)]),
        "targets": None if targets is None else targets[rows.to(targets.device)].detach().cpu(),
        "indices": None if dataset_indices is None else [int(dataset_indices[i]) for i in rows.tolist()],
    }


def samples_from_thumbnails(doc: dict[str, Any]) -> dict[str, Any]:
    """A probe-like view of a thumbnail document, indexed by probe position like the full probe."""
    positions = list(doc["positions"])
    targets, indices = doc.get("targets"), doc.get("indices")
    return {
        "inputs": {p: doc["images"][r] for r, p in enumerate(positions)},
        "targets": None if targets is None else {p: targets[r] for r, p in enumerate(positions)},
        "indices": None if indices is None else {p: indices[r] for r, p in enumerate(positions)},
    }
