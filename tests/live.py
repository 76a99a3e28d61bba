"""Tests that watch a run while it trains, without racing it.

A run that a test must catch mid-way is given far more steps than it can train while the test
looks (`ENDLESS`), and the test ends it with `ray-codistill stop` once it has seen what it waits
for. Every wait is on an event (a figure the broker reports, a file Ray Train writes), bounded by
a deadline that only a broken run reaches.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray

from ray_codistill import launcher
from ray_codistill.errors import StatsError
from ray_codistill.stats import get_stats, request_stop

from conftest import ROOT

ENDLESS = 10**7  # steps: a run that only ends when the test stops it
DEADLINE_S = 300.0


def cli(*args: str, timeout: float = 120, address: bool = True) -> subprocess.CompletedProcess:
    """`ray-codistill ARGS` in its own process, as a user runs it, at this session's cluster
    ("auto" would find the newest Ray on the machine, which may be another session's)."""
    if address and ray.is_initialized() and "--address" not in args:
        args = (*args, "--address", ray.get_runtime_context().gcs_address)
    return subprocess.run([sys.executable, "-m", "ray_codistill.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def stats_json(name: str) -> dict | None:
    out = cli("stats", name, "--json", timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else None


def wait_for(what: str, ready, deadline_s: float = DEADLINE_S, alive=None):
    """Poll `ready()` until it returns something truthy; `alive()` false means it never will."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        if alive is not None and not alive():
            raise AssertionError(f"gave up waiting for {what}: the run has ended")
        time.sleep(0.1)
    raise AssertionError(f"waited {deadline_s:.0f}s for {what}")


def stats_now(name: str) -> dict | None:
    """The broker's figures, asked in this process (the call `ray-codistill stats` makes, without a
    process start per poll); None while the broker is not up or restarting."""
    try:
        return get_stats(name)
    except StatsError:
        return None


def wait_for_stats(name: str, what: str, ready, alive=None) -> dict:
    """The broker's figures once `ready(stats)` holds."""
    def check():
        stats = stats_now(name)
        return stats if stats is not None and ready(stats) else None
    return wait_for(what, check, alive=alive)


def registered_checkpoints(folder: Path, run_name: str) -> list[int]:
    """The steps of the checkpoints Ray Train has registered for one worker group (those it
    restarts from): its checkpoint manager's snapshot in the run's storage folder."""
    path = folder / "train" / run_name / "checkpoint_manager_snapshot.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return []
    return [r["metrics"]["step"] for r in state["checkpoint_results"]]


def assert_every_row_once(metrics, summary: dict, log_every: int, eval_every: int) -> None:
    """Every metric row of every replica in `summary` once, up to the step it ended at."""
    last = {r["replica"]: r["steps"] for r in summary["replicas"]}
    for replica, end in last.items():
        want = sorted(set(range(log_every, end + 1, log_every)) | set(range(eval_every, end + 1, eval_every)) | {end})
        steps = metrics.loc[metrics["replica"] == replica, "step"].tolist()
        assert steps == want, f"replica {replica}: steps are not every row once"


class LiveRun:
    """`launcher.run(cfg)` in a background thread; leaving the `with` block stops it if it is
    still going, so a failed test never leaves an endless run behind."""

    def __init__(self, cfg) -> None:
        self.cfg, self.box = cfg, {}
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"run-{cfg.name}")

    def _run(self) -> None:
        try:
            self.box["result"] = launcher.run(self.cfg, progress_every_s=5)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            self.box["error"] = err

    def __enter__(self) -> "LiveRun":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            try:
                request_stop(self.cfg.name)
            except StatsError:
                pass
            self.thread.join(timeout=DEADLINE_S)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def wait_until(self, what: str, ready) -> dict:
        """The broker's figures once `ready(stats)` holds."""
        try:
            return wait_for_stats(self.cfg.name, what, ready, alive=self.alive)
        except AssertionError:
            if "error" in self.box:  # the run failed: that error says more than the wait
                raise self.box["error"]
            raise

    def stop(self) -> None:
        assert request_stop(self.cfg.name) == "stopping"

    def result(self) -> launcher.ExperimentResult:
        self.thread.join(timeout=DEADLINE_S)
        assert not self.thread.is_alive(), f"{self.cfg.name} did not end"
        if "error" in self.box:
            raise self.box["error"]
        return self.box["result"]
