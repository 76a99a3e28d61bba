"""The prediction broker: one Ray actor per experiment, and the small client workers use.

The broker owns everything replicas share without ever waiting on each other:
- `logits` exchange: per replica, the latest float16 logits of every training sample and the
  replica step they came from; `fetch` answers with the mean over peers, a mask and the age;
- `weights` exchange: per replica, the object reference of its latest CPU state dict;
- exchange counters (publications, fetches, hits, misses, teacher age, bytes in and out, and
  publications rejected by reason: shape, dtype, index range, non-finite values);
- the divergence probe rounds (`divergence.ProbeRounds`), `stats()` for live queries, and the
  same figures as Ray metrics;
- the per-step metric rows of every replica (Ray Train keeps only rows reported with a
  checkpoint, so the history is collected here) and each replica's final predictions.

It is a plain actor whose methods are cheap numpy work, so one thread serves all workers in call
order. Workers reach it by name (`get_broker`); the driver creates it (`start_broker`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
import ray

from ray_codistill.divergence import ProbeRounds

NAMESPACE = "ray_codistill"
STATS_SCHEMA = "ray_codistill.stats/1"
AGE_WINDOW = 65536  # recent teacher ages kept per replica for the percentiles

log = logging.getLogger(__name__)


def broker_name(experiment: str) -> str:
    return f"broker:{experiment}"


class _Counters:
    """Exchange counters of one replica."""

    def __init__(self) -> None:
        self.publications = 0
        self.fetches = 0
        self.hits = 0
        self.misses = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.age_max = 0
        self.rejected: dict[str, int] = {}  # reason -> count
        self._ages = np.zeros(AGE_WINDOW, dtype=np.int64)
        self._n_ages = 0

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def add_ages(self, ages: np.ndarray) -> None:
        if ages.size == 0:
            return
        ages = ages[-AGE_WINDOW:]
        pos = self._n_ages % AGE_WINDOW
        first = min(ages.size, AGE_WINDOW - pos)
        self._ages[pos:pos + first] = ages[:first]
        self._ages[:ages.size - first] = ages[first:]
        self._n_ages += ages.size
        self.age_max = max(self.age_max, int(ages.max()))

    def as_dict(self) -> dict:
        ages = self._ages[:min(self._n_ages, AGE_WINDOW)]
        p50, p95 = (np.percentile(ages, [50, 95]).tolist() if ages.size else (None, None))
        served = self.hits + self.misses
        return {
            "publications": self.publications, "fetches": self.fetches,
            "hits": self.hits, "misses": self.misses,
            "hit_rate": self.hits / served if served else None,
            "age_p50": p50, "age_p95": p95, "age_max": self.age_max if ages.size else None,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "rejected": dict(self.rejected),
        }


class BrokerMetrics:
    """The broker's figures as Ray metrics (Prometheus / the Ray dashboard), tagged by experiment."""

    def __init__(self, experiment: str) -> None:
        from ray.util.metrics import Gauge
        self.tags = {"experiment": experiment}
        g = lambda name, doc, keys: Gauge(f"ray_codistill_{name}", doc, tag_keys=("experiment", *keys))  # noqa: E731
        self.step = g("step", "newest optimizer step of a replica", ("replica",))
        self.age = g("teacher_age_p50", "median teacher age, in the teacher's steps", ("replica",))
        self.hit_rate = g("teacher_hit_rate", "share of samples served with a teacher", ("replica",))
        self.bytes = g("bytes", "bytes through the broker", ("replica", "direction"))
        self.disagreement = g("disagreement", "top-1 disagreement of two replicas on the probe set", ("pair",))
        self.sym_kl = g("symmetric_kl", "symmetric KL of two replicas on the probe set", ("pair",))
        self.probe_acc = g("probe_accuracy", "probe-set accuracy of a replica or of the ensemble", ("replica",))

    def replica(self, replica: int, step: int, c: dict) -> None:
        tags = {**self.tags, "replica": str(replica)}
        self.step.set(step, tags)
        if c["age_p50"] is not None:
            self.age.set(c["age_p50"], tags)
        if c["hit_rate"] is not None:
            self.hit_rate.set(c["hit_rate"], tags)
        self.bytes.set(c["bytes_in"], {**tags, "direction": "in"})
        self.bytes.set(c["bytes_out"], {**tags, "direction": "out"})

    def divergence(self, latest: dict) -> None:
        for p in latest["pairs"]:
            tags = {**self.tags, "pair": f"{p['replica_a']}-{p['replica_b']}"}
            self.disagreement.set(p["disagreement"], tags)
            self.sym_kl.set(p["sym_kl"], tags)
        for r, acc in latest["probe_acc"].items():
            self.probe_acc.set(acc, {**self.tags, "replica": str(r)})
        self.probe_acc.set(latest["ensemble_acc"], {**self.tags, "replica": "ensemble"})


class Broker:
    """Teacher material, exchange counters and metric rows of one experiment."""

    def __init__(self, experiment: str, num_replicas: int, num_train: int,
                 max_staleness: int | None = None, method: str = "codistill",
                 probe_labels: np.ndarray | None = None) -> None:
        self.experiment = experiment
        self.method = method
        self.num_replicas = num_replicas
        self.num_train = num_train
        self.max_staleness = max_staleness
        self.started = time.time()
        self.counters = [_Counters() for _ in range(num_replicas)]
        self.latest_step = np.full(num_replicas, -1, dtype=np.int64)  # newest step each replica published
        # logits store, allocated on the first publication (the class count comes with it)
        self._logits: list[np.ndarray | None] = [None] * num_replicas
        self._sample_step = [np.full(num_train, -1, dtype=np.int64) for _ in range(num_replicas)]
        # weights store: replica -> (step, [ObjectRef]); the list keeps Ray from resolving the ref
        self._weights: dict[int, tuple[int, list]] = {}
        self._rows: list[dict] = []
        self._progress: dict[int, dict] = {}
        self._workers: dict[int, dict[int, dict]] = {}
        self._final: dict[int, dict] = {}
        self.rounds = ProbeRounds(num_replicas, probe_labels) if probe_labels is not None else None
        self.status = "running"
        self.metrics = BrokerMetrics(experiment)

    # -- logits exchange ------------------------------------------------------------------------
    def publish(self, replica: int, step: int | np.ndarray, indices: np.ndarray, logits: np.ndarray) -> None:
        """Store logits of samples (one or several batches; `step` per sample or for all)."""
        reason = self._invalid(replica, indices, logits)
        if reason:
            self.counters[replica].reject(reason)
            return
        store = self._logits[replica]
        if store is None:
            store = self._logits[replica] = np.zeros((self.num_train, logits.shape[1]), dtype=np.float16)
        store[indices] = logits
        self._sample_step[replica][indices] = step
        self.latest_step[replica] = max(self.latest_step[replica], int(np.max(step)))
        c = self.counters[replica]
        c.publications += 1
        c.bytes_in += indices.nbytes + logits.nbytes + np.asarray(step).nbytes

    def _invalid(self, replica: int, indices: np.ndarray, logits: np.ndarray) -> str | None:
        """Why a publication must not be stored and served, or None when it is fine."""
        if logits.ndim != 2 or indices.ndim != 1 or len(indices) != len(logits):
            return "shape"
        if not np.issubdtype(indices.dtype, np.integer) or not np.issubdtype(logits.dtype, np.floating):
            return "dtype"
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_train):
            return "index_range"
        store = self._logits[replica]
        if store is not None and logits.shape[1] != store.shape[1]:
            return "shape"
        if not np.isfinite(logits).all():
            return "non_finite"
        return None

    def fetch(self, replica: int, indices: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """Mean peer logits for `indices`, a mask of samples that have a teacher, and its age.

        The logits are None when no peer has published anything yet.
        Age is counted in the teacher's own steps (its newest step minus the step the stored
        logits came from), averaged over the peers that answer for the sample; -1 where masked.
        """
        total = None
        count = np.zeros(indices.size, dtype=np.int64)
        age_sum = np.zeros(indices.size, dtype=np.int64)
        for peer in range(self.num_replicas):
            if peer == replica or self._logits[peer] is None:
                continue
            steps = self._sample_step[peer][indices]
            age = self.latest_step[peer] - steps
            valid = steps >= 0
            if self.max_staleness is not None:
                valid &= age <= self.max_staleness
            if not valid.any():
                continue
            peer_logits = self._logits[peer][indices].astype(np.float32)
            peer_logits[~valid] = 0.0
            total = peer_logits if total is None else total + peer_logits
            count += valid
            age_sum += np.where(valid, age, 0)
        mask = count > 0
        teacher = None if total is None else (total / np.maximum(count, 1)[:, None]).astype(np.float16)
        age = np.where(mask, age_sum // np.maximum(count, 1), -1).astype(np.int32)
        c = self.counters[replica]
        c.fetches += 1
        c.hits += int(mask.sum())
        c.misses += int(indices.size - mask.sum())
        c.add_ages(age[mask])
        c.bytes_in += indices.nbytes
        c.bytes_out += (teacher.nbytes if teacher is not None else 0) + mask.nbytes + age.nbytes
        return teacher, mask, age

    # -- weights exchange -----------------------------------------------------------------------
    def put_weights(self, replica: int, step: int, ref: list, nbytes: int) -> None:
        """Keep only the newest state dict of a replica (`ref` is `[ObjectRef]`)."""
        self._weights[replica] = (step, ref)
        self.latest_step[replica] = max(self.latest_step[replica], step)
        c = self.counters[replica]
        c.publications += 1
        c.bytes_in += nbytes

    def get_weights(self, replica: int) -> dict[int, tuple[int, int, list]]:
        """Peers' newest weights: peer -> (weights step, peer's newest step, [ObjectRef])."""
        self.counters[replica].fetches += 1
        return {peer: (step, int(self.latest_step[peer]), ref)
                for peer, (step, ref) in self._weights.items() if peer != replica}

    def record_teacher(self, replica: int, hits: int, misses: int, ages: np.ndarray, bytes_out: int) -> None:
        """Weights mode: workers count their own teacher hits, ages and loaded bytes."""
        c = self.counters[replica]
        c.hits += hits
        c.misses += misses
        c.add_ages(np.asarray(ages, dtype=np.int64))
        c.bytes_out += bytes_out

    # -- progress, history, results -------------------------------------------------------------
    def register_worker(self, replica: int, rank: int, info: dict) -> None:
        self._workers.setdefault(replica, {})[rank] = info

    def replicas_up(self, replica: int) -> int:
        """How many replicas have a registered worker (the start rendezvous polls this)."""
        return len(self._workers)

    def log(self, replica: int, rows: list[dict]) -> None:
        """Metric rows from rank 0 of a replica; the broker adds its byte count for the replica."""
        c = self.counters[replica]
        for row in rows:
            row["comm/bytes"] = c.bytes_in + c.bytes_out
            row["replica"] = replica
            # weights mode publishes rarely: rows keep the replica's newest step known for ages
            self.latest_step[replica] = max(self.latest_step[replica], row["step"])
        self._rows.extend(rows)
        if rows:
            self._progress[replica] = {**self._progress.get(replica, {}), **{k: v for k, v in rows[-1].items()
                                                                          if v is not None}}
            self.metrics.replica(replica, int(self.latest_step[replica]), c.as_dict())

    def probe(self, replica: int, step: int, logits: np.ndarray) -> None:
        """A replica's logits on the probe set at `step`; completes a round when it is the last."""
        if self.rounds is None:
            return
        if logits.shape != (len(self.rounds.labels), logits.shape[-1]) or not np.isfinite(logits).all():
            self.counters[replica].reject("probe")
            return
        done = self.rounds.add(replica, step, logits.astype(np.float32))
        if done is not None:
            self.metrics.divergence(done)

    def divergence(self) -> list[dict]:
        """Every completed probe round, one row per pair of replicas."""
        return self.rounds.history if self.rounds is not None else []

    def set_status(self, status: str) -> None:
        self.status = status

    def finish(self, replica: int, result: dict, test_probs: np.ndarray, test_labels: np.ndarray) -> None:
        self._final[replica] = {"result": result, "probs": test_probs, "labels": test_labels}

    def rows(self) -> list[dict]:
        return self._rows

    def final(self) -> dict[int, dict]:
        return self._final

    def progress(self) -> dict[int, dict]:
        return self._progress

    def stats(self) -> dict:
        """Everything a user watches, JSON-ready (the schema is in README.md, "Watching a run")."""
        replicas = {}
        for r in range(self.num_replicas):
            p = self._progress.get(r, {})
            replicas[str(r)] = {
                "step": int(self.latest_step[r]), "train_loss": p.get("train/loss"), "val_acc": p.get("val/acc"),
                "samples_per_s": p.get("perf/samples_per_s"), **self.counters[r].as_dict(),
                "probe_acc": (self.rounds.latest or {}).get("probe_acc", {}).get(r) if self.rounds else None,
                "workers": {str(k): v for k, v in self._workers.get(r, {}).items()},
            }
        latest = self.rounds.latest if self.rounds else None
        return {
            "schema": STATS_SCHEMA, "experiment": self.experiment, "method": self.method,
            "status": self.status, "uptime_s": time.time() - self.started, "num_replicas": self.num_replicas,
            "replicas": replicas,
            "divergence": None if latest is None else {
                "step": latest["step"], "ensemble_acc": latest["ensemble_acc"],
                "pairs": [{k: p[k] for k in ("replica_a", "replica_b", "sym_kl", "disagreement", "l2")}
                          for p in latest["pairs"]]},
            "probe_rounds": len({row["step"] for row in self.rounds.history}) if self.rounds else 0,
        }

    def ping(self) -> int:
        return os.getpid()


RemoteBroker = ray.remote(num_cpus=0, max_concurrency=1)(Broker)


def start_broker(experiment: str, num_replicas: int, num_train: int, max_staleness: int | None = None,
                 method: str = "codistill", probe_labels: np.ndarray | None = None):
    """Create the named broker actor of an experiment (the driver's side)."""
    handle = RemoteBroker.options(name=broker_name(experiment), namespace=NAMESPACE, lifetime=None).remote(
        experiment, num_replicas, num_train, max_staleness, method, probe_labels)
    ray.get(handle.ping.remote())
    return handle


def get_broker(experiment: str):
    """The broker of a running experiment, from a worker or another driver on the cluster."""
    return ray.get_actor(broker_name(experiment), namespace=NAMESPACE)


class BrokerClient:
    """A worker's view of the broker: fire-and-forget publications, overlapped fetches.

    A failed or late call never stops training: it means "no teacher this step" and is counted
    as a miss by the caller.
    """

    def __init__(self, experiment: str, replica: int, timeout_s: float) -> None:
        self.replica = replica
        self.timeout_s = timeout_s
        self.handle = get_broker(experiment)
        self.errors = 0

    def _call(self, method: str, *args: Any):
        try:
            return getattr(self.handle, method).remote(self.replica, *args)
        except Exception as err:  # the actor may be gone; training goes on without it
            self.errors += 1
            log.warning("broker %s failed: %s", method, err)
            return None

    def publish(self, step: int, indices: np.ndarray, logits: np.ndarray) -> None:
        self._call("publish", step, indices, logits)

    def fetch_async(self, indices: np.ndarray):
        return self._call("fetch", indices)

    def fetch_weights_async(self):
        return self._call("get_weights")

    def resolve(self, ref) -> Any | None:
        """The answer of an earlier async call, or None when it is late or failed."""
        if ref is None:
            return None
        try:
            return ray.get(ref, timeout=self.timeout_s)
        except Exception as err:  # GetTimeoutError, RayActorError, ...
            self.errors += 1
            log.warning("broker answer missing: %s", type(err).__name__)
            return None

    def call(self, method: str, *args: Any) -> Any | None:
        return self.resolve(self._call(method, *args))

    def send(self, method: str, *args: Any) -> None:
        self._call(method, *args)
