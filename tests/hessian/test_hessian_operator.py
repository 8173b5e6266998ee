"""HessianOperator against the dense float64 Hessian of sharpscope.hessian.reference (an independent path)."""

import copy

import pytest
import torch
from hessian_cases import CASES, allclose_report, build, graph_node_names, native_hvp
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.hessian import HessianOperator, eval_mode, lanczos_eigs
from sharpscope.hessian.reference import dense_hessian

# Both sides are float64 and differ only in summation order: 1e-10 relative to the largest entry is ~1e6 eps.
RTOL, ATOL_SCALE = 1e-10, 1e-10


def _full_batch(batches):
    return [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]


def test_matmat_equals_dense_hessian(problem):
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    dense = dense_hessian(problem.model, problem.loss_fn, problem.batches)
    identity = torch.eye(H.num_params, dtype=torch.float64, device=problem.device)
    columns = H @ identity
    atol = ATOL_SCALE * dense.abs().max().item()
    assert torch.allclose(columns, dense, rtol=RTOL, atol=atol), allclose_report(columns, dense, rtol=RTOL, atol=atol)
    assert H.num_matvecs == H.num_params
    assert H.shape == (H.num_params, H.num_params) and H.dtype == torch.float64
    assert H.device.type == torch.device(problem.device).type


def test_batched_product_equals_column_by_column(problem):
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    V = torch.randn(H.num_params, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batched = H @ V.to(problem.device)
    columns = torch.stack([H @ V[:, j].to(problem.device) for j in range(5)], dim=1)
    # Same arithmetic per column (the graph is shared, not the sums): agreement to rounding.
    assert torch.allclose(batched, columns, rtol=1e-12, atol=1e-14), allclose_report(batched, columns, rtol=1e-12,
                                                                                       atol=1e-14)
    assert H.num_matvecs == 10


def test_unequal_batches_are_sample_weighted(problem):
    """The average over unequal batches must equal the Hessian of the one concatenated batch."""
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    H_full = HessianOperator(problem.model, problem.loss_fn, _full_batch(problem.batches))
    V = torch.randn(H.num_params, 3, dtype=torch.float64, device=problem.device)
    split, whole = H @ V, H_full @ V
    atol = 1e-12 * whole.abs().max().item()
    assert torch.allclose(split, whole, rtol=1e-10, atol=atol), allclose_report(split, whole, rtol=1e-10, atol=atol)
    assert H.num_samples == sum(len(y) for _, y in problem.batches)


def test_parameter_subset_is_diagonal_block(problem):
    names = [name for name, _ in problem.model.named_parameters()]
    subset = names[-2:]  # the last layer's weight and bias
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches, params=subset)
    dense = dense_hessian(problem.model, problem.loss_fn, problem.batches)
    n_sub = H.num_params
    block = dense[-n_sub:, -n_sub:]  # the last parameters are last in the flat layout
    columns = H @ torch.eye(n_sub, dtype=torch.float64, device=problem.device)
    atol = ATOL_SCALE * block.abs().max().item()
    assert torch.allclose(columns, block, rtol=RTOL, atol=atol), allclose_report(columns, block, rtol=RTOL, atol=atol)
    # The same subset given as parameter tensors.
    params = [p for name, p in problem.model.named_parameters() if name in subset]
    assert HessianOperator(problem.model, problem.loss_fn, problem.batches, params=params).names == subset


def test_gradient_and_loss_helpers(problem):
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    (x, y), = _full_batch(problem.batches)
    loss = problem.loss_fn(problem.model(x), y)
    grads = torch.autograd.grad(loss, list(problem.model.parameters()))
    expected = torch.cat([g.reshape(-1) for g in grads])
    assert torch.allclose(H.loss(), loss.detach(), rtol=1e-12, atol=0)
    assert torch.allclose(H.gradient(), expected, rtol=1e-10, atol=1e-14), allclose_report(
        H.gradient(), expected, rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in problem.model.parameters()), "operator must not fill .grad"


def test_to_scipy_matches_torch_product():
    problem = build(CASES[0])
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    scipy_op = H.to_scipy()
    V = torch.randn(H.num_params, 2, dtype=torch.float64)
    assert torch.allclose(torch.as_tensor(scipy_op @ V.numpy()), H @ V, rtol=1e-12, atol=1e-15)
    assert torch.allclose(torch.as_tensor(scipy_op.matvec(V[:, 0].numpy())), H @ V[:, 0], rtol=1e-12, atol=1e-15)


def test_float32_model_float64_input_is_cast():
    problem = build(CASES[0])
    model32 = problem.model.float()
    batches = [(x.float(), y) for x, y in problem.batches]
    H = HessianOperator(model32, problem.loss_fn, batches)
    out = H @ torch.ones(H.num_params, dtype=torch.float64)
    assert out.dtype == torch.float32 and out.shape == (H.num_params,)


def _dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).double()


def _dropout_batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g))]


def test_determinism_probe_refuses_dropout_in_train_mode():
    model = _dropout_model().train()
    with pytest.raises(SharpscopeError, match=r"not deterministic.*dropout.*check_deterministic=False"):
        HessianOperator(model, nn.CrossEntropyLoss(), _dropout_batches(), eval_mode=False)


def test_determinism_opt_out_and_eval_mode_make_dropout_usable():
    model = _dropout_model().train()
    H = HessianOperator(model, nn.CrossEntropyLoss(), _dropout_batches(), eval_mode=False, check_deterministic=False)
    assert H.num_params == 6 * 16 + 16 + 16 * 3 + 3
    H_eval = HessianOperator(model, nn.CrossEntropyLoss(), _dropout_batches())  # eval mode: dropout is off
    v = torch.randn(H_eval.num_params, dtype=torch.float64)
    assert torch.equal(H_eval @ v, H_eval @ v)


def test_determinism_probe_refuses_train_mode_batchnorm():
    problem = build(CASES[2])
    problem.model.train()
    with pytest.raises(SharpscopeError, match=r"BatchNorm.*train mode.*check_deterministic=False"):
        HessianOperator(problem.model, problem.loss_fn, problem.batches, eval_mode=False)


class _ShufflingBatches:
    """A loader that reshuffles on every pass, like DataLoader(shuffle=True)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(20, 6, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 3, (20,), generator=g)
        self.calls = 0

    def __iter__(self):
        self.calls += 1
        order = torch.randperm(20, generator=torch.Generator().manual_seed(self.calls))
        return iter([(self.x[order[:10]], self.y[order[:10]]), (self.x[order[10:]], self.y[order[10:]])])


def test_determinism_probe_refuses_shuffling_loader():
    model = nn.Sequential(nn.Linear(6, 3)).double()
    with pytest.raises(SharpscopeError, match=r"batches are not deterministic.*shuffling"):
        HessianOperator(model, nn.CrossEntropyLoss(), _ShufflingBatches())


def test_eval_mode_is_restored_per_module():
    problem = build(CASES[2])
    model = problem.model.train()
    model[1].eval()  # a user-frozen BatchNorm inside a train-mode model must stay frozen
    modes = [m.training for m in model.modules()]
    H = HessianOperator(model, problem.loss_fn, problem.batches)
    H @ torch.randn(H.num_params, dtype=torch.float64)
    H.gradient()
    assert [m.training for m in model.modules()] == modes
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == modes


def test_eval_mode_product_uses_running_statistics():
    """In eval mode BN uses running stats, so the product equals the dense Hessian of the eval-mode model."""
    problem = build(CASES[2])
    model = problem.model.train()
    H = HessianOperator(model, problem.loss_fn, problem.batches)  # eval_mode=True by default
    model.eval()
    dense = dense_hessian(model, problem.loss_fn, problem.batches)
    model.train()
    v = torch.randn(H.num_params, dtype=torch.float64)
    assert torch.allclose(H @ v, dense @ v, rtol=1e-10, atol=1e-12)


def test_generator_batches_are_materialized():
    problem = build(CASES[0])
    H = HessianOperator(problem.model, problem.loss_fn, (b for b in problem.batches))
    v = torch.randn(H.num_params, dtype=torch.float64)
    assert torch.equal(H @ v, H @ v)  # a second pass sees the same data


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"params": ["nope.weight"]}, r"unknown parameter 'nope.weight'"),
        ({"params": [torch.zeros(3)]}, r"not a parameter of the model"),
        ({"params": []}, r"params= is empty"),
        ({"params": [3]}, r"must be names or parameters"),
        ({"batches": []}, r"batches is empty"),
        ({"batches": [torch.zeros(3)]}, r"expected batches of \(inputs, targets\) pairs, got a tensor of shape \(3,\)"),
        ({"batches": [("a", "b")]}, r"cannot tell the number of samples"),
        ({"cache_graph": "yes"}, r"cache_graph must be None, True or False, got 'yes'"),
        ({"max_cache_bytes": -1}, r"max_cache_bytes must be a number of bytes >= 0"),
        ({"max_cache_bytes": 1.5}, r"max_cache_bytes must be a number of bytes >= 0"),
        ({"max_cache_bytes": True}, r"max_cache_bytes must be a number of bytes >= 0"),
    ],
)
def test_constructor_errors(kwargs, match):
    problem = build(CASES[0])
    arguments = {"batches": problem.batches, **kwargs}
    with pytest.raises(SharpscopeError, match=match):
        HessianOperator(problem.model, problem.loss_fn, **arguments)


def test_frozen_parameter_and_mixed_dtype_errors():
    problem = build(CASES[0])
    problem.model[0].bias.requires_grad_(False)
    with pytest.raises(SharpscopeError, match=r"0.bias have requires_grad=False"):
        HessianOperator(problem.model, problem.loss_fn, problem.batches, params=["0.bias"])
    for p in problem.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(SharpscopeError, match=r"no parameters with requires_grad=True"):
        HessianOperator(problem.model, problem.loss_fn, problem.batches)
    mixed = nn.Sequential(nn.Linear(6, 4).double(), nn.Linear(4, 2))
    with pytest.raises(SharpscopeError, match=r"mix dtypes"):
        HessianOperator(mixed, nn.CrossEntropyLoss(), problem.batches, check_deterministic=False)


def test_bad_vector_and_loss_errors():
    problem = build(CASES[0])
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    with pytest.raises(SharpscopeError, match=r"expected a vector of shape \(92,\) or a matrix \(92, k\), got \(5,\)"):
        H @ torch.ones(5)
    summed = HessianOperator(problem.model, nn.CrossEntropyLoss(reduction="none"), problem.batches,
                             check_deterministic=False)
    with pytest.raises(SharpscopeError, match=r"loss_fn must return a 0-d mean loss, got \(20,\)"):
        summed @ torch.ones(92, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------- graph cache
def _assert_same(actual, expected, device):
    """Cached and recomputed products run the same kernels in the same order: bit-identical on CPU; CUDA may
    reorder reductions, so there agreement to float64 rounding (1e-12 relative) is asked."""
    if torch.device(device).type == "cpu":
        assert torch.equal(actual, expected), allclose_report(actual, expected, rtol=0, atol=0)
    else:
        atol = 1e-12 * expected.abs().max().item()
        assert torch.allclose(actual, expected, rtol=1e-12, atol=atol), allclose_report(
            actual, expected, rtol=1e-12, atol=atol)


def _probe_block(num_params, device, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_params, k, dtype=torch.float64, generator=g).to(device)


def test_cached_products_equal_recomputed(problem):
    cached = HessianOperator(problem.model, problem.loss_fn, problem.batches, cache_graph=True)
    plain = HessianOperator(problem.model, problem.loss_fn, problem.batches, cache_graph=False)
    assert cached.cached_batches == 0, "the constructor (determinism probe) must not build graphs"
    V = _probe_block(cached.num_params, problem.device)
    first = cached @ V  # builds the graphs
    assert cached.cached_batches == len(problem.batches) and cached.cache_bytes > 0
    again = cached @ V  # served from the graphs
    single = cached @ V[:, 1]
    expected = plain @ V
    assert plain.cached_batches == 0 and plain.cache_bytes == 0
    for actual in (first, again):
        _assert_same(actual, expected, problem.device)
    # a single column takes the plain double backward, a block the batched one: compare like with like
    _assert_same(single, plain @ V[:, 1], problem.device)
    assert cached.num_matvecs == 7


def test_lanczos_on_cached_operator_equals_recomputed():
    problem = build(CASES[2])  # the BatchNorm CNN
    results = [lanczos_eigs(HessianOperator(problem.model, problem.loss_fn, problem.batches, cache_graph=cache),
                            3, tol=1e-8, seed=0) for cache in (None, False)]
    assert torch.equal(torch.as_tensor(results[0].eigenvalues), torch.as_tensor(results[1].eigenvalues))
    assert results[0].num_matvecs == results[1].num_matvecs


def test_default_cache_stays_within_max_cache_bytes():
    problem = build(CASES[1])  # three batches
    full = HessianOperator(problem.model, problem.loss_fn, problem.batches, cache_graph=True)
    V = _probe_block(full.num_params, "cpu")
    expected = full @ V
    total = full.cache_bytes
    assert full.cached_batches == 3
    # the hidden activations of the two hidden layers are saved at least once per sample
    assert total >= 8 * sum(len(y) for _, y in problem.batches) * (8 + 6)
    cases = [(None, 3), (total, 3), (total - 1, 2), (0, 0)]  # (budget, batches cached: a prefix that fits)
    for budget, cached in cases:
        H = HessianOperator(problem.model, problem.loss_fn, problem.batches, max_cache_bytes=budget)
        for _ in range(2):
            assert torch.equal(H @ V, expected)
        assert H.cached_batches == cached, f"max_cache_bytes={budget}: {H.cached_batches} batches cached"
        assert H.cache_bytes <= (budget if budget is not None else total)


def test_default_budget_reads_the_free_memory():
    from sharpscope.hessian.operator import _available_memory

    assert _available_memory(torch.device("cpu")) > 0
    assert _available_memory(torch.device("meta")) == 1 << 30  # unknown device: a fixed 1 GiB


def _change_weights_in_place(model):
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)


def _change_weights_through_data(model):
    next(model.parameters()).data.add_(0.25)  # .data bypasses the version counter


def _load_other_state(model):
    state = {name: t * 0.9 if t.is_floating_point() else t for name, t in model.state_dict().items()}
    model.load_state_dict(state)


def _change_running_statistics(model):
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_var.data.mul_(2.0)


@pytest.mark.parametrize("change", [_change_weights_in_place, _change_weights_through_data, _load_other_state,
                                    _change_running_statistics])
def test_cache_never_serves_stale_products(change):
    problem = build(CASES[2])  # BatchNorm CNN: parameters and running statistics both matter
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches, cache_graph=True)
    V = _probe_block(H.num_params, "cpu")
    before = H @ V
    change(problem.model)
    after = H @ V
    expected = HessianOperator(problem.model, problem.loss_fn, problem.batches, cache_graph=False) @ V
    assert torch.equal(after, expected), allclose_report(after, expected, rtol=0, atol=0)
    assert not torch.equal(after, before), "the change should move the Hessian"
    assert H.cached_batches == len(problem.batches)  # rebuilt at the new weights
    assert torch.equal(H @ V, expected)


def test_rewriting_the_same_values_rebuilds_instead_of_failing():
    """load_state_dict of the same weights bumps the version counters: autograd would refuse the old graphs."""
    problem = build(CASES[0])
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches, cache_graph=True)
    V = _probe_block(H.num_params, "cpu")
    before = H @ V
    problem.model.load_state_dict(copy.deepcopy(problem.model.state_dict()))
    assert torch.equal(H @ V, before)


def test_cache_follows_module_modes_without_eval_mode():
    """eval_mode=False uses the model's own modes: switching BatchNorm to train mode must rebuild the graphs."""
    problem = build(CASES[2])
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches, eval_mode=False, cache_graph=True)
    V = _probe_block(H.num_params, "cpu")
    eval_product = H @ V
    problem.model.train()
    train_product = H @ V
    reference = copy.deepcopy(problem.model)  # batch-statistics BN: running statistics do not enter the output
    expected = HessianOperator(reference, problem.loss_fn, problem.batches, eval_mode=False, cache_graph=False,
                               check_deterministic=False) @ V
    assert torch.equal(train_product, expected), allclose_report(train_product, expected, rtol=0, atol=0)
    assert not torch.allclose(train_product, eval_product)


def test_clear_cache_frees_and_rebuilds():
    problem = build(CASES[0])
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)  # default: cached within the budget
    V = _probe_block(H.num_params, "cpu")
    first = H @ V
    assert H.cached_batches == 2
    H.clear_cache()
    assert H.cached_batches == 0 and H.cache_bytes == 0 and "cached_batches=0" in repr(H)
    assert torch.equal(H @ V, first) and H.cached_batches == 2


def test_eval_batchnorm_affine_form_matches_native_double_backward():
    problem = build(CASES[2])
    H = HessianOperator(problem.model, problem.loss_fn, problem.batches)
    v = _probe_block(H.num_params, "cpu", k=1)[:, 0]
    expected = native_hvp(problem.model, problem.loss_fn, problem.batches, v)
    actual = H @ v
    # the same function, different rounding in the batch-norm terms: float64 agreement to ~1e3 eps
    atol = 1e-13 * expected.abs().max().item()
    assert torch.allclose(actual, expected, rtol=1e-12, atol=atol), allclose_report(actual, expected, rtol=1e-12,
                                                                                     atol=atol)
    assert "NativeBatchNormBackward0" not in graph_node_names(H._graphs[0]), "the affine form was not used"
    # train-mode BatchNorm (eval_mode=False) keeps the native kernels: bit-identical
    problem.model.train()
    H_train = HessianOperator(problem.model, problem.loss_fn, problem.batches, eval_mode=False,
                              check_deterministic=False)
    reference = copy.deepcopy(problem.model)
    assert torch.equal(H_train @ v, native_hvp(reference, problem.loss_fn, problem.batches, v))
    assert "NativeBatchNormBackward0" in graph_node_names(H_train._graphs[0])
    assert all(m.training for m in problem.model.modules())
