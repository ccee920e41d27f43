"""The monitor's probe inside a fit: read from the training data, and checked to run through the model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from lightning_anomaly.callbacks._dist import rank_zero_decides
from lightning_anomaly.callbacks._work import no_forward
from lightning_anomaly.criteria import AnomalyCriteria
from lightning_anomaly.engine.analyze import model_inputs
from lightning_anomaly.engine.capture import hooked_forward
from lightning_anomaly.probe import drop_non_finite, gradient_targets, map_style_dataset, read_probe

Probe = tuple[Tensor, Tensor | None]


def read_training_probe(
    trainer: Trainer,
    indices: list[int] | None,
    *,
    probe_size: int,
    seed: int,
    select: Callable[[Any, torch.Generator], list[int]],
    criteria: AnomalyCriteria,
) -> tuple[Probe, list[int]]:
    """The probe read from the fit's training dataset: drawn by ``select`` unless ``indices`` are given.

    Random transforms of the dataset draw from the global RNG: they run seeded by ``seed`` inside
    ``isolate_rng``, so the probe is the same at every read and training's RNG is untouched. Samples
    with NaN or Inf are left out, with a warning.

    Raises:
        ValueError: Given ``indices`` beyond the dataset (resumed on other data), or too few usable samples.
    """
    dataset = map_style_dataset(trainer.train_dataloader)
    with isolate_rng():
        torch.manual_seed(seed)
        if indices is None:
            indices = select(dataset, torch.Generator().manual_seed(seed))
            if len(dataset) < probe_size:
                used = "all of them" if len(indices) == len(dataset) else f"{len(indices)} of them"
                rank_zero_warn(
                    f"AnomalyFilterCallback: probe_size={probe_size} asks for more samples than the training dataset "
                    f"has ({len(dataset)}); the probe uses {used}. Pass probe_size={len(dataset)} (or fewer) to say so"
                )
        elif indices and max(indices) >= len(dataset):
            raise ValueError(
                f"the restored probe reaches dataset index {max(indices)} but the training dataset has {len(dataset)} "
                "items; resume with the training data of the checkpoint, or start a new fit"
            )
        x, y = read_probe(dataset, indices)
        x, y, indices, dropped = drop_non_finite(x, y, indices)
    if dropped:
        rank_zero_warn(
            f"AnomalyFilterCallback: {len(dropped)} probe samples hold NaN or Inf (dataset indices "
            f"{dropped[:10]}{' ...' if len(dropped) > 10 else ''}); they are left out of the probe"
        )
    criteria.check_probe_size(len(indices), "the probe read from the training dataset")
    return (x, y), indices


def probe_runs(
    pl_module: LightningModule,
    inputs: Tensor,
    layers: list[str],
    forward: Callable[[Any, Tensor], Any],
    source: str,
) -> tuple[set[str], Any]:
    """Send two probe samples through the model: which of ``layers`` ran, and the model's output.

    A probe the model cannot take fails here, at the start of training, with a message about the
    probe, not after an epoch. The hooks are removed whatever happens.

    Raises:
        ValueError: The probe does not go through the model.
        NotImplementedError: The LightningModule has no ``forward`` (the message names ``forward_fn``).
    """
    modules = dict(pl_module.named_modules())
    ran: set[str] = set()
    try:
        x = model_inputs(pl_module, inputs[:2])
        handles = [modules[name].register_forward_hook(lambda *_, name=name: ran.add(name)) for name in layers]
        with isolate_rng():
            out = hooked_forward(pl_module, x, handles, forward)
    except NotImplementedError as err:
        raise no_forward(pl_module) from err
    except Exception as err:
        raise ValueError(
            f"AnomalyFilterCallback: the probe ({source}; inputs {tuple(inputs.shape)} {inputs.dtype}) does not go "
            f"through {type(pl_module).__name__}: {type(err).__name__}: {err}. Pass probe=(inputs, targets) shaped "
            "and typed like the inputs of a training batch, or forward_fn=... to call the model"
        ) from err
    return ran, out


def running_layers(layers: list[str], ran: set[str], required: set[str]) -> list[str]:
    """``layers`` without those that did not run in eval mode (auxiliary heads), which are named in a message.

    Raises:
        ValueError: A ``required`` layer did not run, or none did.
    """
    idle = [name for name in layers if name not in ran]
    if not idle:
        return layers
    must = [name for name in idle if name in required]
    shown = must or idle
    listed = ", ".join(repr(n) for n in shown[:6]) + (" ..." if len(shown) > 6 else "")
    if must or len(idle) == len(layers):
        raise ValueError(
            f"layers {listed} do not run when the probe goes through the model in eval mode; drop them from "
            "layers=[...] or check the model's forward (forward_fn=...)"
        )
    rank_zero_info(
        f"AnomalyFilterCallback: {len(idle)} conv layers do not run in eval mode (auxiliary heads?) and are "
        f"left out: {listed}"
    )
    return [name for name in layers if name in ran]


class FitProbe:
    """The monitor's probe: explicit, or drawn from each fit's training data by rank 0 and shared.

    Attributes:
        data: ``(inputs, targets)`` on the CPU, once known.
        indices: Dataset indices of a drawn probe (``None`` for an explicit one).
        grad_targets: The targets as the gradient norms take them (``None``: norms skipped).
        checked: The probe went through the model in this fit.
    """

    def __init__(self, explicit: Probe | None) -> None:
        self.data: Probe | None = explicit
        self.indices: list[int] | None = None
        self.grad_targets: Tensor | None = None
        self.checked = False

    @property
    def explicit(self) -> bool:
        return self.data is not None and self.indices is None

    def new_fit(self) -> None:
        """A new fit draws its own probe (an explicit one stays)."""
        if not self.explicit:
            self.data, self.indices = None, None

    def restore(self, indices: list[int] | None) -> bool:
        """Take a checkpoint's drawn indices, read again at the next train start; whether they were taken."""
        if indices is None or self.explicit or indices == self.indices:
            return False
        self.indices, self.data = [int(i) for i in indices], None
        return True

    def share(self, trainer: Trainer, read: Callable[[list[int] | None], tuple[Probe, list[int]]]) -> None:
        """Rank 0's probe on every rank: ``read(indices)`` on rank 0 unless explicit, then broadcast.

        A drawn probe is read again at every train start: a fit continued on other data reads the same
        indices from it, or fails clearly; ranks with their own data or explicit probes agree.
        """

        def compute() -> tuple[Probe, list[int] | None]:
            if not self.explicit:
                self.data, self.indices = read(self.indices)
            assert self.data is not None
            return self.data, self.indices

        self.data, self.indices = rank_zero_decides(trainer, compute)

    def check(
        self,
        pl_module: LightningModule,
        layers: list[str],
        required: set[str],
        forward: Callable[[Any, Tensor], Any],
        *,
        custom_loss: bool,
        output_transform: Any,
    ) -> list[str]:
        """Send the probe through the model; the ``layers`` that run, and :attr:`grad_targets` set."""
        assert self.data is not None
        source = "given as probe=" if self.explicit else "read from the training dataset"
        ran, out = probe_runs(pl_module, self.data[0], layers, forward, source)
        layers = running_layers(layers, ran, required)
        self.grad_targets, why = gradient_targets(
            self.data[1],
            out,
            custom_loss=custom_loss,
            output_transform=output_transform,
            trainable=any(p.requires_grad for p in pl_module.parameters()),
        )
        if why is not None:
            rank_zero_warn(f"AnomalyFilterCallback: {why}")
        self.checked = True
        return layers
