"""report.py on fake result folders: table values computed by hand, markdown, PNGs, errors."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ray_codistill.report import (
    ReportError,
    comparison_table,
    find_experiments,
    load_metrics,
    load_summaries,
    plot_curves,
    report,
    to_markdown,
)

# (experiment, method, seed, num_models, replica test accs, ensemble, wall, bytes, allreduce bytes)
FAKE = [
    ("cd-s0", "codistill", 0, 2, [0.94, 0.95], 0.965, 70.0, 1_200_000, 0),
    ("cd-s1", "codistill", 1, 2, [0.92, 0.93], 0.955, 80.0, 1_400_000, 0),
    ("ar-s0", "allreduce", 0, 1, [0.90], None, 50.0, 0, 3_000_000),
    ("ar-s1", "allreduce", 1, 1, [0.89], None, 61.0, 0, 5_000_000),
]


def _write_experiment(root, name, method, seed, num_models, accs, ens, wall, nbytes, arbytes):
    d = root / name
    d.mkdir(parents=True)
    summary = {
        "experiment": name,
        "method": method,
        "seed": seed,
        "num_models": num_models,
        "status": "finished",
        "replicas": [
            {"replica": i, "val_acc": a, "test_acc": a, "steps": 100} for i, a in enumerate(accs)
        ],
        "test_acc_mean": float(np.mean(accs)),
        "ensemble_test_acc": ens,
        "wall_time_s": wall,
        "bytes_exchanged": nbytes,
        "allreduce_bytes": arbytes,
        # churn: the share of test samples the two replicas label differently
        "prediction_churn": {"mean": 0.04 + seed * 0.02, "pairs": {}} if num_models > 1 else None,
        "config": {"method": method, "seed": seed},
        "versions": {"torch": "x"},
        "git_rev": "abc123",
    }
    (d / "summary.json").write_text(json.dumps(summary))
    rows = []
    for r in range(num_models):
        for step in range(0, 100, 10):
            evaluated = step % 20 == 0
            rows.append(
                {
                    "experiment": name,
                    "method": method,
                    "replica": r,
                    "seed": seed,
                    "step": step,
                    "train/loss": 2.0 / (1 + step) + 0.01 * r,
                    "train/ce": 2.0 / (1 + step),
                    "val/acc": 0.5 + step / 250 if evaluated else math.nan,
                    "val/loss": 1.0 if evaluated else math.nan,
                    "lr": 0.01,
                }
            )
    pd.DataFrame(rows).to_parquet(d / "metrics.parquet", engine="pyarrow", index=False)
    return d


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    for spec in FAKE:
        _write_experiment(root, *spec)
    return root


def test_find_experiments_levels_and_errors(tmp_path, results):
    dirs = find_experiments([results])
    assert [d.name for d in dirs] == sorted(s[0] for s in FAKE)
    # an experiment folder itself, and a folder two levels above the experiments
    assert find_experiments([results / "cd-s0"]) == [results / "cd-s0"]
    assert find_experiments([tmp_path]) == dirs
    # duplicates collapse
    assert find_experiments([results, results / "cd-s0"]) == dirs

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="no experiment found"):
        find_experiments([empty])
    with pytest.raises(ReportError):
        find_experiments([tmp_path / "missing"])
    assert issubclass(ReportError, ValueError)


def test_load_summaries(results):
    s = load_summaries(find_experiments([results])).set_index("experiment")
    assert s.loc["cd-s0", "test_acc"] == pytest.approx(0.945)
    assert s.loc["cd-s0", "best_replica_acc"] == pytest.approx(0.95)
    assert s.loc["cd-s0", "group"] == "codistill"
    assert math.isnan(s.loc["ar-s0", "ensemble_test_acc"])
    assert s.loc["ar-s1", "allreduce_bytes"] == 5_000_000


def test_load_metrics(results):
    m = load_metrics(find_experiments([results]))
    assert len(m) == (2 + 2 + 1 + 1) * 10
    assert {"experiment", "method", "replica", "seed", "step", "val/acc"} <= set(m.columns)
    assert m["val/acc"].isna().sum() == 6 * 5


def test_comparison_table_values(results):
    table = comparison_table(load_summaries(find_experiments([results])))
    assert list(table.columns) == [
        "method",
        "seeds",
        "test acc",
        "ensemble acc",
        "churn",
        "wall time (s)",
        "bytes exchanged",
        "all-reduce bytes",
    ]
    assert list(table["method"]) == ["codistill", "allreduce"]
    cd, ar = table.iloc[0], table.iloc[1]

    # codistill: per-seed test acc 94.5 and 92.5 -> mean 93.5, sample std sqrt(2)*1.0 = 1.414
    assert cd["seeds"] == 2
    assert cd["test acc"] == "93.5 ± 1.4"
    # ensemble 96.5 and 95.5 -> mean 96.0, std sqrt(((0.5)^2 + (0.5)^2) / 1) = 0.707
    assert cd["ensemble acc"] == "96.0 ± 0.7"
    # churn 4% and 6% -> mean 5.0, sample std sqrt(2) = 1.4
    assert cd["churn"] == "5.0 ± 1.4"
    assert cd["wall time (s)"] == "75"
    assert cd["bytes exchanged"] == "1.3 MB"
    assert cd["all-reduce bytes"] == "0 B"

    # allreduce: 90.0 and 89.0 -> mean 89.5, sample std 0.707
    assert ar["test acc"] == "89.5 ± 0.7"
    assert ar["ensemble acc"] == "–" and ar["churn"] == "–"
    assert ar["wall time (s)"] == "56"  # 55.5 rounds half to even
    assert ar["all-reduce bytes"] == "4.0 MB"


def test_one_seed_shows_value_alone(results):
    s = load_summaries([results / "cd-s0", results / "ar-s0"])
    table = comparison_table(s).set_index("method")
    assert table.loc["codistill", "test acc"] == "94.5"
    assert table.loc["codistill", "seeds"] == 1
    assert table.loc["allreduce", "ensemble acc"] == "–"


def test_method_order_with_unknown_method():
    s = pd.DataFrame(
        {
            "method": ["zeta", "allreduce", "independent", "codistill"],
            "num_models": [2, 1, 2, 2],
            "test_acc": [0.5, 0.6, 0.7, 0.8],
            "ensemble_test_acc": [0.5, math.nan, 0.7, 0.8],
            "wall_time_s": [1.0, 2.0, 3.0, 4.0],
            "bytes_exchanged": [0, 0, 0, 0],
            "allreduce_bytes": [0, 0, 0, 0],
        }
    )
    assert list(comparison_table(s)["method"]) == ["codistill", "independent", "allreduce", "zeta"]


def test_to_markdown(results):
    table = comparison_table(load_summaries(find_experiments([results])))
    md = to_markdown(table)
    lines = md.strip().splitlines()
    assert lines[0] == (
        "| method | seeds | test acc | ensemble acc | churn | wall time (s) | bytes exchanged "
        "| all-reduce bytes |"
    )
    assert set(lines[1].replace("|", "").split()) <= {"---", "---:"}
    assert len(lines) == 2 + 2  # header, alignment, one row per method
    assert lines[2].startswith("| codistill | 2 | 93.5 ± 1.4 | 96.0 ± 0.7 |")
    assert lines[3].startswith("| allreduce | 2 | 89.5 ± 0.7 | – |")
    assert all(line.count("|") == 9 for line in lines)


def test_plot_curves_writes_pngs(results, tmp_path):
    metrics = load_metrics(find_experiments([results]))
    out = tmp_path / "plots"
    paths = plot_curves(metrics, out)
    assert sorted(p.name for p in paths) == ["train_loss.png", "val_acc.png"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_band_is_the_mean_min_and_max_over_a_methods_runs(results):
    from ray_codistill.plots import band
    m = load_metrics(find_experiments([results]))
    runs, summary = band(m[m["method"] == "codistill"], "train/loss")
    assert runs.shape == (10, 4)  # 2 seeds x 2 replicas, 10 logged steps
    # train/loss is 2 / (1 + step) + 0.01 * replica: replicas 0 and 1 of both seeds
    at = 50
    assert summary.loc[at, "mean"] == pytest.approx(2 / (1 + at) + 0.005)
    assert summary.loc[at, "min"] == pytest.approx(2 / (1 + at))
    assert summary.loc[at, "max"] == pytest.approx(2 / (1 + at) + 0.01)
    # a run that stopped early: its late steps average the runs that have them
    cut = m[(m["method"] == "allreduce") & ~((m["experiment"] == "ar-s1") & (m["step"] > 40))]
    runs, summary = band(cut, "train/loss")
    assert runs.shape[1] == 2 and summary.loc[90, "mean"] == pytest.approx(2 / 91)


def test_a_large_and_a_small_model_get_a_line_each():
    from ray_codistill.plots import labels
    mixed = pd.DataFrame({"method": ["codistill", "codistill", "independent"],
                          "model": ["cnn(channels=25)", "cnn(channels=6)", "cnn(channels=6)"]})
    assert list(labels(mixed)) == ["codistill cnn(channels=25)", "codistill cnn(channels=6)",
                                   "independent cnn(channels=6)"]
    assert list(labels(mixed.assign(model="mlp"))) == ["codistill", "codistill", "independent"]


def test_plot_curves_skips_missing_or_empty_metric(results, tmp_path):
    metrics = load_metrics(find_experiments([results]))
    metrics["val/acc"] = math.nan
    paths = plot_curves(metrics.drop(columns=["train/loss"]), tmp_path / "p")
    assert paths == []
    assert not (tmp_path / "p" / "val_acc.png").exists()


def test_report_end_to_end(results):
    md, pngs = report([results])
    assert md.startswith("| method |")
    assert "| codistill |" in md and "| allreduce |" in md
    assert {p.parent for p in pngs} == {results}  # default out_dir: the first path
    assert all(p.stat().st_size > 0 for p in pngs)


def test_report_on_empty_folder_raises(tmp_path):
    with pytest.raises(ReportError):
        report([tmp_path])


def test_import_has_no_matplotlib():
    code = "import sys, ray_codistill.report; print('matplotlib' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout.strip()
    assert out == "False"


def test_a_language_models_table_shows_losses_and_bits_per_character(tmp_path):
    """Summaries of text runs: the table holds validation and test loss (nats per token, mean ± std
    over seeds), bits per character, the ensemble's loss and the probe disagreement, no accuracy."""
    for seed, (losses, ens) in enumerate([([1.80, 1.84], 1.75), ([1.90, 1.86], 1.79)]):
        d = tmp_path / f"lm-s{seed}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "experiment": d.name, "method": "codistill", "seed": seed, "num_models": 2, "status": "finished",
            "replicas": [{"replica": i, "val_loss": v + 0.1, "test_loss": v, "test_acc": 0.4} for i, v in
                         enumerate(losses)],
            "test_loss_mean": float(np.mean(losses)), "ensemble_test_loss": ens, "wall_time_s": 100.0,
            "bytes_exchanged": 0, "allreduce_bytes": 0,
            "final_divergence": {"pairs": [{"disagreement": 0.2}]},
            "config": {"method": "codistill", "data": {"name": "text"}}}))
    table = comparison_table(load_summaries([tmp_path / "lm-s0", tmp_path / "lm-s1"]))
    row = table.iloc[0]
    # the replicas' mean per seed (1.82, 1.88), then mean ± sample std over the seeds
    assert row["test loss"] == "1.850 ± 0.042" and row["val loss"] == "1.950 ± 0.042"
    assert row["test bits/char"] == f"{1.85 / math.log(2):.3f} ± {0.03 * math.sqrt(2) / math.log(2):.3f}"
    assert row["ensemble loss"] == "1.770 ± 0.028" and row["disagreement"] == "20.0 ± 0.0"
    assert "test acc" not in table.columns
