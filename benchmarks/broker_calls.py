"""Where the broker's time goes, per kind of call, from Ray's own task events (prints a table).

One real codistillation run per broker niceness (`codistill.broker_niceness`), then, for every
method of that run's broker, and of its ledger (the actor that keeps the run's rows, probes,
stats: `ray_codistill/ledger.py`): the number of calls, the wall time Ray saw it execute
(RUNNING to FINISHED: the actor's work plus any time the OS gave its core to others meanwhile),
and the time calls waited in the actor's queue (SUBMITTED_TO_WORKER to RUNNING). The queue in
front of a fetch is the broker's `fetch` row. Ray records these
events with millisecond timestamps; the State API that serves them needs the dashboard, so this
script starts its Ray with it. The broker's CPU per fetch (`serve_ms_p50`) and the workers'
round trip (`fetch_ms_p50`) are printed beside, from the run's `summary.json`.

    python benchmarks/broker_calls.py [--replicas 8] [--rule random_peer] [--broker-niceness 0 15]
                                      [--steps 3000]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Clock, add_codistill_options, codistill_base, command, experiment_parser,  # noqa: E402
                    load_average, machine, out_folder, run_experiment, start_ray)

from ray_codistill import report, scaling  # noqa: E402
from ray_codistill.broker import NAMESPACE, broker_name  # noqa: E402
from ray_codistill.ledger import ledger_name  # noqa: E402
from ray_codistill.config import TEACHER_RULES  # noqa: E402
from ray_codistill.fmt import markdown_table  # noqa: E402

MAX_TASKS = 100_000  # the State API's cap on one listing (it reads RAY_MAX_LIMIT_FROM_API_SERVER)


def actor_calls(name: str) -> dict[str, np.ndarray]:
    """Method -> array of (queued ms, executing ms), one row per finished call of the named actor
    (none when there is no such actor)."""
    from ray.util.state import list_actors, list_tasks
    actors = list_actors(filters=[("name", "=", name), ("ray_namespace", "=", NAMESPACE)], limit=10,
                         raise_on_missing_output=False)
    if not actors:
        return {}
    actor, = actors
    tasks = list_tasks(filters=[("actor_id", "=", actor.actor_id)], detail=True, limit=MAX_TASKS,
                       raise_on_missing_output=False)
    calls: dict[str, list] = {}
    for task in tasks:
        at = {e["state"]: e["created_ms"] for e in task.events or []}
        if {"SUBMITTED_TO_WORKER", "RUNNING", "FINISHED"} <= set(at):
            calls.setdefault(task.func_or_class_name.split(".")[-1], []).append(
                (at["RUNNING"] - at["SUBMITTED_TO_WORKER"], at["FINISHED"] - at["RUNNING"]))
    return {method: np.asarray(rows, dtype=float) for method, rows in calls.items()}


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__)
    parser.add_argument("--replicas", type=int, default=8, help="R (default: %(default)s)")
    parser.add_argument("--rule", default="random_peer", choices=TEACHER_RULES,
                        help="teacher rule (default: %(default)s)")
    add_codistill_options(parser, steps=3000)
    args = parser.parse_args(argv)

    out = out_folder(args.out, "calls")
    base = scaling.config_at(codistill_base(args, out), args.replicas, args.cpus).replace(
        **{"codistill.teacher_rule": args.rule})
    os.environ.setdefault("RAY_MAX_LIMIT_FROM_API_SERVER", str(MAX_TASKS))  # read by the dashboard Ray starts
    start_ray()
    clock = Clock()
    print(f"machine: {machine()}")
    print(f"command: {command()}")
    print(f"config: {args.config} {' '.join(args.set)}; R = {args.replicas}, {args.rule}, {base.steps} steps, "
          f"{args.cpus:g} CPUs shared; results and logs: {out}")
    print(f"load average at start: {load_average()}", flush=True)

    rows = []
    for nice in args.broker_niceness:
        cfg = base.replace(name=f"calls-r{args.replicas}-n{nice}", **{"codistill.broker_niceness": nice})
        result = run_experiment(cfg, out / "launcher.log")
        summary = report.load_summaries([result.path]).iloc[0]
        span_s = result.summary["wall_time_s"]
        for actor, name in (("broker", broker_name(cfg.name)), ("ledger", ledger_name(cfg.name))):
            calls = actor_calls(name)
            busy_s = sum(c[:, 1].sum() for c in calls.values()) / 1e3
            print(f"[{clock}] niceness {summary['broker_niceness']:.0f}: round trip p50 "
                  f"{summary['fetch_ms_p50']:.2f} ms, serve CPU p50 {summary['serve_ms_p50']:.3f} ms; the {actor} "
                  f"executed calls for {busy_s:.1f} s of the run's {span_s:.0f} s (load average {load_average()})",
                  flush=True)
            for method, c in sorted(calls.items(), key=lambda kv: -kv[1][:, 1].sum()):
                q, x = c[:, 0], c[:, 1]
                rows.append([f"{summary['broker_niceness']:.0f}", actor, method, len(c), f"{np.median(x):.1f}",
                             f"{np.percentile(x, 99):.1f}", f"{x.sum() / 1e3:.2f}", f"{np.median(q):.1f}",
                             f"{np.percentile(q, 99):.1f}"])
    print(f"\nper actor method (Ray task events, ms resolution); load average at the end: {load_average()}\n")
    print(markdown_table(["broker niceness", "actor", "method", "calls", "executing p50 ms", "executing p99 ms",
                          "executing total s", "queued p50 ms", "queued p99 ms"], rows,
                         right={0, 3, 4, 5, 6, 7, 8}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
