"""Per-sample gradient norms with ``torch.func``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_anomaly.engine.capture import eval_mode

__all__ = ["per_sample_grad_norms"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _default_loss(output: Tensor, target: Tensor) -> Tensor:
    return nn.functional.cross_entropy(output, target)


def per_sample_grad_norms(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn | None = None,
    *,
    chunk_size: int = 32,
    output_transform: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    """L2 norm of the loss gradient with respect to all trainable parameters, one per sample.

    Computed with ``functional_call`` + ``vmap`` + ``grad`` in chunks of ``chunk_size`` samples,
    with the model in eval mode (modes restored afterwards). No ``.grad`` attribute is touched and
    no random number is drawn. Models that ``vmap`` cannot trace (in-place tricks, data-dependent
    control flow) fall back to one backward pass per sample, which gives the same numbers.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x, y = torch.randn(5, 2, 2), torch.tensor([0, 1, 2, 0, 1])
        >>> per_sample_grad_norms(net, x, y).shape
        torch.Size([5])

    Args:
        model: The network.
        inputs: ``(N, ...)`` probe inputs on the model's device.
        targets: ``(N, ...)`` targets for ``loss_fn``.
        loss_fn: ``(output (1, ...), target (1, ...)) -> scalar``; cross-entropy by default.
        chunk_size: Samples per vmapped call (bounds memory).
        output_transform: Maps the model's output to what ``loss_fn`` takes (for models returning
            tuples or dicts).

    Returns:
        ``(N,)`` float64 on the CPU.

    Raises:
        ValueError: ``inputs`` and ``targets`` disagree in length, or the model has no trainable
            parameter.
    """
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets must have the same length, got {inputs.shape[0]} and {targets.shape[0]}")
    loss = loss_fn or _default_loss
    transform = output_transform or (lambda o: o)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("model has no trainable parameter; per-sample gradient norms are undefined")
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = transform(functional_call(model, (p, buffers), (x.unsqueeze(0),)))
        return loss(out, y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    norms: list[Tensor] = []
    with eval_mode(model), torch.enable_grad():
        try:
            for lo in range(0, inputs.shape[0], chunk_size):
                g = per_sample(params, inputs[lo : lo + chunk_size], targets[lo : lo + chunk_size])
                sq = sum(t.double().flatten(1).square().sum(1) for t in g.values())
                norms.append(torch.as_tensor(sq).sqrt().cpu())
        except (RuntimeError, NotImplementedError):
            norms = [_loop_norm(model, params, inputs[i], targets[i], sample_loss) for i in range(inputs.shape[0])]
    return torch.cat([n.reshape(-1) for n in norms])


def _loop_norm(
    model: nn.Module,
    params: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    sample_loss: Callable[[dict[str, Tensor], Tensor, Tensor], Tensor],
) -> Tensor:
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    value = sample_loss(leaves, x, y)
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    sq = sum(g.double().square().sum() for g in grads if g is not None)
    return torch.as_tensor(sq, dtype=torch.float64).sqrt().reshape(1).cpu()
