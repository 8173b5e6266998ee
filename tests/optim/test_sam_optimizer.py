"""SAM as a torch.optim.Optimizer: closed forms, a hand-written reference loop, groups, schedules, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from optim_cases import DT, Quadratic, batch, ce, eps_formula, mlp_ref_forward, tiny_mlp

from sharpscope.errors import SharpscopeError
from sharpscope.optim import SAM

# Closed forms on 7 numbers in float64: agreement to ~1e-15; 1e-12 allows the reordered arithmetic.
RTOL, ATOL = 1e-12, 1e-14


def _grads(q: Quadratic) -> np.ndarray:
    return np.concatenate([q.w1.grad.numpy(), q.w2.grad.numpy()])


# ---------------------------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("p", [2.0, math.inf, 3.0], ids=lambda p: f"p={p}")
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_quadratic_step_matches_closed_form(p, adaptive):
    q = Quadratic()
    rho, lr, eta = 0.05, 0.1, 0.01
    # two param groups: the norm must still be joint over both (one ball, Foret et al. 2021)
    opt = SAM([{"params": [q.w1]}, {"params": [q.w2]}], torch.optim.SGD, rho=rho, p=p, adaptive=adaptive,
              eta=eta, lr=lr)
    w0 = q.w()
    g0 = q.grad_at(w0)
    eps = eps_formula(g0, rho=rho, p=p, T=np.abs(w0) + eta if adaptive else None)

    q.closure()
    np.testing.assert_allclose(_grads(q), g0, rtol=RTOL, atol=ATOL)
    opt.first_step(zero_grad=True)
    np.testing.assert_allclose(q.w(), w0 + eps, rtol=RTOL, atol=ATOL)
    q.closure()
    g_sam = q.A @ (w0 + eps) - q.b  # the SAM gradient: grad L at w + eps
    np.testing.assert_allclose(_grads(q), g_sam, rtol=RTOL, atol=ATOL)
    opt.second_step()
    np.testing.assert_allclose(q.w(), w0 - lr * g_sam, rtol=RTOL, atol=ATOL)


def test_step_closure_equals_two_half_steps_and_returns_clean_loss():
    a, b = Quadratic(), Quadratic()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(3):
        clean = a.loss().item()
        returned = opt_a.step(a.closure)
        assert returned.item() == clean  # the loss at w, not at w + eps
        b.closure()
        opt_b.first_step(zero_grad=True)
        b.closure()
        opt_b.second_step(zero_grad=True)
    assert torch.equal(a.w1, b.w1) and torch.equal(a.w2, b.w2)


# ------------------------------------------------------------------------------------ reference training loop


def _reference_sam(weights, batches, *, base, rho, hp):
    """SAM (p = 2) + SGD-momentum-L2 or Adam, written out by hand on the MLP's four tensors."""
    w = [t.detach().clone() for t in weights]
    buf = [None] * 4
    m = [torch.zeros_like(t) for t in w]
    v = [torch.zeros_like(t) for t in w]
    for t, (x, y) in enumerate(batches, start=1):
        wr = [wi.clone().requires_grad_() for wi in w]
        g = torch.autograd.grad(ce(mlp_ref_forward(wr, x), y), wr)
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        wp = [(wi + rho * gi / norm).requires_grad_() for wi, gi in zip(w, g)]
        gs = torch.autograd.grad(ce(mlp_ref_forward(wp, x), y), wp)
        for i in range(4):
            if base == "sgd":
                d = gs[i] + hp["weight_decay"] * w[i]
                buf[i] = d.clone() if t == 1 else hp["momentum"] * buf[i] + d
                w[i] = w[i] - hp["lr"] * buf[i]
            else:
                b1, b2 = hp["betas"]
                m[i] = b1 * m[i] + (1 - b1) * gs[i]
                v[i] = b2 * v[i] + (1 - b2) * gs[i] ** 2
                m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
                w[i] = w[i] - hp["lr"] * m_hat / (torch.sqrt(v_hat) + hp["eps"])
    return w


BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.2, "momentum": 0.9, "weight_decay": 1e-2}),
    "adam": (torch.optim.Adam, {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-8}),
}


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("steps", [1, 4])
def test_matches_hand_written_reference(base, steps):
    cls, hp = BASES[base]
    model = tiny_mlp()
    weights0 = [p.detach().clone() for p in model.parameters()]
    batches = [batch(seed) for seed in range(steps)]
    opt = SAM(model.parameters(), cls, rho=0.1, **hp)
    for x, y in batches:
        def closure():
            loss = ce(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    expected = _reference_sam(weights0, batches, base=base, rho=0.1, hp=hp)
    for got, want in zip(model.parameters(), expected):
        # float64 through a few nonlinear steps; the two differ only in operation order (~1e-16 relative)
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    # not trivially equal: the SAM steps moved the weights
    assert not torch.allclose(next(model.parameters()), weights0[0])


# -------------------------------------------------------------------------------------- exactness, zeros


def test_many_half_steps_without_update_restore_weights_exactly():
    model = tiny_mlp(width=16)
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0)  # base step w - 0 * g = w
    for seed in range(25):
        x, y = batch(seed)
        ce(model(x), y).backward()
        opt.first_step(zero_grad=True)
        assert not torch.equal(next(model.parameters()), before[0])  # really perturbed (rho = 0.5)
        ce(model(x), y).backward()
        opt.second_step(zero_grad=True)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)  # a copy is restored, not w + eps - eps


def test_restore_without_step_is_exact_and_idempotent():
    model = tiny_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, p=3.0, adaptive=True, lr=0.1)
    x, y = batch()
    ce(model(x), y).backward()
    opt.first_step()
    assert opt.is_perturbed
    opt.restore()
    opt.restore()
    assert not opt.is_perturbed
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_hold_lets_step_take_the_base_step_from_unmoved_weights():
    # the batched m-SAM pass accumulates the SAM gradient in p.grad without moving w, then holds and steps
    model, ref = tiny_mlp(), tiny_mlp()
    x, y = batch()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for net in (model, ref):
            net.zero_grad()
            ce(net(x), y).backward()
        opt.hold()
        assert opt.is_perturbed
        with pytest.raises(SharpscopeError, match=r"hold\(\) called while perturbed"):
            opt.hold()
        opt.step()
        ref_opt.step()
        assert not opt.is_perturbed
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    assert opt.state_dict()["sam"] == {"steps": 2}  # counted as SAM steps (sam_every stays in step)


@pytest.mark.parametrize("p", [2.0, math.inf, 1.0, 3.0], ids=lambda p: f"p={p}")
def test_zero_gradient_leaves_weights_unchanged(p):
    model = tiny_mlp()
    before = [t.detach().clone() for t in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, p=p, adaptive=True, lr=0.1, momentum=0.9)
    for t in model.parameters():
        t.grad = torch.zeros_like(t)
    opt.first_step()
    for t, b in zip(model.parameters(), before):
        assert torch.equal(t, b)  # eps = 0, not NaN
    opt.second_step()
    for t, b in zip(model.parameters(), before):
        assert torch.equal(t, b)


def test_parameters_without_grad_are_not_perturbed():
    q = Quadratic()
    opt = SAM(q.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    w1, w2 = q.w1.detach().clone(), q.w2.detach().clone()
    q.w1.grad = torch.ones(4, dtype=DT)  # q.w2.grad stays None
    opt.first_step()
    assert torch.equal(q.w2, w2)
    # w2 is not in the norm either: w1 moves by rho * 1 / ||1||_2 = 0.05 / 2 per entry
    torch.testing.assert_close(q.w1.detach(), w1 + 0.025, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------- param groups


def test_param_groups_and_state_are_the_base_optimizers():
    model = tiny_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = batch()
    ce(model(x), y).backward()
    opt.first_step(zero_grad=True)
    ce(model(x), y).backward()
    opt.step()  # finishes the step (what GradScaler.step calls)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.05
    assert "momentum_buffer" in opt.state[next(model.parameters())]


def test_deepcopy_keeps_the_base_optimizer_and_steps_identically():
    import copy

    model = tiny_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sam_every=2)
    x, y = batch()
    opt.step(lambda: ce(model(x), y).backward())
    model2, opt2 = copy.deepcopy((model, opt))  # one deepcopy: the optimizer must point at the copied params
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.state is opt2.base_optimizer.state
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    for m, o in [(model, opt), (model2, opt2)]:
        for _ in range(2):
            o.step(lambda m=m: ce(m(x), y).backward())
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_add_param_group_reaches_the_base_optimizer_with_all_defaults():
    a, b = tiny_mlp(), tiny_mlp(seed=1)
    opt = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": b.parameters(), "rho": 0.2, "lr": 0.01})
    assert len(opt.base_optimizer.param_groups) == 2
    group = opt.base_optimizer.param_groups[1]
    assert group["rho"] == 0.2 and group["p"] == 2.0 and group["momentum"] == 0.9 and group["lr0"] == 0.01


def test_per_group_rho_scales_the_joint_direction():
    q = Quadratic()
    opt = SAM([{"params": [q.w1], "rho": 0.05}, {"params": [q.w2], "rho": 0.2}], torch.optim.SGD, lr=0.1)
    w0 = q.w()
    g = q.grad_at(w0)
    d = g / np.linalg.norm(g)  # one direction for both groups, each scaled by its own rho
    q.closure()
    opt.first_step()
    np.testing.assert_allclose(q.w() - w0, np.concatenate([0.05 * d[:4], 0.2 * d[4:]]), rtol=RTOL, atol=ATOL)


def test_groups_with_different_p_get_separate_balls():
    q = Quadratic()
    opt = SAM([{"params": [q.w1], "p": 2.0}, {"params": [q.w2], "p": math.inf}], torch.optim.SGD, lr=0.1)
    w0 = q.w()
    g = q.grad_at(w0)
    q.closure()
    opt.first_step()
    expected = np.concatenate([0.05 * g[:4] / np.linalg.norm(g[:4]), 0.05 * np.sign(g[4:])])
    np.testing.assert_allclose(q.w() - w0, expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------- rho schedule, every k


def test_rho_schedule_lr_scales_rho_with_lr():
    q = Quadratic()
    opt = SAM(q.parameters(), torch.optim.SGD, rho=0.08, rho_schedule="lr", lr=0.2)
    w0 = q.w()
    for factor in [1.0, 0.25, 0.0]:
        opt.param_groups[0]["lr"] = 0.2 * factor  # what a scheduler does (warm-up starts at 0)
        assert opt.scheduled_rho(opt.param_groups[0]) == pytest.approx(0.08 * factor)
        q.closure()
        opt.first_step(zero_grad=True)
        # the perturbation lies on the sphere of radius rho * lr / lr_0 (exactly 0 at lr = 0)
        assert np.linalg.norm(q.w() - w0) == pytest.approx(0.08 * factor, rel=1e-12, abs=0)
        opt.restore()


def test_rho_schedule_constant_ignores_lr():
    q = Quadratic()
    opt = SAM(q.parameters(), torch.optim.SGD, rho=0.08, lr=0.2)
    opt.param_groups[0]["lr"] = 0.01
    assert opt.scheduled_rho(opt.param_groups[0]) == 0.08


def test_sam_every_skips_the_second_closure_call():
    model = tiny_mlp()
    plain = tiny_mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, sam_every=3, lr=0.1)
    calls = []
    x, y = batch()

    def closure():
        calls.append(opt.is_perturbed)
        loss = ce(model(x), y)
        loss.backward()
        return loss

    for step in range(6):
        if step == 1:  # after one SAM step, the next step must be a plain SGD step with one pass
            plain.load_state_dict(model.state_dict())
            ref_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
            ce(plain(x), y).backward()
            ref_opt.step()
        opt.step(closure)
        if step == 1:
            for a, b in zip(model.parameters(), plain.parameters()):
                assert torch.equal(a, b)
    # steps 0 and 3 are SAM steps (clean + perturbed pass), the other four one pass each
    assert calls == [False, True, False, False, False, True, False, False]


def test_step_without_closure_on_a_skipped_step_is_a_base_step():
    q = Quadratic()
    opt = SAM(q.parameters(), torch.optim.SGD, sam_every=2, lr=0.1)
    opt.step(q.closure)  # SAM step 0
    w0 = q.w()
    opt.zero_grad()
    q.closure()
    opt.step()  # step 1 is not a SAM step: plain SGD with the current gradient
    np.testing.assert_allclose(q.w(), w0 - 0.1 * q.grad_at(w0), rtol=RTOL, atol=ATOL)
    assert opt.sam_step_due


# -------------------------------------------------------------------------------------------------- errors


class _NotAnOptimizer:
    pass


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": 0.0}, r"rho must be > 0, got 0.0"),
        ({"rho": -1}, r"rho must be > 0, got -1"),
        ({"p": 0.9}, r"p must be >= 1 .*got 0.9"),
        ({"eta": -0.1}, r"eta must be a finite number >= 0, got -0.1"),
        ({"adaptive": 1}, r"adaptive must be True or False, got 1"),
        ({"rho_schedule": "cosine"}, r"unknown rho schedule 'cosine'.*choices: constant, lr"),
        ({"sam_every": 0}, r"sam_every must be an integer >= 1, got 0"),
        ({"sam_every": 1.5}, r"sam_every must be an integer >= 1, got 1.5"),
        ({"rho_schedule": "lr", "lr": 0.0}, r"rho_schedule='lr' .*needs lr_0 > 0, got lr=0.0"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"lr": 0.1, **kwargs}
    with pytest.raises(SharpscopeError, match=match):
        SAM(tiny_mlp().parameters(), torch.optim.SGD, **kwargs)


def test_bad_group_setting_raises():
    with pytest.raises(SharpscopeError, match=r"rho must be > 0, got -0.5"):
        SAM([{"params": tiny_mlp().parameters(), "rho": -0.5}], torch.optim.SGD, lr=0.1)
    opt = SAM(tiny_mlp().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(SharpscopeError, match=r"p must be >= 1"):
        opt.add_param_group({"params": tiny_mlp(seed=2).parameters(), "p": 0})


@pytest.mark.parametrize(
    ("base", "match"),
    [
        (torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), r"must be an optimizer class"),
        (_NotAnOptimizer, r"must be an optimizer class"),
        (SAM, r"must not be SAM itself"),
    ],
)
def test_bad_base_optimizer_raises(base, match):
    with pytest.raises(SharpscopeError, match=match):
        SAM(tiny_mlp().parameters(), base, lr=0.1)


def test_misordered_calls_raise():
    q = Quadratic()
    opt = SAM(q.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(SharpscopeError, match=r"second_step\(\) needs a preceding first_step\(\)"):
        opt.second_step()
    with pytest.raises(SharpscopeError, match=r"SAM.step\(\) without a closure only finishes a step"):
        opt.step()
    q.closure()
    opt.first_step()
    with pytest.raises(SharpscopeError, match=r"first_step\(\) was called twice"):
        opt.first_step()
    with pytest.raises(SharpscopeError, match=r"step\(closure\) called while perturbed"):
        opt.step(q.closure)
    with pytest.raises(SharpscopeError, match=r"load_state_dict\(\) while perturbed"):
        opt.load_state_dict(opt.state_dict())
    opt.restore()
    with pytest.raises(SharpscopeError, match=r"one gradient \(or None\) per parameter: got 1 for 2"):
        opt.perturb([None])
