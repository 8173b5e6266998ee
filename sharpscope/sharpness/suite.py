"""Several sharpness measures of one model under one configuration, as JSON-ready records.

This is what ``sharpscope sharpness`` runs per checkpoint (and what a notebook can call on its own model): a
:class:`SuiteConfig` names the measures and their grids; :func:`run_measure` computes one measure and returns a
plain dict (numbers and lists only) that :mod:`json` writes and reads back unchanged; :func:`ranking_values`
flattens such a record into the scalar measures that are correlated with the generalization gap.

Measures (names used by the CLI's ``--measure``):

======================  ==========================================================================================
``worst``               worst-case sharpness, l_p ball (``p``), on the ``m_values x rho_values`` grid
``average``             average-case sharpness (Gaussian noise for p = 2, uniform for p = inf), ``m_values x
                        average_rho_values``
``adaptive``            worst-case sharpness with ``c = |w| + eta``, on ``m_values x adaptive_rho_values``
``keskar``              Keskar et al. 2017 epsilon-sharpness, full evaluation set, for each of ``keskar_eps``
``pacbayes``            Jiang et al. 2020 PAC-Bayes flatness: ``sigma'`` and ``1 / sigma'^2``
``pacbayes-mag``        its magnitude-aware version (noise std ``sqrt(sigma^2 w^2 + 1e-3^2)``)
======================  ==========================================================================================
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from sharpscope.errors import SharpscopeError, unknown_name_error

__all__ = ["MEASURES", "SuiteConfig", "run_measure", "ranking_values", "progress_total"]

#: measure name -> one-line description (the CLI's --measure help).
MEASURES: dict[str, str] = {
    "worst": "worst-case sharpness on the --m x --rho grid (projected ascent; 1 step = SAM's estimate)",
    "average": "average-case sharpness (random perturbations) on the --m x --rho grid",
    "adaptive": "adaptive worst-case sharpness (c = |w| + eta) on the --m x --adaptive-rho grid",
    "keskar": "Keskar et al. 2017 eps-sharpness on the whole evaluation set, for each --keskar-eps",
    "pacbayes": "Jiang et al. 2020 PAC-Bayes flatness 1/sigma'^2",
    "pacbayes-mag": "magnitude-aware PAC-Bayes flatness 1/sigma'^2",
}
_GRID = {"worst", "average", "adaptive"}


@dataclass(frozen=True)
class SuiteConfig:
    """Which measures to run and their settings (defaults: Foret et al. 2021's m-sharpness grid, Andriushchenko
    et al. 2023's 20 ascent steps / 20 noise draws, Keskar et al. 2017's epsilons, Jiang et al. 2020's 10 draws).

    Adaptive radii: ASAM (Kwon et al. 2021) *trains* with adaptive rho 0.5-2, but as a *measure* those radii
    leave the basin: ``||delta / (|w| + eta)||_2 <= 2`` lets every weight move by ~its own size, and the
    worst-case loss increase is then dominated by the network breaking, not by the curvature at ``w`` (12-24 nats
    were reported in issue 18; on the README's 3-epoch digits MLP, m = 8, 20 steps: 0.28 nats at rho 0.5, 0.97 at
    1, 4.6 at 2). Andriushchenko et al. 2023 ("A modern look at the relationship between sharpness and
    generalization", section 3) measure adaptive sharpness with radii far below the training ones, where the
    increase is a small, local quantity. The defaults 0.1, 0.2, 0.5 (l2) keep it there: on the same SGD run the
    increase is 0.030 / 0.071 / 0.28 nats at m = 8 and 0.010 / 0.023 / 0.098 at m = 128 (its clean loss: 0.068).
    For ``p = inf`` (a box: every coordinate moves at once) radii ~50 times smaller give the same increase: on
    that run 0.002 -> 0.038 nats, 0.01 -> 0.36 at m = 8 (Andriushchenko et al.'s adaptive l-inf radii are ~1e-3).

    Average-case scales: the noise is ``rho * xi`` with ``xi ~ N(0, I)`` per weight, so its norm is
    ``rho * sqrt(n)`` (22 at rho 0.1 for 50k weights), far outside the worst-case ball of the same rho: the
    worst-case radii as noise scales broke the 3-epoch MLP (8 nats at 0.1). The defaults 0.01, 0.02, 0.05 stay
    local: on the README's 10-epoch digits ConvNets (m = 8, 20 draws) 5e-4 / 3e-3 / 0.09 nats for SGD and
    9e-4 / 4e-3 / 0.08 for SAM; on the 3-epoch MLP about 0.02 / 0.08 / 0.5.
    """

    measures: tuple[str, ...] = ("worst",)  # names from MEASURES, in the order they run
    m_values: tuple[int, ...] = (1, 8, 32, 128)  # chunk sizes of the grid measures
    rho_values: tuple[float, ...] = (0.01, 0.05, 0.1)  # radii of "worst" (Foret et al. 2021's SAM radii)
    average_rho_values: tuple[float, ...] = (0.01, 0.02, 0.05)  # noise scales of "average" (per weight, see above)
    adaptive_rho_values: tuple[float, ...] = (0.1, 0.2, 0.5)  # radii of "adaptive" (l2, relative to |w|+eta)
    p: float = 2.0  # 2 or inf: the ball of "worst"/"adaptive", the noise of "average" (Gaussian / uniform)
    steps: int = 20  # ascent steps of "worst", "adaptive" and "keskar"
    num_draws: int = 20  # noise draws per chunk of "average"
    eta: float = 0.01  # c = |w| + eta of "adaptive"
    max_chunks: int | None = None  # at most this many chunks per m (None: all N // m)
    keskar_eps: tuple[float, ...] = (1e-3, 5e-4)  # box sizes of "keskar"
    pacbayes_draws: int = 10  # noise draws per sigma of "pacbayes"/"pacbayes-mag"
    seed: int = 0  # sample permutation, random draws
    batch_size: int = 256  # samples per forward pass (memory only)

    def __post_init__(self) -> None:
        if not self.measures:
            raise SharpscopeError(f"measures is empty; choose from {', '.join(MEASURES)}")
        for name in self.measures:
            if name not in MEASURES:
                raise unknown_name_error("sharpness measure", name, MEASURES)
        if len(set(self.measures)) != len(self.measures):
            raise SharpscopeError(f"measures lists a name twice: {', '.join(self.measures)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists, ``p`` as 2.0 or "inf")."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        data["p"] = "inf" if self.p == math.inf else float(self.p)
        return data


def _radii(name: str, config: SuiteConfig) -> tuple[float, ...]:
    """The rho grid of grid measure ``name``."""
    return {"adaptive": config.adaptive_rho_values, "average": config.average_rho_values}.get(name, config.rho_values)


def progress_total(name: str, config: SuiteConfig, num_samples: int) -> int | None:
    """Units the ``on_progress`` callback of :func:`run_measure` will count for ``name`` (None: not known ahead)."""
    if name in _GRID:
        rhos = _radii(name, config)
        chunks = [num_samples // m if config.max_chunks is None else min(num_samples // m, config.max_chunks)
                  for m in config.m_values]
        return sum(chunks) * len(rhos)
    if name == "keskar":
        return len(config.keskar_eps)
    return None


def run_measure(
    name: str,
    model: nn.Module,
    loss_fn: Any,
    batches: Any,
    config: SuiteConfig,
    *,
    on_progress: Callable[[float], Any] | None = None,
    shard: tuple[int, int] | None = None,
    partial: Any = None,
) -> dict[str, Any]:
    """Compute measure ``name`` of ``model`` on ``batches`` with ``config``; return a JSON-ready record.

    ``shard=(rank, world_size)`` splits the chunks of the grid measures (worst, average, adaptive) over the ranks
    of a ``torch.distributed`` job; ``keskar`` and the PAC-Bayes bisections are one sequential search over the
    whole set, which every rank runs identically.

    ``partial`` (a :class:`~sharpscope.sharpness.partial.PartialResults`, one process only) keeps the finished
    blocks of chunks of the grid measures so an interrupted call resumes mid-measure (:func:`m_sharpness`);
    the other measures ignore it.

    Records: grid measures -> ``{"kind": "grid", **SharpnessResult.to_dict()}``; ``keskar`` ->
    ``{"kind": "keskar", "eps_values", "values", "clean_loss", "steps"}``; PAC-Bayes ->
    ``{"kind": "pacbayes", **PacBayesResult.to_dict()}``.
    """
    from sharpscope.sharpness import keskar_sharpness, m_sharpness, pac_bayes_flatness

    if name not in MEASURES:
        raise unknown_name_error("sharpness measure", name, MEASURES)
    common = dict(seed=config.seed, batch_size=config.batch_size, on_progress=on_progress)
    if name in _GRID:
        adaptive = name == "adaptive"
        result = m_sharpness(
            model, loss_fn, batches, m_values=config.m_values,
            rho_values=_radii(name, config),
            measure="average" if name == "average" else "worst", p=config.p, adaptive=adaptive, eta=config.eta,
            steps=config.steps, num_draws=config.num_draws, max_chunks=config.max_chunks, shard=shard, partial=partial,
            **common,
        )
        return {"kind": "grid", **result.to_dict()}
    if name == "keskar":
        estimates = [keskar_sharpness(model, loss_fn, batches, eps=eps, steps=config.steps, **common)
                     for eps in config.keskar_eps]
        return {"kind": "keskar", "eps_values": list(config.keskar_eps), "values": [e.value for e in estimates],
                "clean_loss": estimates[0].clean_loss, "steps": config.steps, "num_samples": estimates[0].m}
    result = pac_bayes_flatness(model, batches, magnitude_aware=name == "pacbayes-mag", num_draws=config.pacbayes_draws,
                                seed=config.seed, batch_size=config.batch_size,
                                on_progress=on_progress)
    return {"kind": "pacbayes", **result.to_dict()}


def ranking_values(name: str, record: dict[str, Any]) -> dict[str, float]:
    """The scalar measures in a record, labelled: ``"worst m=8 rho=0.05"``, ``"keskar eps=0.001"``,
    ``"pacbayes 1/sigma^2"``. Larger always means sharper, so a positive Kendall tau with the generalization gap
    means "sharper models generalize worse"."""
    kind = record["kind"]
    if kind == "grid":
        return {f"{name} m={m} rho={rho:g}": (math.nan if value is None else float(value))
                for m, row in zip(record["m_values"], record["values"])
                for rho, value in zip(record["rho_values"], row)}
    if kind == "keskar":
        return {f"{name} eps={eps:g}": float(value) for eps, value in zip(record["eps_values"], record["values"])}
    return {f"{name} 1/sigma^2": float(record["measure"])}
