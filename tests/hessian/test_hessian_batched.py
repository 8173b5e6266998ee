"""Batched products ``H @ V`` (one vmapped second backward per block of columns) against the column loop.

The truth is the same operator with ``batched=False``: one plain double backward per column on the same graph.
torch 2.13's second derivatives under ``vmap`` are wrong for some models (DESIGN.md 5), so the batched path is
checked here on the layers where such bugs live (LayerNorm, GroupNorm, eval-mode BatchNorm, attention), and the
run-time verification that guards it is exercised with a batched pass that really is wrong or really raises.

Tolerance: float64 throughout; both paths run the same derivative formulas on the same saved tensors and differ
only in the blocking of the batched kernels, so 1e-10 relative to the largest entry (~5e5 ulps) is loose for
rounding and ten orders of magnitude below the O(1) errors of the known vmap bugs.
"""

import warnings

import pytest
import torch
from hessian_cases import allclose_report
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.hessian import HessianOperator

RTOL = 1e-10


class _Attention(nn.Module):
    """Self-attention (batch_first) + residual + LayerNorm, mean-pooled over the sequence, then a classifier.
    ``need_weights=True`` (nn.MultiheadAttention's default) runs the explicit softmax(QK^T)V; ``False`` the fused
    ``scaled_dot_product_attention`` kernel."""

    def __init__(self, need_weights: bool = True) -> None:  # False: no double backward at all on torch 2.13
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.need_weights = need_weights

    def forward(self, x):
        h, _ = self.attention(x, x, x, need_weights=self.need_weights)
        return self.head(self.norm(h + x).mean(dim=1))


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), (5,)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)), (5,)),
    "groupnorm": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)), (2, 5, 5)),
    "batchnorm-eval": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                                             nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.Tanh(),
                                             nn.Flatten(), nn.Linear(27, 3)), (2, 5, 5)),
    "attention-layernorm": (_Attention, (4, 6)),
}

BATCH_SIZES = (9, 5, 3)  # unequal on purpose: exercises the sample weighting per batch


def _problem(name: str, seed: int = 0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().double()
    generator = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(n, *shape, generator=generator, dtype=torch.float64),
                torch.randint(0, 3, (n,), generator=generator)) for n in BATCH_SIZES]
    with torch.no_grad():  # BatchNorm running statistics away from (0, 1), so eval mode is not the identity
        model.train()
        for x, _ in batches:
            model(1.5 * x + 0.3)
    model.eval()
    return model, nn.CrossEntropyLoss(), batches


def _block(n: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, k, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _column_loop(model, loss_fn, batches, V) -> torch.Tensor:
    """The truth: one plain double backward per column."""
    reference = HessianOperator(model, loss_fn, batches, batched=False)
    return torch.stack([reference @ V[:, j] for j in range(V.shape[1])], dim=1)


def _assert_close(actual, expected, rtol=RTOL):
    atol = rtol * expected.abs().max().item()
    assert torch.allclose(actual, expected, rtol=0, atol=atol), allclose_report(actual, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("batched", [None, True], ids=["auto", "forced"])
@pytest.mark.parametrize("name", list(MODELS))
def test_batched_products_equal_column_loop(name, batched):
    model, loss_fn, batches = _problem(name)
    H = HessianOperator(model, loss_fn, batches, batched=batched)
    for k in (1, 2, 7):
        V = _block(H.num_params, k, seed=k)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback warning here would mean the batched path was not used
            product = H @ V
        _assert_close(product, _column_loop(model, loss_fn, batches, V))
    assert H.batched_disabled is None
    # verified once (one check product per batch) at the first block, not again at the same weights
    assert H.num_check_matvecs == len(batches)
    assert H.num_matvecs == 1 + 2 + 7


def test_dense_hessian_from_blocks_is_symmetric():
    """``H @ I`` in blocks of 7 columns equals the per-column products and is symmetric."""
    model, loss_fn, batches = _problem("attention-layernorm")
    H = HessianOperator(model, loss_fn, batches)
    n = H.num_params
    identity = torch.eye(n, dtype=torch.float64)
    dense = torch.cat([H @ identity[:, j:j + 7] for j in range(0, n, 7)], dim=1)
    assert H.batched_disabled is None and H.num_check_matvecs > 0
    _assert_close(dense, _column_loop(model, loss_fn, batches, identity))
    _assert_close(dense, dense.T)


class _WrongBatched(HessianOperator):
    """A batched pass that is wrong by ``relative`` on one entry (of the last column), from its ``wrong_from``-th
    call on: a stand-in
    for a vmap batching bug. The verification in ``matmat`` must catch it."""

    def __init__(self, *args, relative: float, wrong_from: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.relative, self.wrong_from, self.calls = relative, wrong_from, 0

    def _batched_block(self, grads, block):
        self.calls += 1
        result = super()._batched_block(grads, block).contiguous()
        if self.calls >= self.wrong_from:  # the largest entry of the last column: the check covers every column
            worst = result[:, -1].abs().argmax()
            result[worst, -1] *= 1 + self.relative
        return result


@pytest.mark.parametrize("relative", [1e-8, 1.0])
def test_wrong_batched_result_is_detected_and_replaced(relative):
    """Even a 1e-8 relative error (100x the float64 tolerance) in one entry switches to the exact loop."""
    model, loss_fn, batches = _problem("layernorm")
    H = _WrongBatched(model, loss_fn, batches, relative=relative)
    V = _block(H.num_params, 7)
    expected = HessianOperator(model, loss_fn, batches, batched=False) @ V
    with pytest.warns(RuntimeWarning, match="disagrees with the plain double backward"):
        product = H @ V
    # the first batch failed its check before anything was added: the whole product is the column loop's
    assert torch.equal(product, expected), allclose_report(product, expected, rtol=0, atol=0)
    assert H.batched_disabled is not None and "disagrees" in H.batched_disabled
    calls = H.calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per operator, not per product
        again = H @ V
    assert H.calls == calls, "a disabled operator must not try the batched path again"
    assert torch.equal(again, expected)
    assert H.num_matvecs == 14


def test_wrong_result_in_a_later_batch_is_detected():
    """Every batch is checked at its first batched use: a bug that shows only in the second batch is caught."""
    model, loss_fn, batches = _problem("groupnorm")
    H = _WrongBatched(model, loss_fn, batches, relative=0.5, wrong_from=2)
    V = _block(H.num_params, 2)
    with pytest.warns(RuntimeWarning, match="disagrees"):
        product = H @ V
    _assert_close(product, _column_loop(model, loss_fn, batches, V))
    assert H.num_check_matvecs == 2  # batch 0 passed, batch 1 failed; batch 2 went straight to the loop


class _RaisingBatched(HessianOperator):
    """A batched pass that raises, as one through an op without a batching rule does."""

    def _batched_block(self, grads, block):
        raise NotImplementedError("no batching rule for aten::example")


def test_batched_failure_falls_back_with_warning():
    model, loss_fn, batches = _problem("mlp")
    H = _RaisingBatched(model, loss_fn, batches, batched=True)
    V = _block(H.num_params, 3)
    with pytest.warns(RuntimeWarning, match="raised NotImplementedError: no batching rule"):
        product = H @ V
    assert torch.equal(product, HessianOperator(model, loss_fn, batches, batched=False) @ V)
    assert "NotImplementedError" in H.batched_disabled


def test_channels_last_conv_input_is_exact():
    """A real case: a 1-channel image batch with channels-last strides (as from an NHWC uint8 dataset). On torch
    2.13 the vmapped convolution double backward raises for it (NYI is_contiguous query); the product must still
    be exact, and a fallback must say why."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)).double().eval()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 4, 4, 1, generator=generator, dtype=torch.float64).permute(0, 3, 1, 2),
                torch.randint(0, 3, (n,), generator=generator)) for n in (6, 4)]
    H = HessianOperator(model, nn.CrossEntropyLoss(), batches)
    V = _block(H.num_params, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        product = H @ V
    _assert_close(product, _column_loop(model, nn.CrossEntropyLoss(), batches, V))
    if H.batched_disabled is not None:
        assert "raised" in H.batched_disabled and any("raised" in str(w.message) for w in caught)


class _SubBlocks(HessianOperator):
    """Auto mode with a sub-block of 3 columns (the size a memory budget would give a larger graph)."""

    def _block_size(self, index, grads, k):
        return min(3, super()._block_size(index, grads, k))


def test_sub_blocks_equal_column_loop():
    model, loss_fn, batches = _problem("batchnorm-eval")
    H = _SubBlocks(model, loss_fn, batches)
    V = _block(H.num_params, 7)
    _assert_close(H @ V, _column_loop(model, loss_fn, batches, V))
    assert H.batched_disabled is None and H.num_check_matvecs == len(batches)


@pytest.mark.parametrize("cache_graph", [None, False])
def test_verification_repeats_when_the_weights_change(cache_graph):
    model, loss_fn, batches = _problem("layernorm")
    H = HessianOperator(model, loss_fn, batches, cache_graph=cache_graph)
    V = _block(H.num_params, 2)
    H @ V
    H @ V
    assert H.num_check_matvecs == len(batches)
    with torch.no_grad():
        model[0].weight.mul_(1.1)
    _assert_close(H @ V, _column_loop(model, loss_fn, batches, V))
    assert H.num_check_matvecs == 2 * len(batches)


def test_batched_false_never_vmaps():
    model, loss_fn, batches = _problem("mlp")
    H = _RaisingBatched(model, loss_fn, batches, batched=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H @ _block(H.num_params, 4)
    assert H.batched_disabled is None and H.num_check_matvecs == 0


@pytest.mark.parametrize("bad", ["yes", 1, 0, 2.0])
def test_batched_argument_is_checked(bad):
    model, loss_fn, batches = _problem("mlp")
    with pytest.raises(SharpscopeError, match="batched must be None"):
        HessianOperator(model, loss_fn, batches, batched=bad)
