"""PNG figures for run directories and W&B: pass@k curves and histograms.

matplotlib's Agg backend draws without a display, so the same code runs on a laptop, a
headless node and in the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def plot_pass_at_k(path: Path, curves: Mapping[str, Mapping[int, float]], title: str,
                   references: Optional[Mapping[str, float]] = None) -> Path:
    """pass@k against k on a log2 axis, one line per curve; `references` are horizontal lines (e.g. Cons@n).

    Labels of the form "name (variant)" share a colour per name and a line style per variant,
    so "loss=ce (base)" and "loss=ce (after RL)" read as one setting before and after.
    """
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    names = list(dict.fromkeys(label.split(" (")[0] for label in curves))
    variants = list(dict.fromkeys(label.partition(" (")[2] for label in curves))
    styles = ["-", "--", ":", "-."]
    for label, values in curves.items():
        name, _, variant = label.partition(" (")
        ks = sorted(values)
        ax.plot(ks, [values[k] for k in ks], marker="o", markersize=4, label=label,
                color=f"C{names.index(name) % 10}", linestyle=styles[variants.index(variant) % len(styles)])
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
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tokens")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


def plot_curves(path: Path, curves: Mapping[str, Mapping[str, Mapping[int, Sequence[float]]]], xlabel: str,
                ylabels: Mapping[str, str], title: str, log_y: bool = False) -> Path:
    """One panel per metric, one line per setting: the mean over seeds, shaded from min to max.

    `curves` maps metric -> setting -> step -> the seeds' values at that step.
    """
    panels = [key for key in curves if curves[key]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), dpi=120, squeeze=False)
    for ax, key in zip(axes[0], panels):
        for i, (setting, by_step) in enumerate(sorted(curves[key].items())):
            steps = sorted(by_step)
            means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            ax.plot(steps, means, color=f"C{i}", label=setting, linewidth=1.5)
            if any(len(by_step[s]) > 1 for s in steps):
                ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                                color=f"C{i}", alpha=0.15, linewidth=0)
        if log_y:  # losses fall by orders of magnitude; the settings differ at the end
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabels.get(key, key))
        ax.set_title(ylabels.get(key, key), fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def _save(fig: "plt.Figure", path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)  # figures would otherwise pile up in a long-lived process
    return path
