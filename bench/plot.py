"""The scaling curves of a suite run in one PNG: one panel per curve, measured series plus the ideal line."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from bench.suite import Curve


def plot_curves(curves: Sequence[Curve], path: Path, machine: str) -> Path | None:
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(curves))
    rows = -(-len(curves) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.6 * rows), squeeze=False)
    for axis, curve in zip(axes.flat, curves, strict=False):
        for name, ys in curve.series.items():
            axis.plot(curve.xs, ys, marker="o", label=name)
        ideal = curve.ideal()
        if ideal is not None:
            axis.plot(curve.xs, ideal, linestyle="--", color="grey", label=f"ideal (linear from {curve.ideal_from})")
        setup = "\n".join(textwrap.wrap(curve.setup, 60))  # long set-ups ran into the next panel's title
        axis.set_title(f"{curve.title}\n{setup}", fontsize=9)
        axis.set_xlabel(curve.x_label)
        axis.set_ylabel(curve.y_label)
        axis.set_xticks(curve.xs)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(curves):]:
        axis.set_visible(False)
    figure.suptitle(f"ToolSeek scaling ({machine})", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
