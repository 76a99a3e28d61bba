"""The `ray-codistill` command: run, compare, tune, stats, stop, report, sample.

Thin: it parses arguments, builds the config and calls the library. Exit status 2 means the
config or the arguments were refused before anything started; 1 means the run itself failed.
"""

from __future__ import annotations

import argparse
import sys


def _config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None, help="YAML preset, e.g. configs/mnist1d.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, e.g. codistill.alpha=0.5); repeatable")
    p.add_argument("--name", help="experiment name (default: the config's)")
    p.add_argument("--storage", help="results folder (default: the config's storage_path)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing experiment folder")
    p.add_argument("--verbose", action="store_true",
                   help="show all of Ray's console output (by default Ray Train's routine INFO lines are "
                        "hidden; warnings, errors and tracebacks always show; Ray's session logs keep all)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ray-codistill", description="Codistillation on Ray Train.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train one experiment")
    _config_args(p, optional=True)
    p.add_argument("--resume", metavar="NAME", help="continue experiment NAME (under --storage, default "
                   "results) from its replicas' latest checkpoints, with the config it started with")

    p = sub.add_parser("compare", help="run each method and seed, then print a comparison table")
    _config_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods (default: codistill independent allreduce)")

    p = sub.add_parser("tune", help="Ray Tune search over a space file, then re-runs of the best per group")
    _config_args(p)
    p.add_argument("--space", required=True, help="search space YAML, e.g. tuning/spaces/regularization.yaml")
    p.add_argument("--samples", type=int, default=1, help="Tune num_samples (random draws x grid; default 1)")
    p.add_argument("--scheduler", choices=["asha", "none"], default="none", help="ASHA early stopping or none")
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="at most N trials at once (default: as many as the cluster's CPUs hold)")
    p.add_argument("--replicas", type=int, nargs="+", metavar="R",
                   help="search once per R (e.g. 2 3 4 8), then a table and a plot against R "
                        "(tuning/spaces/replicas.yaml; docs/tune.md, \"Searches against R\")")
    p.add_argument("--cpus", type=float, default=2.0,
                   help="with --replicas: CPUs one experiment uses at any R (cpus / R per worker; default 2)")

    p = sub.add_parser("stats", help="live divergence and exchange statistics of a running experiment")
    p.add_argument("name", help="experiment name")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else the local cluster)")
    p.add_argument("--json", action="store_true", help="print JSON (schema in docs/watching.md)")
    p.add_argument("--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until the run ends")

    p = sub.add_parser("stop", help="end a running experiment early: replicas stop at their next metric row "
                       "and write their results (status stopped)")
    p.add_argument("name", help="experiment name")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else the local cluster)")

    p = sub.add_parser("report", help="table and plots from existing result folders")
    p.add_argument("dirs", nargs="+", help="experiment folders, or folders that contain them")
    p.add_argument("--out", help="where to write the PNG plots (default: the first folder)")

    p = sub.add_parser("sample", help="text from a trained language model (data.name=text) or the ensemble")
    p.add_argument("dir", help="experiment folder, e.g. results/shakespeare")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--replica", type=int, default=0, help="replica to sample from (default 0)")
    who.add_argument("--ensemble", action="store_true", help="sample from the mean of every replica's probabilities")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a new line)")
    p.add_argument("--tokens", type=int, default=300, help="characters to generate (default 300)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 takes the likeliest")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    return ap


def _load(args):
    from ray_codistill.config import load_config
    return load_config(args.config, args.overrides, name=args.name, storage_path=args.storage)


def cmd_run(args) -> int:
    from ray_codistill.errors import ConfigError
    from ray_codistill.launcher import run
    from ray_codistill.results import load_resumable
    if args.resume:
        cfg = load_resumable(args.resume, args.storage or "results")
        result = run(cfg, address=args.address, resume=True)
    elif args.config is None:
        raise ConfigError("run needs a config file, or --resume NAME")
    else:
        result = run(_load(args), address=args.address, overwrite=args.overwrite)
    _detach()
    print(f"results: {result.path}")
    return 0


def cmd_compare(args) -> int:
    from ray_codistill.compare import compare
    table, folder, plots = compare(_load(args), args.seeds, args.methods, address=args.address,
                                   overwrite=args.overwrite)
    _detach()
    for path in plots:
        print(f"plot: {path}")
    print(f"results: {folder}")
    print(table)  # the last thing printed
    return 0


def _detach() -> None:
    """Leave Ray before the closing lines, so no forwarded worker line lands after them (Ray prints
    what it still holds on shutdown; the session logs keep everything)."""
    import ray
    if ray.is_initialized():
        ray.shutdown()


def cmd_report(args) -> int:
    from ray_codistill.report import report
    table, plots = report(args.dirs, args.out)
    print(table)
    for path in plots:
        print(f"plot: {path}")
    return 0


def cmd_sample(args) -> int:
    from ray_codistill.sample import sample_text
    print(sample_text(args.dir, None if args.ensemble else args.replica, args.prompt, args.tokens,
                      args.temperature, args.seed))
    return 0


def cmd_tune(args) -> int:
    from ray_codistill.tune import load_space, search
    cfg = _load(args)
    if args.replicas:
        from ray_codistill.scaling import PLOT, study
        if args.samples != 1 or args.scheduler != "none":
            from ray_codistill.errors import ConfigError
            raise ConfigError("--replicas runs grid searches without a scheduler: drop --samples and --scheduler")
        table, folder = study(cfg, load_space(args.space, cfg), args.replicas, args.cpus, address=args.address,
                              overwrite=args.overwrite, max_concurrent=args.max_concurrent)
        _detach()
        print(f"plot: {folder / PLOT}")
        print(f"results: {folder}")
        print(table)
        return 0
    table, folder = search(cfg, load_space(args.space, cfg), samples=args.samples, scheduler=args.scheduler,
                           address=args.address, overwrite=args.overwrite, max_concurrent=args.max_concurrent)
    _detach()
    print(f"results: {folder}")
    print(table)
    return 0


def cmd_stats(args) -> int:
    from ray_codistill.stats import show
    return show(args.name, args.address, as_json=args.json, watch_s=args.watch)


def cmd_stop(args) -> int:
    from ray_codistill.stats import request_stop
    status = request_stop(args.name, args.address)
    print(f"experiment {args.name}: {status}; each replica stops at its next metric row (every log_every steps)"
          if status == "stopping" else f"experiment {args.name}: {status} already")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command in ("run", "compare", "tune"):
        from ray_codistill.console import quiet_ray
        quiet_ray(args.verbose)  # before anything imports Ray
    # commands import what they need, so `stats` and `--help` answer without loading torch
    from ray_codistill.errors import (ClusterError, ConfigError, DataError, ModelError, ReportError, RunError,
                                      StatsError)
    try:
        commands = {"run": cmd_run, "compare": cmd_compare, "tune": cmd_tune, "report": cmd_report,
                    "stats": cmd_stats, "stop": cmd_stop, "sample": cmd_sample}
        return commands[args.command](args)
    except (ConfigError, DataError, ModelError) as err:  # refused before anything started
        print(f"ray-codistill: config error: {err}", file=sys.stderr)
        return 2
    except (RunError, ReportError, StatsError, ClusterError) as err:
        if args.command in ("run", "compare", "tune"):
            _detach()
        print(f"ray-codistill: error: {err}", file=sys.stderr)
        return 1


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
