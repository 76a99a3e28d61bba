"""Helpers shared by the benchmarks: a local Ray, quiet runs through the real launcher, the machine.

Benchmarks run whole experiments with `ray_codistill.launcher.run`, exactly as a user would;
results and temporary data go to a temp folder, never into the repository. Sizes, durations and
tables read as the library's (`ray_codistill.fmt`); files are written through `ray_codistill.results`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from ray_codistill.results import git_revision

REPO = Path(__file__).resolve().parents[1]


def experiment_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark that runs experiments of a base config: --config, --set, --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/mnist1d.yaml", help="base config (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, applied to every run (repeatable)")
    parser.add_argument("--out", default=None, help="results folder (default: a new temp folder)")
    return parser


def add_pair_options(parser: argparse.ArgumentParser) -> None:
    """--large and --small: the keys of a large and a small model (benchmarks of mixed pairs)."""
    parser.add_argument("--large", action="append", default=[], metavar="KEY=VALUE",
                        help="the large model's keys (default: model.channels=25)")
    parser.add_argument("--small", action="append", default=[], metavar="KEY=VALUE",
                        help="the small model's keys (default: model.channels=6)")


def pair_of(args: argparse.Namespace) -> tuple[dict, dict]:
    """The large and the small model's keys of `add_pair_options`, as mappings."""
    from ray_codistill.config import parse_override
    return (dict(parse_override(t) for t in args.large or ["model.channels=25"]),
            dict(parse_override(t) for t in args.small or ["model.channels=6"]))


def add_codistill_options(parser: argparse.ArgumentParser, steps: int | None) -> None:
    """The options of a benchmark of codistillation runs: --alpha, --cpus, --steps (`steps`; None:
    the config's) and --broker-niceness (one value per run or case)."""
    parser.add_argument("--alpha", type=float, default=1.0, help="distillation weight (default: %(default)s)")
    parser.add_argument("--cpus", type=float, default=2.0, help="CPUs the R replicas share (default: 2)")
    parser.add_argument("--steps", type=int, default=steps,
                        help=f"optimizer steps per run (default: {steps or 'from the config'})")
    parser.add_argument("--broker-niceness", type=int, nargs="+", default=[0, 15],
                        help="niceness of the broker, each in turn (default: 0 15)")


def codistill_base(args: argparse.Namespace, out: Path):
    """The base config of those options: codistill at --alpha, results in `out`, --steps if given."""
    from ray_codistill.config import load_config
    fields = {"storage_path": str(out), **({"steps": args.steps} if args.steps else {})}
    return load_config(args.config, args.set, **fields).replace(method="codistill",
                                                                 **{"codistill.alpha": args.alpha})


def out_folder(out: str | None, prefix: str) -> Path:
    """`--out`, created, or a new temp folder."""
    folder = temp_root(prefix) if out is None else Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def temp_root(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"ray_codistill_{prefix}_"))


def start_ray(num_cpus: int | None = None) -> None:
    """A local Ray of our own, always with its dashboard (never `ray stop`: other Ray instances on
    the machine stay alone). No log forwarding. The dashboard serves the State API that Ray Train's
    placement-group cleaner asks about its controller, and that broker_calls.py reads; without it,
    beside another Ray serving one on port 8265, the cleaner asks that other Ray, hears of no such
    controller and ends the run (docs/ray-notes.md)."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=True, configure_logging=False,
                 log_to_driver=False)


def worker_torch_threads(cpus_per_worker: float) -> int:
    """torch threads of a Ray worker holding `cpus_per_worker` CPUs (Ray sets OMP_NUM_THREADS
    from the CPUs it grants; Ray Train workers get the same)."""
    import ray
    import torch

    @ray.remote(num_cpus=cpus_per_worker)
    def threads() -> int:
        return torch.get_num_threads()

    return ray.get(threads.remote())


def run_experiment(cfg, log_path: Path):
    """`launcher.run(cfg)` with its progress lines written to `log_path` instead of the terminal."""
    from ray_codistill import launcher
    with open(log_path, "a") as log, contextlib.redirect_stdout(log):
        return launcher.run(cfg, overwrite=True, progress_every_s=1e9)


def machine() -> str:
    import ray
    import torch
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return (f"{platform.node()}: {cores} cores ({usable} usable), {platform.processor() or platform.machine()}; "
            f"python {platform.python_version()}, torch {torch.__version__} "
            f"(driver threads {torch.get_num_threads()}), ray {ray.__version__}; git {git_revision(short=True)}")


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def command() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])


def steady_rate(metrics: pd.DataFrame, skip_steps: int) -> float:
    """Samples/s of one model: per replica, the median of `perf/samples_per_s` over the metric rows
    after `skip_steps` (warm-up, burn-in), then the mean over replicas."""
    rows = metrics[metrics["step"] > skip_steps]
    if rows.empty:
        raise ValueError(f"no metric rows after step {skip_steps}; run more steps")
    return float(rows.groupby("replica")["perf/samples_per_s"].median().mean())


class Clock:
    """Seconds since the benchmark started, for progress lines."""

    def __init__(self) -> None:
        self.start = time.time()

    def __str__(self) -> str:
        return f"{time.time() - self.start:5.0f}s"
