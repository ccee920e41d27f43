import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from lightning_anomaly import AnalysisReport, AnomalyCriteria, analyze
from lightning_anomaly.engine.outliers import merge_reports, score_outliers, view_score
from lightning_anomaly.engine.scores import separation
from tests.helpers import Planted, planted_probe


def test_planted_anomaly_filter_and_its_samples_are_found():
    model = Planted()
    x = planted_probe()
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(2))
    report = analyze(model, x, y)
    layer = report.layers["conv"]
    assert layer.anomaly.tolist() == [False] * 7 + [True]
    assert layer.min_cluster_size[7].item() == 4
    assert report.outlier_indices == [0, 1, 2, 3]
    assert report.grad_norms is not None and report.grad_norms.shape == (64,)
    assert report.gradient_ratio is not None and report.gradient_ratio > 0
    # Each criterion is reported on its own and the anomaly flag is their conjunction.
    assert torch.equal(
        layer.anomaly,
        layer.unbalanced & layer.high_ch & layer.high_activation & layer.separated & ~layer.class_selective,
    )
    # The trigger group stands far from the rest; the other filters' smallest clusters do not.
    assert layer.separation[7] > 10 and (layer.separation[:7] < 5).all()
    # The anomaly filter's points and labels are kept for plots; its tiny cluster is the triggered samples.
    # Anomaly filters come first, then other filters that score samples (by separation).
    kept = layer.point_filters.tolist()
    assert kept[0] == 7 and layer.points.shape == (len(kept), 64, 2)
    assert layer.separation[kept[1:]].tolist() == sorted(layer.separation[kept[1:]].tolist(), reverse=True)
    tiny = torch.bincount(layer.point_labels[0].long()).argmin()
    assert (layer.point_labels[0] == tiny).nonzero().flatten().tolist() == [0, 1, 2, 3]


def test_reference_backend_finds_the_same_planted_filter():
    report = analyze(Planted(), planted_probe(), backend="sklearn")
    assert report.layers["conv"].anomaly_indices == [7]
    assert report.outlier_indices == [0, 1, 2, 3]


def test_dead_and_nan_filters_are_degenerate_not_anomalies():
    model = Planted()
    with torch.no_grad():
        model.conv.weight[0] = 0.0  # dead: constant zero maps
        model.conv.bias[1] = float("nan")
    report = analyze(model, planted_probe())
    layer = report.layers["conv"]
    assert layer.degenerate[:2].tolist() == [True, True]
    assert layer.reason[:2].tolist() == [2, 1]
    assert not layer.anomaly[:2].any()
    assert torch.isnan(layer.ch[:2]).all() and layer.k[:2].tolist() == [0, 0]
    # Typical values come from the clusterable filters only.
    ok = ~layer.degenerate
    assert layer.ch_typical == pytest.approx(float(layer.ch[ok].median()))
    assert layer.anomaly_indices == [7]


def test_same_seed_same_report(tiny_cnn, probe):
    a = analyze(tiny_cnn, *probe, seed=3)
    b = analyze(tiny_cnn, *probe, seed=3)
    for name in a.layers:
        da, db = a.layers[name].to_dict(), b.layers[name].to_dict()
        for key, va in da.items():
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, db[key]) or torch.allclose(va, db[key], equal_nan=True), key
    assert torch.equal(a.grad_norms, b.grad_norms)


def test_global_rng_modes_and_hooks_untouched(tiny_cnn, probe):
    tiny_cnn.train()
    torch.manual_seed(7)
    state = torch.get_rng_state()
    analyze(tiny_cnn, *probe)
    assert torch.equal(state, torch.get_rng_state())
    assert all(m.training for m in tiny_cnn.modules())
    assert sum(len(m._forward_hooks) for m in tiny_cnn.modules()) == 0
    assert all(p.grad is None for p in tiny_cnn.parameters())


def test_probe_too_small_names_the_fix(tiny_cnn):
    with pytest.raises(ValueError, match=r"4 samples, fewer than max\(k_range\)\+1=7; use at least 7"):
        analyze(tiny_cnn, torch.randn(4, 1, 8, 8))


def test_model_without_conv_is_a_clear_error():
    with pytest.raises(ValueError, match=r"no nn\.Conv2d layer"):
        analyze(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)), torch.randn(10, 1, 8, 8))


def test_bad_arguments(tiny_cnn, probe):
    with pytest.raises(ValueError, match="backend must be"):
        analyze(tiny_cnn, probe[0], backend="jax")
    with pytest.raises(TypeError, match="criteria must be an AnomalyCriteria"):
        analyze(tiny_cnn, probe[0], criteria={"min_cluster_size": 3})
    with pytest.raises(ValueError, match="one entry per probe sample"):
        analyze(tiny_cnn, probe[0], probe[1][:5])
    with pytest.raises(ValueError, match=r"inputs must be a tensor of shape \(N, ...\)"):
        analyze(tiny_cnn, [1, 2, 3])


def test_bf16_model_and_channels_last_inputs(tiny_cnn, probe):
    ref = analyze(tiny_cnn, probe[0])
    cl = analyze(tiny_cnn.to(memory_format=torch.channels_last), probe[0].to(memory_format=torch.channels_last))
    assert torch.equal(ref.layers["conv1"].k, cl.layers["conv1"].k)
    bf = analyze(tiny_cnn.to(torch.bfloat16), probe[0])
    assert bf.n_filters == ref.n_filters
    assert all(torch.isfinite(lr.ch[~lr.degenerate]).all() for lr in bf.layers.values())


def test_report_round_trips_through_weights_only_load_and_json():
    report = analyze(Planted(), planted_probe(), torch.zeros(64, dtype=torch.long))
    buf = io.BytesIO()
    torch.save(report.to_dict(), buf)
    buf.seek(0)
    back = AnalysisReport.from_dict(torch.load(buf, weights_only=True))
    assert back.anomaly_count == report.anomaly_count
    assert back.outlier_indices == report.outlier_indices
    assert torch.equal(back.layers["conv"].labels, report.layers["conv"].labels)
    via_json = AnalysisReport.from_dict(json.loads(json.dumps(report.to_dict(tensors="list"))))
    assert torch.allclose(via_json.layers["conv"].ch, report.layers["conv"].ch, equal_nan=True)
    assert via_json.gradient_ratio == pytest.approx(report.gradient_ratio)


def test_no_outlier_means_no_gradient_ratio(tiny_cnn, probe):
    crit = AnomalyCriteria(min_cluster_size=1, ch_ratio=1e9)
    report = analyze(tiny_cnn, *probe, criteria=crit)
    assert report.anomaly_count == 0
    assert report.gradient_ratio is None and report.outlier_grad_norm is None
    assert report.summary()["gradient_ratio"] is None


def test_layers_argument_and_progress_callback(tiny_cnn, probe):
    seen = []
    report = analyze(tiny_cnn, probe[0], layers=["conv2"], on_layer=seen.append)
    assert list(report.layers) == ["conv2"] == seen


def test_reflag_equals_a_fresh_analysis_with_the_new_rules():
    model, x = Planted(), planted_probe()
    strict = AnomalyCriteria(ch_ratio=1e6)
    fresh = analyze(model, x, criteria=strict)
    again = analyze(model, x).reflag(strict)
    assert fresh.anomaly_count == again.anomaly_count == 0
    for name in fresh.layers:
        for key in ("unbalanced", "high_ch", "high_activation", "anomaly"):
            assert torch.equal(getattr(fresh.layers[name], key), getattr(again.layers[name], key))
    assert torch.equal(fresh.outlier_counts, again.outlier_counts)
    with pytest.raises(ValueError, match=r"reflag cannot change clustering settings \['k_range'\]"):
        fresh.reflag(AnomalyCriteria(k_range=(2, 3)))


def test_outlier_scores_rank_the_planted_group_whatever_the_flags():
    model, x = Planted(), planted_probe()
    report = analyze(model, x)
    assert report.outlier_scores is not None and report.outlier_scores.dtype == torch.float64
    # Without class labels there is one view; its score is scaled to a maximum of 1.
    assert report.layers["conv"].score_parts.shape == (1, 64)
    assert float(report.outlier_scores.max()) == pytest.approx(1.0)
    assert sorted(report.top_outliers(4)) == [0, 1, 2, 3]
    # A CH rule no filter meets: no anomaly, no count, but the ranking is the analysis's own and
    # still names the triggered samples: it does not hinge on the hard flags.
    strict = report.reflag(AnomalyCriteria(ch_ratio=1e6))
    assert strict.anomaly_count == 0 and int(strict.outlier_counts.sum()) == 0
    assert strict.outlier_scores is not None
    assert torch.equal(strict.outlier_scores, report.outlier_scores)
    assert strict.top_outliers(4) == report.top_outliers(4)


def _separation_oracle(points: np.ndarray, members: np.ndarray) -> tuple[float, np.ndarray]:
    """The group's separation and each point's own distance from the rest along the means' line."""
    inside, outside = points[members], points[~members]
    resid = np.concatenate([inside - inside.mean(0), outside - outside.mean(0)])
    sd = np.sqrt((resid**2).sum() / ((len(points) - 2) * points.shape[1]))
    axis = inside.mean(0) - outside.mean(0)
    own = np.maximum((points - outside.mean(0)) @ (axis / np.linalg.norm(axis)) / sd, 0.0)
    return float(np.linalg.norm(axis) / sd), own


@pytest.mark.parametrize("dims", [1, 2])  # 1: layers of 1x1 maps, scored in their own dimension
def test_view_score_matches_a_per_cluster_loop(dims):
    g = torch.Generator().manual_seed(3)
    b, n, limit = 4, 30, 12
    points = torch.randn(b, n, dims, generator=g, dtype=torch.float64) + 5.0  # off-centre: the score centres
    classes = torch.randint(1, 3, (n,), generator=g)
    classes[:8] = 0  # class 0 is the first 8 samples
    labels = torch.stack([torch.randint(0, k, (b, n), generator=g) for k in (2, 3, 4)])
    labels[1, 2] = -1  # k=3 failed for filter 2
    labels[2, 0] = (torch.arange(n) >= 8).long() * 3  # filter 0 at k=4: the class-0 block is a cluster
    points[0, :8] += 3.0  # and lies apart
    crit = AnomalyCriteria(class_purity=0.8, class_coverage=0.5, score_separation=0.4)
    expected = np.zeros(n)
    pts, lab_np, cls = points.numpy(), labels.numpy(), classes.numpy()
    for ki in range(labels.shape[0]):
        for f in range(b):
            lab = lab_np[ki, f]
            if (lab < 0).any():
                continue
            sizes = np.bincount(lab)
            for j in np.nonzero(sizes)[0]:
                if j == sizes.argmax() or sizes[j] > limit:
                    continue
                m = lab == j
                per_label = np.bincount(cls[m], minlength=3)
                top = per_label.argmax()
                if per_label[top] >= 0.8 * m.sum() and per_label[top] >= 0.5 * (cls == top).sum():
                    continue  # a class, not an anomaly
                sep, own = _separation_oracle(pts[f], m)
                if sep >= 0.4:  # closer clusters are tail cuts of one blob
                    expected[m] += sep * (sep + own[m]) / 2 / labels.shape[0]
    got = view_score(points, labels, limit, crit, classes)
    assert expected.sum() > 0
    assert float(view_score(points, labels, limit, AnomalyCriteria(score_separation=0.0), classes).sum()) > float(
        got.sum()
    )
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-12)
    # The class-0 block of filter 0 (k=4) is a class: without class labels it counts.
    free = view_score(points, labels, limit, crit)
    assert float(free[:8].sum()) > float(got[:8].sum())


def test_members_of_one_group_rank_by_how_far_they_lie_and_average_its_squared_separation():
    g = torch.Generator().manual_seed(5)
    n = 80
    points = torch.randn(1, n, 2, generator=g, dtype=torch.float64)
    points[0, :6, 0] += torch.tensor([10.0, 14.0, 18.0, 22.0, 26.0, 30.0], dtype=torch.float64)  # a spread-out group
    group = (torch.arange(n) < 6).long()
    score = view_score(points, group[None, None], limit=10, criteria=AnomalyCriteria())
    assert score[6:].eq(0).all()
    # The further out, the higher: the group is ordered by the data, not only by its membership.
    assert bool((score[:6].diff() > 0).all())
    sep = float(separation(points, group[None].bool())[0])
    assert float(score[:6].mean()) == pytest.approx(sep**2, rel=1e-9)


def test_a_group_that_is_most_but_not_all_of_its_label_still_scores():
    # Ten classes of ten; one filter splits off 6 of class 0's 10 samples (a relabelled backdoor that is
    # most of its target label), another splits off all of class 1 (a class detector).
    g = torch.Generator().manual_seed(0)
    n = 100
    classes = torch.arange(n) // 10
    points = torch.randn(2, n, 2, generator=g, dtype=torch.float64)
    group = torch.zeros(n, dtype=torch.bool)
    group[:6] = True
    points[0, group] += 30.0
    points[1, classes == 1] += 30.0
    labels = torch.stack([group.long(), (classes == 1).long()])[None]  # one k, two filters
    default = view_score(points, labels, 20, AnomalyCriteria(), classes)
    assert bool(default[:6].gt(0).all()) and bool(default[6:].eq(0).all())  # the class detector adds nothing
    # At the old coverage bound of one half, 6 of 10 was read as the class and the group scored nothing.
    half = view_score(points, labels, 20, AnomalyCriteria(class_coverage=0.5), classes)
    assert bool(half.eq(0).all())


def test_score_adds_a_global_view_when_classes_are_known(tiny_cnn, probe):
    x, y = probe
    with_classes = analyze(tiny_cnn, x, y)
    one_view = analyze(tiny_cnn, x, y, criteria=AnomalyCriteria(global_view=False))
    no_classes = analyze(tiny_cnn, x)
    n = x.shape[0]
    assert all(lr.score_parts.shape == (2, n) for lr in with_classes.layers.values())
    assert all(lr.score_parts.shape == (1, n) for lr in one_view.layers.values())
    assert all(lr.score_parts.shape == (1, n) for lr in no_classes.layers.values())
    # The class-conditional view is the same clustering with or without the global one.
    for name, lr in one_view.layers.items():
        assert torch.equal(lr.labels, with_classes.layers[name].labels)
        assert torch.allclose(lr.score_parts[0], with_classes.layers[name].score_parts[0])
    # The score: the root of each view's sum over layers, scaled to a maximum of 1, then added.
    total = torch.stack([lr.score_parts for lr in with_classes.layers.values()]).sum(0).sqrt()
    expected = (total / total.amax(1, keepdim=True)).sum(0)
    assert with_classes.outlier_scores is not None
    assert torch.allclose(with_classes.outlier_scores, expected)
    assert torch.allclose(score_outliers(with_classes.layers.values(), n), expected)


def test_outlier_scores_survive_round_trips_and_merges(tiny_cnn, probe):
    report = analyze(tiny_cnn, probe[0], criteria=AnomalyCriteria(ch_ratio=0.5, activation_ratio=0.5))
    back = AnalysisReport.from_dict(json.loads(json.dumps(report.to_dict(tensors="list"))))
    assert back.outlier_scores is not None and torch.allclose(back.outlier_scores, report.outlier_scores)
    names = list(report.layers)
    parts = [
        AnalysisReport(
            layers=type(report.layers)((n, report.layers[n]) for n in group),
            n_samples=report.n_samples,
            outlier_counts=torch.zeros(report.n_samples, dtype=torch.long),
            criteria=report.criteria,
        )
        for group in (names[:1], names[1:])
    ]
    merged = merge_reports(parts, names)
    assert torch.allclose(merged.outlier_scores, report.outlier_scores)
    assert torch.equal(merged.outlier_counts, report.outlier_counts)
    # Reports saved before scores existed load with None and rank by count.
    old = report.to_dict()
    del old["outlier_scores"]
    legacy = AnalysisReport.from_dict(old)
    assert legacy.outlier_scores is None
    assert (
        legacy.top_outliers() == sorted(report.outlier_indices, key=lambda i: (-int(report.outlier_counts[i]), i))[:32]
    )


def test_reflag_of_a_report_saved_without_labels_names_the_fix():
    report = analyze(Planted(), planted_probe())
    light = AnalysisReport.from_dict(report.to_dict(tensors="list", labels=False))
    assert light.anomaly_count == report.anomaly_count  # flags survive, labels do not
    with pytest.raises(ValueError, match=r"no cluster labels .*to_dict\(labels=False\)"):
        light.reflag(AnomalyCriteria(ch_ratio=2.0))


class ClassAndTrigger(nn.Module):
    """Filter 0 answers a whole class (a patch every class-0 sample carries); filter 1 answers a
    trigger that 3 samples of class 1 carry; filters 2-5 read noise."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[1, 1] = 1.0
            self.conv.weight[2:, 2] = torch.randn(4, 3, 3, generator=g) * 0.3
            self.conv.bias.zero_()
        self.head = nn.Linear(6, 8)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def class_and_trigger_probe() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    y = torch.arange(64) % 8  # 8 balanced classes of 8 samples: a class is 12.5% of the probe
    x = torch.randn(64, 3, 8, 8, generator=g) * 0.3
    x[y == 0, 0, 2:5, 2:5] += 6.0  # the class-0 feature
    x[[1, 9, 17], 1, :3, :3] += 8.0  # a trigger on 3 of the 8 samples of class 1
    return x, y


def test_a_class_detector_is_class_selective_and_a_sub_class_group_is_the_anomaly():
    model, (x, y) = ClassAndTrigger(), class_and_trigger_probe()
    report = analyze(model, x, y)
    layer = report.layers["conv"]
    assert layer.anomaly.tolist() == [False, True, False, False, False, False]
    assert sorted(report.top_outliers(3)) == [1, 9, 17]
    assert report.outlier_indices == [1, 9, 17]
    # Had the trigger reached half of its class, the group would be that class's structure, not a
    # handful of samples: class-selective by the same rule.
    assert AnomalyCriteria().class_selective(layer.small_cluster_masks(torch.tensor([1])), y).tolist() == [False]
    # Judged on the raw maps (no class removal) with a bound above a class's share, the class
    # detector's tiny cluster is class 0: it is named class-selective, never an anomaly.
    loose = AnomalyCriteria(class_conditional=False, label_free_fraction=0.2)
    glob = analyze(model, x, y, criteria=loose).layers["conv"]
    assert glob.class_selective[0] and not glob.anomaly[0]
    assert glob.anomaly[1] and not glob.class_selective[1]
    assert analyze(model, x, y, criteria=loose).class_selective_count >= 1
    # Without labels nothing tells a class from a group: the same bound flags the class detector,
    # which is why the label-free bound stays below a class's share by default.
    blind = analyze(model, x, criteria=loose).layers["conv"]
    assert blind.anomaly[0] and not blind.class_selective.any()
    assert not analyze(model, x).layers["conv"].anomaly[0]


class _Twice(nn.Module):
    """One conv applied twice: two sites of one module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


def test_a_repeated_module_gives_sites_that_name_their_module_and_call():
    torch.manual_seed(0)
    report = analyze(_Twice(), torch.randn(24, 3, 8, 8), criteria=AnomalyCriteria(k_range=(2, 3)))
    assert [(n, lr.module, lr.call) for n, lr in report.layers.items()] == [("conv", "conv", 0), ("conv#1", "conv", 1)]
    back = AnalysisReport.from_dict(json.loads(json.dumps(report.to_dict(tensors="list"))))
    assert [(lr.module, lr.call) for lr in back.layers.values()] == [("conv", 0), ("conv", 1)]
    # A report saved before the fields existed: the site name gives them.
    old = report.to_dict(tensors="list")
    for layer in old["layers"]:
        del layer["module"], layer["call"]
    assert [(lr.module, lr.call) for lr in AnalysisReport.from_dict(old).layers.values()] == [("conv", 0), ("conv", 1)]


def test_compile_must_be_a_bool(tiny_cnn, probe):
    from lightning_anomaly.engine import analyze as run_analysis

    with pytest.raises(TypeError, match="compile must be a bool"):
        run_analysis(tiny_cnn, probe[0], compile="yes")


def test_the_score_measures_1x1_maps_in_their_own_dimension(monkeypatch):
    # Maps of 1x1 pixels are clustered as 2-D points padded with zeros; their separations must not be.
    import importlib

    module = importlib.import_module("lightning_anomaly.engine.analyze")
    seen = []
    real = module.view_score

    def spy(points, *args, **kwargs):
        seen.append(points.shape[-1])
        return real(points, *args, **kwargs)

    monkeypatch.setattr(module, "view_score", spy)
    net = nn.Sequential(nn.Conv2d(1, 6, 4), nn.ReLU(), nn.Flatten(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 4, 4, generator=g), torch.arange(60) % 3
    report = analyze(net, x, y)
    assert report.layers["0"].map_shape == (1, 1) and report.layers["0"].n_components == 1
    assert seen and set(seen) == {1}


def test_reflag_refuses_a_new_score_floor_and_old_parts_merge_without_a_score(tiny_cnn, probe):
    report = analyze(tiny_cnn, probe[0], probe[1])
    with pytest.raises(ValueError, match=r"reflag cannot change clustering settings \['score_separation'\]"):
        report.reflag(AnomalyCriteria(score_separation=0.0))
    # Two parts saved before score parts existed: neither stored score covers both, so none is given.
    names = list(report.layers)
    parts = []
    for group in (names[:1], names[1:]):
        layers = type(report.layers)()
        for n in group:
            d = report.layers[n].to_dict()
            del d["score_parts"]
            layers[n] = type(report.layers[n]).from_dict(d)
        parts.append(
            AnalysisReport(
                layers=layers,
                n_samples=report.n_samples,
                outlier_counts=torch.zeros(report.n_samples, dtype=torch.long),
                outlier_scores=torch.rand(report.n_samples, dtype=torch.float64),
                criteria=report.criteria,
            )
        )
    assert merge_reports(parts, names).outlier_scores is None
    assert merge_reports(parts[:1], names).outlier_scores is parts[0].outlier_scores


def test_a_probe_the_model_cannot_take_names_its_shape_and_leaves_no_hook():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(
        RuntimeError, match=r"(?s)probe forward failed on inputs of shape \(16, 12, 12\).*channel dimension"
    ):
        analyze(net, torch.randn(16, 12, 12))  # images without their channel dimension
    assert all(not m._forward_hooks for m in net.modules())
