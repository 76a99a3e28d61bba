"""Runs one experiment: checks, the ledger and the broker, the worker groups, and the result files.

`run(cfg)` checks everything that can be checked before a worker starts (data, model, storage,
resources), attaches to Ray (local when no address is given), starts the experiment's ledger and
broker and fits one `TorchTrainer` per replica concurrently (one for `allreduce`), shows progress
while they train (console.py), and writes the result files (`results.py`) under
`<storage_path>/<name>`.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ALL_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
from ray.train.torch import TorchTrainer

from ray_codistill.broker import ExchangeSettings, start_broker
from ray_codistill.cluster import connect
from ray_codistill.config import ConfigError, ExperimentConfig
from ray_codistill.console import RunProgress, say, train_logging
from ray_codistill.data import describe, eval_batches, load_splits, probe_split
from ray_codistill.models import check_model, describe_model
from ray_codistill.placement import broker_options, check_placement, cluster_nodes, demands, scaling_kwargs
from ray_codistill.replica import train_loop_per_worker
from ray_codistill.errors import ModelError, RunError
from ray_codistill.offline import check_teacher
from ray_codistill.guard import new_token
from ray_codistill.ledger import ledger_name, start_ledger
from ray_codistill.results import CONFIG_FILE, VOCAB_FILE, prepare_folder, resume_folder, write_json, write_results
from ray_codistill.results import write_text
from ray_codistill.tasks import task_of
from ray_codistill.results import summary as make_summary


@dataclass
class ExperimentResult:
    path: Path
    summary: dict


# -- checks before anything starts ----------------------------------------------------------------

def check_resources(cfg: ExperimentConfig) -> None:
    """Refuse a run the cluster cannot hold: too few CPUs or GPUs (RunError), or a placement that
    names labels or resources no node has (ConfigError, naming the key)."""
    workers = [w for _, _, w in demands(cfg)]
    need_cpu, need_gpu = sum(w["CPU"] for w in workers), sum(w.get("GPU", 0) for w in workers)
    have = ray.cluster_resources()
    if need_cpu > have.get("CPU", 0) + 1e-9:
        raise RunError(f"the experiment needs {need_cpu:g} CPUs ({cfg.num_models} worker group(s), {len(workers)} "
                       f"worker(s) in all, cpus_per_worker={cfg.cpus_per_worker:g}"
                       f"{' or its replica_overrides' if cfg.mixed else ''}) but the cluster has "
                       f"{have.get('CPU', 0):g}; lower cpus_per_worker or add nodes")
    if need_gpu > have.get("GPU", 0):
        raise RunError(f"use_gpu=true needs {need_gpu:g} GPUs, the cluster has {have.get('GPU', 0):g}")
    check_placement(cfg, cluster_nodes())


# -- the run --------------------------------------------------------------------------------------

def _trainer(cfg: ExperimentConfig, replica: int, splits_ref, folder: Path, token: str) -> TorchTrainer:
    run_name = f"{cfg.name}-allreduce" if cfg.method == "allreduce" else f"{cfg.name}-r{replica}"
    own = cfg.for_replica(replica)  # its workers and GPU (replica_overrides)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "replica": replica, "splits": splits_ref, "token": token},
        scaling_config=ray.train.ScalingConfig(num_workers=own.workers_per_model, use_gpu=own.use_gpu,
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
    latest checkpoint in the experiment folder, and the ledger and the broker reload the rows and
    counters they had journalled there (rows after a replica's checkpoint are dropped and logged
    again).
    """
    # everything that can refuse the run comes before the folder: a refused run touches no results
    splits = load_splits(cfg.data)
    _check_models(cfg, splits)
    teacher = check_teacher(cfg, splits) if cfg.method == "distill" else None
    if cfg.codistill.topk is not None and cfg.codistill.topk > splits.num_classes:
        what = f"a vocabulary of {splits.num_classes} tokens" if splits.is_text else f"{splits.num_classes} classes"
        raise ConfigError(f"codistill.topk: got {cfg.codistill.topk}, the data has {what}")
    if resume:
        resume_folder(cfg)
    connect(address)
    check_resources(cfg)
    folder = resume_folder(cfg) if resume else prepare_folder(cfg, overwrite)
    if not resume:
        write_json(folder / CONFIG_FILE, cfg.to_dict())
        if splits.is_text:  # what `ray-codistill sample` reads tokens back with
            write_text(folder / VOCAB_FILE, splits.vocab.to_json())
    say(f"experiment {cfg.name}: {cfg.method}, {cfg.num_models} model(s) x {cfg.workers_per_model} worker(s), "
        f"{cfg.steps} steps, batch {cfg.batch_size}/worker; {describe(splits)}")
    if cfg.mixed:
        say("replicas: " + "; ".join(f"r{r} {describe_model(own.model)}, alpha {own.codistill.alpha:g}, "
                                     f"{own.workers_per_replica} worker(s)"
                                     for r, own in ((r, cfg.for_replica(r)) for r in range(cfg.num_models))))
    if teacher:
        say(f"teacher: {teacher}")
    say(f"results: {folder}")

    started = time.time()
    probe_labels = None
    if cfg.num_models > 1 and cfg.codistill.probe_every:
        probe = probe_split(splits, cfg.codistill.probe_size)
        probe_labels = np.concatenate([y.numpy() for _, y, _ in eval_batches(probe, cfg.eval_batch_size)])
    token = new_token()
    ledger = start_ledger(experiment=cfg.name, num_replicas=cfg.num_models, method=cfg.method, token=token,
                          probe_labels=probe_labels, folder=str(folder), broker_shards=cfg.codistill.broker_shards)
    exchange = None
    try:
        positions = splits.input_shape[0] if splits.is_text else None  # a language model: logits per token
        settings = ExchangeSettings.from_config(cfg, len(splits.train), splits.num_classes, token, str(folder),
                                                ledger_name(cfg.name), positions)
        exchange = start_broker(settings, placement=broker_options(cfg))
        ray.get(ledger.exchange_report.remote(*exchange.reports()))  # stats know the broker from the start
        _check_niceness(exchange, cfg.codistill.broker_niceness)
        if resume:
            ray.get(ledger.note.remote("resumed"))
            say("resuming from the replicas' latest checkpoints")
        splits_ref = ray.put(splits)
        trainers = [_trainer(cfg, r, splits_ref, folder, token) for r in range(cfg.num_models)]
        with _trainer_env(cfg):
            errors = _fit(cfg, trainers, ledger, progress_every_s, on_progress, heading)
        ledger.set_status.remote("finished")
        ray.get(ledger.exchange_report.remote(*exchange.reports()))  # the counters at the end, exactly
        memory = exchange.memory()
        rows, final, stats, divergence = ray.get([
            ledger.rows.remote(), ledger.final.remote(), ledger.stats.remote(), ledger.divergence.remote()])
    finally:
        if exchange is not None:
            exchange.stop()
        ray.kill(ledger)
    wall = time.time() - started

    summary = make_summary(cfg, final, stats, wall, errors, memory)
    write_results(folder, cfg, rows, divergence, summary)
    if errors:
        for r, err in sorted(errors.items()):
            say(f"replica {r} FAILED: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}")
        if summary["replicas"]:
            say(f"results of the replicas that finished: {_fmt_final(summary)}; in {folder}")
        first = next(iter(errors.values()))
        raise RunError(f"{len(errors)} worker group(s) failed (replica(s) {sorted(errors)}): {first}") from first
    at_steps = ", ".join(f"r{r['replica']}={r['steps']}" for r in summary["replicas"])
    ended = ("stopped on request at step(s) " + at_steps if summary["status"] == "stopped" else
             f"finished (time budget of {cfg.time_budget_s:g}s reached at step(s) {at_steps})"
             if summary["budget_reached"] else "finished")
    say(f"{ended} in {wall:.0f}s: {_fmt_final(summary)}; results in {folder}")
    return ExperimentResult(folder, summary)


def _fit(cfg: ExperimentConfig, trainers: list[TorchTrainer], ledger, progress_every_s: float, on_progress,
         heading: str | None) -> dict[int, BaseException]:
    """Fit the worker groups at once, showing the ledger's progress; the errors of those that failed."""
    errors: dict[int, BaseException] = {}
    with ThreadPoolExecutor(max_workers=len(trainers), thread_name_prefix="replica") as pool, \
            RunProgress(cfg.num_models, cfg.steps, heading or f"experiment {cfg.name}",
                        every_s=progress_every_s) as shown:
        futures = [pool.submit(t.fit) for t in trainers]
        while wait(futures, timeout=shown.poll_s, return_when=ALL_COMPLETED).not_done:
            try:
                progress = ray.get(ledger.progress.remote(), timeout=10)
            except Exception as err:  # progress is best-effort; training goes on
                say(f"progress unavailable: {type(err).__name__}")
                continue
            shown.update(progress)
            if on_progress is not None:
                on_progress(progress)
        for r, f in enumerate(futures):
            if f.exception() is not None:
                errors[r] = f.exception()
    return errors


@contextmanager
def _trainer_env(cfg: ExperimentConfig):
    """Environment variables this run's trainers read, set while they are fitted and restored
    after, so a later run in the same process (compare, Tune, tests) starts from the user's.

    With `node_wait_s`: how long Ray Train waits for the resources of a worker group (at start,
    and after a node is lost), read by each trainer's controller when it starts (Ray Train
    propagates it). Only when asked: the variable also goes into the workers' runtime env, which
    then cannot use Ray's prestarted worker processes."""
    wanted = {} if cfg.node_wait_s is None else {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": f"{cfg.node_wait_s:g}"}
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fmt_final(summary: dict) -> str:
    """The replicas' test figures (and the ensemble's): accuracy, or a language model's loss."""
    if task_of(summary["config"]).is_lm:
        losses = " ".join(f"r{r['replica']}={r['test_loss']:.4f}" for r in summary["replicas"])
        ens = summary.get("ensemble_test_loss")
        bpc = summary.get("test_bpc_mean")
        return (f"test loss {losses}" + (f", ensemble {ens:.4f}" if ens is not None else "")
                + " nats/token" + (f" (mean {bpc:.3f} bits/char)" if bpc is not None else ""))
    accs = " ".join(f"r{r['replica']}={r['test_acc']:.4f}" for r in summary["replicas"])
    ens = summary.get("ensemble_test_acc")
    return "test acc " + accs + (f", ensemble {ens:.4f}" if ens is not None else "")


def _check_models(cfg: ExperimentConfig, splits) -> None:
    """Every distinct model of the replicas must take the data and answer with its classes (or
    vocabulary, per token), so the teachers they exchange match; the key of the replica that
    does not fit is named."""
    checked = []
    for r in range(cfg.num_models):
        model = cfg.for_replica(r).model
        if model in checked:
            continue
        checked.append(model)
        try:
            check_model(model, splits.input_shape, splits.num_classes, text=splits.is_text)
        except ModelError as err:
            raise ModelError(f"replica_overrides[{r}].{err}" if model != cfg.model else str(err)) from None


def _check_niceness(exchange, wanted: int | None) -> None:
    """Say so when the broker could not take the niceness it was given (`priority.py`)."""
    got = ray.get(exchange.broker.describe.remote())["niceness"]
    if wanted is not None and got != wanted:
        say(f"warning: the broker runs at niceness {got}, not codistill.broker_niceness={wanted} (lowering a "
            f"niceness needs CAP_SYS_NICE): where replicas keep its node's cores busy, its answers wait for a core "
            f"(docs/performance.md, \"The broker's priority\")")
