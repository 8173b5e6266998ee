"""The PCA plane of a training trajectory (Li et al. 2018, section 7, "Visualizing optimization paths").

Given checkpoints ``w_0 .. w_{T-1}`` (the last, or ``final``, being the model the plane is drawn around), the rows of
``M = [w_i - w_final]`` (``T x n``, flattened over the named tensors) are decomposed and the top two right singular
vectors ``v_1, v_2`` (unit norm) span the plane; the path of the optimizer is drawn at ``(M v_1, M v_2)``.

Why the SVD of ``M`` itself (not centered): the plane is drawn *through w_final*, and the plane through
``w_final`` closest (in summed squared distance) to the checkpoints is spanned by the top right singular vectors
of the uncentered ``M``. The paper code uses ``sklearn.decomposition.PCA``, which centers the rows first (the best
plane through their mean, then used through ``w_final``); ``center=True`` reproduces that choice.

Computation: through the ``T x T`` Gram matrix ``G = M M^T`` accumulated tensor by tensor in float64 (memory
``O(T * largest tensor)``, not ``O(T * n)``), ``G = U diag(s^2) U^T`` (``numpy.linalg.eigh``), ``v_k = M^T u_k / s_k``
and the path ``M v_k = s_k u_k``. Explained variance ratio ``s_k^2 / sum_j s_j^2``. Checkpoints off the plane are
reported (``residual_norms``): the loss drawn under a projected point is not that checkpoint's loss when the residual
is large (the paper code's issue #1).

Sign convention: each direction is oriented so the first checkpoint has a non-negative coordinate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from sharpscope.errors import SharpscopeError
from sharpscope.landscape.directions import Direction, trainable_parameters


@dataclass(frozen=True)
class TrajectoryPCA:
    """Two PCA directions of a trajectory and the trajectory projected on them."""

    d1: Direction  # unit-norm first principal direction (over the named tensors)
    d2: Direction  # unit-norm second principal direction, orthogonal to d1
    path: np.ndarray  # (T, 2) coordinates of every checkpoint, final at (0, 0); units: parameter-space distance
    explained_variance_ratio: np.ndarray  # (2,) share of sum_i ||w_i - w_final||^2 (or centered) along d1, d2
    singular_values: np.ndarray  # (T,) all singular values of M (or of the centered M), descending
    residual_norms: np.ndarray  # (T,) distance of each checkpoint from the plane through w_final
    centered: bool  # whether the rows were centered before the decomposition (sklearn-style)


def _named(state: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(state, nn.Module):
        named = dict(state.named_parameters())
        named.update(dict(state.named_buffers()))
        return named
    return dict(state)


def trajectory_pca(
    states: Sequence[nn.Module | Mapping[str, Tensor]],
    *,
    names: Sequence[str] | None = None,
    final: int = -1,
    center: bool = False,
) -> TrajectoryPCA:
    """PCA plane of a trajectory (module docstring).

    Args:
        states: the checkpoints in training order, as models or ``{name: tensor}`` state dicts.
        names: the tensors to use (default: the trainable parameters of ``states[final]``, which must then be a
            model; a state dict mixes in buffers, so pass ``names`` explicitly).
        final: index of the model the plane is centred on (default the last).
        center: subtract the mean of the rows first (the paper code's sklearn PCA).
    """
    if len(states) < 3:
        raise SharpscopeError(
            f"a trajectory PCA plane needs at least 3 checkpoints (2 differences to the final one), got "
            f"{len(states)}; save checkpoints more often (sharpscope train --save-every 1)"
        )
    final = final % len(states)
    if names is None:
        if not isinstance(states[final], nn.Module):
            raise SharpscopeError("trajectory_pca: pass names=... when the checkpoints are state dicts")
        names = list(trainable_parameters(states[final]))
    names = list(names)
    named = [_named(s) for s in states]
    for i, nm in enumerate(named):
        missing = [n for n in names if n not in nm]
        if missing:
            raise SharpscopeError(
                f"checkpoint {i} has no tensor {missing[0]!r}; every checkpoint of a trajectory must be the same "
                "architecture"
            )
    count = len(states)
    gram = np.zeros((count, count))
    for n in names:
        ref = named[final][n].detach()
        if tuple(ref.shape) != tuple(named[0][n].shape):
            raise SharpscopeError(f"tensor {n!r} changes shape along the trajectory; same architecture expected")
        diffs = torch.stack([nm[n].detach().to("cpu", torch.float64).reshape(-1) for nm in named])
        diffs -= ref.to("cpu", torch.float64).reshape(1, -1)
        gram += (diffs @ diffs.T).numpy()
    rows = gram
    if center:
        h = np.eye(count) - 1.0 / count
        rows = h @ gram @ h
    evals, evecs = np.linalg.eigh(rows)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0.0, None), evecs[:, order]
    svals = np.sqrt(evals)
    # the Gram route loses half the digits of small singular values (s ~ sqrt(eigenvalue), eigh error ~1e-16 s1^2):
    # below 1e-6 s1 the second direction is rounding noise
    if svals[1] <= 1e-6 * max(svals[0], 1e-300):
        raise SharpscopeError(
            "the trajectory spans fewer than 2 dimensions (all checkpoints on one line or identical); "
            "a PCA plane is undefined"
        )
    # coefficients c_k with v_k = M^T c_k (centered: v_k = (H M)^T u_k / s_k = M^T (H u_k) / s_k)
    coeffs = []
    for k in range(2):
        u = evecs[:, k]
        coeffs.append((np.eye(count) - 1.0 / count) @ u / svals[k] if center else u / svals[k])
    # path[i, k] = (M v_k)_i = (M M^T c_k)_i = (G c_k)_i
    path = np.stack([gram @ c for c in coeffs], axis=1)
    signs = np.where(path[0] < 0, -1.0, 1.0)
    path *= signs
    sq = np.clip(np.diag(gram) - np.square(path).sum(axis=1), 0.0, None)
    tensors1: dict[str, Tensor] = {}
    tensors2: dict[str, Tensor] = {}
    c = torch.from_numpy(np.stack(coeffs, axis=1) * signs)  # (T, 2)
    for n in names:
        ref = named[final][n].detach()
        diffs = torch.stack([nm[n].detach().to("cpu", torch.float64).reshape(-1) for nm in named])
        diffs -= ref.to("cpu", torch.float64).reshape(1, -1)
        v = diffs.T @ c  # (numel, 2)
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        tensors1[n] = v[:, 0].reshape(ref.shape).to(device=ref.device, dtype=dtype)
        tensors2[n] = v[:, 1].reshape(ref.shape).to(device=ref.device, dtype=dtype)
    ratio = evals[:2] / evals.sum()
    info = {"explained_variance_ratio": ratio.tolist(), "centered": center, "checkpoints": count}
    return TrajectoryPCA(
        d1=Direction(tensors1, kind="pca", norm="none", ignore_bias_bn=False, info={**info, "index": 0}),
        d2=Direction(tensors2, kind="pca", norm="none", ignore_bias_bn=False, info={**info, "index": 1}),
        path=path,
        explained_variance_ratio=ratio,
        singular_values=svals,
        residual_norms=np.sqrt(sq),
        centered=center,
    )
