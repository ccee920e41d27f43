import pytest
import torch

from lightning_anomaly.demo.data import SHAPE_NAMES, digits_tensors, plant, shapes_tensors, stamp_trigger


def test_plant_changes_exactly_the_planted_training_samples():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(400, 1, 8, 8, generator=g) * 2 - 1, torch.arange(400) % 4
    xtr, ytr, _xva, yva, planted = plant(x, y, label_noise=0.1, backdoor=0.05, rare=0.05, seed=3)
    assert len(ytr) + len(yva) == 400 and planted.shape == ytr.shape
    # Recover each training sample's original by matching it among the inputs.
    clean_tr, _, _, _, none = plant(x, y, seed=3)
    assert not none.any()
    changed_x = (xtr != clean_tr).flatten(1).any(1)
    changed_y = ytr != plant(x, y, seed=3)[1]
    assert torch.equal(planted, changed_x | changed_y)
    # Flipped labels stay within the classes present.
    assert int(ytr.max()) < 4
    # Triggered images carry the patch and the target label; inverted ones are the negatives.
    triggered = (xtr == stamp_trigger(xtr)).flatten(1).all(1) & planted & (ytr == 0) & changed_x
    assert int(triggered.sum()) == round(0.05 * len(ytr))
    inverted = planted & changed_x & ~triggered
    assert torch.allclose(xtr[inverted], -clean_tr[inverted])


def test_digits_split_is_stable_and_planted_share_matches():
    xtr, _ytr, _xva, yva, planted = digits_tensors(label_noise=0.2, seed=1)
    assert xtr.shape == (1258, 1, 16, 16) and len(yva) == 539
    assert 0.15 < planted.float().mean() < 0.25
    again = digits_tensors(label_noise=0.2, seed=1)
    assert torch.equal(again[0], xtr) and torch.equal(again[4], planted)


def test_shapes_are_balanced_learnable_and_deterministic():
    xtr, ytr, xva, yva, planted = shapes_tensors(n=600, seed=2)
    assert xtr.shape == (420, 1, 16, 16) and xtr.min() >= -1 and xtr.max() <= 1
    counts = torch.bincount(torch.cat([ytr, yva]), minlength=len(SHAPE_NAMES))
    assert counts.tolist() == [60] * len(SHAPE_NAMES)
    assert not planted.any()
    assert torch.equal(shapes_tensors(n=600, seed=2)[0], xtr)
    assert not torch.equal(shapes_tensors(n=600, seed=3)[0], xtr)
    # Class means differ: the classes are separable by their average image.
    means = torch.stack([xtr[ytr == c].mean(0).flatten() for c in range(len(SHAPE_NAMES))])
    nearest = torch.cdist(xva.flatten(1), means).argmin(1)
    assert (nearest == yva).float().mean() > 0.4


@pytest.mark.parametrize(("kwargs", "match"), [({"size": 8}, "at least 12"), ({"n": 5}, "at least 10")])
def test_shapes_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        shapes_tensors(**kwargs)


def test_share_out_of_range_is_named():
    with pytest.raises(ValueError, match=r"backdoor must be in \[0, 1\), got 1.5"):
        digits_tensors(backdoor=1.5)
