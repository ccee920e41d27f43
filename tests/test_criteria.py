import math

import pytest
import torch

from lightning_anomaly import AnomalyCriteria
from lightning_anomaly.criteria import CONSTRAINTS

BAD_VALUES = {
    "min_cluster_size": 0,
    "min_cluster_fraction": 0.6,
    "ch_ratio": 0.0,
    "activation_ratio": -1.0,
    "n_components": 3,
    "layer_statistic": "mode",
    "max_iter": 0,
    "tol": 0.0,
    "reg_covar": -1e-6,
    "kmeans_iter": -1,
    "n_init": 0,
    "label_free_fraction": 0.7,
    "min_separation": -1.0,
    "class_purity": 1.5,
    "class_coverage": -0.1,
    "score_separation": -0.5,
}


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_each_rule_names_the_argument_range_and_value(name):
    bad = BAD_VALUES[name]
    with pytest.raises(ValueError, match=rf"^{name} must be .* got {bad!r}; "):
        AnomalyCriteria(**{name: bad})


@pytest.mark.parametrize("name", sorted(CONSTRAINTS))
def test_wrong_type(name):
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        AnomalyCriteria(**{name: [1]})


def test_nan_is_rejected():
    with pytest.raises(ValueError, match="ch_ratio"):
        AnomalyCriteria(ch_ratio=math.nan)


@pytest.mark.parametrize("k_range", [(1, 6), (5, 3)])
def test_k_range_values(k_range):
    with pytest.raises(ValueError, match=r"k_range must satisfy 2 <= low <= high"):
        AnomalyCriteria(k_range=k_range)


def test_k_range_type():
    with pytest.raises(TypeError, match="k_range must be a pair of ints"):
        AnomalyCriteria(k_range=(2, 6, 8))


def test_round_trip():
    c = AnomalyCriteria(min_cluster_size=3, k_range=[2, 4], layer_statistic="mean")
    assert c.k_range == (2, 4) and c.min_probe_size == 5
    assert AnomalyCriteria.from_dict(c.to_dict()) == c


TRUTH_TABLE_CRITERIA = AnomalyCriteria(min_cluster_size=5, ch_ratio=2.0, activation_ratio=1.5)


def truth_table_layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Filters: 0 all three; 1 not unbalanced; 2 CH too low; 3 activation too low; 4 degenerate with all."""
    smallest = torch.tensor([3, 40, 3, 3, 3, 30, 30])
    ch = torch.tensor([100.0, 100.0, 20.0, 100.0, 1e16, 10.0, 10.0], dtype=torch.float64)
    act = torch.tensor([10.0, 10.0, 10.0, 1.0, 50.0, 1.0, 1.0], dtype=torch.float64)
    degenerate = torch.tensor([False, False, False, False, True, False, False])
    return smallest, ch, act, degenerate


def test_truth_table():
    crit = TRUTH_TABLE_CRITERIA
    smallest, ch, act, degenerate = truth_table_layer()
    flags = crit.flag(smallest, ch, act, degenerate)
    # Typical CH is the median over non-degenerate filters (20), unaffected by the 1e16 outlier.
    assert crit.typical(ch, ~degenerate) == 20.0
    assert flags["unbalanced"].tolist() == [True, False, True, True, False, False, False]
    assert flags["high_ch"].tolist() == [True, True, False, True, False, False, False]
    assert flags["high_activation"].tolist() == [True, True, True, False, False, False, False]
    assert flags["anomaly"].tolist() == [True, False, False, False, False, False, False]


def test_mean_statistic_and_empty_layer():
    crit = AnomalyCriteria(layer_statistic="mean")
    assert crit.typical(torch.tensor([1.0, 3.0]), torch.tensor([True, True])) == 2.0
    assert math.isnan(crit.typical(torch.tensor([1.0]), torch.tensor([False])))
    flags = crit.flag(torch.tensor([1]), torch.tensor([math.nan]), torch.tensor([1.0]), torch.tensor([True]))
    assert not flags["anomaly"].any()


def test_fraction_bound_with_and_without_class_labels():
    crit = AnomalyCriteria(min_cluster_size=5, min_cluster_fraction=0.1, label_free_fraction=0.05)
    assert crit.tiny_cluster_limit(256) == 25 and crit.tiny_cluster_limit(20) == 5
    assert crit.tiny_cluster_limit(256, labelled=False) == 12
    args = (
        torch.tensor([10, 20, 30]),
        torch.tensor([10.0] * 3),
        torch.tensor([1.0] * 3),
        torch.tensor([False] * 3),
        256,
    )
    labelled = crit.flag(*args, class_selective=torch.tensor([False] * 3))
    assert labelled["unbalanced"].tolist() == [True, True, False]
    # Without labels the bound stays below one class's share of the probe.
    assert crit.flag(*args)["unbalanced"].tolist() == [True, False, False]
    # Global PCA with labels: class detectors are excluded, but the bound is the label-free one.
    glob = AnomalyCriteria(min_cluster_fraction=0.1, label_free_fraction=0.05, class_conditional=False)
    assert glob.flag(*args, class_selective=torch.tensor([False] * 3))["unbalanced"].tolist() == [True, False, False]


def test_class_selective_rule_and_its_flags():
    crit = AnomalyCriteria(min_cluster_size=2, min_cluster_fraction=0.0, min_separation=0.0, activation_ratio=0.0)
    classes = torch.arange(20) // 5  # four classes of five
    masks = torch.zeros(3, 20, dtype=torch.bool)
    masks[0, :4] = True  # 4 of class 0's 5: a class detector
    masks[1, [0, 5]] = True  # two classes mixed: not one class
    masks[2, :2] = True  # pure, but 2 of 5 (40% < class_coverage 70%)
    selective = crit.class_selective(masks, classes)
    assert selective.tolist() == [True, False, False]
    # The same rule from per-class member counts (how the outlier score applies it to every cluster at once).
    counts = torch.stack([torch.bincount(classes[m], minlength=4) for m in masks])
    assert crit.class_selective_counts(counts, torch.bincount(classes)).tolist() == selective.tolist()
    sizes = masks.sum(1)
    ch = torch.tensor([10.0, 10.0, 10.0], dtype=torch.float64)
    flags = crit.flag(sizes, ch, torch.ones(3), torch.zeros(3, dtype=torch.bool), 20, class_selective=selective)
    # Filter 0 is too big for the bound of 2 anyway; with a looser bound it is class-selective, not an anomaly.
    loose = AnomalyCriteria(
        min_cluster_size=4, min_cluster_fraction=0.0, min_separation=0.0, activation_ratio=0.0, ch_ratio=0.5
    )
    loose_flags = loose.flag(sizes, ch, torch.ones(3), torch.zeros(3, dtype=torch.bool), 20, class_selective=selective)
    assert flags["class_selective"].tolist() == [False, False, False]
    assert loose_flags["class_selective"].tolist() == [True, False, False]
    assert loose_flags["anomaly"].tolist() == [False, True, True]


def test_strength_is_squared_separation_of_tiny_non_class_clusters():
    crit = AnomalyCriteria(min_cluster_size=5, min_cluster_fraction=0.0)
    smallest = torch.tensor([3, 3, 3, 40, 3])
    degenerate = torch.tensor([False, False, True, False, False])
    sep = torch.tensor([6.0, 2.0, 9.0, 9.0, 7.0], dtype=torch.float64)
    selective = torch.tensor([False, False, False, False, True])
    strength = crit.strength(smallest, degenerate, sep, 256, selective)
    # Degenerate, too big and class-selective filters give nothing.
    assert strength.tolist() == pytest.approx([36.0, 4.0, 0.0, 0.0, 0.0])
    # Separation below min_separation still counts, graded: the ranking does not hinge on that threshold.
    flags = crit.flag(smallest, sep, torch.ones(5), degenerate, 256, class_selective=selective, separation=sep)
    assert flags["separated"].tolist() == [True, False, False, True, True]


def test_zero_activation_ratio_turns_the_activation_rule_off():
    crit = AnomalyCriteria(min_cluster_size=5, activation_ratio=0.0)
    smallest, ch = torch.tensor([3, 3, 40]), torch.tensor([10.0, 1.0, 4.0], dtype=torch.float64)
    act = torch.tensor([1e-3, 5.0, 1.0], dtype=torch.float64)
    degenerate = torch.tensor([False, False, False])
    flags = crit.flag(smallest, ch, act, degenerate)
    # Filter 0 has the layer's lowest activation and is still flagged.
    assert flags["high_activation"].all() and flags["anomaly"].tolist() == [True, False, False]
