"""What a person sees on the console: the project's lines, live progress, and Ray kept quiet.

By default `run`, `compare` and `tune` hide Ray Train's routine chatter and keep every warning,
error and worker traceback. Three of Ray 2.60's own settings do it, each for what it covers:
- `ray.train.LoggingConfig(log_level="WARNING")` in each `RunConfig` (see `train_logging`): the
  `ray.train.*` loggers of the Train controller and workers (worker group start, "Checkpoint
  successfully created", "Moving model to device", ...). Other loggers are not touched by it.
- `RAY_DEDUP_LOGS_SKIP_REGEX` (`HIDDEN_LINES`): the driver drops forwarded worker lines that
  match it. "Reporting training result N: TrainingReport(...)" is logged under a logger named
  after its file (ray/train/v2/_internal/execution/context.py), outside `ray.train`, at INFO by the
  worker's root logger, so only this reaches it. Ray reads the variable when `ray` is imported.
- `RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0`: Train's preemption watcher actor is not started, and
  with it goes the ERROR line core_worker.cc prints for it on every worker group ("Actor with class
  name: 'PreemptionWatcher' ... has constructor arguments in the object store"). The watcher only
  watches for nodes being drained (managed clusters' preemption); this project does not use it.
  The Train controller reads it; Ray Train hands it from the process that calls `fit()` to its
  controller (`ENV_VARS_TO_PROPAGATE` in ray/train/v2/_internal/constants.py). Tune trials call
  `fit()` in processes of the cluster, so `cluster.connect` also puts it (and `VERBOSE`) in the
  job's runtime environment when it attaches to an existing cluster; a local Ray started here
  inherits this process's environment.
Ray's session log files keep everything (`<session dir>/logs/`, e.g.
/tmp/ray/session_latest/logs/ on the head node). `--verbose` leaves all of Ray's defaults alone.

Live progress (a terminal only) is drawn with `rich`; elsewhere (CI, `ray job logs`) a plain line
per progress poll is printed, as before.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import AbstractContextManager

from ray_codistill.fmt import duration

# Worker lines the driver does not print (a regex searched in each forwarded line).
HIDDEN_LINES = r"Reporting training result \d+: TrainingReport\("
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
VERBOSE = "RAY_CODISTILL_VERBOSE"  # "1": Ray Train logs at INFO (read where a RunConfig is built)
# Set here, read by processes of the cluster (the Train controller, Tune trials): forwarded to
# remote clusters.
CLUSTER_ENV = (PREEMPTION_WATCHER, VERBOSE)


def say(msg: str) -> None:
    print(f"[ray-codistill] {msg}", flush=True)


def quiet_ray(verbose: bool) -> None:
    """Hide Ray Train's routine lines from this process's console (unless `verbose`).

    Call it before `ray` is imported (Ray reads RAY_DEDUP_LOGS_SKIP_REGEX at import) and before
    a local Ray starts (its processes inherit this environment). A value the user set wins.
    """
    os.environ[VERBOSE] = "1" if verbose else "0"  # read by train_logging, also inside Tune trials
    if verbose:
        return
    user = os.environ.get("RAY_DEDUP_LOGS_SKIP_REGEX")
    os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] = f"{user}|{HIDDEN_LINES}" if user else HIDDEN_LINES
    os.environ.setdefault(PREEMPTION_WATCHER, "0")


def cluster_env() -> dict[str, str]:
    """The settings of `CLUSTER_ENV` this process has, for a remote cluster's runtime environment."""
    return {k: os.environ[k] for k in CLUSTER_ENV if k in os.environ}


def train_logging():
    """Ray Train's `LoggingConfig` for every `RunConfig`: warnings and errors only, unless verbose.

    Library callers (tests, notebooks) that never called `quiet_ray` get the quiet one too.
    """
    import ray.train
    verbose = os.environ.get(VERBOSE) == "1"
    return ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING")


# -- numbers ------------------------------------------------------------------------------------

def num(x) -> str:
    """A measured float to three significant digits: 0.0693, 0.00032, 3.2e-06, 12.3, 1.23e+04."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}"


def pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1%}"


def replica_text(row: dict | None, steps: int) -> str:
    """One replica's figures from its newest metric row: loss, val acc (a language model: val loss
    and bits per character), teacher hits and age, ETA."""
    if not row:
        return "starting"
    step = int(row["step"])
    eta = None
    if row.get("time_s") and step > 0:  # time_s counts from this worker's start (a restart resets it)
        eta = row["time_s"] / step * max(0, steps - step)
    parts = [f"step {step}/{steps}", f"ETA {duration(eta)}", f"loss {num(row.get('train/loss'))}"]
    if row.get("val/bpc") is not None:
        parts.append(f"val {row['val/loss']:.3f} ({row['val/bpc']:.2f} bpc)")
    elif row.get("val/acc") is not None:
        parts.append(f"val {pct(row['val/acc'])}")
    if row.get("distill/hit_rate") is not None:
        parts.append(f"hits {row['distill/hit_rate']:.0%}")
    if row.get("distill/teacher_age") is not None:
        parts.append(f"age {row['distill/teacher_age']:.0f}")
    if row.get("perf/tokens_per_s"):
        parts.append(f"{row['perf/tokens_per_s']:.0f} tokens/s")
    elif row.get("perf/samples_per_s"):
        parts.append(f"{row['perf/samples_per_s']:.0f} samples/s")
    return " ".join(parts)


def progress_line(num_models: int, steps: int, progress: dict) -> str:
    return " | ".join(f"r{r} {replica_text(progress.get(r), steps)}" for r in range(num_models))


# -- progress display ---------------------------------------------------------------------------

class RunProgress(AbstractContextManager):
    """Progress of one experiment: redrawn in place on a terminal, plain periodic lines elsewhere.

    `update(progress)` takes the broker's newest metric row per replica. `poll_s` says how often
    the launcher should ask for it. While the live view is up, everything printed to stdout and
    stderr (the project's lines, Ray's forwarded warnings and tracebacks) goes above it.
    """

    def __init__(self, num_models: int, steps: int, heading: str | None = None, every_s: float = 10.0,
                 live: bool | None = None):
        self.num_models, self.steps, self.heading = num_models, steps, heading
        self.live = _is_terminal() if live is None else live
        self.poll_s = 1.0 if self.live else every_s
        self._bars = None

    def __enter__(self):
        if self.live:
            self._bars = _bars(self.heading)
            self._tasks = [self._bars.add_task(f"r{r}", total=self.steps, text="starting")
                           for r in range(self.num_models)]
            self._bars.start()
        return self

    def update(self, progress: dict) -> None:
        if self._bars is None:
            say(progress_line(self.num_models, self.steps, progress))
            return
        for r, task in enumerate(self._tasks):
            row = progress.get(r)
            self._bars.update(task, completed=int(row["step"]) if row else 0,
                              text=replica_text(row, self.steps))

    def __exit__(self, *exc):
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
        return False


def _is_terminal() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


def _bars(heading: str | None):
    from rich.progress import BarColumn, Progress, TextColumn
    from rich.text import Text

    class Bars(Progress):
        def get_renderables(self):
            if heading:
                yield Text(heading, style="bold")
            yield self.make_tasks_table(self.tasks)

    # transient: the bars go when the run ends; its "finished" line stays
    return Bars(TextColumn("{task.description}"), BarColumn(bar_width=24), TextColumn("{task.fields[text]}"),
                transient=True, redirect_stdout=True, redirect_stderr=True, refresh_per_second=4)
