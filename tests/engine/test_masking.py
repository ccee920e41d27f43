import copy

import pytest
import torch
from torch import nn

from lightning_anomaly.engine.masking import (
    apply_channel_mask,
    find_following_batchnorm,
    fold_pruned_state_dict,
    make_permanent,
)


class Block(nn.Module):
    def __init__(self, bias=True, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, bias=bias, groups=groups)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise, no BatchNorm after it
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(self.dw(h).mean((2, 3)))


def outputs(model, x):
    seen = {}
    hooks = [
        model.bn.register_forward_hook(lambda m, a, o: seen.__setitem__("bn", o.detach())),
        model.dw.register_forward_hook(lambda m, a, o: seen.__setitem__("dw", o.detach())),
    ]
    model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_masked_channels_are_exactly_zero_in_train_and_eval(bias, groups):
    torch.manual_seed(0)
    model = Block(bias=bias, groups=groups)
    model.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(6, 4, 5, 5)
    assert find_following_batchnorm(model, x[:2], ["conv", "dw"]) == {"conv": "bn"}
    keep = torch.ones(8, dtype=torch.bool)
    keep[[1, 6]] = False
    apply_channel_mask(model, "conv", keep, "bn")
    apply_channel_mask(model, "dw", keep.roll(1))
    for mode in (True, False):
        model.train(mode)
        seen = outputs(model, x)
        assert seen["bn"][:, ~keep].abs().max().item() == 0.0
        assert seen["bn"][:, keep].abs().max().item() > 0
        assert seen["dw"][:, ~keep.roll(1)].abs().max().item() == 0.0


def test_masks_only_grow_and_keep_the_parameter_objects():
    model = Block()
    weight = model.conv.weight
    first = torch.ones(8, dtype=torch.bool)
    first[0] = False
    apply_channel_mask(model, "conv", first, "bn")
    assert model.conv.weight_orig is weight
    second = torch.ones(8, dtype=torch.bool)
    second[3] = False
    apply_channel_mask(model, "conv", second, "bn")  # channel 0 stays masked
    zero = model.conv.weight.flatten(1).abs().sum(1) == 0
    assert zero.nonzero().flatten().tolist() == [0, 3]


def test_fold_and_make_permanent_give_plain_loadable_weights():
    torch.manual_seed(0)
    model = Block()
    keep = torch.ones(8, dtype=torch.bool)
    keep[2] = False
    apply_channel_mask(model, "conv", keep, "bn")
    x = torch.randn(3, 4, 5, 5)
    model.eval()
    expected = model(x)
    plain = Block().eval()
    plain.load_state_dict(fold_pruned_state_dict(model.state_dict()), strict=True)
    assert torch.equal(plain(x), expected)
    assert make_permanent(model) == 4  # conv weight and bias, BatchNorm weight and bias
    assert set(model.state_dict()) == set(Block().state_dict())
    assert torch.equal(model(x), expected)
    copy.deepcopy(model)  # plain modules copy again


def test_errors():
    model = Block()
    with pytest.raises(ValueError, match=r"not an nn\.Conv2d"):
        apply_channel_mask(model, "head", torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="has 3 entries, the conv has 8 filters"):
        apply_channel_mask(model, "conv", torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="refusing to mask every filter"):
        apply_channel_mask(model, "conv", torch.zeros(8, dtype=torch.bool))
    model.bn = nn.BatchNorm2d(8, affine=False)
    with pytest.raises(ValueError, match="no affine parameters"):
        apply_channel_mask(model, "conv", torch.ones(8, dtype=torch.bool), "bn")


def test_batchnorm_found_only_for_the_conv_it_consumes():
    # conv 0 feeds no BatchNorm; its freed output's id can come back for conv 2's output, which BN 3 takes.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()
    )
    x = torch.randn(2, 3, 8, 8)
    assert find_following_batchnorm(net, x, ["0"]) == {}
    assert find_following_batchnorm(net, x, ["0", "2"]) == {"2": "3"}
