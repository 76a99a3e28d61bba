"""Teacher fetch latency in real codistillation runs against R (prints a table; asserts nothing).

Each run is a whole `ray_codistill.launcher.run` of the base config (MNIST-1D, 6,000 steps, batch
100 per replica: issue #14's study) with R replicas sharing `--cpus` CPUs, repeated with seeds
0, 1, ... and interleaved (R = 2, R = 8, R = 2, ...). For each run:

- **round trip** (`fetch_ms_p50/p99` in `summary.json`): timed by each worker from asking for a
  chunk's teachers to its callback seeing the answer, while it trains on. It holds the broker's
  work, the queue in front of the broker, Ray's two messages, and the time the worker process
  takes to run the callback (it needs a core and the GIL, which its training loop holds);
- **serve** (`serve_ms_p50/p99` in the broker's counters): the CPU time the broker's thread spent
  computing the answer (`TeacherStore.fetch`), the part the teacher rule decides (wall time there
  would also count the time the OS gives the broker's core to the R busy workers);
- the broker's peak resident memory.

`--broker-niceness` runs every case with the broker at each given niceness (default 0, the
config's default, and 15, Ray's for all its worker processes: the broker's before
`codistill.broker_niceness` existed); the table shows the niceness each broker ran at.

`--control` adds R = 2 runs beside `max(R) - 2` busy processes (bounded spin loops, ended with
the run, at the niceness Ray gives its worker processes, 15 here: at 0 they would starve the
workers): as many compute-bound processes on the cores as at the largest R, but the broker
serving 2 replicas. If its round trip is close to the largest R's, the round trip measures the
cores' contention rather than the broker's work.

`--watch-stats` runs every case twice, alone and with a watcher beside it that asks for the
run's `stats` once a second from the benchmark's process (what `ray-codistill stats NAME --watch
1` asks, without a process start per poll): whether a user watching a run slows its fetches.

    python benchmarks/fetch_latency.py [--replicas 2 8] [--rules random_peer] [--broker-niceness 0 15]
                                      [--repeats 3] [--control] [--watch-stats]
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Clock, add_codistill_options, codistill_base, command, experiment_parser,  # noqa: E402
                    load_average, machine, out_folder, run_experiment, start_ray)

from ray_codistill import report, scaling  # noqa: E402
from ray_codistill.config import TEACHER_RULES  # noqa: E402
from ray_codistill.fmt import human_bytes, markdown_table  # noqa: E402

SPIN = "import os, time\nos.nice({nice})\nend = time.monotonic() + {s}\nwhile time.monotonic() < end:\n    pass\n"


def ray_worker_niceness() -> int:
    """The niceness of Ray's worker processes (Ray raises it for them; replicas run there)."""
    import ray
    return ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())


@contextlib.contextmanager
def busy(n: int, max_s: float, nice: int):
    """`n` processes at niceness `nice` that keep a core busy, each ending by itself after
    `max_s` at the latest and ended on leaving the block."""
    procs = [subprocess.Popen([sys.executable, "-c", SPIN.format(s=max_s, nice=nice)]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


@contextlib.contextmanager
def watching(name: str | None, every_s: float = 1.0):
    """Ask experiment `name` for its stats every `every_s` seconds while the block runs (nothing
    when `name` is None); yields a dict that counts the answered polls."""
    from ray_codistill.errors import StatsError
    from ray_codistill.stats import get_stats
    polls, done = {"answered": 0}, threading.Event()

    def loop() -> None:
        while not done.wait(every_s):
            try:
                get_stats(name)
                polls["answered"] += 1
            except StatsError:  # not started yet, or ended
                pass

    thread = threading.Thread(target=loop, daemon=True) if name else None
    if thread:
        thread.start()
    try:
        yield polls
    finally:
        done.set()
        if thread:
            thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__)
    parser.add_argument("--replicas", type=int, nargs="+", default=[2, 8], help="values of R (default: 2 8)")
    parser.add_argument("--rules", nargs="+", default=["random_peer"], choices=TEACHER_RULES,
                        help="teacher rules (default: random_peer)")
    add_codistill_options(parser, steps=None)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case, seeds 0.. (median shown)")
    parser.add_argument("--control", action="store_true",
                        help="also R = 2 beside max(R) - 2 busy processes (see above)")
    parser.add_argument("--watch-stats", action="store_true",
                        help="run each case also with stats asked once a second beside it (see above)")
    args = parser.parse_args(argv)
    if min(args.replicas) < 2:
        parser.error("--replicas: every R must be >= 2")

    out = out_folder(args.out, "fetch")
    base = codistill_base(args, out)
    watch = [False, True] if args.watch_stats else [False]
    cases = [(rule, nice, r, 0, w) for nice in args.broker_niceness for rule in args.rules for r in args.replicas
             for w in watch]
    if args.control:
        cases += [(rule, nice, 2, max(args.replicas) - 2, False) for nice in args.broker_niceness
                  for rule in args.rules]

    start_ray()
    nice = ray_worker_niceness() - os.nice(0)  # the spinners' increment: the workers' niceness
    clock = Clock()
    print(f"machine: {machine()}")
    print(f"command: {command()}")
    print(f"config: {args.config} {' '.join(args.set)}; {base.steps} steps, batch {base.batch_size}/replica, "
          f"alpha {args.alpha:g}, {args.cpus:g} CPUs shared by the replicas; results and logs: {out}")
    print(f"load average at start: {load_average()}; Ray workers' niceness {os.nice(0) + nice}", flush=True)

    runs: dict[tuple, list[pd.Series]] = {c: [] for c in cases}  # case -> one summary row per run
    for rep in range(args.repeats):
        for case in cases:
            rule, broker_nice, r, hogs, watched = case
            cfg = scaling.config_at(base, r, args.cpus)
            cfg = cfg.replace(name=f"fetch-{rule}-n{broker_nice}-r{r}{f'-busy{hogs}' if hogs else ''}"
                                   f"{'-watched' if watched else ''}-s{rep}",
                              seed=rep, **{"codistill.teacher_rule": rule, "codistill.broker_niceness": broker_nice})
            with busy(hogs, max_s=3600, nice=nice), watching(cfg.name if watched else None) as polls:
                result = run_experiment(cfg, out / "launcher.log")
            row = report.load_summaries([result.path]).iloc[0]
            runs[case].append(row)
            watched_note = f", {polls['answered']} stats polls answered" if watched else ""
            print(f"[{clock}] repeat {rep + 1}/{args.repeats} {cfg.name}: round trip p50 {row['fetch_ms_p50']:.2f} "
                  f"ms, p99 {row['fetch_ms_p99']:.1f} ms, serve CPU p50 {row['serve_ms_p50']:.3f} ms, wall "
                  f"{row['wall_time_s']:.0f} s{watched_note} (load average {load_average()})", flush=True)

    figures = ("fetch_ms_p50", "fetch_ms_p99", "serve_ms_p50", "serve_ms_p99", "wall_time_s", "broker_peak_rss_bytes",
               "broker_niceness")
    med = {case: pd.DataFrame(rows)[list(figures)].median() for case, rows in runs.items()}
    table_rows = []
    for case, m in med.items():  # the niceness column: what the brokers got, not what was asked
        rule, _, r, hogs, watched = case
        each = " ".join(f"{row['fetch_ms_p50']:.2f}" for row in runs[case])
        each99 = " ".join(f"{row['fetch_ms_p99']:.1f}" for row in runs[case])
        table_rows.append([rule, f"{m['broker_niceness']:.0f}", r, hogs, "yes" if watched else "no", len(runs[case]),
                           f"{m['fetch_ms_p50']:.2f}", each, f"{m['fetch_ms_p99']:.1f}", each99,
                           f"{m['serve_ms_p50']:.3f}",
                           f"{m['serve_ms_p99']:.3f}", f"{m['wall_time_s']:.0f}",
                           human_bytes(m["broker_peak_rss_bytes"])])
    print(f"\nmedians over runs (each run: the median of its replicas' p50s, the worst p99); "
          f"load average at the end: {load_average()}\n")
    print(markdown_table(["rule", "broker niceness", "R", "busy procs", "stats watched", "runs", "round trip p50 ms",
                          "each run", "round trip p99 ms", "each run", "serve CPU p50 ms", "serve CPU p99 ms",
                          "wall s", "broker peak RSS"], table_rows, right=set(range(1, 14)) - {4}))
    lo, hi = min(args.replicas), max(args.replicas)
    for rule, broker_nice in [(rule, nice) for nice in args.broker_niceness for rule in args.rules]:
        a, b = med[(rule, broker_nice, lo, 0, False)], med[(rule, broker_nice, hi, 0, False)]
        print(f"{rule}, broker niceness {b['broker_niceness']:.0f}: R = {hi} / R = {lo}: "
              f"round trip p50 {b['fetch_ms_p50'] / a['fetch_ms_p50']:.2f}x, "
              f"broker serve CPU p50 {b['serve_ms_p50'] / a['serve_ms_p50']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
