"""Configure the callbacks from YAML with LightningCLI.

python examples/cli.py fit --config examples/lightning_cli.yaml
"""

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

from lightning_anomaly.demo import ImageClassifier, SmallCNN, digits_tensors


class DigitsModel(ImageClassifier):
    def __init__(self, width: int = 16, lr: float = 3e-3) -> None:
        super().__init__(SmallCNN(width=width), lr=lr)


class Digits(LightningDataModule):
    def __init__(self, label_noise: float = 0.2, backdoor: float = 0.0, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()

    def setup(self, stage: str) -> None:
        hp = self.hparams
        xtr, ytr, xva, yva, _ = digits_tensors(label_noise=hp.label_noise, backdoor=hp.backdoor)
        self.train_set, self.val_set = TensorDataset(xtr, ytr), TensorDataset(xva, yva)

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=512)


if __name__ == "__main__":
    LightningCLI(DigitsModel, Digits)
