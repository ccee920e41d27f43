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
