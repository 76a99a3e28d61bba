"""A GPT codistilled on a tiny text the test writes, on a real local Ray, in both exchange modes:
teachers are served, every result file carries a language model's figures, and
`ray-codistill sample` writes text from a replica and from the ensemble."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest

from live import ENDLESS, LiveRun, cli
from test_text import text_config

WORDS = "to be or not that is the question whether tis nobler in mind suffer".split()


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """About 12,000 characters of words: at windows of 8 and batch 32 an epoch is about 40 steps,
    so windows come around again and stored logits find their teachers."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(300)))
    return path


@pytest.mark.parametrize("exchange", ["logits", "weights"])
def test_a_gpt_codistills_on_text_and_writes_every_file(ray_cluster, tiny_text, tmp_path, exchange):
    cfg = text_config(tiny_text, f"storage_path={tmp_path}", f"name=text-{exchange}", f"steps={ENDLESS}",
                      f"codistill.exchange={exchange}", "codistill.exchange_every=10", "codistill.probe_every=50",
                      "eval_every=50")
    with LiveRun(cfg) as run:
        stats = run.wait_until("teachers served to every replica and a probe round", lambda s: s["probe_rounds"] > 0
                               and all(r["hits"] > 0 and r["step"] >= 100 for r in s["replicas"].values()))
        run.stop()
        result = run.result()
    for r in stats["replicas"].values():  # what `ray-codistill stats` shows of a language model
        assert r["val_loss"] > 0 and r["probe_loss"] > 0 and r["age_p50"] is not None
    assert stats["divergence"]["ensemble_loss"] > 0
    s, folder = result.summary, result.path
    assert s["status"] == "stopped" and s["ensemble_test_loss"] > 0 and s["test_bpc_mean"] > 0
    for rep in s["replicas"]:
        assert rep["test_bpc"] == pytest.approx(rep["test_loss"] / 0.6931471805599453)
        assert 0 < rep["test_acc"] <= 1 and rep["val_ppl"] > 1
        assert s["broker"][str(rep["replica"])]["hits"] > 0
    metrics = pd.read_parquet(folder / "metrics.parquet")
    for col in ("val/loss", "val/bpc", "val/ppl", "perf/tokens_per_s", "distill/hit_rate"):
        assert metrics[col].notna().any(), col
    assert (metrics.loc[metrics["step"] > 40, "train/distill"] > 0).any()  # it distilled after burn-in
    divergence = pd.read_parquet(folder / "divergence.parquet")
    assert {"sym_kl", "disagreement", "loss_a", "loss_b", "ensemble_loss"} <= set(divergence.columns)
    assert json.loads((folder / "vocab.json").read_text())["chars"][0] == "\ufffd"

    out = cli("sample", str(folder), "--prompt", "to be", "--tokens", "40", address=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("to be") and len(out.stdout.rstrip("\n")) >= 40
    assert set(out.stdout) <= set("".join(WORDS) + " \n\ufffd")
    ensemble = cli("sample", str(folder), "--ensemble", "--tokens", "20", "--temperature", "0", address=False)
    assert ensemble.returncode == 0, ensemble.stderr
    bad = cli("sample", str(folder), "--replica", "5", address=False)
    assert bad.returncode == 1 and "--replica 5: the experiment has replica(s) [0, 1]" in bad.stderr
