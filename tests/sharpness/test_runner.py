"""``sharpscope.sharpness.run`` from Python, partial results inside a measure (resume mid-grid, bit-identical),
the memory check that shrinks or refuses a block, and the overlaid sharpness-vs-rho figure."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from torch import nn

from sharpness_cases import digits_checkpoint, tiny_mlp
from sharpscope.errors import SharpscopeError
from sharpscope.plots.output import FigureOutput
from sharpscope.sharpness import m_sharpness, run
from sharpscope.sharpness.memory import block_bytes, fit_group, parse_bytes
from sharpscope.sharpness.partial import PartialResults

CE = nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return digits_checkpoint(tmp_path_factory.mktemp("run") / "final.pt")


FAST = dict(m=(8, 32), rho=(0.05,), steps=2, num_samples=64, max_chunks=4, device="cpu", gap_samples=64)


def test_run_from_python_writes_the_cli_outputs_and_returns_a_frozen_result(checkpoint, tmp_path):
    from dataclasses import FrozenInstanceError

    from sharpscope.inputs import analysis_inputs

    result = run([checkpoint], measures=["worst", "adaptive"], **FAST, out=tmp_path,
                 figure_output=FigureOutput(("png", "svg"), dpi=60))
    names = [p.name for p in result.written]
    assert names == ["sharpness.json", "sharpness.npz", "sharpness_vs_rho.png", "sharpness_vs_rho.svg"]
    assert all(p.stat().st_size > 0 for p in result.written)
    with pytest.raises(FrozenInstanceError):
        result.reused = 3
    document = json.loads((tmp_path / "sharpness.json").read_text())
    assert [e["result"] for e in document["entries"]] == [e["result"] for e in result.entries]
    assert document["config"]["suite"]["adaptive_rho_values"] == [0.1, 0.2, 0.5]  # the new default
    assert not (tmp_path / "sharpness.partial.npz").exists()  # deleted once its measure is saved
    # the same numbers through the measure itself
    model, data = analysis_inputs(checkpoint, num_samples=64, batch_size=500)
    grid = m_sharpness(model.model, CE, data, m_values=[8, 32], rho_values=[0.05], steps=2, max_chunks=4,
                       batch_size=500)
    np.testing.assert_array_equal(np.array(result.entries[0]["result"]["values"]), grid.values)
    # the default adaptive radii stay local: a small loss increase, not a broken network (issue 18)
    adaptive = np.array(result.entries[1]["result"]["values"])
    assert adaptive.shape == (2, 3) and np.all(adaptive > 0) and np.all(adaptive < 1.0), adaptive
    again = run([checkpoint], measures=["worst", "adaptive"], **FAST, out=tmp_path)  # same config: all reused
    assert again.reused == 2 and [e["result"] for e in again.entries] == [e["result"] for e in result.entries]
    with pytest.raises(SharpscopeError, match=r"different configuration \(suite.steps \(2 -> 3\)\)"):
        run([checkpoint], measures=["worst", "adaptive"], **{**FAST, "steps": 3}, out=tmp_path)


class Interrupted(Exception):
    """Raised from the progress callback after some blocks: the measure stops there, as if killed."""


def stop_after(blocks: int):
    calls = []

    def progress(_):
        calls.append(None)
        if len(calls) == blocks:
            raise Interrupted

    return progress


@pytest.mark.parametrize("measure", ["worst", "average"])
def test_an_interrupted_grid_resumes_from_its_partial_file_bit_identically(tmp_path, measure):
    model, data = tiny_mlp(n=64, seed=1)
    settings = dict(m_values=[1, 4], rho_values=[0.05, 0.1], measure=measure, steps=3, num_draws=3,
                    batch_size=8, seed=2)
    straight = m_sharpness(model, CE, data, **settings)
    path, identity = tmp_path / "p.npz", {"measure": measure}
    counts = []
    for stop in (5, 3, 7):  # interrupted three times, after a few blocks each (blocks of 8 chunks / 8 items)
        partial = PartialResults(path, identity, save_every=0)
        with pytest.raises(Interrupted):
            m_sharpness(model, CE, data, **settings, partial=partial, on_progress=stop_after(stop))
        counts.append(float(np.load(path)["__chunks__"]))
    assert counts == sorted(counts) and counts[0] > 0 and counts[-1] > counts[0], counts  # work kept, growing
    partial = PartialResults(path, identity, save_every=0)
    resumed = m_sharpness(model, CE, data, **settings, partial=partial)
    assert partial.reused == counts[-1]
    np.testing.assert_array_equal(resumed.values, straight.values)
    np.testing.assert_array_equal(resumed.stderr, straight.stderr)
    np.testing.assert_array_equal(resumed.clean_loss, straight.clean_loss)
    for a, b in zip(resumed.estimates, straight.estimates):
        np.testing.assert_array_equal(a.chunk_values, b.chunk_values)


def test_a_partial_file_of_another_identity_is_not_used(tmp_path):
    path = tmp_path / "p.npz"
    first = PartialResults(path, {"sha256": "a"}, save_every=0)
    first.put("block", np.arange(3.0), chunks=3)
    assert PartialResults(path, {"sha256": "a"}).get("block").tolist() == [0.0, 1.0, 2.0]
    assert PartialResults(path, {"sha256": "b"}).get("block") is None
    assert PartialResults(path, {"sha256": "b"}).num_chunks == 0
    slow = PartialResults(tmp_path / "q.npz", {}, save_every=3600)
    slow.put("block", np.zeros(2), chunks=2)
    assert not (tmp_path / "q.npz").exists()  # not due yet ...
    slow.flush()
    assert float(np.load(tmp_path / "q.npz")["__chunks__"]) == 2  # ... written by flush
    with pytest.raises(SharpscopeError, match="save_every must be a number of seconds >= 0"):
        PartialResults(path, {}, save_every=-1)


def test_fit_group_shrinks_to_the_memory_and_refuses_one_chunk_that_does_not_fit(monkeypatch):
    sizes = dict(m=8, num_params=1_000_000, copies=7, itemsize=4, batch_size=256, activations=1000)
    monkeypatch.setenv("SHARPSCOPE_MEMORY_LIMIT", "100MB")
    group = fit_group(32, **sizes, device="cpu", what="worst-case sharpness")
    assert 1 <= group < 32
    assert block_bytes(group, **sizes) <= 0.8e8 < block_bytes(group + 1, **sizes)  # the largest that fits
    monkeypatch.setenv("SHARPSCOPE_MEMORY_LIMIT", "10MB")
    with pytest.raises(SharpscopeError, match=r"^worst-case sharpness needs ~26\.[0-9] MiB for one chunk of m=8 "
                                              r"\(1,000,000 parameters x 7 perturbation copies \+ activations of 8 "
                                              r"samples\) but 9\.5 MiB is available \(\$SHARPSCOPE_MEMORY_LIMIT\)"):
        fit_group(32, **sizes, device="cpu", what="worst-case sharpness")
    assert parse_bytes("2GiB") == 2**31 and parse_bytes("1.5 kb") == 1500
    with pytest.raises(SharpscopeError, match="SHARPSCOPE_MEMORY_LIMIT='lots'"):
        parse_bytes("lots")


def test_a_shrunk_block_gives_the_same_numbers(monkeypatch):
    # blocks of fewer chunks change only how the chunks are batched, not any chunk's ascent (float rounding)
    model, data = tiny_mlp(n=64, seed=4)
    settings = dict(m_values=[1], rho_values=[0.1], steps=3, batch_size=64)
    whole = m_sharpness(model, CE, data, **settings)
    params = sum(p.numel() for p in model.parameters())
    monkeypatch.setenv("SHARPSCOPE_MEMORY_LIMIT", str(int(params * 7 * 4 * 5 / 0.8)))  # ~5 chunks a block
    shrunk = m_sharpness(model, CE, data, **settings)
    np.testing.assert_allclose(shrunk.values, whole.values, rtol=1e-5)


def test_an_absurd_request_is_refused_in_one_line_before_allocating(checkpoint, tmp_path):
    from sharpscope.cli.main import cli

    result = CliRunner().invoke(cli, ["-q", "sharpness", str(checkpoint), "--m", "8", "--rho", "0.05",
                                      "--steps", "1", "--num-samples", "64", "--device", "cpu",
                                      "--out", str(tmp_path / "o")], env={"SHARPSCOPE_MEMORY_LIMIT": "1KB"})
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "worst-case sharpness needs ~" in lines[0] and "is available" in lines[0], lines
    assert "Traceback" not in result.output


def test_overlay_figure_one_colour_per_run_one_style_per_m(tmp_path):
    from sharpscope.plots.sharpness import sharpness_vs_rho

    grids = {}
    for label, seed in (("sgd", 0), ("sam", 3)):
        model, data = tiny_mlp(seed=seed, n=32)
        grids[label] = {"worst": m_sharpness(model, CE, data, m_values=[1, 8], rho_values=[0.05, 0.1], steps=2),
                        "average": m_sharpness(model, CE, data, m_values=[1, 8], rho_values=[0.05, 0.1],
                                               measure="average", num_draws=2)}
    fig = sharpness_vs_rho(grids, layout="overlay")
    assert len(fig.axes) == 2  # one panel per measure, both runs in it
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["sgd, m=1", "sgd, m=8", "sam, m=1", "sam, m=8"]
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()  # colour: the run
    assert lines[0].get_linestyle() == lines[2].get_linestyle() != lines[1].get_linestyle()  # style: m
    np.testing.assert_allclose(lines[3].get_ydata(), grids["sam"]["worst"].values[1])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["sgd", "sam", "m=1", "m=8"]
    with pytest.raises(SharpscopeError, match="layout must be 'overlay' or 'panels'"):
        sharpness_vs_rho(grids, layout="grid")


def test_partial_results_refusals(checkpoint, tmp_path):
    model, data = tiny_mlp(n=16)
    for measure in ("worst", "average"):
        with pytest.raises(SharpscopeError, match="partial results are kept in one process"):
            m_sharpness(model, CE, data, m_values=[4], rho_values=[0.1], measure=measure, steps=1, num_draws=1,
                        shard=(0, 1), partial=PartialResults(tmp_path / "p.npz", {}))
    with pytest.raises(SharpscopeError, match="save_every must be a number of seconds >= 0, got -1"):
        run([checkpoint], **FAST, out=tmp_path / "o", save_every=-1)
    # an interrupted measure of another configuration is not silently replaced
    other = PartialResults(tmp_path / "o" / "sharpness.partial.npz", {"config": {"suite": {"steps": 9}}}, save_every=0)
    other.put("block", np.zeros(1), chunks=1)
    with pytest.raises(SharpscopeError, match=r"sharpness\.partial\.npz holds results of a different configuration"):
        run([checkpoint], **FAST, out=tmp_path / "o")
    result = run([checkpoint], **FAST, out=tmp_path / "o", overwrite=True)  # --overwrite replaces it
    assert result.resumed_chunks == 0 and not (tmp_path / "o" / "sharpness.partial.npz").exists()


def test_average_case_has_its_own_noise_scales(tmp_path):
    """Noise of scale rho per weight has norm rho*sqrt(n): the worst-case radii as noise scales left the basin
    (8 nats at rho 0.1 on a digits MLP), so average gets its own, smaller grid."""
    from sharpscope.sharpness import SuiteConfig

    config = SuiteConfig(measures=("worst", "average"))
    assert config.average_rho_values == (0.01, 0.02, 0.05)
    assert max(config.average_rho_values) < max(config.rho_values)
    assert "average_rho_values" in config.to_dict()


def test_a_sharpness_result_prints_as_a_small_table():
    model, data = tiny_mlp(seed=0, n=32)
    result = m_sharpness(model, CE, data, m_values=[1, 8], rho_values=[0.05, 0.1], steps=2)
    text = repr(result)
    assert text.splitlines()[0].startswith("SharpnessResult(worst, p=2, 2 steps, 32 samples; rho = 0.05, 0.1")
    assert len(text.splitlines()) == 3 and "array" not in text
    assert f"{result.values[1, 1]:.4g} +- {result.stderr[1, 1]:.2g}" in text.splitlines()[2]


def test_two_checkpoints_get_no_kendall_tau(tmp_path):
    """Over two models tau is +-1 whatever the measure (p = 1): neither computed nor drawn, and the CLI says why."""
    from sharpscope.cli.main import cli

    first, second = (digits_checkpoint(tmp_path / f"seed{seed}.pt", seed=seed) for seed in (0, 1))
    result = CliRunner().invoke(cli, ["-q", "sharpness", str(first), str(second), "--m", "64", "--rho",
                                      "0.05", "--steps", "1", "--max-chunks", "1", "--num-samples", "64",
                                      "--device", "cpu", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "not computed over 2 checkpoints" in result.output
    assert not list((tmp_path / "out").glob("kendall_tau*"))


def test_a_sharpness_run_prints_gaps_and_grids_in_a_few_lines(tmp_path):
    from sharpscope.sharpness import SharpnessRun

    records = ({"path": "a/final.pt", "label": "a/final.pt", "generalization_gap": 0.0125},)
    entries = ({"checkpoint": "a/final.pt", "measure": "worst",
                "result": {"m_values": [8, 128], "rho_values": [0.05, 0.1], "values": [[0.01, 0.02], [0.003, 0.004]]}},)
    run_result = SharpnessRun(tmp_path, (tmp_path / "sharpness.json",), records, entries, None, None, 0, 0.0)
    assert repr(run_result).splitlines() == [
        f"SharpnessRun(1 checkpoints, 1 files in {str(tmp_path)!r}", "  a/final.pt: gap 0.0125",
        "    worst (rho 0.05, 0.1): m=8: 0.01, 0.02; m=128: 0.003, 0.004)"]
