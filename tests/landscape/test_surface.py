"""Loss surfaces: exact centre, agreement with the serial reference, closed forms, resume, sharding, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.landscape import (
    Direction,
    covering_grid,
    evaluate,
    grid,
    load_surface,
    loss_surface,
    random_direction,
    random_directions,
)

from .conftest import MODELS, image_batches, serial_loss, serial_point, tiny_convnet, tiny_mlp


class CountingLoss:
    """Cross-entropy that counts its calls: one call per batch per evaluation."""

    def __init__(self) -> None:
        self.calls = 0
        self.inner = nn.CrossEntropyLoss()

    def __call__(self, out, y):
        self.calls += 1
        return self.inner(out, y)


def test_grid_has_exact_zero_and_errors():
    assert grid(-1, 1, 51)[25] == 0.0
    coords = grid(-0.3, 0.3, 7)
    assert coords[3] == 0.0 and coords[0] == -0.3 and coords[-1] == 0.3
    with pytest.raises(SharpscopeError, match="expected finite START < STOP"):
        grid(1, -1, 5)
    with pytest.raises(SharpscopeError, match="at least 2 points"):
        grid(-1, 1, 1)


@pytest.mark.parametrize("values", [[3.9, 0.8, 0.0], [-0.5, 0.2], [0.0, 0.0], [-2.0, -1.0], [1e-3, 2e-3]])
def test_covering_grid_has_zero_and_covers_the_values_with_margin(values):
    coords = covering_grid(values, num=21, margin=0.25)
    lo, hi = min(min(values), 0.0), max(max(values), 0.0)
    span = hi - lo if hi > lo else 1.0
    assert coords.size == 21 and np.all(np.diff(coords) > 0)
    assert np.count_nonzero(coords == 0.0) == 1  # exactly 0: the unperturbed model is a grid point
    # float64 rounding of linspace: 1e-12 of the span
    assert coords[0] <= lo - 0.25 * span + 1e-12 * span and coords[-1] >= hi + 0.25 * span - 1e-12 * span
    # the smallest step that reaches both ends with 0 on the grid: at most one step wider than needed
    assert coords[-1] - coords[0] <= 1.5 * span + 2 * (coords[1] - coords[0]), coords


def test_covering_grid_errors():
    with pytest.raises(SharpscopeError, match="at least 3 points"):
        covering_grid([1.0], num=2)
    with pytest.raises(SharpscopeError, match="expected finite values"):
        covering_grid([np.nan, 1.0])
    with pytest.raises(SharpscopeError, match="margin >= 0"):
        covering_grid([1.0], margin=-0.1)


def test_centre_equals_unperturbed_loss_exactly(model_name, device):
    model = MODELS[model_name]().to(device)
    batches = [(x.to(device), y.to(device)) for x, y in image_batches()]
    loss_fn = nn.CrossEntropyLoss()
    before = evaluate(model, loss_fn, batches)
    d1, d2 = random_directions(model, dim=2, seed=1)
    surface = loss_surface(model, loss_fn, batches, directions=(d1, d2), coords=(grid(-1, 1, 5), grid(-1, 1, 3)))
    j, i = surface.center_index()
    # w0 + 0 d1 + 0 d2 is w0 bit for bit, evaluated by the same code on the same batches: equal, not close
    assert surface.loss[j, i] == surface.center_loss == before.loss
    assert surface.accuracy[j, i] == surface.center_accuracy == before.accuracy


def test_fast_path_matches_serial_reference(model_name, device):
    model = MODELS[model_name]().to(device)
    batches = [(x.to(device), y.to(device)) for x, y in image_batches()]
    loss_fn = nn.CrossEntropyLoss()
    d1, d2 = random_directions(model, dim=2, seed=4)
    xs, ys = grid(-1, 1, 4), grid(-0.5, 1.5, 3)  # non-square, no centre: layout errors would show
    surface = loss_surface(model, loss_fn, batches, directions=(d1, d2), coords=(xs, ys))
    assert surface.shape == (3, 4) and surface.complete
    for j, b in enumerate(ys):
        for i, a in enumerate(xs):
            ref_loss, ref_acc = serial_point(model, (d1, d2), (a, b), loss_fn, batches)
            # float32 forward; the two paths round w0 + a d1 + b d2 differently (fused add vs separate), ~1 ulp
            # of the weights, and sum the batch losses in a different order: 1e-6 relative covers both
            assert surface.loss[j, i] == pytest.approx(ref_loss, rel=1e-6, abs=1e-6), (j, i)
            assert surface.accuracy[j, i] == pytest.approx(ref_acc, abs=1e-12), (j, i)


def test_model_restored_bit_for_bit_and_bn_untouched():
    model = tiny_convnet()
    model.train()  # the caller's mode comes back too
    state = copy.deepcopy(model.state_dict())
    (d,) = random_directions(model, dim=1, seed=0)
    loss_surface(model, nn.CrossEntropyLoss(), image_batches(), directions=(d,), coords=grid(-1, 1, 5))
    assert model.training
    for name, t in model.state_dict().items():
        assert torch.equal(t, state[name]), name  # includes BN running stats and num_batches_tracked


def test_linear_regression_curve_matches_closed_form():
    # MSE of a linear model along a line is a quadratic in a, computed here in float64:
    # L(a) = mean((r + a q)^2) with r = X w0 + b - y, q = X d (the bias is ignored: d_b = 0)
    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64)
    y = torch.randn(50, 1, dtype=torch.float64)
    model = nn.Linear(6, 1).double()
    (d,) = random_directions(model, dim=1, seed=2)
    xs = grid(-2, 2, 9)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    surface = loss_surface(model, nn.MSELoss(), batches, directions=(d,), coords=xs)
    w, b = model.weight.detach()[0], model.bias.detach()
    r = x @ w + b - y[:, 0]
    q = x @ d.tensors["weight"][0]
    expected = [float(torch.mean((r + a * q) ** 2)) for a in xs]
    # float64 all the way; the only difference is summation order (batch-weighted vs one mean): ~1e-15
    np.testing.assert_allclose(surface.loss, expected, rtol=1e-12, atol=0)
    assert np.isnan(surface.accuracy).all() and np.isnan(surface.center_accuracy)  # regression: no accuracy


def test_logistic_regression_curve_matches_closed_form():
    # binary cross-entropy of logits X w + b along w + a d: softplus form, float64
    torch.manual_seed(1)
    x = torch.randn(40, 5, dtype=torch.float64)
    y = (torch.rand(40, dtype=torch.float64) > 0.5).double()
    model = nn.Sequential(nn.Linear(5, 1), nn.Flatten(0)).double()
    (d,) = random_directions(model, dim=1, seed=3, norm="none")
    xs = grid(-1, 1, 7)
    surface = loss_surface(model, nn.BCEWithLogitsLoss(), [(x, y)], directions=(d,), coords=xs)
    w, b = model[0].weight.detach()[0], model[0].bias.detach()
    dw = d.tensors["0.weight"][0]
    expected = []
    for a in xs:
        z = x @ (w + a * dw) + b
        expected.append(float(torch.mean(torch.nn.functional.softplus(z) - y * z)))
    np.testing.assert_allclose(surface.loss, expected, rtol=1e-12, atol=0)  # float64, same formula


def test_resume_after_exception_recomputes_nothing(tmp_path):
    model = tiny_mlp()
    batches = image_batches()
    d1, d2 = random_directions(model, dim=2, seed=0)
    coords = (grid(-1, 1, 4), grid(-1, 1, 5))
    full = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1, d2), coords=coords)

    path = tmp_path / "partial.npz"

    def crash(event):
        if event.points_done >= 8:  # two rows of 4 done and saved
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1, d2), coords=coords,
                     checkpoint_path=path, on_chunk=crash)
    partial = load_surface(path)
    assert partial.done.sum() == 8 and not partial.complete and np.isnan(partial.loss[~partial.done]).all()

    counting = CountingLoss()
    resumed = loss_surface(model, counting, batches, directions=(d1, d2), coords=coords, checkpoint_path=path)
    # 12 new points + centre + determinism probe, 3 batches each: nothing saved was recomputed
    assert counting.calls == (12 + 2) * len(batches)
    assert resumed.metadata["points_computed_this_run"] == 12
    assert resumed.complete
    np.testing.assert_array_equal(resumed.loss, full.loss)  # identical, not close: points are order-free
    np.testing.assert_array_equal(resumed.accuracy, full.accuracy)
    np.testing.assert_array_equal(load_surface(path).loss, full.loss)


def test_max_points_then_resume_from(model_name):
    model = MODELS[model_name]()
    batches = image_batches()
    (d,) = random_directions(model, dim=1, seed=9)
    xs = grid(-1, 1, 7)
    full = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d,), coords=xs, chunk_size=2)
    part = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d,), coords=xs, max_points=3)
    assert part.done.tolist() == [True] * 3 + [False] * 4
    counting = CountingLoss()
    rest = loss_surface(model, counting, batches, directions=(d,), coords=xs, resume_from=part)
    assert counting.calls == (4 + 2) * len(batches)
    np.testing.assert_array_equal(rest.loss, full.loss)


def test_shards_merge_to_the_full_surface():
    model = tiny_convnet()
    batches = image_batches()
    d1, d2 = random_directions(model, dim=2, seed=3)
    coords = (grid(-1, 1, 3), grid(-1, 1, 3))
    full = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1, d2), coords=coords)
    parts = [loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1, d2), coords=coords,
                          shard=(rank, 2)) for rank in range(2)]
    assert parts[0].done.sum() == 5 and parts[1].done.sum() == 4
    merged = parts[1].merge(parts[0])
    np.testing.assert_array_equal(merged.loss, full.loss)  # evaluation order never changes a point
    other = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d2, d1), coords=coords, max_points=0)
    with pytest.raises(SharpscopeError, match="fingerprints differ"):
        full.merge(other)


def test_resume_refuses_a_different_surface(tmp_path):
    model = tiny_mlp()
    batches = image_batches()
    d1, d2 = random_directions(model, dim=2, seed=0)
    path = tmp_path / "s.npz"
    loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1,), coords=grid(-1, 1, 3),
                 checkpoint_path=path)
    with pytest.raises(SharpscopeError, match="resume file .* different grid, directions"):
        loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d2,), coords=grid(-1, 1, 3),
                     checkpoint_path=path)
    part = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1,), coords=grid(-1, 1, 3))
    with pytest.raises(SharpscopeError, match="resume_from holds a surface of a different grid"):
        loss_surface(model, nn.CrossEntropyLoss(), batches[:1], directions=(d1,), coords=grid(-1, 1, 3),
                     resume_from=part)
    with pytest.raises(SharpscopeError, match="centre loss .* differs"):
        loss_surface(model, nn.MultiMarginLoss(), batches, directions=(d1,), coords=grid(-1, 1, 3),
                     resume_from=part)


class Noisy(nn.Module):
    def forward(self, x):
        return x + 0.1 * torch.randn_like(x)  # stochastic even in eval mode


def test_determinism_probe_refuses_stochastic_models():
    model = nn.Sequential(tiny_mlp(), Noisy())
    d = random_direction(model)
    with pytest.raises(SharpscopeError, match="two evaluations of the same weights gave different losses"):
        loss_surface(model, nn.CrossEntropyLoss(), image_batches(), directions=(d,), coords=grid(-1, 1, 3))
    surface = loss_surface(model, nn.CrossEntropyLoss(), image_batches(), directions=(d,), coords=grid(-1, 1, 3),
                           check_deterministic=False)
    assert surface.complete


def test_argument_errors():
    model = tiny_mlp()
    batches = image_batches()
    d1, d2 = random_directions(model, dim=2)
    ce = nn.CrossEntropyLoss()
    with pytest.raises(SharpscopeError, match="one direction needs one coordinate array"):
        loss_surface(model, ce, batches, directions=(d1,), coords=np.zeros((2, 2)))
    with pytest.raises(SharpscopeError, match=r"two directions need two coordinate arrays"):
        loss_surface(model, ce, batches, directions=(d1, d2), coords=grid(-1, 1, 3))
    with pytest.raises(SharpscopeError, match=r"xs: expected a 1-D array of coordinates, got shape \(2, 2\)"):
        loss_surface(model, ce, batches, directions=(d1, d2), coords=(np.zeros((2, 2)), [0.0]))
    with pytest.raises(SharpscopeError, match=r"ys: expected a 1-D array of coordinates, got shape \(0,\)"):
        loss_surface(model, ce, batches, directions=(d1, d2), coords=([0.0], np.zeros(0)))
    with pytest.raises(SharpscopeError, match="coordinates must be finite"):
        loss_surface(model, ce, batches, directions=(d1,), coords=[0.0, np.nan])
    with pytest.raises(SharpscopeError, match="max_points must be >= 0"):
        loss_surface(model, ce, batches, directions=(d1,), coords=[0.0], max_points=-1)
    with pytest.raises(SharpscopeError, match="chunk_size must be >= 1"):
        loss_surface(model, ce, batches, directions=(d1,), coords=[0.0], chunk_size=0)
    with pytest.raises(SharpscopeError, match=r"shard must be \(rank, world_size\)"):
        loss_surface(model, ce, batches, directions=(d1,), coords=[0.0], shard=(2, 2))
    with pytest.raises(SharpscopeError, match="evaluation batches are empty"):
        loss_surface(model, ce, [], directions=(d1,), coords=[0.0])
    with pytest.raises(SharpscopeError, match=r"expected batches of \(inputs, targets\) pairs"):
        loss_surface(model, ce, [torch.zeros(2)], directions=(d1,), coords=[0.0])
    with pytest.raises(SharpscopeError, match="loss_fn must return the batch-mean loss as a 0-d tensor"):
        loss_surface(model, nn.CrossEntropyLoss(reduction="none"), batches, directions=(d1,), coords=[0.0])


def test_surface_file_roundtrip_and_errors(tmp_path):
    model = tiny_mlp()
    d1, d2 = random_directions(model, dim=2)
    surface = loss_surface(model, nn.CrossEntropyLoss(), image_batches(), directions=(d1, d2),
                           coords=(grid(-1, 1, 3), grid(-1, 1, 2)), label="sgd")
    loaded = load_surface(surface.save(tmp_path / "s.npz"))
    np.testing.assert_array_equal(loaded.loss, surface.loss)
    np.testing.assert_array_equal(loaded.ys, surface.ys)
    assert loaded.label == "sgd" and loaded.center_loss == surface.center_loss
    assert loaded.metadata["fingerprint"] == surface.metadata["fingerprint"]
    one = loss_surface(model, nn.CrossEntropyLoss(), image_batches(), directions=(d1,), coords=grid(-1, 1, 3))
    assert load_surface(one.save(tmp_path / "one.npz")).ys is None
    with pytest.raises(SharpscopeError, match="does not exist"):
        load_surface(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(1))
    with pytest.raises(SharpscopeError, match="not a sharpscope surface file"):
        load_surface(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(SharpscopeError, match="cannot be read"):
        load_surface(tmp_path / "broken.npz")


def test_buffer_directions_move_bn_statistics():
    # a direction may name BN buffers (interpolation does); the reference loads the same state
    model = tiny_convnet()
    d = Direction({"1.running_mean": torch.ones(6), "0.weight": torch.zeros_like(model[0].weight)})
    batches = image_batches()
    surface = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d,), coords=[0.0, 0.5])
    ref, _ = serial_point(model, (d,), (0.5,), nn.CrossEntropyLoss(), batches)
    assert surface.loss[1] == pytest.approx(ref, rel=1e-6)  # float32, different reduction order
    assert surface.metadata["moved_tensors"] == 1  # the all-zero weight direction is skipped
    assert surface.loss[0] == pytest.approx(serial_loss(model, nn.CrossEntropyLoss(), batches)[0], rel=1e-6)


def test_channels_last_matches_contiguous_and_restores_layout():
    model = tiny_convnet()
    storage = {n: p.data_ptr() for n, p in model.named_parameters()}
    batches = image_batches()
    d1, d2 = random_directions(model, dim=2, seed=6)
    coords = (grid(-1, 1, 3), grid(-1, 1, 3))
    fast = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1, d2), coords=coords,
                        channels_last=True)
    plain = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1, d2), coords=coords,
                         channels_last=False)
    default = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1, d2), coords=coords)
    assert fast.metadata["channels_last"] and not plain.metadata["channels_last"]
    assert not default.metadata["channels_last"]  # default: on for convnets on CUDA only, not on this CPU model
    assert default.metadata["fingerprint"] == plain.metadata["fingerprint"]
    # same weights and data, another memory layout: only the conv reduction order differs (float32)
    np.testing.assert_allclose(fast.loss, plain.loss, rtol=1e-6)
    assert fast.metadata["fingerprint"] != plain.metadata["fingerprint"]  # never resumed into each other
    for name, p in model.named_parameters():
        assert p.is_contiguous() and p.data_ptr() == storage[name], name  # the caller's tensors are back
    assert evaluate(model, nn.CrossEntropyLoss(), batches, channels_last=True).loss == fast.center_loss


def test_channels_last_default_is_cuda_convnets_only(device):
    from sharpscope.landscape.surface import _wants_channels_last

    batches = [(x.to(device), y.to(device)) for x, y in image_batches()]
    on_cuda = torch.device(device).type == "cuda"
    assert _wants_channels_last(None, batches, tiny_convnet().to(device)) == on_cuda
    assert not _wants_channels_last(None, batches, tiny_mlp().to(device))  # no convolutions: only copies to pay
    assert _wants_channels_last(True, batches, tiny_mlp().to(device))  # an explicit choice is kept


def test_bf16_autocast_is_close_to_fp32_and_never_resumed_into_it(tmp_path):
    model = tiny_convnet()
    batches = image_batches()
    d1, d2 = random_directions(model, dim=2, seed=6)
    coords = (grid(-1, 1, 3), grid(-1, 1, 3))
    exact = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1, d2), coords=coords)
    half = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1, d2), coords=coords, precision="bf16",
                        checkpoint_path=tmp_path / "bf16.npz")
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per operation); through two convs and a linear
    # layer the loss moves by a few 1e-3 relative: 3e-2 bounds it, and the values must not be bit-identical
    np.testing.assert_allclose(half.loss, exact.loss, rtol=3e-2)
    assert not np.array_equal(half.loss, exact.loss)
    assert evaluate(model, nn.CrossEntropyLoss(), batches, precision="bf16").loss == half.center_loss
    with pytest.raises(SharpscopeError, match="holds a surface of a different grid"):
        loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1, d2), coords=coords,
                     checkpoint_path=tmp_path / "bf16.npz")
    with pytest.raises(SharpscopeError, match=r"unknown precision 'fp16'"):
        loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1, d2), coords=coords, precision="fp16")


@pytest.mark.slow
def test_compiled_forward_passes_match_eager():
    model = tiny_convnet()
    batches = image_batches()
    (d1,) = random_directions(model, dim=1, seed=2)
    xs = grid(-1, 1, 5)
    eager = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1,), coords=xs)
    compiled = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=(d1,), coords=xs, compile=True)
    # the compiled graph sees the weights _WeightSetter moves in place (else every point would equal the centre);
    # inductor fuses and reorders float32 reductions: 1e-5 relative
    np.testing.assert_allclose(compiled.loss, eager.loss, rtol=1e-5)
    assert len(set(np.round(compiled.loss, 6))) == 5


def test_a_surface_prints_as_one_line_without_its_arrays():
    import numpy as np

    from sharpscope.landscape import Surface

    loss = np.array([[0.5, 0.2, np.nan], [0.4, 0.1, 0.3]])
    surface = Surface(xs=np.array([-1.0, 0.0, 1.0]), ys=np.array([0.0, 1.0]), loss=loss, accuracy=loss * 0 + 0.5,
                      done=np.isfinite(loss), center_loss=0.2, center_accuracy=0.875, num_samples=64,
                      metadata={"label": "sgd"})
    text = repr(surface)
    assert text == ("Surface('sgd', 2-D, 2 x 3 points in [-1, 1] x [0, 1]: centre loss 0.2 (accuracy 87.50%), "
                    "loss 0.1..0.5, 5/6 points computed, 64 samples)")


def test_a_landscape_result_prints_its_surfaces_and_barrier_not_its_file_list(tmp_path):
    import numpy as np

    from sharpscope.landscape import LandscapeResult, Surface

    curve = Surface(xs=np.linspace(0, 1, 3), ys=None, loss=np.array([0.1, 0.4, 0.2]), accuracy=np.full(3, np.nan),
                    done=np.ones(3, bool), center_loss=0.1, center_accuracy=float("nan"), num_samples=8,
                    metadata={"label": "sgd-to-sam"})
    result = LandscapeResult(out=tmp_path, directions="interpolate", labels=("sgd-to-sam",), surfaces=(curve,),
                             written=tuple(tmp_path / f"f{i}" for i in range(9)), log_scale=False, barrier=0.2,
                             notes=(), ranks=1)
    assert repr(result).splitlines() == [
        f"LandscapeResult(interpolate directions, linear loss scale, 9 files in {str(tmp_path)!r}",
        "  Surface('sgd-to-sam', 1-D, 3 points in [0, 1]: centre loss 0.1, loss 0.1..0.4, 8 samples)",
        "  loss barrier 0.2)"]
