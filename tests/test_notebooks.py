"""The notebooks execute top to bottom (fast settings) so they never rot; every figure shows as an image; outputs
stay cleared in git."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))

#: a call that returns a figure: the sharpscope.plots functions (plot_*, learning_curves, sharpness_vs_rho, ...)
FIGURE_CALL = re.compile(r"\b(plot_\w+|learning_curves|sharpness_vs_rho|kendall_tau_bars)\(")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_cleared_in_git(path):
    notebook = nbformat.read(path, as_version=4)
    dirty = [i for i, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_and_shows_every_figure(path, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPSCOPE_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # what a headless Jupyter has unless the notebook selects inline itself
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [(i, cell) for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]
    errors = [(i, o.get("ename"), o.get("evalue")) for i, cell in code for o in cell.outputs
              if o.get("output_type") == "error"]
    assert not errors, errors
    # a Figure that is not rendered shows as the text "<Figure size 640x480 with 1 Axes>" and no image
    as_text = [i for i, cell in code for o in cell.outputs
               if "image/png" not in o.get("data", {}) and o.get("data", {}).get("text/plain", "").startswith("<Figure")]
    assert not as_text, f"{path.name}: cells {as_text} show a figure as text, not an image (%matplotlib inline?)"
    plotting = [i for i, cell in code if FIGURE_CALL.search(cell.source)]
    without_image = [i for i in plotting
                     if not any("image/png" in o.get("data", {}) for o in notebook.cells[i].outputs)]
    assert plotting and not without_image, f"{path.name}: plotting cells {without_image} (of {plotting}) show no image"
