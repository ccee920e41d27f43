import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from lightning_anomaly.probe import dataset_labels, read_probe, stratified_indices


def test_labels_from_tensor_dataset_subset_and_attribute():
    y = torch.tensor([0, 1, 2, 1, 0])
    ds = TensorDataset(torch.zeros(5, 2), y)
    assert torch.equal(dataset_labels(ds), y)
    assert dataset_labels(Subset(ds, [4, 2])).tolist() == [0, 2]

    class WithTargets:
        def __init__(self):
            self.targets = [3, 3, 1]

        def __len__(self):
            return 3

    assert dataset_labels(WithTargets()).tolist() == [3, 3, 1]
    assert dataset_labels(TensorDataset(torch.zeros(3, 2), torch.rand(3))) is None  # regression targets


def test_stratified_keeps_rare_classes_and_is_deterministic():
    labels = torch.tensor([0] * 95 + [1] * 4 + [2] * 1)
    a = stratified_indices(100, 10, torch.Generator().manual_seed(0), labels)
    b = stratified_indices(100, 10, torch.Generator().manual_seed(0), labels)
    assert a == b and len(a) == 10 and len(set(a)) == 10
    picked = labels[a]
    assert int((picked == 2).sum()) == 1 and int((picked == 1).sum()) >= 1


def test_no_global_rng_and_all_when_size_exceeds():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    idx = stratified_indices(50, 20, torch.Generator().manual_seed(1))
    assert torch.equal(state, torch.get_rng_state()) and len(idx) == 20
    assert stratified_indices(5, 20, torch.Generator()) == [0, 1, 2, 3, 4]


def test_read_probe_tuple_dict_and_plain_items():
    ds = TensorDataset(torch.arange(12.0).view(6, 2), torch.arange(6))
    x, y = read_probe(ds, [1, 3])
    assert x.tolist() == [[2.0, 3.0], [6.0, 7.0]] and y.tolist() == [1, 3]
    dicts = [{"image": torch.ones(2) * i, "label": i} for i in range(4)]
    x, y = read_probe(dicts, [0, 2])
    assert y.tolist() == [0, 2]
    x, y = read_probe([torch.zeros(3)] * 3, [0, 1])
    assert y is None and x.shape == (2, 3)


def test_read_probe_rejects_non_tensor_inputs():
    with pytest.raises(ValueError, match="add a ToTensor transform or pass probe="):
        read_probe([("not an image", 1)], [0])
    with pytest.raises(ValueError, match="none is an input key"):
        read_probe([{"pixels": torch.zeros(2)}], [0])


def test_more_classes_than_slots_leaves_no_range_of_classes_out():
    labels = torch.arange(1000).repeat_interleave(5)  # 1000 classes of 5, probe of 256
    for seed in range(3):
        idx = stratified_indices(len(labels), 256, torch.Generator().manual_seed(seed), labels)
        classes = labels[idx]
        assert len(idx) == 256 and len(classes.unique()) == 256  # one sample each from 256 classes
        assert (classes < 500).sum() > 80 and (classes >= 500).sum() > 80  # both halves of the ids


def test_read_probe_takes_numpy_items():
    import numpy as np

    items = [(np.full((1, 2, 2), i, dtype=np.float32), i % 2) for i in range(4)]
    x, y = read_probe(items, [0, 3])
    assert x.shape == (2, 1, 2, 2) and x[1].eq(3).all() and y.tolist() == [0, 1]
