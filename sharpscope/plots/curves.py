"""Learning curves of training runs (from their ``metrics.jsonl``): loss and accuracy vs epoch, runs overlaid."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D


def learning_curves(runs: dict[str, list[dict[str, Any]]]) -> Figure:
    """Train/test loss and accuracy per epoch for each run, overlaid on two panels (loss, accuracy); one colour per
    run (matplotlib's C0, C1, ... as in the report's other figures; tab20 beyond 10 runs), dashed = train, solid
    with markers = test. One legend below both panels names the runs (in the order given) and the two line styles,
    so it never covers a curve, whatever the number of runs.

    Args:
        runs: run label -> its metrics records (``epoch``, ``train_loss``, ``test_loss``, ``train_acc``,
            ``test_acc``), as read from ``metrics.jsonl``.
    """
    import matplotlib

    count = len(runs)
    colors = [f"C{i}" for i in range(count)] if count <= 10 else [matplotlib.colormaps["tab20"](i % 20)
                                                                   for i in range(count)]
    columns = min(count, 6)
    legend_rows = -(-(count + 2) // columns)
    fig = Figure(figsize=(10, 3.6 + 0.22 * legend_rows), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for color, (label, records) in zip(colors, runs.items()):
        epochs = [r["epoch"] for r in records]
        ax_loss.plot(epochs, [r["train_loss"] for r in records], "--", color=color, label=f"{label} train")
        ax_loss.plot(epochs, [r["test_loss"] for r in records], "-", color=color, marker="o", ms=3,
                     label=f"{label} test")
        ax_acc.plot(epochs, [100 * r["train_acc"] for r in records], "--", color=color)
        ax_acc.plot(epochs, [100 * r["test_acc"] for r in records], "-", color=color, marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=color, lw=2.5, label=label) for color, label in zip(colors, runs)]
    handles += [Line2D([], [], color="0.3", ls="--", label="train"),
                Line2D([], [], color="0.3", ls="-", marker="o", ms=3, label="test")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), columns), fontsize=8,
               frameon=False)
    return fig
