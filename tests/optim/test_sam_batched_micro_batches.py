"""m-SAM's batched micro-batches (training_step, vectorize=True) against the loop (vectorize=False), in float64.

The loop is the reference: one micro-batch after the other, the weights moved to ``w + eps_j`` in place, BatchNorm
statistics updated by each clean pass. The batched path computes the same sums in another order, so after two
steps every weight, optimizer buffer, running statistic, loss and correct count must agree to ~1e-15 relative;
1e-10 leaves room for the accumulated rounding (the order of the G terms and of the closed-form BatchNorm update).
Only first derivatives are vmapped (torch 2.13's vmap bug is in second derivatives), and LayerNorm, GroupNorm,
BatchNorm in train and eval mode and nn.MultiheadAttention are all among the cases.
"""

from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
from optim_cases import DT
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.optim import SAM, low_rank, micro_batches, training_step
from sharpscope.optim import step as step_module
from sharpscope.optim.low_rank import LowRank
from sharpscope.optim.step import batched_refusal, loop_is_faster

CE = nn.CrossEntropyLoss()
RTOL, ATOL = 1e-10, 1e-12


class Attention(nn.Module):
    """Tokens (n, 4, 6) -> MultiheadAttention (2 heads) -> LayerNorm -> mean over tokens -> Linear(6, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(self.norm(x + h).mean(1))


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def mlp_bn(momentum=0.1):
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7, momentum=momentum), nn.Tanh(), nn.Linear(7, 3))


def conv_bn():
    # no bias before BatchNorm: its gradient is 0 up to rounding, which Adam would amplify to a full step
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def conv_bn_frozen():
    """A ConvNet whose first BatchNorm is in eval mode (running statistics, not updated) and a frozen conv."""
    model = conv_bn()
    model[1].eval()
    model[0].weight.requires_grad_(False)
    return model


def conv_bn_eval():
    """A trainable first convolution (row form) followed by a BatchNorm in eval mode (running statistics)."""
    model = conv_bn()
    model[1].eval()
    return model


def conv_bn_frozen_scale():
    """Training-mode BatchNorm (row form) whose affine weight is frozen and bias trained."""
    model = conv_bn()
    model[1].weight.requires_grad_(False)
    return model


def conv_strided_no_affine():
    """A strided, dilated, padded first convolution with a bias, then BatchNorm without affine weights."""
    return nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2), nn.BatchNorm2d(4, affine=False),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


def layer_norm():
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))


def group_norm():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def conv1d_bn():
    """Conv1d with groups and padding='same', BatchNorm1d on (n, C, L), strided Conv1d without bias."""
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding="same", groups=2), nn.BatchNorm1d(4), nn.ReLU(),
                         nn.Conv1d(4, 4, 2, stride=2, bias=False), nn.Flatten(), nn.Linear(12, 3))


def conv3d():
    return nn.Sequential(nn.Conv3d(1, 2, 2, dilation=1), nn.BatchNorm3d(2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 8, 3))


class SequenceHead(nn.Module):
    """Tokens (n, 4, 5) -> Linear -> LayerNorm over features -> mean over tokens -> Linear: rows per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.norm, self.head = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.proj(x))).mean(1))


def mlp_wide_bn():
    """A Linear wide enough for its per-micro-batch gradients to stay factored at m = 4 and 6 (low_rank.worth_it);
    no bias before BatchNorm (its gradient is 0 up to rounding, which Adam would amplify to a full step)."""
    return nn.Sequential(nn.Linear(20, 256, bias=False), nn.BatchNorm1d(256), nn.Tanh(), nn.Linear(256, 3))


class WideSequence(nn.Module):
    """Tokens (n, 2, 20) -> Linear(20, 256) -> LayerNorm -> mean over tokens -> Linear: 2 m rows per micro-batch,
    factored at m = 4 (8 rows), not at m = 6 (12 rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.norm, self.head = nn.Linear(20, 256), nn.LayerNorm(256), nn.Linear(256, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.proj(x))).mean(1))


MODELS = {  # name: (factory, input shape of one sample)
    "mlp": (mlp, (5,)),
    "mlp-batchnorm": (mlp_bn, (5,)),
    "mlp-batchnorm-cumulative": (lambda: mlp_bn(momentum=None), (5,)),
    "convnet-batchnorm": (conv_bn, (2, 6, 6)),
    "convnet-eval-bn-frozen-conv": (conv_bn_frozen, (2, 6, 6)),
    "convnet-eval-bn": (conv_bn_eval, (2, 6, 6)),
    "convnet-bn-frozen-scale": (conv_bn_frozen_scale, (2, 6, 6)),
    "conv-strided-dilated-no-affine": (conv_strided_no_affine, (2, 6, 6)),
    "layernorm": (layer_norm, (5,)),
    "groupnorm": (group_norm, (2, 6, 6)),
    "attention": (Attention, (4, 6)),
    "conv1d-groups-batchnorm1d": (conv1d_bn, (2, 6)),
    "conv3d-batchnorm3d": (conv3d, (1, 3, 3, 3)),
    "sequence-layernorm": (SequenceHead, (4, 5)),
    "mlp-wide-batchnorm-low-rank": (mlp_wide_bn, (20,)),
    "sequence-wide-low-rank": (WideSequence, (2, 20)),
}

SAM_SETTINGS = {  # name: SAM keyword arguments
    "sgd-momentum": {"rho": 0.2, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    "asam": {"rho": 0.5, "adaptive": True, "lr": 0.1, "momentum": 0.9},
    "p-inf": {"rho": 0.02, "p": math.inf, "lr": 0.1, "momentum": 0.9},
    "p-3": {"rho": 0.1, "p": 3.0, "lr": 0.1},
    "p-1": {"rho": 0.1, "p": 1.0, "lr": 0.1},
    "adam-rho-schedule": {"base": torch.optim.Adam, "rho": 0.1, "lr": 0.01, "rho_schedule": "lr"},
}


def make(model_name, seed=0):
    factory, shape = MODELS[model_name]
    torch.manual_seed(seed)
    model = factory().to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    data = [(torch.randn(n, *shape, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g))
            for n in (16, 14)]
    return model, data


def build_sam(model, settings):
    settings = dict(settings)
    base = settings.pop("base", torch.optim.SGD)
    return SAM([w for w in model.parameters() if w.requires_grad], base, **settings)


def assert_steps_match(model, opt, ref, ref_opt, data, *, m, **step_kwargs):
    """Two (or more) steps batched and looped; compare everything after each."""
    for x, y in data:
        batched = training_step(model, opt, CE, x, y, micro_batch_size=m, vectorize=True, **step_kwargs)
        looped = training_step(ref, ref_opt, CE, x, y, micro_batch_size=m, vectorize=False, **step_kwargs)
        torch.testing.assert_close(batched.loss, looped.loss, rtol=RTOL, atol=0)
        assert torch.equal(batched.correct, looped.correct)
        for (key, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda s, key=key: f"{key}: {s}")
        state_a, state_b = opt.state_dict(), ref_opt.state_dict()
        assert state_a["sam"] == state_b["sam"]
        for index, entry in state_b["state"].items():
            for key, value in entry.items():
                torch.testing.assert_close(state_a["state"][index][key], value, rtol=RTOL, atol=ATOL,
                                           msg=lambda s, key=key, index=index: f"state[{index}][{key}]: {s}")
        assert not opt.is_perturbed and not ref_opt.is_perturbed


def path_taken(model):
    """"structured" (the layers' own kernels, checked), "vmap", or None (no batched step ran)."""
    plan = micro_batches._PLANS.get(model)
    if isinstance(plan, micro_batches.StructuredPasses):
        return "structured" if plan.checked else None
    return None if plan is None else "vmap"


@pytest.mark.parametrize("path", ["structured", "structured-grouped", "vmap"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("m", [4, 6], ids=["m4", "m6-remainder"])
def test_batched_equals_loop_on_every_model(model_name, m, path, monkeypatch):
    # 16 / 4: equal micro-batches; 14 / 4, 16 / 6, 14 / 6: a smaller last micro-batch (through the loop)
    model, data = make(model_name)
    ref = copy.deepcopy(model)
    opt, ref_opt = build_sam(model, SAM_SETTINGS["sgd-momentum"]), build_sam(ref, SAM_SETTINGS["sgd-momentum"])
    assert batched_refusal(model, opt) is None
    if path == "vmap":
        micro_batches.refuse(model, "forced by the test")
    if path == "structured-grouped":  # the row forms "fail" their check: the grouped / side-by-side forms run
        def refuse_rows(*args, **kwargs):
            raise micro_batches.Unsupported("forced by the test")
        monkeypatch.setattr(micro_batches.StructuredPasses, "_check_in_float64", refuse_rows)
    assert_steps_match(model, opt, ref, ref_opt, data, m=m)
    # attention (nn.MultiheadAttention holds its own projection weights) is not a structured layer: vmap runs it
    assert path_taken(model) == ("vmap" if model_name == "attention" else path.split("-")[0])
    if path_taken(model) == "structured":
        assert micro_batches._PLANS[model].rows == (path == "structured")
    # the micro-batches matter (not plain SAM in disguise): one perturbation for the batch gives other weights
    plain = copy.deepcopy(ref)
    training_step(plain, build_sam(plain, SAM_SETTINGS["sgd-momentum"]), CE, *data[0])
    training_step(ref, ref_opt, CE, *data[0], micro_batch_size=m, vectorize=False)
    assert any(not torch.allclose(a, b, rtol=0, atol=1e-9) for a, b in zip(plain.parameters(), ref.parameters()))


@pytest.mark.parametrize("row_form", [True, False], ids=["rows", "grouped"])
@pytest.mark.parametrize("model_name", ["convnet-batchnorm", "convnet-eval-bn-frozen-conv", "conv1d-groups-batchnorm1d"])
def test_second_convolution_in_either_form_equals_the_loop(model_name, row_form, monkeypatch):
    """A convolution whose input needs a gradient takes the row form only when small
    (ROWS_WITH_INPUT_GRADIENT_MAX_ELEMENTS); above it the grouped form runs beside row-form layers before it."""
    if not row_form:
        monkeypatch.setattr(micro_batches, "ROWS_WITH_INPUT_GRADIENT_MAX_ELEMENTS", 0)
    calls = []
    col2im = micro_batches._col2im  # the perturbed row form's input gradient
    monkeypatch.setattr(micro_batches, "_col2im", lambda *a: calls.append(1) or col2im(*a))
    model, data = make(model_name)
    ref = copy.deepcopy(model)
    opt, ref_opt = build_sam(model, SAM_SETTINGS["sgd-momentum"]), build_sam(ref, SAM_SETTINGS["sgd-momentum"])
    assert_steps_match(model, opt, ref, ref_opt, data, m=4)
    assert path_taken(model) == "structured" and micro_batches._PLANS[model].rows
    assert bool(calls) == row_form


@pytest.mark.parametrize("settings", list(SAM_SETTINGS))
@pytest.mark.parametrize("model_name", ["convnet-batchnorm", "layernorm", "mlp-wide-batchnorm-low-rank"])
def test_batched_equals_loop_for_every_sam_variant(settings, model_name):
    model, data = make(model_name, seed=3)
    ref = copy.deepcopy(model)
    opt, ref_opt = build_sam(model, SAM_SETTINGS[settings]), build_sam(ref, SAM_SETTINGS[settings])
    assert_steps_match(model, opt, ref, ref_opt, data, m=4)
    assert path_taken(model) == "structured"


def test_param_groups_with_their_own_rho_p_and_asam():
    model, data = make("convnet-batchnorm", seed=5)
    ref = copy.deepcopy(model)

    def groups(net):
        return [{"params": list(net[0].parameters()), "rho": 0.5, "adaptive": True},
                {"params": list(net[4].parameters()) + list(net[9].parameters()), "p": math.inf, "rho": 0.01},
                {"params": list(net[1].parameters()) + list(net[5].parameters())}]

    opt = SAM(groups(model), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    ref_opt = SAM(groups(ref), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    assert_steps_match(model, opt, ref, ref_opt, data, m=4, max_grad_norm=0.5)


def test_grad_scaler_and_sam_every():
    # loss scale 2^12 is exact in float64: the batched and the looped step see the same unscaled gradients
    model, data = make("convnet-batchnorm", seed=7)
    ref = copy.deepcopy(model)
    settings = {**SAM_SETTINGS["sgd-momentum"], "sam_every": 2}
    opt, ref_opt = build_sam(model, settings), build_sam(ref, settings)
    scaler, ref_scaler = (torch.amp.GradScaler("cpu", init_scale=2.0**12) for _ in range(2))
    for x, y in data * 2:  # SAM, plain, SAM, plain
        a = training_step(model, opt, CE, x, y, micro_batch_size=4, grad_scaler=scaler, vectorize=True)
        b = training_step(ref, ref_opt, CE, x, y, micro_batch_size=4, grad_scaler=ref_scaler, vectorize=False)
        torch.testing.assert_close(a.loss, b.loss, rtol=RTOL, atol=0)
    for a, b in zip(model.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert scaler.get_scale() == ref_scaler.get_scale() == 2.0**12


def test_bf16_autocast_stays_close_to_the_loop():
    model, data = make("mlp", seed=9)
    model = model.float()
    ref = copy.deepcopy(model)
    opt, ref_opt = build_sam(model, SAM_SETTINGS["sgd-momentum"]), build_sam(ref, SAM_SETTINGS["sgd-momentum"])
    x, y = data[0]
    a = training_step(model, opt, CE, x.float(), y, micro_batch_size=4, autocast_dtype=torch.bfloat16,
                      vectorize=True)
    b = training_step(ref, ref_opt, CE, x.float(), y, micro_batch_size=4, autocast_dtype=torch.bfloat16,
                      vectorize=False)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-2, atol=0)  # bf16 keeps ~3 significant digits
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3)  # lr 0.1 x differently rounded bf16 gradients


# ------------------------------------------------------------------------------------------ fallback choice


class Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.3), nn.Linear(7, 3))

    def forward(self, x):
        return self.net(x)


def with_hook():
    model = mlp()
    model[0].register_forward_hook(lambda module, args, out: None)
    return model


def parametrized():
    model = mlp()
    nn.utils.parametrizations.weight_norm(model[2])
    return model


def instance_norm():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True), nn.Flatten(),
                         nn.LazyLinear(3))


@pytest.mark.parametrize(
    ("factory", "reason"),
    [(Dropout, r"module net\.1 applies dropout in training mode"),
     (with_hook, r"module 0 has forward/backward hooks"),
     (lambda: nn.DataParallel(mlp()), r"wrapped in DataParallel"),
     (lambda: nn.Sequential(nn.Linear(5, 3), nn.SyncBatchNorm(3)), r"module 1 \(SyncBatchNorm\) updates running"),
     (instance_norm, r"module 1 \(InstanceNorm2d\) updates running statistics"),
     (parametrized, r"module 2 is parametrized")],
    ids=["dropout", "hook", "data-parallel", "sync-batchnorm", "instance-norm", "parametrized"],
)
def test_models_the_batched_pass_cannot_run_are_refused(factory, reason):
    torch.manual_seed(0)
    model = factory()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert re.search(reason, batched_refusal(model, opt))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    if isinstance(model, nn.Sequential) and isinstance(model[0], nn.Conv2d):
        x = torch.randn(16, 2, 5, 5)
    if factory is Dropout:  # vectorize=None takes the loop, silently: same numbers as vectorize=False
        ref = copy.deepcopy(model)
        ref_opt = SAM(ref.parameters(), torch.optim.SGD, lr=0.1)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            a = training_step(model, opt, CE, x, y, micro_batch_size=4)
        torch.manual_seed(1)
        b = training_step(ref, ref_opt, CE, x, y, micro_batch_size=4, vectorize=False)
        assert torch.equal(a.loss, b.loss)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    with pytest.raises(SharpscopeError, match=r"vectorize=True, but the micro-batches cannot run as one batched pass"):
        training_step(model, opt, CE, x, y, micro_batch_size=4, vectorize=True)


@pytest.mark.parametrize("model_name", ["mlp-batchnorm", "layernorm"])
def test_cpu_half_precision_autocast_with_normalization_is_refused(model_name):
    # torch 2.13 CPU: vmap's BatchNorm / LayerNorm backward fails on a bf16 input with fp32 weights
    model = make(model_name)[0].float()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert batched_refusal(model, opt, autocast_dtype=torch.float32) is None
    assert batched_refusal(model, opt, autocast_dtype=torch.bfloat16, device_type="cuda") is None
    reason = batched_refusal(model, opt, autocast_dtype=torch.bfloat16, device_type="cpu")
    assert re.fullmatch(r"module 1 \((BatchNorm1d|LayerNorm)\) runs under CPU torch.bfloat16 autocast", reason)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused up front: the loop runs without a failed attempt or warning
        training_step(model, opt, CE, x, y, micro_batch_size=4, autocast_dtype=torch.bfloat16)


def test_a_compiled_model_is_refused():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert batched_refusal(torch.compile(model), opt) == "the model is torch.compile'd"  # compiles nothing


def test_the_surveys_module_walk_is_named_modules():
    # the per-step walk replaces model.named_modules(): same names, same order, a shared module named once
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Sequential(nn.ReLU(), shared, nn.Sequential(nn.Linear(3, 2), None)), shared)
    model.add_module("tail", nn.Sequential(nn.Identity()))
    walked = step_module._named_modules(model)
    assert [(name, id(m)) for name, m in walked] == [(name, id(m)) for name, m in model.named_modules()]
    assert len(walked) == 8


def test_foreign_and_oversized_parameters_are_refused(monkeypatch):
    model = mlp()
    foreign = SAM([*model.parameters(), nn.Parameter(torch.zeros(2))], torch.optim.SGD, lr=0.1)
    assert batched_refusal(model, foreign) == "the optimizer holds parameters the model does not own"
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    monkeypatch.setattr("sharpscope.optim.step.MAX_STACKED_ELEMENTS", 100)
    assert batched_refusal(model, opt, micro_batches=4).startswith("2 copies of 66 weights exceed")


def test_micro_batches_beyond_the_memory_bound_run_in_groups(monkeypatch):
    # 4 micro-batches, room for 2 copies of the weights: two batched passes of 2, in order (BatchNorm statistics)
    model, data = make("convnet-batchnorm", seed=11)
    ref = copy.deepcopy(model)
    size = sum(w.numel() for w in model.parameters())
    monkeypatch.setattr("sharpscope.optim.step.MAX_STACKED_ELEMENTS", 2 * size)
    opt, ref_opt = build_sam(model, SAM_SETTINGS["sgd-momentum"]), build_sam(ref, SAM_SETTINGS["sgd-momentum"])
    assert batched_refusal(model, opt, micro_batches=4) is None
    assert_steps_match(model, opt, ref, ref_opt, data, m=4)


class DataDependent(nn.Module):
    """Python control flow on a tensor value: vmap cannot batch it (the loop can). Its weight is its own (not in a
    library layer), so the structured passes do not take it either."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(0.3 * torch.randn(3, 5))

    def forward(self, x):
        out = x @ self.weight.T
        return out if bool(out.sum() > -1e9) else -out


class SharedNorm(nn.Module):
    """One BatchNorm applied twice per forward: the loop updates its statistics twice per micro-batch."""

    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.head = nn.Linear(5, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.bn(torch.tanh(self.bn(self.lin(x)))))


@pytest.mark.parametrize("factory", [DataDependent, SharedNorm])
def test_run_time_failure_falls_back_to_the_loop_once_with_a_warning(factory):
    torch.manual_seed(0)
    model = factory().to(DT)
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref_opt = SAM(ref.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert batched_refusal(model, opt) is None  # nothing visible before running it
    x, y = torch.randn(16, 5, dtype=DT), torch.randint(0, 3, (16,))
    with pytest.warns(RuntimeWarning, match=r"m-SAM: torch.func.vmap cannot batch its forward .*one after the other"):
        a = training_step(model, opt, CE, x, y, micro_batch_size=4)
    b = training_step(ref, ref_opt, CE, x, y, micro_batch_size=4, vectorize=False)
    assert torch.equal(a.loss, b.loss)
    for p, q in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(p, q)  # the failed batched attempt left no trace: same gradients, statistics, weights
    assert batched_refusal(model, opt).startswith("torch.func.vmap cannot batch its forward")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second attempt, no second warning
        training_step(model, opt, CE, x, y, micro_batch_size=4)
    with pytest.raises(RuntimeError):
        training_step(ref, ref_opt, CE, x, y, micro_batch_size=4, vectorize=True)  # forced: the error surfaces


def test_bad_vectorize_raises():
    model = mlp()
    with pytest.raises(SharpscopeError, match=r"vectorize must be None, True or False, got 'yes'"):
        training_step(model, SAM(model.parameters(), torch.optim.SGD, lr=0.1), CE, torch.randn(8, 5),
                      torch.randint(0, 3, (8,)), micro_batch_size=4, vectorize="yes")


class BatchCentred(nn.Module):
    """Subtracts the batch mean between two Linear layers: it mixes the samples of the micro-batches when they run
    as one batch, which the structured passes' check must notice (vmap runs it per micro-batch, as the loop)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0))


class TiedOutside(nn.Module):
    """A Linear weight also used outside its layer's forward (F.linear with it): the perturbed pass would see w,
    not w + eps_j, there; the check must notice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(torch.nn.functional.linear(h, self.a.weight))


@pytest.mark.parametrize("factory", [BatchCentred, TiedOutside])
def test_structured_check_rejects_sample_mixing_and_outside_uses_then_vmap_matches_the_loop(factory):
    torch.manual_seed(0)
    model = factory().to(DT)
    ref = copy.deepcopy(model)
    opt, ref_opt = build_sam(model, SAM_SETTINGS["sgd-momentum"]), build_sam(ref, SAM_SETTINGS["sgd-momentum"])
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 5, generator=g, dtype=DT), torch.randint(0, 3, (16,), generator=g))] * 2
    assert_steps_match(model, opt, ref, ref_opt, data, m=4)
    reason = micro_batches._PLANS[model]
    assert isinstance(reason, str) and "check against the micro-batches run alone failed" in reason, reason
    assert path_taken(model) == "vmap"


@pytest.mark.parametrize(("model_name", "m", "factored"), [
    ("mlp-wide-batchnorm-low-rank", 4, ["0.weight"]), ("mlp-wide-batchnorm-low-rank", 6, ["0.weight"]),
    ("sequence-wide-low-rank", 4, ["proj.weight"]), ("sequence-wide-low-rank", 6, []), ("mlp", 4, [])])
def test_linear_gradients_stay_factored_where_they_are_small(model_name, m, factored):
    model, data = make(model_name)
    names = [name for name, _ in model.named_parameters()]
    plan = micro_batches.structured_plan(model, names)
    x, y = data[0][0][: 2 * m], data[0][1][: 2 * m]
    grads, *_ = plan.clean(list(model.parameters()), CE, x, y, 2, low_rank=True)
    assert [n for n, g in zip(names, grads) if isinstance(g, LowRank)] == factored
    dense, *_ = plan.clean(list(model.parameters()), CE, x, y, 2)
    assert not any(isinstance(g, LowRank) for g in dense)
    for name, a, b in zip(names, grads, dense):
        torch.testing.assert_close(a.dense() if isinstance(a, LowRank) else a, b, rtol=1e-12, atol=1e-14,
                                   msg=lambda s, name=name: f"{name}: {s}")


def test_structured_plan_says_what_it_cannot_run():
    model = nn.Sequential(nn.Linear(5, 4), nn.PReLU(), nn.Linear(4, 3))
    reason = micro_batches.structured_plan(model, [name for name, _ in model.named_parameters()])
    assert reason == "module 1 (PReLU) holds trainable tensors or batch statistics outside the supported layers"
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    assert micro_batches.structured_plan(conv, ["weight", "bias"]) == "a convolution with padding_mode='reflect'"
    even = nn.Conv2d(2, 3, 2, padding="same")
    assert "asymmetric padding" in micro_batches.structured_plan(even, ["weight", "bias"])


def test_cross_entropy_per_micro_batch_matches_the_loss_of_each():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=g, dtype=DT)
    y = torch.randint(0, 5, (12,), generator=g)
    y[3] = -100  # ignored: the micro-batch's mean is over the other 2
    for loss in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.1),
                 nn.CrossEntropyLoss(weight=torch.rand(5, generator=g, dtype=DT)), nn.MultiMarginLoss()):
        per = micro_batches.chunk_losses(loss, logits, y.clamp(min=0) if isinstance(loss, nn.MultiMarginLoss) else y, 4)
        yy = y.clamp(min=0) if isinstance(loss, nn.MultiMarginLoss) else y
        expected = torch.stack([loss(logits[3 * j: 3 * j + 3], yy[3 * j: 3 * j + 3]) for j in range(4)])
        torch.testing.assert_close(per, expected, rtol=1e-14, atol=0)


def test_summed_losses_is_the_sum_of_the_micro_batch_losses_and_has_their_gradient():
    # the one-call path (no ignored label) and the per-micro-batch path (one ignored) against each micro-batch alone
    g = torch.Generator().manual_seed(0)
    base = torch.randn(12, 5, generator=g, dtype=DT)
    for ignored in (False, True):
        y = torch.randint(0, 5, (12,), generator=g)
        if ignored:
            y[3] = -100
        for loss in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.1), nn.MultiMarginLoss()):
            yy = y.clamp(min=0) if isinstance(loss, nn.MultiMarginLoss) else y
            assert micro_batches.one_call_loss(loss, yy) == (isinstance(loss, nn.CrossEntropyLoss) and not ignored)
            logits = base.clone().requires_grad_()
            total = micro_batches.summed_losses(loss, logits, yy, 4)
            expected = sum(loss(base[3 * j: 3 * j + 3], yy[3 * j: 3 * j + 3]) for j in range(4))
            torch.testing.assert_close(total, expected, rtol=1e-14, atol=0)
            reference = base.clone().requires_grad_()
            sum(loss(reference[3 * j: 3 * j + 3], yy[3 * j: 3 * j + 3]) for j in range(4)).backward()
            total.backward()
            torch.testing.assert_close(logits.grad, reference.grad, rtol=1e-13, atol=1e-15)


#: (convolution, input shape) for the row forms' windows: padding, stride, dilation, 1d/2d/3d, one input channel (the
#: strided copy on few elements, the stacked taps on many)
CONVOLUTIONS = {
    "conv1d-padded": (nn.Conv1d(3, 4, 3, padding=1), (5, 3, 7)),
    "conv2d-strided-dilated": (nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2), (5, 3, 7, 6)),
    "conv2d-no-padding": (nn.Conv2d(2, 4, (2, 3), stride=(1, 2)), (5, 2, 6, 7)),
    "one-channel-no-padding": (nn.Conv2d(1, 4, (2, 3), stride=(1, 2)), (5, 1, 6, 7)),
    "conv3d": (nn.Conv3d(2, 3, 2, padding=1), (2, 2, 3, 4, 3)),
    "one-channel-strided-dilated": (nn.Conv2d(1, 3, 3, stride=2, padding=1, dilation=2), (4, 1, 9, 8)),
    "one-channel-conv3d": (nn.Conv3d(1, 2, 2, padding=1), (2, 1, 3, 4, 3)),
    "one-channel-stacked-taps": (nn.Conv2d(1, 2, 3, stride=2, padding=1, dilation=2), (40, 1, 30, 29)),
}


@pytest.mark.parametrize(("conv", "shape"), list(CONVOLUTIONS.values()), ids=list(CONVOLUTIONS))
def test_windows_times_the_weight_rows_is_the_convolution(conv, shape):
    conv = conv.to(DT)
    x = torch.randn(shape, dtype=DT)
    layer = micro_batches._Layer(conv, type(conv), {}, padding=micro_batches._conv_padding(conv))
    expected = conv(x)
    windows = micro_batches._windows(x, conv.kernel_size, conv.stride, layer.padding, conv.dilation,
                                     expected.shape[2:])
    rows = windows @ conv.weight.movedim(1, -1).reshape(conv.out_channels, -1).T + conv.bias
    out = rows.reshape(x.shape[0], *expected.shape[2:], conv.out_channels).movedim(-1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("conv", "shape"), list(CONVOLUTIONS.values()), ids=list(CONVOLUTIONS))
def test_windows_gradient_is_the_convolutions_input_gradient(conv, shape):
    """The row form of a convolution whose input needs a gradient: col2im (one index_add_) is the adjoint of the
    windows, and the perturbed row form's dL/dx with W + E_j = W is the convolution's own; the clean row form's is
    torch's (convolution_backward)."""
    conv = conv.to(DT)
    x = torch.randn(shape, dtype=DT, requires_grad=True)
    padding = micro_batches._conv_padding(conv)
    out = conv(x)
    out_sp = tuple(out.shape[2:])
    args = (conv.kernel_size, conv.stride, padding, conv.dilation, out_sp)
    windows = micro_batches._windows(x.detach(), *args)
    g = torch.randn(windows.shape, dtype=DT)
    adjoint = micro_batches._col2im(g, x.shape, *args)
    torch.testing.assert_close((windows * g).sum(), (x.detach() * adjoint).sum(), rtol=1e-12, atol=1e-12)
    go = torch.randn(out.shape, dtype=DT)
    (expected,) = torch.autograd.grad(out, x, go)
    w_rows = conv.weight.detach().movedim(1, -1).reshape(conv.out_channels, -1)
    meta = (*args[:4], out_sp, 1)
    out = micro_batches._PerturbedConvRows.apply(x, conv.weight, None, w_rows[None], None, windows, meta)
    (got,) = torch.autograd.grad(out, x, go)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    offset = torch.zeros((1, *conv.weight.shape), dtype=DT, requires_grad=True)
    out = micro_batches._SharedConvRows.apply(x, conv.weight.detach(), None, offset, None, windows, meta)
    got, per_batch = torch.autograd.grad(out, (x, offset), go)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (weight_grad,) = torch.autograd.grad(conv(x), conv.weight, go)
    torch.testing.assert_close(per_batch[0], weight_grad, rtol=1e-12, atol=1e-12)


def test_factored_gradients_and_eps_carry_no_graph():
    """The factors of a Linear layer's clean gradients are constants: eps and the perturbed pass must not extend the
    clean pass's graph (autograd would otherwise backpropagate into eps's own arithmetic)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 256), nn.Tanh(), nn.Linear(256, 64), nn.Tanh(), nn.Linear(64, 3)).to(DT)
    names = [name for name, _ in model.named_parameters()]
    plan = micro_batches.structured_plan(model, names)
    x, y = torch.randn(8, 20, dtype=DT), torch.randint(0, 3, (8,))
    grads, *_ = plan.clean(list(model.parameters()), CE, x, y, 2, low_rank=True)
    factored = [g for g in grads if isinstance(g, LowRank)]
    assert len(factored) == 2  # the second one's inputs come from the first layer: they carry the clean graph
    assert not any(g.inputs.requires_grad or g.grads.requires_grad for g in factored)
    eps = low_rank.joint_perturbation(grads, [0.1] * len(grads))
    assert not any(t.requires_grad for e in eps
                   for t in ((e.inputs, e.grads) if isinstance(e, LowRank) else (e.tensor, e.coefs)))


class ViewAfterConv(nn.Module):
    """``.view`` on the first convolution's output: its row form's channels-last output cannot be viewed so, and
    the check must fall back to the grouped forms (still the structured passes, still the loop's numbers)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Linear(144, 3)

    def forward(self, x):
        h = self.bn(self.conv(x).view(x.shape[0], -1).view(x.shape[0], 4, 6, 6))
        return self.head(torch.relu(h).view(x.shape[0], -1))


def test_row_forms_run_where_they_apply_and_fall_back_to_the_grouped_forms():
    model, data = make("convnet-batchnorm")
    ref = copy.deepcopy(model)
    opt, ref_opt = build_sam(model, SAM_SETTINGS["sgd-momentum"]), build_sam(ref, SAM_SETTINGS["sgd-momentum"])
    assert_steps_match(model, opt, ref, ref_opt, data, m=4)
    assert path_taken(model) == "structured" and micro_batches._PLANS[model].rows

    torch.manual_seed(0)
    model = ViewAfterConv().to(DT)
    ref = copy.deepcopy(model)
    opt, ref_opt = build_sam(model, SAM_SETTINGS["sgd-momentum"]), build_sam(ref, SAM_SETTINGS["sgd-momentum"])
    assert_steps_match(model, opt, ref, ref_opt, data, m=4)
    assert path_taken(model) == "structured" and not micro_batches._PLANS[model].rows


def test_row_forms_are_checked_on_a_float64_copy_of_a_float32_model(monkeypatch):
    checked = []
    original = micro_batches.StructuredPasses._check

    def recording(self, weights, *args, **kwargs):
        checked.append((self.rows, weights[0].dtype))
        return original(self, weights, *args, **kwargs)

    monkeypatch.setattr(micro_batches.StructuredPasses, "_check", recording)
    model, data = make("convnet-batchnorm")
    model = model.float()
    opt = build_sam(model, SAM_SETTINGS["sgd-momentum"])
    x, y = data[0]
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))  # a float32 buffer in the loss: copied too
    training_step(model, opt, weighted, x.float(), y, micro_batch_size=4)
    assert checked == [(True, torch.float64)]
    assert micro_batches._PLANS[model].rows and all(p.dtype == torch.float32 for p in model.parameters())


def test_large_micro_batches_take_the_loop_by_default_on_the_cpu():
    # 3 x 48 x 48 inputs, m = 4: 27,648 input elements per micro-batch, past LOOP_FROM_ELEMENTS (8,192)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, stride=4), nn.Flatten(), nn.Linear(2 * 12 * 12, 3)).to(DT)
    ref = copy.deepcopy(model)
    x, y = torch.randn(16, 3, 48, 48, dtype=DT), torch.randint(0, 3, (16,))
    assert loop_is_faster(x, 4) and not loop_is_faster(x[:, :, :16, :16], 4)
    training_step(model, SAM(model.parameters(), torch.optim.SGD, lr=0.1), CE, x, y, micro_batch_size=4)
    training_step(ref, SAM(ref.parameters(), torch.optim.SGD, lr=0.1), CE, x, y, micro_batch_size=4, vectorize=False)
    assert path_taken(model) is None  # no batched pass was planned
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))  # the loop, bit for bit
    training_step(model, SAM(model.parameters(), torch.optim.SGD, lr=0.1), CE, x, y, micro_batch_size=4,
                  vectorize=True)
    assert path_taken(model) == "structured"  # asked for: batched whatever the size


def test_a_model_run_by_the_structured_passes_can_be_freed():
    """The plan is cached per model in a WeakKeyDictionary: it must not keep its own key alive."""
    import gc
    import weakref

    def step_once():
        model, data = make("convnet-batchnorm")
        opt = build_sam(model, SAM_SETTINGS["sgd-momentum"])
        training_step(model, opt, CE, *data[0], micro_batch_size=4)
        assert path_taken(model) == "structured"
        return weakref.ref(model)

    ref = step_once()
    gc.collect()
    assert ref() is None
