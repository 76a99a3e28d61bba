"""Method comparisons: every method and seed of one config, run one after another, then a table.

Each experiment takes the whole cluster for itself, so runs are sequential here; Ray Tune
(`tune.py`) is the tool for searching and packing many smaller trials.
"""

from __future__ import annotations

from pathlib import Path

from ray_codistill.config import COMPARED, METHODS, ConfigError, ExperimentConfig
from ray_codistill.console import say
from ray_codistill.fmt import to_markdown
from ray_codistill.results import write_parquet
from ray_codistill import launcher, report


def compare(cfg: ExperimentConfig, seeds: list[int], methods: list[str] | None = None,
            address: str | None = None, overwrite: bool = False) -> tuple[str, Path, list[Path]]:
    """Run `methods` x `seeds`; returns the markdown table, the comparison folder and the plots.

    Experiments go to `<storage_path>/<name>/<name>-<method>-s<seed>`, with `comparison.parquet`
    (one row per experiment) and the report's PNG plots (`report.report`) beside them.
    """
    methods = list(methods or COMPARED)
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"method: got {m!r}, allowed values: {', '.join(METHODS)}")
    group = Path(cfg.storage_path) / cfg.name
    runs = [cfg.replace(method=m, seed=s, name=f"{cfg.name}-{m}-s{s}", storage_path=str(group))
            for m in methods for s in seeds]
    folders = []
    for i, run_cfg in enumerate(runs, 1):
        heading = f"comparison {cfg.name}: experiment {i}/{len(runs)}: {run_cfg.name}"
        say(heading)
        result = launcher.run(run_cfg, address=address, overwrite=overwrite, heading=heading)
        if result.summary["status"] == "stopped":
            say(f"warning: {run_cfg.name} was stopped early: its figures are not on the same budget as the others")
        folders.append(result.path)
    summaries = report.load_summaries(folders)
    write_parquet(group.resolve() / "comparison.parquet", summaries)
    _, plots = report.report(folders, group.resolve())
    return to_markdown(report.comparison_table(summaries)), group.resolve(), plots
