"""GPU acceptance: one command that proves the trainer and the analyses on an accelerator, in under 8 minutes.

    python benchmarks/gpu_acceptance.py --out results/gpu                   # on a GPU machine (one H100: ~6-7 min)
    python benchmarks/gpu_acceptance.py --device cpu --tiny --out /tmp/acc  # CPU dry run of the same code paths
    python benchmarks/gpu_acceptance.py --out results/gpu --sections correctness,analysis   # a subset

Writes ``gpu_acceptance.json`` (every number, the plan, the environment, errors) and ``gpu_acceptance.md`` (the
same as Markdown tables) into ``--out``, both rewritten atomically after every section (and every training
configuration), so a killed run keeps what it finished. No data from outside: CIFAR-shaped (3x32x32, 10 classes)
seeded images from :func:`sharpscope.data.synthetic.make_synthetic`; throughput does not depend on pixel values.

Sections (run in this order; each in its own try/except, so one failure is recorded and the others still run):

* **correctness** — the same computation on the device (float32, TF32 off) and on the CPU in float64, from the
  same weights and data: one SAM step and one m-SAM step (``training_step``; the parameter update
  ``w_after - w_before`` is compared), the Hessian top-5 (``lanczos_eigs`` on ``HessianOperator``) and its trace
  (``hutchpp_trace``, same seeded probes), one row of a 2-D loss surface (``loss_surface``), one m-sharpness
  cell (``worst_case_sharpness``, 3 ascent steps: fewer than Auto-PGD's first step-size checkpoint, so the
  result is a continuous function of the inputs and float32 rounding cannot flip a branch). Each check: the
  max error (relative to the largest reference value), its tolerance, pass/fail. Tolerances come from float32
  rounding: unit roundoff 6e-8, grown by sums of 1e3-1e5 terms and ~20 layers to 1e-7..1e-5 relative (measured
  on the CPU, float32 vs float64), with 10-100x on top for the GPU's summation orders (cuDNN / cuBLAS
  algorithms, atomics). Gradients are also discontinuous where a ReLU pre-activation is within rounding of 0:
  such a flip moved a SAM update by 1.4e-3, so the SAM checks allow 1e-2 and report, for scale, how far a plain
  SGD update is (~0.3). TF32 is switched off for these checks.
* **analysis** — Hessian-vector products per second, single and in a block of 16 (``H @ V``), and *gradients
  per HVP* = time of one HVP / time of one gradient (``HessianOperator.gradient``) over the same batches (goal
  <= 1.35 for the block, DESIGN.md section 5: curvlinops' vmapped block measured 1.33); loss-surface grid
  points per second, ``loss_surface`` vs the serial loop of Li et al.'s code (deepcopy of the state dict,
  ``load_state_dict``, ``.item()`` per batch; goal >= 10x); m-sharpness throughput (perturbed samples x ascent
  steps per second) at m = 1 vs m = 1,024 (``worst_case_sharpness``).
* **scale** — the largest model and evaluation batch whose Hessian top-5 fits in memory: models and batch
  sizes tried in descending order, catching ``torch.OutOfMemoryError``; time, HVPs and peak memory of the
  first one that fits (goal: the first model listed, WRN-28-10 with 36.5M parameters, fits at some batch).
* **training** — samples/s of SGD, SAM and m-SAM (m = 32) through the trainer's own hot path
  (``DeviceLoader`` + ``training_step``, with ``sharpscope train``'s precision policy: bf16 autocast, or fp16
  autocast with the trainer's GradScaler; channels-last on CUDA; ``torch.compile`` of the model as with
  ``--compile``) on resnet20 and wrn16-8 at batch 128 and 256. The three optimizers of a configuration are timed
  in interleaved rounds (median); reported: SAM/SGD step-time ratio (goal <= 2.05), GPU utilisation
  (``torch.cuda.utilization``, NVML; n/a without pynvml), host synchronisations per ``training_step`` counted with
  ``torch.cuda.set_sync_debug_mode("warn")`` (goal 0: nothing on the hot path waits for the GPU), the loader's
  host synchronisations per epoch, and peak memory. Eager configurations run first, then compiled ones in priority
  order (bf16 batch 128 first), each only if the time left covers its estimated cost.

Time guard: the run aims at ``--budget-s`` (450 s = 7.5 min). Each section gets a share of what is left, keeping
a reserve for the later ones; a section (or a training configuration) that would not fit is skipped and the
skip is recorded with its reason. Every goal row of the table says met / missed (or n/a when not measured).

``--tiny`` shrinks every model, batch, grid and iteration count (width-4 ResNet-20 and ConvNet on 8x8 images,
batches 16/32, m = 8) so the same code paths run on a CPU in well under a minute (the test suite runs it);
``--tiny`` turns ``torch.compile`` off unless ``--compile on``. On the CPU, sync counts, GPU utilisation and
peak memory are n/a and the numbers say nothing about a GPU: the dry run checks the plumbing and the float64
agreement only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import platform
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCHEMA = "sharpscope-gpu-acceptance/1"
SECTIONS = ("correctness", "analysis", "scale", "training")  # execution order
JSON_NAME, MARKDOWN_NAME = "gpu_acceptance.json", "gpu_acceptance.md"

# Goals (DESIGN.md sections 4-7 and the acceptance issue).
SAM_OVER_SGD_GOAL = 2.05  # SAM step time / SGD step time: two passes plus the perturbation, no more
GRADIENTS_PER_HVP_GOAL = 1.35  # per vector in a block of 16 (curvlinops' vmapped block: 1.33)
LANDSCAPE_SPEEDUP_GOAL = 10.0  # loss_surface grid points/s over the serial Li et al. loop
SYNCS_PER_STEP_GOAL = 0  # host synchronisations inside training_step

# Correctness tolerances (max error relative to the largest reference value; see the module docstring).
# Measured float32-vs-float64 on the CPU: --tiny: SAM/m-SAM updates 2.5e-6/3.1e-6, top-5 5e-8, trace 4e-8, surface
# row 5e-8, m-sharpness cell 8e-7; full sizes: surface row 2.2e-7 (resnet20:width=4, 128 samples), SAM / m-SAM
# updates 1.4e-3 / 3.0e-4 (resnet20:width=8, 128 samples: ReLU branch flips, see "sam_step").
TOLERANCES = {
    # update dw = -lr (g_sam + wd w). Beyond rounding, a ReLU whose pre-activation lies within float32 rounding of
    # 0 takes the other branch: the gradient is discontinuous there. Measured on the CPU (resnet20:width=8, 128
    # 3x32x32 samples): two such flips among ~12M pre-activations moved the SAM update by 1.4e-3 of its largest
    # entry. 1e-2 allows a few flips; an update that ignored eps (plain SGD) differs by far more (in the detail).
    "sam_step": 1e-2,
    "m_sam_step": 1e-2,
    "hessian_top5": 1e-3,  # |lambda_i - lambda_i^64| / lambda_1: Lanczos residual tol 1e-4 bounds it by 1e-4
    "hessian_trace": 1e-3,  # |t - t^64| / |t^64|, the same seeded probes on both sides
    "landscape_row": 1e-4,  # |L - L^64| / max |L^64|: forward passes only
    "m_sharpness_cell": 1e-2,  # per-chunk L(w + delta) - L(w): a difference of ~1 losses, cancellation
}
EIGEN_TOL_DEVICE, EIGEN_TOL_REFERENCE = 1e-4, 1e-9  # Lanczos residual tolerances (fp32 products reach ~1e-6)


# ----------------------------------------------------------------------------------------------------------------
# the plan: every size, in one place


@dataclass(frozen=True)
class Plan:
    """Sizes of every measurement (``FULL_PLAN`` for one H100, ``TINY_PLAN`` for a CPU dry run)."""

    image_size: int  # CIFAR-shaped images: 3 x image_size x image_size, 10 classes
    # correctness
    check_model: tuple[str, dict]  # (registry name, options)
    check_samples: int  # samples of the SAM steps, surface row and m-sharpness cell
    hessian_samples: int  # samples of the Hessian checks (the float64 CPU side is the slow part)
    check_m: int  # micro-batch of the m-SAM step and m of the m-sharpness cell
    trace_matvecs: int  # Hutch++ products
    row_points: int  # points of the landscape row
    # analysis
    analysis_model: tuple[str, dict]
    analysis_samples: int  # evaluation set of the HVP, landscape and m-sharpness timings
    analysis_batch: int  # evaluation batch size
    block: int  # vectors per H @ V block
    surface_shape: tuple[int, int]  # (rows, columns) of the timed loss_surface grid
    serial_points: int  # points of the serial loop
    msharp_large_m: int  # the large m (1,024 on the GPU)
    msharp_small_chunks: int  # chunks of m = 1 timed (bounds the cost; the rate is per sample)
    msharp_steps: int  # ascent steps of the timed m-sharpness
    analysis_rounds: int  # interleaved rounds (medians)
    # scale
    scale_models: tuple[tuple[str, dict], ...]  # descending size
    scale_batches: tuple[int, ...]  # descending
    scale_max_matvecs: int
    # training
    train_models: tuple[tuple[str, dict], ...]
    train_batches: tuple[int, ...]
    train_m: int  # m-SAM micro-batch
    train_samples: int  # training images held on the device
    precisions: tuple[str, ...]
    compile_modes: tuple[bool, ...]
    warmup_steps: int
    rounds: int
    steps_per_round: int
    sync_steps: int  # steps counted under the sync debug mode
    compile_estimate_s: float  # assumed cost of a compiled configuration before one has been measured


FULL_PLAN = Plan(
    image_size=32,
    check_model=("resnet20", {"width": 4}), check_samples=128, hessian_samples=32, check_m=32, trace_matvecs=24,
    row_points=11,
    analysis_model=("resnet20", {}), analysis_samples=1024, analysis_batch=256, block=16, surface_shape=(4, 8),
    serial_points=8, msharp_large_m=1024, msharp_small_chunks=128, msharp_steps=2, analysis_rounds=3,
    scale_models=(("wrn28-10", {}), ("wrn16-8", {}), ("resnet56", {})), scale_batches=(1024, 512, 256, 128, 64),
    scale_max_matvecs=80,
    train_models=(("resnet20", {}), ("wrn16-8", {})), train_batches=(128, 256), train_m=32, train_samples=8192,
    precisions=("bf16", "fp16"), compile_modes=(False, True), warmup_steps=3, rounds=3, steps_per_round=10,
    sync_steps=3, compile_estimate_s=90.0,
)
TINY_PLAN = Plan(  # small ConvNets (conv, BatchNorm, linear): a ResNet-20's many small ops are slow on 2 CPU cores
    image_size=8,
    check_model=("convnet", {"width": 4, "hidden": 16}), check_samples=32, hessian_samples=32, check_m=8,
    trace_matvecs=12, row_points=5,
    analysis_model=("convnet", {"width": 4, "hidden": 16}), analysis_samples=64, analysis_batch=32, block=4,
    surface_shape=(2, 3), serial_points=3, msharp_large_m=64, msharp_small_chunks=8, msharp_steps=1,
    analysis_rounds=2,
    scale_models=(("convnet", {"width": 8, "hidden": 32}), ("convnet", {"width": 4, "hidden": 16})),
    scale_batches=(64, 32), scale_max_matvecs=40,
    train_models=(("convnet", {"width": 4, "hidden": 16}), ("mlp", {"hidden": 16})), train_batches=(16, 32),
    train_m=8, train_samples=128, precisions=("bf16", "fp16"), compile_modes=(False,), warmup_steps=1, rounds=2,
    steps_per_round=2, sync_steps=1, compile_estimate_s=120.0,
)

# Shares of the budget per section (seconds, full plan) and the least time a section is started with.
SHARES = {"correctness": 75.0, "analysis": 45.0, "scale": 100.0, "training": 260.0}
MIN_START = {"correctness": 10.0, "analysis": 8.0, "scale": 15.0, "training": 20.0}


# ----------------------------------------------------------------------------------------------------------------
# small helpers


class OutOfTime(Exception):
    """The time guard stopped a measurement."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    started = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - started, out


def _interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` interleaved rounds (drift hits them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_timed(fn, device)[0])
    return {name: statistics.median(values) for name, values in times.items()}


def _free_memory(device: torch.device) -> None:
    """Return freed GPU memory to the device (a no-op on the CPU, where ``gc.collect`` alone costs ~0.4 s)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _error_text(exc: BaseException) -> str:
    lines = traceback.format_exception_only(type(exc), exc)
    return "".join(lines).strip()[:2000]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc).lower() or "can't allocate" in str(exc)))


def _precision_settings() -> list[Any]:
    """The float32 precision knobs of cuBLAS matmuls and cuDNN convolutions: torch's ``fp32_precision``
    attributes where they exist (torch >= 2.9, whose default for cuDNN convolutions is "tf32"), else the legacy
    ``allow_tf32`` flags. Only one of the two APIs is touched: torch refuses to read flags set through a mix."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv"):
        return [torch.backends.cuda.matmul, torch.backends.cudnn.conv]
    return [torch.backends.cuda.matmul, torch.backends.cudnn]


def precision_state() -> dict[str, Any]:
    """The current float32 precision settings (for the environment record)."""
    knobs = _precision_settings()
    if hasattr(knobs[0], "fp32_precision"):
        return {"cuda_matmul_fp32_precision": knobs[0].fp32_precision,
                "cudnn_conv_fp32_precision": knobs[1].fp32_precision}
    return {"cuda_matmul_allow_tf32": knobs[0].allow_tf32, "cudnn_allow_tf32": knobs[1].allow_tf32}


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """TF32 off for cuBLAS matmuls and cuDNN convolutions during the block (the analyses are float32: TF32's
    10-bit mantissa gives ~1e-3 relative errors), then the previous settings back."""
    knobs = _precision_settings()
    name, off = ("fp32_precision", "ieee") if hasattr(knobs[0], "fp32_precision") else ("allow_tf32", False)
    previous = [getattr(knob, name) for knob in knobs]
    for knob in knobs:
        setattr(knob, name, off)
    try:
        yield
    finally:
        for knob, value in zip(knobs, previous):
            setattr(knob, name, value)


def cifar_like(plan: Plan, *, num_train: int, num_test: int = 16, augment: str = "none"):
    """Seeded CIFAR-shaped data: 3 x image_size^2 uint8 images, 10 classes (``make_synthetic``)."""
    from sharpscope.data.synthetic import make_synthetic

    return make_synthetic(num_train=num_train, num_test=num_test, num_classes=10, channels=3,
                          image_size=plan.image_size, noise=60.0, seed=0, augment=augment)


def eval_tensors(plan: Plan, num_samples: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` normalised float32 images and int64 labels on ``device`` (the first of the train split)."""
    from sharpscope.data import normalize

    data = cifar_like(plan, num_train=num_samples)
    x = normalize(data.train_images.to(device), data.mean, data.std)
    return x, data.train_labels.to(device)


def build_model(spec: tuple[str, dict], plan: Plan, *, seed: int = 0) -> nn.Module:
    from sharpscope.models import create_model

    name, options = spec
    torch.manual_seed(seed)
    return create_model(name, in_channels=3, num_classes=10, image_size=plan.image_size, **options)


def spec_name(spec: tuple[str, dict]) -> str:
    name, options = spec
    return name + (":" + ",".join(f"{k}={v}" for k, v in options.items()) if options else "")


def parse_spec(text: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,...`` (integer values become ints)."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, options


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def warm_batchnorm(model: nn.Module, x: torch.Tensor, *, passes: int = 3, batch: int = 64) -> None:
    """Give BatchNorm running statistics from the data (a few train-mode forwards, no gradient)."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            for chunk in x.split(batch):
                model(chunk)
    model.train(was_training)


def max_relative_error(values: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """``max |values - reference| / max |reference|`` over all tensors (float64, on the CPU)."""
    diff = max(float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max()) for a, b in
               zip(values, reference))
    scale = max(float(b.detach().cpu().double().abs().max()) for b in reference)
    return diff / max(scale, torch.finfo(torch.float64).tiny)


# ----------------------------------------------------------------------------------------------------------------
# results: one JSON and one Markdown file, rewritten atomically


class Report:
    """The results dict and where it goes; :meth:`save` rewrites both files atomically."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        self.data: dict[str, Any] = {**meta, "sections": {name: {"status": "pending"} for name in meta["sections_run"]},
                                     "goals": [], "time_guard": []}
        self.json_path, self.markdown_path = out / JSON_NAME, out / MARKDOWN_NAME

    def save(self) -> None:
        from sharpscope.io import write_json, write_text

        write_json(self.json_path, self.data)
        write_text(self.markdown_path, render_markdown(self.data))


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.{digits}g}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(v).replace("|", "/").replace("\n", " ") for v in row) + " |")
    return lines


def render_markdown(data: dict[str, Any]) -> str:
    env = data.get("environment", {})
    lines = [f"# sharpscope GPU acceptance ({'tiny CPU dry run' if data.get('tiny') else 'full'})", "",
             f"- device: {env.get('device_name', data.get('device'))}; torch {env.get('torch')}; "
             f"sharpscope {env.get('sharpscope')}; started {data.get('started')}",
             f"- elapsed {_fmt(data.get('elapsed_s'))} s of a {_fmt(data.get('budget_s'))} s budget", ""]
    lines += ["## Goals", ""]
    lines += _table(["goal", "target", "measured", "status", "where"],
                    [[g["goal"], g["target"], g["value"], g["status"], g.get("detail", "")] for g in data["goals"]])
    sections = data["sections"]
    for name in SECTIONS:
        if name not in sections:
            continue
        section = sections[name]
        lines += ["", f"## {name} ({section.get('status')}, {_fmt(section.get('seconds'))} s)", ""]
        if section.get("error"):
            lines += ["```", section["error"], "```", ""]
        if section.get("reason"):
            lines += [f"skipped: {section['reason']}", ""]
        if name == "correctness" and section.get("checks"):
            lines += _table(["check", "passed", "max error", "tolerance", "detail"],
                            [[c["check"], c["passed"], c["max_error"], c["tolerance"], c.get("detail", "")]
                             for c in section["checks"]])
        if name == "analysis":
            for part in ("hvp", "landscape", "m_sharpness"):
                block = section.get(part)
                if block:
                    lines += ["", f"### {part}", ""]
                    lines += _table(["quantity", "value"], [[k, v] for k, v in block.items()])
        if name == "scale":
            if section.get("attempts"):
                lines += _table(["model", "params", "batch", "outcome", "seconds", "HVPs", "peak MiB", "top-5"],
                                [[a["model"], a.get("params"), a["batch"], a["outcome"], a.get("seconds"),
                                  a.get("hvps"), a.get("peak_mib"), a.get("top5")] for a in section["attempts"]])
        if name == "training" and section.get("rows"):
            lines += _table(["config", "optimizer", "samples/s", "step ms", "x SGD", "SAM goal", "GPU util %",
                             "syncs/step", "peak MiB", "warm-up s", "note"],
                            [[r["config"], r["optimizer"], r.get("samples_per_s"), r.get("step_ms"), r.get("x_sgd"),
                              r.get("sam_goal", ""), r.get("gpu_util_pct"), r.get("syncs_per_step"),
                              r.get("peak_mib"), r.get("warmup_s"), r.get("note", "")] for r in section["rows"]])
            if section.get("loader"):
                lines += ["", "DeviceLoader host syncs per epoch: " + ", ".join(
                    f"batch {k}: {_fmt(v)}" for k, v in section["loader"].items())]
    if data.get("time_guard"):
        lines += ["", "## Time guard", ""] + [f"- {entry}" for entry in data["time_guard"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# section: correctness (device float32 vs CPU float64)


def _check(name: str, error: float, tolerance: float, detail: str) -> dict[str, Any]:
    return {"check": name, "passed": bool(error <= tolerance), "max_error": error, "tolerance": tolerance,
            "detail": detail}


def _pair(plan: Plan, device: torch.device, x: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    """The check model on ``device`` (float32, channels-last on CUDA as the trainer runs it) and the same weights
    on the CPU in float64 (an exact upcast), BatchNorm statistics warmed on ``x``."""
    model = build_model(plan.check_model, plan)
    warm_batchnorm(model, x.cpu())
    reference = copy.deepcopy(model).double()
    on_device = model.to(device)
    if device.type == "cuda":
        on_device = on_device.to(memory_format=torch.channels_last)
    return on_device, reference


def _device_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device)
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" and x.dim() == 4 else x


def check_sam_steps(plan: Plan, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    from sharpscope.optim import create_optimizer, training_step

    checks = []
    for name, m in (("sam_step", None), ("m_sam_step", plan.check_m)):
        model, reference = _pair(plan, device, x)
        outcomes = []
        for net, xs, ys in ((model, _device_input(x, device), y.to(device)),
                            (reference, x.cpu().double(), y.cpu())):
            net.train()
            before = [p.detach().clone() for p in net.parameters()]
            optimizer = create_optimizer(net.parameters(), name="sam", lr=0.1, momentum=0.9, weight_decay=5e-4,
                                         rho=0.05)
            result = training_step(net, optimizer, nn.CrossEntropyLoss(), xs, ys, micro_batch_size=m)
            update = [p.detach() - b for p, b in zip(net.parameters(), before)]
            outcomes.append((update, result.loss))
        (update, loss), (update64, loss64) = outcomes
        error = max_relative_error(update, update64)
        loss_error = abs(float(loss) - float(loss64)) / abs(float(loss64))
        # what the check would see if the step ignored eps: the plain SGD update from the same weights
        _, plain = _pair(plan, device, x)
        before = [p.detach().clone() for p in plain.parameters()]
        optimizer = create_optimizer(plain.parameters(), name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
        training_step(plain.train(), optimizer, nn.CrossEntropyLoss(), x.cpu().double(), y.cpu())
        sensitivity = max_relative_error([p.detach() - b for p, b in zip(plain.parameters(), before)], update64)
        checks.append(_check(name, max(error, loss_error), TOLERANCES[name],
                             f"update max rel err {error:.2e}, loss rel err {loss_error:.2e}"
                             + (f", m={m}" if m else "") + f", {num_params(model):,} params, {len(y)} samples; "
                             f"an SGD update differs by {sensitivity:.2e}"))
    return checks


def check_hessian(plan: Plan, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    from sharpscope.data import EvalBatches
    from sharpscope.hessian import HessianOperator, hutchpp_trace, lanczos_eigs

    model, reference = _pair(plan, device, x)
    half = max(1, len(y) // 2)  # two batches: exercises the sample weighting
    results = []
    for net, batches, tol in ((model, EvalBatches.from_tensors(_device_input(x, device), y.to(device),
                                                                 batch_size=half), EIGEN_TOL_DEVICE),
                              (reference, EvalBatches.from_tensors(x.cpu().double(), y.cpu(), batch_size=half),
                               EIGEN_TOL_REFERENCE)):
        op = HessianOperator(net.eval(), nn.CrossEntropyLoss(), batches)
        eig = lanczos_eigs(op, 5, which="top", tol=tol)
        trace = hutchpp_trace(op, num_matvecs=plan.trace_matvecs, seed=0)
        results.append((eig, trace))
    (eig, trace), (eig64, trace64) = results
    eig_error = float((eig.eigenvalues - eig64.eigenvalues).abs().max()) / abs(float(eig64.eigenvalues[0]))
    trace_error = abs(trace.value - trace64.value) / abs(trace64.value)
    top = ", ".join(f"{v:.5g}" for v in eig.eigenvalues.tolist())
    top64 = ", ".join(f"{v:.5g}" for v in eig64.eigenvalues.tolist())
    return [
        _check("hessian_top5", eig_error, TOLERANCES["hessian_top5"],
               f"device [{top}] ({eig.num_matvecs} HVPs, converged {eig.all_converged}) vs float64 [{top64}] "
               f"({eig64.num_matvecs} HVPs, converged {eig64.all_converged})"),
        _check("hessian_trace", trace_error, TOLERANCES["hessian_trace"],
               f"Hutch++ {plan.trace_matvecs} products, seed 0: {trace.value:.6g} vs float64 {trace64.value:.6g}"),
    ]


def check_landscape_row(plan: Plan, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    import numpy as np

    from sharpscope.landscape import grid, loss_surface, random_directions

    model, reference = _pair(plan, device, x)
    directions = random_directions(model, dim=2, seed=0)
    directions64 = tuple(d.to("cpu", torch.float64) for d in directions)
    coords = (grid(-1, 1, plan.row_points), np.array([0.5]))
    kwargs = {"coords": coords, "precision": "fp32"}
    surface = loss_surface(model, nn.CrossEntropyLoss(), [(_device_input(x, device), y.to(device))],
                           directions=directions, **kwargs)
    surface64 = loss_surface(reference, nn.CrossEntropyLoss(), [(x.cpu().double(), y.cpu())],
                             directions=directions64, **kwargs)
    row, row64 = surface.loss[0], surface64.loss[0]
    error = float(np.abs(row - row64).max() / np.abs(row64).max())
    return _check("landscape_row", error, TOLERANCES["landscape_row"],
                  f"row b=0.5, {plan.row_points} points a in [-1, 1]; losses {row64.min():.4g}..{row64.max():.4g}")


def check_m_sharpness(plan: Plan, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    from sharpscope.sharpness import worst_case_sharpness

    model, reference = _pair(plan, device, x)
    kwargs = {"rho": 0.05, "m": plan.check_m, "steps": 3, "seed": 0}
    cell = worst_case_sharpness(model, nn.CrossEntropyLoss(), (_device_input(x, device), y.to(device)), **kwargs)
    cell64 = worst_case_sharpness(reference, nn.CrossEntropyLoss(), (x.cpu().double(), y.cpu()), **kwargs)
    values, values64 = torch.as_tensor(cell.chunk_values), torch.as_tensor(cell64.chunk_values)
    error = float((values - values64).abs().max() / values64.abs().max())
    return _check("m_sharpness_cell", error, TOLERANCES["m_sharpness_cell"],
                  f"worst-case, rho 0.05, m={plan.check_m}, 3 steps, {cell.num_chunks} chunks: mean {cell.value:.5g} "
                  f"vs float64 {cell64.value:.5g}")


def run_correctness(plan: Plan, device: torch.device, section: dict[str, Any], deadline: float) -> None:
    x, y = eval_tensors(plan, plan.check_samples, torch.device("cpu"))
    checks = section.setdefault("checks", [])
    xh, yh = x[: plan.hessian_samples], y[: plan.hessian_samples]
    steps: list[tuple[str, Callable[[], Any]]] = [  # cheapest first: the Hessian's float64 side is the slow one
        ("sam_step", lambda: check_sam_steps(plan, device, x, y)),
        ("landscape_row", lambda: check_landscape_row(plan, device, x, y)),
        ("m_sharpness_cell", lambda: check_m_sharpness(plan, device, x, y)),
        ("hessian", lambda: check_hessian(plan, device, xh, yh)),
    ]
    with exact_float32():
        for name, fn in steps:
            if time.perf_counter() > deadline:
                checks.append({"check": name, "passed": None, "max_error": None, "tolerance": None,
                               "detail": "skipped by the time guard"})
                continue
            try:
                out = fn()
                checks.extend(out if isinstance(out, list) else [out])
            except Exception as exc:  # one failing check must not lose the others
                checks.append({"check": name, "passed": False, "max_error": None, "tolerance": None,
                               "detail": "error: " + _error_text(exc)})


# ----------------------------------------------------------------------------------------------------------------
# section: analysis throughput


def serial_surface(model: nn.Module, directions, points: list[tuple[float, float]],
                   batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """The serial loop of Li et al.'s ``plot_surface.py``: per point a deepcopy of the state dict plus
    ``a d1 + b d2``, ``load_state_dict``, eval mode, and the loss summed with ``.item()`` per batch."""
    d1, d2 = directions
    w0 = copy.deepcopy(model.state_dict())
    criterion = nn.CrossEntropyLoss()
    losses = []
    for a, b in points:
        state = copy.deepcopy(w0)
        for name in d1.tensors:
            state[name] = state[name] + a * d1.tensors[name] + b * d2.tensors[name]
        model.load_state_dict(state)
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for inputs, targets in batches:
                total += criterion(model(inputs), targets).item() * len(targets)
                count += len(targets)
        losses.append(total / count)
    model.load_state_dict(w0)
    return losses


def run_analysis(plan: Plan, device: torch.device, section: dict[str, Any], deadline: float) -> None:
    import numpy as np

    from sharpscope.data import EvalBatches
    from sharpscope.hessian import HessianOperator
    from sharpscope.landscape import grid, loss_surface, random_directions
    from sharpscope.sharpness import worst_case_sharpness

    x, y = eval_tensors(plan, plan.analysis_samples, device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    model = build_model(plan.analysis_model, plan)
    warm_batchnorm(model, x.cpu())
    model = model.to(device).eval()
    loss_fn = nn.CrossEntropyLoss()
    batches = EvalBatches.from_tensors(x, y, batch_size=plan.analysis_batch)
    rounds = plan.analysis_rounds
    common = {"model": spec_name(plan.analysis_model), "params": num_params(model), "samples": len(y),
              "batch": plan.analysis_batch}

    with exact_float32():
        # HVPs: single vector and a block, against one gradient over the same batches
        op = HessianOperator(model, loss_fn, batches)
        generator = torch.Generator().manual_seed(0)
        v = torch.randn(op.num_params, generator=generator).to(device)
        V = torch.randn(op.num_params, plan.block, generator=generator).to(device)
        for fn in (op.gradient, lambda: op @ v, lambda: op @ V):  # warm-up: graph cache, allocator
            _timed(fn, device)
        medians = _interleaved({"gradient": op.gradient, "single": lambda: op @ v, "block": lambda: op @ V},
                               rounds=rounds, device=device)
        per_vector = medians["block"] / plan.block
        section["hvp"] = {**common, "gradient_ms": medians["gradient"] * 1e3,
                          "hvp_single_ms": medians["single"] * 1e3, f"hvp_block{plan.block}_ms": medians["block"] * 1e3,
                          "hvps_per_s_single": 1 / medians["single"], "hvps_per_s_block": 1 / per_vector,
                          "gradients_per_hvp_single": medians["single"] / medians["gradient"],
                          "gradients_per_hvp_block": per_vector / medians["gradient"], "block": plan.block}
        del op, V
        _free_memory(device)
        if time.perf_counter() > deadline:
            raise OutOfTime("after the HVP timings (landscape and m-sharpness not measured)")

        # loss surface: loss_surface vs the serial loop, same batches and points
        directions = random_directions(model, dim=2, seed=0)
        rows, columns = plan.surface_shape
        xs, ys = grid(-1, 1, columns), grid(-0.5, 0.5, rows)
        data = list(batches)
        points = [(float(xs[k % columns]), float(ys[k // columns])) for k in range(plan.serial_points)]
        serial_model = copy.deepcopy(model)

        def fast():
            return loss_surface(model, loss_fn, data, directions=directions, coords=(xs, ys))

        def slow():
            return serial_surface(serial_model, directions, points, data)

        surface, serial = fast(), slow()  # warm-up, and the agreement of the two
        agreement = float(np.abs(surface.loss.reshape(-1)[: plan.serial_points] - np.array(serial)).max())
        medians = _interleaved({"fast": fast, "slow": slow}, rounds=rounds, device=device)
        fast_rate, slow_rate = rows * columns / medians["fast"], plan.serial_points / medians["slow"]
        section["landscape"] = {**common, "grid": f"{rows}x{columns}", "points_per_s_loss_surface": fast_rate,
                                "points_per_s_serial": slow_rate, "speedup": fast_rate / slow_rate,
                                "max_abs_difference": agreement}
        del serial_model
        if time.perf_counter() > deadline:
            raise OutOfTime("after the landscape timings (m-sharpness not measured)")

        # m-sharpness: m = 1 (one perturbation per sample) vs one large chunk
        small_chunks = min(plan.msharp_small_chunks, len(y))
        large_m = min(plan.msharp_large_m, len(y))

        def cell(m: int, chunks: int):
            return worst_case_sharpness(model, loss_fn, (x, y), rho=0.05, m=m, steps=plan.msharp_steps,
                                        max_chunks=chunks, batch_size=plan.analysis_batch, seed=0)

        cell(1, small_chunks), cell(large_m, 1)  # warm-up (vmap tracing, allocator)
        medians = _interleaved({"m1": lambda: cell(1, small_chunks), "mlarge": lambda: cell(large_m, 1)},
                               rounds=rounds, device=device)
        small_rate = small_chunks * plan.msharp_steps / medians["m1"]
        large_rate = large_m * plan.msharp_steps / medians["mlarge"]
        section["m_sharpness"] = {**common, "steps": plan.msharp_steps, "m1_chunks": small_chunks,
                                  "m1_sample_steps_per_s": small_rate, "m_large": large_m,
                                  "m_large_sample_steps_per_s": large_rate,
                                  "m1_cost_per_sample_vs_m_large": large_rate / small_rate,
                                  "m1_seconds": medians["m1"], "m_large_seconds": medians["mlarge"]}


# ----------------------------------------------------------------------------------------------------------------
# section: scale


class DeadlineOperator:
    """An operator that multiplies with ``op`` until ``deadline`` and then raises :class:`OutOfTime`."""

    def __init__(self, op: Any, deadline: float) -> None:
        self.op, self.deadline = op, deadline
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
        if time.perf_counter() > self.deadline:
            raise OutOfTime(f"stopped by the time guard after {self.op.num_matvecs} HVPs")
        return self.op @ V


def _scale_attempt(spec, plan: Plan, batch: int, device: torch.device, deadline: float) -> dict[str, Any]:
    from sharpscope.data import EvalBatches
    from sharpscope.hessian import HessianOperator, lanczos_eigs

    attempt: dict[str, Any] = {"model": spec_name(spec), "batch": batch}
    model = op = None
    try:
        _reset_peak(device)
        model = build_model(spec, plan).to(device).eval()
        attempt["params"] = num_params(model)
        x, y = eval_tensors(plan, batch, device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        started = time.perf_counter()
        op = HessianOperator(model, nn.CrossEntropyLoss(), EvalBatches.from_tensors(x, y, batch_size=batch))
        seconds, eig = _timed(lambda: lanczos_eigs(DeadlineOperator(op, deadline), 5, which="top", tol=1e-3,
                                                   max_matvecs=plan.scale_max_matvecs), device)
        attempt.update(outcome="fits", seconds=time.perf_counter() - started, lanczos_seconds=seconds,
                       hvps=eig.num_matvecs, converged=eig.all_converged, peak_mib=_peak_mib(device),
                       top5=", ".join(f"{v:.4g}" for v in eig.eigenvalues.tolist()),
                       cached_batches=op.cached_batches)
    except OutOfTime as exc:
        attempt.update(outcome="fits (time guard)", note=str(exc), peak_mib=_peak_mib(device),
                       hvps=op.num_matvecs if op is not None else None)
    except Exception as exc:
        if not _is_oom(exc):
            raise
        attempt.update(outcome="out of memory", peak_mib=_peak_mib(device))
    finally:
        del model, op
        _free_memory(device)
    return attempt


def run_scale(plan: Plan, device: torch.device, section: dict[str, Any], deadline: float) -> None:
    attempts = section.setdefault("attempts", [])
    with exact_float32():
        for spec in plan.scale_models:
            for batch in plan.scale_batches:
                if time.perf_counter() > deadline:
                    attempts.append({"model": spec_name(spec), "batch": batch, "outcome": "skipped (time guard)"})
                    return
                attempt = _scale_attempt(spec, plan, batch, device, deadline)
                attempts.append(attempt)
                if attempt["outcome"].startswith("fits"):
                    section["largest"] = {k: attempt.get(k) for k in ("model", "params", "batch", "seconds", "hvps",
                                                                       "peak_mib", "outcome")}
                    return


# ----------------------------------------------------------------------------------------------------------------
# section: training throughput


def _batches_forever(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        epoch += 1
        loader.set_epoch(epoch)
        yield from loader


class UtilizationSampler:
    """Mean GPU utilisation (NVML, via ``torch.cuda.utilization``) sampled every 50 ms while active; None when it
    cannot be read (no pynvml, not CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self.available = device, [], device.type == "cuda"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception:  # no pynvml / NVML: report n/a
                self.available = False
                return
            self._stop.wait(0.05)

    def __enter__(self) -> UtilizationSampler:
        if self.available:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.samples) if self.available and self.samples else None


@contextlib.contextmanager
def count_syncs(device: torch.device) -> Iterator[list[int]]:
    """Count host synchronisations in the block with ``torch.cuda.set_sync_debug_mode("warn")`` (CUDA only;
    yields ``[count]``, filled at exit; ``[-1]`` elsewhere)."""
    counter = [-1]
    if device.type != "cuda":
        yield counter
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    counter[0] = sum("synchroniz" in str(w.message).lower() for w in caught)


OPTIMIZERS = ("sgd", "sam", "m-sam")


def _train_config(plan: Plan, dataset, spec, batch: int, precision: str, compiled: bool,
                  device: torch.device) -> list[dict[str, Any]]:
    """Time SGD, SAM and m-SAM steps of one configuration, interleaved; one row per optimizer."""
    from sharpscope.data import DeviceLoader
    from sharpscope.optim import create_optimizer, training_step
    from sharpscope.train.trainer import _fp16_grad_scaler

    config = f"{spec_name(spec)} b{batch} {precision} {'compile' if compiled else 'eager'}"
    model = build_model(spec, plan).to(device)
    channels_last = device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    if channels_last:  # the trainer's policy (sharpscope/train/trainer.py)
        model = model.to(memory_format=torch.channels_last)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    loader = DeviceLoader(dataset.train_images, dataset.train_labels, batch_size=batch, mean=dataset.mean,
                          std=dataset.std, shuffle=True, augment=dataset.augment, drop_last=True, device=device,
                          seed=0, channels_last=channels_last)
    stream = _batches_forever(loader)
    if compiled:
        torch._dynamo.reset()  # a fresh cache per configuration: no recompile limit carried over
    train_model = torch.compile(model) if compiled else model
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    totals = {"loss": torch.zeros((), dtype=torch.float64, device=device),
              "correct": torch.zeros((), dtype=torch.long, device=device)}
    steps: dict[str, Callable[[tuple[torch.Tensor, torch.Tensor]], None]] = {}
    for name in OPTIMIZERS:
        optimizer = create_optimizer(model.parameters(), name="sgd" if name == "sgd" else "sam", lr=0.01,
                                     momentum=0.9, weight_decay=5e-4, rho=0.05)
        scaler = _fp16_grad_scaler(device) if precision == "fp16" else None
        m = plan.train_m if name == "m-sam" else None

        def step(xy, optimizer=optimizer, scaler=scaler, m=m) -> None:
            images, labels = xy
            result = training_step(train_model, optimizer, loss_fn, images, labels, micro_batch_size=m,
                                   autocast_dtype=autocast_dtype, grad_scaler=scaler)
            totals["loss"] += result.loss.double() * len(labels)  # on-device bookkeeping, as the trainer does
            totals["correct"] += result.correct

        steps[name] = step

    rows = {name: {"config": config, "optimizer": name if name != "m-sam" else f"m-sam (m={plan.train_m})",
                   "model": spec_name(spec), "params": num_params(model), "batch": batch, "precision": precision,
                   "compile": compiled} for name in OPTIMIZERS}
    for name, step in steps.items():  # warm-up: compilation, cuDNN autotuning, allocator
        seconds, _ = _timed(lambda: [step(next(stream)) for _ in range(plan.warmup_steps)], device)
        rows[name]["warmup_s"] = seconds
    times: dict[str, list[float]] = {name: [] for name in OPTIMIZERS}
    utilization = {name: UtilizationSampler(device) for name in OPTIMIZERS}
    peaks: dict[str, float | None] = dict.fromkeys(OPTIMIZERS)
    for _ in range(plan.rounds):
        for name, step in steps.items():
            _reset_peak(device)
            with utilization[name]:
                seconds, _ = _timed(lambda: [step(next(stream)) for _ in range(plan.steps_per_round)], device)
            times[name].append(seconds / plan.steps_per_round)
            peak = _peak_mib(device)
            peaks[name] = None if peak is None else max(peak, peaks[name] or 0.0)
    syncs: dict[str, float | None] = {}
    for name, step in steps.items():
        batches = [next(stream) for _ in range(plan.sync_steps)]  # the loader is counted on its own
        _sync(device)
        with count_syncs(device) as counted:
            for xy in batches:
                step(xy)
        syncs[name] = None if counted[0] < 0 else counted[0] / plan.sync_steps
    _sync(device)
    sgd = statistics.median(times["sgd"])
    for name in OPTIMIZERS:
        step_s = statistics.median(times[name])
        row = rows[name]
        row.update(step_ms=step_s * 1e3, samples_per_s=batch / step_s, x_sgd=step_s / sgd,
                   gpu_util_pct=utilization[name].mean, syncs_per_step=syncs[name], peak_mib=peaks[name])
        if name == "sam":
            row["sam_goal"] = "met" if step_s / sgd <= SAM_OVER_SGD_GOAL else "missed"
    if not bool(torch.isfinite(totals["loss"])):
        for row in rows.values():
            row["note"] = "loss became non-finite (timing still valid)"
    del steps, train_model, model, loader, stream
    return list(rows.values())


def loader_syncs_per_epoch(dataset, batch: int, device: torch.device) -> float | None:
    from sharpscope.data import DeviceLoader

    loader = DeviceLoader(dataset.train_images, dataset.train_labels, batch_size=batch, mean=dataset.mean,
                          std=dataset.std, shuffle=True, augment=dataset.augment, drop_last=True, device=device,
                          seed=0, channels_last=device.type == "cuda")
    loader.set_epoch(1)
    for _ in loader:  # first epoch: one-time costs
        pass
    loader.set_epoch(2)
    _sync(device)
    with count_syncs(device) as counted:
        for _ in loader:
            pass
    return None if counted[0] < 0 else float(counted[0])


def training_configs(plan: Plan) -> list[tuple[tuple[str, dict], int, str, bool]]:
    """Eager configurations first (cheap), then compiled ones by priority: bf16 before fp16, small batch first."""
    eager = [(spec, b, prec, False) for spec in plan.train_models for b in plan.train_batches
             for prec in plan.precisions] if False in plan.compile_modes else []
    compiled = [(spec, b, prec, True) for prec in plan.precisions for b in plan.train_batches
                for spec in plan.train_models] if True in plan.compile_modes else []
    return eager + compiled


def run_training(plan: Plan, device: torch.device, section: dict[str, Any], deadline: float,
                 save: Callable[[], None], guard_log: list[str]) -> None:
    dataset = cifar_like(plan, num_train=plan.train_samples, augment="crop-flip")
    rows = section.setdefault("rows", [])
    section["loader"] = {str(b): loader_syncs_per_epoch(dataset, b, device) for b in plan.train_batches}
    eager_seconds: list[float] = []
    compile_seconds: list[float] = []
    for spec, batch, precision, compiled in training_configs(plan):
        config = f"{spec_name(spec)} b{batch} {precision} {'compile' if compiled else 'eager'}"
        history = compile_seconds if compiled else eager_seconds
        estimate = max(history) if history else (plan.compile_estimate_s if compiled else 5.0)
        left = deadline - time.perf_counter()
        if estimate > left:
            reason = f"skipped by the time guard (estimated {estimate:.0f} s, {max(left, 0):.0f} s left)"
            rows.append({"config": config, "optimizer": "all", "note": reason})
            guard_log.append(f"training {config}: {reason}")
            save()
            continue
        started = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                new_rows = _train_config(plan, dataset, spec, batch, precision, compiled, device)
            messages = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:300]}" for w in caught
                               if issubclass(w.category, RuntimeWarning) or "sharpscope" in str(w.filename)})
            for row in new_rows:  # e.g. m-SAM falling back from its batched pass: it changes the timing
                if messages:
                    row["warnings"] = messages
                    row["note"] = "; ".join(filter(None, [row.get("note"), *messages]))
            rows.extend(new_rows)
        except Exception as exc:  # one configuration's failure (OOM, a compile error) must not lose the others
            rows.append({"config": config, "optimizer": "all", "note": "error: " + _error_text(exc)})
        finally:
            _free_memory(device)
        history.append(time.perf_counter() - started)
        save()


# ----------------------------------------------------------------------------------------------------------------
# goals


def evaluate_goals(data: dict[str, Any]) -> list[dict[str, Any]]:
    sections = data["sections"]
    goals: list[dict[str, Any]] = []

    def add(goal: str, target: str, value: Any, met: bool | None, detail: str = "") -> None:
        goals.append({"goal": goal, "target": target, "value": value,
                      "status": "n/a" if met is None else ("met" if met else "missed"), "detail": detail})

    checks = sections.get("correctness", {}).get("checks", [])
    for c in checks:
        add(f"correctness: {c['check']}", f"max error <= {_fmt(c['tolerance'])}", c["max_error"], c["passed"],
            c.get("detail", ""))
    if not checks:
        add("correctness checks", "all pass", None, None, sections.get("correctness", {}).get("status", ""))

    analysis = sections.get("analysis", {})
    hvp = analysis.get("hvp")
    add("gradients per HVP (block)", f"<= {GRADIENTS_PER_HVP_GOAL}",
        hvp and hvp["gradients_per_hvp_block"],
        None if not hvp else hvp["gradients_per_hvp_block"] <= GRADIENTS_PER_HVP_GOAL,
        f"block of {hvp['block']}, {hvp['model']}; single vector {_fmt(hvp['gradients_per_hvp_single'])}"
        if hvp else "")
    surface = analysis.get("landscape")
    add("landscape loss_surface / serial loop", f">= {LANDSCAPE_SPEEDUP_GOAL}x", surface and surface["speedup"],
        None if not surface else surface["speedup"] >= LANDSCAPE_SPEEDUP_GOAL,
        f"{_fmt(surface['points_per_s_loss_surface'])} vs {_fmt(surface['points_per_s_serial'])} points/s"
        if surface else "")

    scale = sections.get("scale", {})
    largest = scale.get("largest")
    first = data["plan"]["scale_models"][0]
    first_name = spec_name((first[0], first[1]))
    add("Hessian top-5 of the largest model fits", f"{first_name} at some batch",
        largest and f"{largest['model']} batch {largest['batch']}",
        None if not scale.get("attempts") else bool(largest and largest["model"] == first_name),
        f"{_fmt(largest.get('seconds'))} s, peak {_fmt(largest.get('peak_mib'))} MiB" if largest else "")

    rows = [r for r in sections.get("training", {}).get("rows", []) if "step_ms" in r]
    sam = [r for r in rows if r["optimizer"] == "sam"]
    if sam:
        worst = max(sam, key=lambda r: r["x_sgd"])
        add("SAM / SGD step time (every configuration)", f"<= {SAM_OVER_SGD_GOAL}", worst["x_sgd"],
            worst["x_sgd"] <= SAM_OVER_SGD_GOAL, f"worst: {worst['config']} ({len(sam)} configurations)")
    else:
        add("SAM / SGD step time (every configuration)", f"<= {SAM_OVER_SGD_GOAL}", None, None)
    for precision in data["plan"]["precisions"]:
        counted = [r for r in rows if r["precision"] == precision and r.get("syncs_per_step") is not None]
        if counted:
            worst = max(counted, key=lambda r: r["syncs_per_step"])
            detail = f"worst: {worst['config']} {worst['optimizer']}"
            if precision == "fp16" and worst["syncs_per_step"] > 0:
                detail += " (torch's GradScaler.step reads found_inf with .item())"
            add(f"host syncs per training_step ({precision})", f"= {SYNCS_PER_STEP_GOAL}", worst["syncs_per_step"],
                worst["syncs_per_step"] <= SYNCS_PER_STEP_GOAL, detail)
        else:
            add(f"host syncs per training_step ({precision})", f"= {SYNCS_PER_STEP_GOAL}", None, None,
                "needs CUDA" if data["device"] != "cuda" else "not measured")
    return goals


# ----------------------------------------------------------------------------------------------------------------
# driver


def environment(device: torch.device) -> dict[str, Any]:
    import sharpscope

    info: dict[str, Any] = {"torch": torch.__version__, "sharpscope": sharpscope.__version__,
                            "python": platform.python_version(), "platform": platform.platform(),
                            "cpu_threads": torch.get_num_threads(), "device_name": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), memory_gib=props.total_memory / 2**30,
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    cudnn_benchmark=torch.backends.cudnn.benchmark, **precision_state())
        try:
            torch.cuda.utilization(device)
            info["nvml"] = True
        except Exception as exc:
            info["nvml"] = f"unavailable ({type(exc).__name__})"
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_acceptance.json and gpu_acceptance.md")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes: a CPU dry run (< 1 min)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="time budget in seconds (default 450)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile cases of the training section (auto: on, off with --tiny)")
    parser.add_argument("--train-models", default=None,
                        help="models of the training section, name[:key=value,...] separated by ';' "
                             "(default: the plan's, e.g. 'resnet20;wrn16-8')")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = TINY_PLAN if args.tiny else FULL_PLAN
    if args.compile == "on":
        plan = replace(plan, compile_modes=(False, True))
    elif args.compile == "off":
        plan = replace(plan, compile_modes=(False,))
    if args.train_models:
        plan = replace(plan, train_models=tuple(parse_spec(s) for s in args.train_models.split(";") if s))
    return plan


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--sections: unknown {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    plan = make_plan(args)
    out = Path(args.out)
    report = Report(out, {
        "schema": SCHEMA, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv), "device": device.type, "tiny": args.tiny,
        "budget_s": args.budget_s, "plan": asdict(plan), "tolerances": TOLERANCES,
        "sections_run": [s for s in SECTIONS if s in wanted],
    })
    report.data["environment"] = environment(device)
    deadline = started + args.budget_s
    order = [s for s in SECTIONS if s in wanted]

    def save() -> None:
        report.data["elapsed_s"] = time.perf_counter() - started
        report.data["goals"] = evaluate_goals(report.data)
        report.save()

    save()
    for index, name in enumerate(order):
        section = report.data["sections"][name]
        now = time.perf_counter()
        # a share of the budget, keeping half the shares of the later sections in reserve
        reserve = sum(0.5 * SHARES[later] for later in order[index + 1:])
        section_deadline = min(deadline - reserve, now + (1.5 * SHARES[name] if name != "training" else math.inf))
        if section_deadline - now < MIN_START[name]:
            section.update(status="skipped", reason=f"time guard: {max(deadline - now, 0):.0f} s of the budget left, "
                                                    f"{reserve:.0f} s kept for later sections")
            report.data["time_guard"].append(f"{name}: skipped ({section['reason']})")
            save()
            continue
        section["status"] = "running"
        save()
        try:
            if name == "correctness":
                run_correctness(plan, device, section, section_deadline)
            elif name == "analysis":
                run_analysis(plan, device, section, section_deadline)
            elif name == "scale":
                run_scale(plan, device, section, section_deadline)
            else:
                run_training(plan, device, section, section_deadline, save, report.data["time_guard"])
            section["status"] = "ok"
        except OutOfTime as exc:
            section["status"] = "partial"
            section["reason"] = f"time guard: {exc}"
            report.data["time_guard"].append(f"{name}: {exc}")
        except Exception as exc:  # record and go on with the next section
            section["status"] = "error"
            section["error"] = _error_text(exc)
            section["traceback"] = traceback.format_exc()[-4000:]
        finally:
            section["seconds"] = time.perf_counter() - now
            _free_memory(device)
        save()
    report.data["complete"] = all(report.data["sections"][s]["status"] == "ok" for s in order)
    save()
    print(f"wrote {report.json_path} and {report.markdown_path} ({report.data['elapsed_s']:.0f} s)")
    return report.data


if __name__ == "__main__":
    main()
