"""training_step: plain and SAM steps, BatchNorm, m-sharpness, resume, sam_every, AMP, clipping, errors."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from optim_cases import assert_states_equal, batch, ce, snapshot, tiny_mlp
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.optim import SAM, frozen_bn_stats, running_stat_buffers, training_step

CE = nn.CrossEntropyLoss()


def _sam(model, **kwargs):
    kwargs = {"rho": 0.1, "lr": 0.1, **kwargs}
    return SAM(model.parameters(), torch.optim.SGD, **kwargs)


def reference_msam_step(model, x, y, *, m, rho, lr, max_grad_norm=None):
    """m-SAM (p = 2) + plain SGD, written out by hand: per micro-batch its own eps, BN stats from clean passes.

    Returns the sample-weighted clean loss. ``model`` is updated in place.
    """
    params = list(model.parameters())
    w0 = [p.detach().clone() for p in params]
    acc = [torch.zeros_like(p) for p in params]
    n = len(x)
    clean_loss = 0.0
    for xs, ys in zip(x.split(m), y.split(m)):
        loss = ce(model(xs), ys)  # train mode: BN running stats move (clean pass)
        clean_loss += loss.detach() * len(xs) / n
        g = torch.autograd.grad(loss, params)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        saved_buffers = {k: v.clone() for k, v in model.named_buffers()}
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(rho * gi / norm)
        g_sam = torch.autograd.grad(ce(model(xs), ys), params)
        with torch.no_grad():
            for p, w in zip(params, w0):
                p.copy_(w)
            for k, v in model.named_buffers():
                v.copy_(saved_buffers[k])
        for a, gi in zip(acc, g_sam):
            a.add_(gi, alpha=len(xs) / n)
    if max_grad_norm is not None:
        total = torch.sqrt(sum((a**2).sum() for a in acc))
        coef = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        acc = [a * coef for a in acc]
    with torch.no_grad():
        for p, a in zip(params, acc):
            p.sub_(lr * a)
    return clean_loss


# -------------------------------------------------------------------------------------- plain optimizers


def test_plain_optimizer_is_one_ordinary_step():
    model, ref = tiny_mlp(bn=True), tiny_mlp(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    result = training_step(model, opt, CE, x, y)
    loss = CE(ref(x), y)
    loss.backward()
    ref_opt.step()
    assert_states_equal(snapshot(model), snapshot(ref))
    assert result.loss.item() == loss.item() and not result.loss.requires_grad


# -------------------------------------------------------------------------------------- SAM and BatchNorm


def test_sam_step_equals_the_documented_manual_recipe():
    model, ref = tiny_mlp(bn=True), tiny_mlp(bn=True)
    opt, ref_opt = _sam(model, momentum=0.9), _sam(ref, momentum=0.9)
    for seed in range(3):
        x, y = batch(seed)
        result = training_step(model, opt, CE, x, y)
        ref_opt.zero_grad()
        clean = CE(ref(x), y)
        clean.backward()
        ref_opt.first_step(zero_grad=True)
        with frozen_bn_stats(ref):
            CE(ref(x), y).backward()
        ref_opt.second_step()
        assert result.loss.item() == clean.item()
    assert_states_equal(snapshot(model), snapshot(ref))


def test_bn_running_stats_come_from_the_clean_pass_only():
    model = tiny_mlp(bn=True)
    clean_only = copy.deepcopy(model)
    x, y = batch()
    training_step(model, _sam(model, rho=0.5), CE, x, y)
    with torch.no_grad():
        clean_only(x)  # train mode: one update of the running statistics at the original weights
    for a, b in zip(running_stat_buffers(model), running_stat_buffers(clean_only)):
        assert torch.equal(a, b)
    assert model[1].num_batches_tracked.item() == 1


def test_correct_counts_the_clean_predictions():
    model = tiny_mlp()
    x, y = batch(n=32)
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).sum()
    result = training_step(model, _sam(model), CE, x, y)
    assert result.correct.dtype == torch.int64 and torch.equal(result.correct, expected)


# ------------------------------------------------------------------------------------------------ m-sharpness


def test_micro_batch_of_the_whole_batch_is_plain_sam():
    a, b, c = tiny_mlp(bn=True), tiny_mlp(bn=True), tiny_mlp(bn=True)
    x, y = batch(n=16)
    ra = training_step(a, _sam(a), CE, x, y, micro_batch_size=16)
    rb = training_step(b, _sam(b), CE, x, y, micro_batch_size=64)  # m > n: one micro-batch
    rc = training_step(c, _sam(c), CE, x, y)
    assert_states_equal(snapshot(a), snapshot(c))
    assert_states_equal(snapshot(b), snapshot(c))
    assert ra.loss.item() == rb.loss.item() == rc.loss.item()


@pytest.mark.parametrize(("n", "m"), [(16, 4), (10, 4)], ids=["16=4x4", "10=4+4+2"])
def test_micro_batches_match_hand_written_reference(n, m, device):
    model = tiny_mlp(bn=True).to(device)
    ref = copy.deepcopy(model)
    x, y = (t.to(device) for t in batch(n=n))
    result = training_step(model, _sam(model, rho=0.2), CE, x, y, micro_batch_size=m)
    ref_loss = reference_msam_step(ref, x, y, m=m, rho=0.2, lr=0.1)
    # float64; same operations up to order of accumulation -> ~1e-16 relative, 1e-12 leaves margin
    for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=lambda s: f"{k}: {s}")
    torch.testing.assert_close(result.loss, ref_loss, rtol=1e-12, atol=0)
    # not trivially the same as plain SAM: one eps per micro-batch changes the update
    plain = tiny_mlp(bn=True).to(device)
    training_step(plain, _sam(plain, rho=0.2), CE, x, y)
    assert not torch.allclose(plain[0].weight, model[0].weight, rtol=0, atol=1e-9)


def test_clipping_applies_to_the_sam_gradient():
    model = tiny_mlp(bn=True)
    ref, unclipped = copy.deepcopy(model), copy.deepcopy(model)
    x, y = batch(n=16)
    training_step(model, _sam(model), CE, x, y, micro_batch_size=8, max_grad_norm=0.05)
    reference_msam_step(ref, x, y, m=8, rho=0.1, lr=0.1, max_grad_norm=0.05)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)  # float64, as above
    training_step(unclipped, _sam(unclipped), CE, x, y, micro_batch_size=8)
    assert not torch.allclose(unclipped[0].weight, model[0].weight)  # the bound was active


# ---------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "base", [(torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}),
             (torch.optim.Adam, {"lr": 0.01})], ids=["sgd", "adam"])
def test_resume_from_state_dict_is_bit_identical(base):
    cls, hp = base

    def build(seed):
        model = tiny_mlp(seed=seed, bn=True)
        opt = SAM(model.parameters(), cls, rho=0.1, rho_schedule="lr", sam_every=2, **hp)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return model, opt, sched

    def run(model, opt, sched, seeds):
        for seed in seeds:
            x, y = batch(seed)
            training_step(model, opt, CE, x, y, micro_batch_size=8)
            sched.step()

    full = build(0)
    run(*full, range(5))

    first = build(0)
    run(*first, range(3))
    buf = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "sched": first[2].state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = build(seed=7)  # a different init: everything must come from the checkpoint
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["sched"])
    assert resumed[1].param_groups is resumed[1].base_optimizer.param_groups
    run(*resumed, range(3, 5))
    assert_states_equal(snapshot(resumed[0]), snapshot(full[0]))

    # the base optimizer's state matters: resuming without it (what davda54/sam's state_dict allows) diverges
    lossy = build(seed=7)
    lossy[0].load_state_dict(saved["model"])
    lossy[2].load_state_dict(saved["sched"])
    run(*lossy, range(3, 5))
    assert not torch.equal(lossy[0][0].weight, full[0][0].weight)


def test_state_dict_holds_base_state_and_step_count():
    model = tiny_mlp()
    opt = SAM(model.parameters(), torch.optim.Adam, lr=0.01, sam_every=3)
    x, y = batch()
    for _ in range(2):
        training_step(model, opt, CE, x, y)
    state = opt.state_dict()
    assert state["sam"] == {"steps": 2}
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["param_groups"][0]["rho"] == 0.05


# ------------------------------------------------------------------------------------ sam_every, schedulers


def test_sam_every_skips_the_second_forward():
    model = tiny_mlp()
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]))
    opt = _sam(model, sam_every=3)
    for seed in range(6):
        x, y = batch(seed)
        training_step(model, opt, CE, x, y)
    # steps 0 and 3: clean + perturbed pass; steps 1, 2, 4, 5: one pass
    assert len(forwards) == 2 + 1 + 1 + 2 + 1 + 1


def test_sam_every_off_step_is_a_plain_base_step():
    model = tiny_mlp(bn=True)
    opt = _sam(model, sam_every=2, momentum=0.9)
    training_step(model, opt, CE, *batch(0))
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    # deepcopy: state_dict() returns the live momentum buffers, which load_state_dict would then share
    ref_opt.load_state_dict({"state": copy.deepcopy(opt.state_dict()["state"]),
                             "param_groups": ref_opt.state_dict()["param_groups"]})
    training_step(model, opt, CE, *batch(1))
    training_step(ref, ref_opt, CE, *batch(1))
    assert_states_equal(snapshot(model), snapshot(ref))


def test_lr_scheduler_sees_the_steps_without_warnings():
    model = tiny_mlp()
    opt = _sam(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Detected call of lr_scheduler.step() before optimizer.step()"
        for seed in range(2):
            training_step(model, opt, CE, *batch(seed), micro_batch_size=4)
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


# ---------------------------------------------------------------------------------------- mixed precision


class CountingScaler(torch.amp.GradScaler):
    """A real GradScaler that counts the calls training_step makes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = {"update": 0, "unscale_": 0, "step": 0}

    def update(self, *args, **kwargs):
        self.calls["update"] += 1
        return super().update(*args, **kwargs)

    def unscale_(self, optimizer):
        self.calls["unscale_"] += 1
        return super().unscale_(optimizer)

    def step(self, optimizer, *args, **kwargs):
        self.calls["step"] += 1
        return super().step(optimizer, *args, **kwargs)


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    model32 = tiny_mlp(bn=True, width=32).float()
    model16 = copy.deepcopy(model32)
    dtypes = []
    model16[0].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    x, y = batch(n=32)
    x = x.float()
    r32 = training_step(model32, _sam(model32), CE, x, y)
    r16 = training_step(model16, _sam(model16), CE, x, y, autocast_dtype=torch.bfloat16, micro_batch_size=16)
    assert dtypes == [torch.bfloat16] * 4  # 2 micro-batches x (clean + perturbed) under autocast
    torch.testing.assert_close(r16.loss, r32.loss, rtol=3e-2, atol=0)  # bf16 keeps ~3 significant digits
    for a, b in zip(model16.parameters(), model32.parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=2e-2)  # lr 0.1 x bf16-rounded gradients


def test_fp16_scaler_path_updates_once_per_step():
    model = tiny_mlp(bn=True, width=32).float()
    before = copy.deepcopy(model)
    scaler = CountingScaler("cpu", init_scale=2.0**10)
    opt = _sam(model, momentum=0.9)
    for seed in range(3):
        x, y = batch(seed, n=32)
        result = training_step(model, opt, CE, x.float(), y, micro_batch_size=8, autocast_dtype=torch.float16,
                               grad_scaler=scaler, max_grad_norm=10.0)
        assert torch.isfinite(result.loss)
    assert scaler.calls == {"update": 3, "unscale_": 3, "step": 3}
    assert scaler.get_scale() == 2.0**10  # nothing overflowed, nothing skipped
    assert not torch.equal(model[0].weight, before[0].weight)
    assert not opt.is_perturbed


@pytest.mark.parametrize("micro_batch_size", [None, 4])
def test_loss_scaling_is_exact_for_powers_of_two(micro_batch_size):
    # scale and unscale by 2^12 are exact in floating point, so the scaled step must equal the unscaled one
    # bit for bit: this pins down that the clean gradient is unscaled before eps and the SAM gradient before clipping
    a, b = tiny_mlp(bn=True), tiny_mlp(bn=True)
    opt_a, opt_b = _sam(a, momentum=0.9, sam_every=2), _sam(b, momentum=0.9, sam_every=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for seed in range(3):
        x, y = batch(seed)
        ra = training_step(a, opt_a, CE, x, y, micro_batch_size=micro_batch_size, grad_scaler=scaler,
                           max_grad_norm=0.5)
        rb = training_step(b, opt_b, CE, x, y, micro_batch_size=micro_batch_size, max_grad_norm=0.5)
        assert torch.equal(ra.loss, rb.loss)
    assert_states_equal(snapshot(a), snapshot(b))


class Cliff(nn.Module):
    """loss(w) = -1e30 relu(1 - w) + w at w = 0.99: clean gradient 1e30 + 1, gradient 1 at w + eps = 1.04.

    With a loss scale of 1e10 the clean gradient overflows fp32 (1e40) while the SAM gradient (1e10) does not, so
    only the clean pass's inf check can tell the scaler to skip the step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.99]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = -1e30 * torch.relu(1.0 - self.w) + self.w
        return value.expand(x.shape[0], 2)


def _cliff_loss(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return out[:, 0].mean()


@pytest.mark.parametrize(("init_scale", "skipped"), [(1e10, True), (1.0, False)])
def test_overflow_in_the_clean_pass_skips_the_whole_step(init_scale, skipped):
    model = Cliff()
    opt = _sam(model, rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    x, y = torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)
    w0 = model.w.detach().clone()
    training_step(model, opt, _cliff_loss, x, y, grad_scaler=scaler)
    assert not opt.is_perturbed
    assert opt.state_dict()["sam"]["steps"] == 1  # counted either way (sam_every stays in step with iterations)
    if skipped:
        assert torch.equal(model.w.detach(), w0) and scaler.get_scale() == init_scale * 0.5
    else:
        # the SAM gradient at w + eps = 1.04 is 1: w <- 0.99 - 0.1 * 1
        assert model.w.item() == pytest.approx(0.89, rel=1e-6) and scaler.get_scale() == init_scale


class NanGuard(nn.Module):
    """loss = nan_to_num(1e30 a, nan=0) at a = 2: gradient 1e30 at w.

    Scaled by 1e10 the clean gradient overflows, so ``eps`` is NaN; at w + eps the model maps the NaN to 0 and the
    SAM gradient is a finite 0. Only the clean pass's inf check can skip this step; otherwise weight decay alone
    would move ``a``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(1e30 * self.a, nan=0.0).expand(x.shape[0], 2)


def test_clean_pass_overflow_skips_even_when_the_sam_gradient_is_finite():
    model = NanGuard()
    opt = _sam(model, lr=0.1, weight_decay=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1e10)
    before = snapshot(model)
    training_step(model, opt, _cliff_loss, torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), grad_scaler=scaler)
    assert_states_equal(snapshot(model), before)
    assert scaler.get_scale() == 0.5e10 and not opt.is_perturbed


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"micro_batch_size": 0}, r"micro_batch_size must be a positive integer .*got 0"),
        ({"micro_batch_size": 2.5}, r"micro_batch_size must be a positive integer .*got 2.5"),
        ({"max_grad_norm": 0.0}, r"max_grad_norm must be > 0 .*got 0.0"),
        ({"max_grad_norm": -1}, r"max_grad_norm must be > 0 .*got -1"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    model = tiny_mlp()
    with pytest.raises(SharpscopeError, match=match):
        training_step(model, _sam(model), CE, *batch(), **kwargs)


def test_micro_batches_need_sam():
    model = tiny_mlp()
    with pytest.raises(SharpscopeError, match=r"micro_batch_size \(m-sharpness\) needs a SAM optimizer, got SGD"):
        training_step(model, torch.optim.SGD(model.parameters(), lr=0.1), CE, *batch(), micro_batch_size=4)


def test_error_in_the_perturbed_pass_leaves_the_weights_at_w():
    model = tiny_mlp(bn=True)
    before = snapshot(model)
    opt = _sam(model, rho=0.5)
    calls = []

    def failing_loss(logits, labels):
        calls.append(opt.is_perturbed)
        if opt.is_perturbed:
            raise RuntimeError("out of memory")
        return CE(logits, labels)

    with pytest.raises(RuntimeError, match="out of memory"):
        training_step(model, opt, failing_loss, *batch())
    assert calls == [False, True] and not opt.is_perturbed
    for key in ("0.weight", "0.bias", "3.weight"):
        assert torch.equal(model.state_dict()[key], before[key])


def test_length_mismatch_raises():
    model = tiny_mlp()
    x, y = batch()
    with pytest.raises(SharpscopeError, match=r"same number of samples, got 16 images and 15 labels"):
        training_step(model, _sam(model), CE, x, y[:15])
