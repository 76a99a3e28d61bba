"""`ray-codistill stats` from another process while a codistillation run trains, on a real Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pandas as pd

from ray_codistill import launcher
from ray_codistill.config import load_config
from ray_codistill.stats import format_stats

from conftest import CONFIGS, ROOT

STATS_KEYS = {"schema", "experiment", "method", "status", "uptime_s", "num_replicas", "replicas",
              "divergence", "probe_rounds", "rejected_unknown_replica", "events", "broker_shards", "broker_node"}
REPLICA_KEYS = {"step", "train_loss", "val_acc", "samples_per_s", "publications", "fetches", "hits", "misses",
                "hit_rate", "age_p50", "age_p95", "age_max", "bytes_in", "bytes_out", "rejected", "probe_acc",
                "workers", "restarts"}


def _stats(*args: str) -> subprocess.CompletedProcess:
    # this session's cluster by address: "auto" finds the newest Ray on the machine, maybe another's
    import ray
    if ray.is_initialized() and "--address" not in args:
        args = (*args, "--address", ray.get_runtime_context().gcs_address)
    return subprocess.run([sys.executable, "-m", "ray_codistill.cli", "stats", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _wait_for_progress(name: str, deadline_s: float = 180) -> dict:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        out = _stats(name, "--json")
        if out.returncode == 0:
            stats = json.loads(out.stdout)
            if all(r["step"] > 0 for r in stats["replicas"].values()):
                return stats
        time.sleep(0.5)
    raise AssertionError(f"no progress from {name}: {out.stderr}")


def test_stats_while_training(ray_cluster, tmp_path):
    # long enough to be queried while it trains, whatever the load: the MNIST-1D CNN is compute
    # bound (about 500 steps/s at best on this machine, so 30,000 steps last 60 s or more); the
    # smoke MLP ran so fast that queries came after the end
    steps = 30000
    cfg = load_config(CONFIGS / "mnist1d.yaml", [f"steps={steps}", "log_every=100", "eval_every=5000",
                                                 "codistill.probe_every=1000", "cpus_per_worker=0.5"],
                      name="live", storage_path=str(tmp_path))
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(result=launcher.run(cfg, progress_every_s=5)))
    run.start()
    watcher = None
    try:
        first = _wait_for_progress("live")
        watcher = subprocess.Popen([sys.executable, "-m", "ray_codistill.cli", "stats", "live", "--watch", "1"],
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = _stats("live", "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        second = json.loads(out.stdout)
    finally:
        run.join(timeout=600)
    assert set(first) == STATS_KEYS and first["schema"] == "ray_codistill.stats/1"
    assert first["method"] == "codistill" and first["status"] == "running" and first["num_replicas"] == 2
    for r in ("0", "1"):
        assert set(first["replicas"][r]) == REPLICA_KEYS
        assert second["replicas"][r]["step"] > first["replicas"][r]["step"]  # training advanced
        worker, = second["replicas"][r]["workers"].values()
        assert worker["pid"] > 0 and worker["node_id"]
    assert second["divergence"] is None or {"disagreement", "sym_kl", "l2"} <= set(second["divergence"]["pairs"][0])
    # the text form (what `stats NAME` and --watch print); a third CLI process could come after the end
    text = format_stats(second)
    assert "experiment live (codistill" in text and "samples/s" in text and f"{worker['pid']}@" in text

    # --watch refreshed until the run ended, then stopped by itself
    out, _ = watcher.communicate(timeout=60)
    assert watcher.returncode == 0
    assert out.count("experiment live") >= 2 and "has ended" in out

    result = outcome["result"]
    div = pd.read_parquet(result.path / "divergence.parquet")
    assert list(div["step"]) == list(range(1000, steps + 1, 1000))  # every round, the final step included
    assert {"experiment", "method", "seed", "replica_a", "replica_b", "sym_kl", "disagreement", "l2"} <= set(div)
    assert result.summary["final_divergence"]["step"] == steps
    assert 0 <= result.summary["prediction_churn"]["mean"] <= 1


def test_stats_errors_are_one_line(ray_cluster):
    missing = _stats("no-such-experiment")
    assert missing.returncode == 1 and "no running experiment named 'no-such-experiment'" in missing.stderr
    unreachable = _stats("x", "--address", "127.0.0.1:1")
    assert unreachable.returncode == 1 and "cannot reach a Ray cluster at '127.0.0.1:1'" in unreachable.stderr
