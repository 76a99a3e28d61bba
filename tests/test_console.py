"""The console as a user sees it: Ray Train's routine lines hidden, errors and tracebacks kept,
the comparison table last. Each test runs the real CLI in a subprocess on a real local Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import CONFIGS, ROOT
from ray_codistill.console import num, progress_line

# Ray Train's routine lines, and the ERROR line of its preemption watcher (see console.py)
HIDDEN = ["TrainController", "Attempting to start training worker group", "Setting up process group",
          "Moving model to device", "Checkpoint successfully created", "Reporting training result",
          "PreemptionWatcher"]
TINY = ["--set", "steps=60", "--set", "eval_every=30", "--set", "cpus_per_worker=0.25"]


def _cli(*args: str, timeout: float = 300) -> tuple[int, str]:
    """Exit status and what the user sees (stdout and stderr, as one terminal shows them)."""
    out = subprocess.run([sys.executable, "-m", "ray_codistill.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return out.returncode, out.stdout


def test_numbers_keep_their_significant_digits():
    assert num(3.2e-4) == "0.00032" and num(3.2e-6) == "3.2e-06" and num(0.0693) == "0.0693"
    assert num(None) == "-" and num(float("nan")) == "-"
    line = progress_line(2, 600, {0: {"step": 300, "train/loss": 3.2e-4, "val/acc": 0.848, "time_s": 30.0,
                                      "distill/hit_rate": 0.97, "distill/teacher_age": 36.4}})
    assert line == "r0 step 300/600 ETA 0:30 loss 0.00032 val 84.8% hits 97% age 36 | r1 starting"


@pytest.mark.ray  # the CLI in a subprocess starts its own local Ray
def test_compare_shows_its_own_lines_and_ends_with_the_table(tmp_path):
    code, out = _cli("compare", str(CONFIGS / "smoke.yaml"), "--methods", "codistill", "allreduce",
                     "--storage", str(tmp_path), *TINY)
    assert code == 0, out
    assert [line for line in out.splitlines() if any(h in line for h in HIDDEN)] == []
    assert "[ray-codistill] comparison smoke: experiment 2/2: smoke-allreduce-s0" in out
    lines = out.rstrip("\n").splitlines()
    header = lines.index(next(line for line in lines if line.startswith("| method |")))
    assert [line[:12] for line in lines[header + 2:]] == ["| codistill ", "| allreduce "]  # the table is last
    plots = [line.removeprefix("plot: ") for line in lines if line.startswith("plot: ")]
    assert any(p.endswith("val_acc.png") for p in plots)
    assert all((tmp_path / "smoke" / p.rsplit("/", 1)[1]).is_file() for p in plots)


@pytest.mark.ray  # the CLI in a subprocess starts its own local Ray
def test_verbose_brings_ray_trains_lines_back(tmp_path):
    code, out = _cli("run", str(CONFIGS / "smoke.yaml"), "--verbose", "--storage", str(tmp_path), *TINY)
    assert code == 0, out
    # logged when each worker group starts, long before the run ends: never lost at shutdown
    assert "Attempting to start training worker group" in out


@pytest.mark.ray  # the CLI in a subprocess starts its own local Ray
def test_a_worker_that_raises_shows_the_error_and_traceback_without_verbose(tmp_path):
    # a learning rate that passes validation but blows the weights up: the workers raise
    # NonFiniteError at their first publication (replica.py) and the run fails
    code, out = _cli("run", str(CONFIGS / "smoke.yaml"), "--set", "optim.lr=1e30", "--storage", str(tmp_path), *TINY)
    assert code == 1, out
    assert "ray-codistill: error: " in out and "Traceback (most recent call last)" in out
    assert "NonFiniteError: replica " in out and 'replica.py", line' in out


def test_settings_for_a_remote_cluster_leave_a_jobs_own_keys_alone(monkeypatch):
    from ray_codistill.cluster import _forwarded_env
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    monkeypatch.setenv("RAY_CODISTILL_VERBOSE", "0")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert _forwarded_env() == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_CODISTILL_VERBOSE": "0"}
    # inside `ray job submit --runtime-env-json '{"env_vars": {...}}'`: Ray refuses a key set twice
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       '{"runtime_env": {"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}}}')
    assert _forwarded_env() == {"RAY_CODISTILL_VERBOSE": "0"}
