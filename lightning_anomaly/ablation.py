"""``ablate_filters``: the paper's single-filter masking experiment as an API."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_anomaly.engine.masking import apply_channel_mask, find_following_batchnorm

__all__ = ["ablate_filters", "accuracy"]

Metric = Callable[[nn.Module, Iterable[Any]], float]
FilterSpec = Mapping[str, Sequence[int]] | Sequence[tuple[str, int]]


def accuracy(model: nn.Module, loader: Iterable[Any]) -> float:
    """Top-1 accuracy of ``model`` (eval mode, no grad) over ``(x, y, ...)`` batches of ``loader``."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = total = 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            correct += int((model(x).argmax(-1) == y).sum())
            total += int(y.numel())
    model.train(was)
    return correct / max(1, total)


def _as_pairs(filters: FilterSpec) -> list[tuple[str, int]]:
    if isinstance(filters, Mapping):
        return [(str(n), int(c)) for n, cs in filters.items() for c in cs]
    return [(str(n), int(c)) for n, c in filters]


def _masked_copy(model: nn.Module, pairs: Sequence[tuple[str, int]], batchnorms: Mapping[str, str]) -> nn.Module:
    clone = copy.deepcopy(model)
    convs = {n: m for n, m in clone.named_modules() if isinstance(m, nn.Conv2d)}
    by_layer: dict[str, list[int]] = {}
    for name, c in pairs:
        by_layer.setdefault(name, []).append(c)
    for name, channels in by_layer.items():
        keep = torch.ones(convs[name].out_channels, dtype=torch.bool)
        keep[channels] = False
        apply_channel_mask(clone, name, keep, batchnorms.get(name), allow_all=True)
    return clone


def ablate_filters(
    model: nn.Module,
    filters: FilterSpec,
    dataloaders: Mapping[str, Iterable[Any]],
    metric: Metric = accuracy,
    *,
    baseline: Literal["random", "l1"] | None = None,
    seed: int = 0,
    single: bool = True,
) -> dict[str, Any]:
    """Mask each given filter alone, then all together, on copies of ``model``; report metric changes.

    Masking is the same as :class:`~lightning_anomaly.AnomalyPruneCallback`'s (conv weight and bias
    and the BatchNorm that consumes the conv's output), so a masked channel outputs exactly zero.
    ``model`` itself is never changed.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(16, 2))
        >>> data = [(torch.randn(8, 1, 4, 4), torch.randint(0, 2, (8,)))]
        >>> out = ablate_filters(net, {"0": [1]}, {"val": data}, baseline="l1")
        >>> sorted(out)
        ['all', 'base', 'baseline', 'single']

    Args:
        model: A plain model (fold any ``torch.nn.utils.prune`` reparametrisation first).
        filters: ``{conv_name: [channels]}`` or ``[(conv_name, channel), ...]``.
        dataloaders: Named iterables of ``(x, y, ...)`` batches, e.g. ``{"train": ..., "val": ...}``.
        metric: ``(model, loader) -> float``; top-1 accuracy by default.
        baseline: Also mask as many ``"random"`` filters (private generator) or the lowest-L1-norm filters.
        seed: Seed of the random baseline.
        single: Evaluate each filter alone (one model copy per filter).

    Returns:
        ``base`` (metric per loader), ``single`` (per filter: ``delta`` per loader), ``all`` (``delta``
        with every given filter masked) and ``baseline`` (its filters and ``delta``, or ``None``).

    Raises:
        ValueError: An unknown conv name or channel, or an unknown baseline.
    """
    pairs = _as_pairs(filters)
    convs: dict[str, nn.Conv2d] = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for name, c in pairs:
        if name not in convs:
            raise ValueError(f"{name!r} is not an nn.Conv2d of the model; conv layers are: {list(convs)[:12]}")
        if not 0 <= c < convs[name].out_channels:
            raise ValueError(f"filter {c} of {name!r} does not exist: the layer has {convs[name].out_channels}")
    if baseline not in (None, "random", "l1"):
        raise ValueError(f"baseline must be None, 'random' or 'l1', got {baseline!r}")
    batchnorms = _batchnorms(model, dataloaders, convs)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {k: float(metric(m, loader)) for k, loader in dataloaders.items()}

    def delta(pairs_: Sequence[tuple[str, int]]) -> dict[str, float]:
        after = evaluate(_masked_copy(model, pairs_, batchnorms))
        return {k: after[k] - base[k] for k in base}

    base = evaluate(model)
    out: dict[str, Any] = {
        "base": base,
        "single": [],
        "all": {"n": len(pairs), "delta": delta(pairs)},
        "baseline": None,
    }
    if single:
        out["single"] = [{"layer": n, "filter": c, "delta": delta([(n, c)])} for n, c in pairs]
    if baseline is not None:
        chosen = _baseline_filters(convs, len(pairs), baseline, seed)
        out["baseline"] = {"kind": baseline, "filters": chosen, "delta": delta(chosen)}
    return out


def _batchnorms(
    model: nn.Module, dataloaders: Mapping[str, Iterable[Any]], convs: Mapping[str, nn.Module]
) -> dict[str, str]:
    loader = next(iter(dataloaders.values()), None)
    if loader is None:
        return {}
    with torch.random.fork_rng(devices=[]):  # a shuffling loader draws a seed
        batch = next(iter(loader))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x: Tensor = batch[0][:2].to(device)
    return find_following_batchnorm(model, x, convs)


def _baseline_filters(convs: Mapping[str, nn.Conv2d], count: int, kind: str, seed: int) -> list[tuple[str, int]]:
    everything = [(n, c) for n, m in convs.items() for c in range(m.out_channels)]
    if kind == "random":
        order = torch.randperm(len(everything), generator=torch.Generator().manual_seed(seed))
        return [everything[i] for i in order[:count].tolist()]
    norms = torch.cat([m.weight.detach().abs().flatten(1).sum(1).cpu() for m in convs.values()])
    return [everything[i] for i in norms.argsort()[:count].tolist()]
