"""PNG plots of the accuracy benchmark: per-organ Dice bars and training curves (matplotlib, Agg).

:func:`pyplot_agg` and :func:`save_png` also serve the demo's montage. Both plot functions take plain data (aggregates from :mod:`PLBOptCore.bench.accuracy` and run folders)
so they can be re-run on an existing ``results.json`` without training anything.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..engine.events import read_events
from ..errors import ConfigError
from ..utils import atomic_write

LOSS_TERMS: Tuple[str, ...] = ("loss", "loss_sup", "loss_unsup", "loss_tri", "loss_mc")


def pyplot_agg():
    """matplotlib.pyplot on the Agg backend: the benchmark runs headless (CI, SSH, worker threads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, dpi: int = 100) -> Path:
    """Write ``fig`` atomically as PNG and close it."""
    plt = pyplot_agg()
    with atomic_write(Path(path)) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(path)


def plot_dice_bars(aggregates: Mapping[str, dict], groups: Sequence[str], labels: Mapping[str, str],
                   class_names: Sequence[str], path: Path, title: str) -> Path:
    """Grouped bars: one group of bars per organ (and the class mean), one bar per method.

    Args:
        aggregates: ``results["aggregates"]``; each entry has ``classes[name]["dice"]`` and
            ``mean_dice`` as ``{"mean", "std"}`` (fractions; plotted ×100 like the paper).
        groups: which aggregates to draw, in legend order.
        labels: legend text per group.
        class_names: organs in label order.
    """
    plt = pyplot_agg()
    categories = list(class_names) + ["mean"]
    width = 0.8 / max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 2 + 0.3 * len(categories) * max(1, len(groups)))), 4.2))
    x = np.arange(len(categories))
    for index, group in enumerate(groups):
        entry = aggregates[group]
        stats = [entry["classes"][name]["dice"] for name in class_names] + [entry["mean_dice"]]
        means = [100 * _number(s["mean"]) for s in stats]
        # no error bar where a single seed gives no spread (std None)
        errors = [100 * _number(s["std"], 0.0) for s in stats]
        ax.bar(x + (index - (len(groups) - 1) / 2) * width, means, width, yerr=errors, capsize=2,
               label=labels.get(group, group))
    ax.set_xticks(x)
    ax.set_xticklabels(categories, rotation=30, ha="right")
    ax.set_ylabel("test Dice (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return save_png(fig, path)


def _number(value: Optional[float], missing: float = float("nan")) -> float:
    return missing if value is None else float(value)


def _real(value: Any) -> bool:
    """A JSON number (not a bool): what a step or a logged value must be to be plotted."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(run_dir: Path, record_type: str, key: str) -> Dict[int, float]:
    """``{step: value}`` of one field of one event type; a resumed run repeats steps, the last wins.
    Records whose step or value is not a number (a damaged or edited file) are left out."""
    series: Dict[int, float] = {}
    for record in read_events(Path(run_dir)):
        step, value = record.get("step"), record.get(key)
        if record.get("type") == record_type and _real(step) and math.isfinite(step) and _real(value):
            series[int(step)] = float(value)
    return series


def mean_curve(run_dirs: Sequence[Path], record_type: str, key: str) -> Tuple[np.ndarray, np.ndarray]:
    """Steps logged by every run and the mean value over the runs (seeds) at those steps."""
    per_run = [_series(run_dir, record_type, key) for run_dir in run_dirs]
    per_run = [s for s in per_run if s]
    if not per_run:
        return np.zeros(0), np.zeros(0)
    steps = sorted(set.intersection(*(set(s) for s in per_run)))
    values = [np.mean([s[step] for s in per_run]) for step in steps]
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def refine_gain_curves(run_dirs: Sequence[Path]) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """Per class: steps logged by every run and the mean (over runs) of refinement's self-check gain."""
    per_run: List[Dict[str, Dict[int, float]]] = []
    for run_dir in run_dirs:
        series: Dict[str, Dict[int, float]] = {}
        for record in read_events(Path(run_dir)):
            gains, step = record.get("refine_gain"), record.get("step")
            if record.get("type") != "train" or not isinstance(gains, dict) or not _real(step) or not math.isfinite(step):
                continue
            for name, gain in gains.items():
                if _real(gain):
                    series.setdefault(str(name), {})[int(step)] = float(gain)
        if series:
            per_run.append(series)
    curves: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    for name in per_run[0] if per_run else ():
        steps = sorted(set.intersection(*(set(run.get(name, {})) for run in per_run)))
        curves[name] = (np.asarray(steps, dtype=float),
                        np.asarray([np.mean([run[name][s] for run in per_run]) for s in steps], dtype=float))
    return curves


def plot_refine_gain(groups: Mapping[str, Sequence[Path]], labels: Mapping[str, str], path: Path,
                     window: int = 10) -> Optional[Path]:
    """One panel per group: refinement's per-class Dice gain on labeled patches vs step (running
    mean over ``window`` logged steps, mean over seeds). None when no group logged the self-check."""
    drawn = {group: refine_gain_curves(run_dirs) for group, run_dirs in groups.items()}
    drawn = {group: curves for group, curves in drawn.items() if curves}
    if not drawn:
        return None
    plt = pyplot_agg()
    fig, axes = plt.subplots(1, len(drawn), figsize=(5 * len(drawn), 3.4), squeeze=False)
    for ax, (group, curves) in zip(axes.ravel(), drawn.items()):
        for name, (steps, values) in curves.items():
            if steps.size:
                smooth = np.convolve(values, np.ones(window) / window, mode="valid") if values.size >= window else values
                ax.plot(steps[len(steps) - smooth.size:], 100 * smooth, label=name)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{labels.get(group, group)}: refinement self-check", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("Dice gain on labeled patches (points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, path)


def plot_training_curves(groups: Mapping[str, Sequence[Path]], labels: Mapping[str, str], path: Path,
                         heading: str = "training curves (mean over seeds)") -> Path:
    """Loss and each loss term vs step (mean over seeds), plus validation mean Dice when logged.

    A panel is drawn only for terms that are non-zero in some run (e.g. ``loss_tri`` is absent
    when no preset uses the triplet loss).
    """
    plt = pyplot_agg()
    panels: List[Tuple[str, str, str]] = []
    curves: Dict[Tuple[str, str], Dict[str, Tuple[np.ndarray, np.ndarray]]] = {}
    candidates = [("train", term, term) for term in LOSS_TERMS] + [("validation", "mean_dice", "validation mean Dice")]
    for record_type, key, title in candidates:
        per_group = {group: mean_curve(run_dirs, record_type, key) for group, run_dirs in groups.items()}
        if any(values.size and np.any(values != 0) for _, values in per_group.values()):
            panels.append((record_type, key, title))
            curves[(record_type, key)] = per_group
    columns = min(3, max(len(panels), 1))
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    for ax, (record_type, key, title) in zip(axes.ravel(), panels):
        for group, (steps, values) in curves[(record_type, key)].items():
            if steps.size:
                ax.plot(steps, values, label=labels.get(group, group), marker="." if steps.size < 20 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if panels:
        axes.ravel()[0].legend(fontsize=7)
    else:
        axes[0, 0].text(0.5, 0.5, "no training events found", ha="center", va="center")
    fig.suptitle(heading, fontsize=11)
    fig.tight_layout()
    return save_png(fig, path)


def plot_run(run_dir: Path, path: Optional[Path] = None) -> Path:
    """``plbopt plot``: the training curves of one run folder from its ``events.jsonl``.

    Writes ``path`` (default ``RUN_DIR/training_curves.png``); a folder without training events
    is a :class:`ConfigError` naming it.
    """
    from ..engine.events import EVENTS_FILE

    run_dir = Path(run_dir)
    if not any(record.get("type") == "train" for record in read_events(run_dir)):
        raise ConfigError(f"{run_dir / EVENTS_FILE}: no training events (not a run folder, or no step logged yet)")
    return plot_training_curves({run_dir.name: [run_dir]}, {}, Path(path) if path else run_dir / "training_curves.png",
                                heading=f"training curves of {run_dir.name}")
