"""Learning curves a reader takes in at a glance: per method (and per architecture when the
replicas differ), the mean over its runs as one thick line with a min-max band, each run a thin
line behind it.

A "run" is one replica of one experiment (one pair of replicas for the divergence curves), so a
codistillation of 2 replicas over 3 seeds averages 6 runs and all-reduce over 3 seeds 3. The band
is the range of the runs at each step, the figure a table's "mean ± std" states in words.

matplotlib is imported inside the plotting function, never at import time (the CLI starts fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pandas as pd
from ray_codistill.fmt import method_rank
from ray_codistill.results import write_atomic


class Curve(NamedTuple):
    column: str       # the metric's column in metrics.parquet or divergence.parquet
    ylabel: str       # axis label, with its unit
    file: str         # the PNG's name
    log_y: bool = False
    scale: float = 1.0  # e.g. 100 to show a fraction in percent


CURVES = [
    Curve("val/acc", "validation accuracy (%)", "val_acc.png", scale=100),
    Curve("val/bpc", "validation loss (bits per character)", "val_bpc.png"),  # language models
    Curve("train/loss", "training loss (nats per sample)", "train_loss.png", log_y=True),
]
DIVERGENCE_CURVES = [
    Curve("disagreement", "top-1 disagreement on the probe set (%)", "disagreement.png", scale=100),
    Curve("sym_kl", "symmetric KL on the probe set (nats)", "symmetric_kl.png", log_y=True),
]


def labels(data: pd.DataFrame, key: str = "method") -> pd.Series:
    """Each row's line label: its method (or `key`), and its model when the rows hold more than one."""
    label = data[key].astype(str)
    if "model" in data.columns and data["model"].dropna().nunique() > 1:
        label = label + " " + data["model"].astype(str)
    return label


def band(rows: pd.DataFrame, column: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, summary): the runs as columns indexed by step, and per step their mean, min and max.

    A run is one (experiment, replica) of `rows` (the keys that exist); a step some runs lack (one
    that stopped early) is averaged over the runs that have it.
    """
    keys = [k for k in ("experiment", "seed", "replica") if k in rows.columns]
    data = rows.loc[rows[column].notna(), [*keys, "step", column]]
    runs = data.groupby([*keys, "step"], dropna=False)[column].mean().unstack(keys) if keys else \
        data.groupby("step")[column].mean().to_frame()
    runs = runs.sort_index()
    return runs, pd.DataFrame({"mean": runs.mean(axis=1), "min": runs.min(axis=1), "max": runs.max(axis=1)})


def plot(data: pd.DataFrame, curve: Curve, path: Path, show_runs: bool = True) -> None:
    """One PNG: per label the mean over its runs, a min-max band, and (show_runs) each run thin."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The object-oriented API with an Agg canvas: no pyplot, so no global backend switch and no
    # figure left open in the caller's process (a notebook keeps its own backend).
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    data = data.loc[data[curve.column].notna()]
    line_labels = labels(data)
    for i, label in enumerate(sorted(line_labels.unique(), key=method_rank)):  # in table order
        runs, summary = band(data[line_labels == label], curve.column)
        runs, summary = runs * curve.scale, summary * curve.scale
        color = f"C{i % 10}"
        if show_runs:
            for run in runs.columns:
                series = runs[run].dropna()
                ax.plot(series.index, series.to_numpy(), color=color, alpha=0.3, linewidth=0.6)
        if runs.shape[1] > 1:
            ax.fill_between(summary.index, summary["min"], summary["max"], color=color, alpha=0.15, linewidth=0)
        ax.plot(summary.index, summary["mean"], color=color, linewidth=2.0,
                label=f"{label} ({runs.shape[1]} run{'s' if runs.shape[1] != 1 else ''})")
    if curve.log_y and (data[curve.column] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(curve.ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(title="mean over runs; band: min to max", fontsize="small")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_curves(metrics: pd.DataFrame, out_dir: str | Path, curves=CURVES, show_runs: bool = True) -> list[Path]:
    """Write `val_acc.png` and `train_loss.png` (text: `val_bpc.png`; or the plots `curves` name)
    into `out_dir`. A plot whose metric is missing or all NaN is skipped. Returns the paths written."""
    out_dir = Path(out_dir)
    written: list[Path] = []
    if metrics.empty or "step" not in metrics.columns:
        return written
    text = "val/bpc" in metrics.columns and metrics["val/bpc"].notna().any()  # a language model's
    for curve in curves:
        if curve.column not in metrics.columns or metrics[curve.column].isna().all():
            continue
        if text:  # its accuracy and loss are per token (character)
            curve = curve._replace(ylabel=curve.ylabel.replace("(%)", "per token (%)").replace("per sample", "per token"))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / curve.file
        plot(metrics, curve, path, show_runs)
        written.append(path)
    return written
