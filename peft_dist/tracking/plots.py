"""PNG plots of a run from its metric history: loss curves, and AdaLoRA's rank allocation.

Input is ``{metric: [(step, value), ...]}`` (``tracker.metric_history()``), so the plots come from
exactly what was logged and can be redrawn from MLflow later. Figures are drawn with the Agg canvas
directly (no pyplot state, no display needed, safe next to the tracker thread). matplotlib is imported
when a figure is drawn, on the rank that draws it: imported with this module it would add about 23 MiB to
every rank's resident set.

Metric names read: ``train/loss`` and ``eval/loss``; for rank allocation, what AdaLoRA's hook logs:
per-module ranks ``<adapter>/rank/<module>``, the total ``<adapter>/rank_total`` and the scheduled
``<adapter>/budget``.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

History = dict[str, list[tuple[int, float]]]
LOSS_CURVES = {"train/loss": "train", "eval/loss": "eval"}
RANK_MARK = "/rank/"
TOTAL_SUFFIXES = {"/rank_total": "-", "/budget": "--"}  # line styles


def _natural_key(name: str) -> list:
    """``layers.10`` after ``layers.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _figure(**kwargs) -> Figure:
    from matplotlib.figure import Figure

    return Figure(layout="constrained", **kwargs)


def _save(figure: Figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=110)
    return path


def plot_losses(history: History, path: str | Path) -> Path | None:
    """Train and eval loss against the optimizer step; None when neither was logged."""
    curves = {label: sorted(history[key]) for key, label in LOSS_CURVES.items() if history.get(key)}
    if not curves:
        return None
    figure = _figure(figsize=(7, 4))
    axes = figure.add_subplot()
    for label, points in curves.items():
        steps, values = zip(*points)
        axes.plot(steps, values, marker="o" if label == "eval" else None, markersize=4, label=f"{label} loss")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.set_title("Loss")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, Path(path))


def rank_matrix(history: History) -> tuple[list[str], list[int], list[list[float]]]:
    """Per-module ranks as ``(modules, steps, matrix[module][step])``; NaN where a value is missing."""
    series = {key: dict(points) for key, points in history.items() if RANK_MARK in key and points}
    modules = sorted(series, key=_natural_key)
    steps = sorted({step for points in series.values() for step in points})
    matrix = [[series[m].get(step, math.nan) for step in steps] for m in modules]
    return modules, steps, matrix


def plot_rank_allocation(history: History, path: str | Path) -> Path | None:
    """Heat map of each module's rank over time, above the total rank and the budget; None when no
    ranks were logged."""
    modules, steps, matrix = rank_matrix(history)
    totals = {key: (sorted(points), style) for key, points in history.items() if points
              for suffix, style in TOTAL_SUFFIXES.items() if key.endswith(suffix)}
    if not modules and not totals:
        return None
    figure = _figure(figsize=(9, 3 + 0.18 * len(modules)))
    heat_axes, total_axes = figure.subplots(2, 1, height_ratios=[max(len(modules), 4), 3], sharex=True)
    if modules:
        # Each column spans the steps up to the next logged one, so uneven logging stays readable.
        edges = steps + [steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1)]
        mesh = heat_axes.pcolormesh(edges, range(len(modules) + 1), matrix, cmap="viridis", shading="flat")
        heat_axes.set_yticks([i + 0.5 for i in range(len(modules))],
                             [m.split(RANK_MARK, 1)[1] for m in modules], fontsize=6)
        heat_axes.invert_yaxis()
        figure.colorbar(mesh, ax=heat_axes, label="rank")
    heat_axes.set_title("Rank allocation per module")
    for key, (points, style) in sorted(totals.items()):
        x, y = zip(*points)
        total_axes.step(x, y, style, where="post", label=key)
    total_axes.set_xlabel("optimizer step")
    total_axes.set_ylabel("total rank")
    total_axes.grid(alpha=0.3)
    if totals:
        total_axes.legend(fontsize=7)
    return _save(figure, Path(path))


def write_plots(history: History, out_dir: str | Path) -> list[Path]:
    """Every plot that the history has data for, as PNGs in ``out_dir``."""
    out_dir = Path(out_dir)
    made = [plot_losses(history, out_dir / "loss.png"),
            plot_rank_allocation(history, out_dir / "rank_allocation.png")]
    return [path for path in made if path is not None]
