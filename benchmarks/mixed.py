"""A large and a small model: alone, distilled offline, and codistilled together (docs/results-mixed.md).

For each seed, five paths through the real launcher, one after the other:
- `large alone`, `small alone`: one model each (method independent, one replica);
- `offline`: the small model distilled from the finished large one (method distill, reading the
  `large alone` run's folder): the two-stage way, whose wall time is the two runs' together;
- `codistill`: both at once in one run (`replica_overrides`), each pulled by the other;
- `one-way`: both at once, the large one at alpha 0 (it teaches and learns from labels alone).
Prints a row per path and architecture (test figures, mean ± std over seeds, parameter counts) and
the wall time of each path: one concurrent run against two sequential ones.

    python benchmarks/mixed.py [--config configs/mnist1d.yaml] [--large model.channels=25]
                               [--small model.channels=6] [--seeds 0 1 2] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from common import (Clock, add_pair_options, command, experiment_parser, load_average, machine, out_folder, pair_of,
                    run_experiment, start_ray)

from ray_codistill import report
from ray_codistill.config import load_config
from ray_codistill.fmt import markdown_table


def paths(base, large: dict, small: dict, seed: int, folder: Path) -> list[tuple[str, object]]:
    """(path, config) of one seed, in the order they must run (offline reads `large alone`)."""
    at = lambda name, **kw: base.replace(name=f"{name}-s{seed}", seed=seed, **kw)  # noqa: E731
    both = [dict(large), dict(small)]
    return [
        ("large alone", at("large", method="independent", replicas=1, **large)),
        ("small alone", at("small", method="independent", replicas=1, **small)),
        ("offline", at("offline", method="distill", replicas=1, **small,
                       **{"codistill.teacher_from": str(folder / f"large-s{seed}")})),
        ("codistill", at("codistill", method="codistill", replicas=2, replica_overrides=both)),
        ("one-way", at("one-way", method="codistill", replicas=2,
                       replica_overrides=[{**both[0], "codistill.alpha": 0.0}, both[1]])),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__)
    add_pair_options(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    large, small = pair_of(args)
    out = out_folder(args.out, "mixed")
    base = load_config(args.config, args.set, storage_path=str(out))
    start_ray()
    clock = Clock()
    print(f"machine: {machine()}; {load_average()}")
    print(f"command: {command()}")
    print(f"config: {args.config}; large {large}, small {small}; results in {out}", flush=True)
    rows = []
    for seed in args.seeds:
        for name, cfg in paths(base, large, small, seed, out):
            result = run_experiment(cfg, out / "launcher.log")
            rows.append({"path": name, "seed": seed, "folder": result.path, "wall": result.summary["wall_time_s"]})
            print(f"[{clock}] seed {seed}: {name} done in {result.summary['wall_time_s']:.0f} s", flush=True)
    runs = pd.DataFrame(rows)
    summaries = report.load_summaries(list(runs["folder"]))
    # one row per path and architecture: the path is the row's method, the model its own column
    summaries["group"] = _paths_of(runs, summaries)
    print(f"\ntest figures per path and architecture, mean ± std over seeds {args.seeds}; {load_average()}\n")
    print(report.to_markdown(report.comparison_table(summaries)))
    walls = runs.groupby("path", sort=False)["wall"].agg(["median", "count"])
    two_stage = [float(np.median(runs.loc[runs["path"] == p, "wall"])) for p in ("large alone", "offline")]
    print("\nwall time per path (median over seeds)\n")
    print(markdown_table(["path", "runs", "wall s"], [[p, int(r["count"]), f"{r['median']:.0f}"]
                                                      for p, r in walls.iterrows()]))
    print(f"\ntwo sequential runs (large alone, then offline): {sum(two_stage):.0f} s; one concurrent codistill "
          f"run: {walls.loc['codistill', 'median']:.0f} s")
    return 0


def _paths_of(runs: pd.DataFrame, summaries: pd.DataFrame) -> list[str]:
    """The path of each summary row (a mixed run gives a row per architecture)."""
    by_name = {Path(f).name: p for f, p in zip(runs["folder"], runs["path"])}
    return [by_name[e] for e in summaries["experiment"]]


if __name__ == "__main__":
    sys.exit(main())
