"""The result files of an experiment, and how every result file is written.

- the experiment folder under `<storage_path>/<name>`: made (or refused) before anything starts,
  found again for `--resume` through the config the first run wrote (`config.json`);
- `metrics.parquet` (one tidy row per replica and metric step), `divergence.parquet` (one row per
  probe round and pair of replicas) and `summary.json` (final figures, the exchange's counters,
  the events, config, versions and git revision);
- atomic writes for every file the project leaves behind (a temp file in the same folder, then
  a rename: a reader never sees half a file, a killed writer leaves the old one), used by the
  launcher, compare, tune, the R study, the ledger's journal and the benchmarks.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from ray_codistill.config import ConfigError, ExperimentConfig
from ray_codistill.divergence import churn, ensemble_accuracy, ensemble_loss
from ray_codistill.tasks import lm_figures, task_of

if TYPE_CHECKING:  # pandas is imported where tables are made: the broker and the ledger, which
    import pandas as pd  # journal through this module, would carry it (40 MB each) for nothing

ID_COLUMNS = ["experiment", "method", "replica", "seed", "step"]
CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"  # a language model's tokens (text.Vocab), written beside the config
REPO = Path(__file__).resolve().parents[1]


# -- atomic writes ----------------------------------------------------------------------------------

def write_atomic(path: str | os.PathLike, write) -> None:
    """`write(tmp)` a temp file in the same folder, then rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, obj: dict) -> None:
    write_text(path, json.dumps(obj, indent=2, default=jsonable) + "\n")


def write_parquet(path: str | os.PathLike, df: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: df.to_parquet(tmp, engine="pyarrow", index=False))


def jsonable(value):
    """`json.dumps(default=...)` for numpy values (anything else becomes its string)."""
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# -- provenance -------------------------------------------------------------------------------------

def git_revision(short: bool = False) -> str:
    """The checkout's commit, `-dirty` when tracked files have changed; "unknown" outside git."""
    try:
        rev = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def versions() -> dict:
    import pandas as pd
    import ray
    import torch
    import torchvision
    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__, "pandas": pd.__version__}


# -- the experiment folder --------------------------------------------------------------------------

def prepare_folder(cfg: ExperimentConfig, overwrite: bool) -> Path:
    """A new, writable, empty experiment folder (an existing one only with `overwrite`)."""
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


# -- tables and the summary -------------------------------------------------------------------------

# -- a finished experiment, read back ------------------------------------------------------------

def read_config(folder: str | os.PathLike) -> ExperimentConfig:
    """The config an experiment folder was run with (its `config.json`)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not an experiment folder (no {CONFIG_FILE})")
    return ExperimentConfig.from_dict(json.loads(path.read_text()))


def replica_runs(folder: str | os.PathLike, cfg: ExperimentConfig) -> dict[int, Path]:
    """Each worker group's Ray Train folder (its checkpoints) in an experiment folder."""
    train = Path(folder) / "train"
    if cfg.method == "allreduce":
        return {0: train / f"{cfg.name}-allreduce"}
    return {r: train / f"{cfg.name}-r{r}" for r in range(cfg.num_models)}


def newest_state(run_dir: Path) -> dict:
    """The saved state with the highest step among a worker group's checkpoints (Ray Train keeps
    two): `{"step", "model", "optimizer", ...}` as `replica._save_checkpoint` wrote it."""
    import torch  # here: the broker and the ledger import this module and must not load torch
    states = [torch.load(p, map_location="cpu", weights_only=False) for p in Path(run_dir).glob("checkpoint_*/state.pt")]
    if not states:
        raise FileNotFoundError(f"{run_dir}: no checkpoint")
    return max(states, key=lambda s: s["step"])


def _tag(cfg: ExperimentConfig, df: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Sort a table and put experiment, method and seed in front, as every result table has."""
    df = df.sort_values(order, kind="stable").reset_index(drop=True)
    df.insert(0, "experiment", cfg.name)
    df.insert(1, "method", cfg.method)
    df.insert(2, "seed", cfg.seed)
    return df


def metrics_table(cfg: ExperimentConfig, rows: list[dict]) -> pd.DataFrame:
    import pandas as pd
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["replica", "step"])
    df = _tag(cfg, df, ["replica", "step"])
    return df[ID_COLUMNS + [c for c in df.columns if c not in ID_COLUMNS]]


def summary(cfg: ExperimentConfig, final: dict, stats: dict, wall: float, errors: dict, memory: dict) -> dict:
    """`summary.json`: the replicas' final figures (`final`, from the ledger), the run's `stats`
    at its end, and where it came from."""
    replicas = [{**final[r]["result"], "restarts": stats["replicas"][str(r)]["restarts"]} for r in sorted(final)]
    ensemble, ens_loss, prediction_churn = None, None, None
    if len(final) > 1:
        probs, labels = [final[r]["probs"] for r in sorted(final)], final[sorted(final)[0]]["labels"]
        ensemble, ens_loss = ensemble_accuracy(probs, labels), ensemble_loss(probs, labels)
        prediction_churn = churn(probs)
    counters = stats["replicas"]
    loss_mean = float(np.mean([r["test_loss"] for r in replicas])) if replicas else None
    lm = {}  # a language model's figures: bits per character and perplexity of the means
    if task_of(cfg).is_lm:
        lm = {**({f"{k}_mean": v for k, v in lm_figures(loss_mean, "test_").items()} if loss_mean is not None else {}),
              **(lm_figures(ens_loss, "ensemble_test_") if ens_loss is not None else {})}
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
        "test_loss_mean": loss_mean,  # nats per sample (language models: per token)
        "ensemble_test_loss": ens_loss,  # of the mean of the replicas' probabilities
        **lm,
        "prediction_churn": prediction_churn,  # share of test samples (tokens) two replicas label differently
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
        "broker_memory": memory,
    }


def write_results(folder: Path, cfg: ExperimentConfig, rows: list[dict], divergence: list[dict],
                  summary_: dict) -> None:
    """The experiment's three result files (`divergence.parquet` only when probes ran)."""
    import pandas as pd
    write_parquet(folder / "metrics.parquet", metrics_table(cfg, rows))
    if divergence:
        write_parquet(folder / "divergence.parquet", _tag(cfg, pd.DataFrame(divergence), ["step", "replica_a"]))
    write_json(folder / "summary.json", summary_)
