"""Whole experiments on a real local Ray: real TorchTrainers, a real broker, the smoke preset.

One comparison (codistill, independent, allreduce; seed 0) is run once for the module and each
test reads what it wrote, as a user would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from ray_codistill import launcher
from ray_codistill.compare import compare
from ray_codistill.config import load_config
from ray_codistill.report import load_summaries, report

from conftest import CONFIGS
from live import ENDLESS, LiveRun, cli


@pytest.fixture(scope="module")
def comparison(ray_cluster, tmp_path_factory):
    cfg = load_config(CONFIGS / "smoke.yaml", storage_path=str(tmp_path_factory.mktemp("runs")))
    table, folder, _plots = compare(cfg, seeds=[0], methods=["codistill", "independent", "allreduce"])
    return table, folder


def _read(folder, method):
    exp = folder / f"smoke-{method}-s0"
    return json.loads((exp / "summary.json").read_text()), pd.read_parquet(exp / "metrics.parquet")


def cfg_chunk() -> int:
    return load_config(CONFIGS / "smoke.yaml").codistill.exchange_batches


def _assert_learns(metrics: pd.DataFrame, replicas: int, steps: int) -> None:
    assert sorted(metrics["replica"].unique()) == list(range(replicas))
    for _, rows in metrics.groupby("replica"):
        rows = rows.sort_values("step")
        assert rows["step"].iloc[-1] == steps
        assert rows["step"].is_unique  # no duplicated steps
        assert rows["train/loss"].iloc[-1] < rows["train/loss"].iloc[0]  # the loss goes down
        assert rows["val/acc"].dropna().iloc[-1] > 0.5  # 4 classes: chance is 0.25


def test_codistill_logits_serves_teachers_and_learns(comparison):
    _, folder = comparison
    summary, metrics = _read(folder, "codistill")
    assert summary["status"] == "finished" and summary["num_models"] == 2
    _assert_learns(metrics, replicas=2, steps=200)
    assert list(metrics.columns[:5]) == ["experiment", "method", "replica", "seed", "step"]
    # Teachers were served. Which replica got how many depends on how far apart the two ran (the
    # one behind always finds the leader's logits, the leader may find none): per replica this is
    # checked in test_stats, on a run watched until both have had teachers.
    counters = summary["broker"]
    assert sum(counters[r]["hits"] for r in ("0", "1")) > 0
    for r in ("0", "1"):
        assert counters[r]["publications"] >= 200 // cfg_chunk()  # every chunk it trained
        if counters[r]["hits"]:
            assert counters[r]["age_max"] >= counters[r]["age_p50"] >= 0
    after_burn_in = metrics[metrics["step"] > 40]
    assert (after_burn_in.groupby("replica")["train/distill"].mean() > 0).any()
    assert after_burn_in["distill/teacher_age"].count() > 0
    assert summary["bytes_exchanged"] > 0 and summary["allreduce_bytes"] == 0
    assert 0 <= summary["ensemble_test_acc"] <= 1
    assert summary["config"]["method"] == "codistill" and summary["versions"]["ray"]


def test_independent_trains_replicas_without_exchange(comparison):
    _, folder = comparison
    summary, metrics = _read(folder, "independent")
    _assert_learns(metrics, replicas=2, steps=200)
    assert (metrics["train/distill"] == 0).all()
    assert summary["bytes_exchanged"] == 0
    assert all(c["publications"] == 0 for c in summary["broker"].values())


def test_allreduce_is_one_model_on_all_workers(comparison):
    _, folder = comparison
    summary, metrics = _read(folder, "allreduce")
    _assert_learns(metrics, replicas=1, steps=200)
    assert summary["num_models"] == 1 and summary["ensemble_test_acc"] is None
    # DDP reduced the gradient buckets: at least every parameter's bytes, every step
    from ray_codistill.data import load_splits
    from ray_codistill.models import build_model, count_parameters
    cfg = load_config(CONFIGS / "smoke.yaml")
    splits = load_splits(cfg.data)
    params = count_parameters(build_model(cfg.model, splits.input_shape, splits.num_classes))
    assert summary["allreduce_bytes"] >= 200 * 2 * params * 4


def test_comparison_table_and_report(comparison, tmp_path):
    table, folder = comparison
    assert table.startswith("|") and len(table.strip().splitlines()) == 5  # header, rule, 3 methods
    for method in ("codistill", "independent", "allreduce"):
        assert method in table
    assert len(pd.read_parquet(folder / "comparison.parquet")) == 3
    text, plots = report([folder], tmp_path)
    assert text.strip() == table.strip()
    assert {p.name for p in plots} >= {"val_acc.png", "train_loss.png"}


def _until_all_had_teachers(cfg, ready=lambda stats: True, look=lambda: None):
    """Run until the broker has served teachers to every replica (and `ready(stats)` holds), then
    call `look()` and stop: how soon each gets one depends on how far apart they run, so the test
    waits for it instead of hoping. Returns the result, its metrics and what `look` returned."""
    with LiveRun(cfg) as run:
        run.wait_until("teachers served to every replica", lambda s: ready(s) and all(
            r["hits"] > 0 and r["step"] >= 200 for r in s["replicas"].values()))
        looked = look()
        run.stop()
        result = run.result()
    metrics = pd.read_parquet(result.path / "metrics.parquet")
    assert result.summary["status"] == "stopped"
    for rep in result.summary["replicas"]:
        rows = metrics[metrics["replica"] == rep["replica"]].sort_values("step")
        assert rows["step"].iloc[-1] == rep["steps"] and rows["step"].is_unique
        assert rows["train/loss"].iloc[-1] < rows["train/loss"].iloc[0]  # the loss goes down
        assert (rows.loc[rows["step"] > 40, "train/distill"] > 0).any()  # it distilled after burn-in
    return result, metrics, looked


def test_codistill_weights_exchange(ray_cluster, smoke_config):
    every = 10
    cfg = smoke_config.replace(**{"steps": ENDLESS, "codistill.exchange": "weights", "codistill.exchange_every": every,
                                  "checkpoint_every": 100})
    result, metrics, _ = _until_all_had_teachers(cfg)
    for r, counters in result.summary["broker"].items():
        steps = result.summary["replicas"][int(r)]["steps"]
        assert counters["publications"] == steps // every  # every 10 steps
        assert counters["hits"] > 0 and counters["bytes_out"] > 0
        assert counters["age_max"] >= counters["age_p50"] >= 0
    # checkpoints went through Ray Train into the experiment folder
    assert list((result.path / "train" / "smoke-r0").glob("checkpoint_*/state.pt"))


def test_codistill_topk_logits_through_sharded_broker(ray_cluster, smoke_config):
    """The worker path of issue #7's options: top-2 of 4 classes, the store over 2 shard actors."""
    cfg = smoke_config.replace(**{"steps": ENDLESS, "codistill.topk": 2, "codistill.broker_shards": 2,
                                  "name": "smoke-topk"})
    result, _, _ = _until_all_had_teachers(cfg)
    for counters in result.summary["broker"].values():
        assert counters["hits"] > 0 and counters["rejected"] == {}
        # 2 shards: one call to each per chunk
        assert counters["publications"] >= 2 * 200 // cfg_chunk()
    _assert_fetches_timed(result.summary)


def _assert_fetches_timed(summary: dict) -> None:
    """Every replica timed its fetches' round trips, the broker (or its shards) the time it took
    to answer them; the broker reported its memory and ran at the niceness it was given (as root;
    otherwise it keeps Ray's and warns, see test_broker.py)."""
    for rep in summary["replicas"]:
        assert rep["fetches"] > 0 and rep["fetch_ms_p99"] >= rep["fetch_ms_p50"] > 0
        broker = summary["broker"][str(rep["replica"])]
        assert broker["serve_ms_p99"] >= broker["serve_ms_p50"] > 0
    assert summary["broker_memory"]["teacher_bytes"] > 0
    assert summary["broker_memory"]["peak_rss_bytes"] > summary["broker_memory"]["teacher_bytes"]
    if os.geteuid() == 0:
        assert summary["broker_niceness"] == summary["config"]["codistill"]["broker_niceness"] == 0


def test_three_replicas_with_the_mean_probs_teacher(ray_cluster, smoke_config):
    """R = 3, each replica distilling from the mean of its two peers' softened probabilities:
    every replica gets teachers, and `ray-codistill stats` and divergence.parquet hold all three
    pairs."""
    cfg = smoke_config.replace(**{"steps": ENDLESS, "replicas": 3, "codistill.teacher_rule": "mean_probs",
                                  "codistill.temperature": 2.0, "name": "smoke-r3"})
    result, metrics, shown = _until_all_had_teachers(cfg, ready=lambda s: s["probe_rounds"] >= 1,
                                                     look=lambda: cli("stats", cfg.name))
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert all(f"replicas {a}-{b}:" in shown.stdout for a, b in pairs)
    assert sorted(int(line.split()[0]) for line in shown.stdout.splitlines()[2:5]) == [0, 1, 2]
    summary = result.summary
    assert summary["num_models"] == 3 and summary["config"]["codistill"]["teacher_rule"] == "mean_probs"
    assert all(summary["broker"][r]["hits"] > 0 for r in ("0", "1", "2"))
    assert [(p["replica_a"], p["replica_b"]) for p in summary["final_divergence"]["pairs"]] == pairs
    assert sorted(summary["prediction_churn"]["pairs"]) == ["0-1", "0-2", "1-2"]
    div = pd.read_parquet(result.path / "divergence.parquet")
    assert len(div) >= 3
    for _, rows in div.groupby("step"):  # every round: all three pairs
        assert list(zip(rows["replica_a"], rows["replica_b"])) == pairs
    assert metrics["replica"].nunique() == 3
    _assert_fetches_timed(summary)
    row = load_summaries([result.path]).iloc[0]  # what the R study tabulates
    assert row["fetch_ms_p99"] >= row["fetch_ms_p50"] > 0 and 0 <= row["disagreement"] <= 1
    assert row["serve_ms_p99"] >= row["serve_ms_p50"] > 0
    assert row["broker_teacher_bytes"] == summary["broker_memory"]["teacher_bytes"]
    assert row["broker_niceness"] == summary["broker_niceness"]


def test_codistillation_pulls_replicas_together(comparison):
    """The effect the method exists for: with the same seeds (same inits and data orders), the
    codistilled replicas end closer to each other than independently trained ones."""
    _, folder = comparison
    (cd, _), (ind, _) = _read(folder, "codistill"), _read(folder, "independent")
    cd_div, ind_div = cd["final_divergence"]["pairs"][0], ind["final_divergence"]["pairs"][0]
    assert cd["final_divergence"]["step"] == ind["final_divergence"]["step"] == 200
    # on 160 probe samples top-1 disagreement differs by a sample or two (see the MNIST-1D test
    # below); the continuous measures show the pull clearly
    assert cd_div["sym_kl"] < ind_div["sym_kl"]
    assert cd_div["l2"] < ind_div["l2"]
    div = pd.read_parquet(folder / "smoke-independent-s0" / "divergence.parquet")
    assert len(div) == 2 and (div["method"] == "independent").all()  # rounds at steps 100 and 200


@pytest.mark.slow
def test_codistillation_pulls_mnist1d_replicas_together(ray_cluster, tmp_path):
    """The pull at the scale of the study: MNIST-1D, 3,000 steps, 400 probe samples. The
    continuous measures separate widely in every run seen (symmetric KL 0.18-0.45 against
    0.88-1.27, L2 10-21 against 37-52, over 9 runs of seeds 0-4, loaded and idle), so they are
    asserted with a margin. Top-1 disagreement is not asserted here: its gap (about 2 points, 10.0
    +- 1.0 % against 12.2 +- 0.6 % over 3 seeds of the full run in docs/results-mnist1d.md) is
    within the spread of one run (codistill ranged 0.05-0.12 over runs of one seed, since the
    teachers' staleness follows the machine's timing), so a one-seed test of it fails now and then;
    it was seen failing in CI, 0.120 against 0.115. It is a multi-seed result, reported by
    `make compare`."""
    cfg = load_config(CONFIGS / "mnist1d.yaml", ["steps=3000", "eval_every=1000", "codistill.probe_every=500",
                                                 "codistill.alpha=1.0",
                                                 "cpus_per_worker=0.5"], storage_path=str(tmp_path))
    final = {}
    for method in ("codistill", "independent"):
        summary = launcher.run(cfg.replace(method=method, name=f"div-{method}")).summary
        final[method] = summary["final_divergence"]["pairs"][0]
    print("final probe divergence:", final)
    assert final["codistill"]["sym_kl"] < 0.7 * final["independent"]["sym_kl"]
    assert final["codistill"]["l2"] < 0.8 * final["independent"]["l2"]


def test_a_time_budget_ends_every_replica_as_its_last_step_would(ray_cluster, smoke_config):
    """`time_budget_s`: each replica stops at the first step past the budget and ends as at `steps`
    (a last metric row with validation, final evaluation, checkpoint, report); the run counts as
    finished, not stopped."""
    cfg = smoke_config.replace(steps=ENDLESS, time_budget_s=2.0, name="smoke-budget")
    summary = launcher.run(cfg).summary
    assert summary["status"] == "finished" and summary["budget_reached"]
    assert summary["replica_status"] == {"0": "finished", "1": "finished"}
    for rep in summary["replicas"]:
        assert rep["budget_reached"] and "stopped" not in rep
        assert 0 < rep["steps"] < ENDLESS and rep["test_acc"] > 0
    metrics = pd.read_parquet(Path(cfg.storage_path) / cfg.name / "metrics.parquet")
    last = metrics.sort_values("step").groupby("replica").last()
    assert last["step"].to_dict() == {r["replica"]: r["steps"] for r in summary["replicas"]}
    assert last["val/acc"].notna().all()  # the last row is evaluated, as the step-`steps` row is
    assert (last["time_s"] >= cfg.time_budget_s).all()  # none stopped before its budget was spent
    assert metrics.groupby("replica")["step"].apply(lambda s: s.is_unique).all()


def test_a_time_budget_stops_every_ddp_rank_at_the_same_step(ray_cluster, smoke_config):
    """With 2 DDP ranks, rank 0's clock decides and the group agrees a step later (a rank left
    behind would hang DDP): the run ends, both ranks' final checkpoint is the budget step's."""
    cfg = smoke_config.replace(method="allreduce", steps=ENDLESS, time_budget_s=2.0, name="smoke-budget-ddp")
    result = launcher.run(cfg)
    rep, = result.summary["replicas"]
    assert result.summary["status"] == "finished" and rep["budget_reached"] and 0 < rep["steps"] < ENDLESS
    assert pd.read_parquet(result.path / "metrics.parquet")["step"].max() == rep["steps"]


def test_allreduce_stops_on_request_with_every_rank_at_the_same_step(ray_cluster, smoke_config):
    """`ray-codistill stop` on a worker group of 2 DDP ranks: rank 0 reads the request and the
    group agrees on it, so both ranks leave at the same step (a rank left behind would hang DDP)."""
    cfg = smoke_config.replace(method="allreduce", steps=ENDLESS, checkpoint_every=500, name="smoke-stop")
    with LiveRun(cfg) as run:
        run.wait_until("a checkpoint's worth of steps", lambda s: s["replicas"]["0"]["step"] >= 500)
        run.stop()
        result = run.result()
    summary = result.summary
    rep, = summary["replicas"]
    assert summary["status"] == "stopped" and rep["stopped"] and rep["steps"] % cfg.log_every == 0
    metrics = pd.read_parquet(result.path / "metrics.parquet")
    assert metrics["step"].max() == rep["steps"] and metrics["step"].is_unique
    # the final checkpoint is the stop step's, reported by both ranks
    assert list((result.path / "train" / "smoke-stop-allreduce").glob("checkpoint_*/state.pt"))
    assert summary["allreduce_bytes"] > 0
