"""Results a person can read: Markdown and CSV tables, PNG curves."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """A GitHub-flavoured table whose columns are the union of the rows' keys, in first-seen order."""
    if not rows:
        return "(no rows)\n"
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict], folder: str | Path, name: str, title: str | None = None) -> Path:
    """`name.md` and `name.csv` in `folder`; returns the Markdown path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown_table(rows)
    (folder / f"{name}.md").write_text((f"# {title}\n\n" if title else "") + text)
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    with open(folder / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return folder / f"{name}.md"


def plot_curves(rows: Sequence[dict], x: str, metrics: Sequence[str], path: str | Path, title: str = "") -> Path:
    """One PNG with a line per metric against `x` (e.g. iteration)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for metric in metrics:
        points = [(row[x], row[metric]) for row in rows if metric in row and row[metric] is not None]
        if points:
            xs, ys = zip(*points, strict=False)
            ax.plot(xs, ys, marker="o", label=metric)
    ax.set_xlabel(x)
    if all(isinstance(row.get(x), int) for row in rows):  # iterations, steps: no 0.25 ticks
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_bars(rows: Sequence[dict], x: str, series: Sequence[str], path: str | Path, title: str = "") -> Path:
    """One PNG of grouped bars: a group per row (labelled by `x`), a bar per series (e.g. counts before / after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) * max(1, len(series)) / 2 + 2), 4))
    for i, name in enumerate(series):
        positions = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        bars = ax.bar(positions, [row.get(name, 0) or 0 for row in rows], width, label=name)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(range(len(rows)), [str(row[x]) for row in rows], rotation=20, ha="right")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
