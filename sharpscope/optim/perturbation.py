r"""The SAM / ASAM ascent step: the first-order worst-case weight perturbation inside an l_p ball.

SAM (Foret et al., ICLR 2021) approximates ``max_{||eps||_p <= rho} L(w + eps)`` by its first-order
solution. With ``g`` the gradient and ``1/p + 1/q = 1``:

.. math::

    \hat\epsilon(w) = \rho \, \operatorname{sign}(g) \, |g|^{q-1} / (\|g\|_q^q)^{1/p}

(p = 2: ``rho g / ||g||_2``; p = inf (q = 1): ``rho sign(g)``; p = 1 (q = inf): all the mass on the largest
``|g_i|``, split evenly between exact ties).

ASAM (Kwon et al., ICML 2021) measures the ball in the coordinates ``T_w^{-1} eps`` with
``T_w = diag(|w| + eta)``. Substituting ``eps = T delta`` turns ``max_{||T^{-1} eps||_p <= rho} g^T eps`` into the
plain problem for ``delta`` with gradient ``s = T g``, so for every p:

.. math::

    \hat\epsilon = \rho \, T \odot \operatorname{sign}(s) \, |s|^{q-1} / (\|s\|_q^q)^{1/p},
    \quad s = T \odot g

which for p = 2 is the paper's ``rho T^2 g / ||T g||_2`` and for p = inf is ``rho T sign(g)``.

The norm is taken over **all** tensors jointly (one ball for the whole model, as in the paper), not per tensor.

Numerics: the expression is homogeneous of degree 0 in ``g``, so it is evaluated on ``u = s / ||s||_inf``
(``|u| <= 1``), and, because ``(||s||_q^q)^{1/p} = ||s||_q^{q-1}``, as ``sign(u) (|u| / ||u||_q)^{q-1}`` whose base
lies in [0, 1]: no norm overflows or underflows for any p or dtype (fp32 gradients of 1e30 or 1e-30 and fp16
gradients work; a plain ``||g||_2`` overflows at 1e19 in fp32). A zero gradient gives ``eps = 0`` (never NaN). On
the CPU, p = 2 takes the plain norm instead wherever a host check shows it could not have overflowed or underflowed
(:func:`plain_norm_is_safe`): the same result up to rounding, a fraction of the time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch
from torch import Tensor

from sharpscope.errors import SharpscopeError

__all__ = ["perturbation"]


def check_rho(rho: object, *, allow_zero: bool) -> float:
    """Validate a perturbation radius; return it as a float."""
    ok = isinstance(rho, Real) and not isinstance(rho, bool) and math.isfinite(rho)
    if not ok or rho < 0 or (rho == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise SharpscopeError(
            f"rho must be {bound}, got {rho!r}; pass the radius of the perturbation ball, e.g. rho=0.05 "
            "(Foret et al. 2021; ASAM uses about 0.5-2)"
        )
    return float(rho)


def check_p(p: object) -> float:
    """Validate the norm exponent p (1 <= p <= inf); return it as a float."""
    if not isinstance(p, Real) or isinstance(p, bool) or math.isnan(p) or p < 1:
        raise SharpscopeError(
            f"p must be >= 1 (the dual exponent q = p/(p-1) must exist), got {p!r}; use p=2 (SAM's default), "
            "p=float('inf') or any p >= 1"
        )
    return float(p)


def check_eta(eta: object) -> float:
    """Validate ASAM's offset eta (>= 0, finite); return it as a float."""
    if not isinstance(eta, Real) or isinstance(eta, bool) or not math.isfinite(eta) or eta < 0:
        raise SharpscopeError(
            f"eta must be a finite number >= 0, got {eta!r}; ASAM's T = |w| + eta uses eta=0.01 (Kwon et al. 2021)"
        )
    return float(eta)


def check_adaptive(adaptive: object) -> bool:
    """Validate the ASAM switch (a real bool, so a string such as 'False' cannot silently mean True)."""
    if not isinstance(adaptive, bool):
        raise SharpscopeError(f"adaptive must be True or False, got {adaptive!r}")
    return adaptive


def perturbation(
    grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    *,
    rho: float,
    p: float = 2.0,
    adaptive: bool = False,
    eta: float = 0.01,
) -> list[Tensor]:
    """The SAM (``adaptive=False``) or ASAM (``adaptive=True``) perturbation ``eps`` for every tensor.

    Args:
        grads: the gradient of each tensor in ``params`` (same shapes); ``None`` means "no gradient": that tensor
            gets a zero perturbation and does not enter the norm.
        params: the weights ``w`` (read only for ASAM's ``T = |w| + eta``; never modified).
        rho: radius of the ball, >= 0 (0 gives zeros). Default in SAM: 0.05 (Foret et al. 2021's CIFAR default).
        p: the norm of the ball, 1 <= p <= inf (``float('inf')``). Default 2, the paper's choice.
        adaptive: ASAM's scale-invariant ball ``||eps / (|w| + eta)||_p <= rho`` (Kwon et al. 2021).
        eta: ASAM's offset, so zero weights can still move. Default 0.01 (Kwon et al. 2021).

    Returns:
        ``eps``, one tensor per input (shape, dtype and device of the gradient), with
        ``||eps / T||_p = rho`` jointly over all tensors (``T = 1`` unless adaptive), or all zeros when every
        gradient is zero. The module docstring gives the formula.

    Raises:
        SharpscopeError: on a bad ``rho``/``p``/``eta``/``adaptive`` or when ``grads`` and ``params`` differ in length.
    """
    rho = check_rho(rho, allow_zero=True)
    p = check_p(p)
    eta = check_eta(eta)
    adaptive = check_adaptive(adaptive)
    if len(grads) != len(params):
        raise SharpscopeError(
            f"grads and params must pair up one to one, got {len(grads)} gradients for {len(params)} tensors"
        )
    present = [i for i, g in enumerate(grads) if g is not None]
    eps_present = joint_perturbation(
        [grads[i] for i in present],  # type: ignore[misc]
        [params[i] for i in present],
        rhos=[rho] * len(present),
        p=p,
        adaptive=[adaptive] * len(present),
        etas=[eta] * len(present),
    )
    out: list[Tensor] = [torch.zeros_like(g if g is not None else w) for g, w in zip(grads, params)]
    for i, e in zip(present, eps_present):
        out[i] = e
    return out


def _global_norm(tensors: list[Tensor], ord: float) -> Tensor:
    """``||concat(tensors)||_ord`` as a 0-d tensor on the first tensor's device (no host sync)."""
    norms = torch._foreach_norm(tensors, ord)
    device = tensors[0].device
    stacked = torch.stack([n.to(device) for n in norms])
    return stacked.max() if ord == math.inf else torch.linalg.vector_norm(stacked, ord)


def plain_norm_is_safe(norm: Tensor) -> bool:
    """Whether the plain l2 norm(s) ``norm`` of the gradients can stand for the rescaled formula's: every one finite
    and above ``sqrt(tiny) / eps`` of the dtype (~1e-12 in float32), so that no square overflowed and the squares
    lost to underflow (entries below ~1e-19) change the norm by less than the dtype's rounding. A host check: for
    the CPU only (elsewhere it would stall the stream)."""
    finfo = torch.finfo(norm.dtype)
    return bool((torch.isfinite(norm) & (norm > math.sqrt(finfo.tiny) / finfo.eps)).all())


def _nonzero_or_one(x: Tensor) -> Tensor:
    # Dividing by this instead of x makes 0/0 -> 0 (zero gradient -> zero eps) without a host sync.
    return torch.where(x > 0, x, torch.ones_like(x))


@torch.no_grad()
def joint_perturbation(
    grads: list[Tensor],
    params: list[Tensor],
    *,
    rhos: list[float | Tensor],
    p: float,
    adaptive: list[bool],
    etas: list[float],
) -> list[Tensor]:
    """:func:`perturbation` with a radius, ASAM switch and eta per tensor, sharing one joint norm.

    This is what :class:`~sharpscope.optim.SAM` uses for param groups with different ``rho``/``adaptive``/``eta``:
    the direction is the solution for the ball ``||T^{-1} eps||_p <= 1`` over all tensors (``T`` per tensor), and
    tensor ``i`` is then scaled by ``rhos[i]``. With equal settings it is exactly :func:`perturbation`. Arguments
    are not validated here; every gradient must be a tensor. On the CPU, p = 2 divides by the plain joint norm where
    :func:`plain_norm_is_safe` (one norm instead of the rescaled formula's two; the inf-norm is torch's slowest:
    0.27 against 0.06 ms for the digits ConvNet's gradients, one thread).
    """
    if not grads:
        return []
    ada_idx = [i for i, a in enumerate(adaptive) if a]
    # s = T * g, with T = |w| + eta on adaptive tensors (T = 1 elsewhere).
    t_scale: dict[int, Tensor] = {}
    if ada_idx:
        ts = torch._foreach_abs([params[i].detach() for i in ada_idx])
        torch._foreach_add_(ts, [etas[i] for i in ada_idx])
        t_scale = dict(zip(ada_idx, ts))
    s = list(grads)
    if ada_idx:
        scaled = torch._foreach_mul([grads[i] for i in ada_idx], [t_scale[i] for i in ada_idx])
        for i, v in zip(ada_idx, scaled):
            s[i] = v

    plain = _global_norm(s, 2.0) if p == 2.0 and s[0].device.type == "cpu" else None
    if plain is not None and plain_norm_is_safe(plain):
        d = torch._foreach_div(s, plain)  # see stacked_joint_perturbation: the rescaled formula's result, 4x sooner
    elif p == math.inf:
        d = torch._foreach_sign(s)
    else:
        # Work on u = s / ||s||_inf (|u| <= 1): no overflow or underflow in any norm, whatever the dtype.
        u = torch._foreach_div(s, _nonzero_or_one(_global_norm(s, math.inf)))
        if p == 2.0:
            torch._foreach_div_(u, _nonzero_or_one(_global_norm(u, 2.0)))
            d = u
        elif p == 1.0:
            # q = inf: the limit of sign(u) (|u| / ||u||_q)^(q-1) puts 1/k on each of the k exact maxima.
            masks = [ui.abs() == 1 for ui in u]
            count = torch.stack([m.sum().to(u[0].device) for m in masks]).sum().to(u[0].dtype)
            count = _nonzero_or_one(count)
            d = [torch.sign(ui) * mi / count.to(ui.device) for ui, mi in zip(u, masks)]
        else:
            q = p / (p - 1.0)
            mags = torch._foreach_abs(u)
            torch._foreach_div_(mags, _nonzero_or_one(_global_norm(u, q)))  # |s| / ||s||_q, in [0, 1]
            torch._foreach_pow_(mags, q - 1.0)
            d = torch._foreach_mul(torch._foreach_sign(u), mags)

    if ada_idx:
        torch._foreach_mul_([d[i] for i in ada_idx], [t_scale[i] for i in ada_idx])
    if all(isinstance(r, (int, float)) for r in rhos):
        torch._foreach_mul_(d, [float(r) for r in rhos])  # type: ignore[arg-type]
    else:
        for di, r in zip(d, rhos):
            di.mul_(r)
    return list(d)


def _row_norm(tensors: list[Tensor], ord: float) -> Tensor:
    """Per-row ``||concat(t[g] for t in tensors)||_ord`` of stacked ``(G, ...)`` tensors: a ``(G,)`` tensor."""
    if ord == math.inf:  # abs().amax is several times faster than vector_norm(ord=inf) on CPU, and exact
        return torch.stack([t.abs() if t.dim() == 1 else t.abs().amax(dim=_row_dims(t)) for t in tensors]).amax(dim=0)
    norms = torch.stack([row_norms(t, ord) for t in tensors])
    return torch.linalg.vector_norm(norms, ord, dim=0)


def row_norms(t: Tensor, ord: float = 2.0) -> Tensor:
    """``(G,)``: the ``ord``-norm of each row ``t[g]`` of a stacked ``(G, ...)`` tensor, reduced in its own memory
    layout (a permuted stack, e.g. a convolution's gradients in its row form's layout, is not copied: 10 us for
    the digits ConvNet's 4 x 64 x 32 x 3 x 3 on one thread, as for a contiguous stack)."""
    if t.dim() == 1:
        return t.abs()
    return torch.linalg.vector_norm(t, ord, dim=_row_dims(t))


def _row_dims(t: Tensor) -> tuple[int, ...]:
    return tuple(range(1, t.dim()))


def per_row(x: Tensor, like: Tensor) -> Tensor:
    """A ``(G,)`` tensor shaped to broadcast against ``like (G, ...)``."""
    return x.reshape(-1, *([1] * (like.dim() - 1)))


@torch.no_grad()
def stacked_joint_perturbation(
    grads: list[Tensor],
    params: list[Tensor],
    *,
    rhos: list[float | Tensor],
    p: float,
    adaptive: list[bool],
    etas: list[float],
) -> list[Tensor]:
    """:func:`joint_perturbation` for ``G`` gradients at once (m-sharpness: one ``eps`` per micro-batch).

    ``grads[i]`` is ``(G, *params[i].shape)``: row ``g`` of every tensor is the gradient of micro-batch ``g``. Row
    ``g`` of the result is ``joint_perturbation([t[g] for t in grads], params, ...)`` (the same formula, the joint
    norm taken per row; equal up to the order of floating-point summation), computed with a handful of batched
    kernels instead of ``G`` calls. ``params`` (unstacked) give ASAM's ``T = |w| + eta``, shared by all rows.

    On the CPU, p = 2 takes the plain norm ``||s||_2`` (one pass over the rows instead of four) when every row's
    norm is finite and above ``sqrt(tiny) / eps`` of the dtype (~1e-12 in float32), which a host check decides
    (free on the CPU): then no square overflowed, and the squares lost to underflow (entries below ~1e-19) change
    the norm by less than the dtype's rounding. Otherwise (and on other devices, where the check would stall the
    stream) the rescaled formula runs, as for every other p.
    """
    if not grads:
        return []
    ada_idx = [i for i, a in enumerate(adaptive) if a]
    t_scale = {i: params[i].detach().abs() + etas[i] for i in ada_idx}
    s = [g * t_scale[i] if i in t_scale else g for i, g in enumerate(grads)]
    if p == 2.0 and s[0].device.type == "cpu":
        norm = _row_norm(s, 2.0)
        if plain_norm_is_safe(norm):
            inverse = norm.reciprocal()
            out = [si * per_row(inverse * r, si) for si, r in zip(s, rhos)]
            for i in ada_idx:
                out[i].mul_(t_scale[i])
            return out
    if p == math.inf:
        d = [torch.sign(si) for si in s]
    else:
        top = _nonzero_or_one(_row_norm(s, math.inf))
        u = [si / per_row(top, si) for si in s]
        if p == 2.0:
            norm = _nonzero_or_one(_row_norm(u, 2.0))
            d = [ui / per_row(norm, ui) for ui in u]
        elif p == 1.0:
            masks = [ui.abs() == 1 for ui in u]
            count = torch.stack([mi.reshape(mi.shape[0], -1).sum(dim=1) for mi in masks]).sum(dim=0)
            count = _nonzero_or_one(count.to(u[0].dtype))
            d = [torch.sign(ui) * mi / per_row(count, ui) for ui, mi in zip(u, masks)]
        else:
            q = p / (p - 1.0)
            norm = _nonzero_or_one(_row_norm(u, q))
            d = [torch.sign(ui) * (ui.abs() / per_row(norm, ui)) ** (q - 1.0) for ui in u]
    for i in ada_idx:
        d[i] = d[i] * t_scale[i]
    return [di * r for di, r in zip(d, rhos)]
