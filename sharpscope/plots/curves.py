"""Learning curves of training runs (from their ``metrics.jsonl``): loss and accuracy vs epoch, runs overlaid."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure


def learning_curves(runs: dict[str, list[dict[str, Any]]]) -> Figure:
    """Train/test loss and accuracy per epoch for each run; one colour per run, dashed = train, solid = test.

    Args:
        runs: run label -> its metrics records (``epoch``, ``train_loss``, ``test_loss``, ``train_acc``,
            ``test_acc``), as read from ``metrics.jsonl``.
    """
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for index, (label, records) in enumerate(runs.items()):
        color = f"C{index}"
        epochs = [r["epoch"] for r in records]
        ax_loss.plot(epochs, [r["train_loss"] for r in records], "--", color=color, label=f"{label} train")
        ax_loss.plot(epochs, [r["test_loss"] for r in records], "-", color=color, marker="o", ms=3,
                     label=f"{label} test")
        ax_acc.plot(epochs, [100 * r["train_acc"] for r in records], "--", color=color)
        ax_acc.plot(epochs, [100 * r["test_acc"] for r in records], "-", color=color, marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy (dashed: train, solid: test)")
    ax_loss.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    return fig
