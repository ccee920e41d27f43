"""A small CNN for the digits demo."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; big enough to memorise noisy digit labels.

    Example::

        >>> import torch
        >>> SmallCNN()(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])

    Args:
        in_channels: Input channels.
        num_classes: Output classes.
        image_size: Side of the square input images (a multiple of 4).
        width: Filters in the first block (doubled in the next two).
        batch_norm: Add BatchNorm after each conv.
        dropout: Dropout before the head (0 disables it).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 16,
        width: int = 16,
        batch_norm: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width]
        blocks: list[nn.Module] = []
        for i in range(3):
            blocks.append(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1))
            if batch_norm:
                blocks.append(nn.BatchNorm2d(chans[i + 1]))
            blocks.append(nn.ReLU())
            if i < 2:
                blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        # A flattened head (no global pooling) gives the network room to memorise.
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout) if dropout else nn.Identity(),
            nn.Linear(chans[3] * (image_size // 4) ** 2, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in_channels, H, W)`` images -> ``(N, num_classes)`` logits."""
        return self.head(self.features(x))
