"""The sharpness figures (results in, figure out) and the measure suite the CLI runs (JSON-ready records)."""

import json
import math

import numpy as np
import pytest
from torch import nn

from sharpness_cases import tiny_mlp
from sharpscope.errors import SharpscopeError
from sharpscope.io import to_json
from sharpscope.plots.sharpness import kendall_tau_bars, sharpness_vs_rho
from sharpscope.sharpness import SharpnessResult, SuiteConfig, m_sharpness, ranking_values, run_measure

CE = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def grids():
    out = {}
    for label, seed in (("sgd", 0), ("sam", 3)):
        model, data = tiny_mlp(seed=seed, n=32)
        out[label] = {
            "worst": m_sharpness(model, CE, data, m_values=[1, 8], rho_values=[0.05, 0.1, 0.2], steps=2),
            "adaptive": m_sharpness(model, CE, data, m_values=[8], rho_values=[0.5, 1.0], adaptive=True, steps=2),
        }
    return out


def test_sharpness_vs_rho_one_line_per_m_shared_axes_per_row(grids):
    fig = sharpness_vs_rho(grids)
    axes = np.array(fig.axes).reshape(2, 2)  # rows: worst, adaptive; columns: sgd, sam
    assert [len(ax.get_lines()) for ax in axes.ravel()] == [2, 2, 1, 1]
    np.testing.assert_allclose(axes[0, 0].get_lines()[1].get_ydata(), grids["sgd"]["worst"].values[1])
    np.testing.assert_allclose(axes[0, 1].get_lines()[0].get_xdata(), [0.05, 0.1, 0.2])
    assert axes[0, 0].get_ylim() == axes[0, 1].get_ylim()  # SGD and SAM read on the same scale
    assert axes[0, 0].get_ylim() != axes[1, 0].get_ylim()  # rows (measures) scale on their own
    assert "sam" in axes[0, 1].get_title() and "adaptive" in axes[1, 0].get_title()
    # the same m has the same colour in every panel
    assert axes[0, 0].get_lines()[1].get_color() == axes[1, 1].get_lines()[0].get_color()


def test_sharpness_vs_rho_accepts_plain_results_and_marks_missing_panels(grids):
    fig = sharpness_vs_rho({"sgd": grids["sgd"]["worst"], "sam": grids["sam"]})
    axes = np.array(fig.axes).reshape(2, 2)
    assert "not computed" in axes[1, 0].texts[0].get_text()


def test_panel_titles_say_step_and_draw_in_the_singular_for_one(grids):
    model, data = tiny_mlp(n=16)
    one = {"worst": m_sharpness(model, CE, data, m_values=[8], rho_values=[0.1], steps=1),
           "average": m_sharpness(model, CE, data, m_values=[8], rho_values=[0.1], measure="average", num_draws=1)}
    titles = [ax.get_title() for ax in sharpness_vs_rho({"one": one, "sgd": grids["sgd"]}).axes]
    assert "worst-case (p=2, 1 step)" in titles[0] and "worst-case (p=2, 2 steps)" in titles[1]
    assert "average-case (p=2, 1 draw)" in titles[2]  # rows: worst, average, adaptive


def test_kendall_tau_bars_fixed_axis_and_labels():
    fig = kendall_tau_bars({"a": 0.5, "b": -1.0, "c": float("nan")}, num_models=5)
    ax = fig.axes[0]
    assert [round(p.get_width(), 6) for p in ax.patches] == [0.5, -1.0, 0.0]
    assert ax.get_xlim() == (-1.15, 1.15)
    assert [t.get_text() for t in ax.texts] == ["+0.50", "-1.00", "n/a"]
    assert "(5 models)" in ax.get_title()


def test_empty_figures_are_refused():
    with pytest.raises(SharpscopeError, match="nothing to plot: give at least one sharpness result"):
        sharpness_vs_rho({})
    with pytest.raises(SharpscopeError, match="nothing to plot: the Kendall tau table is empty"):
        kendall_tau_bars({})


def test_result_round_trips_through_json(grids):
    result = grids["sgd"]["worst"]
    back = SharpnessResult.from_dict(json.loads(to_json(result.to_dict())))
    np.testing.assert_array_equal(back.values, result.values)
    assert np.isnan(back.stderr).tolist() == np.isnan(result.stderr).tolist()
    assert back.m_values == result.m_values and back.p == result.p and back.steps == result.steps


def test_linf_p_survives_json():
    model, data = tiny_mlp(n=16)
    result = m_sharpness(model, CE, data, m_values=[16], rho_values=[1e-3], p=math.inf, steps=1)
    back = SharpnessResult.from_dict(json.loads(to_json(result.to_dict())))
    assert back.p == math.inf
    assert np.isnan(back.stderr[0, 0])  # one chunk: no standard error, written as null, read back as NaN


def test_suite_records_are_json_and_rank_larger_as_sharper():
    model, data = tiny_mlp(n=32)
    config = SuiteConfig(measures=("worst", "keskar", "pacbayes-mag"), m_values=(8,), rho_values=(0.05, 0.1),
                         steps=2, keskar_eps=(1e-3,), pacbayes_draws=2)
    records = {name: json.loads(to_json(run_measure(name, model, CE, data, config))) for name in config.measures}
    grid = m_sharpness(model, CE, data, m_values=[8], rho_values=[0.05, 0.1], steps=2)
    assert records["worst"]["values"] == grid.values.tolist()
    values = {k: v for name, record in records.items() for k, v in ranking_values(name, record).items()}
    assert list(values) == ["worst m=8 rho=0.05", "worst m=8 rho=0.1", "keskar eps=0.001",
                            "pacbayes-mag 1/sigma^2"]
    assert records["pacbayes-mag"]["magnitude_aware"] is True
    np.testing.assert_allclose(values["pacbayes-mag 1/sigma^2"], 1 / records["pacbayes-mag"]["sigma"] ** 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(measures=("wrost",)), "unknown sharpness measure 'wrost'; did you mean 'worst'"),
        (dict(measures=()), "measures is empty"),
        (dict(measures=("worst", "worst")), "measures lists a name twice"),
    ],
)
def test_suite_config_errors(kwargs, message):
    with pytest.raises(SharpscopeError, match=message):
        SuiteConfig(**kwargs)


def test_run_measure_unknown_name():
    model, data = tiny_mlp(n=8)
    with pytest.raises(SharpscopeError, match="unknown sharpness measure 'keskr'"):
        run_measure("keskr", model, CE, data, SuiteConfig())
