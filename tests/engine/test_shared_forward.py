"""The gradient pass's forward also feeds the capture (``MapStash``): same report, one probe forward less."""

import importlib

import pytest
import torch
from torch import nn

from lightning_anomaly import AnomalyCriteria, analyze
from lightning_anomaly.engine.capture import MapStash, capture_layers, select_layers

analyze_module = importlib.import_module("lightning_anomaly.engine.analyze")
CRITERIA = AnomalyCriteria(k_range=(2, 4))


class _Residual(nn.Module):
    """Convs whose outputs later operations change in place (ReLU(inplace=True), ``out += x``)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.body = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.stem(x)))
        res = self.body(out)
        res += out
        return self.head(self.act(res).mean((2, 3)))


class _Counted:
    """Counts the model's top-level forwards (each chunk of the gradient pass is one)."""

    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, *_: object) -> None:
        self.calls += 1


def _data(n: int = 150, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3


def _assert_same_reports(a, b) -> None:
    assert list(a.layers) == list(b.layers)
    for name in a.layers:
        la, lb = a.layers[name], b.layers[name]
        assert torch.equal(la.k, lb.k), name
        assert torch.equal(la.anomaly, lb.anomaly), name
        assert torch.allclose(la.ch, lb.ch, rtol=1e-4, equal_nan=True), name
        assert torch.allclose(la.activation, lb.activation, rtol=1e-5), name
    assert torch.allclose(a.grad_norms, b.grad_norms, rtol=1e-6)
    assert torch.allclose(a.outlier_scores, b.outlier_scores, atol=1e-5)


def _separate(monkeypatch, model, x, y, **kwargs):
    """The analysis with the stash's budget at zero: the capture runs its own forward."""
    with monkeypatch.context() as m:
        m.setattr(analyze_module, "_STASH_BYTES", 0)
        return analyze(model, x, y, **kwargs)


def test_the_shared_forward_gives_the_separate_passes_report_with_one_forward_less(monkeypatch):
    torch.manual_seed(0)
    model = _Residual()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    x, y = _data()
    counter = _Counted(model)
    shared = analyze(model, x, y, criteria=CRITERIA)
    shared_calls, counter.calls = counter.calls, 0
    separate = _separate(monkeypatch, model, x, y, criteria=CRITERIA)
    counter.handle.remove()
    chunks = -(-150 // 64)  # per_sample_grad_norms' default chunk of 64 samples
    assert shared_calls == chunks
    assert counter.calls == chunks + 1
    _assert_same_reports(shared, separate)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_module_called_twice_is_split_into_its_calls_as_the_capture_does(monkeypatch):
    torch.manual_seed(0)
    model = _Residual()
    x, y = _data(100)
    # The shared ReLU runs twice per forward: the stash must give the capture's "act" and "act#1".
    shared = analyze(model, x, y, criteria=CRITERIA, layers=["stem", "act"])
    separate = _separate(monkeypatch, model, x, y, criteria=CRITERIA, layers=["stem", "act"])
    assert list(shared.layers) == ["stem", "act", "act#1"]
    _assert_same_reports(shared, separate)


def test_the_stash_matches_capture_layers_and_gives_up_past_its_budget():
    torch.manual_seed(0)
    model = _Residual().eval()
    x, _ = _data(70)
    layers = select_layers(model)
    stash = MapStash(layers, 70, max_bytes=1 << 30)
    handles = stash.attach()
    with torch.no_grad():
        for lo in range(0, 70, 32):  # chunks of 32, 32 and 6
            model(x[lo : lo + 32])
    for h in handles:
        h.remove()
    assert stash.held == 70 * (6 + 6) * 64 * 4
    got = stash.captures(2)
    want = capture_layers(model, x, layers, 2)
    assert got is not None and [c.name for c in got] == [c.name for c in want]
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a.points.abs(), b.points.abs(), atol=1e-5)  # PCA signs may differ
        assert torch.equal(a.reason, b.reason)

    small = MapStash(layers, 70, max_bytes=70 * 6 * 64 * 4)  # room for one layer's maps only
    handles = small.attach()
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    assert small.failed and small.held == 0
    assert small.captures(2) is None


def test_a_stash_whose_calls_do_not_cover_the_probe_gives_up():
    torch.manual_seed(0)
    model = _Residual().eval()
    x, _ = _data(40)
    stash = MapStash(select_layers(model), 40, max_bytes=1 << 30)
    handles = stash.attach()
    with torch.no_grad():
        model(x[:30])  # a forward of part of the probe only
    for h in handles:
        h.remove()
    assert stash.captures(2) is None


def test_a_loss_that_fails_raises_its_own_error_and_leaves_no_hook():
    torch.manual_seed(0)
    model = _Residual()
    x, _ = _data(40)

    def bad_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("the loss cannot take these targets")

    with pytest.raises(RuntimeError, match="the loss cannot take these targets"):
        analyze(model, x, torch.zeros(40, dtype=torch.long), criteria=CRITERIA, loss_fn=bad_loss)
    assert all(not m._forward_hooks for m in model.modules())
