"""Private plumbing: view any symmetric operator as a float64 mat-mat on its own device, counting products.

Accepted operators (STYLE.md 1): :class:`~sharpscope.hessian.operator.HessianOperator`, a dense square
``torch.Tensor``, a ``scipy.sparse.linalg.LinearOperator`` (or NumPy array), or any object with a square
``shape`` whose ``op @ V`` accepts a ``(n, k)`` torch tensor (curvlinops operators do).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from sharpscope.errors import SharpscopeError


class Float64Operator:
    """``matmat(V)``: ``V`` float64 ``(n, k)`` on ``device`` -> ``op @ V`` as float64 ``(n, k)`` on ``device``.

    Attributes:
        n: the operator's side.
        device: where vectors live (the operator's device; CPU for NumPy/SciPy operators).
        num_matvecs: products computed through this view (``k`` per ``(n, k)`` product).
    """

    def __init__(self, op: Any, *, check_symmetric: bool = True) -> None:
        self.op = op
        self.num_matvecs = 0
        self._numpy = False
        if isinstance(op, Tensor):
            if op.dim() != 2 or op.shape[0] != op.shape[1]:
                raise SharpscopeError(f"expected a square (n, n) matrix as the operator, got shape {tuple(op.shape)}")
            if not (op.is_floating_point() or op.is_complex()):
                raise SharpscopeError(f"expected a floating-point matrix, got dtype {op.dtype}")
            if check_symmetric:
                tol = 1e-6 if op.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
                asym = (op - op.T).abs().max()
                scale = op.abs().max().clamp_min(torch.finfo(op.dtype).tiny)
                if asym > tol * scale:
                    raise SharpscopeError(
                        f"expected a symmetric matrix, but max |A - A^T| = {asym.item():.3g} is "
                        f"{(asym / scale).item():.1e} of max |A|; symmetrize it with (A + A.T) / 2"
                    )
            self.n = op.shape[0]
            self.device = op.device
            self.dtype = op.dtype
            return
        shape = getattr(op, "shape", None)
        if shape is None or not hasattr(op, "__matmul__"):
            raise SharpscopeError(
                f"expected a symmetric operator (a HessianOperator, a square tensor, or an object with .shape and "
                f"@), got {type(op).__name__}"
            )
        shape = tuple(shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise SharpscopeError(f"expected a square operator of shape (n, n), got shape {shape}")
        self.n = int(shape[0])
        self._numpy = _is_numpy_or_scipy(op)
        if self._numpy:
            self.device = torch.device("cpu")
            self.dtype = torch.float64
        else:
            self.device = torch.device(getattr(op, "device", "cpu"))
            dtype = getattr(op, "dtype", torch.float64)
            self.dtype = dtype if isinstance(dtype, torch.dtype) else torch.float64

    def matmat(self, V: Tensor) -> Tensor:
        k = V.shape[1]
        if self._numpy:
            result = torch.as_tensor(self.op @ V.detach().cpu().numpy(), dtype=torch.float64)
        else:
            result = self.op @ V.to(self.dtype)
            if not isinstance(result, Tensor):
                result = torch.as_tensor(result)
            result = result.to(device=self.device, dtype=torch.float64)
        if tuple(result.shape) != (self.n, k):
            raise SharpscopeError(
                f"the operator returned shape {tuple(result.shape)} for an input of shape ({self.n}, {k}); it must "
                "accept (n, k) matrices and return (n, k)"
            )
        self.num_matvecs += k
        return result


def _is_numpy_or_scipy(op: Any) -> bool:
    """Whether ``op`` is a NumPy array or a SciPy ``LinearOperator``, without importing either: an object can only be
    an instance of a class whose module is already imported, so ``sys.modules`` answers for free (importing
    ``scipy.sparse.linalg`` just for this check cost ~0.85 s on the first Hessian call)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(op, numpy.ndarray):
        return True
    scipy_linalg = sys.modules.get("scipy.sparse.linalg")
    return scipy_linalg is not None and isinstance(op, scipy_linalg.LinearOperator)


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator: random vectors are drawn on the CPU and moved, so results do not depend on the device."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return generator


def random_vectors(n: int, k: int, *, generator: torch.Generator, distribution: str, device: torch.device) -> Tensor:
    """``(n, k)`` float64 probes: ``rademacher`` (+-1), ``gaussian`` (N(0, 1)) or ``sphere`` (unit Gaussian)."""
    if distribution == "rademacher":
        V = torch.randint(0, 2, (n, k), generator=generator, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    elif distribution in ("gaussian", "sphere"):
        V = torch.randn(n, k, generator=generator, dtype=torch.float64)
        if distribution == "sphere":
            V /= V.norm(dim=0, keepdim=True)
    else:
        from sharpscope.errors import unknown_name_error

        raise unknown_name_error("distribution", distribution, ["rademacher", "gaussian"])
    return V.to(device)
