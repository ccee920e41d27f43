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


def _svd_points(maps, groups, q):
    """Oracle in float64: class means removed, exact SVD, scores scaled to unit mean squared norm."""
    n, c = maps.shape[:2]
    x = maps.double().reshape(n, c, -1).transpose(0, 1)  # (C, N, D)
    ids = groups if groups is not None else torch.zeros(n, dtype=torch.long)
    for g in ids.unique():
        rows = ids == g
        x[:, rows] -= x[:, rows].mean(1, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    scores = u[..., :q] * s[:, None, :q]
    scores = scores / scores.square().sum(-1).mean(-1).sqrt()[:, None, None]
    explained = s[:, :q].square().sum(-1) / s.square().sum(-1)
    return scores, explained


@pytest.mark.parametrize("with_groups", [True, False])
@pytest.mark.parametrize("shape", [(6, 6), (20, 20)])  # D <= N: covariance; D > N: Gram matrix
def test_reduce_maps_matches_exact_svd_across_chunks(monkeypatch, with_groups, shape):
    from lightning_anomaly.engine import capture

    monkeypatch.setattr(capture, "_REDUCE_CHUNK_BYTES", 3 * 64 * shape[0] * shape[1] * 4)  # chunks of 3 filters
    g = torch.Generator().manual_seed(0)
    n, c = 64, 8
    groups = torch.arange(n) % 4 if with_groups else None
    # Class offsets and a large common mean on top of a few strong directions per filter.
    scores = torch.randn(c, n, 3, generator=g) * torch.tensor([4.0, 2.0, 0.5])
    maps = (scores @ torch.randn(c, 3, shape[0] * shape[1], generator=g)).transpose(0, 1).reshape(n, c, *shape)
    maps = maps + 0.05 * torch.randn(n, c, *shape, generator=g) + 3.0
    if with_groups:
        maps = maps + torch.randn(4, c, *shape, generator=g)[groups]
    maps[:, 4] = float("nan")  # a non-finite filter inside the second chunk
    points, explained, activation, reason = reduce_maps(maps, 2, groups=groups)
    assert reason.tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    ref, ref_explained = _svd_points(torch.nan_to_num(maps), groups, 2)
    for f in [0, 1, 2, 3, 5, 6, 7]:
        sign = torch.sign((points[f].double() * ref[f]).sum(0))
        assert torch.allclose(points[f].double() * sign, ref[f], atol=1e-3)
        assert explained[f].item() == pytest.approx(ref_explained[f].item(), rel=1e-4)
        assert activation[f].item() == pytest.approx(maps[:, f].double().abs().mean().item(), rel=1e-6)
    assert activation[4] == 0 and (points[4] == 0).all()


@pytest.mark.parametrize("pca", ["batched", "sklearn"])
@pytest.mark.parametrize("shape", [(6, 6), (20, 20)])  # D <= N: covariance; D > N: Gram matrix
def test_the_global_view_equals_reducing_without_groups(monkeypatch, shape, pca):
    from lightning_anomaly.engine import capture
    from lightning_anomaly.engine.pca import batched_pca
    from lightning_anomaly.engine.reference import sklearn_pca

    pca_fn = batched_pca if pca == "batched" else sklearn_pca
    monkeypatch.setattr(capture, "_REDUCE_CHUNK_BYTES", 3 * 64 * shape[0] * shape[1] * 4)  # chunks of 3 filters
    g = torch.Generator().manual_seed(4)
    n, c = 64, 7
    groups = torch.arange(n) % 5
    scores = torch.randn(c, n, 3, generator=g) * torch.tensor([4.0, 2.0, 0.5])
    maps = (scores @ torch.randn(c, 3, shape[0] * shape[1], generator=g)).transpose(0, 1).reshape(n, c, *shape)
    maps = maps + torch.randn(5, c, *shape, generator=g)[groups] + 2.0
    maps[:, 2] = float("nan")  # non-finite in both views
    maps[:, 5] = torch.randn(5, 1, *shape, generator=g)[groups, 0]  # all its spread is between the classes
    global_points = torch.zeros(c, n, 2)
    global_reason = torch.zeros(c, dtype=torch.int8)
    with_global = reduce_maps(maps, 2, pca_fn, groups=groups, global_out=(global_points, global_reason))
    alone = reduce_maps(maps, 2, pca_fn, groups=groups)
    flat = reduce_maps(maps, 2, pca_fn)
    # The class-conditional view is untouched by computing the global one beside it.
    for a, b in zip(with_global, alone, strict=True):
        assert torch.equal(a, b)
    # The global view is what reducing without groups gives (up to each component's sign).
    assert global_reason.tolist() == flat[3].tolist() == [0, 0, 1, 0, 0, 0, 0]
    for f in [0, 1, 3, 4, 5, 6]:
        sign = torch.sign((global_points[f] * flat[0][f]).sum(0))
        assert torch.allclose(global_points[f] * sign, flat[0][f], atol=2e-4)


def test_constant_detection_is_relative_and_survives_a_large_mean():
    g = torch.Generator().manual_seed(0)
    maps = torch.full((32, 3, 8, 8), 1000.0)
    maps[:, 1] += 1e-4 * torch.randn(32, 8, 8, generator=g)  # spread 1e-7 of the mean: below float32, constant
    maps[:, 2] += 1e-1 * torch.randn(32, 8, 8, generator=g)  # a real spread under a large mean
    _, _, activation, reason = reduce_maps(maps, 2, groups=torch.arange(32) % 2)
    assert reason.tolist() == [2, 2, 0]
    assert activation[0].item() == pytest.approx(1000.0)
