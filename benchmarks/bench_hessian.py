"""Benchmark sharpscope.hessian against the dense truth, PyHessian 0.1 and curvlinops 3.0.1 on small digits models.

    python benchmarks/bench_hessian.py [--threads 1] [--quick] [--cost-only] [--models mlp,convnet] [--out FILE]

Workloads (CPU, float32 models as users run them, the first 1000 digits training
images in 2 batches of 500):

* ``mlp``: the registry's ``mlp:hidden=32`` (2,410 parameters), trained 5 epochs with SGD. Truth: the dense
  float64 Hessian (``sharpscope.hessian.reference.dense_hessian``, forward-over-reverse) and ``eigvalsh``.
* ``convnet``: the registry's ``convnet`` with BatchNorm in eval mode (53,098 parameters), trained 3 epochs. Truth:
  SciPy ARPACK ``eigsh(tol=0)`` on the float64 copy of the model (the dense matrix would take 22 GB).

Tasks and metrics (one "HVP" is one product of the Hessian over all 1000 samples with one vector):

* top-1 / top-5 eigenvalues: HVPs, wall time, max relative error against the truth. sharpscope's Lanczos with
  the eigenvalue criterion at ``tol=1e-4`` (estimated relative eigenvalue error ``residual^2 / gap``: the brief's
  target is <= 1e-4), with the residual criterion at ``tol=1e-4`` and at its default ``1e-6``; SciPy ``eigsh``
  on ``HessianOperator.to_scipy()``; PyHessian's deflated power iteration at its default ``tol=1e-3`` (and
  ``tol=1e-5``), multi-batch (``dataloader=``) path, HVPs counted by wrapping its ``dataloader_hv_product``;
  SciPy ``eigsh`` (same ``v0``, ``tol=1e-4`` and ``0``) on curvlinops' ``HessianLinearOperator(...).to_scipy()``
  (curvlinops has no eigensolver of its own), HVPs counted by wrapping its ``_matmat`` (one per column).
* HVP / gradient cost: wall time of one full-data product against one full-data gradient (``H.gradient()``),
  medians of 15 rounds (5 with ``--quick``) in which every path runs once, interleaved so the load of other jobs on
  a shared machine hits all paths alike. Paths: "before" (recomputed per product, native batch-norm kernels: the
  operator before the graph cache), ``cache_graph=False`` (recomputed, affine eval-mode BatchNorm), the cached graph
  (the default; also its first product, which builds the graphs; and with eval-mode BatchNorm as ``x * scale +
  shift`` instead of folded into the convolution before it, and with torch's own ReLU backward instead of the
  constant-mask one: each form of ``_GraphForms`` against the last), per vector of a 5-column ``H @ V``,
  ``torch.func`` forward-over-reverse (``jvp(grad)`` per product, and ``linearize``, traced once per batch, with
  its build time), PyHessian's multi-batch HVP, and curvlinops' ``H @ v`` and ``H @ V`` (5 columns, per vector).
  The maximal relative difference of each path's product to the old one is printed (float32 rounding). Then the
  wall time of top-5 Lanczos (``tol=1e-6``) on a fresh operator of each kind, graph building included: medians of
  7 interleaved rounds. Wall and CPU time are both shown.
* block cost: ``H @ V`` for 16 columns per vector against one gradient: the column loop (``batched=False``), the
  default (``batched=None``) and one vmapped pass (``batched=True``), on the data as loaded, on a plain-NCHW copy
  (the ConvNet's 1-channel inputs arrive with channels-last strides), and split into 40 batches of 25 (smaller
  graphs: where the vmapped pass pays off on CPU); interleaved medians. Fallbacks of the batched path are shown.
  curvlinops' ``H @ V`` (one ``vmap`` over the 16 columns of ``jvp(jacrev(loss))`` per batch) runs in the same
  rounds, on the same data, with its maximal relative difference to our column loop.
* trace: Hutch++ with 99 products vs PyHessian's Hutchinson (default adaptive stop, tol=1e-3) vs curvlinops'
  ``hutchpp_trace`` and ``hutchinson_trace`` with 99 products (Rademacher, ``torch.manual_seed(0)``; its Hutch++
  multiplies 33 columns per call, its Hutchinson all 99 in one call). One seed each: the error column is one draw.
* spectral density: SLQ with 90 Lanczos steps x 5 runs (Ghorbani et al. 2019) -- sharpscope advances the 5 runs
  in one batched product per step; PyHessian 0.1's ``density()`` calls ``torch.eig``, removed in torch 2, so
  this script MONKEYPATCHES ``torch.eig`` with a ``torch.linalg.eigh``-based shim for it (and says so in the
  output). curvlinops' ``LanczosApproximateSpectrumCached`` (Papyan 2020, algorithm 2: Lanczos without
  reorthogonalization, one product per step, runs one after another, plus ARPACK ``eigsh(k=2, which="BE",
  tol=1e-2)`` for the spectral bounds, HVPs and time included) with the same steps x runs; its error is taken on the
  quadrature measure behind its smoothed density (its cached Ritz values and weights). Accuracy (MLP only): W1
  distance between the quadrature measure and the exact spectrum / range.

Every curvlinops operator is built on the model as given (eval mode), the same float32 data and the parameters in
our order, with its default determinism check; building it (a few products) is outside the timings and counts, as
PyHessian's construction is. Its product is ``jvp(jacrev(loss))`` under ``vmap``, the pattern that torch 2.13
gets wrong on LayerNorm models; these two models have none, and the printed differences to our product check it.

PyHessian (``pip install pyhessian==0.1``, in the ``bench`` extra) and curvlinops are optional; without one, its rows
and columns are skipped, and the header prints their versions. curvlinops is not in the extra: its dependency
backpack-for-pytorch requires torchvision, which upgrades torch (or fails to import beside the CPU build). Install it
without dependencies:

    pip install --no-deps curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 einconv==0.1.0 \
        linear_operator==0.6.1 unfoldNd==0.2.3 opt_einsum==3.4.0 einops
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from sharpscope.data import eval_batches, load_dataset
from sharpscope.hessian import HessianOperator, eval_mode, hutchpp_trace, lanczos_eigs, spectral_density
from sharpscope.hessian.reference import dense_hessian
from sharpscope.models import create_model

ROWS: list[dict[str, Any]] = []
NOTES: list[str] = []


def row(model: str, task: str, method: str, hvps: int | None, seconds: float | None, error: Any, **extra) -> None:
    ROWS.append({"model": model, "task": task, "method": method, "hvps": hvps, "seconds": seconds, "error": error,
                 **extra})
    hv = "-" if hvps is None else str(hvps)
    sec = "-" if seconds is None else f"{seconds:.2f}"
    err = error if isinstance(error, str) else f"{error:.1e}"
    print(f"| {model} | {task} | {method} | {hv} | {sec} | {err} |", flush=True)


def train(name: str, kwargs: dict[str, Any], epochs: int, seed: int = 0) -> tuple[nn.Module, Any]:
    data = load_dataset("digits")
    torch.manual_seed(seed)
    model = create_model(name, in_channels=data.in_channels, num_classes=data.num_classes,
                         image_size=data.image_size, **kwargs)
    batches = eval_batches(data, split="train", batch_size=64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for x, y in batches:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    model.eval()
    return model, eval_batches(data, split="train", num_samples=1000, batch_size=500)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def max_rel_error(values, truth) -> float:
    values, truth = np.asarray(values, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    return float(np.max(np.abs(values - truth) / np.abs(truth)))


def w1_over_range(nodes: np.ndarray, weights: np.ndarray, exact: np.ndarray) -> float:
    """Wasserstein-1 distance between a discrete measure and the empirical spectrum, divided by its range."""
    order = np.argsort(nodes)
    nodes, weights = nodes[order], weights[order] / weights.sum()
    points = np.union1d(nodes, exact)
    cdf_measure = np.searchsorted(nodes, points, side="right")
    cdf_measure = np.concatenate([[0.0], np.cumsum(weights)])[cdf_measure]
    cdf_exact = np.searchsorted(np.sort(exact), points, side="right") / exact.size
    return float(np.sum(np.abs(cdf_measure - cdf_exact)[:-1] * np.diff(points)) / (exact.max() - exact.min()))


def pyhessian_module():
    try:
        from pyhessian import hessian as pyhessian_hessian
    except ImportError:
        return None
    def eig_shim(T, eigenvectors=False):
        values, vectors = torch.linalg.eigh(T)  # T is symmetric tridiagonal: real spectrum
        return torch.stack([values, torch.zeros_like(values)], dim=1), vectors

    # torch 2 keeps a torch.eig stub that raises "deprecated since version 1.9 and is now removed".
    torch.eig = eig_shim
    NOTES.append("PyHessian 0.1 density() calls torch.eig (removed in torch 2; the stub raises); this run "
                 "MONKEYPATCHED torch.eig with a torch.linalg.eigh shim so PyHessian's density runs at all.")
    return pyhessian_hessian


def curvlinops_module():
    """The installed curvlinops package and its version, or ``(None, None)`` when it is not installed."""
    try:
        import curvlinops
    except ImportError:
        return None, None
    from importlib.metadata import version

    return curvlinops, version("curvlinops-for-pytorch")


def counted_curvlinops(curvlinops, model, loss_fn, params, batches):
    """curvlinops' ``HessianLinearOperator`` on ``model`` (its own evaluation mode, here eval) over ``batches``, with
    the parameters in ``params``' order (so its flat vectors are laid out as ours), built with its default
    determinism check (which spends products: not counted, not timed), and its HVPs counted in ``.hvps`` (one per
    column of every ``_matmat``, the routine every product goes through: ``@``, ``to_scipy()``, its estimators)."""
    op = curvlinops.HessianLinearOperator(model, loss_fn, list(params), list(batches))
    op.hvps = 0
    inner = op._matmat

    def counting(M):
        op.hvps += M[0].shape[-1]
        return inner(M)

    op._matmat = counting
    return op


def counted_pyhessian(factory, model, batches):
    """A PyHessian object on a copy of the model with its HVPs counted."""
    copy_ = copy.deepcopy(model)
    obj = factory(copy_, nn.CrossEntropyLoss(), dataloader=list(batches), cuda=False)
    obj.hvps = 0
    inner = obj.dataloader_hv_product

    def counting(v):
        obj.hvps += 1
        return inner(v)

    obj.dataloader_hv_product = counting
    return obj


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU (process) time of each function over ``repeats`` rounds, the functions interleaved
    within a round so load from other jobs on the shared machine hits every method alike (after one warm-up call
    each). With one torch thread the CPU time leaves out the time the process waited for a core."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {key: [] for key in fns}
    cpu: dict[str, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    return ({key: statistics.median(values) for key, values in wall.items()},
            {key: statistics.median(values) for key, values in cpu.items()})


def legacy_operator(model, loss_fn, batches) -> HessianOperator:
    """The product as it was before the graph cache and the graph forms: one forward and ``grad(create_graph=True)``
    per batch and product, native batch-norm and ReLU kernels (private switches, benchmark only)."""
    H = HessianOperator(model, loss_fn, batches, cache_graph=False)
    H._affine_batchnorm = False
    H._masked_relu = False
    return H


def functorch_products(model, loss_fn, batches, H: HessianOperator):
    """Forward-over-reverse HVPs with ``torch.func`` (eval mode): ``jvp(grad)`` per product, and ``linearize``
    (the primal computation of ``grad`` traced once per batch, then one linear map per product: the
    forward-mode analogue of the graph cache). Returns ``(jvp_hvp, make_linearized)``, flat ``(n,)`` in and out."""
    from torch.func import functional_call, grad, jvp, linearize

    buffers = dict(model.named_buffers())
    primals = {name: p.detach() for name, p in zip(H.names, H.params)}
    weights = [n_b / H.num_samples for n_b in H._batch_sizes]

    def batch_gradient(x, y):
        return grad(lambda params: loss_fn(functional_call(model, (params, buffers), (x,)), y))

    def as_dict(v):
        return dict(zip(H.names, H.unflatten(v)))

    def jvp_hvp(v):
        tangents, out = as_dict(v), torch.zeros_like(v)
        for (x, y), w in zip(batches, weights):
            _, hv = jvp(batch_gradient(x, y), (primals,), (tangents,))
            out.add_(H.flatten([hv[name] for name in H.names]), alpha=w)
        return out

    def make_linearized():
        maps = [linearize(batch_gradient(x, y), primals)[1] for x, y in batches]

        def hvp(v):
            tangents, out = as_dict(v), torch.zeros_like(v)
            for linear, w in zip(maps, weights):
                hv = linear(tangents)
                out.add_(H.flatten([hv[name] for name in H.names]), alpha=w)
            return out

        return hvp

    return jvp_hvp, make_linearized


def bench_cost(name: str, model, loss_fn, batches, H: HessianOperator, *, repeats: int, pyhessian,
               curvlinops=None) -> None:
    """HVP / gradient cost ratio of every product path, medians of ``repeats`` interleaved rounds."""
    n = H.num_params
    v = torch.randn(n)
    V = torch.randn(n, 5)
    legacy = legacy_operator(model, loss_fn, batches)
    recomputed = HessianOperator(model, loss_fn, batches, cache_graph=False)
    cached = HessianOperator(model, loss_fn, batches, cache_graph=True)
    unfolded = HessianOperator(model, loss_fn, batches, cache_graph=True)
    unfolded._fold_batchnorm = False  # eval-mode BatchNorm as x * scale + shift, not folded into its convolution
    native_relu = HessianOperator(model, loss_fn, batches, cache_graph=True)
    native_relu._masked_relu = False  # torch's ReLU backward (threshold_backward) in the gradient graph
    first = HessianOperator(model, loss_fn, batches, cache_graph=True)
    jvp_hvp, make_linearized = functorch_products(model, loss_fn, batches, H)
    with eval_mode(model), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")  # fx const-folding noise
        linearized, build_seconds = timed(make_linearized)
    reference = legacy @ v
    products = {"recomputed": recomputed @ v, "cached": cached @ v, "cached, BN not folded": unfolded @ v,
                "cached, native ReLU": native_relu @ v,
                "cached again": cached @ v, "jvp(grad)": jvp_hvp(v), "linearize": linearized(v)}
    if curvlinops is not None:
        C = counted_curvlinops(curvlinops, model, loss_fn, H.params, batches)
        products["curvlinops"] = C @ v
    differences = {label: float((product - reference).abs().max() / reference.abs().max())
                   for label, product in products.items()}

    def build_and_multiply():
        first.clear_cache()
        first @ v

    def in_eval(fn):
        def call():
            with eval_mode(model):
                return fn()
        return call

    fns = {
        "gradient": H.gradient,
        "before: recomputed, native BN": lambda: legacy @ v,
        "recomputed (cache_graph=False)": lambda: recomputed @ v,
        "cached graph (default)": lambda: cached @ v,
        "cached graph, BN affine but not folded into its conv": lambda: unfolded @ v,
        "cached graph, torch's ReLU backward": lambda: native_relu @ v,
        "cached: first product (builds the graphs)": build_and_multiply,
        "before: H @ V (5), per vector": lambda: legacy @ V,
        "cached: H @ V (5), per vector": lambda: cached @ V,
        "torch.func jvp(grad)": in_eval(lambda: jvp_hvp(v)),
        "torch.func linearize (after build)": in_eval(lambda: linearized(v)),
    }
    if pyhessian is not None:
        ph = counted_pyhessian(pyhessian, model, batches)
        vs = [torch.randn_like(p) for p in ph.params]
        fns["PyHessian dataloader_hv_product"] = lambda: ph.dataloader_hv_product(vs)
    if curvlinops is not None:
        fns["curvlinops H @ v"] = lambda: C @ v
        fns["curvlinops H @ V (5), per vector"] = lambda: C @ V
    medians, cpu = interleaved_medians(fns, repeats)
    medians = {key: t / 5 if "(5)" in key else t for key, t in medians.items()}
    cpu = {key: t / 5 if "(5)" in key else t for key, t in cpu.items()}
    t_grad, c_grad = medians["gradient"], cpu["gradient"]
    print(f"\n{name}: HVP / gradient cost, median of {repeats} interleaved repeats (gradient {1e3 * t_grad:.1f} ms)")
    print("| path | wall ms per vector | x gradient (wall) | x gradient (CPU time) |")
    print("|---|---:|---:|---:|")
    for key, t in medians.items():
        print(f"| {key} | {1e3 * t:.2f} | {t / t_grad:.2f} | {cpu[key] / c_grad:.2f} |")
    print(flush=True)
    ROWS.append({"model": name, "task": "cost", "repeats": repeats, "cache_bytes": cached.cache_bytes,
                 "linearize_build_seconds": build_seconds, "max_rel_diff_vs_before": differences,
                 **{f"{key} ms": 1e3 * t for key, t in medians.items()},
                 **{f"{key} x gradient": t / t_grad for key, t in medians.items()},
                 **{f"{key} x gradient (CPU time)": t / c_grad for key, t in cpu.items()}})
    NOTES.append(
        f"{name}: one HVP = {medians['before: recomputed, native BN'] / t_grad:.2f}x a gradient before, "
        f"{medians['cached graph (default)'] / t_grad:.2f}x with the cached graph (median of {repeats} interleaved "
        f"repeats; gradient {1e3 * t_grad:.1f} ms); cache {cached.cache_bytes / 2**20:.1f} MiB for "
        f"{H.num_samples} samples; torch.func linearize {medians['torch.func linearize (after build)'] / t_grad:.2f}x "
        f"after a {build_seconds:.1f} s build; max relative difference to the old product "
        + ", ".join(f"{k} {d:.1e}" for k, d in differences.items())
    )


def _nchw_copy(batches):
    """The batches with inputs copied to plain NCHW strides. The digits loader gives 1-channel images whose strides
    are also channels-last ones, which makes the convolutions pick oneDNN's NHWC kernels (and on torch 2.13 makes
    the vmapped convolution double backward raise)."""
    return [(torch.empty(x.shape, dtype=x.dtype).copy_(x), y) for x, y in batches]


def bench_block_cost(name: str, model, loss_fn, batches, *, repeats: int, block: int = 16, curvlinops=None) -> None:
    """Per-vector cost of ``H @ V`` for a block of ``block`` columns against one gradient: the column loop
    (``batched=False``), the default (``batched=None``: vmapped sub-blocks sized by the graph memory, verified),
    one vmapped pass (``batched=True``) and, when installed, curvlinops' ``HessianLinearOperator @ V`` (one
    ``vmap(jvp(jacrev))`` call over the block per batch); interleaved medians of ``repeats`` rounds per data layout
    and split. The verification product is spent in the warm-up call (once per operator and weights), so it is not
    in the medians. The last column is curvlinops' maximal relative difference to our column loop (float32)."""
    X = torch.cat([x for x, _ in batches])
    Y = torch.cat([y for _, y in batches])
    configs = {"as loaded, 2x500": list(batches)}
    if X.dim() == 4:
        configs["NCHW copy, 2x500"] = _nchw_copy(batches)
        configs["NCHW copy, 40x25"] = _nchw_copy([(X[i:i + 25], Y[i:i + 25]) for i in range(0, len(X), 25)])
    else:
        configs["40x25"] = [(X[i:i + 25], Y[i:i + 25]) for i in range(0, len(X), 25)]
    print(f"\n{name}: H @ V, block of {block}, per-vector cost in gradients (median of {repeats} interleaved repeats)")
    print("| data | gradient ms | column loop | auto (batched=None) | one vmapped pass (batched=True) | curvlinops "
          "| notes | curvlinops rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for label, data in configs.items():
        ops = {key: HessianOperator(model, loss_fn, data, cache_graph=True, batched=batched)
               for key, batched in (("loop", False), ("auto", None), ("forced", True))}
        V = torch.randn(ops["loop"].num_params, block)
        fns = {"gradient": ops["loop"].gradient}
        fns.update({key: (lambda op: lambda: op @ V)(op) for key, op in ops.items()})
        curvlinops_diff = "-"
        if curvlinops is not None:
            C = counted_curvlinops(curvlinops, model, loss_fn, ops["loop"].params, data)
            fns["curvlinops"] = functools.partial(C.__matmul__, V)
            loop_product = ops["loop"] @ V
            curvlinops_diff = f"{float((C @ V - loop_product).abs().max() / loop_product.abs().max()):.1e}"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="HessianOperator: the batched")  # reported below instead
            medians, cpu = interleaved_medians(fns, repeats)
        t_grad = medians["gradient"]
        paths = [key for key in fns if key != "gradient"]
        cost = {key: medians[key] / block / t_grad for key in paths}
        notes = "; ".join(f"{key}: fell back ({op.batched_disabled[:70]})" for key, op in ops.items()
                          if op.batched_disabled) or "no fallback"
        theirs = f"{cost['curvlinops']:.2f}" if "curvlinops" in cost else "-"
        print(f"| {label} | {1e3 * t_grad:.1f} | {cost['loop']:.2f} | {cost['auto']:.2f} | {cost['forced']:.2f} "
              f"| {theirs} | {notes} | {curvlinops_diff} |", flush=True)
        ROWS.append({"model": name, "task": f"block-{block} cost", "data": label, "repeats": repeats,
                     "gradient ms": 1e3 * t_grad, **{f"{key} x gradient per vector": c for key, c in cost.items()},
                     **{f"{key} x gradient per vector (CPU time)": cpu[key] / block / cpu["gradient"] for key in paths},
                     "fallbacks": notes, "curvlinops max rel diff vs loop": curvlinops_diff})
        NOTES.append(f"{name}, {label}: block of {block} per vector = {cost['loop']:.2f}x a gradient looped, "
                     f"{cost['auto']:.2f}x auto, {cost['forced']:.2f}x one vmapped pass, curvlinops {theirs} "
                     f"({notes})")
    print(flush=True)


def bench_lanczos_wall(name: str, model, loss_fn, batches, *, repeats: int) -> None:
    """Wall time of top-5 Lanczos (residual tol 1e-6, seed 0) on a fresh operator (graph building included)."""
    factories = {
        "before (recomputed, native BN)": lambda: legacy_operator(model, loss_fn, batches),
        "cache_graph=False": lambda: HessianOperator(model, loss_fn, batches, cache_graph=False),
        "cached graph (default)": lambda: HessianOperator(model, loss_fn, batches),
    }
    hvps, values = {}, {}

    def run(key):
        def call():
            result = lanczos_eigs(factories[key](), 5, tol=1e-6, seed=0)
            hvps[key], values[key] = result.num_matvecs, np.asarray(result.eigenvalues)
        return call

    medians, cpu = interleaved_medians({key: run(key) for key in factories}, repeats)
    base = values["before (recomputed, native BN)"]
    for key, seconds in medians.items():
        error = float(np.max(np.abs(values[key] - base) / np.abs(base)))
        row(name, "top-5 wall", f"lanczos tol=1e-6, {key} (median of {repeats}; CPU {cpu[key]:.2f} s)", hvps[key],
            seconds, f"{error:.1e} vs before")


def bench_model(name: str, model: nn.Module, batches, *, dense: bool, quick: bool, pyhessian,
                cost_only: bool = False, curvlinops=None) -> None:
    loss_fn = nn.CrossEntropyLoss()
    H = HessianOperator(model, loss_fn, batches)
    n = H.num_params
    # --- cost of one product relative to one gradient; top-5 wall time of each product path ------------------
    bench_cost(name, model, loss_fn, batches, H, repeats=5 if quick else 15, pyhessian=pyhessian,
               curvlinops=curvlinops)
    bench_block_cost(name, model, loss_fn, batches, repeats=5 if quick else 15, curvlinops=curvlinops)
    bench_lanczos_wall(name, model, loss_fn, batches, repeats=1 if quick else 7)
    if cost_only:
        return
    model64 = copy.deepcopy(model).double()
    batches64 = batches.to(dtype=torch.float64)
    H64 = HessianOperator(model64, loss_fn, batches64)
    if dense:
        matrix, seconds = timed(lambda: dense_hessian(model64, loss_fn, batches64, max_params=n, chunk_size=256))
        exact = torch.linalg.eigvalsh(matrix).numpy()
        top_truth = exact[::-1][:5]
        trace_truth = float(exact.sum())
        NOTES.append(f"{name}: n={n}; dense float64 Hessian + eigvalsh in {seconds:.1f} s; top-5 "
                     f"{np.round(top_truth, 5).tolist()}, lambda_min {exact[0]:.5f}, trace {trace_truth:.4f}")
    else:
        from scipy.sparse.linalg import eigsh

        H64.num_matvecs = 0
        values, seconds = timed(lambda: eigsh(H64.to_scipy(), k=5, which="LA", tol=0)[0])
        top_truth = np.sort(values)[::-1]
        exact, trace_truth = None, None
        NOTES.append(f"{name}: n={n}; truth = ARPACK eigsh(tol=0) in float64 ({H64.num_matvecs} HVPs, "
                     f"{seconds:.1f} s); top-5 {np.round(top_truth, 5).tolist()}")

    # --- top-1 and top-5 ------------------------------------------------------------------------------------
    for k in (1, 5):
        truth = top_truth[:k]
        for criterion, tol in (("eigenvalue", 1e-4), ("residual", 1e-4), ("residual", 1e-6)):
            result, seconds = timed(lambda: lanczos_eigs(H, k, tol=tol, criterion=criterion, seed=0))
            row(name, f"top-{k}", f"sharpscope lanczos {criterion} tol={tol:g}", result.num_matvecs, seconds,
                max_rel_error(result.eigenvalues, truth))
        from scipy.sparse.linalg import eigsh

        for tol in (1e-4, 0):
            H.num_matvecs = 0
            values, seconds = timed(lambda: eigsh(H.to_scipy(), k=k, which="LA", tol=tol,
                                                  v0=np.random.default_rng(0).standard_normal(n))[0])
            row(name, f"top-{k}", f"scipy eigsh tol={tol:g}", H.num_matvecs, seconds,
                max_rel_error(np.sort(values)[::-1], truth))
        if curvlinops is not None:
            C = counted_curvlinops(curvlinops, model, loss_fn, H.params, batches)
            for tol in (1e-4, 0):
                C.hvps = 0
                values, seconds = timed(lambda C=C, k=k, tol=tol: eigsh(
                    C.to_scipy(), k=k, which="LA", tol=tol, v0=np.random.default_rng(0).standard_normal(n))[0])
                row(name, f"top-{k}", f"curvlinops to_scipy() + eigsh tol={tol:g}", C.hvps, seconds,
                    max_rel_error(np.sort(values)[::-1], truth))
        if pyhessian is not None:
            for tol in (1e-3, 1e-5):
                torch.manual_seed(0)
                ph = counted_pyhessian(pyhessian, model, batches)
                (values, _), seconds = timed(lambda: ph.eigenvalues(maxIter=100, tol=tol, top_n=k))
                method = f"pyhessian power tol={tol:g}" + (" (default)" if tol == 1e-3 else "")
                row(name, f"top-{k}", method, ph.hvps, seconds, max_rel_error(sorted(values, reverse=True), truth))
    # warm start: the same top-5 from a slightly different model's eigenvectors (a neighbouring checkpoint)
    neighbour = copy.deepcopy(model)
    with torch.no_grad():
        for p in neighbour.parameters():
            p.add_(1e-3 * p.abs().mean() * torch.randn_like(p))
    previous = lanczos_eigs(HessianOperator(neighbour, loss_fn, batches), 5, tol=1e-6)
    result, seconds = timed(lambda: lanczos_eigs(H, 5, tol=1e-6, v0=previous.eigenvectors))
    row(name, "top-5", "sharpscope lanczos tol=1e-06, warm start", result.num_matvecs, seconds,
        max_rel_error(result.eigenvalues, top_truth[:5]))

    # --- trace ----------------------------------------------------------------------------------------------
    trace, seconds = timed(lambda: hutchpp_trace(H, num_matvecs=99, seed=0))
    trace_error = abs(trace.value - trace_truth) / abs(trace_truth) if trace_truth else "n/a"
    row(name, "trace", f"sharpscope hutch++ 99 = {trace.value:.4g} +- {trace.stderr:.2g}", trace.num_matvecs,
        seconds, trace_error)
    if pyhessian is not None:
        torch.manual_seed(0)
        ph = counted_pyhessian(pyhessian, model, batches)
        samples, seconds = timed(lambda: ph.trace(maxIter=100, tol=1e-3))
        value = float(np.mean(samples))
        error = abs(value - trace_truth) / abs(trace_truth) if trace_truth else "n/a"
        row(name, "trace", f"pyhessian hutchinson default = {value:.4g}", ph.hvps, seconds, error)
    if curvlinops is not None:
        for estimator in (curvlinops.hutchpp_trace, curvlinops.hutchinson_trace):
            torch.manual_seed(0)
            C = counted_curvlinops(curvlinops, model, loss_fn, H.params, batches)
            C.hvps = 0
            value, seconds = timed(lambda C=C, estimator=estimator: float(estimator(C, 99)))
            error = abs(value - trace_truth) / abs(trace_truth) if trace_truth else "n/a"
            row(name, "trace", f"curvlinops {estimator.__name__} 99 = {value:.4g}", C.hvps, seconds, error)

    # --- spectral density -------------------------------------------------------------------------------------
    iters, runs = (30, 2) if quick else (90, 5)
    density, seconds = timed(lambda: spectral_density(H, num_iters=iters, num_runs=runs, seed=0))
    error = (w1_over_range(density.nodes.numpy().ravel(), density.weights.numpy().ravel(), exact)
             if exact is not None else f"range [{density.lambda_min:.4g}, {density.lambda_max:.4g}]")
    row(name, "density", f"sharpscope SLQ {iters}x{runs} (batched runs)", density.num_matvecs, seconds, error)
    if pyhessian is not None:
        torch.manual_seed(0)
        ph = counted_pyhessian(pyhessian, model, batches)
        try:
            (nodes, weights), seconds = timed(lambda: ph.density(iter=iters, n_v=runs))
            nodes, weights = np.asarray(nodes).ravel(), np.asarray(weights).ravel()
            error = (w1_over_range(nodes, weights, exact) if exact is not None
                     else f"range [{nodes.min():.4g}, {nodes.max():.4g}]")
            row(name, "density", f"pyhessian SLQ {iters}x{runs} (torch.eig SHIMMED)", ph.hvps, seconds, error)
        except Exception as exc:  # noqa: BLE001 - report, do not crash the benchmark
            row(name, "density", "pyhessian SLQ", None, None, f"fails: {type(exc).__name__}: {exc}"[:80])
    if curvlinops is not None:
        torch.manual_seed(0)
        C = counted_curvlinops(curvlinops, model, loss_fn, H.params, batches)
        C.hvps = 0

        def papyan():
            spectrum = curvlinops.LanczosApproximateSpectrumCached(C, ncv=iters)  # eigsh for the boundaries
            spectrum.approximate_spectrum(num_repeats=runs)  # the Gaussian-smoothed density on a grid
            return spectrum

        spectrum, seconds = timed(papyan)
        # the quadrature measures behind that density (a private cache): nodes = Ritz values, weights = e1-components^2
        iterations = spectrum._get_lanczos_iters(runs)
        nodes = torch.cat([evals for evals, _ in iterations]).double().numpy()
        weights = torch.cat([evecs[0] ** 2 for _, evecs in iterations]).double().numpy()
        error = (w1_over_range(nodes, weights, exact) if exact is not None
                 else f"range [{nodes.min():.4g}, {nodes.max():.4g}]")
        row(name, "density", f"curvlinops papyan2020 {iters}x{runs} (no reorth., + eigsh bounds)", C.hvps, seconds,
            error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CI machine has 2 shared cores)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller density (smoke run)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument("--cost-only", action="store_true",
                        help="only the HVP / gradient cost tables and the top-5 Lanczos wall time (no truth, "
                             "PyHessian / curvlinops eigen/trace/density rows)")
    parser.add_argument("--models", default="mlp,convnet", help="comma-separated subset of mlp,convnet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # PyHessian calls backward(create_graph=True), which warns about a reference cycle on every product.
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    pyhessian = pyhessian_module()
    if pyhessian is None:
        NOTES.append("PyHessian not installed (pip install pyhessian==0.1): its rows are skipped.")
    curvlinops, curvlinops_version = curvlinops_module()
    if curvlinops is None:
        NOTES.append("curvlinops not installed (pip install curvlinops-for-pytorch==3.0.1): its rows are skipped.")
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {args.threads} thread(s), PyHessian {'yes' if pyhessian else 'no'}, "
          f"curvlinops {curvlinops_version or 'no'}")
    print("| model | task | method | HVPs | wall s | max rel. error |")
    print("|---|---|---|---:|---:|---:|")
    models = set(args.models.split(","))
    if "mlp" in models:
        mlp, batches = train("mlp", {"hidden": 32}, epochs=5)
        bench_model("mlp", mlp, batches, dense=True, quick=args.quick, pyhessian=pyhessian, cost_only=args.cost_only,
                    curvlinops=curvlinops)
    if "convnet" in models:
        convnet, batches = train("convnet", {}, epochs=3)
        bench_model("convnet", convnet, batches, dense=False, quick=args.quick, pyhessian=pyhessian,
                    cost_only=args.cost_only, curvlinops=curvlinops)
    print()
    NOTES.insert(0, "error column: top-k = max relative eigenvalue error; trace = relative error vs the exact trace; "
                    "density = W1(quadrature measure, exact spectrum) / spectral range (MLP) or the Ritz range.")
    for note in NOTES:
        print(f"* {note}")
    print(f"* total wall time {time.perf_counter() - start:.0f} s")
    if args.out:
        from sharpscope.io import write_json

        write_json(args.out, {"rows": ROWS, "notes": NOTES, "torch": torch.__version__, "threads": args.threads,
                              "curvlinops": curvlinops_version})


if __name__ == "__main__":
    main()
