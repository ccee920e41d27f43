"""Mask conv output channels exactly, with ``torch.nn.utils.prune``.

Masking a conv's weight alone leaves its bias and the BatchNorm that follows: the channel stays
alive. Here a masked channel has its conv weight slice, conv bias entry, and the weight and bias of
the BatchNorm that directly consumes the conv's output all masked, so the channel's output is exactly
zero in train and eval mode. Masks are applied with ``prune.custom_from_mask``: the original
Parameter object lives on as ``<name>_orig`` (optimizer state stays valid) and repeated masks
multiply, so masks only grow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from lightning_anomaly.engine.capture import hooked_forward

__all__ = ["apply_channel_mask", "find_following_batchnorm", "fold_pruned_state_dict", "make_permanent"]

_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)


def find_following_batchnorm(
    model: nn.Module,
    inputs: Tensor,
    conv_names: Iterable[str],
    forward: Callable[[nn.Module, Tensor], Any] | None = None,
) -> dict[str, str]:
    """Map each named conv to the BatchNorm whose input is exactly that conv's output, if any.

    Found by one forward of ``inputs`` (a couple of samples suffice) with hooks, so any wiring
    (``Sequential``, residual blocks, functional code) is seen as it runs. Modes are restored and
    hooks removed.

    Args:
        model: The network.
        inputs: A couple of samples, on the model's device and in its dtype.
        conv_names: Names of the convs to look for.
        forward: ``(model, inputs) -> output``; ``model(inputs)`` by default.

    Returns:
        ``{conv_name: batchnorm_name}`` for the convs that feed a BatchNorm directly.
    """
    wanted = set(conv_names)
    modules = dict(model.named_modules())
    # Keyed by id, holding the tensor itself: a freed output's id can be reused by a later tensor.
    producers: dict[int, tuple[str, Tensor]] = {}
    found: dict[str, str] = {}
    handles = []

    def conv_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            producers[id(output)] = (name, output)

        return hook

    def bn_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            entry = producers.get(id(args[0]))
            if entry is not None and entry[1] is args[0] and entry[0] not in found:
                found[entry[0]] = name

        return hook

    for name, m in modules.items():
        if name in wanted and isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook(name)))
        elif isinstance(m, _BN):
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
    hooked_forward(model, inputs, handles, forward)
    return found


def _mask_param(module: nn.Module, name: str, keep: Tensor) -> None:
    param = getattr(module, name, None)
    if param is None:
        return
    shape = (-1,) + (1,) * (param.ndim - 1)
    mask = keep.to(device=param.device, dtype=param.dtype).view(shape).expand_as(param).contiguous()
    prune.custom_from_mask(module, name, mask)


def apply_channel_mask(
    model: nn.Module, conv_name: str, keep: Tensor, batchnorm: str | None = None, *, allow_all: bool = False
) -> None:
    """Mask the output channels of ``conv_name`` where ``keep`` is False (and of its BatchNorm).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3))
        >>> apply_channel_mask(net, "0", torch.tensor([True, False, True]), batchnorm="1")
        >>> float(net(torch.randn(4, 1, 5, 5))[:, 1].abs().max())
        0.0

    Args:
        model: The network.
        conv_name: Name of an ``nn.Conv2d`` in ``model.named_modules()``.
        keep: ``(out_channels,)`` bool, True for channels that stay.
        batchnorm: Name of the BatchNorm that directly consumes the conv's output.
        allow_all: Allow masking every filter of the layer (ablation studies); refused otherwise.

    Raises:
        ValueError: Unknown names, a mask of the wrong length, a mask that removes every channel, or
            a BatchNorm without affine parameters (its output would not be zero).
    """
    modules = dict(model.named_modules())
    conv = modules.get(conv_name)
    if not isinstance(conv, nn.Conv2d):
        convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
        raise ValueError(f"{conv_name!r} is not an nn.Conv2d of the model; conv layers are: {convs[:12]}")
    keep = keep.bool().flatten()
    if keep.numel() != conv.out_channels:
        raise ValueError(f"mask for {conv_name!r} has {keep.numel()} entries, the conv has {conv.out_channels} filters")
    if not allow_all and not bool(keep.any()):
        raise ValueError(f"refusing to mask every filter of {conv_name!r}: the layer would be cut")
    bn = None
    if batchnorm is not None:
        bn = modules.get(batchnorm)
        if not isinstance(bn, _BN):
            raise ValueError(f"{batchnorm!r} is not a BatchNorm2d of the model")
        if not bn.affine:
            raise ValueError(
                f"{batchnorm!r} has no affine parameters, so masking {conv_name!r} cannot zero its output; "
                "use affine BatchNorm or leave this layer out"
            )
    _mask_param(conv, "weight", keep)
    _mask_param(conv, "bias", keep)
    if bn is not None:
        _mask_param(bn, "weight", keep)
        _mask_param(bn, "bias", keep)


def make_permanent(model: nn.Module) -> int:
    """Fold every ``torch.nn.utils.prune`` mask into its parameter; returns how many were folded."""
    count = 0
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
                count += 1
    return count


def fold_channel_masks(model: nn.Module, masks: Mapping[str, Tensor], batchnorms: Mapping[str, str | None]) -> int:
    """Fold the channel masks :func:`apply_channel_mask` made into the weights, and only those.

    For each conv in ``masks`` (``keep`` per output channel) and the BatchNorm that ``batchnorms``
    pairs with it, the dropped channels are folded into the parameters (they become plain zeros);
    any other ``torch.nn.utils.prune`` mask on the same parameters (the user's) is kept as a mask.

    Returns:
        How many parameters were folded.
    """
    modules = dict(model.named_modules())
    count = 0
    for conv_name, keep in masks.items():
        for name in (conv_name, batchnorms.get(conv_name)):
            module = modules.get(name) if name else None
            if module is None:
                continue
            for param in ("weight", "bias"):
                mask = getattr(module, param + "_mask", None)
                if mask is None:
                    continue
                ours = keep.to(mask.device, mask.dtype).view((-1,) + (1,) * (mask.ndim - 1)).expand_as(mask)
                others = torch.where(ours > 0, mask, torch.ones_like(mask))  # what is not ours stays masked
                prune.remove(module, param)
                if not bool(others.all()):
                    prune.custom_from_mask(module, param, others)
                count += 1
    return count


def fold_pruned_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Replace ``<p>_orig``/``<p>_mask`` pairs by ``<p> = orig * mask``: loads into a plain model."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state_dict:
            continue
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state_dict:
            base = key[: -len("_orig")]
            out[base] = value * state_dict[base + "_mask"]
            continue
        out[key] = value
    return out
