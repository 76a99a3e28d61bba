"""Replicas of different architectures in one run, and the offline baseline: the per-replica
config and its refusals (no Ray), then mixed pairs in each exchange mode, one-way distillation and
`method: distill` from a finished run's folder, on a real local Ray."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr
from unittest import mock

import pandas as pd
import pytest

from ray_codistill import cli, launcher
from ray_codistill.config import load_config
from ray_codistill.errors import ConfigError, ModelError
from ray_codistill.report import comparison_table, load_summaries

from conftest import CONFIGS

PAIR = "replica_overrides=[{model.hidden: 64}, {model.hidden: 8, optim.lr: 0.005}]"
SHORT = ("steps=120", "eval_every=60")  # runs on Ray: long enough for teachers after the 20-step burn-in


def smoke(*overrides: str, **fields):
    return load_config(CONFIGS / "smoke.yaml", list(overrides), **fields)


def test_each_replica_gets_its_own_model_optimizer_and_alpha():
    cfg = smoke(PAIR)
    big, small = cfg.for_replica(0), cfg.for_replica(1)
    assert (big.model.hidden, small.model.hidden) == (64, 8)
    assert (big.optim.lr, small.optim.lr) == (0.01, 0.005) and big.model.name == small.model.name == "mlp"
    assert cfg.for_replica(1).replica_overrides == [] and cfg.mixed and not smoke().mixed
    one_way = smoke("replica_overrides=[{codistill.alpha: 0.0}, {}]")
    assert one_way.for_replica(0).codistill.alpha == 0.0 and one_way.for_replica(1).codistill.alpha == 1.0
    assert one_way.distills and one_way.exchanges  # replica 0 still publishes for replica 1
    assert not smoke("codistill.alpha=0").distills


@pytest.mark.parametrize("override, key, says", [
    ("replica_overrides=[{data.name: mnist1d}, {}]", "replica_overrides[0].data.name", "not a per-replica key"),
    ("replica_overrides=[{}, {}, {model.hidden: 8}]", "replica_overrides", "3 entries for 2 replicas"),
    ("replica_overrides=[{model.hidden: 0}]", "replica_overrides[0].model.hidden", "must be >= 1"),
    ("replica_overrides=[{codistill.alpha: -1}]", "replica_overrides[0].codistill.alpha", "must be >= 0"),
])
def test_bad_overrides_are_refused_by_key(override, key, says):
    with pytest.raises(ConfigError) as err:
        smoke(override)
    assert str(err.value).startswith(key + ":") and says in str(err.value)


def test_allreduce_replicas_cannot_differ_and_distill_needs_a_teacher():
    with pytest.raises(ConfigError, match="^replica_overrides: allreduce trains one model"):
        smoke(PAIR, "method=allreduce")
    with pytest.raises(ConfigError, match="^codistill.teacher_from: required for method=distill"):
        smoke("method=distill")
    with pytest.raises(ConfigError, match="^codistill.teacher_from: .*only for it"):
        smoke("codistill.teacher_from=/somewhere")


def test_replicas_whose_outputs_do_not_match_are_refused_before_ray(tmp_path):
    """A replica's model that does not fit the data (here a language model on classes) is refused
    by `run` before it connects to Ray, naming the replica's key; the CLI exits 2."""
    cfg = smoke("replica_overrides=[{}, {model.name: gpt}]", storage_path=str(tmp_path))
    with pytest.raises(ModelError, match=r"^replica_overrides\[1\]\.model.name=gpt"):
        launcher.run(cfg)
    err = io.StringIO()
    with mock.patch.dict(os.environ), redirect_stderr(err):  # in this process, as tests/test_cli.py's refusals
        code = cli.main(["run", str(CONFIGS / "smoke.yaml"), "--set", "replica_overrides=[{}, {model.name: resnet18}]",
                         "--storage", str(tmp_path)])
    assert code == 2 and "replica_overrides[1].model.name=resnet18" in err.getvalue()
    assert not any(tmp_path.iterdir())


def _summary(folder, name, method, models):
    d = folder / name
    d.mkdir()
    d.joinpath("summary.json").write_text(json.dumps({
        "experiment": name, "method": method, "seed": 0, "num_models": len(models), "status": "finished",
        "replicas": [{"replica": r, "model": m, "params": p, "test_acc": a, "val_acc": a}
                     for r, (m, p, a) in enumerate(models)],
        "test_acc_mean": sum(a for _, _, a in models) / len(models), "ensemble_test_acc": 0.9,
        "wall_time_s": 10.0, "bytes_exchanged": 0, "allreduce_bytes": 0, "config": {"data": {"name": "mnist1d"}}}))
    return d


def test_a_mixed_runs_table_shows_each_architecture_and_its_size(tmp_path):
    mixed = _summary(tmp_path, "mixed", "codistill", [("cnn(25)", 5210, 0.94), ("cnn(8)", 900, 0.88)])
    small = _summary(tmp_path, "small", "independent", [("cnn(8)", 900, 0.85)])
    rows = load_summaries([mixed, small])
    assert list(rows["model"]) == ["cnn(25)", "cnn(8)", "cnn(8)"]
    assert list(rows["test_acc"]) == [0.94, 0.88, 0.85]  # never the mean of a large and a small model
    table = comparison_table(rows)
    assert list(table.columns[:4]) == ["method", "model", "params", "seeds"]
    assert list(zip(table["method"], table["model"])) == [("codistill", "cnn(25)"), ("codistill", "cnn(8)"),
                                                          ("independent", "cnn(8)")]  # the large model first
    table = table.set_index(["method", "model"])
    assert table.loc[("codistill", "cnn(8)"), "params"] == "900"
    assert table.loc[("codistill", "cnn(25)"), "test acc"] == "94.0"
    assert table.loc[("independent", "cnn(8)"), "test acc"] == "85.0"
    assert table.loc[("codistill", "cnn(8)"), "ensemble acc"] == "90.0"  # the ensemble is the whole run's


def test_tunes_table_gives_each_architecture_of_a_mixed_group_its_row(tmp_path):
    from ray_codistill.tune import final_table
    runs = [_summary(tmp_path, f"mixed-s{seed}", "codistill", [("cnn(25)", 5210, 0.94 + seed / 100),
                                                                 ("cnn(8)", 900, 0.88)]) for seed in (0, 1)]
    results = pd.DataFrame([{"phase": "final", "status": "finished", "group": "codistill", "method": "codistill",
                             "params": '{"codistill.alpha": 0.5}', "path": str(d), "val_acc": 0.9, "test_acc": 0.91,
                             "ensemble_test_acc": 0.9} for d in runs])
    table = final_table(results).set_index(["group", "model"])
    assert table.loc[("codistill", "cnn(25)"), "test acc"] == "94.5 ± 0.7"
    assert table.loc[("codistill", "cnn(8)"), "params"] == "900"
    assert table.loc[("codistill", "cnn(8)"), "test acc"] == "88.0 ± 0.0"


# -- on a real local Ray --------------------------------------------------------------------------

@pytest.mark.parametrize("exchange", ["logits", "weights"])
def test_a_mixed_pair_codistills_in_each_exchange_mode(ray_cluster, tmp_path, exchange):
    cfg = smoke(PAIR, f"codistill.exchange={exchange}", "codistill.exchange_every=10", *SHORT,
                storage_path=str(tmp_path), name=f"mixed-{exchange}")
    summary = launcher.run(cfg).summary
    reps = {r["replica"]: r for r in summary["replicas"]}
    assert reps[0]["model"] == "mlp(hidden=64)" and reps[1]["model"] == "mlp(hidden=8)"
    assert reps[0]["params"] > 4 * reps[1]["params"]
    for r in ("0", "1"):
        counters = summary["broker"][r]
        assert counters["hits"] > 0, counters
        assert set(counters["age_by_peer"]) == {str(1 - int(r))}  # each pair's own age
    assert summary["ensemble_test_acc"] is not None


def test_one_way_leaves_the_teachers_loss_plain_cross_entropy(ray_cluster, tmp_path):
    """Replica 0 at alpha 0 learns from labels alone (its distillation term is 0 at every row)
    while it teaches replica 1."""
    cfg = smoke("replica_overrides=[{codistill.alpha: 0.0}, {model.hidden: 8}]", *SHORT, storage_path=str(tmp_path),
                name="one-way")
    result = launcher.run(cfg)
    rows = pd.read_parquet(result.path / "metrics.parquet")
    teacher, student = rows[rows["replica"] == 0], rows[rows["replica"] == 1]
    assert (teacher["train/distill"] == 0).all() and (teacher["train/loss"] == teacher["train/ce"]).all()
    assert (student.loc[student["step"] > 40, "train/distill"] > 0).any()
    assert result.summary["broker"]["1"]["hits"] > 0 and result.summary["broker"]["0"]["hits"] == 0


def test_offline_distillation_reads_its_teacher_from_a_result_folder(ray_cluster, tmp_path):
    teacher = launcher.run(smoke("method=independent", "replicas=1", "model.hidden=64", *SHORT,
                                 storage_path=str(tmp_path), name="teacher"))
    cfg = smoke("method=distill", "replicas=1", "model.hidden=8", f"codistill.teacher_from={teacher.path}", *SHORT,
                storage_path=str(tmp_path), name="student")
    summary = launcher.run(cfg).summary
    assert summary["method"] == "distill" and summary["replicas"][0]["model"] == "mlp(hidden=8)"
    rows = pd.read_parquet(tmp_path / "student" / "metrics.parquet")
    assert (rows.loc[rows["step"] > 40, "train/distill"] > 0).all()  # every step after burn-in had its teacher
    # a teacher trained on other data, or a replica it does not have, is refused before anything starts
    with pytest.raises(ConfigError, match=r"^codistill.teacher_from: .* other data \(data.num_classes"):
        launcher.run(cfg.replace(name="student2", **{"data.num_classes": 3}))
    with pytest.raises(ConfigError, match="^codistill.teacher_replica: got 1"):
        launcher.run(cfg.replace(name="student3", **{"codistill.teacher_replica": 1}))
    with pytest.raises(ConfigError, match="^codistill.teacher_from: .*not an experiment folder"):
        launcher.run(cfg.replace(name="student4", **{"codistill.teacher_from": str(tmp_path)}))
