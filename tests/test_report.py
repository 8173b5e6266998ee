"""The report's summary logic: standard errors, seed aggregation and the "resolved" verdict, on hand-made numbers."""

import math
from pathlib import Path

import pytest

from sharpscope.report import Estimate, Run, headline_m, resolution, seed_groups, _over_seeds


def test_resolution_compares_the_extremes_in_standard_errors_of_their_difference():
    # 0.0535 +- 0.014 vs 0.0432 +- 0.017: the report's old headline, 0.47 sigma apart -> not resolved
    assert resolution([Estimate(0.0535, 0.014), Estimate(0.0432, 0.017)]) == "not resolved (0.5σ)"
    assert resolution([Estimate(8.97, 0.34), Estimate(7.85, 0.21)]) == "resolved (2.8σ)"
    assert resolution([Estimate(1.63, 0.0), Estimate(1.36, 0.0)]) == "resolved (exact)"
    assert resolution([Estimate(1.0, math.nan), Estimate(2.0, 0.1)]) == "-"  # unknown uncertainty: no verdict
    assert resolution([Estimate(1.0, 0.1)]) == "-"
    # three runs: the largest against the smallest (5 +- 10 vs 1 +- 0.1), whatever lies between
    assert resolution([Estimate(1.0, 0.1), Estimate(5.0, 10.0), Estimate(2.0, 0.1)]) == "not resolved (0.4σ)"


def test_mean_over_seeds_uses_the_spread_between_seeds():
    mean = _over_seeds([Estimate(1.0, 0.001), Estimate(2.0, 0.001), Estimate(3.0, 0.001)])
    assert mean.value == pytest.approx(2.0) and mean.stderr == pytest.approx(1.0 / math.sqrt(3))
    assert _over_seeds([Estimate(4.0, 0.5)]).value == 4.0


def test_headline_m_leaves_m_1_out():
    assert headline_m([1, 8, 32, 128]) == 8
    assert headline_m([1, 16, 4]) == 16
    assert headline_m([1, 2]) == 2


def test_seed_groups_put_runs_that_differ_only_in_seed_together():
    def run(name, **config):
        return Run(label=name, path=Path(name), config={"optimizer": "sgd", "rho": 0.05, "seed": 0, **config},
                   environment={}, metrics=[])

    runs = [run("sgd0"), run("sam0", optimizer="sam"), run("sgd1", seed=1), run("sam1", optimizer="sam", seed=1)]
    assert [[r.label for r in g] for g in seed_groups(runs)] == [["sgd0", "sgd1"], ["sam0", "sam1"]]


def test_estimate_text_shows_the_error_only_when_known():
    assert Estimate(0.9861, 0.0062).text(scale=100) == "98.61 ± 0.62"
    assert Estimate(1.3594, 0.0).text() == "1.359"
    assert Estimate(math.nan).text() == "-"


def test_png_display_width_is_the_printed_size_at_96_css_pixels_per_inch(tmp_path):
    from matplotlib.figure import Figure

    from sharpscope.report import png_display_width

    for dpi in (72, 100, 200, 333):
        fig = Figure(figsize=(5, 3))
        fig.add_subplot().plot([0, 1], [1, 0])
        fig.savefig(tmp_path / "f.png", dpi=dpi)
        assert abs(png_display_width((tmp_path / "f.png").read_bytes()) - 480) <= 1, dpi
    assert png_display_width(b"not a png") is None


def test_a_failed_stage_is_one_error_naming_it_and_its_log(tmp_path):
    from sharpscope.errors import SharpscopeError
    from sharpscope.report import run_stages

    lines = []
    with pytest.raises(SharpscopeError) as info:
        run_stages({"landscape": ["landscape", str(tmp_path / "missing.pt")],
                    "sharpness": ["sharpness", str(tmp_path / "missing.pt")]}, jobs=2, log_dir=tmp_path / "logs",
                   echo=lines.append)
    message = str(info.value)
    assert message.startswith("the landscape analysis failed: ") and "missing.pt" in message, message
    assert str(tmp_path / "logs" / "landscape.log") in message and "\n" not in message
    assert sorted(line.split()[:2][1] for line in lines) == ["landscape", "sharpness"]  # every stage awaited
