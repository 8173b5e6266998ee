"""Sharpness measures of a minimum (DESIGN.md section 6).

Every measure is a function of ``(model, loss_fn, data)`` (PAC-Bayes: ``(model, data)``, it uses accuracy) with
the model evaluated in eval mode on a fixed evaluation set, cut into disjoint chunks of ``m`` samples:

* :func:`worst_case_sharpness` / :func:`m_sharpness`: ``E_B max_{||delta/c||_p <= rho} L_B(w+delta) - L_B(w)``
  by projected Auto-PGD ascent (1 step = SAM's estimate), p = 2 or inf, plain or adaptive ``c = |w| + eta``;
  ``m_sharpness`` runs an ``m x rho`` grid (Foret et al. 2021, section 4.1);
* :func:`average_case_sharpness`: ``E_B E_delta L_B(w + rho c xi) - L_B(w)``, Gaussian or uniform ``xi``;
* :func:`keskar_sharpness`: Keskar et al. 2017's epsilon-sharpness;
* :func:`pac_bayes_flatness`: Jiang et al. 2020's PAC-Bayes ``sigma'`` and ``1/sigma'^2``;
* :func:`generalization_gap`: the gap those are ranked against, test error - train error measured at ``w``;
* :func:`kendall_tau` / :func:`kendall_tau_table`: rank correlation of a measure with the generalization gap;
* :func:`run_measure` with a :class:`SuiteConfig`: any of the above by name, as a JSON-ready record;
* :func:`run`: ``sharpscope sharpness`` as a function (checkpoints in, results and figures written to a folder,
  resumable mid-measure), returning a :class:`SharpnessRun`.
"""

from sharpscope.sharpness.average_case import average_case_sharpness
from sharpscope.sharpness.correlation import kendall_tau, kendall_tau_table
from sharpscope.sharpness.generalization import GeneralizationGap, generalization_gap
from sharpscope.sharpness.keskar import keskar_sharpness
from sharpscope.sharpness.pac_bayes import pac_bayes_flatness, top1_accuracy
from sharpscope.sharpness.result import PacBayesResult, SharpnessEstimate, SharpnessResult
from sharpscope.sharpness.suite import MEASURES, SuiteConfig, ranking_values, run_measure
from sharpscope.sharpness.runner import SharpnessRun, run
from sharpscope.sharpness.worst_case import m_sharpness, worst_case_sharpness

__all__ = [
    # measures
    "worst_case_sharpness",
    "m_sharpness",
    "average_case_sharpness",
    "keskar_sharpness",
    "pac_bayes_flatness",
    "top1_accuracy",
    # correlation with generalization
    "generalization_gap",
    "GeneralizationGap",
    "kendall_tau",
    "kendall_tau_table",
    # several measures of one model (what the CLI runs)
    "MEASURES",
    "SuiteConfig",
    "run_measure",
    "ranking_values",
    # the command as a function
    "run",
    "SharpnessRun",
    # results
    "SharpnessEstimate",
    "SharpnessResult",
    "PacBayesResult",
]
