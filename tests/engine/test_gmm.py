import os

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from lightning_anomaly.engine.gmm import fit_gmm


def planted(b: int, seed: int, tiny: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Two broad clusters plus a tight cluster of ``tiny`` points far away."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, 60, 2, generator=g) * 0.5 + torch.tensor([-2.0, 0.0])
    c = torch.randn(b, 60, 2, generator=g) * 0.5 + torch.tensor([2.0, 0.0])
    t = torch.randn(b, tiny, 2, generator=g) * 0.02 + torch.tensor([0.0, 6.0])
    truth = torch.cat([torch.zeros(60), torch.ones(60), torch.full((tiny,), 2.0)]).long()
    return torch.cat([a, c, t], dim=1), truth


def test_recovers_planted_clusters_including_a_three_point_one():
    pts, truth = planted(32, 0)
    fit = fit_gmm(pts, 3, generator=torch.Generator().manual_seed(0))
    for i in range(32):
        assert adjusted_rand_score(truth.numpy(), fit.labels[i].numpy()) > 0.95
        sizes = torch.bincount(fit.labels[i], minlength=3).sort().values.tolist()
        assert sizes[0] == 3
    assert bool(fit.converged.all())


def test_agrees_with_sklearn_on_planted_data():
    pts, _ = planted(12, 1)
    fit = fit_gmm(pts, 3, generator=torch.Generator().manual_seed(0))
    for i in range(12):
        gm = GaussianMixture(3, covariance_type="full", random_state=0).fit(pts[i].double().numpy())
        ref = gm.predict(pts[i].double().numpy())
        assert adjusted_rand_score(ref, fit.labels[i].numpy()) > 0.95
        # Same optimum: mean log-likelihood per point within a small tolerance.
        assert fit.lower_bound[i].item() == pytest.approx(gm.score(pts[i].double().numpy()), abs=5e-3)
        assert np.allclose(np.sort(fit.weights[i].numpy()), np.sort(gm.weights_), atol=1e-2)


def test_one_dimensional_points_equal_a_1d_fit():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(4, 50, 1, generator=g), torch.randn(4, 8, 1, generator=g) * 0.1 + 5], dim=1)
    fit = fit_gmm(x, 2, generator=torch.Generator().manual_seed(0))
    for i in range(4):
        assert sorted(torch.bincount(fit.labels[i]).tolist()) == [8, 50]
        gm = GaussianMixture(2, random_state=0).fit(x[i].double().numpy())
        # Padding adds the same constant to every component: the 1-D likelihood up to log(reg) terms.
        assert fit.means[i, :, 1].abs().max().item() == 0.0
        assert np.allclose(np.sort(fit.means[i, :, 0].numpy()), np.sort(gm.means_[:, 0]), atol=1e-2)


def test_deterministic_and_independent_of_chunking():
    pts, _ = planted(20, 3)
    a = fit_gmm(pts, 4, generator=torch.Generator().manual_seed(5))
    b = fit_gmm(pts, 4, generator=torch.Generator().manual_seed(5), chunk_size=7)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.n_iter, b.n_iter)


def test_global_rng_untouched():
    pts, _ = planted(4, 4)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fit_gmm(pts, 2)
    assert torch.equal(before, torch.get_rng_state())


def test_never_nan_on_hard_inputs():
    g = torch.Generator().manual_seed(0)
    dup = torch.zeros(3, 30, 2)
    dup[:, :15] = 1.0  # two point masses: covariances collapse to reg_covar
    tiny = torch.randn(3, 30, 2, generator=g) * 1e-6  # near-constant
    one_far = torch.zeros(3, 30, 2)
    one_far[:, 0] = 1e3
    for pts in (dup, tiny, one_far):
        fit = fit_gmm(pts, 6, generator=torch.Generator().manual_seed(0))
        for t in (fit.weights, fit.means, fit.lower_bound):
            assert torch.isfinite(t).all()
        assert ((fit.labels >= 0) & (fit.labels < 6)).all()


def test_retirement_respects_max_iter():
    pts, _ = planted(6, 5)
    fit = fit_gmm(pts, 5, max_iter=2)
    assert (fit.n_iter <= 2).all()
    assert not bool(fit.converged.all())


def test_n_init_keeps_the_best_lower_bound():
    pts, _ = planted(10, 6)
    one = fit_gmm(pts, 4, generator=torch.Generator().manual_seed(0))
    many = fit_gmm(pts, 4, generator=torch.Generator().manual_seed(0), n_init=4)
    assert (many.lower_bound >= one.lower_bound - 1e-9).all()


@pytest.mark.parametrize("bad", [torch.zeros(3, 10), torch.zeros(2, 10, 3)])
def test_bad_shape(bad):
    with pytest.raises(ValueError, match="shape"):
        fit_gmm(bad, 2)


def test_bad_k_and_non_finite():
    with pytest.raises(ValueError, match="2 <= k < N"):
        fit_gmm(torch.zeros(1, 4, 2), 4)
    pts = torch.zeros(1, 10, 2)
    pts[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_gmm(pts, 2)


def test_m_step_statistics_through_the_single_feature_copy_match_float64():
    # The fit keeps one (B, 6, N) copy of the quadratic features; the M-step reads it transposed.
    from lightning_anomaly.engine.gmm import _Work

    pts, _ = planted(5, 7)
    work = _Work(pts, torch.arange(5), 3, torch.rand(5, 5, generator=torch.Generator().manual_seed(0)), 1e-6, 10)
    x = pts.double().numpy()
    px, py = x[..., 0], x[..., 1]
    feats = np.stack([px * px, px * py, py * py, px, py, np.ones_like(px)], axis=-1)  # (B, N, 6)
    assert np.allclose(work.feats_t.double().numpy(), feats.transpose(0, 2, 1), rtol=1e-6)
    resp = torch.rand(5, 3, pts.shape[1], generator=torch.Generator().manual_seed(1))
    stats = torch.bmm(resp, work.feats_t.mT)
    ref = np.einsum("bkn,bnf->bkf", resp.double().numpy(), feats)
    assert np.allclose(stats.double().numpy(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [4, 9])
def test_refills_and_compaction_keep_every_problem_its_own_fit(chunk_size):
    # Small chunks force the working batch to be compacted and refilled many times; each problem
    # (scaled differently, so a row mix-up would show) still finds its planted clusters, at a
    # likelihood at least scikit-learn's, with each component at its cluster's empirical mean.
    pts, truth = planted(14, 8)
    pts = pts * torch.linspace(0.5, 20.0, 14).view(14, 1, 1)
    fit = fit_gmm(pts, 3, generator=torch.Generator().manual_seed(0), chunk_size=chunk_size)
    for i in range(14):
        x = pts[i].double().numpy()
        assert adjusted_rand_score(truth.numpy(), fit.labels[i].numpy()) > 0.95
        gm = GaussianMixture(3, covariance_type="full", random_state=0).fit(x)
        assert fit.lower_bound[i].item() >= gm.score(x) - 2e-2  # both stop on a 1e-3 change per step
        for j in range(3):
            members = fit.labels[i] == j
            assert np.allclose(fit.means[i, j].numpy(), x[members.numpy()].mean(0), atol=0.1 * float(pts[i].std()))


def test_compile_must_be_a_bool():
    with pytest.raises(TypeError, match="compile must be a bool"):
        fit_gmm(torch.randn(2, 20, 2), 2, compile="yes")


def test_compile_without_a_cxx_compiler_names_the_fix(monkeypatch):
    from lightning_anomaly.engine import gmm

    gmm._compiled_steps.cache_clear()  # nothing built earlier in this process
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(gmm.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"needs a C\+\+ compiler.*install g\+\+ or clang.*compile=False"):
        fit_gmm(torch.randn(2, 20, 2), 2, compile=True)


@pytest.mark.skipif(
    not os.environ.get("LIGHTNING_ANOMALY_TEST_COMPILE"),
    reason="compiles the steps (a minute on a CPU); set LIGHTNING_ANOMALY_TEST_COMPILE=1",
)
def test_compiled_steps_give_the_eager_labels():
    g = torch.Generator().manual_seed(0)
    pts = torch.cat([torch.randn(64, 100, 2, generator=g), torch.randn(64, 8, 2, generator=g) * 0.1 + 5.0], dim=1)
    for k in (2, 3):
        eager = fit_gmm(pts, k, generator=torch.Generator().manual_seed(0))
        compiled = fit_gmm(pts, k, generator=torch.Generator().manual_seed(0), compile=True)
        assert (eager.labels == compiled.labels).all(1).double().mean() >= 0.95
        assert torch.allclose(eager.lower_bound, compiled.lower_bound, atol=1e-3)
