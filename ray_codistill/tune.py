"""Ray Tune searches: regularisation strength, staleness, and methods compared on the same budget.

A search space file (YAML, see tuning/spaces/) names groups (a method and the hyperparameters to
search for it), the seeds every configuration is searched with, and the seeds the best
configuration of each group is re-run with. Each Tune trial runs one whole experiment through
`launcher.run` (the broker and R worker groups for codistill; one worker group for allreduce):
Ray Train V2 inside a Tune function trial. Selection uses validation figures only (accuracy, or
a language model's loss: `tasks.py`); the test figures in the final table come from the re-runs
alone.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
import yaml

from ray_codistill import launcher, report
from ray_codistill.ledger import get_ledger
from ray_codistill.cluster import connect
from ray_codistill.config import METHODS, ExperimentConfig
from ray_codistill.errors import ClusterError, ConfigError
from ray_codistill.console import say
from ray_codistill.fmt import DASH, to_markdown
from ray_codistill.results import write_atomic, write_parquet, write_text
from ray_codistill.placement import cluster_nodes, concurrent_experiments
from ray_codistill.plots import plot_curves
from ray_codistill.tasks import CLASSIFY, Task, task_of

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
RESULT_COLUMNS = ["phase", "group", "method", "trial", "experiment", "seed", "status", "step", "val_acc",
                  "val_loss", "test_acc", "test_loss", "ensemble_test_acc", "ensemble_test_loss", "wall_time_s",
                  "params"]


@dataclass
class Group:
    name: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value or {dist: args}


@dataclass
class SearchSpace:
    groups: list[Group]
    seeds: list[int]
    final_seeds: list[int]


def load_space(path: str | Path, base: ExperimentConfig) -> SearchSpace:
    """Read and check a search space file against the base config (every key must exist)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space: file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"groups", "seeds", "final_seeds"}
    if unknown:
        raise ConfigError(f"space.{sorted(unknown)[0]}: unknown key; allowed keys: groups, seeds, final_seeds")
    if not isinstance(raw.get("groups"), dict) or not raw["groups"]:
        raise ConfigError("space.groups: required, a mapping of group name -> {method, params}")
    groups = []
    for name, spec in raw["groups"].items():
        spec = spec or {}
        method = spec.get("method", name)
        if method not in METHODS:
            raise ConfigError(f"space.groups.{name}.method: got {method!r}, allowed values: {', '.join(METHODS)}")
        params = spec.get("params") or {}
        for key, value in params.items():
            if isinstance(value, dict) and (len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS):
                raise ConfigError(f"space.groups.{name}.params.{key}: use one of {', '.join(DISTRIBUTIONS)}, "
                                  f"e.g. {{grid: [0.1, 1.0]}}")
        groups.append(Group(str(name), method, params))
        base.replace(method=method, **{k: _example(v) for k, v in params.items()})  # refuses unknown keys
    seeds = [int(s) for s in raw.get("seeds", [base.seed])]
    final = [int(s) for s in raw.get("final_seeds", [0, 1, 2])]
    if not seeds or not final:
        raise ConfigError("space.seeds / space.final_seeds: need at least one seed each")
    return SearchSpace(groups, seeds, final)


def _example(value: Any) -> Any:
    """One admissible value of a parameter spec (to validate it against the config)."""
    if not isinstance(value, dict):
        return value
    (dist, args), = value.items()
    return args[0] if dist in ("grid", "choice") else float(args[0])


def _domain(value: Any):
    """A Tune search domain from a parameter spec (a plain value stays fixed)."""
    from ray import tune
    if not isinstance(value, dict):
        return value
    (dist, args), = value.items()
    if dist == "grid":
        return tune.grid_search(list(args))
    if dist == "choice":
        return tune.choice(list(args))
    return getattr(tune, dist)(float(args[0]), float(args[1]))  # uniform, loguniform


# -- the trial -----------------------------------------------------------------------------------

def run_trial(params: dict, base: dict, group: str, phase: str, trials_dir: str) -> None:
    """One Tune trial: one whole experiment; reports validation accuracy and loss as it goes."""
    from ray import tune
    overrides = {k: v for k, v in params.items() if k != "seed"}
    trial = tune.get_context().get_trial_id()
    cfg = ExperimentConfig.from_dict(base).replace(
        seed=params["seed"], storage_path=trials_dir, name=f"{base['name']}-{group}-{phase}-{trial}", **overrides)
    reported = {"step": 0}

    def report_evaluations(rows: pd.DataFrame) -> None:
        # every evaluation step that all models have reached, once and in order, whenever the
        # poll sees it: ASHA then compares trials at the same steps whatever the timing
        if rows.empty or "val/acc" not in rows:
            return
        evals = rows.dropna(subset=["val/acc"]).pivot_table(index="step", columns="replica",
                                                            values=["val/acc", "val/loss"])
        for step, vals in evals[evals["val/acc"].notna().sum(axis=1) == cfg.num_models].iterrows():
            if reported["step"] < step < cfg.steps:
                reported["step"] = int(step)
                tune.report({"step": int(step), "val_acc": float(vals["val/acc"].mean()),
                             "val_loss": float(vals["val/loss"].mean())})

    def on_progress(_progress: dict) -> None:
        try:
            rows = ray.get(get_ledger(cfg.name).rows.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the next poll, or the end of the run, reports them
            return
        report_evaluations(pd.DataFrame(rows))

    result = launcher.run(cfg, overwrite=True, progress_every_s=5.0, on_progress=on_progress)
    report_evaluations(pd.read_parquet(result.path / "metrics.parquet"))  # those the polls did not see
    s = result.summary
    tune.report({"step": cfg.steps, "val_acc": float(np.mean([r["val_acc"] for r in s["replicas"]])),
                 "val_loss": float(np.mean([r["val_loss"] for r in s["replicas"]])),
                 "test_acc": s["test_acc_mean"], "ensemble_test_acc": s["ensemble_test_acc"],
                 "test_loss": s["test_loss_mean"], "ensemble_test_loss": s["ensemble_test_loss"],
                 "wall_time_s": s["wall_time_s"], "experiment": cfg.name, "path": str(result.path)})


def _tune(base: ExperimentConfig, group: Group, param_space: dict, phase: str, folder: Path,
          samples: int, scheduler: str, max_concurrent: int | None = None) -> pd.DataFrame:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    # every resource one experiment holds (CPUs, GPUs, the placement's resources and labelled
    # nodes), not CPUs alone: more trials than the GPUs (say) hold would only wait
    concurrent = concurrent_experiments(base.replace(method=group.method), cluster_nodes())
    if max_concurrent is not None:  # a user's cap: room for others on a shared cluster, or trials in order
        concurrent = min(concurrent, max_concurrent)
    trainable = tune.with_parameters(run_trial, base=base.replace(method=group.method).to_dict(), group=group.name,
                                     phase=phase, trials_dir=str(folder / "trials"))
    sched = (ASHAScheduler(time_attr="step", max_t=base.steps, grace_period=max(base.eval_every, base.steps // 8))
             if scheduler == "asha" and phase == "search" else None)
    tuner = tune.Tuner(
        # the trial only drives: its worker groups hold the CPUs (Tune refuses an empty request)
        tune.with_resources(trainable, {"CPU": 0, "memory": 2**20}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=f"val_{task_of(base).metric}", mode=task_of(base).mode,
                                    num_samples=samples, scheduler=sched,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=f"{base.name}-{group.name}-{phase}", storage_path=str(folder / "ray_tune"),
                                  verbose=1),
    )
    say(f"tune {group.name} ({phase}): up to {concurrent} trial(s) at once")
    rows = []
    for res in tuner.fit():
        m, cfg = res.metrics or {}, res.config or {}
        finished = m.get("step") == base.steps and "test_acc" in m
        rows.append({"phase": phase, "group": group.name, "method": group.method,
                     "trial": m.get("trial_id"), "experiment": m.get("experiment"), "path": m.get("path"),
                     "seed": cfg.get("seed"), "status": "finished" if finished else
                     ("stopped early" if res.error is None else f"failed: {type(res.error).__name__}"),
                     **{k: m.get(k) for k in ("step", "val_acc", "val_loss", "test_acc", "test_loss",
                                              "ensemble_test_acc", "ensemble_test_loss", "wall_time_s")},
                     # the exact values (pandas turns an int column holding a null into floats)
                     "params": json.dumps({k: v for k, v in cfg.items() if k != "seed"}, sort_keys=True),
                     **{k: v for k, v in cfg.items() if k != "seed"}})
    return pd.DataFrame(rows)


def search(base: ExperimentConfig, space: SearchSpace, samples: int = 1, scheduler: str = "none",
           address: str | None = None, overwrite: bool = False,
           max_concurrent: int | None = None) -> tuple[str, Path]:
    """Search every group, re-run each group's best configuration over the final seeds, report.

    Returns the markdown table of the re-runs and the folder holding `tune.parquet`, the table,
    the heatmaps and the curves.
    """
    if scheduler not in ("asha", "none"):
        raise ConfigError(f"scheduler: got {scheduler!r}, allowed values: asha, none")
    if samples < 1:
        raise ConfigError(f"samples: got {samples}, must be >= 1")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"max_concurrent: got {max_concurrent}, must be >= 1")
    folder = (Path(base.storage_path) / base.name).resolve()
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise ConfigError(f"name: search folder {folder} exists already; pick another name or pass --overwrite")
        shutil.rmtree(folder)
    connect(address)
    if scheduler == "asha":
        _check_state_api()
    frames = []
    for group in space.groups:
        best = _only_configuration(group)
        if best is None:
            grid = {k: _domain(v) for k, v in group.params.items()}
            frames.append(_tune(base, group, {**grid, "seed": _domain({"grid": space.seeds})}, "search", folder,
                                samples, scheduler, max_concurrent))
            best = _best(frames[-1], group, task_of(base))
            say(f"tune {group.name}: best by validation {task_of(base).label}: {best}")
        else:  # nothing to choose between: straight to the re-runs
            say(f"tune {group.name}: one configuration, no search: {best}")
        frames.append(_tune(base, group, {**best, "seed": _domain({"grid": space.final_seeds})}, "final", folder,
                            1, "none", max_concurrent))
    results = pd.concat(frames, ignore_index=True)
    write_parquet(folder / "tune.parquet", results)
    table, _ = write_report(folder, results, task_of(base))
    return table, folder


def _check_state_api() -> None:
    """ASHA stops trials by killing them; Ray Train then frees a killed run's placement group
    through a helper that asks Ray's State API (served by the dashboard) whether the run's
    controller is gone. Without it the stopped trials' CPUs stay reserved and later trials wait
    for them forever: refuse that before anything starts."""
    from ray._private.worker import get_dashboard_url
    from ray.util.state import list_nodes
    url = get_dashboard_url()  # this cluster's, from its GCS ("" when it runs without a dashboard)
    try:
        if not url:
            raise ConnectionError("the cluster runs no dashboard")
        list_nodes(address=url if "://" in url else f"http://{url}", limit=1, timeout=10)
    except Exception as err:  # noqa: BLE001 - no State API: ConnectionError, RayStateApiException, ...
        raise ClusterError(
            "--scheduler asha needs Ray's dashboard (its State API) on the cluster: Ray Train uses it to "
            "free the CPUs of trials that ASHA stops, which otherwise stay reserved while later trials wait "
            "for them; start Ray with the dashboard (the default of `ray start` and `ray.init` with "
            f"ray[default]) or use --scheduler none ({err})") from err


def _only_configuration(group: Group) -> dict | None:
    """The group's parameters when they allow a single configuration (fixed values, grids and
    choices of one value), else None."""
    fixed = {}
    for key, value in group.params.items():
        if isinstance(value, dict):
            (dist, args), = value.items()
            if dist not in ("grid", "choice") or len(args) != 1:
                return None
            value = args[0]
        fixed[key] = value
    return fixed


def _best(rows: pd.DataFrame, group: Group, task: Task = CLASSIFY) -> dict:
    """The finished configuration with the best mean validation figure over the search seeds
    (accuracy, or a language model's loss); among equals (a small validation set ties often) the
    first in the search's (grid) order."""
    done = rows[rows["status"] == "finished"]
    if done.empty:
        raise launcher.RunError(f"tune {group.name}: no search trial finished; see the Tune output above")
    means = done.groupby("params", sort=False)[f"val_{task.metric}"].mean()
    return json.loads(means.idxmax() if task.mode == "max" else means.idxmin())


# -- report --------------------------------------------------------------------------------------

def final_table(results: pd.DataFrame, lm: bool = False) -> pd.DataFrame:
    """Per group, the best configuration and its re-runs' figures (mean ± std over seeds): val and
    test accuracy, or a language model's (`lm`) losses in nats per token and bits per character. A
    group whose replicas differ (`replica_overrides`) gives a row per architecture, from the
    re-runs' summaries, with the columns model and params."""
    final = results[(results["phase"] == "final") & (results["status"] == "finished")]
    figures = (["val loss", "test loss", "test bits/char", "ensemble loss"] if lm
               else ["val acc", "test acc", "ensemble acc"])
    rows, sizes = [], False
    for group, g in final.groupby("group", sort=False):
        params = json.loads(g["params"].iloc[0])
        chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        single = (g["method"] == "allreduce").all()
        mixed = _summaries_of_mixed(g)
        for _, model, figs in (report.row_groups(mixed) if mixed is not None else [(group, None, g)]):
            sizes |= model is not None
            rows.append({"group": group, "model": model, "params": report.count(figs["params"].iloc[0])
                         if model is not None else DASH, "method": g["method"].iloc[0], "best config": chosen,
                         "seeds": len(figs), **report.cells(figs, single, figures)})
    columns = ["group", *(["model", "params"] if sizes else []), "method", "best config", "seeds", *figures]
    return pd.DataFrame(rows, columns=columns)


def _summaries_of_mixed(reruns: pd.DataFrame) -> pd.DataFrame | None:
    """The re-runs' summaries, a row per architecture, when their replicas differ; else None."""
    paths = reruns["path"].dropna() if "path" in reruns.columns else []
    if len(paths) == len(reruns) and len(paths):
        summaries = report.load_summaries([Path(p) for p in paths])
        if report.several_models(summaries):
            return summaries
    return None


def plot_heatmap(search_rows: pd.DataFrame, x: str, y: str, path: Path, task: Task = CLASSIFY) -> bool:
    """The validation figure (accuracy in %, or a language model's loss) over two hyperparameters:
    the mean over seeds, the best over the other parameters."""
    if not {x, y} <= set(search_rows.columns) or search_rows[[x, y]].isna().any().any():
        return False
    done = search_rows[search_rows["status"] == "finished"]
    others = [c for c in done.columns if c not in RESULT_COLUMNS + ["path", x, y] and done[c].notna().any()]
    col = f"val_{task.metric}"
    means = done.groupby([x, y] + others, dropna=False)[col].mean().reset_index()
    best = means.groupby([y, x])[col]
    table = (best.max() if task.mode == "max" else best.min()).unstack(x)
    if table.empty:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scale, digits = (1, 3) if task.is_lm else (100, 1)
    # brighter is better either way: a loss map uses the reversed colours
    im = ax.imshow(table.values * scale, cmap="viridis_r" if task.mode == "min" else "viridis", aspect="auto",
                   origin="lower")
    ax.set_xticks(range(len(table.columns)), [f"{v:g}" for v in table.columns])
    ax.set_yticks(range(len(table.index)), [f"{v:g}" for v in table.index])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    for (i, j), v in np.ndenumerate(table.values):
        if not math.isnan(v):
            ax.text(j, i, f"{v * scale:.{digits}f}", ha="center", va="center", color="w")
    label = "validation loss (nats/token)" if task.is_lm else "validation accuracy (%)"
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(f"{search_rows['group'].iloc[0]}: {label}")
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return True


def write_report(folder: Path, results: pd.DataFrame, task: Task = CLASSIFY) -> tuple[str, list[Path]]:
    """`tune.md` (the final table), heatmaps per group, curves of the re-runs."""
    table = to_markdown(final_table(results, task.is_lm))
    write_text(folder / "tune.md", table)
    written = []
    for group, g in results[results["phase"] == "search"].groupby("group", sort=False):
        path = folder / f"heatmap_{group}.png"
        if plot_heatmap(g, "optim.weight_decay", "codistill.alpha", path, task) or \
                plot_heatmap(g, "optim.weight_decay", "optim.lr", path, task):
            written.append(path)
    final_dirs = [Path(p) for p in results.loc[results["phase"] == "final", "path"].dropna()]
    if final_dirs:
        written += plot_curves(report.load_metrics(final_dirs), folder)
    return table, written
