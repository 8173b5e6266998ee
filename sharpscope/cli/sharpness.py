"""``sharpscope sharpness``: sharpness measures of checkpoints, and how well they rank generalization.

A thin shell over :func:`sharpscope.sharpness.run` (parse the options, call it, print the summary and where the
files went); the planning, resuming and writing live there.
"""

from __future__ import annotations

import math
from typing import Any

import click

from sharpscope.cli.options import (
    MAX_COUNT,
    FloatList,
    IntList,
    default_out,
    device_option,
    eval_set_options,
    figure_options,
    loss_option,
    model_spec_option,
    out_options,
    seed_option,
    show_progress,
)


class MeasureList(click.ParamType):
    """Measure names, comma-separated and/or repeated: ``worst,average`` or ``--measure worst --measure keskar``."""

    name = "MEASURE,..."

    def convert(self, value: Any, param, ctx) -> list[str]:
        from sharpscope.errors import unknown_name_error
        from sharpscope.sharpness.suite import MEASURES

        if isinstance(value, list):
            return value
        names = [v.strip() for v in str(value).split(",") if v.strip()]
        if not names:
            self.fail(f"expected measure names like worst,average, got {value!r}", param, ctx)
        for name in names:
            if name not in MEASURES:
                self.fail(str(unknown_name_error("measure", name, MEASURES)), param, ctx)
        return names


@click.command(context_settings={"show_default": True})
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--measure", "measures", multiple=True, type=MeasureList(), default=["worst"],
              help="Measures to compute, comma-separated or repeated.  " + (
                  "worst: worst-case (ascent) on --m x --rho; average: average-case (noise) on --m x --rho; "
                  "adaptive: worst-case with c = |w|+eta on --m x --adaptive-rho; keskar: Keskar et al. 2017 "
                  "eps-sharpness for each --keskar-eps; pacbayes / pacbayes-mag: Jiang et al. 2020 PAC-Bayes "
                  "flatness 1/sigma'^2 (plain / magnitude-aware)."))
@click.option("--m", "m_values", type=IntList(), default="1,8,32,128",
              help="Samples per chunk B (m-sharpness, Foret et al. 2021 sec. 4.1); each must be <= --num-samples.")
@click.option("--rho", "rho_values", type=FloatList(positive=True), default="0.01,0.05,0.1",
              help="Radii of worst (Foret et al. 2021's SAM radii). For --p inf use far smaller ones (~1e-3).")
@click.option("--average-rho", "average_rho_values", type=FloatList(positive=True), default="0.01,0.02,0.05",
              help="Noise scales of average, per weight (the noise's norm is rho * sqrt(#weights): the worst-case "
                   "radii as noise break the network; SuiteConfig says why).")
@click.option("--adaptive-rho", "adaptive_rho_values", type=FloatList(positive=True), default="0.1,0.2,0.5",
              help="Radii of adaptive (relative to |w|+eta). Smaller than ASAM's training rho 0.5-2, which "
                   "breaks the network as a measure (SuiteConfig says why); for --p inf use ~50x smaller (0.002).")
@click.option("--p", "p", type=click.Choice(["2", "inf"]), default="2",
              help="Norm of the ball (worst, adaptive); Gaussian (2) or uniform (inf) noise (average).")
@click.option("--steps", type=click.IntRange(min=1), default=20,
              help="Ascent steps of worst/adaptive/keskar (1 = SAM's one-step estimate; 20 as Andriushchenko "
                   "et al. 2023).")
@click.option("--num-draws", type=click.IntRange(min=1), default=20, help="Noise draws per chunk of average.")
@click.option("--eta", type=click.FloatRange(min=0, min_open=True), default=0.01, help="c = |w| + eta of adaptive.")
@click.option("--max-chunks", type=click.IntRange(min=1), default=None,
              help="Use at most this many chunks per m (bounds the cost of small m) [default: all].")
@click.option("--keskar-eps", type=FloatList(positive=True), default="0.001,0.0005",
              help="Box sizes of keskar (Keskar et al. 2017 use 1e-3 and 5e-4).")
@click.option("--pacbayes-draws", type=click.IntRange(min=1), default=10, help="Noise draws per sigma of pacbayes.")
@click.option("--gap-samples", type=click.IntRange(min=1, max=MAX_COUNT), default=None,
              help="Measure the generalization gap on the first N samples of each of the train and test splits "
                   "(bounds its cost on big datasets; more than a split has = all of it) [default: whole splits].")
@click.option("--save-every", type=click.FloatRange(min=0), default=30.0, metavar="SECONDS",
              help="Seconds between saves of a grid measure's finished chunks to sharpness.partial.npz (0: after "
                   "every block of chunks); a rerun resumes from them.")
@model_spec_option
@loss_option
@eval_set_options
@seed_option
@device_option
@out_options
@figure_options
@click.pass_context
def command(ctx, checkpoints, measures, m_values, rho_values, average_rho_values, adaptive_rho_values, p, steps, num_draws, eta,
            max_chunks, keskar_eps, pacbayes_draws, gap_samples, save_every, model_spec, loss, dataset, split,
            num_samples, batch_size, data_dir, seed, device, out, overwrite, figure_output):
    """Sharpness of checkpoints: m-sharpness grids, Keskar and PAC-Bayes measures, and their Kendall tau with
    the generalization gap.

    \b
    Examples:
      sharpscope sharpness runs/*/final.pt --m 1,8,32,128 --rho 0.01,0.05,0.1 --out results/sharpness
      sharpscope sharpness runs/sgd runs/sam --measure worst,keskar,pacbayes --steps 5 --out results/traj
      sharpscope sharpness runs/sam/final.pt --measure adaptive --p inf --adaptive-rho 0.001,0.002 --out r/ada

    CHECKPOINTS are checkpoint files or run folders (all their checkpoints). Every measure uses the same fixed
    evaluation set (--split, first --num-samples samples, no augmentation), the model in eval mode and the loss
    the run recorded (train --loss; plain cross-entropy, no label smoothing, when none) or --loss. Chunks of m
    samples are cut from a --seed shuffled copy of it; the last num-samples mod m samples are left out.

    Each checkpoint's generalization gap = test error - train error is measured at its weights (eval mode, no
    augmentation) on the train and test splits of its dataset (--dataset): whole splits, or the first
    --gap-samples of each; for a loss without accuracy (regression, language models) it is test loss - train
    loss. (The metrics' train_acc a trainer logs is a running average over an epoch of moving weights and
    augmented data, so the gap it gives is biased; it is kept as metrics_generalization_gap.)

    Writes into --out: sharpness.json (config, provenance, per checkpoint: train_error, test_error,
    generalization_gap; per checkpoint/measure/m/rho: value, stderr, steps), sharpness.npz,
    sharpness_vs_rho.png (every checkpoint's lines on shared axes, one panel per measure) and, with two or more
    checkpoints, kendall_tau.json/.png (also printed); figures in each --format.

    Rerunning the same command resumes: sharpness.json is rewritten after each (checkpoint, measure), and inside
    a worst/average/adaptive measure the finished chunks are saved to sharpness.partial.npz every --save-every
    seconds (the final numbers are those of an uninterrupted run).

    A measure whose block of chunks would not fit in memory (MemAvailable, or free CUDA memory; capped by
    $SHARPSCOPE_MEMORY_LIMIT, e.g. 4GB) runs in smaller blocks, or is refused before allocating when one chunk
    does not fit.
    """
    from sharpscope.sharpness.runner import run

    result = run(
        list(checkpoints), measures=[name for group in measures for name in group], m=m_values, rho=rho_values,
        adaptive_rho=adaptive_rho_values, average_rho=average_rho_values, p=math.inf if p == "inf" else 2.0, steps=steps, num_draws=num_draws,
        eta=eta, max_chunks=max_chunks, keskar_eps=keskar_eps, pacbayes_draws=pacbayes_draws,
        gap_samples=gap_samples, model_spec=model_spec, loss=loss, dataset=dataset, split=split,
        num_samples=num_samples, batch_size=batch_size, data_dir=data_dir, seed=seed, device=device,
        out=out or default_out("sharpness", [str(c) for c in checkpoints]), overwrite=overwrite,
        figure_output=figure_output, save_every=save_every, progress=show_progress(ctx),
    )
    if not result.written:  # a rank other than 0 under torchrun: rank 0 prints
        return
    _print_summary(list(result.checkpoints), list(result.entries), result.kendall_tau, result.reused,
                   result.kendall_p_value)
    if result.resumed_chunks:
        click.echo(f"resumed an interrupted measure: {result.resumed_chunks:g} chunk(s) taken from its partial file")
    for path in result.written:
        click.echo(f"wrote {path}")


def _print_summary(records: list[dict], entries: list[dict], table: dict[str, float] | None, reused: int,
                   pvalues: dict[str, float] | None = None) -> None:
    for record in records:
        if record.get("gap_units") == "loss":  # a loss without accuracy: the gap in loss units
            click.echo(f"{record['label']}  (train loss {record['train_loss']:.4g}, test loss "
                       f"{record['test_loss']:.4g}, generalization gap {record['generalization_gap']:+.4g} in loss)")
        else:
            click.echo(f"{record['label']}  (train error {record['train_error']:.4f}, test error "
                       f"{record['test_error']:.4f}, generalization gap {record['generalization_gap']:+.4f})")
        for entry in (e for e in entries if e["checkpoint"] == record["path"]):
            result, name = entry["result"], entry["measure"]
            if result["kind"] == "grid":
                header = "  ".join(f"rho={rho:<8g}" for rho in result["rho_values"])
                click.echo(f"  {name:<9} {header}")
                for m, values in zip(result["m_values"], result["values"]):
                    cells = "  ".join(f"{'nan' if v is None else format(v, '.4g'):<12}" for v in values)
                    click.echo(f"    m={m:<5} {cells}")
            elif result["kind"] == "keskar":
                cells = ", ".join(f"eps={e:g}: {v:.4g}" for e, v in zip(result["eps_values"], result["values"]))
                click.echo(f"  {name:<9} {cells}")
            else:
                flag = "" if result["bracketed"] else " (at the end of the search range)"
                click.echo(f"  {name:<9} sigma'={result['sigma']:.4g}  1/sigma'^2={result['measure']:.4g}{flag}")
    if table is None and len(records) > 1:
        click.echo(f"Kendall tau with the generalization gap: not computed over {len(records)} checkpoints (over two "
                   "it is +-1 whatever the measure, at p = 1); give 3 or more, e.g. a run folder's trajectory")
    if table is not None:
        click.echo(f"Kendall tau with the generalization gap ({len(records)} checkpoints):")
        width = max(map(len, table))
        for label, tau in table.items():
            p = (pvalues or {}).get(label, math.nan)
            click.echo(f"  {label:<{width}}  {'n/a' if math.isnan(tau) else format(tau, '+.3f')}"
                       + ("" if math.isnan(p) else f"  (p = {p:.2g})"))
    if reused:
        click.echo(f"reused {reused} result(s) from a previous run with the same configuration")
