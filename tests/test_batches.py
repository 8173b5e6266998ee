"""One batch contract for every analysis (sharpscope.batches): every batch shape through every analysis, checked
against plain computations written out by hand (no sharpscope code on the reference side), in float64.

Cases (test cases are data, STYLE.md 4): a tensor, tuple inputs (model(*inputs)), dict inputs bound as **kwargs,
a dict handed to forward(batch), and a BatchLoss hook with a token mask on a non-pair (Hugging Face style) batch.
The first four compute the same function of the same parameters on the same samples, so their numbers must also
agree with one another.

Tolerances: HVPs against the dense Hessian (column-wise double backward of the hand-written loss) to 1e-10
relative: both are double backward in float64 and differ only in summation order (~1e-15). Surface points and
sharpness values against hand loops to 1e-12 relative / 1e-13 absolute for the same reason.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sharpscope.batches import BatchLoss, call_model, num_samples, split_batch
from sharpscope.errors import SharpscopeError
from sharpscope.hessian import HessianOperator, lanczos_eigs
from sharpscope.landscape import loss_surface
from sharpscope.landscape.directions import random_directions
from sharpscope.sharpness import average_case_sharpness, generalization_gap, m_sharpness, worst_case_sharpness

N, T, C = 12, 3, 3
CE = nn.CrossEntropyLoss()


def core(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C)).double()


class TupleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.core = core()

    def forward(self, left, right):
        return self.core(torch.cat([left, right], dim=-1))


class KwargsModel(TupleModel):
    pass  # forward(left, right): a dict {"left", "right"} binds as keywords


class BatchDictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.core = core()

    def forward(self, batch):  # a dict {"left", "right"} does not bind as keywords: model(inputs)
        return self.core(torch.cat([batch["left"], batch["right"]], dim=-1))


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    tokens = torch.randn(N, T, 4, generator=g, dtype=torch.float64)
    token_labels = torch.randint(0, C, (N, T), generator=g)
    mask = (torch.rand(N, T, generator=g) > 0.3).double()
    mask[:, 0] = 1.0  # every sample (so every chunk) has a token that counts
    return x, y, tokens, token_labels, mask


X, Y, TOKENS, TOKEN_LABELS, MASK = _data()
SPLITS = [(0, 5), (5, 12)]  # two batches of unequal size: sample weighting matters


def masked_ce(model, batch):
    per_token = F.cross_entropy(model(batch["tokens"]).transpose(1, 2), batch["labels"], reduction="none")
    return (per_token * batch["mask"]).sum() / batch["mask"].sum()


def make_case(name):
    """(model, loss_fn, batches, plain) with plain(model, rows) the hand-written mean loss on sample rows."""
    if name == "tensor":
        model = core()
        batches = [(X[a:b], Y[a:b]) for a, b in SPLITS]
        return model, CE, batches, lambda m, r: CE(m(X[r]), Y[r])
    if name == "tuple":
        model = TupleModel()
        batches = [((X[a:b, :2], X[a:b, 2:]), Y[a:b]) for a, b in SPLITS]
        return model, CE, batches, lambda m, r: CE(m.core(X[r]), Y[r])
    if name == "dict-kwargs":
        model = KwargsModel()
        batches = [({"left": X[a:b, :2], "right": X[a:b, 2:]}, Y[a:b]) for a, b in SPLITS]
        return model, CE, batches, lambda m, r: CE(m.core(X[r]), Y[r])
    if name == "dict-batch":
        model = BatchDictModel()
        batches = [({"left": X[a:b, :2], "right": X[a:b, 2:]}, Y[a:b]) for a, b in SPLITS]
        return model, CE, batches, lambda m, r: CE(m.core(X[r]), Y[r])
    assert name == "hook-mask"
    model = core()
    batches = [{"tokens": TOKENS[a:b], "labels": TOKEN_LABELS[a:b], "mask": MASK[a:b]} for a, b in SPLITS]

    def plain(m, r):
        per_token = F.cross_entropy(m(TOKENS[r]).reshape(-1, C), TOKEN_LABELS[r].reshape(-1), reduction="none")
        return (per_token * MASK[r].reshape(-1)).sum() / MASK[r].sum()

    return model, BatchLoss(masked_ce), batches, plain


CASES = ["tensor", "tuple", "dict-kwargs", "dict-batch", "hook-mask"]
CLASSIFIERS = CASES[:4]


def rows(a, b):
    return torch.arange(a, b)


def plain_total(model, plain):
    """sum_b n_b L_b / N over the batches, written out."""
    return sum(plain(model, rows(a, b)) * (b - a) / N for a, b in SPLITS)


def dense_hessian(model, plain):
    params = list(model.parameters())
    grads = torch.autograd.grad(plain_total(model, plain), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    columns = [torch.cat([h.reshape(-1) for h in torch.autograd.grad(flat[i], params, retain_graph=True)])
               for i in range(flat.numel())]
    return torch.stack(columns, dim=1)


def close(a, b, rtol=1e-12, atol=1e-13):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, rtol=rtol, atol=atol), f"max |diff| {float((a - b).abs().max()):.3g}: {a} vs {b}"


@pytest.mark.parametrize("name", CASES)
def test_hessian_products_and_eigenvalues_match_the_dense_hessian(name):
    model, loss_fn, batches, plain = make_case(name)
    H = HessianOperator(model, loss_fn, batches)
    dense = dense_hessian(model, plain)
    assert H.num_samples == N
    V = torch.randn(H.num_params, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    close(H @ V, dense @ V, rtol=1e-10, atol=1e-12 * float(dense.abs().max()))
    close(H.loss(), plain_total(model, plain).detach())
    top = lanczos_eigs(H, 1, tol=1e-10)
    close(top.eigenvalues[0], torch.linalg.eigvalsh(dense)[-1], rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_loss_surface_matches_a_manual_loop(name):
    model, loss_fn, batches, plain = make_case(name)
    (d1,) = random_directions(model, dim=1, seed=3, ignore_bias_bn=False)
    coords = [-0.5, 0.0, 0.25, 1.0]
    surface = loss_surface(model, loss_fn, batches, directions=(d1,), coords=coords)
    named = dict(model.named_parameters())
    w0 = {k: p.detach().clone() for k, p in named.items()}
    expected, accuracy = [], []
    with torch.no_grad():
        for a in coords:
            for k, p in named.items():
                p.copy_(w0[k] + a * d1.tensors[k])
            expected.append(float(plain_total(model, plain)))
            if name in CLASSIFIERS:
                inner = model if name == "tensor" else model.core
                accuracy.append(float((inner(X).argmax(1) == Y).double().mean()))
        for k, p in named.items():
            p.copy_(w0[k])
    close(surface.loss, expected)
    if name in CLASSIFIERS:
        close(surface.accuracy, accuracy)
    else:
        assert math.isnan(surface.center_accuracy)  # a BatchLoss hides the outputs: no accuracy


def sam_one_step_reference(model, plain, m, rho):
    """Per chunk of m consecutive samples: max(0, L_B(w + rho g/|g|) - L_B(w)), the SAM (steps=1) estimate."""
    params = list(model.parameters())
    values = []
    for start in range(0, N - N % m, m):
        r = rows(start, start + m)
        clean = plain(model, r)
        g = torch.autograd.grad(clean, params)
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        with torch.no_grad():
            for p, t in zip(params, g):
                p.add_(rho * t / norm)
            perturbed = plain(model, r).detach()
            for p, t in zip(params, g):
                p.sub_(rho * t / norm)
        values.append(max(0.0, float(perturbed - clean.detach())))
    return values


@pytest.mark.parametrize("name", CASES)
def test_worst_case_and_m_sharpness_match_a_hand_written_sam_step(name):
    model, loss_fn, batches, plain = make_case(name)
    expected = sam_one_step_reference(model, plain, m=3, rho=0.05)
    estimate = worst_case_sharpness(model, loss_fn, batches, rho=0.05, m=3, steps=1, shuffle=False)
    close(estimate.chunk_values, expected, rtol=1e-9, atol=1e-13)
    grid = m_sharpness(model, loss_fn, batches, m_values=[3], rho_values=[0.05], steps=1, shuffle=False)
    close(grid.values[0, 0], sum(expected) / len(expected), rtol=1e-9, atol=1e-13)
    assert grid.num_samples == N
    looped = worst_case_sharpness(model, loss_fn, batches, rho=0.05, m=3, steps=3, vectorize=False)
    batched = worst_case_sharpness(model, loss_fn, batches, rho=0.05, m=3, steps=3)
    close(batched.chunk_values, looped.chunk_values, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", CASES)
def test_average_case_matches_the_serial_loop_and_the_tensor_case(name):
    model, loss_fn, batches, _ = make_case(name)
    kwargs = dict(rho=0.1, m=4, num_draws=3, seed=2)
    batched = average_case_sharpness(model, loss_fn, batches, **kwargs)
    looped = average_case_sharpness(model, loss_fn, batches, vectorize=False, **kwargs)
    close(batched.chunk_values, looped.chunk_values, rtol=1e-9, atol=1e-13)
    if name in CLASSIFIERS:  # the same function, parameters, samples and draws as the tensor case
        tensor_model, _, tensor_batches, _ = make_case("tensor")
        reference = average_case_sharpness(tensor_model, CE, tensor_batches, **kwargs)
        close(batched.chunk_values, reference.chunk_values, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_generalization_gap_of_every_input_shape(name):
    model, loss_fn, batches, plain = make_case(name)
    gap = generalization_gap(model, loss_fn, batches, batches[:1])
    inner = model if name == "tensor" else model.core
    with torch.no_grad():
        wrong = (inner(X).argmax(1) != Y).double()
        close(gap.train_error, wrong.mean())
        close(gap.test_error, wrong[:5].mean())
        close(gap.train_loss, plain_total(model, plain))
    assert (gap.num_train_samples, gap.num_test_samples) == (N, 5)


def test_generalization_gap_with_a_batch_loss_on_pairs():
    model = core()
    hook = BatchLoss(lambda m, batch: CE(m(batch[0]), batch[1]))
    gap = generalization_gap(model, hook, [(X, Y)], [(X, Y)])
    with torch.no_grad():
        close(gap.train_loss, CE(model(X), Y))


# --------------------------------------------------------------------------------------------- refusals
def _shuffling_loader():
    return DataLoader(TensorDataset(X, Y), batch_size=4, shuffle=True)


ANALYSES = {
    "hessian": lambda model, data: HessianOperator(model, CE, data),
    "loss_surface": lambda model, data: loss_surface(model, CE, data, directions=random_directions(model, dim=1),
                                                     coords=[0.0, 0.5]),
    "worst_case": lambda model, data: worst_case_sharpness(model, CE, data, rho=0.05, m=4, steps=1),
    "m_sharpness": lambda model, data: m_sharpness(model, CE, data, m_values=[4], rho_values=[0.05], steps=1),
    "average_case": lambda model, data: average_case_sharpness(model, CE, data, rho=0.05, m=4, num_draws=1),
}


def test_a_shuffling_dataloader_is_refused_by_every_analysis_with_one_message():
    messages = {}
    for name, run in ANALYSES.items():
        with pytest.raises(SharpscopeError, match="a DataLoader with shuffle=True") as info:
            run(core(), _shuffling_loader())
        messages[name] = str(info.value).split(" If this is intended")[0]
        assert "\n" not in str(info.value)
    assert len(set(messages.values())) == 1, messages


def test_a_fixed_dataloader_is_accepted_and_equals_the_list_of_batches():
    loader = DataLoader(TensorDataset(X, Y), batch_size=5, shuffle=False)
    listed = [(X[a:b], Y[a:b]) for a, b in [(0, 5), (5, 10), (10, 12)]]
    for name in ("worst_case", "average_case"):
        close(ANALYSES[name](core(), loader).value, ANALYSES[name](core(), listed).value)
    v = torch.ones(HessianOperator(core(), CE, listed).num_params, dtype=torch.float64)
    close(ANALYSES["hessian"](core(), loader) @ v, ANALYSES["hessian"](core(), listed) @ v)


class _ForwardAB(nn.Module):
    def __init__(self):
        super().__init__()
        self.core = core()

    def forward(self, a, b):
        return self.core(torch.cat([a, b], -1))


@pytest.mark.parametrize(("batch", "message"), [
    (X, r"expected batches of \(inputs, targets\) pairs, got a tensor of shape \(12, 4\)"),
    ((3, Y), r"the inputs of a batch are a int: a batch is \(inputs, targets\)"),
    (({"a": X[:, :2], "c": X[:, 2:]}, Y), r"binds neither as model\(\*\*inputs\) nor as model\(inputs\)"),
    ((("x",), ("y",)), r"cannot tell the number of samples"),
])
def test_bad_structures_get_one_clear_line_in_every_analysis(batch, message):
    for name, run in ANALYSES.items():
        with pytest.raises(SharpscopeError, match=message) as info:
            run(_ForwardAB(), [batch] * 3)
        assert "\n" not in str(info.value), name


def test_chunking_refuses_a_tensor_without_the_sample_dimension():
    batches = [({"left": X[:, :2], "right": X[:1, 2:].expand(N, 2)[:3]}, Y)]
    with pytest.raises(SharpscopeError, match=r"holds a tensor of shape \(3, 2\) beside 12 samples"):
        worst_case_sharpness(KwargsModel(), CE, batches, rho=0.05, m=4, steps=1)


def test_contract_helpers():
    model = KwargsModel()
    inputs = {"left": X[:, :2], "right": X[:, 2:]}
    torch.testing.assert_close(call_model(model, inputs), model.core(X))
    torch.testing.assert_close(call_model(BatchDictModel(), inputs), model.core(X))
    assert num_samples(((torch.tensor(2.0), X[:7]), Y[:7])) == 7  # 0-d tensors are constants
    with pytest.raises(SharpscopeError, match="BatchLoss expects a function"):
        BatchLoss(3)
    assert split_batch({"a": X}, BatchLoss(masked_ce))[0] == {"a": X}
