"""The m-SAM passes on a tape (sharpscope.optim.tape) against the same passes on autograd's graph.

The tape calls the same functions on the same tensors in the same order as autograd's engine does, so the steps must
agree bit for bit (``torch.equal``), not to a tolerance; the tests against the loop (test_sam_batched_micro_batches)
then hold for the tape too, and they run it: the chain models there take it by default.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from optim_cases import DT
from torch import nn

from sharpscope.models import create_model
from sharpscope.optim import SAM, micro_batches, tape, training_step

CE = nn.CrossEntropyLoss()


def convnet():
    return create_model("convnet", in_channels=1, num_classes=3, image_size=8)


def mlp_activations():
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8),
                         nn.LeakyReLU(0.2), nn.Linear(8, 8), nn.Sigmoid(), nn.Dropout(0.0),
                         nn.Linear(8, 8, bias=False), nn.GELU(approximate="tanh"), nn.Linear(8, 3))


def conv_pools():
    """Max pooling both ways (the strided views on an NCHW input, torch's kernel on a channels-last one), an
    average pool (no tape step of its own: run by itself on autograd's graph) and a BatchNorm1d."""
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Tanh(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(8 * 2 * 2, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


CHAINS = {  # name: (factory, input shape of one sample)
    "convnet": (convnet, (1, 8, 8)),
    "mlp-activations": (mlp_activations, (6,)),
    "conv-pools": (conv_pools, (2, 8, 8)),
}


def run_steps(model, shape, *, on_tape, m=4, steps=3, monkeypatch=None):
    torch.manual_seed(1)
    model = model.to(DT)
    if not on_tape:
        monkeypatch.setattr(micro_batches, "_tape_chain", lambda *args: None)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9, weight_decay=1e-3)
    g = torch.Generator().manual_seed(2)
    results = []
    for _ in range(steps):
        x, y = torch.randn(16, *shape, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g)
        results.append(training_step(model, opt, CE, x, y, micro_batch_size=m, vectorize=True))
    if not on_tape:
        monkeypatch.undo()
    return model, results


@pytest.mark.parametrize("name", list(CHAINS))
def test_the_tape_gives_autograds_numbers_bit_for_bit(name, monkeypatch):
    factory, shape = CHAINS[name]
    torch.manual_seed(0)
    model = factory()
    on_tape, results = run_steps(copy.deepcopy(model), shape, on_tape=True)
    plan = micro_batches._PLANS[on_tape]
    assert plan.checked and plan.rows and plan.tape  # the tape ran every step
    on_graph, reference = run_steps(copy.deepcopy(model), shape, on_tape=False, monkeypatch=monkeypatch)
    assert not micro_batches._PLANS[on_graph].tape
    for a, b in zip(results, reference):
        assert torch.equal(a.loss, b.loss) and torch.equal(a.correct, b.correct)
    for (key, a), b in zip(on_tape.state_dict().items(), on_graph.state_dict().values()):
        assert torch.equal(a, b), key


def test_a_layer_outside_the_tape_sends_the_passes_to_autograds_graph():
    """A BatchNorm in eval mode after a trainable convolution runs autograd's operations (its running statistics'
    affine map), not a tape step: the check notices, and the steps still equal the loop's."""
    torch.manual_seed(0)
    model = conv_pools().to(DT)
    model[1].eval()
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    ref_opt = SAM(ref.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    x, y = torch.randn(16, 2, 8, 8, dtype=DT), torch.randint(0, 3, (16,))
    for _ in range(2):
        training_step(model, opt, CE, x, y, micro_batch_size=4, vectorize=True)
        training_step(ref, ref_opt, CE, x, y, micro_batch_size=4, vectorize=False)
    plan = micro_batches._PLANS[model]
    assert plan.chain is not None and plan.checked and not plan.tape
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(x + torch.relu(self.a(x)))


def test_only_a_chain_of_module_calls_is_a_chain():
    chain = tape.chain_of_modules(convnet())
    assert [name for name, _ in chain] == ["features.0", "features.1", "features.2", "features.3", "features.4",
                                           "features.5", "features.6", "features.7", "features.8", "classifier.0",
                                           "classifier.1", "classifier.2", "classifier.3"]
    assert tape.chain_of_modules(Residual()) is None  # a function call and two uses of x
    shared = nn.Linear(4, 4)
    assert tape.chain_of_modules(nn.Sequential(shared, nn.ReLU(), shared)) is None  # one module called twice
    # a LayerNorm's passes use autograd's operations: no tape
    layer_norm = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    plan = micro_batches.structured_plan(layer_norm, [name for name, _ in layer_norm.named_parameters()])
    assert plan.chain is None and not plan.tape


STEPS = [
    (nn.ReLU(), (4, 3, 6, 6)), (nn.Tanh(), (4, 5)), (nn.Sigmoid(), (4, 5)), (nn.GELU(), (4, 5)),
    (nn.GELU(approximate="tanh"), (4, 5)), (nn.SiLU(), (4, 5)), (nn.LeakyReLU(0.3), (4, 5)),
    (nn.Flatten(), (4, 3, 2, 2)), (nn.Flatten(2, 3), (4, 3, 2, 2, 2)), (nn.Identity(), (4, 5)),
    (nn.MaxPool2d(2), (4, 3, 6, 6)), (nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (4, 3, 7, 7)),
    (nn.MaxPool2d(2), (256, 32, 8, 8)),  # the strided views (sharpscope.max_pool) on a large NCHW input
    (nn.AvgPool2d(2), (4, 3, 6, 6)), (nn.AdaptiveAvgPool2d(1), (4, 3, 5, 5)),  # by themselves on autograd's graph
]


@pytest.mark.parametrize(("module", "shape"), STEPS, ids=[f"{type(m).__name__}-{s}" for m, s in STEPS])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_each_tape_step_is_autograds_value_and_gradient(module, shape, layout):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=DT)
    x[0].view(-1)[:4] = x[0].view(-1)[4]  # ties (max pooling picks the first, as torch's kernel)
    if layout == "channels_last" and len(shape) == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    leaf = x.clone().requires_grad_()
    step = tape.OPS.get(type(module), tape.on_autograd)
    out = tape.OnTape.apply(lambda t, _: step(t, module, leaf), x, leaf)
    g = torch.randn(out.shape, dtype=DT)
    (got,) = torch.autograd.grad(out, leaf, g)
    reference_leaf = x.clone().requires_grad_()
    expected_out = module(reference_leaf)
    (expected,) = torch.autograd.grad(expected_out, reference_leaf, g)
    assert torch.equal(out, expected_out) and torch.equal(got, expected)


def test_a_tape_holds_no_reference_cycle():
    """The pass's output, its node and the tape go with the last reference to them (no wait for the collector)."""
    w = torch.randn(5, 5, requires_grad=True)

    def run(t, x):
        return tape.OPS[nn.Tanh](t, None, w)

    gc.disable()
    try:
        out = tape.OnTape.apply(run, torch.randn(2), w)
        node = weakref.ref(out.grad_fn)
        alive = weakref.ref(out)
        del out
        assert alive() is None and node() is None
        out = tape.OnTape.apply(run, torch.randn(2), w)
        out.sum().backward()
        torch.testing.assert_close(w.grad, 1 - torch.tanh(w.detach()) ** 2)
        alive = weakref.ref(out)
        del out
        assert alive() is None
    finally:
        gc.enable()
