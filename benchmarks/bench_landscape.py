"""Loss-surface throughput: sharpscope's fast path vs a serial Li-et-al.-style loop vs loss-landscapes 3.0.6.

    python benchmarks/bench_landscape.py                # ~2-4 min on 2 shared CPU cores, 1 torch thread
    python benchmarks/bench_landscape.py --quick        # smoke run (seconds)
    python benchmarks/bench_landscape.py --json out.json
    python benchmarks/bench_landscape.py --fixtures cnn --no-ll --repeats 5   # the CNN rows alone

Every method evaluates the same model on the same 1,024 samples at the same grid points along the same two
filter-normalised directions; values are compared point by point against the serial reference. Fixtures:

* ``cnn``: the anchor CNN of reference/landscape.md section 7 (Conv16-BN-ReLU, Conv32/s2-BN-ReLU,
  Conv64/s2-BN-ReLU, GAP, Linear10; 24,458 parameters), 1,024 seeded 3x16x16 images with labels from a fixed
  random linear teacher, 60 seeded SGD steps, eval mode. The forward pass dominates.
* ``mlp``: sharpscope's ``mlp`` (64-128-10) on 1,000 digits training samples: a cheap forward, so per-point
  overhead dominates.

Methods (grid points per second, best and median of ``--repeats`` interleaved runs, one torch thread):

* ``forward-only``: the bound: one inference pass over the evaluation set per point, nothing else (weights not
  even changed). Every method evaluates each point with one such pass, so none can beat it.
* ``reference (TG)``: the paper code's recipe (tomgoldstein/loss-landscape ``plot_surface.py``): per point
  ``deepcopy`` of the state dict, ``w0 + a d1 + b d2`` added, ``load_state_dict``, ``model.eval()``, then
  ``evaluation.eval_loss``: a ``DataLoader`` over the cached tensors (batch 128, no workers, no transforms — so
  it is *faster* than the real one, which re-reads and transforms CIFAR images), ``torch.no_grad``, two
  ``.item()`` per batch.
* ``reference (pre-batched)``: the same loop over the same pre-built batch tensors sharpscope uses: isolates what
  the weight-update path and the data path each cost.
* ``sharpscope``: :func:`sharpscope.landscape.loss_surface` (bs 128, and the whole set as one batch of 1,024;
  ``channels_last`` on/off for the CNN; the default layout, ``channels_last=None``, as the CLI runs it; and
  ``compile=True``, ``sharpscope landscape --compile``, whose first call compiles and is timed apart).
* ``loss-landscapes 3.0.6``: ``planar_interpolation`` with end points ``w0 - d1 - d2 + 2 d1`` and
  ``w0 - d1 - d2 + 2 d2`` so it walks the same plane; its ``Loss`` metric (one forward over all inputs,
  ``.item()``). It steps in place on a staggered grid (reference/landscape.md section 2); its values are compared
  at the points it actually visits. Skipped with a note if the package is missing (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sharpscope.landscape import grid, loss_surface, random_directions


# ----------------------------------------------------------------------------------------------------------------
# fixtures


@dataclass
class Fixture:
    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor


def cnn_fixture(n: int = 1024) -> Fixture:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, 16, 16, generator=g)
    teacher = torch.randn(3 * 16 * 16, 10, generator=g)
    y = (x.reshape(n, -1) @ teacher).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(60):
        idx = torch.randint(0, n, (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Fixture("cnn", model.eval(), x, y)


def mlp_fixture() -> Fixture:
    from sharpscope.data import eval_batches, load_dataset
    from sharpscope.models import create_model

    data = load_dataset("digits")
    batches = eval_batches(data, split="train", num_samples=1000, batch_size=1000)
    x, y = next(iter(batches))
    torch.manual_seed(0)
    model = create_model("mlp", in_channels=data.in_channels, num_classes=data.num_classes,
                         image_size=data.image_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(100):
        idx = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Fixture("mlp", model.eval(), x, y)


# ----------------------------------------------------------------------------------------------------------------
# methods: each returns the (ny, nx) loss grid for points (xs[i], ys[j])


def reference_tg(model, directions, xs, ys, x, y, *, prebatched: bool, batch_size: int = 128) -> np.ndarray:
    """Li et al.'s serial loop (plot_surface.py crunch + net_plotter.set_states + evaluation.eval_loss)."""
    d1, d2 = directions
    w0 = copy.deepcopy(model.state_dict())
    net = copy.deepcopy(model)
    criterion = nn.CrossEntropyLoss()
    if prebatched:
        loader = list(zip(x.split(batch_size), y.split(batch_size)))
    else:
        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, num_workers=0)
    out = np.zeros((len(ys), len(xs)))
    for j, b in enumerate(ys):
        for i, a in enumerate(xs):
            state = copy.deepcopy(w0)
            for name in d1.tensors:
                state[name] = state[name] + a * d1.tensors[name] + b * d2.tensors[name]
            net.load_state_dict(state)
            net.eval()
            total, correct, count = 0.0, 0, 0
            with torch.no_grad():
                for inputs, targets in loader:
                    outputs = net(inputs)
                    loss = criterion(outputs, targets)
                    total += loss.item() * inputs.size(0)
                    correct += outputs.max(1)[1].eq(targets).sum().item()
                    count += inputs.size(0)
            out[j, i] = total / count
    return out


def forward_only(model, xs, ys, x, y, batch_size: int = 128, channels_last: bool = False) -> np.ndarray:
    criterion = nn.CrossEntropyLoss()
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        batches = [(a.contiguous(memory_format=torch.channels_last), b) for a, b in batches]
    out = np.zeros((len(ys), len(xs)))
    with torch.inference_mode():
        for j in range(len(ys)):
            for i in range(len(xs)):
                total = 0.0
                for inputs, targets in batches:
                    total = total + criterion(model(inputs), targets) * len(targets)
                out[j, i] = float(total) / len(y)
    return out


def sharpscope_surface(model, directions, xs, ys, x, y, *, batch_size: int, channels_last: bool | None,
                       compile: bool = False) -> np.ndarray:
    batches = list(zip(x.split(batch_size), y.split(batch_size)))
    s = loss_surface(model, nn.CrossEntropyLoss(), batches, directions=directions, coords=(xs, ys),
                     channels_last=channels_last, compile=compile, check_deterministic=False)
    return s.loss


def loss_landscapes_plane(model, directions, steps, x, y):
    """loss-landscapes 3.0.6 planar_interpolation over the box [-1, 1]^2 of (d1, d2); returns the values and the
    (x, y) coordinates of the points it evaluates (staggered columns, see the module docstring)."""
    import loss_landscapes
    import loss_landscapes.metrics

    d1, d2 = directions
    start, end1, end2 = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        for name, p in start.named_parameters():
            p.sub_(d1.tensors[name] + d2.tensors[name])
        for (name, p), q in zip(end1.named_parameters(), start.parameters()):
            p.copy_(q + 2 * d1.tensors[name])
        for (name, p), q in zip(end2.named_parameters(), start.parameters()):
            p.copy_(q + 2 * d2.tensors[name])
    metric = loss_landscapes.metrics.Loss(nn.CrossEntropyLoss(), x, y)
    values = loss_landscapes.planar_interpolation(start, end1, end2, metric, steps=steps, deepcopy_model=True)
    # values[i][j]: column i (x = -1 + 2 i / steps); even columns y = -1 + 2 (j + 1) / steps, odd y = -1 + 2 j / steps
    coords = np.zeros((steps, steps, 2))
    for i in range(steps):
        for j in range(steps):
            coords[i, j] = (-1 + 2 * i / steps, -1 + 2 * ((j + 1) if i % 2 == 0 else j) / steps)
    return np.asarray(values, dtype=np.float64), coords


# ----------------------------------------------------------------------------------------------------------------


COMPILE_ROW = "sharpscope bs 128 --compile (torch.compile)"


def run_fixture(fx: Fixture, *, n: int, repeats: int, with_ll: bool, with_compile: bool = True) -> dict:
    model, x, y = fx.model, fx.x, fx.y
    directions = random_directions(model, dim=2, seed=0)
    xs = ys = grid(-1, 1, n)
    points = n * n
    methods = {
        "forward-only (bound)": lambda: forward_only(model, xs, ys, x, y),
        "reference (TG: deepcopy + load_state_dict + DataLoader)":
            lambda: reference_tg(model, directions, xs, ys, x, y, prebatched=False),
        "reference (pre-batched tensors)":
            lambda: reference_tg(model, directions, xs, ys, x, y, prebatched=True),
        "sharpscope bs 128 (contiguous)": lambda: sharpscope_surface(model, directions, xs, ys, x, y, batch_size=128,
                                                        channels_last=False),
        "sharpscope bs 1024 (one batch)": lambda: sharpscope_surface(model, directions, xs, ys, x, y,
                                                                     batch_size=len(y), channels_last=False),
        "sharpscope bs 128 default (loss_surface as the CLI calls it)": lambda: sharpscope_surface(
            model, directions, xs, ys, x, y, batch_size=128, channels_last=None),
    }
    if with_compile:
        methods[COMPILE_ROW] = lambda: sharpscope_surface(model, directions, xs, ys, x, y, batch_size=128,
                                                          channels_last=None, compile=True)
    if x.dim() == 4:
        methods["forward-only channels_last (bound)"] = lambda: forward_only(model, xs, ys, x, y,
                                                                            channels_last=True)
        methods["sharpscope bs 128 channels_last (default on CUDA only)"] = lambda: sharpscope_surface(
            model, directions, xs, ys, x, y, batch_size=128, channels_last=True)
    ll_error = None
    if with_ll:
        try:
            import loss_landscapes  # noqa: F401
            methods["loss-landscapes 3.0.6 planar_interpolation"] = "ll"
        except ImportError as exc:
            ll_error = f"not installed ({exc}); pip install loss-landscapes==3.0.6 (the bench extra)"
    times: dict[str, list[float]] = {k: [] for k in methods}
    values: dict[str, np.ndarray] = {}
    ll_coords = None
    compile_first_s = None
    if COMPILE_ROW in methods:  # the first call compiles (once per process): timed apart, not in the repeats
        t0 = time.perf_counter()
        methods[COMPILE_ROW]()
        compile_first_s = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            if fn == "ll":
                vals, ll_coords = loss_landscapes_plane(model, directions, n, x, y)
            else:
                vals = fn()
            times[name].append(time.perf_counter() - t0)
            values[name] = vals
    ref = values["reference (TG: deepcopy + load_state_dict + DataLoader)"]
    ref_best = min(times["reference (TG: deepcopy + load_state_dict + DataLoader)"])
    rows = []
    ref_median = float(np.median(times["reference (TG: deepcopy + load_state_dict + DataLoader)"]))
    for name in methods:
        best, median = min(times[name]), float(np.median(times[name]))
        row = {"method": name, "points": points, "best_s": best, "median_s": median, "points_per_s": points / best,
               "points_per_s_median": points / median, "ms_per_point": 1e3 * best / points,
               "speedup_vs_reference": ref_best / best, "speedup_vs_reference_median": ref_median / median}
        if name == COMPILE_ROW:
            row["first_call_s"] = compile_first_s
        if name.startswith("forward-only"):
            row["max_abs_diff_vs_reference"] = None
        elif name.startswith("loss-landscapes"):
            # its own grid: compare with sharpscope evaluated at exactly the points it visited
            flat = ll_coords.reshape(-1, 2)
            ours = np.array([
                loss_surface(model, nn.CrossEntropyLoss(), [(x, y)], directions=directions,
                             coords=([float(a)], [float(b)]), check_deterministic=False).loss[0, 0]
                for a, b in flat[:: max(1, len(flat) // 25)]
            ])
            theirs = values[name].reshape(-1)[:: max(1, len(flat) // 25)]
            row["max_abs_diff_vs_sharpscope_at_its_points"] = float(np.max(np.abs(ours - theirs)))
            row["grid_contains_centre"] = bool(np.any(np.all(np.isclose(flat, 0.0, atol=1e-12), axis=1)))
        else:
            row["max_abs_diff_vs_reference"] = float(np.max(np.abs(values[name] - ref)))
        rows.append(row)
    return {"fixture": fx.name, "params": sum(p.numel() for p in model.parameters()), "samples": len(y),
            "grid": f"{n}x{n}", "rows": rows, "loss_landscapes_note": ll_error,
            "centre_loss": float(values["sharpscope bs 128 (contiguous)"][n // 2, n // 2]) if n % 2 else None}


def print_table(result: dict) -> None:
    print(f"\n## {result['fixture']}: {result['params']:,} parameters, {result['samples']} samples, "
          f"grid {result['grid']}")
    print("| method | ms/point | points/s best (median) | vs reference (TG) best (median) | "
          "max abs diff vs reference |")
    print("|---|---|---|---|---|")
    for r in result["rows"]:
        diff = r.get("max_abs_diff_vs_reference")
        if "max_abs_diff_vs_sharpscope_at_its_points" in r:
            diff_text = f"{r['max_abs_diff_vs_sharpscope_at_its_points']:.1e} (at its own points)"
        else:
            diff_text = "-" if diff is None else f"{diff:.1e}"
        print(f"| {r['method']} | {r['ms_per_point']:.2f} | {r['points_per_s']:.1f} ({r['points_per_s_median']:.1f}) | "
              f"{r['speedup_vs_reference']:.2f}x ({r['speedup_vs_reference_median']:.2f}x) | {diff_text} |")
    for r in result["rows"]:
        if r.get("first_call_s") is not None:
            print(f"{r['method']}: the first call, which compiles, took {r['first_call_s']:.1f} s "
                  f"({result['grid']} grid; not in the repeats)")
    if result["loss_landscapes_note"]:
        print(f"loss-landscapes: {result['loss_landscapes_note']}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grids, one repeat (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--no-ll", action="store_true", help="skip loss-landscapes")
    parser.add_argument("--fixtures", default="cnn,mlp")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--cnn-grid", type=int, default=None, help="points per axis of the cnn grid [9]")
    parser.add_argument("--mlp-grid", type=int, default=None, help="points per axis of the mlp grid [21]")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeats = 1 if args.quick else args.repeats
    sizes = {"cnn": args.cnn_grid or (3 if args.quick else 9), "mlp": args.mlp_grid or (5 if args.quick else 21)}
    results = {"env": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                       "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "loadavg_start": list(os.getloadavg())},
               "fixtures": []}
    for name in args.fixtures.split(","):
        fx = cnn_fixture() if name == "cnn" else mlp_fixture()
        result = run_fixture(fx, n=sizes[name], repeats=repeats, with_ll=not args.no_ll,
                             with_compile=not args.no_compile)
        results["fixtures"].append(result)
        print_table(result)
        sys.stdout.flush()
    results["env"]["loadavg_end"] = list(os.getloadavg())
    print(f"\nload average {results['env']['loadavg_start']} -> {results['env']['loadavg_end']} "
          f"(2 shared cores); best (median) of {repeats} interleaved runs")
    if args.json:
        from sharpscope.io import write_json

        write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
