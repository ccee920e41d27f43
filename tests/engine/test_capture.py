import pytest
import torch
from torch import nn

from lightning_anomaly.engine.capture import capture_layers, reduce_maps, select_layers


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_select_by_name_pattern_and_type(tiny_cnn):
    assert [n for n, _ in select_layers(tiny_cnn)] == ["conv1", "conv2"]
    assert [n for n, _ in select_layers(tiny_cnn, ["conv2"])] == ["conv2"]
    assert [n for n, _ in select_layers(tiny_cnn, ["conv*"])] == ["conv1", "conv2"]
    assert [n for n, _ in select_layers(tiny_cnn, [nn.BatchNorm2d])] == ["bn1"]


def test_unknown_name_lists_valid_ones(tiny_cnn):
    with pytest.raises(ValueError, match=r"'nope' matches no module.*'conv1', 'conv2'"):
        select_layers(tiny_cnn, ["nope"])


def test_no_conv_layer_is_a_clear_error():
    with pytest.raises(ValueError, match=r"has no nn\.Conv2d layer"):
        select_layers(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_bad_layer_spec_type(tiny_cnn):
    with pytest.raises(TypeError, match=r"names, glob patterns or nn\.Module classes"):
        select_layers(tiny_cnn, [3])


def test_modes_restored_and_hooks_removed(tiny_cnn, probe):
    tiny_cnn.train()
    tiny_cnn.bn1.eval()  # a mixed state must come back exactly
    caps = capture_layers(tiny_cnn, probe[0], select_layers(tiny_cnn), 2)
    assert [c.name for c in caps] == ["conv1", "conv2"]
    assert tiny_cnn.training and not tiny_cnn.bn1.training and tiny_cnn.drop.training
    assert hooks_left(tiny_cnn) == 0


def test_hooks_removed_when_forward_raises(tiny_cnn):
    with pytest.raises(RuntimeError):
        capture_layers(tiny_cnn, torch.randn(10, 3, 8, 8), select_layers(tiny_cnn), 2)  # wrong channels
    assert hooks_left(tiny_cnn) == 0
    assert tiny_cnn.training


def test_bn_buffers_untouched(tiny_cnn, probe):
    tiny_cnn.train()
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    capture_layers(tiny_cnn, probe[0], select_layers(tiny_cnn), 2)
    after = tiny_cnn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_module_called_twice_gives_two_sites():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)))

    net = Twice()
    caps = capture_layers(net, torch.randn(12, 2, 6, 6), select_layers(net), 2)
    assert [c.name for c in caps] == ["conv", "conv#1"]
    assert [c.module_name for c in caps] == ["conv", "conv"]


def test_non_4d_output_is_rejected(tiny_cnn, probe):
    with pytest.raises(ValueError, match=r"layer 'head'.*\(N, C, H, W\)"):
        capture_layers(tiny_cnn, probe[0], select_layers(tiny_cnn, ["head"]), 2)
    assert hooks_left(tiny_cnn) == 0


def test_degenerate_filters_detected():
    maps = torch.randn(20, 5, 4, 4)
    maps[:, 1] = 0.0  # dead
    maps[:, 2] = 3.5  # constant
    maps[3, 3, 0, 0] = float("nan")
    maps[:, 4, 1, 1] = float("inf")
    points, explained, activation, reason = reduce_maps(maps, 2)
    assert reason.tolist() == [0, 2, 2, 1, 1]
    assert torch.isfinite(points).all() and torch.isfinite(activation).all()
    assert activation[2].item() == pytest.approx(3.5)
    # Clusterable filters are scaled to unit mean squared norm.
    assert points[0].square().sum(-1).mean().item() == pytest.approx(1.0, rel=1e-4)
    assert 0 < explained[0] <= 1


def test_one_by_one_maps_use_one_dimension():
    points, *_ = reduce_maps(torch.randn(30, 4, 1, 1), 2)
    assert points.shape == (4, 30, 1)


@pytest.mark.parametrize("fmt", ["bf16", "channels_last"])
def test_bf16_and_channels_last_match_float(fmt):
    maps = torch.randn(24, 3, 5, 5)
    ref, *_ = reduce_maps(maps, 2)
    if fmt == "bf16":
        other, *_ = reduce_maps(maps.bfloat16(), 2)
        ref, *_ = reduce_maps(maps.bfloat16().float(), 2)
    else:
        other, *_ = reduce_maps(maps.to(memory_format=torch.channels_last), 2)
    assert other.dtype == torch.float32
    assert torch.allclose(other, ref, atol=1e-5)
