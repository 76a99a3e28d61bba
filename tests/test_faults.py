"""Faults on a real local Ray, mid-run: a SIGKILLed replica worker, a SIGKILLed broker, a dead
driver. Peers keep training through each; the metrics keep neither gaps nor duplicated steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import ray

from ray_codistill import launcher
from ray_codistill.broker import get_broker
from ray_codistill.config import load_config

from conftest import CONFIGS, ROOT

# long enough to be killed mid-run (a few seconds of steps), checkpoints every 250 steps
FAULT_RUN = {"steps": 3000, "log_every": 50, "eval_every": 1000, "checkpoint_every": 250,
             "replica_max_failures": 1, "codistill.probe_every": 250, "codistill.probe_size": 64}


def _config(tmp_path, name: str):
    return load_config(CONFIGS / "smoke.yaml", [f"{k}={v}" for k, v in FAULT_RUN.items()],
                       name=name, storage_path=str(tmp_path))


def _stats_json(name: str) -> dict | None:
    address = ray.get_runtime_context().gcs_address  # this session's cluster, not the newest on the machine
    out = subprocess.run([sys.executable, "-m", "ray_codistill.cli", "stats", name, "--json", "--address", address], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 else None


def _in_background(cfg) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def target():
        try:
            box["result"] = launcher.run(cfg, progress_every_s=5)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def _wait_until(name: str, ready, deadline_s: float = 240) -> dict:
    """Poll `ray-codistill stats --json` (a separate process, as a user would) until `ready(stats)`."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        stats = _stats_json(name)
        if stats is not None and ready(stats):
            return stats
        time.sleep(0.2)
    raise AssertionError(f"{name} never reached the awaited state")


def _finish(thread: threading.Thread, box: dict):
    thread.join(timeout=600)
    assert not thread.is_alive(), "the run did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"]


def _assert_no_gaps(metrics: pd.DataFrame, cfg) -> None:
    for replica, rows in metrics.groupby("replica"):
        steps = rows["step"].tolist()
        want = sorted(set(range(cfg.log_every, cfg.steps + 1, cfg.log_every)) |
                      set(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every)) | {cfg.steps})
        assert steps == want, f"replica {replica}: steps are not every row once"


def test_killed_worker_restarts_its_replica_alone_from_its_checkpoint(ray_cluster, tmp_path):
    cfg = _config(tmp_path, "fault-worker")
    thread, box = _in_background(cfg)
    stats = _wait_until(cfg.name, lambda s: s["replicas"]["1"]["step"] >= 600 and s["replicas"]["1"]["workers"])
    pid = stats["replicas"]["1"]["workers"]["0"]["pid"]
    killed_at, step_at_kill = time.time(), stats["replicas"]["1"]["step"]
    os.kill(pid, signal.SIGKILL)
    summary = _finish(thread, box).summary
    metrics = pd.read_parquet(tmp_path / cfg.name / "metrics.parquet")

    assert summary["status"] == "finished"
    assert summary["restarts"] == {"0": 0, "1": 1}
    assert [r["restarts"] for r in summary["replicas"]] == [0, 1]
    assert {r["replica"]: r["steps"] for r in summary["replicas"]} == {0: cfg.steps, 1: cfg.steps}
    restart, = [e for e in summary["events"] if e["event"] == "restarted"]
    assert restart["replica"] == 1 and restart["time"] > killed_at
    # back from its newest checkpoint before the kill, not from scratch
    assert restart["step"] % cfg.checkpoint_every == 0 and 0 < restart["step"] <= step_at_kill
    assert restart["pid"] != pid
    _assert_no_gaps(metrics, cfg)
    # replica 0 kept training while replica 1 was down
    r0 = metrics[metrics["replica"] == 0]
    during = r0[(r0["timestamp"] > killed_at) & (r0["timestamp"] < restart["time"])]
    assert len(during) > 0 or r0["timestamp"].max() < restart["time"]


def test_killed_broker_is_restarted_and_training_finishes(ray_cluster, tmp_path):
    cfg = _config(tmp_path, "fault-broker")
    thread, box = _in_background(cfg)
    before = _wait_until(cfg.name, lambda s: s["probe_rounds"] >= 2 and min(
        r["step"] for r in s["replicas"].values()) >= 600)
    broker_pid = ray.get(get_broker(cfg.name).ping.remote())
    os.kill(broker_pid, signal.SIGKILL)
    summary = _finish(thread, box).summary
    metrics = pd.read_parquet(tmp_path / cfg.name / "metrics.parquet")
    divergence = pd.read_parquet(tmp_path / cfg.name / "divergence.parquet")

    assert summary["status"] == "finished" and summary["restarts"] == {"0": 0, "1": 0}
    assert [e["event"] for e in summary["events"]].count("broker_reloaded") == 1
    _assert_no_gaps(metrics, cfg)  # rows sent while it was down were retried
    # the divergence history recorded before the kill survived it
    assert set(range(250, before["divergence"]["step"] + 1, 250)) <= set(divergence["step"])
    # the teacher store restarted empty: the first fetches after it missed until peers published again
    misses = lambda replicas: sum(replicas[r]["misses"] for r in ("0", "1"))  # noqa: E731
    assert misses(summary["broker"]) > misses(before["replicas"])
    for r in ("0", "1"):
        assert summary["broker"][r]["publications"] > before["replicas"][r]["publications"]


def test_resume_continues_an_experiment_whose_driver_died(ray_cluster, tmp_path):
    """`ray-codistill run` in its own process, SIGKILLed mid-run; `run --resume NAME` continues
    from the replicas' checkpoints and the metrics have every step once."""
    address = ray.get_runtime_context().gcs_address
    cli = [sys.executable, "-m", "ray_codistill.cli"]
    sets = [arg for k, v in FAULT_RUN.items() for arg in ("--set", f"{k}={v}")]
    driver = subprocess.Popen([*cli, "run", str(CONFIGS / "smoke.yaml"), "--name", "fault-driver",
                               "--storage", str(tmp_path), "--address", address, *sets],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until("fault-driver", lambda s: min(r["step"] for r in s["replicas"].values()) >= 600)
    finally:
        driver.kill()
        driver.wait()
    folder = tmp_path / "fault-driver"
    assert not (folder / "summary.json").exists()

    resumed = subprocess.run([*cli, "run", "--resume", "fault-driver", "--storage", str(tmp_path),
                              "--address", address], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    cfg = _config(tmp_path, "fault-driver")
    assert summary["status"] == "finished" and summary["config"]["steps"] == cfg.steps
    events = [e["event"] for e in summary["events"]]
    assert "resumed" in events and events.count("restarted") == 2
    for e in summary["events"]:
        if e["event"] == "restarted":  # from a checkpoint, not from scratch
            assert e["step"] > 0 and e["step"] % cfg.checkpoint_every == 0
    _assert_no_gaps(pd.read_parquet(folder / "metrics.parquet"), cfg)

    again = subprocess.run([*cli, "run", "--resume", "fault-driver", "--storage", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "finished already" in again.stderr
