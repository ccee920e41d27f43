import pytest
import torch
from torch import nn

from lightning_anomaly.ablation import ablate_filters


class SignNet(nn.Module):
    """Filter 0 averages the input and decides the class; filter 1 is ignored by the head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0] = 1.0 / 9
            self.conv.weight[1] = 0.01
            self.conv.bias.zero_()
            self.head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
            self.head.bias.zero_()
        self.eval()

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


def data():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (64,), generator=g)
    x = torch.randn(64, 1, 6, 6, generator=g) * 0.1 + (y.float() * 2 - 1).view(-1, 1, 1, 1)
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def test_deltas_follow_what_the_filters_do():
    net = SignNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = ablate_filters(net, {"conv": [0, 1]}, {"val": data()}, baseline="l1")
    assert out["base"]["val"] == 1.0
    single = {d["filter"]: d["delta"]["val"] for d in out["single"]}
    assert single[1] == 0.0  # the head ignores filter 1
    assert single[0] < -0.3  # without filter 0 the logits tie: chance level
    assert out["all"]["delta"]["val"] == single[0] and out["all"]["n"] == 2
    assert sorted(out["baseline"]["filters"]) == [("conv", 0), ("conv", 1)]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the model is untouched


def test_l1_and_random_baselines_pick_the_same_number():
    net = SignNet()
    out = ablate_filters(net, [("conv", 0)], {"val": data()}, baseline="l1", single=False)
    assert out["baseline"]["filters"] == [("conv", 1)]  # the smallest weights
    assert out["baseline"]["delta"]["val"] == 0.0 and out["single"] == []
    rand = ablate_filters(net, [("conv", 0)], {"val": data()}, baseline="random", seed=3)
    assert len(rand["baseline"]["filters"]) == 1


def test_errors():
    net = SignNet()
    with pytest.raises(ValueError, match=r"'head' is not an nn\.Conv2d"):
        ablate_filters(net, {"head": [0]}, {"val": data()})
    with pytest.raises(ValueError, match="filter 5 of 'conv' does not exist"):
        ablate_filters(net, {"conv": [5]}, {"val": data()})
    with pytest.raises(ValueError, match="baseline must be"):
        ablate_filters(net, {"conv": [0]}, {"val": data()}, baseline="magnitude")
