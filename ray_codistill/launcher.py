"""Runs one experiment: checks, the broker, the worker groups, and the result files.

`run(cfg)` checks everything that can be checked before a worker starts (data, model, storage,
resources), attaches to Ray (local when no address is given), starts the experiment's broker and
fits one `TorchTrainer` per replica concurrently (one for `allreduce`), shows progress while they
train (console.py), and writes `metrics.parquet` and `summary.json` under `<storage_path>/<name>`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ALL_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray
import ray.train
from ray.train.torch import TorchTrainer

from ray_codistill.broker import new_token, start_broker, stop_broker
from ray_codistill.cluster import connect
from ray_codistill.config import ConfigError, ExperimentConfig
from ray_codistill.console import RunProgress, say, train_logging
from ray_codistill.data import describe, eval_batches, load_splits, probe_split
from ray_codistill.divergence import churn, ensemble_accuracy
from ray_codistill.models import check_model
from ray_codistill.placement import broker_options, check_placement, cluster_nodes, scaling_kwargs
from ray_codistill.replica import train_loop_per_worker
from ray_codistill.errors import RunError

ID_COLUMNS = ["experiment", "method", "replica", "seed", "step"]


@dataclass
class ExperimentResult:
    path: Path
    summary: dict


# -- small file helpers ---------------------------------------------------------------------------

def write_atomic(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n"))


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: df.to_parquet(tmp, engine="pyarrow", index=False))


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def git_revision() -> str:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def versions() -> dict:
    import torch
    import torchvision
    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "pandas": pd.__version__}


# -- checks before anything starts ----------------------------------------------------------------

def prepare_folder(cfg: ExperimentConfig, overwrite: bool) -> Path:
    root = Path(cfg.storage_path).expanduser().resolve()
    path = root / cfg.name
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"name: experiment folder {path} exists already; pick another name "
                              f"(--name) or pass --overwrite to replace it")
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"storage_path: cannot write to {root}: {err.strerror or err}") from err
    return path


CONFIG_FILE = "config.json"


def resume_folder(cfg: ExperimentConfig) -> Path:
    """The folder of an experiment to resume: it must hold the config its first run wrote."""
    path = Path(cfg.storage_path).expanduser().resolve() / cfg.name
    if not (path / CONFIG_FILE).exists():
        raise ConfigError(f"name: no experiment to resume at {path} (no {CONFIG_FILE}); "
                          f"check --name and --storage")
    summary = path / "summary.json"
    status = json.loads(summary.read_text()).get("status") if summary.exists() else None
    if status in ("finished", "stopped"):
        raise ConfigError(f"name: experiment {cfg.name} at {path} has {status} already; nothing to resume")
    return path


def load_resumable(name: str, storage_path: str) -> ExperimentConfig:
    """The config an experiment started with (written by `run` before any worker starts)."""
    cfg = ExperimentConfig(name=name, storage_path=storage_path)
    raw = json.loads((resume_folder(cfg) / CONFIG_FILE).read_text())
    return ExperimentConfig.from_dict({**raw, "storage_path": storage_path})


def check_resources(cfg: ExperimentConfig) -> None:
    """Refuse a run the cluster cannot hold: too few CPUs or GPUs (RunError), or a placement that
    names labels or resources no node has (ConfigError, naming the key)."""
    need_cpu = cfg.num_models * cfg.workers_per_model * cfg.cpus_per_worker
    have = ray.cluster_resources()
    if need_cpu > have.get("CPU", 0) + 1e-9:
        raise RunError(f"the experiment needs {need_cpu:g} CPUs ({cfg.num_models} worker group(s) x "
                       f"{cfg.workers_per_model} worker(s) x cpus_per_worker={cfg.cpus_per_worker:g}) but the "
                       f"cluster has {have.get('CPU', 0):g}; lower cpus_per_worker or add nodes")
    if cfg.use_gpu and cfg.num_models * cfg.workers_per_model > have.get("GPU", 0):
        raise RunError(f"use_gpu=true needs {cfg.num_models * cfg.workers_per_model} GPUs, "
                       f"the cluster has {have.get('GPU', 0):g}")
    check_placement(cfg, cluster_nodes())


# -- the run --------------------------------------------------------------------------------------

def _trainer(cfg: ExperimentConfig, replica: int, splits_ref, folder: Path, token: str) -> TorchTrainer:
    run_name = f"{cfg.name}-allreduce" if cfg.method == "allreduce" else f"{cfg.name}-r{replica}"
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "replica": replica, "splits": splits_ref, "token": token},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers_per_model, use_gpu=cfg.use_gpu,
                                               **scaling_kwargs(cfg, replica)),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(folder / "train"),
            # with node_wait_s, a worker group that cannot be placed again within it (the worker
            # group start timeout, below) fails at once instead of trying again
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.replica_max_failures,
                controller_failure_limit=-1 if cfg.node_wait_s is None else 0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=train_logging()),
    )


def run(cfg: ExperimentConfig, address: str | None = None, overwrite: bool = False,
        progress_every_s: float = 10.0, on_progress=None, resume: bool = False,
        heading: str | None = None) -> ExperimentResult:
    """Train one experiment to the end and write its result files; returns where they are.

    `on_progress(progress)`, if given, is called from this thread with the newest metric row of
    each replica (`{replica: row}`) at every progress poll (Tune trials report through it). Polls
    come every `progress_every_s`, or every second while live progress is drawn on a terminal
    under `heading` (console.RunProgress).
    `resume=True` continues an experiment whose driver died: each replica restarts from its
    latest checkpoint in the experiment folder, and the broker reloads the rows and counters it
    had journalled there (rows after a replica's checkpoint are dropped and logged again).
    """
    # everything that can refuse the run comes before the folder: a refused run touches no results
    splits = load_splits(cfg.data)
    check_model(cfg.model, splits.input_shape, splits.num_classes)
    if cfg.codistill.topk is not None and cfg.codistill.topk > splits.num_classes:
        raise ConfigError(f"codistill.topk: got {cfg.codistill.topk}, the data has {splits.num_classes} classes")
    if resume:
        resume_folder(cfg)
    connect(address)
    check_resources(cfg)
    folder = resume_folder(cfg) if resume else prepare_folder(cfg, overwrite)
    if not resume:
        write_json(folder / CONFIG_FILE, cfg.to_dict())
    say(f"experiment {cfg.name}: {cfg.method}, {cfg.num_models} model(s) x {cfg.workers_per_model} worker(s), "
        f"{cfg.steps} steps, batch {cfg.batch_size}/worker; {describe(splits)}")
    say(f"results: {folder}")

    started = time.time()
    probe_labels = None
    if cfg.num_models > 1 and cfg.codistill.probe_every:
        probe = probe_split(splits, cfg.codistill.probe_size)
        probe_labels = np.concatenate([y.numpy() for _, y, _ in eval_batches(probe, cfg.eval_batch_size)])
    token = new_token()
    cc = cfg.codistill
    broker = start_broker(cfg.name, cfg.num_models, len(splits.train), splits.num_classes, cc.max_staleness,
                          cfg.method, probe_labels, token, str(folder), cc.topk, cc.broker_shards,
                          broker_options(cfg), cc.teacher_rule, cc.temperature, cfg.seed, cc.broker_niceness)
    _check_niceness(broker, cc.broker_niceness)
    if cfg.node_wait_s is not None:
        # how long Ray Train waits for the resources of a worker group (at start, and after a node
        # is lost); read by each trainer's controller when it starts (Ray Train propagates it).
        # Only when asked: the variable also goes into the workers' runtime env, which then cannot
        # use Ray's prestarted worker processes
        os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = f"{cfg.node_wait_s:g}"
    if resume:
        ray.get(broker.note.remote("resumed"))
        say("resuming from the replicas' latest checkpoints")
    splits_ref = ray.put(splits)
    trainers = [_trainer(cfg, r, splits_ref, folder, token) for r in range(cfg.num_models)]
    errors: dict[int, BaseException] = {}
    try:
        with ThreadPoolExecutor(max_workers=len(trainers), thread_name_prefix="replica") as pool, \
                RunProgress(cfg.num_models, cfg.steps, heading or f"experiment {cfg.name}",
                            every_s=progress_every_s) as shown:
            futures = [pool.submit(t.fit) for t in trainers]
            while wait(futures, timeout=shown.poll_s, return_when=ALL_COMPLETED).not_done:
                try:
                    progress = ray.get(broker.progress.remote(), timeout=10)
                except Exception as err:  # progress is best-effort; training goes on
                    say(f"progress unavailable: {type(err).__name__}")
                    continue
                shown.update(progress)
                if on_progress is not None:
                    on_progress(progress)
            for r, f in enumerate(futures):
                if f.exception() is not None:
                    errors[r] = f.exception()
        broker.set_status.remote("finished")
        rows, final, stats, divergence, memory = ray.get([
            broker.rows.remote(), broker.final.remote(), broker.stats.remote(), broker.divergence.remote(),
            broker.memory.remote()])
    finally:
        stop_broker(broker)
    wall = time.time() - started

    metrics = _metrics_table(cfg, rows)
    write_parquet(folder / "metrics.parquet", metrics)
    if divergence:
        write_parquet(folder / "divergence.parquet", _tag(cfg, pd.DataFrame(divergence), ["step", "replica_a"]))
    summary = {**_summary(cfg, final, stats, wall, errors), "broker_memory": memory}
    write_json(folder / "summary.json", summary)
    if errors:
        for r, err in sorted(errors.items()):
            say(f"replica {r} FAILED: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
        if summary["replicas"]:
            say(f"results of the replicas that finished: test acc {_fmt_accs(summary)}; in {folder}")
        first = next(iter(errors.values()))
        raise RunError(f"{len(errors)} worker group(s) failed (replica(s) {sorted(errors)}): {first}") from first
    at_steps = ", ".join(f"r{r['replica']}={r['steps']}" for r in summary["replicas"])
    ended = ("stopped on request at step(s) " + at_steps if summary["status"] == "stopped" else
             f"finished (time budget of {cfg.time_budget_s:g}s reached at step(s) {at_steps})"
             if summary["budget_reached"] else "finished")
    say(f"{ended} in {wall:.0f}s: test acc {_fmt_accs(summary)}; results in {folder}")
    return ExperimentResult(folder, summary)


def _fmt_accs(summary: dict) -> str:
    accs = " ".join(f"r{r['replica']}={r['test_acc']:.4f}" for r in summary["replicas"])
    ens = summary.get("ensemble_test_acc")
    return accs + (f", ensemble {ens:.4f}" if ens is not None else "")


def _tag(cfg: ExperimentConfig, df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Sort a table and put experiment, method and seed in front, as every result table has."""
    df = df.sort_values(order, kind="stable").reset_index(drop=True)
    df.insert(0, "experiment", cfg.name)
    df.insert(1, "method", cfg.method)
    df.insert(2, "seed", cfg.seed)
    return df


def _metrics_table(cfg: ExperimentConfig, rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["replica", "step"])
    df = _tag(cfg, df, ["replica", "step"])
    return df[ID_COLUMNS + [c for c in df.columns if c not in ID_COLUMNS]]


def _check_niceness(broker, wanted: int | None) -> None:
    """Say so when the broker could not take the niceness it was given (`priority.py`)."""
    got = ray.get(broker.stats.remote())["broker_niceness"]
    if wanted is not None and got != wanted:
        say(f"warning: the broker runs at niceness {got}, not codistill.broker_niceness={wanted} (lowering a "
            f"niceness needs CAP_SYS_NICE): where replicas keep its node's cores busy, its answers wait for a core "
            f"(docs/performance.md, \"The broker's priority\")")


def _summary(cfg: ExperimentConfig, final: dict, stats: dict, wall: float, errors: dict) -> dict:
    replicas = [{**final[r]["result"], "restarts": stats["replicas"][str(r)]["restarts"]} for r in sorted(final)]
    ensemble, prediction_churn = None, None
    if len(final) > 1:
        probs = [final[r]["probs"] for r in sorted(final)]
        ensemble = ensemble_accuracy(probs, final[sorted(final)[0]]["labels"])
        prediction_churn = churn(probs)
    counters = stats["replicas"]
    return {
        "experiment": cfg.name, "method": cfg.method, "seed": cfg.seed, "num_models": cfg.num_models,
        # "stopped": ended early by `ray-codistill stop` (each replica's "steps" says where)
        "status": "failed" if errors else "stopped" if any(r.get("stopped") for r in replicas) else "finished",
        "errors": {str(r): repr(e) for r, e in errors.items()},
        # per worker group: finished, stopped (by `ray-codistill stop`), or failed (a lost replica;
        # the others' results are kept)
        "replica_status": {str(r): "failed" if r in errors else "stopped" if final.get(r, {}).get("result", {}).get(
            "stopped") else "finished" for r in range(cfg.num_models)},
        "replicas": replicas,
        # time_budget_s ended some replica before `steps` (each replica's "steps" says where)
        "budget_reached": any(r.get("budget_reached", False) for r in replicas),
        "test_acc_mean": float(np.mean([r["test_acc"] for r in replicas])) if replicas else None,
        "ensemble_test_acc": ensemble,
        "prediction_churn": prediction_churn,  # share of test samples two replicas label differently
        "final_divergence": stats["divergence"],
        "broker_niceness": stats["broker_niceness"],
        "wall_time_s": wall,
        "bytes_exchanged": int(sum(c["bytes_in"] + c["bytes_out"] for c in counters.values())),
        "allreduce_bytes": int(sum(r.get("allreduce_bytes", 0) for r in replicas)),
        "broker": {r: {k: v for k, v in c.items() if k != "workers"} for r, c in counters.items()},
        "restarts": {r: c["restarts"] for r, c in counters.items()},
        "events": stats["events"],  # starts, restarts from checkpoints, resumes, broker restarts
        "config": cfg.to_dict(), "versions": versions(), "git_rev": git_revision(),
        "command": " ".join(sys.argv),
    }
