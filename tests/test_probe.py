import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from lightning_anomaly.criteria import AnomalyCriteria
from lightning_anomaly.probe import (
    check_probe,
    dataset_labels,
    drop_non_finite,
    gradient_targets,
    map_style_dataset,
    read_probe,
    stratified_indices,
)


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


# The target policy of the per-sample gradient norms (default loss: cross-entropy), case by case.
@pytest.mark.parametrize(
    ("targets", "output", "kwargs", "expected", "why"),
    [
        (torch.tensor([0, 2]), torch.zeros(2, 3), {}, [0, 2], None),
        (None, torch.zeros(2, 3), {}, None, None),  # nothing to differentiate against: no warning either
        (torch.tensor([0.5, 1.5]), torch.zeros(2, 3), {"custom_loss": True}, [0.5, 1.5], None),
        (torch.tensor([0.5, 1.5]), torch.zeros(2, 3), {}, None, "are not class labels"),
        (torch.tensor([[1, 0], [0, 1]]), torch.zeros(2, 2), {}, None, "are not class labels"),
        (torch.tensor([0, 1]), (torch.zeros(2, 3), 0), {}, None, "pass output_transform"),
        (torch.tensor([0, 1]), (torch.zeros(2, 3), 0), {"output_transform": lambda o: o[0]}, [0, 1], None),
        (torch.tensor([0, 3]), torch.zeros(2, 3), {}, None, "span 0..3 but the model gives 3 class scores"),
        (torch.tensor([0, 1]), torch.zeros(2, 3), {"trainable": False}, None, "no trainable parameter"),
    ],
)
def test_gradient_targets(targets, output, kwargs, expected, why):
    got, reason = gradient_targets(targets, output, **{"custom_loss": False, **kwargs})
    assert (None if got is None else got.tolist()) == expected
    assert (reason is None) if why is None else (why in reason)


def test_drop_non_finite_keeps_order_and_names_the_dropped_dataset_indices():
    x = torch.tensor([[0.0], [float("inf")], [1.0], [float("nan")]])
    kept_x, kept_y, kept, dropped = drop_non_finite(x, torch.tensor([5, 6, 7, 8]), [40, 41, 42, 43])
    assert kept_x.flatten().tolist() == [0.0, 1.0] and kept_y.tolist() == [5, 7]
    assert (kept, dropped) == ([40, 42], [41, 43])


def test_map_style_dataset_refuses_an_iterable_dataset():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield torch.zeros(1)

    loader = torch.utils.data.DataLoader(Stream())
    with pytest.raises(ValueError, match=r"map-style training dataset .* got Stream; pass probe="):
        map_style_dataset(loader)
    data = torch.utils.data.TensorDataset(torch.zeros(3, 1))
    assert map_style_dataset([{"a": torch.utils.data.DataLoader(data)}]) is data


@pytest.mark.parametrize(
    ("probe", "error", "match"),
    [
        (torch.zeros(8, 1), TypeError, "must be a pair"),
        ((torch.zeros(3, 1), None), ValueError, "fewer than max\\(k_range\\)\\+1=7"),
        ((torch.zeros(8, 1), torch.zeros(5)), ValueError, "targets must be a tensor with 8 entries"),
        ((torch.full((8, 1), float("nan")), None), ValueError, "NaN or Inf in samples \\[0, 1, 2"),
    ],
)
def test_check_probe_errors(probe, error, match):
    with pytest.raises(error, match=match):
        check_probe(probe, AnomalyCriteria(k_range=(2, 6)))
