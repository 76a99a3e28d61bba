"""A tiny Ray Tune search on the real local Ray: trials run whole experiments; re-runs; report."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from ray_codistill.config import load_config
from ray_codistill.errors import ConfigError
from ray_codistill.tune import load_space, search

from conftest import CONFIGS, ROOT

SPACE = """
seeds: [0]
final_seeds: [3]
groups:
  codistill:
    method: codistill
    params:
      codistill.alpha: {grid: [0.5, 1.0]}
      optim.weight_decay: {grid: [0.0]}
  allreduce:
    method: allreduce
    params:
      optim.lr: {loguniform: [0.002, 0.005]}
"""


def test_tiny_search(ray_cluster, tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE)
    cfg = load_config(CONFIGS / "smoke.yaml", ["steps=100", "eval_every=50", "codistill.probe_every=50"],
                      name="tiny", storage_path=str(tmp_path))
    # ASHA may stop trials here (a rung at step 50, two trials at once): selection must hold either way
    table, folder = search(cfg, load_space(space_file, cfg), scheduler="asha")
    results = pd.read_parquet(folder / "tune.parquet")
    search_rows = results[results["phase"] == "search"]
    assert len(search_rows) == 2 + 1  # one row per trial: 2 x 1 codistill grid, 1 allreduce random draw
    drawn = search_rows.loc[search_rows["group"] == "allreduce", "optim.lr"].iloc[0]
    assert 0.002 <= drawn <= 0.005 and drawn != cfg.optim.lr
    assert set(search_rows["status"]) <= {"finished", "stopped early"}
    stopped = search_rows[search_rows["status"] == "stopped early"]
    assert (stopped["step"] < cfg.steps).all() and stopped["test_acc"].isna().all()
    final = results[results["phase"] == "final"]
    assert len(final) == 2 and (final["status"] == "finished").all()  # the best of each group, on the final seed
    assert results["val_acc"].between(0, 1).all() and final["test_acc"].between(0, 1).all()
    codistill = search_rows[search_rows["group"] == "codistill"]
    assert sorted(zip(codistill["codistill.alpha"], codistill["optim.weight_decay"])) == [(0.5, 0.0), (1.0, 0.0)]
    # the re-runs use the finished configuration with the best validation accuracy (the first in
    # grid order among equals: 160 validation samples after 100 steps often tie), and the final seeds
    done = codistill[codistill["status"] == "finished"]
    best = done.loc[done["val_acc"] == done["val_acc"].max(), "params"].iloc[0]
    final_codistill = final[final["group"] == "codistill"]
    assert (final_codistill["params"] == best).all()
    assert list(final_codistill["seed"]) == [3] and list(final[final["group"] == "allreduce"]["seed"]) == [3]
    print(table)
    assert "| codistill |" in table and "| allreduce |" in table and "nan" not in table
    for name in ("tune.md", "heatmap_codistill.png", "val_acc.png", "train_loss.png"):
        assert (folder / name).stat().st_size > 0


def test_asha_stops_a_trial_that_cannot_learn(ray_cluster, tmp_path):
    # Deterministic by construction: at most one trial at a time runs the trials in grid order, so the learning trial has recorded its accuracy at the only rung
    # (step 100) before the other arrives there; a learning rate of 1e-7 leaves the model at its
    # initial accuracy, below the learner's, so ASHA must stop it. Evaluations are reported from
    # the metric rows, so the rung is reported however fast the trials run.
    space_file = tmp_path / "space.yaml"
    space_file.write_text("seeds: [0]\nfinal_seeds: [1]\n"
                          "groups: {allreduce: {params: {optim.lr: {grid: [0.01, 1.0e-7]}}}}\n")
    cfg = load_config(CONFIGS / "smoke.yaml", ["steps=300", "eval_every=100", "log_every=50"],
                      name="asha", storage_path=str(tmp_path))
    _, folder = search(cfg, load_space(space_file, cfg), scheduler="asha", max_concurrent=1)
    results = pd.read_parquet(folder / "tune.parquet")
    rows = results[results["phase"] == "search"].set_index("optim.lr")
    assert rows.loc[0.01, "status"] == "finished" and rows.loc[0.01, "step"] == cfg.steps
    assert rows.loc[1e-7, "status"] == "stopped early" and rows.loc[1e-7, "step"] == 100
    assert rows.loc[1e-7, "val_acc"] < rows.loc[0.01, "val_acc"]
    final = results[results["phase"] == "final"]
    assert len(final) == 1 and final["optim.lr"].iloc[0] == 0.01 and final["status"].iloc[0] == "finished"


def test_space_files_are_checked(tmp_path):
    cfg = load_config(CONFIGS / "mnist1d.yaml")
    for name in ("regularization.yaml", "staleness.yaml", "replicas.yaml"):
        assert load_space(ROOT / "tuning" / "spaces" / name, cfg).groups
    assert load_space(ROOT / "tuning" / "spaces" / "shakespeare.yaml", load_config(CONFIGS / "shakespeare.yaml")).groups
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: {codistill: {params: {codistill.alfa: {grid: [1]}}}}")
    with pytest.raises(ConfigError, match="codistill.alfa"):
        load_space(bad, cfg)
    bad.write_text("groups: {codistill: {params: {codistill.alpha: {gird: [1]}}}}")
    with pytest.raises(ConfigError, match="grid"):
        load_space(bad, cfg)


def test_best_keeps_exact_values():
    # a grid over [null, 20] is a float column in pandas; the re-runs must get None and 20 back
    from ray_codistill.tune import Group, _best
    rows = pd.DataFrame({"status": ["finished"] * 4, "val_acc": [0.9, 0.8, 0.7, 0.95],
                         "params": ['{"codistill.max_staleness": null}', '{"codistill.max_staleness": 20}',
                                    '{"codistill.max_staleness": 20}', '{"codistill.max_staleness": null}']})
    assert _best(rows, Group("logits", "codistill")) == {"codistill.max_staleness": None}
    rows["val_acc"] = [0.1, 0.9, 0.9, 0.1]
    best = _best(rows, Group("logits", "codistill"))
    assert best == {"codistill.max_staleness": 20} and isinstance(best["codistill.max_staleness"], int)
    rows["val_acc"] = [0.9, 0.9, 0.9, 0.9]  # a tie: the first configuration in the search's order
    assert _best(rows, Group("logits", "codistill")) == {"codistill.max_staleness": None}
    assert _best(rows.iloc[1:], Group("logits", "codistill")) == {"codistill.max_staleness": 20}


@pytest.mark.ray  # a script in a subprocess starts a Ray without the dashboard
def test_asha_refuses_a_cluster_without_the_state_api(tmp_path):
    """Without the dashboard, trials that ASHA stops would keep their CPUs reserved (Ray Train frees
    them through the State API) and later trials would wait forever: refused before anything starts.
    A Ray of its own in another process: the session's has the dashboard."""
    space = tmp_path / "space.yaml"
    space.write_text("groups: {allreduce: {params: {optim.lr: {grid: [0.01]}}}}\n")
    script = f"""
import ray
ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
from ray_codistill.config import load_config
from ray_codistill.errors import ClusterError
from ray_codistill.tune import load_space, search
cfg = load_config({str(CONFIGS / "smoke.yaml")!r}, storage_path={str(tmp_path)!r})
try:
    search(cfg, load_space({str(space)!r}, cfg), scheduler="asha")
except ClusterError as err:
    print("refused:", err)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "refused: --scheduler asha needs Ray's dashboard" in out.stdout, out.stderr[-3000:]
    assert not (tmp_path / "smoke" / "ray_tune").exists()  # nothing started


def test_a_language_model_is_selected_by_the_lowest_validation_loss():
    """Tune's choice and table for a language model: the lowest mean validation loss wins (the
    highest token accuracy would not), and the table shows losses and bits per character."""
    from ray_codistill.tasks import LM
    from ray_codistill.tune import Group, _best, final_table
    rows = pd.DataFrame([
        {"phase": "search", "status": "finished", "params": '{"optim.weight_decay": 0.0}', "val_loss": 1.9,
         "val_acc": 0.50},
        {"phase": "search", "status": "finished", "params": '{"optim.weight_decay": 0.1}', "val_loss": 1.8,
         "val_acc": 0.45},
    ])
    assert _best(rows, Group("codistill", "codistill", {}), LM) == {"optim.weight_decay": 0.1}
    assert _best(rows, Group("codistill", "codistill", {})) == {"optim.weight_decay": 0.0}  # accuracy: max
    final = pd.DataFrame([{"phase": "final", "status": "finished", "group": "codistill", "method": "codistill",
                           "params": '{"optim.weight_decay": 0.1}', "val_loss": v, "test_loss": v + 0.01,
                           "ensemble_test_loss": v - 0.05} for v in (1.8, 1.9)])
    table = final_table(final, lm=True)
    assert table.loc[0, "test loss"] == "1.860 ± 0.071" and table.loc[0, "test bits/char"] == "2.683 ± 0.102"
    assert "val acc" not in table.columns
