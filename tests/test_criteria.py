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


def test_fraction_bound():
    crit = AnomalyCriteria(min_cluster_size=5, min_cluster_fraction=0.1)
    assert crit.tiny_cluster_limit(256) == 25 and crit.tiny_cluster_limit(20) == 5
    flags = crit.flag(
        torch.tensor([20, 30]), torch.tensor([10.0, 10.0]), torch.tensor([1.0, 1.0]), torch.tensor([False, False]), 256
    )
    assert flags["unbalanced"].tolist() == [True, False]


def test_strength_grades_the_rules_and_is_one_exactly_for_full_passes():
    crit = TRUTH_TABLE_CRITERIA
    smallest, ch, act, degenerate = truth_table_layer()
    strength = crit.strength(smallest, ch, act, degenerate)
    flags = crit.flag(smallest, ch, act, degenerate)
    # Typical CH 20 -> threshold 40; typical activation 1 -> threshold 1.5.
    expected = [1.0, 0.0, 20.0 / 40.0, 1.0 / 1.5, 0.0, 0.0, 0.0]
    assert strength.tolist() == pytest.approx(expected)
    assert (strength[flags["anomaly"]] == 1.0).all()
    assert ((strength >= 0) & (strength <= 1)).all()


def test_zero_activation_ratio_turns_the_activation_rule_off():
    crit = AnomalyCriteria(min_cluster_size=5, activation_ratio=0.0)
    smallest, ch = torch.tensor([3, 3, 40]), torch.tensor([10.0, 1.0, 4.0], dtype=torch.float64)
    act = torch.tensor([1e-3, 5.0, 1.0], dtype=torch.float64)
    degenerate = torch.tensor([False, False, False])
    flags = crit.flag(smallest, ch, act, degenerate)
    # Filter 0 has the layer's lowest activation and is still flagged.
    assert flags["high_activation"].all() and flags["anomaly"].tolist() == [True, False, False]
    # The activation factor is 1 for all; filter 1 reaches 1/4 of the CH threshold (median 4).
    assert crit.strength(smallest, ch, act, degenerate).tolist() == pytest.approx([1.0, 0.25, 0.0])
