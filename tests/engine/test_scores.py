import math

import numpy as np
import pytest
import torch
from sklearn.metrics import calinski_harabasz_score
from torchmetrics.functional.clustering import calinski_harabasz_score as tm_ch

from lightning_anomaly.engine.scores import calinski_harabasz, cluster_sizes


@pytest.mark.parametrize("k", [2, 3, 6])
@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("offset", [0.0, 1e3])  # far from the origin: the index centres the points first
def test_matches_sklearn_and_torchmetrics(k, d, offset):
    g = torch.Generator().manual_seed(k * 10 + d)
    pts = torch.randn(16, 50, d, generator=g) + torch.randint(0, 3, (16, 50, 1), generator=g) * 2.0 + offset
    labels = torch.randint(0, k, (16, 50), generator=g)
    ours = calinski_harabasz(pts, labels, k)
    for i in range(16):
        ref = calinski_harabasz_score(pts[i].double().numpy(), labels[i].numpy())
        tm = float(tm_ch(pts[i].double(), labels[i]))
        assert ours[i].item() == pytest.approx(ref, rel=1e-9)
        assert ours[i].item() == pytest.approx(tm, rel=1e-6)


def test_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(4, 30, 2, generator=g)
    labels = torch.randint(0, 4, (4, 30), generator=g)
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.allclose(calinski_harabasz(pts, labels, 4), calinski_harabasz(pts, perm[labels], 4))


def test_empty_clusters_use_present_labels_only():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(1, 30, 2, generator=g)
    labels = torch.randint(0, 2, (1, 30), generator=g) * 3  # labels 0 and 3 of 5
    ref = calinski_harabasz_score(pts[0].double().numpy(), labels[0].numpy())
    assert calinski_harabasz(pts, labels, 5).item() == pytest.approx(ref, rel=1e-9)


def test_one_cluster_is_nan_not_an_error():
    pts = torch.randn(2, 10, 2)
    labels = torch.zeros(2, 10, dtype=torch.long)
    assert torch.isnan(calinski_harabasz(pts, labels, 3)).all()


def test_zero_within_scatter_follows_sklearn():
    pts = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]])
    labels = torch.tensor([[0, 0, 1, 1]])
    ref = calinski_harabasz_score(pts[0].numpy(), labels[0].numpy())
    assert calinski_harabasz(pts, labels, 2).item() == ref == 1.0


def test_cluster_sizes():
    labels = torch.tensor([[0, 0, 2, 2, 2], [1, 1, 1, 1, 0]])
    assert cluster_sizes(labels, 3).tolist() == [[2, 0, 3], [1, 4, 0]]
    assert not math.isnan(np.sum(cluster_sizes(labels, 3).numpy()))
