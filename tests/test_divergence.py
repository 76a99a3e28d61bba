"""Divergence figures against hand computations, and probe rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ray_codistill.divergence import ProbeRounds, churn, ensemble_accuracy, pair_stats


def test_identical_replicas_do_not_diverge():
    z = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    assert pair_stats(z, z) == {"sym_kl": 0.0, "disagreement": 0.0, "l2": 0.0}


def test_pair_stats_by_hand():
    a = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = (.5, .5) and (.75, .25)
    b = np.array([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])  # q = (.75, .25) and (.25, .75)
    kl = lambda p, q: sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # noqa: E731
    s1 = (kl((.5, .5), (.75, .25)) + kl((.75, .25), (.5, .5))) / 2
    s2 = (kl((.75, .25), (.25, .75)) + kl((.25, .75), (.75, .25))) / 2
    got = pair_stats(a, b)
    assert got["sym_kl"] == pytest.approx((s1 + s2) / 2)
    # sample 1: argmax 0 vs 0 (ties go to the first class); sample 2: 0 vs 1
    assert got["disagreement"] == 0.5
    assert got["l2"] == pytest.approx((math.log(3.0) + math.sqrt(2) * math.log(3.0)) / 2)
    assert pair_stats(b, a)["sym_kl"] == pytest.approx(got["sym_kl"])  # symmetric


def test_ensemble_averages_probabilities_not_logits():
    labels = np.array([0])
    # replica 1 is very sure of class 1 by logits but both are ~50/50 in probability terms...
    p1 = np.array([[0.45, 0.55]])
    p2 = np.array([[0.70, 0.30]])
    assert ensemble_accuracy([p1, p2], labels) == 1.0  # mean prob of class 0: 0.575


def test_churn_per_pair_and_mean():
    preds = [np.eye(3)[[0, 1, 2, 0]], np.eye(3)[[0, 1, 1, 0]], np.eye(3)[[1, 1, 1, 0]]]
    c = churn(preds)
    assert c["pairs"] == {"0-1": 0.25, "0-2": 0.5, "1-2": 0.25}
    assert c["mean"] == pytest.approx(1 / 3)
    assert churn(preds[:1]) == {"mean": None, "pairs": {}}


def test_rounds_complete_when_every_replica_reported():
    labels = np.array([0, 1])
    rounds = ProbeRounds(2, labels)
    right, wrong = np.array([[2.0, 0.0], [0.0, 2.0]]), np.array([[0.0, 2.0], [0.0, 2.0]])
    assert rounds.add(0, 100, right) is None
    assert rounds.add(0, 200, right) is None  # replica 0 is ahead
    done = rounds.add(1, 100, wrong)
    assert done["step"] == 100 and done["probe_acc"] == {0: 1.0, 1: 0.5}
    row, = rounds.history
    assert (row["replica_a"], row["replica_b"], row["disagreement"]) == (0, 1, 0.5)
    assert 100 not in rounds.pending and 200 in rounds.pending
    rounds.add(1, 300, wrong)
    rounds.add(0, 300, wrong)  # round 300 completes: the skipped round 200 is dropped
    assert rounds.pending == {} and [r["step"] for r in rounds.history] == [100, 300]
