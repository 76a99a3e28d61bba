"""Tables and plots from result folders: what `ray-codistill report DIR...` prints and draws.

An experiment folder, as the launcher writes it, holds `summary.json` (final accuracies, wall time,
bytes exchanged, config, versions, git revision) and `metrics.parquet` (a tidy per-step table:
experiment, method, replica, seed, step, then one column per metric, NaN where not measured).
This module finds such folders, loads them into pandas, aggregates over seeds (mean ± sample std,
the airbench discipline) and draws learning curves (plots.py). It reads results only; it never
starts Ray.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
from ray_codistill.errors import ReportError
from ray_codistill.fmt import DASH, human_bytes, method_rank, to_markdown
from ray_codistill.plots import DIVERGENCE_CURVES, plot_curves
from ray_codistill.tasks import task_of

SUMMARY = "summary.json"
METRICS = "metrics.parquet"
DIVERGENCE = "divergence.parquet"
META_COLUMNS = ("experiment", "method", "replica", "seed", "step")


# --- finding and loading -----------------------------------------------------------------------


def find_experiments(paths: Sequence[str | Path] | str | Path) -> list[Path]:
    """Experiment folders (those holding `summary.json`) at, or one or two levels below, `paths`.

    A path may be an experiment folder itself, or a storage folder of experiments, or a folder of
    such storage folders (e.g. one per sweep). Returned sorted and without duplicates.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: set[Path] = set()
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise ReportError(f"{p}: no such file or directory")
        if (p / SUMMARY).is_file():
            found.add(p)
            continue
        for pattern in (f"*/{SUMMARY}", f"*/*/{SUMMARY}"):
            found.update(s.parent for s in p.glob(pattern) if s.is_file())
    if not found:
        shown = ", ".join(str(p) for p in paths) or "(no path given)"
        raise ReportError(
            f"no experiment found in {shown}: expected folders containing {SUMMARY} "
            f"at the given path or one or two levels below it"
        )
    return sorted(found)


def _read_summary(path: Path) -> dict:
    try:
        return json.loads((path / SUMMARY).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path / SUMMARY}: cannot read: {e}") from e


def _float_or_nan(x) -> float:
    return math.nan if x is None else float(x)


def _mean_or_nan(xs: list) -> float:
    xs = [float(x) for x in xs if x is not None]
    return statistics.fmean(xs) if xs else math.nan


def _median_or_nan(xs: list) -> float:
    xs = [float(x) for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else math.nan


def load_summaries(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """One row per experiment, from each folder's `summary.json`.

    Columns: experiment, method, seed, num_models, test_acc (the replicas' mean test accuracy),
    ensemble_test_acc (NaN for a single model), best_replica_acc, wall_time_s, bytes_exchanged,
    allreduce_bytes, churn, disagreement (final probe round, mean over pairs), fetch_ms_p50,
    fetch_ms_p99, serve_ms_p50, serve_ms_p99 (the broker's CPU time per fetch),
    broker_peak_rss_bytes, broker_teacher_bytes, broker_niceness (NaN in summaries older than it),
    group (the method: rows are aggregated per group), task ("lm" for language models, else
    "classify"), val_loss and test_loss (the replicas' means, nats per sample or token),
    ensemble_test_loss, model and params (the replicas' model and parameter count).

    An experiment whose replicas are of different architectures (`replica_overrides`) gives one
    row per architecture: its figures are that architecture's replicas' (never a mean over a large
    and a small model), the ensemble and exchange figures the whole run's; `model` tells them apart.
    """
    rows = []
    for d in dirs:
        s = _read_summary(Path(d))
        everyone = s.get("replicas") or []
        models = list(dict.fromkeys(r.get("model") for r in everyone)) or [None]
        for model in models:
            replicas = [r for r in everyone if r.get("model") == model]
            rows.append(_summary_row(d, s, replicas, model if len(models) > 1 else None))
    return pd.DataFrame(rows)


def _summary_row(d, s: dict, replicas: list[dict], architecture: str | None) -> dict:
    """One row of `load_summaries`: the experiment, or one architecture of a mixed experiment."""
    replica_accs = [float(r["test_acc"]) for r in replicas if r.get("test_acc") is not None]
    broker = list((s.get("broker") or {}).values())
    mean = (lambda key: _mean_or_nan([r.get(key) for r in replicas])) if architecture else None
    return {
        "experiment": s.get("experiment", Path(d).name),
        "method": s["method"],
        "seed": s.get("seed"),
        "num_models": s.get("num_models", len(replicas) or 1),
        "test_acc": mean("test_acc") if mean else _float_or_nan(s.get("test_acc_mean")),
        "ensemble_test_acc": _float_or_nan(s.get("ensemble_test_acc")),
        "best_replica_acc": max(replica_accs) if replica_accs else math.nan,
        "wall_time_s": _float_or_nan(s.get("wall_time_s")),
        "bytes_exchanged": s.get("bytes_exchanged", 0),
        "allreduce_bytes": s.get("allreduce_bytes", 0),
        "churn": _float_or_nan((s.get("prediction_churn") or {}).get("mean")),
        "disagreement": _mean_or_nan([p["disagreement"] for p in (s.get("final_divergence") or {}).get(
            "pairs", [])]),
        # the replicas' own fetch round trips: the median of their p50s, the worst p99
        "fetch_ms_p50": _median_or_nan([r.get("fetch_ms_p50") for r in replicas]),
        "fetch_ms_p99": max([r["fetch_ms_p99"] for r in replicas if r.get("fetch_ms_p99") is not None],
                            default=math.nan),
        # the broker's CPU time computing those answers (its counters): the same aggregation
        "serve_ms_p50": _median_or_nan([c.get("serve_ms_p50") for c in broker]),
        "serve_ms_p99": max([c["serve_ms_p99"] for c in broker if c.get("serve_ms_p99") is not None],
                            default=math.nan),
        "broker_peak_rss_bytes": _float_or_nan((s.get("broker_memory") or {}).get("peak_rss_bytes")),
        "broker_teacher_bytes": _float_or_nan((s.get("broker_memory") or {}).get("teacher_bytes")),
        "broker_niceness": _float_or_nan(s.get("broker_niceness")),
        "group": s["method"],
        "task": task_of(s["config"]).name if "config" in s else "classify",
        "val_acc": _mean_or_nan([r.get("val_acc") for r in replicas]),
        "val_loss": _mean_or_nan([r.get("val_loss") for r in replicas]),
        "test_loss": mean("test_loss") if mean else _float_or_nan(s.get("test_loss_mean")),
        "ensemble_test_loss": _float_or_nan(s.get("ensemble_test_loss")),
        "model": replicas[0].get("model") if replicas else None,
        "params": replicas[0].get("params") if replicas else None,
    }


def load_metrics(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """All `metrics.parquet` tables stacked; folders without one are skipped.

    Metric columns missing from some experiments come out as NaN, as in each tidy table. `model`
    names each replica's model (from `summary.json`; missing before the run has finished), so that
    plots keep a large and a small model apart.
    """
    frames = [_with_models(Path(d), pd.read_parquet(Path(d) / METRICS, engine="pyarrow"))
              for d in dirs if (Path(d) / METRICS).is_file()]
    if not frames:
        return pd.DataFrame(columns=list(META_COLUMNS))
    return pd.concat(frames, ignore_index=True, sort=False)


def _with_models(d: Path, metrics: pd.DataFrame) -> pd.DataFrame:
    if not (d / SUMMARY).is_file():
        return metrics
    models = {r.get("replica", i): r.get("model") for i, r in enumerate(_read_summary(d).get("replicas") or [])}
    return metrics.assign(model=metrics["replica"].map(models)) if models else metrics


def load_divergence(dirs: Iterable[str | Path]) -> pd.DataFrame:
    """All `divergence.parquet` tables stacked, with `replica` naming the pair ("0-1")."""
    frames = [pd.read_parquet(Path(d) / DIVERGENCE, engine="pyarrow") for d in dirs
              if (Path(d) / DIVERGENCE).is_file()]
    if not frames:
        return pd.DataFrame(columns=list(META_COLUMNS))
    df = pd.concat(frames, ignore_index=True, sort=False)
    df["replica"] = df["replica_a"].astype(str) + "-" + df["replica_b"].astype(str)
    return df


# --- the comparison table ----------------------------------------------------------------------


def pct_mean_std(values: pd.Series) -> str:
    """Fractions as percent, mean ± sample std over seeds (the sample std: the seeds are a sample of
    the seeds one could have run); one seed shows the value alone."""
    return num_mean_std(values, digits=1, scale=100.0)


def num_mean_std(values: pd.Series, digits: int = 3, scale: float = 1.0) -> str:
    v = values.dropna().astype(float) * scale
    if v.empty:
        return DASH
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


# Every figure a table of test results can show, by column name, from rows of `load_summaries`
# (or Tune's re-run rows, which carry the same columns): mean ± sample std over the rows (seeds).
# `single` is True for rows of one model (all-reduce), whose ensemble and divergence are "–".
CELLS = {
    "val acc": lambda g, single: pct_mean_std(g["val_acc"]),
    "test acc": lambda g, single: pct_mean_std(g["test_acc"]),
    "ensemble acc": lambda g, single: DASH if single else pct_mean_std(g["ensemble_test_acc"]),
    "churn": lambda g, single: DASH if single else pct_mean_std(g.get("churn", pd.Series(dtype=float))),
    "val loss": lambda g, single: num_mean_std(g["val_loss"]),
    "test loss": lambda g, single: num_mean_std(g["test_loss"]),
    "test bits/char": lambda g, single: num_mean_std(g["test_loss"], scale=1 / math.log(2)),
    "ensemble loss": lambda g, single: DASH if single else num_mean_std(g["ensemble_test_loss"]),
    "disagreement": lambda g, single: DASH if single else pct_mean_std(g["disagreement"]),
}
ACCURACY_FIGURES = ["test acc", "ensemble acc", "churn"]
LOSS_FIGURES = ["val loss", "test loss", "test bits/char", "ensemble loss", "disagreement"]


def cells(g: pd.DataFrame, single: bool, names: Sequence[str]) -> dict:
    """The named cells (`CELLS`) of one table row aggregated over the rows `g`."""
    return {name: CELLS[name](g, single) for name in names}


def count(n) -> str:
    """A parameter count with thousands separators; "–" when unknown."""
    return DASH if n is None or (isinstance(n, float) and math.isnan(n)) else f"{int(n):,}"


def several_models(rows: pd.DataFrame) -> bool:
    """True when the rows hold more than one model: tables then give each its own row."""
    return "model" in rows.columns and rows["model"].dropna().nunique() > 1


def row_groups(rows: pd.DataFrame, key: str = "group"):
    """(label, model, rows) per table row: per `key` in method order, and per model within it,
    the largest first, when the rows hold more than one model (model None otherwise)."""
    if not several_models(rows):
        for label in sorted(rows[key].unique(), key=method_rank):
            yield label, None, rows[rows[key] == label]
        return
    firsts = rows.drop_duplicates([key, "model"])
    order = sorted(zip(firsts[key], firsts["model"], firsts["params"].astype(float)),
                   key=lambda t: (method_rank(t[0]), -t[2] if not math.isnan(t[2]) else 0.0))
    for label, model, _ in order:
        yield label, model, rows[(rows[key] == label) & (rows["model"] == model)]


def comparison_table(summaries: pd.DataFrame) -> pd.DataFrame:
    """One row per method (codistill, independent, allreduce, then others), cells as strings.

    Columns: method, seeds (experiments aggregated), test acc and ensemble acc (percent, mean ± std
    over seeds; one seed shows the value alone; "–" for single-model methods), churn (percent of
    test samples two replicas label differently, Anil et al. 2018; "–" for one model), wall time (s),
    bytes exchanged and all-reduce bytes (means, human readable).
    Language models (every summary's task "lm") get, instead of test acc to churn: val loss and
    test loss (nats per token, mean ± std over seeds), test bits/char, ensemble loss and the probe
    set's top-1 disagreement per token at the end (percent).
    Summaries of more than one model (a large and a small one) give a row per method and model,
    with the columns model and params after method.
    """
    lm = not summaries.empty and "task" in summaries.columns and (summaries["task"] == "lm").all()
    figures = LOSS_FIGURES if lm else ACCURACY_FIGURES
    sizes = several_models(summaries)
    columns = ["method", *(["model", "params"] if sizes else []), "seeds", *figures, "wall time (s)",
               "bytes exchanged", "all-reduce bytes"]
    if summaries.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for label, model, g in row_groups(summaries, "group" if "group" in summaries.columns else "method"):
        wall = g["wall_time_s"].astype(float).mean()
        rows.append({"method": label, **({"model": model, "params": count(g["params"].iloc[0])} if sizes else {}),
                     "seeds": len(g), **cells(g, (g["num_models"] == 1).all(), figures),
                     "wall time (s)": DASH if math.isnan(wall) else f"{wall:.0f}",
                     "bytes exchanged": human_bytes(g["bytes_exchanged"].astype(float).mean()),
                     "all-reduce bytes": human_bytes(g["allreduce_bytes"].astype(float).mean())})
    return pd.DataFrame(rows, columns=columns)


# --- all together ------------------------------------------------------------------------------


def report(
    paths: Sequence[str | Path] | str | Path, out_dir: str | Path | None = None
) -> tuple[str, list[Path]]:
    """Markdown comparison table and learning-curve PNGs for the experiments under `paths`.

    PNGs go to `out_dir`, by default the first path given.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    dirs = find_experiments(paths)
    markdown = to_markdown(comparison_table(load_summaries(dirs)))
    out = Path(out_dir) if out_dir is not None else Path(paths[0])
    pngs = plot_curves(load_metrics(dirs), out) + plot_curves(load_divergence(dirs), out, DIVERGENCE_CURVES)
    return markdown, pngs
