"""PCA plane of a trajectory against known coordinates and a dense numpy SVD / sklearn PCA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.landscape import trajectory_pca


def _trajectory(coords: np.ndarray, *, noise: float = 0.0, seed: int = 0):
    """Models w_i = w_final + c_i1 e1 + c_i2 e2 (+ noise), e1, e2 orthonormal across two tensors (float64)."""
    torch.manual_seed(seed)
    final = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    names = [n for n, _ in final.named_parameters()]
    n = sum(p.numel() for p in final.parameters())
    q, _ = torch.linalg.qr(torch.randn(n, 2, dtype=torch.float64))
    e1, e2 = q[:, 0], q[:, 1]
    flat_final = torch.cat([p.detach().reshape(-1) for p in final.parameters()])
    states = []
    g = torch.Generator().manual_seed(seed + 1)
    for c1, c2 in coords:
        flat = flat_final + c1 * e1 + c2 * e2 + noise * torch.randn(n, generator=g, dtype=torch.float64)
        state, offset = {}, 0
        for name, p in final.named_parameters():
            state[name] = flat[offset: offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        states.append(state)
    return final, names, states, e1, e2


def test_recovers_known_coordinates():
    coords = np.array([[3.0, 1.0], [2.0, -0.5], [1.0, 0.4], [0.5, -0.1], [0.0, 0.0]])
    final, names, states, e1, e2 = _trajectory(coords)
    result = trajectory_pca(states + [final], names=names)
    path = result.path[:-1]  # the appended final model
    # exact plane, float64: the coordinates come back up to the sign of each axis (first checkpoint >= 0) and
    # the rotation within the plane, which is fixed by PCA: the variance along e1 dominates here
    # (coords were chosen with c1 spread >> c2 spread, and c1 and c2 uncorrelated enough); compare norms and
    # the rotation-invariant Gram matrix
    np.testing.assert_allclose(path @ path.T, coords @ coords.T, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(result.residual_norms, 0.0, atol=1e-7)
    assert result.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-12)
    assert (result.path[0] >= 0).all()
    assert result.d1.norm_value() == pytest.approx(1.0, abs=1e-12)
    assert abs(result.d1.dot(result.d2)) < 1e-12


def test_axis_aligned_trajectory_recovers_coordinates_exactly():
    coords = np.array([[4.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])  # PCA axes are e1, e2 themselves
    final, names, states, e1, e2 = _trajectory(coords)
    result = trajectory_pca(states, names=names)
    np.testing.assert_allclose(result.path, coords, atol=1e-12)  # first checkpoint at (+4, 0): signs fixed
    d1 = result.d1.flatten(names).double()
    torch.testing.assert_close(d1, e1, rtol=0, atol=1e-12)
    assert result.explained_variance_ratio == pytest.approx([16 + 1, 1] / np.float64(18), abs=1e-12)


def test_matches_dense_svd_and_sklearn():
    rng = np.random.default_rng(0)
    coords = rng.normal(size=(6, 2))
    final, names, states, _, _ = _trajectory(coords, noise=0.05)
    flat = np.stack([np.concatenate([s[n].numpy().reshape(-1) for n in names]) for s in states])
    m = flat - flat[-1]
    _, s, vt = np.linalg.svd(m, full_matrices=False)  # ground truth: dense SVD of M, float64
    result = trajectory_pca(states, names=names)
    np.testing.assert_allclose(result.singular_values[: len(s)], s, rtol=1e-9, atol=1e-12)
    for k, d in enumerate((result.d1, result.d2)):
        v = d.flatten(names).numpy()
        assert abs(abs(v @ vt[k]) - 1.0) < 1e-9
    np.testing.assert_allclose(np.abs(result.path), np.abs(m @ vt[:2].T), rtol=1e-9, atol=1e-12)
    residual = np.linalg.norm(m - (m @ vt[:2].T) @ vt[:2], axis=1)
    np.testing.assert_allclose(result.residual_norms, residual, rtol=1e-6, atol=1e-9)

    sklearn = pytest.importorskip("sklearn.decomposition")
    pca = sklearn.PCA(n_components=2).fit(m)
    centered = trajectory_pca(states, names=names, center=True)
    for k, d in enumerate((centered.d1, centered.d2)):
        assert abs(abs(d.flatten(names).numpy() @ pca.components_[k]) - 1.0) < 1e-9
    np.testing.assert_allclose(centered.explained_variance_ratio, pca.explained_variance_ratio_, rtol=1e-9)


def test_models_as_input_and_errors():
    models = [nn.Linear(3, 2) for _ in range(4)]
    result = trajectory_pca(models)
    assert result.path.shape == (4, 2) and result.d1.names == ["weight", "bias"]
    with pytest.raises(SharpscopeError, match="at least 3 checkpoints"):
        trajectory_pca(models[:2])
    states = [m.state_dict() for m in models]
    with pytest.raises(SharpscopeError, match="pass names="):
        trajectory_pca(states)
    with pytest.raises(SharpscopeError, match="has no tensor 'extra'"):
        trajectory_pca(states, names=["weight", "extra"])
    line = [{"w": torch.tensor([float(i), 2.0 * i])} for i in range(4)]
    with pytest.raises(SharpscopeError, match="fewer than 2 dimensions"):
        trajectory_pca(line, names=["w"])
    shapes = [{"w": torch.zeros(2)}, {"w": torch.zeros(2)}, {"w": torch.zeros(3)}]
    with pytest.raises(SharpscopeError, match="changes shape"):
        trajectory_pca(shapes, names=["w"])
