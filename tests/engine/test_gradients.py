import pytest
import torch
from torch import nn

from lightning_anomaly.engine.gradients import per_sample_grad_norms


def manual_norms(model, x, y):
    model.eval()
    out = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        out.append(torch.sqrt(sum(p.grad.double().square().sum() for p in model.parameters())))
        model.zero_grad(set_to_none=True)
    return torch.stack(out)


def test_matches_one_backward_per_sample(tiny_cnn, probe):
    x, y = probe
    tiny_cnn.train()
    ours = per_sample_grad_norms(tiny_cnn, x, y, chunk_size=7)  # ghost norms
    assert tiny_cnn.training  # mode restored
    assert all(p.grad is None for p in tiny_cnn.parameters())
    ref = manual_norms(tiny_cnn, x, y)
    assert torch.allclose(ours, ref, rtol=1e-4)


def test_data_dependent_control_flow(probe):
    class ItemNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            if h.sum().item() > 1e9:  # data-dependent control flow: vmap refuses .item()
                h = h * 0
            return self.fc(h)

    torch.manual_seed(0)
    net = ItemNet()
    x, y = probe
    assert torch.allclose(per_sample_grad_norms(net, x, y), manual_norms(net, x, y), rtol=1e-4)
    with pytest.raises(RuntimeError):  # vmap cannot trace .item(); "auto" never needs it here
        per_sample_grad_norms(net, x, y, method="vmap")


def test_errors(tiny_cnn, probe):
    with pytest.raises(ValueError, match="same length"):
        per_sample_grad_norms(tiny_cnn, probe[0], probe[1][:3])
    frozen = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        per_sample_grad_norms(frozen, *probe)


class Mixed(nn.Module):
    """Grouped, depthwise, strided and dilated convs, BatchNorm, in-place ReLU and a Linear on a sequence."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 4, padding="same", dilation=2, groups=4)
        self.dw = nn.Conv2d(8, 8, 2, padding="same", groups=8, bias=False)  # asymmetric padding
        self.seq = nn.Linear(8, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = nn.functional.relu(self.bn(self.c1(x)), inplace=True)
        h = self.dw(self.c2(h))
        h = h.flatten(2).mT  # (N, T, 8): a Linear applied at every position
        return self.head(self.seq(h).mean(1))


def test_ghost_equals_loop_on_grouped_strided_dilated_and_sequence_layers():
    torch.manual_seed(0)
    net = Mixed()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(12, 2, 9, 9, generator=g), torch.randint(0, 3, (12,), generator=g)
    ghost = per_sample_grad_norms(net, x, y, method="ghost", chunk_size=5)
    assert torch.allclose(ghost, per_sample_grad_norms(net, x, y, method="loop"), rtol=1e-5)
    assert torch.allclose(ghost, per_sample_grad_norms(net, x, y, method="vmap"), rtol=1e-4)


def test_ghost_keeps_float64_models_in_float64():
    # float32 models are computed in float32 (rtol 1e-5 above); a float64 model stays exact to float64.
    torch.manual_seed(0)
    net = Mixed().double()
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 2, 9, 9, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    ghost = per_sample_grad_norms(net, x, y, method="ghost")
    assert torch.allclose(ghost, per_sample_grad_norms(net, x, y, method="loop"), rtol=1e-10)


def test_frozen_parameters_are_left_out(tiny_cnn, probe):
    tiny_cnn.conv1.requires_grad_(False)
    x, y = probe
    assert torch.allclose(
        per_sample_grad_norms(tiny_cnn, x, y, method="ghost"), per_sample_grad_norms(tiny_cnn, x, y, method="loop")
    )


def test_unsupported_layers_fall_back_and_ghost_says_so(probe):
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.norm = nn.LayerNorm([4, 6, 6])
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x)).mean((2, 3)))

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.fc = nn.Linear(1, 3)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    x, y = probe
    for net in (WithNorm(), Shared()):
        auto = per_sample_grad_norms(net, x, y)
        assert torch.allclose(auto, per_sample_grad_norms(net, x, y, method="loop"), rtol=1e-4)
        with pytest.raises(ValueError, match="method='ghost' covers"):
            per_sample_grad_norms(net, x, y, method="ghost")


class SiLUNet(nn.Module):
    """SiLU after conv and BatchNorm: its gradient at 0 is not 0, so masked channels would leak."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = nn.functional.silu(self.bn(self.c1(x)))
        return self.head(nn.functional.silu(self.c2(h)).mean((2, 3)))


def test_ghost_respects_channel_pruning_masks():
    from lightning_anomaly.engine.masking import apply_channel_mask

    torch.manual_seed(0)
    net = SiLUNet()
    keep1 = torch.tensor([True, False, True, True, False, True])
    apply_channel_mask(net, "c1", keep1, "bn")
    apply_channel_mask(net, "c2", torch.tensor([False, True, True, True]), None)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    ghost = per_sample_grad_norms(net, x, y, method="ghost")
    assert torch.allclose(ghost, per_sample_grad_norms(net, x, y, method="loop"), rtol=1e-5)


def test_other_reparametrisations_take_the_exact_fallback():
    from torch.nn.utils import prune

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 1, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)
    unstructured = SiLUNet()
    prune.random_unstructured(unstructured.c2, "weight", amount=0.5)
    normed = SiLUNet()
    normed.c1 = torch.nn.utils.weight_norm(normed.c1)  # weight_g and weight_v
    spectral = SiLUNet()
    spectral.c2 = torch.nn.utils.spectral_norm(spectral.c2)  # weight_orig without a pruning mask
    for net in (unstructured, normed, spectral.eval()):
        with pytest.raises(ValueError, match="method='ghost' covers"):
            per_sample_grad_norms(net, x, y, method="ghost")
        assert torch.allclose(
            per_sample_grad_norms(net, x, y), per_sample_grad_norms(net, x, y, method="loop"), rtol=1e-4
        )


def test_ghost_norm_sums_that_cancel_stay_exact():
    # Inputs centred over positions and a mean over them: the ghost terms cancel almost exactly.
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 64, bias=False)

        def forward(self, x):
            return self.lin(x).mean(1)

    torch.manual_seed(0)
    x = torch.randn(32, 4, 64)
    x = x - x.mean(1, keepdim=True)
    y = torch.randint(0, 64, (32,))
    net = Pooled()
    ghost = per_sample_grad_norms(net, x, y, method="ghost")
    assert torch.isfinite(ghost).all()
    assert torch.allclose(ghost, per_sample_grad_norms(net, x, y, method="loop"), rtol=1e-3, atol=1e-6)


def test_vmap_leaves_no_functorch_wrapper_on_pruned_modules():
    import copy

    from torch.nn.utils import prune

    torch.manual_seed(0)
    net = SiLUNet()
    prune.random_unstructured(net.c2, "weight", amount=0.5)  # its hook caches weight = orig * mask
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(4, 1, 6, 6, generator=g), torch.randint(0, 3, (4,), generator=g)
    per_sample_grad_norms(net, x, y, method="vmap")
    net.c2.weight.data_ptr()  # a real tensor: a leaked functorch wrapper has no storage
    copy.deepcopy(net)


# ---------------------------------------------------------------- conv weight norms tap by tap
def per_sample_weight_sq_norms(conv, x, d):
    """Oracle: one backward per sample, the conv's weight gradient squared and summed in float64."""
    out = []
    for i in range(x.shape[0]):
        w = conv.weight.detach().clone().requires_grad_()
        y = nn.functional.conv2d(x[i : i + 1], w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        (g,) = torch.autograd.grad((y * d[i : i + 1]).sum(), w)
        out.append(g.double().square().sum())
    return torch.stack(out)


@pytest.mark.parametrize("kernel", [1, 3, (2, 3), 5])
@pytest.mark.parametrize("stride", [1, 2, (3, 1)])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, "same"])
def test_tap_by_tap_conv_norm_equals_one_backward_per_sample(monkeypatch, kernel, stride, dilation, groups, padding):
    from lightning_anomaly.engine import gradients

    if padding == "same" and stride != 1:
        pytest.skip("padding='same' needs stride 1")
    monkeypatch.setattr(gradients, "_MIN_TAP_CHANNELS", 1)
    monkeypatch.setattr(gradients, "_ghost_is_cheaper", lambda *a: False)  # always the tap path
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, kernel, stride=stride, dilation=dilation, groups=groups, padding=padding)
    x = torch.randn(4, 8, 11, 14)
    d = torch.randn_like(conv(x))
    ours = gradients._conv_weight_sq_norm(conv, x, d)
    assert ours is not None and ours.dtype == torch.float64
    assert torch.allclose(ours, per_sample_weight_sq_norms(conv, x, d), rtol=1e-5)


def test_tap_path_is_chosen_on_large_maps_and_whole_model_norms_match_the_loop():
    from lightning_anomaly.engine import gradients

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1),  # 16 channels at 16x16: tap by tap
        nn.ReLU(),
        nn.Conv2d(16, 12, 3, stride=2, padding=1),  # strided: tap by tap through polyphase parts
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12 * 8 * 8, 3),
    )
    x, y = torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    h = net[1](net[0](x)).clone()
    assert gradients._conv_weight_sq_norm(net[2], h, torch.randn(6, 16, 16, 16)) is not None
    assert gradients._conv_weight_sq_norm(net[0], x, torch.randn(6, 16, 16, 16)) is None  # one input channel
    ours = per_sample_grad_norms(net, x, y, method="ghost")
    assert torch.allclose(ours, manual_norms(net, x, y), rtol=1e-5)
