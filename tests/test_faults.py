"""Faults on a real local Ray, mid-run: a SIGKILLed replica worker, a SIGKILLed broker, a dead
driver. Peers keep training through each; the metrics keep neither gaps nor duplicated steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import ray

from ray_codistill.broker import get_broker
from ray_codistill.config import load_config
from ray_codistill.stats import request_stop

from conftest import CONFIGS, ROOT
from live import (DEADLINE_S, ENDLESS, LiveRun, assert_every_row_once, registered_checkpoints, wait_for,
                  wait_for_stats)

# a run that only ends when the test stops it (so a kill always lands mid-run), checkpoints
# every 250 steps
FAULT_RUN = {"steps": ENDLESS, "log_every": 50, "eval_every": 1000, "checkpoint_every": 250,
             "replica_max_failures": 1, "codistill.probe_every": 250, "codistill.probe_size": 64}


def _config(tmp_path, name: str):
    return load_config(CONFIGS / "smoke.yaml", [f"{k}={v}" for k, v in FAULT_RUN.items()],
                       name=name, storage_path=str(tmp_path))


def _restart_step(stats: dict, replica: int) -> int | None:
    steps = [e["step"] for e in stats["events"] if e["event"] == "restarted" and e["replica"] == replica]
    return steps[-1] if steps else None


def _kill_replica_1(run: LiveRun, folder, also=lambda stats, before: True) -> dict:
    """SIGKILL replica 1's worker once Ray Train has registered a checkpoint of it (the restart
    must come back from it); stop the run once replica 1 is back and training and
    `also(stats, stats at the kill)` holds. Returns what the test checks the result against."""
    cfg = run.cfg
    registered = wait_for("a registered checkpoint of replica 1",
                          lambda: registered_checkpoints(folder / cfg.name, f"{cfg.name}-r1"))
    before = run.wait_until("replica 1's worker", lambda s: s["replicas"]["1"]["workers"])
    pid = before["replicas"]["1"]["workers"]["0"]["pid"]
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    back = run.wait_until("replica 1 back and training, and what the test waits for", lambda s: (
        _restart_step(s, 1) is not None and s["replicas"]["1"]["step"] > _restart_step(s, 1) + cfg.log_every
        and also(s, before)))
    run.stop()
    return {"registered": registered, "pid": pid, "killed_at": killed_at, "back": back, "result": run.result()}


def _assert_replica_1_alone_restarted_from_its_checkpoint(killed: dict) -> None:
    cfg, summary = killed["result"].summary["config"], killed["result"].summary
    metrics = pd.read_parquet(killed["result"].path / "metrics.parquet")
    others = [r for r in range(cfg["replicas"]) if r != 1]
    assert summary["status"] == "stopped"
    assert summary["restarts"] == {str(r): int(r == 1) for r in range(cfg["replicas"])}
    assert [r["restarts"] for r in summary["replicas"]] == [int(r == 1) for r in range(cfg["replicas"])]
    restart, = [e for e in summary["events"] if e["event"] == "restarted"]
    assert restart["replica"] == 1 and restart["time"] > killed["killed_at"] and restart["pid"] != killed["pid"]
    # back from the newest checkpoint registered before the kill (or a newer one), not from scratch
    assert restart["step"] % cfg["checkpoint_every"] == 0 and restart["step"] >= max(killed["registered"]) > 0
    assert killed["back"]["replicas"]["1"]["restarts"] == 1
    assert_every_row_once(metrics, summary, cfg["log_every"], cfg["eval_every"])
    # the other replicas kept training while replica 1 was down
    for r in others:
        rows = metrics[metrics["replica"] == r]
        assert len(rows[(rows["timestamp"] > killed["killed_at"]) & (rows["timestamp"] < restart["time"])]) > 0


def test_killed_worker_restarts_its_replica_alone_from_its_checkpoint(ray_cluster, tmp_path):
    cfg = _config(tmp_path, "fault-worker")
    with LiveRun(cfg) as run:
        killed = _kill_replica_1(run, tmp_path)
    _assert_replica_1_alone_restarted_from_its_checkpoint(killed)


def test_one_of_three_random_peer_replicas_restarts_and_teachers_flow_again(ray_cluster, tmp_path):
    """R = 3 with the random_peer rule: replica 1's worker is killed; it alone restarts from its
    checkpoint, the other two train on, and after the restart every replica is served teachers
    again and replica 1 publishes again."""
    cfg = _config(tmp_path, "fault-three").replace(replicas=3, **{"codistill.teacher_rule": "random_peer"})
    with LiveRun(cfg) as run:
        killed = _kill_replica_1(run, tmp_path, also=lambda s, before: all(
            s["replicas"][r][key] > before["replicas"][r][key]
            for r in ("0", "1", "2") for key in ("hits", "publications")))
    _assert_replica_1_alone_restarted_from_its_checkpoint(killed)
    summary = killed["result"].summary
    assert summary["config"]["codistill"]["teacher_rule"] == "random_peer"
    assert all(summary["broker"][r]["rejected"] == {} for r in ("0", "1", "2"))
    # the rows each replica logged after the restart count teachers it distilled from
    metrics = pd.read_parquet(killed["result"].path / "metrics.parquet")
    restarted_at = next(e["time"] for e in summary["events"] if e["event"] == "restarted")
    for r in range(3):
        rows = metrics[(metrics["replica"] == r) & (metrics["timestamp"] > restarted_at)]
        assert (rows["distill/hit_rate"] > 0).any(), f"replica {r}: no teacher after the restart"


def test_killed_broker_is_restarted_and_training_finishes(ray_cluster, tmp_path):
    cfg = _config(tmp_path, "fault-broker")
    misses = lambda stats: sum(r["misses"] for r in stats["replicas"].values())  # noqa: E731
    with LiveRun(cfg) as run:
        before = run.wait_until("two probe rounds", lambda s: s["probe_rounds"] >= 2)
        broker_pid = ray.get(get_broker(cfg.name).ping.remote())
        os.kill(broker_pid, signal.SIGKILL)
        # the teacher store restarted empty: fetches missed until peers published again
        after = run.wait_until("the broker back, misses counted, both replicas publishing and training", lambda s: (
            "broker_reloaded" in [e["event"] for e in s["events"]] and misses(s) > misses(before) and all(
                s["replicas"][r]["publications"] > before["replicas"][r]["publications"] and
                s["replicas"][r]["step"] > before["replicas"][r]["step"] for r in ("0", "1"))))
        run.stop()
        result = run.result()
    summary = result.summary
    metrics = pd.read_parquet(result.path / "metrics.parquet")
    divergence = pd.read_parquet(result.path / "divergence.parquet")

    assert summary["status"] == "stopped" and summary["restarts"] == {"0": 0, "1": 0}
    assert [e["event"] for e in summary["events"]].count("broker_reloaded") == 1
    assert_every_row_once(metrics, summary, cfg.log_every, cfg.eval_every)  # rows sent while it was down were retried
    # the divergence history recorded before the kill survived it
    assert set(range(250, before["divergence"]["step"] + 1, 250)) <= set(divergence["step"])
    assert misses(after) > misses(before)


def test_resume_continues_an_experiment_whose_driver_died(ray_cluster, tmp_path):
    """`ray-codistill run` in its own process, SIGKILLed mid-run; `run --resume NAME` continues
    from the replicas' checkpoints and the metrics have every step once."""
    address = ray.get_runtime_context().gcs_address
    cli = [sys.executable, "-m", "ray_codistill.cli"]
    sets = [arg for k, v in FAULT_RUN.items() for arg in ("--set", f"{k}={v}")]
    folder = tmp_path / "fault-driver"
    driver = subprocess.Popen([*cli, "run", str(CONFIGS / "smoke.yaml"), "--name", "fault-driver",
                               "--storage", str(tmp_path), "--address", address, *sets],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("a registered checkpoint of each replica", lambda: all(
            registered_checkpoints(folder, f"fault-driver-r{r}") for r in (0, 1)),
            alive=lambda: driver.poll() is None)
    finally:
        driver.kill()
        driver.wait()
    assert not (folder / "summary.json").exists()

    resumed = subprocess.Popen([*cli, "run", "--resume", "fault-driver", "--storage", str(tmp_path),
                                "--address", address], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_for_stats("fault-driver", "both replicas back from their checkpoints and training", lambda s: all(
            _restart_step(s, r) is not None and s["replicas"][str(r)]["step"] > _restart_step(s, r)
            for r in (0, 1)) and "resumed" in [e["event"] for e in s["events"]],
            alive=lambda: resumed.poll() is None)
        request_stop("fault-driver")
        _, err = resumed.communicate(timeout=DEADLINE_S)
    finally:
        if resumed.poll() is None:
            resumed.kill()
    assert resumed.returncode == 0, err[-3000:]
    summary = json.loads((folder / "summary.json").read_text())
    cfg = _config(tmp_path, "fault-driver")
    assert summary["status"] == "stopped" and summary["config"]["steps"] == cfg.steps
    events = [e["event"] for e in summary["events"]]
    assert "resumed" in events and events.count("restarted") == 2
    for e in summary["events"]:
        if e["event"] == "restarted":  # from a checkpoint, not from scratch
            assert e["step"] > 0 and e["step"] % cfg.checkpoint_every == 0
    assert_every_row_once(pd.read_parquet(folder / "metrics.parquet"), summary, cfg.log_every, cfg.eval_every)

    again = subprocess.run([*cli, "run", "--resume", "fault-driver", "--storage", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "has stopped already" in again.stderr
