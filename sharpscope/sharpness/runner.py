"""``sharpscope sharpness`` as one library function: measure checkpoints, write the results, resume where a
previous run stopped.

:func:`run` loads each checkpoint and its fixed evaluation set, measures its generalization gap
(:func:`sharpscope.sharpness.generalization_gap`) and runs every measure (:func:`sharpscope.sharpness.run_measure`),
then writes the arrays, the figures and (for several checkpoints) Kendall's tau with the gap. Nothing is lost
to an interruption beyond the last ``save_every`` seconds:

* ``sharpness.json`` is rewritten after each (checkpoint, measure): a rerun with the same configuration reuses
  every finished entry;
* inside a grid measure (worst, average, adaptive) the finished blocks of chunks are written to
  ``sharpness.partial.npz`` (:class:`~sharpscope.sharpness.partial.PartialResults`) at most every ``save_every``
  seconds; a rerun skips them and gets bit-identical numbers (same device, same thread count). The file is
  deleted when its measure is saved.

Under ``torchrun`` the chunks of the grid measures are split over the ranks (no partial file then: each rank
holds only its share); rank 0 alone writes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharpscope.inputs import (
    DEFAULT_EVAL_BATCH_SIZE,
    DEFAULT_EVAL_SPLIT,
    DEFAULT_NUM_SAMPLES,
)
from sharpscope.plots.output import FIGURE_FORMATS, FigureOutput
from sharpscope.sharpness.correlation import MIN_KENDALL_CHECKPOINTS
from sharpscope.sharpness.suite import SuiteConfig

__all__ = ["run", "SharpnessRun", "DEFAULT_ADAPTIVE_RHO", "DEFAULT_AVERAGE_RHO", "PARTIAL_FILE"]

#: Files :func:`run` writes (figures: one per format of ``figure_output``).
DATA_OUTPUTS = ("sharpness.json", "sharpness.npz", "kendall_tau.json")
FIGURE_STEMS = ("sharpness_vs_rho", "kendall_tau")
#: Finished blocks of the measure in progress (deleted when the measure is saved).
PARTIAL_FILE = "sharpness.partial.npz"
#: At most this many runs overlaid in sharpness_vs_rho: with more checkpoints, the last one of each run folder.
MAX_RUNS = 8


#: Radii of the adaptive measure (:class:`~sharpscope.sharpness.SuiteConfig` says why they are small).
DEFAULT_ADAPTIVE_RHO = SuiteConfig.adaptive_rho_values
DEFAULT_AVERAGE_RHO = SuiteConfig.average_rho_values


@dataclass(frozen=True)
class SharpnessRun:
    """What :func:`run` wrote and found (the numbers are those of ``sharpness.json``)."""

    out: Path  # the folder written into
    written: tuple[Path, ...]  # files written, sharpness.json first
    checkpoints: tuple[dict, ...]  # per checkpoint: path, label, sha256, train/test error, generalization_gap, ...
    entries: tuple[dict, ...]  # per (checkpoint, measure): {"checkpoint", "measure", "seconds", "result"}
    kendall_tau: dict[str, float] | None  # measure label -> tau with the gap; None for fewer than 3 checkpoints
    kendall_p_value: dict[str, float] | None  # measure label -> its two-sided p-value
    reused: int  # (checkpoint, measure) results taken from a previous run's sharpness.json
    resumed_chunks: float  # chunks of an interrupted measure taken from sharpness.partial.npz

    def __repr__(self) -> str:
        """A few lines: per checkpoint its gap and each measure's grid in one line each; never the raw records."""
        lines = [f"SharpnessRun({len(self.checkpoints)} checkpoints, {len(self.written)} files in {str(self.out)!r}"
                 + (f", {self.reused} results reused" if self.reused else "")]
        for record in self.checkpoints:
            gap = record.get("generalization_gap")
            lines.append(f"  {record.get('label', record.get('path'))}: gap {gap:.4g}" if isinstance(gap, float)
                         else f"  {record.get('label', record.get('path'))}")
            for entry in (e for e in self.entries if e["checkpoint"] == record["path"]):
                result = entry["result"]
                if "values" in result and "m_values" in result and "rho_values" in result:
                    cells = "; ".join(f"m={m}: " + ", ".join(f"{v:.3g}" for v in row)
                                      for m, row in zip(result["m_values"], result["values"]))
                    lines.append(f"    {entry['measure']} (rho {', '.join(f'{r:g}' for r in result['rho_values'])})"
                                 f": {cells}")
                else:
                    lines.append(f"    {entry['measure']}")
        return "\n".join(lines) + ")"


def run(
    checkpoints: Sequence[str | Path],
    *,
    measures: Sequence[str] = ("worst",),
    m: Sequence[int] = (1, 8, 32, 128),
    rho: Sequence[float] = (0.01, 0.05, 0.1),
    adaptive_rho: Sequence[float] = DEFAULT_ADAPTIVE_RHO,
    average_rho: Sequence[float] = DEFAULT_AVERAGE_RHO,
    p: float | str = 2.0,
    steps: int = 20,
    num_draws: int = 20,
    eta: float = 0.01,
    max_chunks: int | None = None,
    keskar_eps: Sequence[float] = (1e-3, 5e-4),
    pacbayes_draws: int = 10,
    gap_samples: int | None = None,
    model_spec: str | None = None,
    loss: str | None = None,
    dataset: str | None = None,
    split: str = DEFAULT_EVAL_SPLIT,
    num_samples: int = DEFAULT_NUM_SAMPLES,
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE,
    data_dir: str | None = None,
    seed: int = 0,
    device: Any = None,
    out: str | Path,
    overwrite: bool = False,
    figure_output: FigureOutput = FigureOutput(),
    save_every: float = 30.0,
    progress: bool = False,
) -> SharpnessRun:
    """Sharpness measures of ``checkpoints`` written into ``out``; the function behind ``sharpscope sharpness``.

    Args:
        checkpoints: checkpoint files or run folders (all their ``ckpt-epoch*.pt`` then ``final.pt``).
        measures: names of :data:`sharpscope.sharpness.MEASURES`, run in this order for every checkpoint.
        m, rho: the m-sharpness grid of ``worst`` (Foret et al. 2021, section 4.1); ``m`` also of the others.
        average_rho: noise scales of ``average`` (per weight: far smaller than ``rho``; see :class:`SuiteConfig`).
        adaptive_rho: radii of ``adaptive`` (relative to ``|w| + eta``; see :class:`SuiteConfig` for why they
            are small).
        p: 2 or ``inf`` (also the string ``"inf"``): the ball of worst/adaptive, the noise of average.
        steps, num_draws, eta, max_chunks, keskar_eps, pacbayes_draws, seed, batch_size: as in
            :class:`sharpscope.sharpness.SuiteConfig`.
        gap_samples: measure the generalization gap on the first this many samples of each split (None: all).
            The gap is test error minus train error for a classifier; for a loss without accuracy (regression, a
            language model's :class:`~sharpscope.batches.BatchLoss`) it is test loss minus train loss (the
            checkpoint's record then holds ``train_error``/``test_error`` None and ``gap_units`` ``"loss"``).
        model_spec, dataset, split, num_samples, data_dir: the model of a plain state_dict and the fixed
            evaluation set (:func:`sharpscope.inputs.analysis_inputs`).
        loss: a ``package.module:factory[:k=v]`` loss spec for every checkpoint; default: the loss each checkpoint
            recorded (plain cross-entropy when none), and checkpoints that recorded different losses are refused.
        device: ``"cpu"``, ``"cuda"``, a ``torch.device`` or None (CUDA when available).
        out: the folder written into: ``sharpness.json``, ``sharpness.npz``, ``sharpness_vs_rho.<fmt>`` and, for
            three or more checkpoints, ``kendall_tau.json`` / ``kendall_tau.<fmt>``.
        overwrite: replace results of another configuration (otherwise refused); results of the same
            configuration are always reused (resume).
        figure_output: figure formats and dpi.
        save_every: seconds between writes of the partial results of a grid measure (0: after every block).
        progress: tqdm bars on stderr.

    Returns:
        A :class:`SharpnessRun`.

    Raises:
        SharpscopeError: bad settings, results of another configuration in ``out`` (without ``overwrite``), a
            checkpoint whose loss is not finite, a measure that would not fit in memory, checkpoints with different
            recorded losses, a PAC-Bayes measure of a model without accuracy.
    """
    from sharpscope import distributed
    from sharpscope.errors import SharpscopeError
    from sharpscope.inputs import AnalysisLoss, expand_checkpoints, resolve_device
    from sharpscope.io import prepare_out_dir

    if not (isinstance(save_every, (int, float)) and save_every >= 0 and math.isfinite(save_every)):
        raise SharpscopeError(f"save_every must be a number of seconds >= 0, got {save_every!r}")
    p_value = math.inf if str(p) == "inf" or p == math.inf else float(p)
    config = SuiteConfig(
        measures=tuple(dict.fromkeys(measures)), m_values=tuple(m), rho_values=tuple(rho),
        adaptive_rho_values=tuple(adaptive_rho), average_rho_values=tuple(average_rho), p=p_value, steps=steps, num_draws=num_draws, eta=eta,
        max_chunks=max_chunks, keskar_eps=tuple(keskar_eps), pacbayes_draws=pacbayes_draws, seed=seed,
        batch_size=batch_size,
    )
    full_config = {"suite": config.to_dict(),
                   "eval": {"dataset": dataset, "split": split, "num_samples": num_samples, "data_dir": data_dir,
                            **({"model_spec": model_spec} if model_spec else {})},
                   "gap": {"num_samples": gap_samples}}
    paths = list(dict.fromkeys(expand_checkpoints([str(c) for c in checkpoints])))
    analysis_loss = AnalysisLoss(loss)
    analysis_loss.check_files(paths)  # one loss for every checkpoint: refused before any work when they differ
    if analysis_loss.spec is not None:  # named only when not the default cross-entropy: older results still match
        full_config["eval"]["loss"] = analysis_loss.spec
    out = Path(out)
    json_path = out / "sharpness.json"
    previous = None
    if json_path.exists() and not overwrite:
        try:
            previous = json.loads(json_path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
        if previous is None or not _same_config(previous.get("config") or {}, full_config):
            _refuse_other_config(json_path, (previous or {}).get("config") or {}, full_config)
    partial_path = out / PARTIAL_FILE
    if partial_path.exists() and not overwrite:
        old = _partial_config(partial_path)
        if old is not None and old != full_config:
            _refuse_other_config(partial_path, old, full_config)
    outputs = [*DATA_OUTPUTS, *(f"{stem}.{fmt}" for stem in FIGURE_STEMS for fmt in figure_output.formats)]
    prepare_out_dir(out, outputs=outputs, overwrite=overwrite, resume=previous is not None)
    rank_info, dev = distributed.setup(resolve_device(None if device is None else str(device)))
    if overwrite and rank_info.is_main:
        partial_path.unlink(missing_ok=True)
    shard = (rank_info.rank, rank_info.world_size) if rank_info.enabled else None
    try:
        return _run(paths, config, full_config, previous, out, rank_info, shard, dev, analysis_loss,
                    dataset=dataset, split=split,
                    num_samples=num_samples, batch_size=batch_size, data_dir=data_dir, model_spec=model_spec,
                    gap_samples=gap_samples, figure_output=figure_output, save_every=save_every, progress=progress)
    finally:
        if rank_info.enabled:  # leave together: a rank exiting while gloo still talks to it aborts the job
            distributed.barrier()
            distributed.teardown()


def _run(paths, config, full_config, previous, out, rank_info, shard, dev, analysis_loss, *, dataset, split,
         num_samples, batch_size, data_dir, model_spec, gap_samples, figure_output, save_every,
         progress) -> SharpnessRun:
    """The body of :func:`run` (after the arguments are checked), on every rank."""
    import numpy as np
    from tqdm import tqdm

    from sharpscope.errors import SharpscopeError
    from sharpscope.inputs import analysis_inputs, check_finite_loss, classifies
    from sharpscope.io import write_json
    from sharpscope.results import file_sha256, provenance
    from sharpscope.sharpness.generalization import generalization_gap
    from sharpscope.sharpness.partial import PartialResults
    from sharpscope.sharpness.suite import progress_total, run_measure

    json_path = out / "sharpness.json"
    if rank_info.is_main:
        # rebuilt from sharpness.json at the end; stale ones must not outlive it
        for name in DATA_OUTPUTS[1:]:
            (out / name).unlink(missing_ok=True)
        for stem in FIGURE_STEMS:
            for fmt in FIGURE_FORMATS:
                (out / f"{stem}.{fmt}").unlink(missing_ok=True)
    done = {(e["sha256"], e["measure"]): e for e in (previous or {}).get("entries", [])}
    # a record without a measured gap (written before it was measured) is rebuilt
    known = {c["sha256"]: c for c in (previous or {}).get("checkpoints", []) if "train_error" in c}
    labels = _labels(paths)
    datasets: dict[str, Any] = {}  # name -> ImageDataset or BatchData, loaded once for the gaps of all checkpoints
    loss_fn = None
    progress = progress and rank_info.is_main
    records: list[dict] = []
    entries: list[dict] = []
    reused = 0
    resumed_chunks = 0.0
    sources = provenance(paths)

    def save() -> None:
        if rank_info.is_main:
            write_json(json_path, {"config": full_config, "provenance": sources, "checkpoints": records,
                                   "entries": entries, "rows": _rows(records, entries)})

    for path in paths:
        sha = file_sha256(path)
        todo = [name for name in config.measures if (sha, name) not in done]
        record = known.get(sha)
        checkpoint = data = None
        if todo or record is None:
            checkpoint, data = analysis_inputs(path, dataset=dataset, split=split, num_samples=num_samples,
                                               batch_size=batch_size, device=dev, data_dir=data_dir,
                                               model_spec=model_spec)
            loss_fn = analysis_loss.for_checkpoint(path, checkpoint.config)
            check_finite_loss(checkpoint.model, loss_fn, data, path)
            pac_bayes = [name for name in todo if name.startswith("pacbayes")]
            if pac_bayes and not classifies(checkpoint.model, loss_fn, data[0]):
                raise SharpscopeError(
                    f"--measure {pac_bayes[0]}: PAC-Bayes flatness is the noise level that drops the accuracy by 0.1 "
                    f"(Jiang et al. 2020), but {path} has no accuracy (its loss "
                    f"{analysis_loss.spec or 'cross-entropy'} does not score (n, classes) outputs against integer "
                    "labels); drop the pacbayes measures"
                )
        if record is None:  # saved with the checkpoint's first entry (a failing first measure leaves no file)
            train_batches, test_batches, total, classifier = _gap_batches(
                datasets, dataset or checkpoint.dataset, data_dir, gap_samples, batch_size, dev, checkpoint.model,
                loss_fn)
            # every rank measures the whole gap (one pass over both splits: cheap next to the measures)
            with tqdm(total=total, desc=f"{labels[path]} gap", unit="sample", leave=False, disable=not progress,
                      file=sys.stderr) as bar:
                if classifier:
                    gap = generalization_gap(checkpoint.model, loss_fn, train_batches, test_batches,
                                             on_progress=bar.update).to_dict()
                else:
                    gap = _loss_gap(checkpoint.model, loss_fn, train_batches, test_batches, on_progress=bar.update)
            record = {"epoch": checkpoint.epoch, "metrics": checkpoint.metrics, **gap,
                      "metrics_generalization_gap": checkpoint.generalization_gap,
                      "num_eval_samples": data.num_samples}
        record = {**record, "path": str(path), "label": labels[path], "sha256": sha}
        records.append(record)
        for name in config.measures:
            if (sha, name) in done:
                entries.append({**done[(sha, name)], "checkpoint": str(path)})
                reused += 1
                continue
            partial = None
            if shard is None and rank_info.is_main:
                partial = PartialResults(out / PARTIAL_FILE, {"config": full_config, "sha256": sha, "measure": name},
                                         save_every=save_every)
            total = progress_total(name, config, record["num_eval_samples"])
            started = time.perf_counter()
            with tqdm(total=total, desc=f"{labels[path]} {name}", unit="chunk" if total else "it", leave=False,
                      disable=not progress, file=sys.stderr) as bar:
                try:
                    result = run_measure(name, checkpoint.model, loss_fn, data, config, on_progress=bar.update,
                                         shard=shard, partial=partial)
                finally:
                    if partial is not None:
                        partial.flush()  # what was finished survives an error (or Ctrl-C)
            entries.append({"checkpoint": str(path), "sha256": sha, "measure": name,
                            "seconds": round(time.perf_counter() - started, 3), "result": result})
            save()
            if partial is not None:
                resumed_chunks += partial.reused
                partial.discard()
        del checkpoint, data
    if not rank_info.is_main:
        return SharpnessRun(out, (), tuple(records), tuple(entries), None, None, reused, resumed_chunks)
    save()
    (out / PARTIAL_FILE).unlink(missing_ok=True)  # one left by an interruption between its measure's save and here
    written = [json_path, _write_arrays(out, config, records, entries, np)]
    written += _write_sharpness_figure(out, records, entries, figure_output)
    table = pvalues = None
    if len(records) >= MIN_KENDALL_CHECKPOINTS:  # over two models tau is +-1 whatever the measure, at p = 1
        table = _kendall_table(records, entries)
        pvalues = _kendall_pvalues(records, entries, table)
        written += _write_kendall(out, records, table, pvalues, figure_output)
    return SharpnessRun(out, tuple(written), tuple(records), tuple(entries), table, pvalues, reused, resumed_chunks)


def _partial_config(path: Path) -> dict | None:
    """The configuration a partial file was written for (None when unreadable: it is then replaced)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return json.loads(str(data["__identity__"]))["config"]
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _refuse_other_config(path: Path, old: dict, new: dict) -> None:
    from sharpscope.errors import SharpscopeError

    diff = _config_differences(old, new)
    raise SharpscopeError(
        f"{path} holds results of a different configuration ({'; '.join(diff[:4]) or 'unreadable'}); "
        "pass --overwrite to replace them or choose another --out"
    )


def _labels(paths: list[Path]) -> dict[Path, str]:
    """``run/file`` per checkpoint, with run names that tell distinct folders apart (``seedA/sgd/final.pt`` and
    ``seedB/sgd/final.pt``, not two ``sgd/final.pt``): the labels key the figure's lines."""
    from sharpscope.inputs import run_names

    names = run_names([path.parent for path in paths])
    return {path: f"{name}/{path.name}" for path, name in zip(paths, names)}


def _same_config(old: dict, new: dict) -> bool:
    """Whether a previous sharpness.json's config matches; one written before the gap was measured (no "gap"
    settings) matches on the rest: its entries stay valid, and each checkpoint's gap is measured and added."""
    if "gap" not in old:
        new = {key: value for key, value in new.items() if key != "gap"}
    return old == new


def _config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out


def _gap_batches(datasets: dict, name: str, data_dir: str | None, gap_samples: int | None, batch_size: int,
                 device, model, loss_fn) -> tuple[Any, Any, int, bool]:
    """``(train batches, test batches, samples in both, classifier)`` the generalization gap is measured on: the
    first ``gap_samples`` (all when None or more) of each split of dataset ``name``, in the stored order.

    An :class:`~sharpscope.data.ImageDataset`: normalised as in training, no augmentation, built one batch at a time
    (a whole normalised split can be large); a classifier. A :class:`~sharpscope.train.BatchData`: its batches
    re-batched to ``batch_size`` (:func:`sharpscope.inputs.take_samples`); a classifier when ``model`` and
    ``loss_fn`` score ``(n, classes)`` outputs against integer labels (:func:`sharpscope.inputs.classifies`)."""
    from sharpscope.data import ImageDataset, normalize
    from sharpscope.inputs import classifies, load_analysis_data, take_samples

    if name not in datasets:
        datasets[name] = load_analysis_data(name, data_dir=data_dir)  # analysis_inputs just read it: no error here
    data = datasets[name]
    if not isinstance(data, ImageDataset):
        train, test = (take_samples(part, gap_samples, batch_size=batch_size, device=device)
                       for part in (data.train, data.test))
        return train, test, train.num_samples + test.num_samples, classifies(model, loss_fn, test[0])

    def batches(images, labels):
        for start in range(0, len(labels), batch_size):
            window = slice(start, start + batch_size)
            yield normalize(images[window].to(device), data.mean, data.std), labels[window].to(device)

    splits = []
    for split in ("train", "test"):
        images, labels = data.split(split)
        count = len(labels) if gap_samples is None else min(gap_samples, len(labels))
        splits.append((images[:count], labels[:count]))
    total = sum(len(labels) for _, labels in splits)
    return batches(*splits[0]), batches(*splits[1]), total, True


def _loss_gap(model, loss_fn, train_batches, test_batches, *, on_progress) -> dict[str, Any]:
    """The generalization gap of a model without accuracy, in loss units: test loss minus train loss (each the
    sample-weighted mean over its split, model in eval mode, no gradients), as a checkpoint record's fields."""
    from sharpscope.inputs import mean_loss

    was_training = model.training
    model.eval()
    try:
        train_loss, num_train = mean_loss(model, loss_fn, train_batches)
        on_progress(num_train)
        test_loss, num_test = mean_loss(model, loss_fn, test_batches)
        on_progress(num_test)
    finally:
        model.train(was_training)
    return {"train_error": None, "test_error": None, "train_loss": train_loss, "test_loss": test_loss,
            "num_train_samples": num_train, "num_test_samples": num_test,
            "generalization_gap": test_loss - train_loss, "gap_units": "loss"}


# ------------------------------------------------------------------------------------------------- outputs
def _rows(records: list[dict], entries: list[dict]) -> list[dict]:
    """The flat table of sharpness.json: one row per checkpoint, measure, m and rho."""
    by_path = {r["path"]: r for r in records}
    rows = []
    for entry in entries:
        ckpt = by_path[entry["checkpoint"]]
        base = {"checkpoint": ckpt["path"], "label": ckpt["label"], "measure": entry["measure"],
                "generalization_gap": ckpt["generalization_gap"]}
        result = entry["result"]
        if result["kind"] == "grid":
            for m, values, errors in zip(result["m_values"], result["values"], result["stderr"]):
                for rho, value, error in zip(result["rho_values"], values, errors):
                    rows.append({**base, "m": m, "rho": rho, "value": value, "stderr": error,
                                 "steps": result["steps"]})
        elif result["kind"] == "keskar":
            for eps, value in zip(result["eps_values"], result["values"]):
                rows.append({**base, "m": result["num_samples"], "rho": eps, "value": value, "stderr": None,
                             "steps": result["steps"]})
        else:
            rows.append({**base, "m": None, "rho": None, "value": result["measure"], "stderr": None,
                         "steps": result["evaluations"], "sigma": result["sigma"]})
    return rows


def _write_arrays(out: Path, config, records: list[dict], entries: list[dict], np) -> Path:
    """sharpness.npz: per measure arrays stacked over checkpoints (NaN where not computed)."""
    from sharpscope.io import write_npz

    index = {r["path"]: i for i, r in enumerate(records)}
    n = len(records)
    arrays: dict[str, Any] = {
        "checkpoints": np.array([r["path"] for r in records]),
        **{key: np.array([r[key] for r in records], dtype=np.float64)
           for key in ("train_error", "test_error", "generalization_gap")},
        "m_values": np.array(config.m_values), "rho_values": np.array(config.rho_values),
        "adaptive_rho_values": np.array(config.adaptive_rho_values),
        "average_rho_values": np.array(config.average_rho_values), "keskar_eps": np.array(config.keskar_eps),
    }
    for name in config.measures:
        for entry in (e for e in entries if e["measure"] == name):
            i, result = index[entry["checkpoint"]], entry["result"]
            key = name.replace("-", "_")
            if result["kind"] == "grid":
                for field in ("values", "stderr"):
                    grid = np.array(result[field], dtype=np.float64)
                    arrays.setdefault(f"{key}_{field}", np.full((n, *grid.shape), np.nan))[i] = grid
            elif result["kind"] == "keskar":
                arrays.setdefault(f"{key}_values", np.full((n, len(result["values"])), np.nan))[i] = result["values"]
            else:
                arrays.setdefault(f"{key}_sigma", np.full(n, np.nan))[i] = result["sigma"]
                arrays.setdefault(f"{key}_values", np.full(n, np.nan))[i] = result["measure"]
    return write_npz(out / "sharpness.npz", **arrays)


def _figure_checkpoints(records: list[dict]) -> list[dict]:
    if len(records) <= MAX_RUNS:
        return records
    last_per_run: dict[str, dict] = {}
    for record in records:
        last_per_run[str(Path(record["path"]).parent)] = record
    return list(last_per_run.values())[-MAX_RUNS:]


def _write_sharpness_figure(out: Path, records: list[dict], entries: list[dict],
                            figure_output: FigureOutput) -> list[Path]:
    """sharpness_vs_rho.<fmt>: every grid measure of (at most :data:`MAX_RUNS`) checkpoints overlaid."""
    from sharpscope.plots.sharpness import sharpness_vs_rho
    from sharpscope.sharpness.result import SharpnessResult

    runs: dict[str, dict[str, SharpnessResult]] = {}
    for record in _figure_checkpoints(records):
        grids = {e["measure"]: SharpnessResult.from_dict(e["result"]) for e in entries
                 if e["checkpoint"] == record["path"] and e["result"]["kind"] == "grid"}
        if grids:
            runs[record["label"]] = grids
    if not runs:
        return []
    return figure_output.save(sharpness_vs_rho(runs, layout="overlay"), out, "sharpness_vs_rho")


def _kendall_columns(records: list[dict], entries: list[dict]) -> dict[str, list[float]]:
    """Every scalar measure (:func:`~sharpscope.sharpness.ranking_values`) as one value per checkpoint of
    ``records``, NaN where a checkpoint lacks it."""
    from sharpscope.sharpness.suite import ranking_values

    columns: dict[str, dict[str, float]] = {}
    for entry in entries:
        for label, value in ranking_values(entry["measure"], entry["result"]).items():
            columns.setdefault(label, {})[entry["checkpoint"]] = value
    return {label: [values.get(r["path"], math.nan) for r in records] for label, values in columns.items()}


def _kendall_table(records: list[dict], entries: list[dict]) -> dict[str, float] | None:
    """Kendall tau of every scalar measure (:func:`_kendall_columns`) with the measured gaps across the
    checkpoints, NaN where a checkpoint lacks the measure; None for fewer than 2 checkpoints."""
    from sharpscope.sharpness.correlation import kendall_tau

    if len(records) < 2:
        return None
    gaps = [r["generalization_gap"] for r in records]
    return {label: kendall_tau(column, gaps) if all(math.isfinite(v) for v in column) else math.nan
            for label, column in _kendall_columns(records, entries).items()}


def _kendall_pvalues(records: list[dict], entries: list[dict], table: dict[str, float]) -> dict[str, float]:
    """Two-sided p-value of each tau of :func:`_kendall_table` (NaN where the tau is)."""
    from sharpscope.sharpness.correlation import kendall_tau_pvalue

    gaps = [r["generalization_gap"] for r in records]
    columns = _kendall_columns(records, entries)
    return {label: kendall_tau_pvalue(columns[label], gaps) if math.isfinite(tau) else math.nan
            for label, tau in table.items()}


def _write_kendall(out: Path, records: list[dict], table: dict[str, float], pvalues: dict[str, float],
                   figure_output: FigureOutput) -> list[Path]:
    """kendall_tau.json and kendall_tau.<fmt> of :func:`_kendall_table`'s table."""
    from sharpscope.io import write_json
    from sharpscope.plots.sharpness import kendall_tau_bars

    gap = ("test loss - train loss" if any(r.get("gap_units") == "loss" for r in records)
           else "test error - train error")
    document = {"num_checkpoints": len(records), "checkpoints": [r["path"] for r in records],
                "generalization_gap": [r["generalization_gap"] for r in records], "tau": table, "p_value": pvalues,
                "definition": f"Kendall tau-b between each measure and the generalization gap ({gap}, measured at "
                              "each checkpoint's weights) across checkpoints"}
    paths = [write_json(out / "kendall_tau.json", document)]
    paths += figure_output.save(kendall_tau_bars(table, num_models=len(records), pvalues=pvalues, gap=gap), out,
                                "kendall_tau")
    return paths
