"""Accuracy and cost against the number of replicas R (`ray-codistill tune --replicas 2 3 4 8`).

One Tune search per R over the same space file (tuning/spaces/replicas.yaml: each teacher rule's
distillation weight, all-reduce's learning rate; chosen on validation, the best re-run with the
final seeds), every experiment with the same per-worker batch and steps. Each experiment gets
`cpus / R` CPUs per worker, so one experiment of any R fits on the same CPUs and R = 8 runs on a
2-core machine. Then one table against R (`scaling.md`, `scaling.parquet`) and a plot of test
accuracy against R (`accuracy_vs_r.png`), one line per group, error bars over seeds.

A search folder that already holds its `tune.parquet` is read, not run again (`--overwrite` runs
it again): an interrupted study goes on from the R it had not finished.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from ray_codistill import report, tune
from ray_codistill.config import ExperimentConfig
from ray_codistill.console import say
from ray_codistill.errors import ConfigError
from ray_codistill.fmt import DASH, human_bytes, to_markdown
from ray_codistill.plots import labels
from ray_codistill.results import write_atomic, write_parquet, write_text

PLOT = "accuracy_vs_r.png"


def config_at(base: ExperimentConfig, r: int, cpus: float) -> ExperimentConfig:
    """The base config with R replicas (R workers for all-reduce), sharing `cpus` CPUs."""
    # rounded down to Ray's resource precision (1e-4): 3 x 0.666667 would ask for more than 2
    per_worker = math.floor(cpus / (r * base.workers_per_replica) * 1e4) / 1e4
    return base.replace(name=f"{base.name}-r{r}", replicas=r, cpus_per_worker=per_worker)


def study(base: ExperimentConfig, space: tune.SearchSpace, rs: list[int], cpus: float,
          address: str | None = None, overwrite: bool = False,
          max_concurrent: int | None = None) -> tuple[str, Path]:
    """Search at every R, then tabulate and plot the re-runs against R. Returns (table, folder)."""
    if not rs or any(r < 2 for r in rs):
        raise ConfigError(f"replicas: got {rs}, need values >= 2 (codistillation needs a peer)")
    if cpus <= 0:
        raise ConfigError(f"cpus: got {cpus}, must be > 0")
    out = Path(base.storage_path).resolve() / base.name
    frames = []
    for r in rs:
        cfg = config_at(base, r, cpus)
        folder = Path(cfg.storage_path).resolve() / cfg.name
        if (folder / "tune.parquet").exists() and not overwrite:
            say(f"R = {r}: reading the finished search in {folder}")
        else:
            say(f"R = {r}: searching ({cfg.cpus_per_worker:g} CPU per worker)")
            tune.search(cfg, space, address=address, overwrite=True, max_concurrent=max_concurrent)
        frames.append(reruns(pd.read_parquet(folder / "tune.parquet"), r))
    rows = pd.concat(frames, ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(out / "scaling.parquet", rows)
    table = to_markdown(scaling_table(rows))
    write_text(out / "scaling.md", table)
    plot_accuracy(rows, out / PLOT)
    return table, out


def reruns(results: pd.DataFrame, r: int) -> pd.DataFrame:
    """One row per finished re-run of a search (per architecture when its replicas differ): its
    group, chosen parameters (`params`, JSON), model and parameter count (`model_params`), figures."""
    final = results[(results["phase"] == "final") & (results["status"] == "finished")]
    summaries = report.load_summaries(final["path"]).drop(columns=["group"]).rename(columns={"params": "model_params"})
    # joined by the experiment's name, its folder's (a mixed run gives several summary rows)
    chosen = final.assign(experiment=[Path(p).name for p in final["path"]])[["experiment", "group", "params"]]
    return summaries.merge(chosen, on="experiment", how="left", validate="many_to_one").assign(replicas=r)


def _chosen(params: str) -> str:
    """The chosen values, without those fixed for the whole group (e.g. the teacher rule)."""
    return ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in json.loads(params).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)) or DASH


def scaling_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per R and group: the chosen parameters and mean ± std (over seeds) of the figures (test and
    ensemble accuracy, or a language model's losses in nats per token)."""
    lm = (rows["task"] == "lm").all()
    out = []
    models = report.several_models(rows)  # a large and a small model: a row per architecture
    figures = [f"test {'loss' if lm else 'acc'}", f"ensemble {'loss' if lm else 'acc'}", "disagreement", "churn"]
    for keys, g in rows.groupby(["replicas", "group", *(["model"] if models else [])], sort=False):
        single = (g["method"] == "allreduce").all()
        out.append({
            "R": keys[0], "group": keys[1], **({"model": keys[2]} if models else {}),
            "chosen": _chosen(g["params"].iloc[0]), "seeds": len(g), **report.cells(g, single, figures),
            "wall time (s)": f"{g['wall_time_s'].median():.0f}",
            "fetch p50 / p99 (ms)": DASH if g["fetch_ms_p50"].isna().all() else
            f"{g['fetch_ms_p50'].median():.1f} / {g['fetch_ms_p99'].median():.1f}",
            "broker peak RSS": DASH if g["broker_peak_rss_bytes"].isna().all() else
            human_bytes(g["broker_peak_rss_bytes"].median()),
        })
    table = pd.DataFrame(out)
    first = {g: i for i, g in enumerate(dict.fromkeys(rows["group"]))}  # the space file's order
    return table.sort_values(["group", "R"], key=lambda c: c.map(first) if c.name == "group" else c,
                             kind="stable")


def plot_accuracy(rows: pd.DataFrame, path: Path) -> Path:
    """Mean replica test accuracy and ensemble accuracy against R, per group (a language model's:
    test losses in nats per token)."""
    lm = (rows["task"] == "lm").all()
    label, scale = ("loss", 1) if lm else ("accuracy", 100)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    short = "loss" if lm else "acc"
    for ax, column, title in ((axes[0], f"test_{short}", f"mean replica test {label}"),
                              (axes[1], f"ensemble_test_{short}", f"ensemble test {label}")):
        # one colour per group (and model, when they differ) in both
        for i, (group, g) in enumerate(rows.groupby(labels(rows, "group"), sort=False)):
            stats = (g.groupby("replicas")[column].agg(["mean", "std"]) * scale).dropna(subset=["mean"])
            if not stats.empty:
                ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3,
                            label=group, color=f"C{i}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(rows["replicas"].unique()), [str(r) for r in sorted(rows["replicas"].unique())])
        ax.set_xlabel("replicas R")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test loss (nats per token)" if lm else "test accuracy (%)")
    axes[0].legend(title="mean ± std over seeds")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path
