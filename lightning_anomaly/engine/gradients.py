"""Per-sample gradient norms: exact, without materialising a model's worth of gradients per sample.

Three methods give the same numbers:

* ``"ghost"`` (the default where it applies): one batched forward and one ``autograd.grad`` with
  respect to the outputs of the layers that own parameters, then each layer's per-sample gradient
  norm in closed form from its inputs and output gradients. For a conv or linear layer the
  per-sample weight gradient is ``G_i = D_i A_i^T`` (``A_i`` the unfolded input, ``D_i`` the output
  gradient, over ``T`` positions); its squared norm is computed either from ``G_i`` or, when
  cheaper, as ``sum((A_i^T A_i) * (D_i^T D_i))`` (the "ghost norm"). BatchNorm layers (eval mode)
  are exact too. Products run in the activations' precision (float32 at least, float64 for float64
  models); ghost-norm sums, whose terms can cancel, run in float64. Covers ``nn.Conv2d`` (any
  stride, padding, dilation, groups), ``nn.Linear`` and ``nn.BatchNorm1d/2d``; a model with any
  other parameter owner, or a layer called twice, uses the next method.
* ``"vmap"``: ``functional_call`` + ``vmap`` + ``grad`` (materialises per-sample gradients).
* ``"loop"``: one ``autograd.grad`` per sample; for models ``vmap`` cannot trace.

The model is in eval mode throughout (modes restored), no ``.grad`` is touched and no random number
is drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_anomaly.engine.capture import MapStash, eval_mode

__all__ = ["per_sample_grad_norms"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Method = Literal["auto", "ghost", "vmap", "loop"]
_GHOST_TYPES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)
# Input channels per group from which a conv's weight-gradient norm goes tap by tap instead of
# through its unfolded input (below, the unfolded input is small and one product is faster).
_MIN_TAP_CHANNELS = 8


def _default_loss(output: Tensor, target: Tensor) -> Tensor:
    return nn.functional.cross_entropy(output, target)


def per_sample_grad_norms(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn | None = None,
    *,
    chunk_size: int = 64,
    output_transform: Callable[[Any], Tensor] | None = None,
    method: Method = "auto",
    forward: Callable[[nn.Module, Tensor], Any] | None = None,
    stash: MapStash | None = None,
) -> Tensor:
    """L2 norm of the loss gradient with respect to all trainable parameters, one per sample.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
        >>> x, y = torch.randn(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
        >>> ghost = per_sample_grad_norms(net, x, y)
        >>> torch.allclose(ghost, per_sample_grad_norms(net, x, y, method="loop"), rtol=1e-4)
        True

    Args:
        model: The network.
        inputs: ``(N, ...)`` probe inputs on the model's device.
        targets: ``(N, ...)`` targets for ``loss_fn``.
        loss_fn: ``(output (1, ...), target (1, ...)) -> scalar``, called on one sample at a time;
            cross-entropy by default.
        chunk_size: Samples per batched pass (bounds memory).
        output_transform: Maps the model's output to what ``loss_fn`` takes (tuple or dict outputs).
        method: ``"auto"`` (ghost where it applies, else vmap, else loop) or one of them.
        forward: ``(model, inputs) -> output``; ``model(inputs)`` by default (models without a
            ``forward``, extra arguments, autocast).
        stash: Gathers the selected layers' maps from the ghost method's batched forward, so that
            :func:`~lightning_anomaly.engine.analyze` needs no capture forward of its own; it gives up
            when another method runs.

    Returns:
        ``(N,)`` float64 on the CPU.

    Raises:
        ValueError: ``inputs`` and ``targets`` disagree in length, the model has no trainable
            parameter, or ``method="ghost"`` was asked of a model it does not cover.
    """
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs and targets must have the same length, got {inputs.shape[0]} and {targets.shape[0]}")
    loss = loss_fn or _default_loss
    transform = output_transform or (lambda o: o)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("model has no trainable parameter; per-sample gradient norms are undefined")
    if forward is not None:
        model = _Forward(model, forward)
    with eval_mode(model), torch.enable_grad():
        if method in ("auto", "ghost"):
            norms = _ghost(model, inputs, targets, loss, transform, chunk_size, stash)
            if norms is not None:
                return norms
            if method == "ghost":
                raise ValueError(
                    "method='ghost' covers models whose parameters all belong to Conv2d, Linear and BatchNorm "
                    "layers, each called once per forward; use method='auto'"
                )
        if stash is not None:
            stash.give_up()  # the other methods' forwards are per sample or traced: nothing to share
        if method in ("auto", "vmap"):
            try:
                return _vmap(model, inputs, targets, loss, transform, max(1, chunk_size // 4))
            except (RuntimeError, NotImplementedError):
                if method == "vmap":
                    raise
        return _loop(model, inputs, targets, loss, transform)


class _Forward(nn.Module):
    """``model`` called through ``forward(model, x)``; owns no parameter of its own."""

    def __init__(self, model: nn.Module, forward: Callable[[nn.Module, Tensor], Any]) -> None:
        super().__init__()
        self.model = model
        self._call = forward

    def forward(self, x: Tensor) -> Any:
        return self._call(self.model, x)


# ---------------------------------------------------------------------------- ghost norms
def _owners(model: nn.Module) -> list[nn.Module] | None:
    """Modules that own trainable parameters, if every one of them is a supported type."""
    owners = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    for m in owners:
        if not isinstance(m, _GHOST_TYPES):
            return None
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            return None
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) and (m.running_mean is None or m.running_var is None):
            return None  # batch statistics couple the samples
        names = {name for name, _ in m.named_parameters(recurse=False)}
        if not names <= {"weight", "bias", "weight_orig", "bias_orig"}:
            return None  # another reparametrisation (weight_norm's g and v...)
        if any(name.endswith("_orig") and not _pruned(m, name.removesuffix("_orig")) for name in names):
            return None  # <name>_orig without a pruning mask: spectral_norm and the like
        if not (_channel_mask_only(m, "weight") and _channel_mask_only(m, "bias")):
            return None
    return owners


def _trainable(m: nn.Module, base: str) -> bool:
    """Whether ``m.<base>`` (or, under a pruning mask, ``m.<base>_orig``) is a trainable parameter."""
    param = getattr(m, base + "_orig", None)
    if param is None:
        param = getattr(m, base, None)
    return isinstance(param, nn.Parameter) and param.requires_grad


def _pruned(m: nn.Module, base: str) -> bool:
    """Whether ``m.<base>`` is ``<base>_orig * <base>_mask`` from ``torch.nn.utils.prune``."""
    from torch.nn.utils.prune import BasePruningMethod

    hooks = m._forward_pre_hooks.values()
    return getattr(m, base + "_mask", None) is not None and any(
        isinstance(h, BasePruningMethod) and getattr(h, "_tensor_name", None) == base for h in hooks
    )


def _mask_rows(m: nn.Module, base: str) -> Tensor | None:
    """``m``'s ``torch.nn.utils.prune`` mask of ``<base>`` as ``(out, rest)``, or ``None`` without one."""
    mask = getattr(m, base + "_mask", None)
    if mask is None or getattr(m, base + "_orig", None) is None:
        return None
    return mask.reshape(mask.shape[0], -1)


def _channel_mask_only(m: nn.Module, base: str) -> bool:
    """No mask, or one that keeps or drops whole output channels (handled in closed form)."""
    rows = _mask_rows(m, base)
    return rows is None or bool((rows == rows[:, :1]).all())


def _keep_view(m: nn.Module, base: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor | None:
    """0/1 per output channel of ``<base>``'s mask, viewed as ``shape`` (``None`` without a mask).

    The gradient of ``<base>_orig`` is the plain gradient times the mask, so dropped channels add nothing.
    """
    rows = _mask_rows(m, base)
    return None if rows is None else rows[:, 0].to(dtype).view(shape)


def _sq_matmul_norm(a: Tensor, d: Tensor) -> Tensor:
    """``||D_i A_i^T||_F^2`` per sample for ``a`` ``(n, g, Din, T)`` and ``d`` ``(n, g, Dout, T)``.

    ``G_i = D_i A_i^T`` and its sum of squares run in the inputs' precision (at least float32). The
    ghost norm, a sum of terms of either sign that can cancel, runs in float64 throughout (it is
    taken only when the positions ``T`` are few, so this is cheap).
    """
    din, dout, t = a.shape[2], d.shape[2], a.shape[3]
    if _ghost_is_cheaper(din, dout, t):
        a, d = a.double(), d.double()
        return ((a.mT @ a) * (d.mT @ d)).sum((1, 2, 3)).clamp_min(0.0)
    return (d @ a.mT).square().sum((1, 2, 3)).double()


def _ghost_is_cheaper(din: int, dout: int, t: int) -> bool:
    """Whether ``sum((A^T A) * (D^T D))`` costs fewer multiply-adds than forming ``G = D A^T``."""
    return t * t * (din + dout) < din * dout * t


def _conv_weight_sq_norm(m: nn.Conv2d, x: Tensor, d: Tensor) -> Tensor | None:
    """``||G_i||_F^2`` of a conv's per-sample weight gradient without unfolding its input, or ``None``.

    ``G_i[o, c, u, v] = sum_t D_i[o, t] X_i[c, t + tap(u, v)]``: one product per kernel tap, each
    reading the zero-padded input through a shifted, strided view. Laid out on the padded input's
    grid (width ``Wp``), the positions a tap reads are one contiguous run of ``L = (H'-1) Wp + W'``
    flat indices per channel starting at the tap's offset; the output gradient is spread on the same
    grid, zeros in the ``Wp - W'`` columns a conv never writes, so those reads add nothing. A
    stride ``s`` first splits the padded input into its ``s x s`` polyphase components (one copy of
    the input, where unfolding makes ``k_h k_w`` of them), each of which a tap then reads the same way.

    Same multiply-adds as ``D_i A_i^T`` on the unfolded input (plus ``Wp / W'``), without writing the
    ``(n, C k_h k_w, T)`` unfolded tensor, which is what the time went to on large maps. Returns
    ``None`` when the ghost norm is cheaper (few positions) or the input has few channels per group
    (the unfolded input is then small and one product beats ``k_h k_w`` thin ones).
    """
    n, cin = x.shape[:2]
    g = m.groups
    cin_g, out_g = cin // g, d.shape[1] // g
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ho, wo = d.shape[2], d.shape[3]
    if cin_g < _MIN_TAP_CHANNELS or _ghost_is_cheaper(cin_g * kh * kw, out_g, ho * wo):
        return None
    xp = _pad_like_conv(m, x)
    hp, wp = xp.shape[2], xp.shape[3]
    # Pad up to whole multiples of the stride so that every polyphase component has one shape.
    hq, wq = -(-hp // sh), -(-wp // sw)
    if (hq * sh, wq * sw) != (hp, wp):
        xp = nn.functional.pad(xp, [0, wq * sw - wp, 0, hq * sh - hp])
    phases: dict[tuple[int, int], Tensor] = {}
    length = (ho - 1) * wq + wo
    dgrid = nn.functional.pad(d, [0, wq - wo]).reshape(n * g, out_g, ho * wq)[..., :length]
    sq = torch.zeros(n * g, dtype=d.dtype, device=d.device)
    for u in range(kh):
        qa, a = divmod(dh * u, sh)
        for v in range(kw):
            qb, b = divmod(dw * v, sw)
            phase = phases.get((a, b))
            if phase is None:
                phase = phases[(a, b)] = xp[:, :, a::sh, b::sw].contiguous()
            flat = phase.reshape(n * g, cin_g, hq * wq)
            off = qa * wq + qb
            tap = torch.bmm(dgrid, flat[..., off : off + length].mT)  # (n g, out_g, cin_g)
            sq += tap.square().sum((1, 2))
    return sq.view(n, g).sum(1).double()


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for float32 and narrower activations (bf16, fp16), float64 for float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pad_like_conv(m: nn.Conv2d, x: Tensor) -> Tensor:
    """Zero-pad ``x`` as ``m`` does, including ``padding="same"`` (possibly asymmetric)."""
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return x
        pads: list[int] = []
        for k, dil in zip(reversed(m.kernel_size), reversed(m.dilation), strict=True):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        return nn.functional.pad(x, pads)
    ph, pw = m.padding
    return nn.functional.pad(x, [pw, pw, ph, ph]) if ph or pw else x


def _layer_sq_norm(m: nn.Module, x: Tensor, d: Tensor) -> Tensor:
    """Squared norm of ``m``'s per-sample parameter gradient, ``(n,)`` float64."""
    dtype = _compute_dtype(x)
    x, d = x.to(dtype), d.to(dtype)
    n = x.shape[0]
    sq = x.new_zeros(n, dtype=torch.float64)
    if isinstance(m, nn.Conv2d | nn.Linear):
        if isinstance(m, nn.Conv2d):
            g = m.groups
            dd = d.reshape(n, g, d.shape[1] // g, -1)  # (n, g, Cout/g, T)
        else:
            dd = d.reshape(n, -1, d.shape[-1]).mT.unsqueeze(1)  # (n, 1, Dout, T)
        channels = (1, dd.shape[1], dd.shape[2], 1)
        if _trainable(m, "weight"):
            keep = _keep_view(m, "weight", channels, dtype)
            dw = dd if keep is None else dd * keep
            taps = _conv_weight_sq_norm(m, x, dw.reshape(d.shape)) if isinstance(m, nn.Conv2d) else None
            if taps is not None:
                sq = sq + taps
            else:
                if isinstance(m, nn.Conv2d):
                    a = nn.functional.unfold(_pad_like_conv(m, x), m.kernel_size, m.dilation, 0, m.stride)
                    a = a.reshape(n, m.groups, a.shape[1] // m.groups, a.shape[2])  # (n, g, Cin/g*k*k, T)
                else:
                    a = x.reshape(n, -1, x.shape[-1]).mT.unsqueeze(1)  # (n, 1, Din, T)
                sq = sq + _sq_matmul_norm(a, dw)
        if _trainable(m, "bias"):
            keep = _keep_view(m, "bias", channels, dtype)
            sq = sq + (dd if keep is None else dd * keep).sum(-1).double().square().sum((1, 2))
        return sq
    assert isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)
    assert m.running_mean is not None and m.running_var is not None
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = m.running_mean.to(dtype).view(shape), m.running_var.to(dtype).view(shape)
    xhat = (x - mean) / (var + m.eps).sqrt()
    dims = tuple(range(2, x.ndim))
    per_channel = {  # (n, C) per-sample gradients of the affine parameters
        "weight": (d * xhat).sum(dims) if _trainable(m, "weight") else None,
        "bias": d.sum(dims) if _trainable(m, "bias") else None,
    }
    for base, per_sample in per_channel.items():
        if per_sample is not None:
            keep = _keep_view(m, base, (1, -1), dtype)
            sq = sq + (per_sample if keep is None else per_sample * keep).double().square().sum(1)
    return sq


def _ghost(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss: LossFn,
    transform: Callable[[Any], Tensor],
    chunk: int,
    stash: MapStash | None = None,
) -> Tensor | None:
    owners = _owners(model)
    if owners is None:
        return None
    norms: list[Tensor] = []
    for lo in range(0, inputs.shape[0], chunk):
        x, y = inputs[lo : lo + chunk], targets[lo : lo + chunk]
        seen: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {m: [] for m in owners}

        def hook(module: nn.Module, args: Any, output: Tensor, seen: dict[nn.Module, Any] = seen) -> Tensor:
            # Copies keep both tensors safe from later in-place ops (ReLU(inplace=True), out += x):
            # the input is read after the backward, and the output is what we differentiate by.
            seen[module].append((args[0].detach().clone(), output))
            return output.clone()

        # The stash's hooks first: they see each owner's own output, which the hook below keeps for the
        # gradient and replaces downstream with a copy, so the stash need not copy it again.
        handles = stash.attach(copied=owners) if stash is not None else []
        handles += [m.register_forward_hook(hook) for m in owners]
        try:
            out = transform(model(x))
        finally:
            for h in handles:
                h.remove()
        if any(len(calls) != 1 for calls in seen.values()):
            return None  # unused or shared layers: per-sample gradients would add across calls
        # Summing per-sample losses makes each layer's output gradient the per-sample one.
        total = torch.stack([loss(out[i : i + 1], y[i : i + 1]) for i in range(x.shape[0])]).sum()
        outputs = [seen[m][0][1] for m in owners]
        grads = torch.autograd.grad(total, outputs, allow_unused=True)
        sq = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for m, g in zip(owners, grads, strict=True):
            if g is not None:
                sq = sq + _layer_sq_norm(m, seen[m][0][0], g)
        norms.append(sq.sqrt().cpu())
    return torch.cat(norms)


# ---------------------------------------------------------------------------- vmap and loop
def _vmap(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss: LossFn, transform: Callable[[Any], Tensor], chunk: int
) -> Tensor:
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss(transform(functional_call(model, (p, buffers), (x.unsqueeze(0),))), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    norms = []
    try:
        for lo in range(0, inputs.shape[0], chunk):
            g = per_sample(params, inputs[lo : lo + chunk], targets[lo : lo + chunk])
            sq = sum(t.double().flatten(1).square().sum(1) for t in g.values())
            norms.append(torch.as_tensor(sq).sqrt().cpu())
    finally:
        # Forward pre-hooks that cache a tensor on the module (torch.nn.utils.prune's weight = orig * mask,
        # spectral_norm) ran inside vmap and left a functorch wrapper there: one plain forward replaces it.
        with torch.no_grad():
            model(inputs[:1])
    return torch.cat(norms)


def _loop(
    model: nn.Module, inputs: Tensor, targets: Tensor, loss: LossFn, transform: Callable[[Any], Tensor]
) -> Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    out = torch.empty(inputs.shape[0], dtype=torch.float64)
    for i in range(inputs.shape[0]):
        value = loss(transform(model(inputs[i : i + 1])), targets[i : i + 1])
        grads = torch.autograd.grad(value, params, allow_unused=True)
        out[i] = float(sum(g.double().square().sum() for g in grads if g is not None)) ** 0.5
    return out
