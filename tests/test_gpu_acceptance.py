"""The GPU acceptance script's CPU dry run (``benchmarks/gpu_acceptance.py --device cpu --tiny``).

It runs the same code paths as on a GPU with tiny models, so a GPU day does not start with a crash: every section
finishes, the float32-vs-float64 correctness checks pass on the CPU, the JSON holds every section and goal, the
Markdown table is written; the time guard and a failing configuration are recorded, not fatal.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_acceptance", module)
    spec.loader.exec_module(module)
    return module


acceptance = _load_script()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("acceptance")
    data = acceptance.main(["--device", "cpu", "--tiny", "--out", str(out)])
    return out, data


def test_dry_run_writes_json_and_markdown_with_every_section(dry_run, capsys):
    out, data = dry_run
    on_disk = json.loads((out / acceptance.JSON_NAME).read_text())
    assert on_disk["schema"] == acceptance.SCHEMA and on_disk["tiny"] is True
    statuses = {name: on_disk["sections"][name]["status"] for name in acceptance.SECTIONS}
    assert statuses == dict.fromkeys(acceptance.SECTIONS, "ok"), {
        name: on_disk["sections"][name].get("error") for name in acceptance.SECTIONS}
    assert on_disk["complete"] is True
    assert on_disk["time_guard"] == []
    markdown = (out / acceptance.MARKDOWN_NAME).read_text()
    for heading in ["## Goals", *(f"## {name} (ok" for name in acceptance.SECTIONS)]:
        assert heading in markdown, heading
    assert all(goal["status"] in ("met", "missed", "n/a") for goal in on_disk["goals"])
    assert not list(out.glob(".*tmp*")), "a temporary file of the atomic writes was left behind"


def test_dry_run_correctness_checks_pass_on_cpu(dry_run):
    _, data = dry_run
    checks = {c["check"]: c for c in data["sections"]["correctness"]["checks"]}
    assert set(checks) == {"sam_step", "m_sam_step", "hessian_top5", "hessian_trace", "landscape_row",
                           "m_sharpness_cell"}
    failed = {name: c for name, c in checks.items() if not c["passed"]}
    assert not failed, failed
    for name, check in checks.items():
        assert 0 <= check["max_error"] <= check["tolerance"] == acceptance.TOLERANCES[name]
    goal_rows = {g["goal"]: g["status"] for g in data["goals"]}
    assert all(goal_rows[f"correctness: {name}"] == "met" for name in checks)


def test_dry_run_measures_every_throughput(dry_run):
    _, data = dry_run
    plan = acceptance.TINY_PLAN
    analysis = data["sections"]["analysis"]
    assert analysis["hvp"]["hvps_per_s_block"] > 0 and analysis["hvp"]["gradients_per_hvp_block"] > 0
    # loss_surface and the serial loop evaluate the same points: they must agree (float32, same batches)
    assert analysis["landscape"]["max_abs_difference"] <= 1e-5
    assert analysis["landscape"]["speedup"] > 0
    assert analysis["m_sharpness"]["m1_sample_steps_per_s"] > 0
    rows = [r for r in data["sections"]["training"]["rows"] if "samples_per_s" in r]
    configs = {(r["model"], r["batch"], r["precision"], r["compile"]) for r in rows}
    assert len(configs) == len(plan.train_models) * len(plan.train_batches) * len(plan.precisions)
    assert len(rows) == 3 * len(configs)
    assert all(r["samples_per_s"] > 0 and r["x_sgd"] > 0 for r in rows)
    assert all(r["syncs_per_step"] is None and r["gpu_util_pct"] is None for r in rows)  # CUDA only
    largest = data["sections"]["scale"]["largest"]
    assert largest["model"] == acceptance.spec_name(plan.scale_models[0]) and largest["hvps"] > 0
    goal_rows = {g["goal"]: g for g in data["goals"]}
    assert goal_rows["host syncs per training_step (bf16)"]["status"] == "n/a"
    assert goal_rows["SAM / SGD step time (every configuration)"]["status"] in ("met", "missed")


def test_time_guard_skips_sections_and_says_so(tmp_path):
    data = acceptance.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--budget-s", "0"])
    on_disk = json.loads((tmp_path / acceptance.JSON_NAME).read_text())
    assert data["complete"] is False
    for name in acceptance.SECTIONS:
        assert on_disk["sections"][name]["status"] == "skipped"
        assert "time guard" in on_disk["sections"][name]["reason"]
    assert len(on_disk["time_guard"]) == len(acceptance.SECTIONS)
    assert "## Time guard" in (tmp_path / acceptance.MARKDOWN_NAME).read_text()


def test_a_failing_configuration_is_recorded_and_the_rest_still_runs(tmp_path):
    data = acceptance.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--sections", "training",
                            "--train-models", "no-such-model;mlp:hidden=8"])
    rows = data["sections"]["training"]["rows"]
    assert data["sections"]["training"]["status"] == "ok"
    errors = [r for r in rows if r.get("note", "").startswith("error:")]
    assert len(errors) == 4 and all("no-such-model" in r["config"] and "unknown model" in r["note"] for r in errors)
    measured = [r for r in rows if "samples_per_s" in r]
    assert len(measured) == 3 * 4 and all(r["model"] == "mlp:hidden=8" for r in measured)
    assert set(data["sections"]) == {"training"}
