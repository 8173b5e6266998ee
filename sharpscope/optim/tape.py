"""The m-SAM passes through a chain of layers on a tape: one autograd node for the whole network.

For a small network on the CPU the m-SAM step's cost is mostly per operation, not arithmetic: at batch 16 the digits
ConvNet's passes built 77 autograd nodes a step (12 of them Python ``autograd.Function`` nodes, ~16 us each forward
and backward, and 26 layout views between them), against 24 for an SGD step. Where the model's forward is a plain
chain of modules (``torch.fx`` traces it to module calls, each on the previous one's output), the structured passes
(:mod:`sharpscope.optim.micro_batches`) call their layers' ``autograd.Function`` forwards and backwards themselves,
in order and in reverse, recorded on a :class:`Tape`; the activations between them (ReLU, max pooling, flatten...)
run as the same ATen kernels autograd would call (:data:`OPS`), any other module by itself on autograd's graph. The
whole pass is then one autograd node (:class:`OnTape`) whose inputs are the tensors the pass differentiates with respect to, so the step's loss, loss
scaling, ``p.grad`` accumulation and DistributedDataParallel's hooks work as before.

The numbers are autograd's own: the same functions on the same tensors in the same order. A layer or module the tape
cannot run raises :class:`NotOnTape` and the pass runs on autograd's graph instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from sharpscope import max_pool

__all__ = ["OPS", "NotOnTape", "OnTape", "Tape", "chain_of_modules", "on_autograd"]

aten = torch.ops.aten


class NotOnTape(Exception):
    """The pass cannot run on a tape (a module without a tape step, a layer that ran outside it)."""


class _Context:
    """What an ``autograd.Function``'s forward and backward use of ``ctx``, for calling them directly."""

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        self.saved_tensors = tensors


class Tape:
    """The steps of one pass: ``autograd.Function`` forwards called with a plain context, run back in reverse.

    ``leaves`` are the tensors the pass differentiates with respect to; a step is recorded where one of its arguments
    is a leaf or the output of a recorded step (autograd's ``requires_grad``, by identity). The tape keeps the
    arguments of its steps (so identities stay unique) but not their outputs: nothing refers back to the node that
    holds it.
    """

    def __init__(self, leaves: Sequence[Tensor]) -> None:
        self._leaves = list(leaves)
        self._carrying: dict[int, Tensor] = {id(t): t for t in leaves}  # cleared when the forward ends
        self._steps: list[tuple[Any, _Context, tuple, int]] = []  # (function, ctx, args, id of the output)

    def carries(self, t: Tensor) -> bool:
        """Whether the pass differentiates through ``t``."""
        return id(t) in self._carrying

    def apply(self, function: Any, args: Sequence[Any]) -> Tensor:
        """``function.forward(ctx, *args)``, recorded if an argument carries a gradient."""
        needs = tuple(isinstance(a, Tensor) and id(a) in self._carrying for a in args)
        ctx = _Context(needs)
        out = function.forward(ctx, *args)
        if any(needs):
            self._carrying[id(out)] = out
            self._steps.append((function, ctx, tuple(args), id(out)))
        return out

    def made(self, out: Tensor, x: Tensor) -> bool:
        """Whether ``out`` is the output of the last step, taken on ``x``."""
        return bool(self._steps) and self._steps[-1][3] == id(out) and self._steps[-1][2][0] is x

    def finish(self) -> None:
        """End of the forward: the tape drops its references to the outputs."""
        self._carrying = {}

    def backward(self, out: int, grad: Tensor) -> list[Tensor | None]:
        """The gradients of the leaves, for the gradient ``grad`` of the pass's output (the step output of id
        ``out``)."""
        grads: dict[int, Tensor] = {out: grad}
        steps, self._steps = self._steps, []
        for function, ctx, args, output in reversed(steps):
            g = grads.pop(output, None)
            if g is None:
                continue
            results = function.backward(ctx, g)
            if not isinstance(results, tuple):
                results = (results,)
            for arg, need, result in zip(args, ctx.needs_input_grad, results):
                if need and result is not None:
                    key = id(arg)
                    grads[key] = result if key not in grads else grads[key] + result
        return [grads.get(id(t)) for t in self._leaves]


class OnTape(torch.autograd.Function):
    """A whole pass as one autograd node: ``run(tape, x)`` records it on a tape over ``leaves``, the backward runs
    the tape back and returns the leaves' gradients."""

    @staticmethod
    def forward(ctx, run: Callable[[Tape, Tensor], Tensor], x: Tensor, *leaves: Tensor) -> Tensor:
        tape = Tape(leaves)
        out = run(tape, x)
        tape.finish()
        ctx.tape = tape
        ctx.out = id(out)
        # a new tensor object: a step's context may hold ``out`` itself, which must not hold this node in turn
        return out.detach()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (None, None, *ctx.tape.backward(ctx.out, grad))


# ------------------------------------------------------------------------------ the modules between the layers
class _Pointwise:
    """``out = f(x)`` with autograd's formula for the gradient, from the output or from the input."""

    forward_fn: Callable[..., Tensor]
    backward_fn: Callable[..., Tensor]
    from_output = True

    @classmethod
    def forward(cls, ctx, x, *extra):
        out = cls.forward_fn(x, *extra)
        ctx.extra = extra
        ctx.save_for_backward(out if cls.from_output else x)
        return out

    @classmethod
    def backward(cls, ctx, g):
        (saved,) = ctx.saved_tensors
        return cls.backward_fn(g, saved, *ctx.extra), *([None] * len(ctx.extra))


class _Relu(_Pointwise):
    forward_fn = staticmethod(torch.relu)
    backward_fn = staticmethod(lambda g, out: aten.threshold_backward(g, out, 0))


class _Tanh(_Pointwise):
    forward_fn = staticmethod(torch.tanh)
    backward_fn = staticmethod(aten.tanh_backward)


class _Sigmoid(_Pointwise):
    forward_fn = staticmethod(torch.sigmoid)
    backward_fn = staticmethod(aten.sigmoid_backward)


class _Gelu(_Pointwise):
    forward_fn = staticmethod(lambda x, approximate: F.gelu(x, approximate=approximate))
    backward_fn = staticmethod(lambda g, x, approximate: aten.gelu_backward(g, x, approximate=approximate))
    from_output = False


class _Silu(_Pointwise):
    forward_fn = staticmethod(F.silu)
    backward_fn = staticmethod(aten.silu_backward)
    from_output = False


class _LeakyRelu(_Pointwise):
    forward_fn = staticmethod(F.leaky_relu)
    backward_fn = staticmethod(lambda g, x, slope: aten.leaky_relu_backward(g, x, slope, False))
    from_output = False


class _Flatten:
    @staticmethod
    def forward(ctx, x, start, end):
        ctx.shape = x.shape
        return x.flatten(start, end)

    @staticmethod
    def backward(ctx, g):
        return g.reshape(ctx.shape), None, None


class _MaxPool2d:
    """torch's ``max_pool2d_with_indices`` and its backward, as autograd runs them."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        out, indices = aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.args = (kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(x, indices)
        return out

    @staticmethod
    def backward(ctx, g):
        x, indices = ctx.saved_tensors
        return aten.max_pool2d_with_indices_backward(g, x, *ctx.args, indices), None, None, None, None, None


def _max_pool(tape: Tape, module: nn.MaxPool2d, x: Tensor) -> Tensor:
    if module.return_indices:
        raise NotOnTape("a MaxPool2d that returns indices")
    k = max_pool.window(x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if k is not None and max_pool.pays(x, backward=True):
        return tape.apply(max_pool._StridedMaxPool2d, (x, k))
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride) if module.stride is not None else kernel
    return tape.apply(_MaxPool2d, (x, kernel, stride, _pair(module.padding), _pair(module.dilation),
                                   module.ceil_mode))


class _OnAutograd:
    """Any other module: run on autograd's graph by itself (its input a leaf), differentiated by ``autograd.grad``."""

    @staticmethod
    def forward(ctx, x, module):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            out = module(leaf)
        if not isinstance(out, Tensor):
            raise NotOnTape(f"a {type(module).__name__} that does not return one tensor")
        ctx.save_for_backward(leaf, out)
        return out.detach() if out.requires_grad else out

    @staticmethod
    def backward(ctx, g):
        leaf, out = ctx.saved_tensors
        if not out.requires_grad:
            return None, None
        (grad,) = torch.autograd.grad(out, leaf, g, allow_unused=True)
        return grad, None


def on_autograd(tape: Tape, module: nn.Module, x: Tensor) -> Tensor:
    """The tape step of a module without one of its own in :data:`OPS`."""
    return tape.apply(_OnAutograd, (x, module)) if tape.carries(x) else module(x)


#: The modules a tape runs between the layers with autograd's own formulas, by exact type: ``step(tape, module, x)
#: -> output``; any other module runs by itself on autograd's graph (:func:`on_autograd`).
OPS: dict[type, Callable[[Tape, Any, Tensor], Tensor]] = {
    nn.ReLU: lambda tape, module, x: tape.apply(_Relu, (x,)),
    nn.Tanh: lambda tape, module, x: tape.apply(_Tanh, (x,)),
    nn.Sigmoid: lambda tape, module, x: tape.apply(_Sigmoid, (x,)),
    nn.GELU: lambda tape, module, x: tape.apply(_Gelu, (x, module.approximate)),
    nn.SiLU: lambda tape, module, x: tape.apply(_Silu, (x,)),
    nn.LeakyReLU: lambda tape, module, x: tape.apply(_LeakyRelu, (x, module.negative_slope)),
    nn.Flatten: lambda tape, module, x: tape.apply(_Flatten, (x, module.start_dim, module.end_dim)),
    nn.Identity: lambda tape, module, x: x,
    nn.MaxPool2d: _max_pool,
}


def chain_of_modules(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The modules ``model``'s forward calls one after the other, each on the previous one's output (traced with
    ``torch.fx``), or None where the forward is anything else (or does not trace)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any model fx cannot trace is simply not a chain
        return None
    nodes = list(graph.nodes)
    if len(nodes) < 3 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return None
    chain: list[tuple[str, nn.Module]] = []
    previous = nodes[0]
    for node in nodes[1:-1]:
        if node.op != "call_module" or node.args != (previous,) or node.kwargs:
            return None
        chain.append((node.target, model.get_submodule(node.target)))
        previous = node
    if nodes[-1].args != (previous,) or len({id(module) for _, module in chain}) != len(chain):
        return None
    return chain
