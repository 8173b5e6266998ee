"""Directions: filter normalisation, ignored tensors, seeding, files, unflattening."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.landscape import (
    Direction,
    difference_direction,
    directions_from_vectors,
    gaussian_draw,
    load_direction,
    load_directions,
    normalize_direction,
    normalize_draw,
    random_direction,
    random_directions,
    save_directions,
)
from sharpscope.landscape.directions import check_directions

from .conftest import MODELS, tiny_convnet, tiny_mlp


def test_filter_norms_equal_weight_norms(model_name, device):
    model = MODELS[model_name]().to(device)
    (d,) = random_directions(model, dim=1, seed=3)
    checked = 0
    for name, p in model.named_parameters():
        t = d.tensors[name]
        assert t.device == p.device and t.shape == p.shape
        if p.dim() > 1:  # conv kernel (out, in, kh, kw) or Linear (out, in): one filter per output
            d_norms = t.reshape(t.shape[0], -1).norm(dim=1)
            w_norms = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            # float32 rescale of a few dozen entries: relative error ~1e-7; the 1e-10 guard is negligible
            torch.testing.assert_close(d_norms, w_norms, rtol=1e-5, atol=0)
            checked += p.shape[0]
        else:
            assert torch.count_nonzero(t) == 0, f"{name} (dim {p.dim()}) should get a zero direction"
    assert checked > 0


def test_layer_and_none_normalisation():
    model = tiny_convnet()
    (layer,) = random_directions(model, dim=1, seed=5, norm="layer")
    (raw,) = random_directions(model, dim=1, seed=5, norm="none")
    g = torch.Generator().manual_seed(5)
    for name, p in model.named_parameters():
        draw = torch.randn(p.shape, generator=g)  # the documented draw: one per parameter, in order
        if p.dim() > 1:
            torch.testing.assert_close(raw.tensors[name], draw, rtol=0, atol=0)
            torch.testing.assert_close(layer.tensors[name].norm(), p.detach().norm(), rtol=1e-5, atol=0)
            # layer normalisation is one scalar per tensor: the direction stays parallel to the draw
            torch.testing.assert_close(layer.tensors[name] / layer.tensors[name].norm(), draw / draw.norm(),
                                       rtol=1e-5, atol=1e-7)


def test_bias_bn_included_are_normalised_as_a_whole():
    model = tiny_convnet()
    (d,) = random_directions(model, dim=1, seed=0, ignore_bias_bn=False)
    (ignored,) = random_directions(model, dim=1, seed=0, ignore_bias_bn=True)
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            torch.testing.assert_close(d.tensors[name].norm(), p.detach().norm(), rtol=1e-5, atol=0)
            # not elementwise |d_i| = |w_i| (loss-landscapes 3.0.6 issue #3)
            assert not torch.allclose(d.tensors[name].abs(), p.detach().abs())
        else:  # the weights' draw does not depend on whether biases are ignored
            torch.testing.assert_close(d.tensors[name], ignored.tensors[name], rtol=0, atol=0)


def test_same_seed_same_draw_across_models_and_dims():
    a, b = tiny_convnet(seed=0), tiny_convnet(seed=1)
    da1, da2 = random_directions(a, dim=2, seed=7)
    (da_line,) = random_directions(a, dim=1, seed=7)
    db1, _ = random_directions(b, dim=2, seed=7)
    for name, p in a.named_parameters():
        torch.testing.assert_close(da1.tensors[name], da_line.tensors[name], rtol=0, atol=0)
        if p.dim() > 1:
            # same Gaussian draw: per-filter unit vectors agree, norms follow each model's own weights
            ua = da1.tensors[name].reshape(p.shape[0], -1)
            ub = db1.tensors[name].reshape(p.shape[0], -1)
            torch.testing.assert_close(ua / ua.norm(dim=1, keepdim=True), ub / ub.norm(dim=1, keepdim=True),
                                       rtol=1e-5, atol=1e-6)
            assert not torch.allclose(da1.tensors[name], da2.tensors[name])
    assert abs(da2.info["cosine_to_previous"]) < 0.2


def test_normalize_zero_weight_filter_gives_zero_direction():
    w = torch.zeros(2, 3)
    w[1] = 1.0
    d = normalize_direction(torch.ones(2, 3), w, "filter")
    assert torch.count_nonzero(d[0]) == 0
    torch.testing.assert_close(d[1].norm(), w[1].norm())


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_save_load_roundtrip(tmp_path, suffix):
    model = tiny_convnet()
    (d,) = random_directions(model, dim=1, seed=2)
    path = d.save(tmp_path / f"dir{suffix}")
    loaded = load_direction(path)
    assert loaded.names == d.names and loaded.kind == "random" and loaded.seed == 2 and loaded.norm == "filter"
    for name in d.names:
        torch.testing.assert_close(loaded.tensors[name], d.tensors[name], rtol=0, atol=0)
    assert loaded.fingerprint() == d.fingerprint()


def test_direction_file_errors(tmp_path):
    d = random_direction(tiny_mlp())
    with pytest.raises(SharpscopeError, match="expected a .npz or .pt suffix"):
        d.save(tmp_path / "dir.h5")
    with pytest.raises(SharpscopeError, match="expected a .npz or .pt suffix"):
        (tmp_path / "x.txt").write_text("x")
        load_direction(tmp_path / "x.txt")
    with pytest.raises(SharpscopeError, match="does not exist"):
        load_direction(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(SharpscopeError, match="not a sharpscope direction file"):
        load_direction(tmp_path / "other.npz")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SharpscopeError, match="not a sharpscope direction file"):
        load_direction(tmp_path / "other.pt")
    bad = Direction({"__direction_meta__": torch.zeros(1)})
    with pytest.raises(SharpscopeError, match="reserve"):
        bad.save(tmp_path / "bad.npz")


@pytest.mark.parametrize(("norm", "ignore_bias_bn"), [("filter", True), ("layer", False), ("none", True)])
def test_normalized_draw_is_random_directions_exactly(model_name, device, norm, ignore_bias_bn):
    model = MODELS[model_name]().to(device)
    draw = gaussian_draw(model, dim=2, seed=4)
    assert [d.kind for d in draw] == ["draw", "draw"] and all(t.device.type == "cpu" for t in draw[0].tensors.values())
    ours = normalize_draw(model, draw, norm=norm, ignore_bias_bn=ignore_bias_bn)
    theirs = random_directions(model, dim=2, seed=4, norm=norm, ignore_bias_bn=ignore_bias_bn)
    for a, b in zip(ours, theirs):
        assert a.metadata() == b.metadata() and a.fingerprint() == b.fingerprint()
        for name in b.names:
            assert a.tensors[name].device == b.tensors[name].device
            torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=0, atol=0)


def test_a_saved_draw_cuts_another_model_along_its_own_normalised_directions(tmp_path):
    first, second = tiny_convnet(seed=0), tiny_convnet(seed=1)
    path = save_directions(tmp_path / "directions.pt", gaussian_draw(first, dim=2, seed=9))
    for got, want in zip(normalize_draw(second, load_directions(path)), random_directions(second, dim=2, seed=9)):
        assert got.fingerprint() == want.fingerprint()  # the comparable cut of the second model, bit for bit


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_save_load_directions_roundtrip(tmp_path, suffix):
    model = tiny_convnet()
    directions = random_directions(model, dim=2, seed=2)
    about = {"torch": torch.__version__, "grid": np.float64(0.5)}  # str subclass and numpy scalar: stored plain
    path = save_directions(tmp_path / f"dirs{suffix}", directions, about=about)
    loaded = load_directions(path)
    assert len(loaded) == 2
    for a, b in zip(loaded, directions):
        assert a.names == b.names and a.kind == "random" and a.seed == 2 and a.info["index"] == b.info["index"]
        assert a.fingerprint() == b.fingerprint()
    if suffix == ".pt":  # plain types only: loadable without trusting pickled classes
        payload = torch.load(path, weights_only=True)
        assert payload["format"] == "sharpscope.directions" and payload["about"]["torch"] == torch.__version__
    (single,) = load_directions(directions[0].save(tmp_path / f"one{suffix}"))  # a Direction.save file
    assert single.fingerprint() == directions[0].fingerprint()


def test_directions_file_and_draw_errors(tmp_path):
    model = tiny_convnet()
    with pytest.raises(SharpscopeError, match="expected a .pt or .npz suffix"):
        save_directions(tmp_path / "d.h5", random_directions(model, dim=1))
    with pytest.raises(SharpscopeError, match="expected a non-empty sequence of Direction"):
        save_directions(tmp_path / "d.pt", [])
    with pytest.raises(SharpscopeError, match="does not exist"):
        load_directions(tmp_path / "missing.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a torch file")
    with pytest.raises(SharpscopeError, match="cannot be read"):
        load_directions(tmp_path / "broken.pt")
    other = gaussian_draw(tiny_mlp(), dim=1)
    with pytest.raises(SharpscopeError, match="drawn for another architecture"):
        normalize_draw(model, other)
    renamed = Direction({n: torch.zeros(1) for n in gaussian_draw(model, dim=1)[0].names}, kind="draw")
    with pytest.raises(SharpscopeError, match=r"has shape \(1,\) but the model's has"):
        normalize_draw(model, [renamed])
    with pytest.raises(SharpscopeError, match="expected a draw of 1 or 2 directions, got 3"):
        normalize_draw(model, gaussian_draw(model, dim=1) * 3)
    with pytest.raises(SharpscopeError, match="unknown direction normalization 'flter'"):
        normalize_draw(model, gaussian_draw(model, dim=1), norm="flter")
    with pytest.raises(SharpscopeError, match="expected dim 1 or 2, got 0"):
        gaussian_draw(model, dim=0)
    with pytest.raises(SharpscopeError, match="no trainable parameters"):
        gaussian_draw(tiny_mlp().requires_grad_(False))


def test_random_direction_errors():
    model = tiny_mlp()
    with pytest.raises(SharpscopeError, match="unknown direction normalization 'filtr'; did you mean 'filter'"):
        random_directions(model, norm="filtr")
    with pytest.raises(SharpscopeError, match="unknown direction normalization"):
        normalize_direction(torch.ones(2), torch.ones(2), "dfilter")
    with pytest.raises(SharpscopeError, match="expected dim 1 or 2, got 3"):
        random_directions(model, dim=3)
    frozen = tiny_mlp().requires_grad_(False)
    with pytest.raises(SharpscopeError, match="no trainable parameters"):
        random_directions(frozen)


def test_directions_from_vectors_follow_parameter_order():
    model = tiny_convnet()
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    matrix = torch.randn(n, 2, dtype=torch.float64)
    d1, d2 = directions_from_vectors(model, matrix, kind="hessian", infos=[{"eigenvalue": 2.0}, {}])
    flat = torch.cat([t.reshape(-1) for t in d1.tensors.values()])
    torch.testing.assert_close(flat, matrix[:, 0].float(), rtol=0, atol=0)
    assert list(d1.tensors) == [name for name, p in model.named_parameters()]
    assert d1.info == {"eigenvalue": 2.0} and d1.kind == "hessian"
    (single,) = directions_from_vectors(model, [matrix[:, 1].numpy()])
    torch.testing.assert_close(single.flatten(), d2.flatten(), rtol=0, atol=0)
    with pytest.raises(SharpscopeError, match=rf"\(n, k\) matrix with n = {n}"):
        directions_from_vectors(model, torch.zeros(n + 1, 2))
    with pytest.raises(SharpscopeError, match=f"expected vectors of length {n}"):
        directions_from_vectors(model, [torch.zeros(3)])


def test_difference_direction_and_errors():
    a, b = tiny_convnet(seed=0), tiny_convnet(seed=1)
    d = difference_direction(a, b)
    assert "1.running_mean" in d.tensors and "1.num_batches_tracked" not in d.tensors
    torch.testing.assert_close(d.tensors["0.weight"], b[0].weight.detach() - a[0].weight.detach())
    params_only = difference_direction(a, b, include_buffers=False)
    assert "1.running_mean" not in params_only.tensors
    other = nn.Sequential(nn.Conv2d(3, 7, 3))
    with pytest.raises(SharpscopeError, match="has shape"):
        difference_direction(other, nn.Sequential(nn.Conv2d(3, 6, 3)))
    with pytest.raises(SharpscopeError, match="has no tensor"):
        difference_direction(a, tiny_mlp())


def test_check_directions_errors():
    model = tiny_mlp()
    d = random_direction(model)
    with pytest.raises(SharpscopeError, match="expected one direction"):
        check_directions(model, [d, d, d])
    with pytest.raises(SharpscopeError, match="which the model does not have"):
        check_directions(model, [Direction({"9.weight": torch.zeros(3)})])
    with pytest.raises(SharpscopeError, match="has shape"):
        check_directions(model, [Direction({"1.weight": torch.zeros(3)})])
    with pytest.raises(SharpscopeError, match="expected a Direction"):
        check_directions(model, ["x"])
    bn = nn.BatchNorm1d(3)
    with pytest.raises(SharpscopeError, match="not floating point"):
        check_directions(bn, [Direction({"num_batches_tracked": torch.zeros(())})])


def test_hessian_directions_are_eigenvectors():
    hessian = pytest.importorskip("sharpscope.hessian", reason="sharpscope.hessian is written in parallel")
    from sharpscope.landscape import hessian_directions

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
    loss_fn = nn.CrossEntropyLoss()
    (d,) = hessian_directions(model, loss_fn, [(x, y)], k=1)
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]

    def loss_of(flat):
        out, offset = {}, 0
        for n, p in zip(names, params):
            out[n] = flat[offset: offset + p.numel()].reshape(p.shape)
            offset += p.numel()
        return loss_fn(torch.func.functional_call(model, out, (x,)), y)

    w = torch.cat([p.detach().reshape(-1) for p in params])
    dense = torch.autograd.functional.hessian(loss_of, w)  # the ground truth (float64)
    v = d.flatten(names).double()
    lam = d.info["eigenvalue"]
    # Lanczos residuals are ~1e-6 relative at convergence; compare H v with lambda v accordingly
    torch.testing.assert_close(dense @ v, lam * v, rtol=1e-4, atol=1e-5)
    assert lam == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-4)
    del hessian


def test_hessian_directions_without_module_is_a_clear_error(monkeypatch):
    from sharpscope.landscape import hessian_directions

    monkeypatch.setitem(sys.modules, "sharpscope.hessian", None)  # makes the import fail, as before it existed
    with pytest.raises(SharpscopeError, match="need sharpscope.hessian"):
        hessian_directions(tiny_mlp(), nn.CrossEntropyLoss(), [])
