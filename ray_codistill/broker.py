"""The prediction broker: one Ray actor per experiment, and the small client workers use.

The broker owns everything replicas share without ever waiting on each other:
- `logits` exchange: the teacher store (`store.py`): per replica, the latest float16 logits (or
  top-k) of every training sample and the step they came from; `fetch` answers with the teacher
  of `codistill.teacher_rule` (the mean of the peers' logits or probabilities, or one drawn
  peer's logits), a mask and the age. With `broker_shards` > 1 the store lives in shard actors instead,
  which workers call directly, and the broker only merges their counters;
- `weights` exchange: per replica, the object reference of its latest CPU state dict;
- exchange counters (publications, fetches, hits, misses, teacher age, bytes in and out, and
  calls rejected by reason);
- the divergence probe rounds (`divergence.ProbeRounds`), `stats()` for live queries, and the
  same figures as Ray metrics;
- the per-step metric rows of every replica (Ray Train keeps only rows reported with a
  checkpoint, so the history is collected here), each replica's final predictions, and the
  events of the run (starts, restarts from a checkpoint, resumes).

It is a plain actor whose methods are cheap numpy work, so one thread serves all workers in call
order. Workers reach it by name (`get_broker`); the driver creates it (`start_broker`).

Reliability:
- every call from a worker carries the experiment's secret token, issued at start and given only
  to the experiment's own workers: another job on the cluster cannot inject teachers. Bad input
  (wrong token or replica id, shapes, dtypes, index range, non-finite values, steps going back)
  is counted per reason and never stored or served;
- Ray restarts a killed broker (`max_restarts=-1`) and retries the calls it lost; the new instance
  reloads its rows, counters and divergence history from `<experiment>/broker/` (`journal.py`);
- a replica restarted from its checkpoint at step S registers again: its rows after S are dropped
  (they will be logged again), so the metrics have neither gaps nor duplicated steps.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import threading
import time
from typing import Any

import numpy as np
import ray

from ray_codistill.divergence import ProbeRounds
from ray_codistill.journal import Journal
from ray_codistill.priority import take_niceness
from ray_codistill.store import Counters, Guard, StoreShard, TeacherStore

NAMESPACE = "ray_codistill"
STATS_SCHEMA = "ray_codistill.stats/1"

log = logging.getLogger(__name__)


def broker_name(experiment: str) -> str:
    return f"broker:{experiment}"


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

    def __init__(self, experiment: str, num_replicas: int, num_train: int, num_classes: int,
                 max_staleness: int | None = None, method: str = "codistill",
                 probe_labels: np.ndarray | None = None, token: str = "", folder: str | None = None,
                 topk: int | None = None, shards: list | None = None, teacher_rule: str = "mean_logits",
                 temperature: float = 1.0, seed: int = 0, niceness: int | None = 0) -> None:
        self.niceness = take_niceness(niceness)  # before anything else: see priority.py
        self.experiment = experiment
        self.method = method
        self.num_replicas = num_replicas
        self.started = time.time()
        # the logits store: here, or in shard actors that workers call directly (`shards`)
        self.shards = shards or []
        self.store = TeacherStore(num_replicas, 0 if self.shards else num_train, num_classes, topk, max_staleness,
                                  teacher_rule=teacher_rule, temperature=temperature, seed=seed)
        self.counters = self.store.counters  # the broker's own calls count here, shards' in theirs
        self.latest_step = self.store.latest_step  # newest step each replica published or logged
        self.guard = Guard(token, self.counters)
        # weights store: replica -> (step, [ObjectRef]); the list keeps Ray from resolving the ref
        self._weights: dict[int, tuple[int, list]] = {}
        self._rows: dict[tuple[int, int], dict] = {}  # (replica, step) -> row
        self._progress: dict[int, dict] = {}
        self._workers: dict[int, dict[int, dict]] = {}
        self._events: list[dict] = []
        self._final: dict[int, dict] = {}
        self._shard_counters: list[list[Counters]] = []
        self._shard_counters_at = 0.0
        self.rounds = ProbeRounds(num_replicas, probe_labels) if probe_labels is not None else None
        self.status = "running"
        self.journal = Journal(folder) if folder else None
        if self.journal is not None:
            self._reload()
        self.metrics = BrokerMetrics(experiment)

    # -- what survives a restart ------------------------------------------------------------------
    _DURABLE = ("_progress", "_workers", "_events", "rounds")
    _DURABLE_STORE = ("counters", "latest_step", "floor")  # the teacher values themselves are not kept

    def _reload(self) -> None:
        self._rows = self.journal.load_rows()
        self._final = self.journal.load_final()
        state = self.journal.load_state()
        if state is not None:
            for key in self._DURABLE:
                setattr(self, key, state[key])
            saved = state["store"]  # restored in place: self.counters, the guard's, are the same objects
            self.store.counters[:] = saved["counters"]
            self.store.latest_step[:] = saved["latest_step"]
            self.store.floor.update(saved["floor"])
            self.started = state["started"]
            self.status = state.get("status", self.status)  # a stop request survives a restart
            self._event(-1, "broker_reloaded", None)

    def _save(self, force: bool = False) -> None:
        if self.journal is not None:
            self.journal.snapshot(lambda: {"started": self.started, "status": self.status,
                                           **{k: getattr(self, k) for k in self._DURABLE},
                                           "store": {k: getattr(self.store, k) for k in self._DURABLE_STORE}},
                                  force)

    def _event(self, replica: int, event: str, step: int | None, **info) -> None:
        self._events.append({"time": time.time(), "replica": replica, "event": event, "step": step, **info})
        self._save(force=True)

    def _refuse(self, replica: int, token: str) -> str | None:
        return self.guard.refuse(replica, token)

    def _counters(self, replica: int, fresh: bool = False) -> Counters:
        """A replica's counters: the broker's own, plus its shards' (asked at most once a second
        unless `fresh`; shards that do not answer in time count as nothing new)."""
        if not self.shards:
            return self.counters[replica]
        if fresh or time.monotonic() - self._shard_counters_at > 1.0:
            try:
                self._shard_counters = ray.get([s.counters.remote() for s in self.shards], timeout=5)
            except Exception as err:  # a shard restarting: keep the last answer
                log.warning("shard counters unavailable: %s", type(err).__name__)
            self._shard_counters_at = time.monotonic()
        return Counters.merged([self.counters[replica], *(c[replica] for c in self._shard_counters)])

    # -- logits exchange (unsharded: with shards, workers call the shard actors) -----------------
    @ray.method(max_task_retries=0)  # superseded by the next call: never retried
    def publish(self, replica: int, token: str, rank: int, step: int | np.ndarray, indices: np.ndarray,
                values: np.ndarray, classes: np.ndarray | None = None) -> None:
        """Store logits of samples (one or several batches; `step` per sample or for all), or
        with `codistill.topk` their k largest values and `classes`."""
        if not self._refuse(replica, token) and self.store.publish(replica, rank, step, indices, values, classes) is None:
            self._save()

    @ray.method(max_task_retries=0)  # superseded by the next call: never retried
    def fetch(self, replica: int, token: str, indices: np.ndarray,
              step: int = 0) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The teacher for `indices` by the experiment's rule, a mask of samples that have one, and
        its age (`TeacherStore.fetch`; `step`: the chunk's first step); no teacher at all when the
        call is refused."""
        if self._refuse(replica, token):
            return None, np.zeros(len(indices), dtype=bool), np.full(len(indices), -1, dtype=np.int32)
        return self.store.fetch(replica, indices, step)

    # -- weights exchange -----------------------------------------------------------------------
    def put_weights(self, replica: int, token: str, step: int, ref: list, nbytes: int) -> None:
        """Keep only the newest state dict of a replica (`ref` is `[ObjectRef]`); the worker
        checked that its values are finite before it published them."""
        if self._refuse(replica, token):
            return
        if step < self.store.floor.get((replica, 0), -1):
            self.counters[replica].reject("step")
            return
        self.store.floor[(replica, 0)] = step
        self._weights[replica] = (step, ref)
        self.latest_step[replica] = max(self.latest_step[replica], step)
        c = self.counters[replica]
        c.publications += 1
        c.bytes_in += nbytes
        self._save()

    @ray.method(max_task_retries=0)  # superseded by the next call: never retried
    def get_weights(self, replica: int, token: str) -> dict[int, tuple[int, int, list]]:
        """Peers' newest weights: peer -> (weights step, peer's newest step, [ObjectRef])."""
        if self._refuse(replica, token):
            return {}
        self.counters[replica].fetches += 1
        return {peer: (step, int(self.latest_step[peer]), ref)
                for peer, (step, ref) in self._weights.items() if peer != replica}

    def record_teacher(self, replica: int, token: str, hits: int, misses: int, ages: np.ndarray,
                       bytes_out: int) -> None:
        """Weights mode: workers count their own teacher hits, ages and loaded bytes."""
        if self._refuse(replica, token):
            return
        c = self.counters[replica]
        c.hits += hits
        c.misses += misses
        c.add_ages(np.asarray(ages, dtype=np.int64))
        c.bytes_out += bytes_out

    # -- workers, restarts, history, results -----------------------------------------------------
    def register_worker(self, replica: int, token: str, rank: int, info: dict, start_step: int = 0) -> None:
        """A worker (re)started at `start_step`. Rank 0 coming back to a replica that was already
        up is a restart from a checkpoint: the replica's rows after `start_step` are dropped (they
        are logged again) and its stored logits count as `start_step` old from now on."""
        if self._refuse(replica, token):
            return
        restarted = rank in self._workers.get(replica, {})
        self._workers.setdefault(replica, {})[rank] = {**info, "start_step": start_step}
        self.store.registered(replica, rank, start_step, restarted and rank == 0)
        for shard in self.shards:
            shard.registered.remote(replica, rank, start_step, restarted and rank == 0)
        if rank != 0:
            return
        if restarted:
            dropped = [key for key in self._rows if key[0] == replica and key[1] > start_step]
            for key in dropped:
                del self._rows[key]
            if dropped and self.journal is not None:
                self.journal.rewrite_rows(self.rows())
        self._event(replica, "restarted" if restarted else "started", start_step, pid=info.get("pid"))

    @ray.method(max_task_retries=0)  # superseded by the next call: never retried
    def replicas_up(self, replica: int, token: str) -> int:
        """How many replicas have a registered worker (the start rendezvous polls this)."""
        return len(self._workers)

    def note(self, event: str, **info) -> None:
        """An event of the driver's (e.g. `resumed`), kept with the run's timeline."""
        self._event(-1, event, None, **info)

    def log(self, replica: int, token: str, rows: list[dict]) -> None:
        """Metric rows from rank 0 of a replica; the broker adds its byte count for the replica.
        A row of a (replica, step) that arrives twice (a retried call) replaces the first."""
        if self._refuse(replica, token):
            return
        c = self._counters(replica)
        for row in rows:
            row["comm/bytes"] = c.bytes_in + c.bytes_out
            row["replica"] = replica
            self._rows[(replica, row["step"])] = row
            # weights mode publishes rarely: rows keep the replica's newest step known for ages
            self.latest_step[replica] = max(self.latest_step[replica], row["step"])
        if rows:
            if self.journal is not None:
                self.journal.append_rows(rows)
            self._progress[replica] = {**self._progress.get(replica, {}), **{k: v for k, v in rows[-1].items()
                                                                          if v is not None}}
            self.metrics.replica(replica, int(self.latest_step[replica]), c.as_dict())
            self._save()

    def probe(self, replica: int, token: str, step: int, logits: np.ndarray) -> None:
        """A replica's logits on the probe set at `step`; completes a round when it is the last."""
        if self.rounds is None or self._refuse(replica, token):
            return
        if logits.shape != (len(self.rounds.labels), logits.shape[-1]) or not np.isfinite(logits).all():
            self.counters[replica].reject("probe")
            return
        done = self.rounds.add(replica, step, logits.astype(np.float32))
        if done is not None:  # rounds are rare (every probe_every steps) and history: saved now
            self.metrics.divergence(done)
            self._save(force=True)

    def divergence(self) -> list[dict]:
        """Every completed probe round, one row per pair of replicas."""
        return self.rounds.history if self.rounds is not None else []

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
        return not self._refuse(replica, token) and self.status == "stopping"

    def finish(self, replica: int, token: str, result: dict, test_probs: np.ndarray, test_labels: np.ndarray) -> bool:
        if self._refuse(replica, token):
            return False
        self._final[replica] = {"result": result, "probs": test_probs, "labels": test_labels}
        if self.journal is not None:
            self.journal.save_final(replica, self._final[replica])
        self._event(replica, "finished", result.get("steps"))
        return True

    def rows(self) -> list[dict]:
        return [self._rows[key] for key in sorted(self._rows)]

    def events(self) -> list[dict]:
        return self._events

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
                "samples_per_s": p.get("perf/samples_per_s"), **self._counters(r, fresh=True).as_dict(),
                "probe_acc": (self.rounds.latest or {}).get("probe_acc", {}).get(r) if self.rounds else None,
                "workers": {str(k): v for k, v in self._workers.get(r, {}).items()},
                "restarts": sum(1 for e in self._events if e["replica"] == r and e["event"] == "restarted"),
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
            "rejected_unknown_replica": self.guard.unknown,
            "broker_shards": max(1, len(self.shards)),
            "broker_niceness": self.niceness,
            "broker_node": _node_here(),
            "events": self._events,
        }

    def ping(self) -> int:
        return os.getpid()

    def shard_handles(self) -> list:
        return self.shards

    def nbytes(self) -> dict:
        """Bytes held for teachers: in the broker's own store and in each shard."""
        return {"broker": self.store.nbytes(), "shards": ray.get([s.nbytes.remote() for s in self.shards])}

    def memory(self) -> dict:
        """Teacher bytes held (broker and shards) and the broker process's peak resident memory."""
        held = self.nbytes()
        return {"teacher_bytes": held["broker"] + sum(held["shards"]),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # kB on Linux


def _node_here() -> dict | None:
    """The Ray node this process runs on (None outside Ray, e.g. a broker built in a unit test)."""
    if not ray.is_initialized():
        return None
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


# Ray restarts a killed broker and retries the calls it lost (a retried `log` replaces its rows),
# except publications and fetches: the next one supersedes them
RemoteBroker = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=-1, max_task_retries=-1)(Broker)


def new_token() -> str:
    """An experiment's secret: only workers given it can publish to, or read from, its broker."""
    return secrets.token_hex(16)


RemoteShard = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=-1)(StoreShard)


def shard_name(experiment: str, shard: int) -> str:
    return f"broker:{experiment}:shard{shard}"


def start_broker(experiment: str, num_replicas: int, num_train: int, num_classes: int,
                 max_staleness: int | None = None, method: str = "codistill",
                 probe_labels: np.ndarray | None = None, token: str = "", folder: str | None = None,
                 topk: int | None = None, shards: int = 1, placement: dict | None = None,
                 teacher_rule: str = "mean_logits", temperature: float = 1.0, seed: int = 0,
                 niceness: int | None = 0):
    """Create the named broker actor of an experiment (the driver's side).

    With `folder` (the experiment folder) it journals what it must not lose there and reloads it
    when Ray restarts it; it is placed on the driver's node (softly: it may move if that node
    dies), so on a cluster of several nodes the folder must be on storage every node can reach.
    `placement` (actor options: `label_selector`, `resources`) puts it on a chosen node instead.
    With `shards` > 1 the logits store is split by sample index over that many shard actors,
    which Ray spreads over the nodes; a restarted shard starts empty (its peers' next
    publications refill it). `teacher_rule`, `temperature` and `seed` say how a fetch makes one
    teacher of the peers' logits (`store.py`); every shard applies the same rule to its samples.
    The broker and its shards run at `niceness` when the node allows it (`priority.py`; None:
    Ray's, 15); `stats()["broker_niceness"]` says what the broker got.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    where = placement or {
        "scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)}
    shard_handles = [
        RemoteShard.options(name=shard_name(experiment, s), namespace=NAMESPACE, scheduling_strategy="SPREAD").remote(
            token, num_replicas=num_replicas, num_train=num_train, num_classes=num_classes, topk=topk,
            max_staleness=max_staleness, shard=s, num_shards=shards, teacher_rule=teacher_rule,
            temperature=temperature, seed=seed, niceness=niceness)
        for s in range(shards)] if shards > 1 else []
    handle = RemoteBroker.options(name=broker_name(experiment), namespace=NAMESPACE, lifetime=None,
                                  **where).remote(
        experiment, num_replicas, num_train, num_classes, max_staleness, method, probe_labels, token, folder,
        topk, shard_handles, teacher_rule, temperature, seed, niceness)
    ray.get([handle.ping.remote(), *(s.nbytes.remote() for s in shard_handles)])
    return handle


def stop_broker(handle) -> None:
    """Kill the broker and its shards (the end of a run)."""
    try:
        shards = ray.get(handle.shard_handles.remote(), timeout=30)
    except Exception:  # the broker is gone already; its shards die with the driver's job
        shards = []
    for actor in (handle, *shards):
        ray.kill(actor)


def get_broker(experiment: str):
    """The broker of a running experiment, from a worker or another driver on the cluster."""
    return ray.get_actor(broker_name(experiment), namespace=NAMESPACE)


class _ShardedAnswer:
    """A fetch split over shards: which samples each shard answers, and its reply."""

    def __init__(self, size: int, parts: list[tuple[np.ndarray, Any]]) -> None:
        self.size, self.parts = size, parts

    def merge(self, answers: list) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        mask = np.zeros(self.size, dtype=bool)
        age = np.full(self.size, -1, dtype=np.int32)
        teacher = None
        for (sel, _), (logits, m, a) in zip(self.parts, answers):
            if logits is not None:
                if teacher is None:
                    teacher = np.zeros((self.size, logits.shape[1]), dtype=logits.dtype)
                teacher[sel] = logits
            mask[sel], age[sel] = m, a
        return teacher, mask, age


class BrokerClient:
    """A worker's view of the broker: fire-and-forget publications, overlapped fetches.

    Every call carries the replica id and the experiment token. With `shards` > 1, publications
    and fetches go straight to the shard actors that own the samples (index modulo shards).
    A failed or late call never stops training: it means "no teacher this step" and is counted as
    a miss by the caller.
    """

    def __init__(self, experiment: str, replica: int, timeout_s: float, token: str, rank: int = 0,
                 shards: int = 1) -> None:
        self.replica, self.rank, self.token = replica, rank, token
        self.timeout_s = timeout_s
        # seconds from asking for teachers to the answer's arrival, one entry per answered fetch,
        # taken by a callback: the worker is training meanwhile, nothing waits to measure them
        self.fetch_s: list[float] = []
        self.handle = get_broker(experiment)
        self.shards = [ray.get_actor(shard_name(experiment, s), namespace=NAMESPACE)
                       for s in range(shards)] if shards > 1 else []
        self.errors = 0

    def _remote(self, method, *args: Any):
        try:
            return method.remote(self.replica, self.token, *args)
        except Exception as err:  # the actor may be gone; training goes on without it
            self.errors += 1
            log.warning("broker call failed: %s", err)
            return None

    def _call(self, method: str, *args: Any):
        return self._remote(getattr(self.handle, method), *args)

    def publish(self, step: int | np.ndarray, indices: np.ndarray, values: np.ndarray,
                classes: np.ndarray | None = None) -> None:
        extra = () if classes is None else (classes,)
        if not self.shards:
            self._call("publish", self.rank, step, indices, values, *extra)
            return
        step = np.broadcast_to(np.asarray(step), indices.shape)
        owner = indices % len(self.shards)
        for s, shard in enumerate(self.shards):
            sel = owner == s
            if sel.any():
                self._remote(shard.publish, self.rank, step[sel], indices[sel], values[sel], *(e[sel] for e in extra))

    def fetch_async(self, indices: np.ndarray, step: int = 0):
        """Ask for the teachers of `indices`, a chunk whose first step is `step`."""
        if not self.shards:
            return self._timed([self._call("fetch", indices, step)])[0]
        owner = indices % len(self.shards)
        sels = [owner == s for s in range(len(self.shards))]
        parts = [(sel, self._remote(shard.fetch, indices[sel], step)) for sel, shard in zip(sels, self.shards)
                 if sel.any()]
        self._timed([r for _, r in parts])
        return _ShardedAnswer(indices.size, parts)

    def fetch_weights_async(self):
        return self._timed([self._call("get_weights")])[0]

    def _timed(self, refs: list) -> list:
        """Record in `fetch_s` when the last of `refs` (one fetch's calls) has answered."""
        if not refs or any(r is None for r in refs):
            return refs
        asked, left, lock = time.perf_counter(), {"calls": len(refs), "failed": False}, threading.Lock()

        def done(future) -> None:  # on a Ray thread, when that call's answer has arrived
            with lock:
                left["calls"] -= 1
                left["failed"] |= future.cancelled() or future.exception() is not None
                if left["calls"] == 0 and not left["failed"]:
                    self.fetch_s.append(time.perf_counter() - asked)

        for r in refs:
            r.future().add_done_callback(done)
        return refs

    def fetch_latency(self) -> dict:
        """p50 and p99 of the answered fetches' round trips, in milliseconds, and their count."""
        ms = np.asarray(self.fetch_s) * 1e3
        p50, p99 = np.percentile(ms, [50, 99]).tolist() if ms.size else (None, None)
        return {"fetch_ms_p50": p50, "fetch_ms_p99": p99, "fetches": int(ms.size)}

    def resolve(self, ref, timeout_s: float | None = None) -> Any | None:
        """The answer of an earlier async call, or None when it is late or failed."""
        if ref is None:
            return None
        sharded = isinstance(ref, _ShardedAnswer)
        try:
            if sharded:
                return ref.merge(ray.get([r for _, r in ref.parts], timeout=self.timeout_s if timeout_s is None
                                         else timeout_s))
            return ray.get(ref, timeout=self.timeout_s if timeout_s is None else timeout_s)
        except Exception as err:  # GetTimeoutError, RayActorError, a failed shard call, ...
            self.errors += 1
            log.warning("broker answer missing: %s", type(err).__name__)
            return None

    def call_async(self, method: str, *args: Any):
        """Ask without waiting; `resolve` the answer later."""
        return self._call(method, *args)

    def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any | None:
        return self.resolve(self._call(method, *args), timeout_s)

    def send(self, method: str, *args: Any) -> None:
        self._call(method, *args)
