"""How figures are written: which formats, at which resolution, shared by every command and the report.

A figure is saved once per requested format under the same stem (``surface.png``, ``surface.pdf``, ...), each
atomically (:func:`sharpscope.io.save_figure`). Vector formats (pdf, svg) ignore ``dpi`` except for rasterised
content such as ``pcolormesh`` heatmaps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sharpscope.errors import UsageError

#: Formats matplotlib writes without extra packages and that papers and slides use.
FIGURE_FORMATS = ("png", "pdf", "svg")

#: Default resolution of raster figures: sharp at a one-column paper width (3.3 in -> 660 px).
DEFAULT_DPI = 200


@dataclass(frozen=True)
class FigureOutput:
    """Where and how a command writes its figures."""

    formats: tuple[str, ...] = ("png",)  # file formats, each one file per figure; the first is the one linked
    dpi: int = DEFAULT_DPI  # dots per inch of raster output (png; rasterised parts of pdf/svg)

    def __post_init__(self) -> None:
        if not self.formats:
            raise UsageError(f"--format: give at least one of {', '.join(FIGURE_FORMATS)}")
        unknown = [f for f in self.formats if f not in FIGURE_FORMATS]
        if unknown:
            raise UsageError(f"--format {','.join(unknown)}: unknown figure format; use any of "
                             f"{', '.join(FIGURE_FORMATS)} (comma-separated)")
        if len(set(self.formats)) != len(self.formats):
            raise UsageError(f"--format {','.join(self.formats)}: a format is repeated")
        if not 30 <= self.dpi <= 1200:
            raise UsageError(f"--dpi {self.dpi}: expected 30..1200 dots per inch")

    @classmethod
    def parse(cls, formats: str = "png", dpi: int = DEFAULT_DPI) -> FigureOutput:
        """From the CLI's ``--format png,pdf`` and ``--dpi`` values."""
        return cls(tuple(f.strip().lower().lstrip(".") for f in formats.split(",") if f.strip()), int(dpi))

    def names(self, stem: str) -> list[str]:
        """The file names :meth:`save` writes for ``stem`` (for checking an output folder before work starts)."""
        return [f"{stem}.{fmt}" for fmt in self.formats]

    def save(self, fig: Any, out: str | os.PathLike, stem: str, *, close: bool = True) -> list[Path]:
        """Write ``fig`` as ``out/stem.<format>`` for every format; returns the paths, the primary first."""
        from sharpscope.io import save_figure

        paths = [save_figure(fig, Path(out) / name, dpi=self.dpi) for name in self.names(stem)]
        if close:
            import matplotlib.pyplot as plt

            plt.close(fig)
        return paths
