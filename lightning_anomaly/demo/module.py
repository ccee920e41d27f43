"""A plain image-classification LightningModule around any network (demo, examples, benchmarks)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

__all__ = ["ImageClassifier"]


class ImageClassifier(LightningModule):
    """Cross-entropy classifier that logs ``train_loss``, ``train_acc``, ``val_loss`` and ``val_acc``.

    Example::

        >>> from lightning_anomaly.demo import SmallCNN
        >>> ImageClassifier(SmallCNN(), lr=1e-3).hparams.lr
        0.001

    Args:
        net: The network; its output are class logits.
        lr: Learning rate.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: L2 penalty.
    """

    def __init__(self, net: nn.Module, lr: float = 3e-3, optimizer: str = "adam", weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        # Plain attributes too: a subclass's save_hyperparameters records only its own arguments.
        self.lr, self.optimizer, self.weight_decay = lr, optimizer, weight_decay

    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``net``."""
        return self.net(x)

    def _step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """One optimisation step's loss."""
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss and accuracy."""
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam or SGD with the configured learning rate and weight decay."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
