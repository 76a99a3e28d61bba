"""The ledger: one Ray actor per experiment that keeps the run's bookkeeping, apart from the exchange.

It owns what a run records and what users, the driver and Tune ask about it:
- the per-step metric rows of every replica (Ray Train keeps only rows reported with a
  checkpoint, so the history is collected here), each replica's final figures and test
  predictions, and the events of the run (starts, restarts from a checkpoint, resumes, actor
  restarts, stop requests);
- the divergence probe rounds (`divergence.ProbeRounds`);
- the run's status and the stop flag (`ray-codistill stop`), the start rendezvous of the workers;
- the exchange's counters, as the broker and its shards report them (`counters.py`), merged per
  replica;
- `stats()` for live queries (`ray-codistill stats`), `progress()` for the driver's console and
  Tune's polls, and the same figures as Ray metrics.

Why an actor of its own, and not the broker: the broker serves one call at a time, and every
call that is not a publication or a fetch delays the fetches training waits on. Here a user's
`stats`, a Tune poll pulling every row, a probe round or a replica's final predictions queue
only in front of each other. Why an actor and not Ray Train's reporting or files: metric rows
of several worker groups (separate `TorchTrainer`s) meet in one place while they train, live
`stats` answer from any process on the cluster, and the ledger journals what it must not lose
(`journal.py`), so Ray's restart of a killed ledger and `run --resume` keep the history.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray

from ray_codistill.broker import NAMESPACE
from ray_codistill.counters import Counters
from ray_codistill.divergence import ProbeRounds
from ray_codistill.guard import Guard
from ray_codistill.journal import Journal

STATS_SCHEMA = "ray_codistill.stats/1"


def ledger_name(experiment: str) -> str:
    return f"ledger:{experiment}"


class RunMetrics:
    """The run's figures as Ray metrics (Prometheus / the Ray dashboard), tagged by experiment."""

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
        self.probe_loss = g("probe_loss", "probe-set loss (nats per sample, or per token) of a replica or of the "
                            "ensemble", ("replica",))

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
            self.probe_loss.set(latest["probe_loss"][r], {**self.tags, "replica": str(r)})
        self.probe_acc.set(latest["ensemble_acc"], {**self.tags, "replica": "ensemble"})
        self.probe_loss.set(latest["ensemble_loss"], {**self.tags, "replica": "ensemble"})


class Ledger:
    """Rows, probes, finals, events, status and the exchange's counters of one experiment."""

    # what survives a restart, as it is; the counters are kept as totals (below)
    _DURABLE = ("started", "status", "_progress", "_workers", "_events", "rounds", "_step")
    GAUGE_EVERY_S = 1.0  # the most often a replica's Ray metrics are set

    def __init__(self, *, experiment: str, num_replicas: int, method: str = "codistill", token: str = "",
                 probe_labels: np.ndarray | None = None, folder: str | None = None, broker_shards: int = 1) -> None:
        self.experiment, self.method, self.num_replicas = experiment, method, num_replicas
        self.broker_shards = broker_shards
        self.started = time.time()
        self.status = "running"
        # refusals of calls made here (a wrong token, bad probe logits); the exchange counts its own
        self.own = [Counters() for _ in range(num_replicas)]
        # per exchange actor ("broker", "shard1", ...): its newest report, and its counters
        self._sources: dict[str, dict] = {}
        self._step = np.full(num_replicas, -1, dtype=np.int64)  # newest step of each replica's rows
        self._rows: dict[tuple[int, int], dict] = {}  # (replica, step) -> row
        self._progress: dict[int, dict] = {}
        self._workers: dict[int, dict[int, dict]] = {}
        self._events: list[dict] = []
        self._final: dict[int, dict] = {}
        self._gauged: dict[int, float] = {}  # replica -> when its Ray metrics were last set
        self.rounds = ProbeRounds(num_replicas, probe_labels) if probe_labels is not None else None
        self.journal = Journal(folder) if folder else None
        if self.journal is not None:
            self._reload()
        self.guard = Guard(token, self.own)  # after the reload: it counts into the reloaded counters
        self.metrics = RunMetrics(experiment)

    # -- what survives a restart ------------------------------------------------------------------
    def _reload(self) -> None:
        self._rows = self.journal.load_rows()
        self._final = self.journal.load_final()
        state = self.journal.state.load()
        if state is not None:
            for key in self._DURABLE:
                setattr(self, key, state[key])
            self.own = [Counters.from_totals(t) for t in state["own"]]
            self._sources = {name: {**src, "counters": [Counters.from_totals(t) for t in src["counters"]]}
                             for name, src in state["sources"].items()}
            self._event(-1, "ledger_reloaded", None)

    def _state(self) -> dict:
        """What the journal keeps: the counters as totals only. Their windows of recent ages and
        service times (half a megabyte per replica and source) would make every snapshot megabytes;
        after a restart they refill from the next reports."""
        return {**{k: getattr(self, k) for k in self._DURABLE}, "own": [c.totals() for c in self.own],
                "sources": {name: {**src, "counters": [c.totals() for c in src["counters"]]}
                            for name, src in self._sources.items()}}

    def _save(self, force: bool = False) -> None:
        if self.journal is not None:
            self.journal.state.save(self._state, force)

    def _event(self, replica: int, event: str, step: int | None, **info) -> None:
        self._events.append({"time": time.time(), "replica": replica, "event": event, "step": step, **info})
        self._save(force=True)

    # -- the exchange's counters --------------------------------------------------------------------
    def exchange_report(self, *reports: dict) -> None:
        """Counters from the broker or a shard (`counters.CounterReport`): the totals of the newest
        report of each actor's life, and every report's new ages and service times."""
        for report in reports:
            src = self._sources.get(report["source"])
            if src is None or src["instance"] != report["instance"]:  # first report, or a restarted actor
                kept = src["counters"] if src else [Counters() for _ in range(self.num_replicas)]
                src = self._sources[report["source"]] = {"instance": report["instance"], "seq": 0, "counters": kept}
            newer = report["seq"] > src["seq"]
            for mirror, part in zip(src["counters"], report["counters"]):
                mirror.absorb(part, totals=newer)
            if newer:
                src.update({k: v for k, v in report.items() if k not in ("counters", "source", "instance")})
        self._save()

    def _counters(self, replica: int) -> Counters:
        return Counters.merged([self.own[replica], *(s["counters"][replica] for s in self._sources.values())])

    def _latest_step(self, replica: int) -> int:
        """The newest step a replica published, registered weights at, or logged."""
        return int(max([self._step[replica], *(s["latest_step"][replica] for s in self._sources.values()
                                                 if "latest_step" in s)]))

    # -- workers, restarts, history, results -----------------------------------------------------
    def register_worker(self, replica: int, token: str, rank: int, info: dict, start_step: int = 0) -> None:
        """A worker (re)started at `start_step`. Rank 0 coming back to a replica that was already
        up is a restart from a checkpoint: the replica's rows after `start_step` are dropped (they
        are logged again)."""
        if self.guard.refuse(replica, token):
            return
        restarted = rank in self._workers.get(replica, {})
        self._workers.setdefault(replica, {})[rank] = {**info, "start_step": start_step}
        if rank != 0:
            return
        if restarted:
            dropped = [key for key in self._rows if key[0] == replica and key[1] > start_step]
            for key in dropped:
                del self._rows[key]
            if dropped and self.journal is not None:
                self.journal.rewrite_rows(self.rows())
            self._step[replica] = start_step
        self._event(replica, "restarted" if restarted else "started", start_step, pid=info.get("pid"))

    def replicas_up(self, replica: int, token: str) -> int:
        """How many replicas have a registered worker (the start rendezvous polls this)."""
        return len(self._workers)

    def note(self, event: str, **info) -> None:
        """An event of the driver's (e.g. `resumed`) or the broker's (`broker_reloaded`)."""
        self._event(-1, event, None, **info)

    def log(self, replica: int, token: str, rows: list[dict]) -> None:
        """Metric rows from rank 0 of a replica; each gets the replica's bytes through the exchange
        as last reported (at most a second old). A row of a (replica, step) that arrives twice (a
        retried call) replaces the first."""
        if self.guard.refuse(replica, token) or not rows:
            return
        sent = sum(c.bytes_in + c.bytes_out for c in [self.own[replica], *(
            s["counters"][replica] for s in self._sources.values())])
        for row in rows:
            row["comm/bytes"] = sent
            row["replica"] = replica
            self._rows[(replica, row["step"])] = row
            self._step[replica] = max(self._step[replica], row["step"])
        if self.journal is not None:
            self.journal.append_rows(rows)
        self._progress[replica] = {**self._progress.get(replica, {}),
                                   **{k: v for k, v in rows[-1].items() if v is not None}}
        now = time.monotonic()
        if now - self._gauged.get(replica, float("-inf")) >= self.GAUGE_EVERY_S:  # percentiles of the windows
            self._gauged[replica] = now
            self.metrics.replica(replica, self._latest_step(replica), self._counters(replica).as_dict())
        self._save()

    def probe(self, replica: int, token: str, step: int, logits: np.ndarray) -> None:
        """A replica's logits on the probe set at `step`; completes a round when it is the last."""
        if self.rounds is None or self.guard.refuse(replica, token):
            return
        if logits.shape[:-1] != self.rounds.labels.shape or not np.isfinite(logits).all():
            self.own[replica].reject("probe")
            return
        done = self.rounds.add(replica, step, logits.astype(np.float32))
        if done is not None:  # rounds are rare (every probe_every steps) and history: saved now
            self.metrics.divergence(done)
            self._save(force=True)

    def finish(self, replica: int, token: str, result: dict, test_probs: np.ndarray, test_labels: np.ndarray) -> bool:
        if self.guard.refuse(replica, token):
            return False
        self._final[replica] = {"result": result, "probs": test_probs, "labels": test_labels}
        if self.journal is not None:
            self.journal.save_final(replica, self._final[replica])
        self._event(replica, "finished", result.get("steps"))
        return True

    # -- status and the stop flag -----------------------------------------------------------------
    def set_status(self, status: str) -> None:
        self.status = status
        self._save(force=True)

    def request_stop(self) -> str:
        """A user's request to end the experiment early (`ray-codistill stop`): every replica
        stops at its next metric row, evaluates, checkpoints and reports as at a normal end.
        Open to any client of the cluster, like `stats` (and like Ray's own job stop)."""
        if self.status == "running":
            self.status = "stopping"
            self._event(-1, "stop_requested", None)
        return self.status

    def stop_requested(self, replica: int, token: str) -> bool:
        return not self.guard.refuse(replica, token) and self.status == "stopping"

    # -- what the driver, Tune and users read -----------------------------------------------------
    def rows(self) -> list[dict]:
        return [self._rows[key] for key in sorted(self._rows)]

    def events(self) -> list[dict]:
        return self._events

    def final(self) -> dict[int, dict]:
        return self._final

    def progress(self) -> dict[int, dict]:
        return self._progress

    def divergence(self) -> list[dict]:
        """Every completed probe round, one row per pair of replicas."""
        return self.rounds.history if self.rounds is not None else []

    def stats(self) -> dict:
        """Everything a user watches, JSON-ready (the schema: docs/watching.md)."""
        latest = self.rounds.latest if self.rounds else None
        replicas = {}
        for r in range(self.num_replicas):
            p = self._progress.get(r, {})
            first = self._workers.get(r, {}).get(0, {})
            replicas[str(r)] = {
                "model": first.get("model"), "params": first.get("params"),  # what the replica is
                "step": self._latest_step(r), "train_loss": p.get("train/loss"), "val_acc": p.get("val/acc"),
                "val_loss": p.get("val/loss"),
                "samples_per_s": p.get("perf/samples_per_s"), **self._counters(r).as_dict(),
                "probe_acc": (latest or {}).get("probe_acc", {}).get(r),
                "probe_loss": (latest or {}).get("probe_loss", {}).get(r),
                "workers": {str(k): v for k, v in self._workers.get(r, {}).items()},
                "restarts": sum(1 for e in self._events if e["replica"] == r and e["event"] == "restarted"),
            }
        broker = self._sources.get("broker", {})
        return {
            "schema": STATS_SCHEMA, "experiment": self.experiment, "method": self.method,
            "status": self.status, "uptime_s": time.time() - self.started, "num_replicas": self.num_replicas,
            "replicas": replicas,
            "divergence": None if latest is None else {
                "step": latest["step"], "ensemble_acc": latest["ensemble_acc"],
                "ensemble_loss": latest.get("ensemble_loss"),
                "pairs": [{k: p[k] for k in ("replica_a", "replica_b", "sym_kl", "disagreement", "l2")}
                          for p in latest["pairs"]]},
            "probe_rounds": len({row["step"] for row in self.rounds.history}) if self.rounds else 0,
            "rejected_unknown_replica": self.guard.unknown + sum(s.get("unknown", 0) for s in self._sources.values()),
            "broker_shards": self.broker_shards,
            "broker_niceness": broker.get("niceness"),
            "broker_node": broker.get("node"),
            "events": self._events,
        }

    def ping(self) -> int:
        return os.getpid()


# Ray restarts a killed ledger and retries the calls it lost (a retried `log` replaces its rows)
RemoteLedger = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=-1, max_task_retries=-1)(Ledger)


def start_ledger(*, experiment: str, num_replicas: int, method: str = "codistill", token: str = "",
                 probe_labels: np.ndarray | None = None, folder: str | None = None, broker_shards: int = 1):
    """Create the named ledger actor of an experiment on the driver's node (softly: it may move if
    that node dies; the experiment folder it journals into must then be on shared storage). It
    runs at Ray's niceness: nothing training waits on queues here."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    handle = RemoteLedger.options(name=ledger_name(experiment), namespace=NAMESPACE, lifetime=None,
                                  scheduling_strategy=here).remote(
        experiment=experiment, num_replicas=num_replicas, method=method, token=token, probe_labels=probe_labels,
        folder=folder, broker_shards=broker_shards)
    ray.get(handle.ping.remote())
    return handle


def get_ledger(experiment: str):
    """The ledger of a running experiment, from a worker or another driver on the cluster."""
    return ray.get_actor(ledger_name(experiment), namespace=NAMESPACE)
