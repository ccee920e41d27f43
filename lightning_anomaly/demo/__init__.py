"""The embedded default: scikit-learn's digits (offline) and a small CNN."""

from lightning_anomaly.demo.data import digits_tensors
from lightning_anomaly.demo.model import SmallCNN
from lightning_anomaly.demo.module import ImageClassifier

__all__ = ["ImageClassifier", "SmallCNN", "digits_tensors"]
