"""How far replicas have drifted apart: pure functions on probe logits, and the probe rounds.

Every `codistill.probe_every` steps each replica evaluates the same fixed probe set (the first
`codistill.probe_size` samples of the validation split) and sends its logits to the broker. A
round is complete when every replica has sent the logits of that step; the broker then keeps, per
pair of replicas, the symmetric KL, top-1 disagreement and logit L2 distance, and per replica and
for the ensemble (mean softmax) the probe accuracy and loss. A language model's probe logits are
[P, T, V] (P windows of T tokens): every figure is then a mean over the P x T tokens.
"""

from __future__ import annotations

import itertools

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def pair_stats(a: np.ndarray, b: np.ndarray) -> dict:
    """Divergence of two replicas' logits on the same samples (means over samples).

    sym_kl is (KL(p_a || p_b) + KL(p_b || p_a)) / 2; disagreement the share of samples whose
    top-1 classes differ; l2 the Euclidean distance of the logit vectors.
    """
    la, lb = log_softmax(a), log_softmax(b)
    pa, pb = np.exp(la), np.exp(lb)
    kl_ab = (pa * (la - lb)).sum(-1)
    kl_ba = (pb * (lb - la)).sum(-1)
    return {
        "sym_kl": float(np.mean((kl_ab + kl_ba) / 2)),
        "disagreement": float(np.mean(a.argmax(-1) != b.argmax(-1))),
        "l2": float(np.mean(np.linalg.norm(a.astype(np.float64) - b.astype(np.float64), axis=-1))),
    }


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(-1) == labels))


def nll(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels (nats per sample, or per token)."""
    picked = np.take_along_axis(log_probs, labels[..., None].astype(np.int64), axis=-1)
    return float(-np.mean(picked))


def ensemble_log_probs(log_probs: list[np.ndarray]) -> np.ndarray:
    """log of the mean of the replicas' probabilities (the ensemble's prediction)."""
    return np.log(np.mean([np.exp(lp) for lp in log_probs], axis=0).clip(min=1e-300))


def ensemble_accuracy(probs: list[np.ndarray], labels: np.ndarray) -> float:
    """Accuracy of the mean of the replicas' softmax outputs (not of their logits)."""
    return float(np.mean(np.mean(probs, axis=0).argmax(-1) == labels))


def ensemble_loss(probs: list[np.ndarray], labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels under the mean of the replicas' probabilities
    (float16 for a language model's tokens: a probability below float16's smallest, 6e-8, counts
    as that)."""
    mean = np.mean([p.astype(np.float32) for p in probs], axis=0)
    picked = np.take_along_axis(mean, labels[..., None].astype(np.int64), axis=-1)
    return float(-np.mean(np.log(np.clip(picked, 6e-8, None))))


def churn(predictions: list[np.ndarray]) -> dict:
    """Prediction churn (Anil et al. 2018): per pair, the share of samples two replicas label
    differently; `mean` over pairs. `predictions` are class scores or probabilities per replica."""
    pairs = {f"{i}-{j}": float(np.mean(predictions[i].argmax(-1) != predictions[j].argmax(-1)))
             for i, j in itertools.combinations(range(len(predictions)), 2)}
    return {"mean": float(np.mean(list(pairs.values()))) if pairs else None, "pairs": pairs}


class ProbeRounds:
    """Collects each replica's probe logits per step; a complete round becomes history rows."""

    def __init__(self, num_replicas: int, labels: np.ndarray) -> None:
        self.num_replicas = num_replicas
        self.labels = labels
        self.pending: dict[int, dict[int, np.ndarray]] = {}
        self.history: list[dict] = []  # one row per completed round and pair of replicas
        self.latest: dict | None = None  # the newest completed round, for live queries

    def add(self, replica: int, step: int, logits: np.ndarray) -> dict | None:
        """Store one replica's probe logits; returns the round when this completes it."""
        self.pending.setdefault(step, {})[replica] = logits
        if len(self.pending[step]) < self.num_replicas:
            return None
        got = self.pending.pop(step)
        for old in [s for s in self.pending if s < step]:  # a restarted replica may skip rounds
            del self.pending[old]
        log_p = {r: log_softmax(got[r]) for r in sorted(got)}
        acc = {r: accuracy(z, self.labels) for r, z in got.items()}
        loss = {r: nll(lp, self.labels) for r, lp in log_p.items()}
        ens = ensemble_log_probs(list(log_p.values()))
        ensemble, ensemble_loss = accuracy(ens, self.labels), nll(ens, self.labels)
        pairs = []
        for i, j in itertools.combinations(sorted(got), 2):
            pairs.append({"step": step, "replica_a": i, "replica_b": j, **pair_stats(got[i], got[j]),
                          "acc_a": acc[i], "acc_b": acc[j], "ensemble_acc": ensemble,
                          "loss_a": loss[i], "loss_b": loss[j], "ensemble_loss": ensemble_loss})
        self.history.extend(pairs)
        self.latest = {"step": step, "pairs": pairs, "probe_acc": acc, "ensemble_acc": ensemble,
                       "probe_loss": loss, "ensemble_loss": ensemble_loss}
        return self.latest
