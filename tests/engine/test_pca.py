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


def _sklearn_scores(x: torch.Tensor, q: int) -> np.ndarray:
    return PCA(q, svd_solver="full").fit_transform(x.double().numpy())


def _assert_equal_up_to_sign(scores: torch.Tensor, ref: np.ndarray, rtol: float) -> None:
    for j in range(ref.shape[1]):
        a, b = scores[:, j].double().numpy(), ref[:, j]
        assert min(np.abs(a - b).max(), np.abs(a + b).max()) <= rtol * np.abs(b).max()


@pytest.mark.parametrize("offset", [0.0, 1e-3, 50.0])
@pytest.mark.parametrize(("n", "d"), [(64, 300), (33, 100)])
def test_large_maps_through_the_gram_matrix_match_sklearn(n, d, offset):
    # Maps larger than the probe (D > N): the Gram path. offset 0 gives exactly centred data (the
    # class residuals analyze passes), which skip the centred copy; offset 50 puts a mean 50x the
    # spread on every pixel, where an uncentred float32 Gram matrix would lose the spread.
    g = torch.Generator().manual_seed(n + d)
    basis = torch.linalg.qr(torch.randn(4, d, d, generator=g)).Q[..., :3].mT  # (4, 3, D) orthonormal rows
    x = torch.randn(4, n, 3, generator=g) * torch.tensor([3.0, 1.0, 0.3]) @ basis
    x = x + 0.01 * torch.randn(4, n, d, generator=g)
    x = x - x.mean(1, keepdim=True) + offset
    scores, var = batched_pca(x, 2)
    for i in range(4):
        ref = _sklearn_scores(x[i], 2)
        _assert_equal_up_to_sign(scores[i], ref, rtol=1e-3)
        assert np.allclose(var[i].numpy(), ref.var(0, ddof=1), rtol=1e-3)


def test_gram_blocks_equal_the_full_product():
    from lightning_anomaly.engine.pca import _gram

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64):
        x = torch.randn(3, n, 50, generator=g)
        gram = _gram(x)
        ref = x.double() @ x.double().mT
        h = n // 2
        assert torch.equal(gram[:, h:, :h], gram[:, :h, h:].mT)  # the off-diagonal block is computed once
        assert torch.allclose(gram.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("max_iter", [1, 3, 5, 7, 60])
def test_top_eigh_any_iteration_budget_matches_dense_solver(max_iter):
    # Checks every 5 iterations and at the budget's end; problems left then go to the dense solver.
    g = torch.Generator().manual_seed(max_iter)
    m = 90
    basis = torch.linalg.qr(torch.randn(5, m, m, generator=g)).Q
    vals = 0.8 ** torch.arange(m, dtype=torch.float32)
    a = basis @ torch.diag_embed(vals.expand(5, m)) @ basis.mT
    top_vals, top_vecs = top_eigh(a, 2, max_iter=max_iter)
    ref_vals, ref_vecs = torch.linalg.eigh(a.double())
    assert torch.allclose(top_vals.double(), ref_vals[:, -2:].flip(-1), rtol=1e-4)
    for j in range(2):
        cos = (top_vecs[..., j].double() * ref_vecs[..., -1 - j]).sum(-1).abs()
        assert torch.allclose(cos, torch.ones(5, dtype=torch.float64), atol=1e-3)
