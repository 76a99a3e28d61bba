"""The timeline of a codistillation run in which one replica's worker is SIGKILLed mid-run.

Runs a codistill experiment on a local Ray (default: the MNIST-1D preset, checkpoints every 500
steps, one restart allowed per replica), kills the worker process of replica 1 once it passes
`--kill-at` steps (its pid from the broker's statistics, as `ray-codistill stats --json` shows
them), and prints: when it died, when its worker group came back and from which checkpoint, how
many steps it lost, and the throughput of replica 0 before, during and after the outage (from the
metric rows' wall-clock timestamps).

    python benchmarks/fault_timeline.py [--quick] [--config configs/mnist1d.yaml]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
from common import start_ray

from ray_codistill import launcher
from ray_codistill.config import load_config
from ray_codistill.fmt import markdown_table
from ray_codistill.stats import get_stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "mnist1d.yaml"))
    ap.add_argument("--quick", action="store_true", help="3,000 steps instead of 6,000")
    ap.add_argument("--kill-at", type=int, default=None, help="kill once replica 1 passed this step")
    args = ap.parse_args(argv)
    steps = 3000 if args.quick else 6000
    kill_at = args.kill_at or steps // 3
    storage = tempfile.mkdtemp(prefix="fault-timeline-")
    cfg = load_config(args.config, [f"steps={steps}", "checkpoint_every=500", "replica_max_failures=1",
                                    "method=codistill", "cpus_per_worker=1"],
                      name="fault-timeline", storage_path=storage)
    start_ray()
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(result=launcher.run(cfg, progress_every_s=30)), daemon=True)
    thread.start()

    killed = None
    while thread.is_alive() and killed is None:
        time.sleep(0.2)
        try:
            stats = get_stats(cfg.name)
        except Exception:  # not up yet
            continue
        r1 = stats["replicas"]["1"]
        if r1["step"] >= kill_at and r1["workers"]:
            os.kill(r1["workers"]["0"]["pid"], signal.SIGKILL)
            killed = (time.time(), r1["step"])
    thread.join()
    if "result" not in box or killed is None:
        print("the run ended before the kill, or failed", file=sys.stderr)
        return 1
    summary = box["result"].summary
    metrics = pd.read_parquet(box["result"].path / "metrics.parquet")
    start = min(e["time"] for e in summary["events"])
    kill_time, kill_step = killed
    restart = next(e for e in summary["events"] if e["event"] == "restarted")
    print(f"# fault timeline: {cfg.name}, {cfg.data.name} {cfg.model.name}, {steps} steps, "
          f"checkpoint_every={cfg.checkpoint_every}, {os.cpu_count()} CPUs\n")
    timeline = [(e["time"], f"replica {e['replica']} {e['event']} at step {e['step']}") for e in summary["events"]]
    timeline.append((kill_time, f"replica 1 worker SIGKILLed at about step {kill_step}"))
    print(markdown_table(["t (s)", "event"], [[f"{t - start:.1f}", what] for t, what in sorted(timeline)], right={0}))
    print(f"\nreplica 1 was down {restart['time'] - kill_time:.1f} s, restored step {restart['step']} "
          f"(lost about {kill_step - restart['step']} steps of work); restarts: {summary['restarts']}")

    r0 = metrics[(metrics["replica"] == 0) & (metrics["step"] > cfg.codistill.burn_in)].sort_values("step")
    phases = {"before the kill": r0["timestamp"] < kill_time,
              "replica 1 down": (r0["timestamp"] >= kill_time) & (r0["timestamp"] < restart["time"]),
              "after the restart": r0["timestamp"] >= restart["time"]}
    rows_of = {phase: r0[sel] for phase, sel in phases.items()}
    table = [[phase, len(rows), f"{rows['perf/samples_per_s'].median():.0f}",
              f"{rows['distill/teacher_age'].median():.0f}", f"{rows['distill/hit_rate'].median():.2f}"]
             for phase, rows in rows_of.items() if len(rows)]
    print()
    print(markdown_table([f"replica 0 (rows after the {cfg.codistill.burn_in}-step burn-in)", "rows",
                          "median samples/s", "median teacher age", "hit rate"], table))
    steps_1 = metrics[metrics["replica"] == 1]["step"]
    print(f"\nreplica 1 rows: {len(steps_1)}, unique steps: {steps_1.is_unique}; final test acc: "
          + ", ".join(f"r{r['replica']} {r['test_acc']:.4f}" for r in summary["replicas"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
