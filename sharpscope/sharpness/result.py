"""Result objects of the sharpness measures: plain numbers and NumPy arrays, so they save as JSON + ``.npz``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SharpnessEstimate", "SharpnessResult", "PacBayesResult"]


def _p_to_json(p: float) -> float | str:
    return "inf" if p == math.inf else float(p)


def _p_from_json(p: float | str) -> float:
    return math.inf if p == "inf" else float(p)


@dataclass(frozen=True, eq=False)
class SharpnessEstimate:
    """One sharpness value (one ``m``, one ``rho``) and its spread over the chunks of ``m`` samples."""

    measure: str  # "worst" (ascent max), "average" (random perturbations) or "keskar"
    value: float  # mean over chunks of the per-chunk sharpness (Keskar: 100 * increase / (1 + loss))
    stderr: float  # standard error of that mean: std over chunks (ddof=1) / sqrt(num_chunks); NaN for one chunk
    m: int  # samples per chunk (the batch B of the definition)
    rho: float  # radius of the perturbation set (Keskar: epsilon)
    p: float  # 2.0 or inf: the norm of the ball (average-case: 2 = Gaussian, inf = uniform noise)
    adaptive: bool  # perturbation scaled elementwise by c = |w| + eta
    eta: float  # the additive term of c (unused when not adaptive)
    steps: int  # ascent steps (worst-case/Keskar) or noise draws per chunk (average-case)
    num_chunks: int  # chunks averaged over
    clean_loss: float  # mean over chunks of L_B(w)
    chunk_values: np.ndarray = field(repr=False)  # (num_chunks,) per-chunk sharpness
    trace: np.ndarray = field(repr=False)  # (steps + 1,) mean over chunks of the best value after each step
    # (worst-case/Keskar; trace[0] is the starting point, trace[-1] == value); empty for average-case
    perturbation: list | None = field(default=None, repr=False)  # best perturbation per chunk, a list of
    # (num_chunks, *p.shape) tensors, only when asked for (return_perturbation=True); None otherwise

    def to_dict(self) -> dict[str, Any]:
        """The scalar fields as a JSON-ready dict (arrays and the perturbation left out)."""
        return {
            "measure": self.measure, "value": self.value, "stderr": self.stderr, "m": self.m, "rho": self.rho,
            "p": _p_to_json(self.p), "adaptive": self.adaptive, "eta": self.eta, "steps": self.steps,
            "num_chunks": self.num_chunks, "clean_loss": self.clean_loss,
        }


@dataclass(frozen=True, eq=False)
class SharpnessResult:
    """Sharpness on an ``m x rho`` grid (Foret et al. 2021, section 4.1: m-sharpness)."""

    measure: str  # "worst" or "average"
    m_values: tuple[int, ...]  # chunk sizes, rows of the arrays
    rho_values: tuple[float, ...]  # radii, columns of the arrays
    values: np.ndarray  # (len(m_values), len(rho_values)) mean sharpness over chunks
    stderr: np.ndarray  # (len(m_values), len(rho_values)) its standard error (NaN where one chunk)
    clean_loss: np.ndarray  # (len(m_values), len(rho_values)) mean L_B(w) over the chunks used
    num_chunks: np.ndarray  # (len(m_values),) chunks per m
    p: float  # 2.0 or inf
    adaptive: bool  # c = |w| + eta instead of 1
    eta: float  # additive term of c
    steps: int  # ascent steps (worst) or noise draws (average)
    num_samples: int  # size of the evaluation set the chunks were cut from
    estimates: tuple[SharpnessEstimate, ...] = field(repr=False)  # the individual cells, row-major

    def __repr__(self) -> str:
        """A small table, one line per m: ``value +- stderr`` at each rho, and the chunks and clean loss."""
        kind = ("adaptive " if self.adaptive else "") + self.measure
        p = "inf" if self.p == float("inf") else f"{self.p:g}"
        what = "steps" if self.measure == "worst" else "draws"
        lines = [f"SharpnessResult({kind}, p={p}, {self.steps} {what}, {self.num_samples} samples; "
                 f"rho = {', '.join(f'{r:g}' for r in self.rho_values)}"]
        for i, m in enumerate(self.m_values):
            cells = ", ".join(f"{v:.4g} +- {s:.2g}" for v, s in zip(self.values[i], self.stderr[i]))
            lines.append(f"  m={m}: {cells}  ({int(self.num_chunks[i])} chunks, clean loss "
                         f"{float(self.clean_loss[i][0]):.4g})")
        return "\n".join(lines) + ")"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the grid as nested lists (NaN becomes null when written by sharpscope.io), p as
        2.0 or the string "inf" (JSON has no infinity)."""
        return {
            "measure": self.measure, "m_values": list(self.m_values), "rho_values": list(self.rho_values),
            "values": self.values.tolist(), "stderr": self.stderr.tolist(), "clean_loss": self.clean_loss.tolist(),
            "num_chunks": self.num_chunks.tolist(), "p": _p_to_json(self.p), "adaptive": self.adaptive,
            "eta": self.eta, "steps": self.steps, "num_samples": self.num_samples,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SharpnessResult:
        """Rebuild a result from :meth:`to_dict` output (e.g. read back from ``sharpness.json``); nulls become NaN.

        The individual cells (``estimates``) are not stored, so they come back empty.
        """
        def array(key: str) -> np.ndarray:
            return np.array(data[key], dtype=np.float64)  # None -> nan

        return cls(
            measure=data["measure"], m_values=tuple(int(m) for m in data["m_values"]),
            rho_values=tuple(float(r) for r in data["rho_values"]), values=array("values"), stderr=array("stderr"),
            clean_loss=array("clean_loss"), num_chunks=np.array(data["num_chunks"], dtype=np.int64),
            p=_p_from_json(data["p"]), adaptive=bool(data["adaptive"]), eta=float(data["eta"]),
            steps=int(data["steps"]), num_samples=int(data["num_samples"]), estimates=(),
        )


@dataclass(frozen=True)
class PacBayesResult:
    """PAC-Bayes flatness (Jiang et al. 2020, "Fantastic generalization measures", sections C.3/C.4)."""

    sigma: float  # sigma': the largest noise scale found whose mean accuracy drop is <= target_drop
    measure: float  # 1 / sigma'^2 (larger = sharper), the quantity Jiang et al. correlate with the gap
    clean_accuracy: float  # accuracy at w on the evaluation set
    accuracy_drop: float  # mean accuracy drop measured at sigma
    target_drop: float  # the allowed drop (0.1 in Jiang et al.)
    magnitude_aware: bool  # noise std sqrt(sigma^2 w_i^2 + eps^2) instead of sigma
    eps: float  # the additive term of the magnitude-aware std
    num_draws: int  # noise draws averaged per sigma (the same draws for every sigma)
    evaluations: int  # sigmas evaluated by the search
    bracketed: bool  # False when the answer is an end of sigma_range (the true sigma' lies outside it)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dict(self.__dict__)
