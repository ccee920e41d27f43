"""Every conv filter of real torchvision architectures is analysed, with finite results (small inputs, fast)."""

import pytest
import torch
import torchvision
from torch import nn

from lightning_anomaly import AnomalyCriteria, analyze

ARCHS = {
    "resnet18": 32,
    "vgg11_bn": 32,
    "mobilenet_v3_small": 32,
    "shufflenet_v2_x0_5": 32,
    "squeezenet1_0": 48,
}


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_conv_filter_is_covered(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=5)
    size = ARCHS[name]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 3, size, size, generator=g), torch.randint(0, 5, (10,), generator=g)
    report = analyze(model, x, y, criteria=AnomalyCriteria(k_range=(2, 3)))
    assert report.n_filters == sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    for layer in report.layers.values():
        ok = ~layer.degenerate
        assert torch.isfinite(layer.ch[ok]).all()
        assert ((layer.k[ok] >= 2) & (layer.k[ok] <= 3)).all()
        assert layer.n_components == min(2, layer.map_shape[0] * layer.map_shape[1])
    assert torch.isfinite(report.grad_norms).all() and (report.grad_norms > 0).all()
