"""PNG figures for run directories and W&B: pass@k curves and histograms.

matplotlib's Agg backend draws without a display, so the same code runs on a laptop, a
headless node and in the tests.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.ticker import FuncFormatter  # noqa: E402

from ntp_rl.stats import mean_ci  # noqa: E402

# Legend entries longer than this are cut: a label names a setting, not a whole path.
LEGEND_CHARS = 48


def plot_pass_at_k(path: Path, curves: Mapping[str, Mapping[int, float]], title: str,
                   references: Optional[Mapping[str, float]] = None,
                   intervals: Optional[Mapping[str, Mapping[int, tuple[float, float]]]] = None) -> Path:
    """pass@k against k on a log2 axis, one line per curve; `references` are horizontal lines (e.g. Cons@n),
    `intervals` (label -> k -> (low, high)) error bars.

    Labels of the form "name (variant)" share a colour per name and a line style per variant,
    so "loss=ce (base)" and "loss=ce (after RL)" read as one setting before and after.
    """
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    names = list(dict.fromkeys(label.split(" (")[0] for label in curves))
    # "before" reads as dashed, whatever comes first in the legend; the other variants cycle.
    variants = [v for v in dict.fromkeys(label.partition(" (")[2] for label in curves) if v != "base)"]
    styles = ["-", ":", "-."]
    for label, values in curves.items():
        name, _, variant = label.partition(" (")
        ks = sorted(values)
        color = f"C{names.index(name) % 10}"
        ax.plot(ks, [values[k] for k in ks], marker="o", markersize=4, label=_legend(label),
                color=color, linestyle="--" if variant == "base)" else styles[variants.index(variant) % len(styles)])
        bars = [k for k in ks if k in (intervals or {}).get(label, {}) and not math.isnan(intervals[label][k][0])]
        if bars:
            low = [values[k] - intervals[label][k][0] for k in bars]
            high = [intervals[label][k][1] - values[k] for k in bars]
            ax.errorbar(bars, [values[k] for k in bars], yerr=[low, high], fmt="none", ecolor=color, capsize=2,
                        linewidth=0.8, alpha=0.7)
    for i, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, linestyle="--", linewidth=1, color=f"C{(len(names) + i) % 10}", label=label)
    all_ks = sorted({k for values in curves.values() for k in values})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_ks, [str(k) for k in all_ks])
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_histogram(path: Path, edges: Sequence[float], counts: Sequence[int], title: str, xlabel: str,
                   marker: Optional[tuple[str, float]] = None) -> Path:
    """Counts per bin on a log y-axis (the mass near 0 would hide the tail); `marker` a labelled vertical line."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(edges[:-1], counts, width=widths, align="edge", color="C0", edgecolor="white", linewidth=0.3,
           label="tokens")
    if marker is not None:
        label, x = marker
        ax.axvline(x, color="C3", linestyle="--", linewidth=1, label=label)
    if any(counts):
        ax.set_yscale("log")
        plain_log_ticks(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_curves(path: Path, curves: Mapping[str, Mapping[str, Mapping[int, Sequence[float]]]], xlabel: str,
                ylabels: Mapping[str, str], title: str, log_y: bool = False) -> Path:
    """One panel per metric, one line per setting: the mean over seeds, shaded with its 95% t interval.

    `curves` maps metric -> setting -> step -> the seeds' values at that step. The title says
    what the band is, or that there is none (one seed per setting).
    """
    panels = [key for key in curves if curves[key]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), dpi=120, squeeze=False)
    banded = False
    for ax, key in zip(axes[0], panels):
        for i, (setting, by_step) in enumerate(sorted(curves[key].items())):
            steps = sorted(by_step)
            summaries = [mean_ci(by_step[s]) for s in steps]
            ax.plot(steps, [m.mean for m in summaries], color=f"C{i % 10}", label=_legend(setting), linewidth=1.5)
            if any(m.n > 1 for m in summaries):
                banded = True
                ax.fill_between(steps, [m.low for m in summaries], [m.high for m in summaries], color=f"C{i % 10}",
                                alpha=0.15, linewidth=0)
        if log_y:  # losses fall by orders of magnitude; the settings differ at the end
            ax.set_yscale("log")
            plain_log_ticks(ax.yaxis)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabels.get(key, key))
        ax.set_title(ylabels.get(key, key), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    band = "mean over seeds, band = 95% CI of the mean" if banded else "one seed per setting, no band"
    fig.suptitle(f"{title} ({band})", fontsize=11)
    return _save(fig, path)


def plot_scatter_grid(path: Path, panels: Sequence[tuple[str, str, str, Sequence[tuple[str, float, float]]]],
                      title: str) -> Path:
    """One scatter per panel (title, xlabel, ylabel, points as (setting, x, y)); a colour per setting, one legend."""
    settings = list(dict.fromkeys(s for *_, points in panels for s, _, _ in points))
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    legend_rows = math.ceil(len(settings) / 5)
    height = 3.0 * rows + 0.9 + 0.25 * legend_rows
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, height), dpi=100, squeeze=False)
    # Fixed margins: tight_layout measures every tick label of every panel, seconds for a grid.
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - 0.85 / height, bottom=(0.6 + 0.25 * legend_rows) / height,
                        wspace=0.35, hspace=0.6)
    for ax, (panel_title, xlabel, ylabel, points) in zip(axes.flat, panels):
        for i, setting in enumerate(settings):
            mine = [(x, y) for s, x, y in points if s == setting]
            if mine:
                ax.scatter([x for x, _ in mine], [y for _, y in mine], s=18, color=f"C{i % 10}", alpha=0.85,
                           label=_legend(setting))
        ax.set_title(panel_title, fontsize=8)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=f"C{i % 10}", label=_legend(s))
               for i, s in enumerate(settings)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(settings), 5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plain_log_ticks(axis: "matplotlib.axis.Axis") -> None:
    """Plain numbers on a log axis (0.6, not 6x10^-1); minor ticks labelled only when no decade fits."""
    axis.set_major_formatter(FuncFormatter(lambda value, _: _plain(value)))

    def minor(value: float, _: int) -> str:
        low, high = sorted(axis.get_view_interval())
        return _plain(value) if low > 0 and math.log10(high / low) < 1.0 else ""

    axis.set_minor_formatter(FuncFormatter(minor))


def _plain(value: float) -> str:
    return np.format_float_positional(value, precision=6, unique=True, trim="-")


def _legend(label: str) -> str:
    return label if len(label) <= LEGEND_CHARS else label[:LEGEND_CHARS - 1] + "…"


def _save(fig: "plt.Figure", path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)  # figures would otherwise pile up in a long-lived process
    return path
