"""The R study's glue (scaling.py) on finished searches written here: configs per R, reading the
re-runs, the table against R (values computed by hand), the plot, and going on from finished Rs.
The searches themselves are Tune searches, run for real in test_tune.py."""

import json

import pandas as pd
import pytest

from ray_codistill.config import load_config
from ray_codistill.errors import ConfigError
from ray_codistill.scaling import PLOT, config_at, scaling_table, study
from ray_codistill.tune import Group, SearchSpace, _only_configuration, load_space

from conftest import CONFIGS, ROOT


def _summary(folder, method, seed, accs, ens, fetch, rss):
    folder.mkdir(parents=True)
    many = method != "allreduce"
    (folder / "summary.json").write_text(json.dumps({
        "experiment": folder.name, "method": method, "seed": seed, "num_models": len(accs) if many else 1,
        "replicas": [{"replica": i, "test_acc": a, **({"fetch_ms_p50": fetch[i][0], "fetch_ms_p99": fetch[i][1]}
                                                       if fetch else {})} for i, a in enumerate(accs)],
        "test_acc_mean": sum(accs) / len(accs), "ensemble_test_acc": ens, "wall_time_s": 40.0 + seed,
        "prediction_churn": {"mean": 0.1} if many else None,
        "final_divergence": {"pairs": [{"disagreement": 0.08}, {"disagreement": 0.12}]} if many else None,
        "broker_memory": {"teacher_bytes": 1000, "peak_rss_bytes": rss}}))


def _finished_search(root, name, r):
    """A search folder as tune.search leaves it: tune.parquet, and the re-runs' summaries."""
    folder = root / f"{name}-r{r}"
    rows = []
    for seed in (0, 1):
        cd = folder / "trials" / f"cd-{seed}"
        _summary(cd, "codistill", seed, [0.90 + 0.01 * seed] * r, 0.95, [(2.0 + seed, 10.0)] * r, 300e6)
        ar = folder / "trials" / f"ar-{seed}"
        _summary(ar, "allreduce", seed, [0.88], None, None, 200e6)
        rows += [{"phase": "final", "group": "random_peer", "method": "codistill", "status": "finished",
                  "path": str(cd), "val_acc": 0.9,
                  "params": json.dumps({"codistill.alpha": 2.0, "codistill.teacher_rule": "random_peer"})},
                 {"phase": "final", "group": "allreduce", "method": "allreduce", "status": "finished",
                  "path": str(ar), "val_acc": 0.9, "params": json.dumps({"optim.lr": 0.04})}]
    rows.append({"phase": "final", "group": "allreduce", "method": "allreduce", "status": "failed: RunError",
                 "path": None, "val_acc": None, "params": "{}"})  # a failed re-run is left out
    rows.append({"phase": "search", "group": "allreduce", "method": "allreduce", "status": "finished",
                 "path": str(ar), "val_acc": 0.5, "params": json.dumps({"optim.lr": 0.01})})  # not a re-run
    pd.DataFrame(rows).to_parquet(folder / "tune.parquet")


def test_every_r_shares_the_same_cpus():
    base = load_config(CONFIGS / "mnist1d.yaml")
    for r in (2, 3, 8):
        cfg = config_at(base, r, cpus=2.0)
        assert cfg.replicas == r and cfg.name == f"mnist1d-r{r}"
        held = cfg.cpus_per_worker * r * cfg.workers_per_replica
        assert held <= 2.0 and held == pytest.approx(2.0, abs=1e-3)  # never more than the CPUs given
        assert cfg.batch_size == base.batch_size and cfg.steps == base.steps


def test_study_reads_finished_searches_and_tabulates_against_r(tmp_path):
    base = load_config(CONFIGS / "mnist1d.yaml", storage_path=str(tmp_path), name="study")
    for r in (2, 4):
        _finished_search(tmp_path, "study", r)
    space = load_space(ROOT / "tuning" / "spaces" / "replicas.yaml", base)
    # both searches are finished: read, not run (no Ray here)
    table, out = study(base, space, [2, 4], cpus=2.0)
    assert (out / PLOT).stat().st_size > 0 and (out / "scaling.md").read_text() == table
    rows = pd.read_parquet(out / "scaling.parquet")
    assert len(rows) == 2 * 2 * 2  # R x groups x seeds: the failed re-run and the search row left out
    t = scaling_table(rows).set_index(["group", "R"])
    cd = t.loc[("random_peer", 4)]
    assert cd["chosen"] == "alpha 2" and cd["seeds"] == 2
    assert cd["test acc"] == "90.5 ± 0.7" and cd["ensemble acc"] == "95.0 ± 0.0"
    assert cd["disagreement"] == "10.0 ± 0.0" and cd["churn"] == "10.0 ± 0.0"
    assert cd["fetch p50 / p99 (ms)"] == "2.5 / 10.0" and cd["broker peak RSS"] == "300.0 MB"
    assert cd["wall time (s)"] == "40"  # median of 40 and 41 is 40.5: rounds to even
    ar = t.loc[("allreduce", 2)]
    assert ar["chosen"] == "lr 0.04" and ar["ensemble acc"] == "–" and ar["fetch p50 / p99 (ms)"] == "–"
    assert list(scaling_table(rows)["R"]) == [2, 4, 2, 4]  # per group, R ascending
    # a language model's study: the same rows as text runs show losses, not accuracies
    lm = rows.assign(task="lm", test_loss=rows["test_acc"] * 2, ensemble_test_loss=rows["ensemble_test_acc"] * 2)
    t = scaling_table(lm).set_index(["group", "R"])
    assert t.loc[("random_peer", 4), "test loss"] == "1.810 ± 0.014" and "test acc" not in t.columns
    assert t.loc[("random_peer", 4), "ensemble loss"] == "1.900 ± 0.000"
    # a study of a large and a small model (replica_overrides): a row per architecture, never their mean
    small = rows[rows["group"] == "random_peer"].assign(model="mlp(8)", test_acc=0.5)
    t = scaling_table(pd.concat([rows.assign(model="mlp(64)"), small])).set_index(["group", "R", "model"])
    assert t.loc[("random_peer", 4, "mlp(64)"), "test acc"] == "90.5 ± 0.7"
    assert t.loc[("random_peer", 4, "mlp(8)"), "test acc"] == "50.0 ± 0.0"


def test_study_refuses_bad_arguments(tmp_path):
    base = load_config(CONFIGS / "smoke.yaml", storage_path=str(tmp_path))
    space = SearchSpace([Group("independent", "independent")], [0], [0])
    with pytest.raises(ConfigError, match="replicas"):
        study(base, space, [1, 2], cpus=2.0)
    with pytest.raises(ConfigError, match="cpus"):
        study(base, space, [2], cpus=0)


def test_a_group_with_one_configuration_skips_the_search():
    assert _only_configuration(Group("independent", "independent")) == {}
    assert _only_configuration(Group("r", "codistill", {"codistill.teacher_rule": "random_peer",
                                                        "codistill.alpha": {"grid": [2.0]}})) == \
        {"codistill.teacher_rule": "random_peer", "codistill.alpha": 2.0}
    assert _only_configuration(Group("r", "codistill", {"codistill.alpha": {"grid": [0.5, 1.0]}})) is None
    assert _only_configuration(Group("r", "codistill", {"codistill.alpha": {"loguniform": [0.1, 1.0]}})) is None
