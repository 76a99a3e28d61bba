"""`ray-codistill stats` and `stop` from other processes while a codistillation run trains, on a real Ray."""

from __future__ import annotations

import subprocess
import sys
import threading

import pandas as pd

from ray_codistill.config import load_config
from ray_codistill.stats import format_stats

from conftest import CONFIGS, ROOT
from live import ENDLESS, LiveRun, cli, stats_json, wait_for

STATS_KEYS = {"schema", "experiment", "method", "status", "uptime_s", "num_replicas", "replicas",
              "divergence", "probe_rounds", "rejected_unknown_replica", "events", "broker_shards", "broker_node",
              "broker_niceness"}
REPLICA_KEYS = {"model", "params", "step", "train_loss", "val_acc", "val_loss", "samples_per_s", "publications",
                "fetches", "hits", "misses", "hit_rate", "age_p50", "age_p95", "age_max", "age_by_peer",
                "serve_ms_p50", "serve_ms_p99", "bytes_in", "bytes_out", "rejected", "probe_acc", "probe_loss",
                "workers", "restarts"}


def test_stats_while_training(ray_cluster, tmp_path):
    # the run only ends when the test stops it, so every look below waits on what the broker
    # reports, never on the run lasting long enough
    cfg = load_config(CONFIGS / "smoke.yaml", [f"steps={ENDLESS}", "log_every=50", "eval_every=500",
                                               "codistill.probe_every=200"],
                      name="live", storage_path=str(tmp_path))
    with LiveRun(cfg) as run:
        run.wait_until("both replicas training", lambda s: all(r["step"] > 0 for r in s["replicas"].values()))
        first = stats_json("live")  # `ray-codistill stats NAME --json` in its own process
        assert first is not None
        watcher = subprocess.Popen([sys.executable, "-m", "ray_codistill.cli", "stats", "live", "--watch", "1",
                                    "--address", ray_cluster.get_runtime_context().gcs_address],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(watcher.stdout), daemon=True)
        reader.start()
        wait_for("two --watch frames", lambda: sum("experiment live" in line for line in lines) >= 2)
        second = wait_for("training to advance, teachers served to both replicas, two probe rounds", lambda: (
            (s := stats_json("live")) is not None and s["probe_rounds"] >= 2 and all(
                s["replicas"][r]["step"] > first["replicas"][r]["step"] and s["replicas"][r]["hits"] > 0
                for r in ("0", "1")) and s))
        stop = cli("stop", "live")
        assert stop.returncode == 0 and "live: stopping" in stop.stdout, stop.stderr[-2000:]
        result = run.result()
    assert set(first) == STATS_KEYS and first["schema"] == "ray_codistill.stats/1"
    assert first["method"] == "codistill" and first["status"] == "running" and first["num_replicas"] == 2
    for r in ("0", "1"):
        assert set(first["replicas"][r]) == REPLICA_KEYS
        assert first["replicas"][r]["model"] == "mlp(hidden=32)" and first["replicas"][r]["params"] > 0
        worker, = second["replicas"][r]["workers"].values()
        assert worker["pid"] > 0 and worker["node_id"]
    assert {"disagreement", "sym_kl", "l2"} <= set(second["divergence"]["pairs"][0])
    text = format_stats(second)  # what `stats NAME` prints
    assert "experiment live (codistill" in text and "samples/s" in text and f"{worker['pid']}@" in text

    # --watch refreshed until the run ended, then stopped by itself
    watcher.wait(timeout=120)
    reader.join(timeout=60)
    assert watcher.returncode == 0, watcher.stderr.read()[-2000:]
    assert "has ended" in "".join(lines)

    # stopped on request: each replica ended at a metric row and wrote its results as at an end
    summary = result.summary
    metrics = pd.read_parquet(result.path / "metrics.parquet")
    assert summary["status"] == "stopped"
    assert "stop_requested" in [e["event"] for e in summary["events"]]
    for r in ("0", "1"):  # each replica distilled from the other's logits
        assert summary["broker"][r]["age_max"] >= summary["broker"][r]["age_p50"] >= 0
        rows = metrics[metrics["replica"] == int(r)]
        assert (rows["train/distill"] > 0).any() and rows["distill/teacher_age"].notna().any()
    for rep in summary["replicas"]:
        assert rep["stopped"] and 0 < rep["steps"] < ENDLESS and rep["steps"] % cfg.log_every == 0
        assert 0 <= rep["test_acc"] <= 1 and 0 <= rep["val_acc"] <= 1
        assert metrics.loc[metrics["replica"] == rep["replica"], "step"].max() == rep["steps"]
    div = pd.read_parquet(result.path / "divergence.parquet")
    last = div["step"].max()
    assert last >= second["divergence"]["step"]
    assert list(div["step"].unique()) == list(range(200, last + 1, 200))  # every round both replicas reached
    assert {"experiment", "method", "seed", "replica_a", "replica_b", "sym_kl", "disagreement", "l2"} <= set(div)
    assert 0 <= summary["prediction_churn"]["mean"] <= 1


def test_stop_of_an_unknown_experiment_fails_in_one_line(ray_cluster):
    out = cli("stop", "no-such-experiment")
    assert out.returncode == 1 and "no running experiment named 'no-such-experiment'" in out.stderr


def test_stats_errors_are_one_line(ray_cluster):
    missing = cli("stats", "no-such-experiment")
    assert missing.returncode == 1 and "no running experiment named 'no-such-experiment'" in missing.stderr
    unreachable = cli("stats", "x", "--address", "127.0.0.1:1")
    assert unreachable.returncode == 1 and "cannot reach a Ray cluster at '127.0.0.1:1'" in unreachable.stderr
