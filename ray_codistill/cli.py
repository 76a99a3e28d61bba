"""The `ray-codistill` command: run, compare, report.

Thin: it parses arguments, builds the config and calls the library. Exit status 2 means the
config or the arguments were refused before anything started; 1 means the run itself failed.
"""

from __future__ import annotations

import argparse
import sys


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML preset, e.g. configs/mnist1d.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (dotted, e.g. codistill.alpha=0.5); repeatable")
    p.add_argument("--name", help="experiment name (default: the config's)")
    p.add_argument("--storage", help="results folder (default: the config's storage_path)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing experiment folder")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ray-codistill", description="Codistillation on Ray Train.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train one experiment")
    _config_args(p)

    p = sub.add_parser("compare", help="run each method and seed, then print a comparison table")
    _config_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="methods (default: codistill independent allreduce)")

    p = sub.add_parser("report", help="table and plots from existing result folders")
    p.add_argument("dirs", nargs="+", help="experiment folders, or folders that contain them")
    p.add_argument("--out", help="where to write the PNG plots (default: the first folder)")
    return ap


def _load(args):
    from ray_codistill.config import load_config
    return load_config(args.config, args.overrides, name=args.name, storage_path=args.storage)


def cmd_run(args) -> int:
    from ray_codistill.launcher import run
    result = run(_load(args), address=args.address, overwrite=args.overwrite)
    print(f"results: {result.path}")
    return 0


def cmd_compare(args) -> int:
    from ray_codistill.compare import compare
    table, folder = compare(_load(args), args.seeds, args.methods, address=args.address, overwrite=args.overwrite)
    print(table)
    print(f"results: {folder}")
    return 0


def cmd_report(args) -> int:
    from ray_codistill.report import report
    table, plots = report(args.dirs, args.out)
    print(table)
    for path in plots:
        print(f"plot: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # imported here so that `--help` and argument errors answer at once
    from ray_codistill.config import ConfigError
    from ray_codistill.data import DataError
    from ray_codistill.launcher import RunError
    from ray_codistill.models import ModelError
    from ray_codistill.report import ReportError
    try:
        return {"run": cmd_run, "compare": cmd_compare, "report": cmd_report}[args.command](args)
    except (ConfigError, DataError, ModelError) as err:  # refused before anything started
        print(f"ray-codistill: config error: {err}", file=sys.stderr)
        return 2
    except (RunError, ReportError) as err:
        print(f"ray-codistill: error: {err}", file=sys.stderr)
        return 1


def main_exit() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
