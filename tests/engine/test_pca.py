import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from lightning_anomaly.engine.pca import batched_pca, top_eigh


@pytest.mark.parametrize(("n", "d"), [(40, 10), (12, 50), (30, 1), (30, 2)])
def test_matches_sklearn_up_to_sign(n, d):
    g = torch.Generator().manual_seed(n + d)
    # Anisotropic data so the components are well separated.
    x = torch.randn(5, n, d, generator=g) * torch.linspace(3.0, 0.1, d)
    scores, var = batched_pca(x, 2)
    q = min(2, d)
    assert scores.shape == (5, n, q)
    for i in range(5):
        pca = PCA(q, svd_solver="full")
        ref = pca.fit_transform(x[i].double().numpy())
        for j in range(q):
            a, b = scores[i, :, j].double().numpy(), ref[:, j]
            assert min(np.abs(a - b).max(), np.abs(a + b).max()) < 1e-3 * (np.abs(b).max() + 1)
        assert np.allclose(var[i].numpy(), pca.explained_variance_, rtol=1e-3)


def test_deterministic_sign_and_no_global_rng():
    x = torch.randn(3, 20, 6)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a, _ = batched_pca(x, 2)
    b, _ = batched_pca(-x, 2)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.allclose(a, b, atol=1e-5)  # sign convention removes the flip


@pytest.mark.parametrize("spectrum", ["decaying", "clustered"])
def test_top_eigh_matches_dense_solver(spectrum):
    g = torch.Generator().manual_seed(0)
    m = 120  # above the dense threshold: exercises subspace iteration and its fallback
    basis = torch.linalg.qr(torch.randn(6, m, m, generator=g)).Q
    if spectrum == "decaying":
        vals = 0.7 ** torch.arange(m, dtype=torch.float32)
    else:  # second and third eigenvalues nearly equal: slow convergence, dense fallback
        vals = torch.cat([torch.tensor([10.0, 5.0, 4.9999]), torch.full((m - 3,), 4.9998)])
    a = basis @ torch.diag_embed(vals.expand(6, m)) @ basis.mT
    top_vals, top_vecs = top_eigh(a, 2)
    ref_vals, ref_vecs = torch.linalg.eigh(a)
    assert torch.allclose(top_vals, ref_vals[:, -2:].flip(-1), rtol=1e-4)
    # First eigenvector is well separated in both cases: equal up to sign.
    cos = (top_vecs[..., 0] * ref_vecs[..., -1]).sum(-1).abs()
    assert torch.allclose(cos, torch.ones(6), atol=1e-3)
