"""The prediction broker: the teacher exchange of one experiment, and nothing else.

The broker is one Ray actor per experiment whose methods are the exchange that training waits on:
- `logits` exchange: `publish` files a worker's logits (or top-k) under the samples' global
  indices, `fetch` answers with the teacher of `codistill.teacher_rule` for coming batches, a mask
  and the age (the store, `store.py`). With `codistill.broker_shards` > 1 the store lives in shard
  actors (`StoreShard`, index modulo shards) that workers call directly;
- `weights` exchange: `put_weights` keeps the object reference of a replica's newest CPU state
  dict, `get_weights` hands out the peers' newest; `record_teacher` takes the teacher counts a
  weights-mode worker keeps itself;
- `register`: a worker (re)started at a step; after a restart from a checkpoint the replica's
  stored logits count as that old, and its steps may go back to it.

Everything else a run keeps (metric rows, probe rounds, final predictions, events, status, the
stop flag, progress, `stats()`) is the ledger's (`ledger.py`), another actor: a user's `stats`, a
Tune poll or a probe round never queues in front of a fetch. The exchange's counters reach the
ledger as reports the broker sends at most once a second without waiting (`counters.py`); no
method of the broker or a shard ever waits on another actor.

Reliability: every worker call carries the experiment's token (`guard.py`); bad input (wrong
token or replica id, shapes, dtypes, index range, non-finite values, steps going back) is counted
per reason and never stored or served. Ray restarts a killed broker (`max_restarts=-1`); the new
instance reloads its counters, steps and registrations from `<experiment>/broker/exchange.pkl`
(`journal.py`) and tells the ledger (event `broker_reloaded`); the teacher store itself starts
empty and refills within a pass of the peers over their data. A restarted shard starts empty.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import numpy as np
import ray

from ray_codistill.counters import CounterReport, Counters
from ray_codistill.guard import Guard
from ray_codistill.journal import Snapshot
from ray_codistill.priority import take_niceness
from ray_codistill.store import TeacherStore

NAMESPACE = "ray_codistill"


@dataclass(frozen=True)
class ExchangeSettings:
    """What the broker and its shards are told when they start (the driver builds it from the
    experiment's config and data)."""

    experiment: str
    num_replicas: int
    num_train: int  # training samples: the range of valid indices
    num_classes: int  # text: the vocabulary's size
    positions: int | None = None  # text: tokens per window, each with its own logits (None: one per sample)
    token: str = ""  # the experiment's secret (guard.py)
    topk: int | None = None  # codistill.topk
    max_staleness: int | None = None  # codistill.max_staleness
    teacher_rule: str = "mean_logits"  # codistill.teacher_rule
    temperature: float = 1.0  # codistill.temperature (the mean_probs rule's softmax)
    seed: int = 0  # the experiment's seed (random_peer's draws)
    niceness: int | None = 0  # codistill.broker_niceness (priority.py); None keeps Ray's
    shards: int = 1  # codistill.broker_shards
    folder: str | None = None  # the experiment folder: the broker journals its counters there
    # the name of the experiment's ledger actor, which receives the counters (None: nobody); a
    # name, not a handle: Ray warns about actors restarted with handles among their arguments
    ledger: str | None = None
    report_every_s: float = 1.0  # the most often counters go to the ledger

    @classmethod
    def from_config(cls, cfg, num_train: int, num_classes: int, token: str, folder: str | None,
                    ledger: str | None, positions: int | None = None) -> "ExchangeSettings":
        cc = cfg.codistill
        return cls(experiment=cfg.name, num_replicas=cfg.num_models, num_train=num_train, num_classes=num_classes,
                   positions=positions, token=token, topk=cc.topk, max_staleness=cc.max_staleness,
                   teacher_rule=cc.teacher_rule,
                   temperature=cc.temperature, seed=cfg.seed, niceness=cc.broker_niceness, shards=cc.broker_shards,
                   folder=folder, ledger=ledger)

    def store(self, shard: int = 0, num_shards: int = 1, num_train: int | None = None) -> TeacherStore:
        return TeacherStore(self.num_replicas, self.num_train if num_train is None else num_train, self.num_classes,
                            self.topk, self.max_staleness, shard=shard, num_shards=num_shards,
                            teacher_rule=self.teacher_rule, temperature=self.temperature, seed=self.seed,
                            positions=self.positions)


def broker_name(experiment: str) -> str:
    return f"broker:{experiment}"


def shard_name(experiment: str, shard: int) -> str:
    return f"broker:{experiment}:shard{shard}"


def _node_here() -> dict | None:
    """The Ray node this process runs on (None outside Ray, e.g. an actor class built in a test)."""
    if not ray.is_initialized():
        return None
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


class _Exchange:
    """What the broker and a shard share: a store, the token check, registrations, reports."""

    def __init__(self, settings: ExchangeSettings, source: str, store: TeacherStore) -> None:
        self.niceness = take_niceness(settings.niceness)  # before anything else: see priority.py
        self.settings = settings
        # a lookup in Ray's control store, once; the ledger was started before the exchange
        self.ledger = ray.get_actor(settings.ledger, namespace=NAMESPACE) if settings.ledger else None
        self.store = store
        self.counters = store.counters
        self.guard = Guard(settings.token, self.counters)
        self.seen: set[tuple[int, int]] = set()  # (replica, rank) of every worker that registered
        self.reports = CounterReport(source, self.ledger, self.counters, store.latest_step, settings.report_every_s)
        self.reports.extra = {"niceness": self.niceness, "node": _node_here()}

    def _after(self) -> bool:
        """After each served call: the counter report, at most once a second (True when due)."""
        self.reports.extra["unknown"] = self.guard.unknown
        return self.reports.maybe_send()

    @ray.method(max_task_retries=0)  # superseded by the next call: never retried
    def publish(self, replica: int, token: str, rank: int, step: int | np.ndarray, indices: np.ndarray,
                values: np.ndarray, classes: np.ndarray | None = None) -> None:
        """Store logits of samples (one or several batches; `step` per sample or for all), or
        with `codistill.topk` their k largest values and `classes`."""
        if not self.guard.refuse(replica, token):
            self.store.publish(replica, rank, step, indices, values, classes)
        self._after()

    @ray.method(max_task_retries=0)  # superseded by the next call: never retried
    def fetch(self, replica: int, token: str, indices: np.ndarray,
              step: int = 0) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The teacher for `indices` by the experiment's rule, a mask of samples that have one, and
        its age (`TeacherStore.fetch`; `step`: the chunk's first step); no teacher at all when the
        call is refused."""
        if self.guard.refuse(replica, token):
            answer = None, np.zeros(len(indices), dtype=bool), np.full(len(indices), -1, dtype=np.int32)
        else:
            answer = self.store.fetch(replica, indices, step)
        self._after()
        return answer

    def register(self, replica: int, token: str, rank: int, start_step: int = 0) -> None:
        """A worker (re)started at `start_step`. Rank 0 coming back to a replica is a restart
        from a checkpoint: what the replica stored from the lost steps counts as `start_step` old
        from now on, and its workers publish from `start_step` on."""
        if self.guard.refuse(replica, token):
            return
        restarted = (replica, rank) in self.seen
        self.seen.add((replica, rank))
        self.store.registered(replica, rank, start_step, restarted and rank == 0)

    def report(self) -> dict:
        """The counters now (the driver's, at the end of a run; sent on to the ledger by it)."""
        self.reports.extra["unknown"] = self.guard.unknown
        return self.reports.now()

    def memory(self) -> dict:
        """Teacher bytes held here and this process's peak resident memory."""
        return {"teacher_bytes": self.store.nbytes(),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # kB on Linux

    def ping(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        """Where this actor runs and at what niceness (the driver checks it got what it asked)."""
        return {"pid": os.getpid(), "niceness": self.niceness, "node": _node_here()}


class StoreShard(_Exchange):
    """One shard of the teacher store (`codistill.broker_shards` > 1): the samples whose index is
    `shard` modulo the shard count; workers call it directly."""

    def __init__(self, settings: ExchangeSettings, shard: int) -> None:
        super().__init__(settings, f"shard{shard}", settings.store(shard, settings.shards))


class Broker(_Exchange):
    """The exchange of one experiment: logits (here, or in its shards), weights, registrations."""

    # what survives a restart (the teacher values themselves are not kept)
    _DURABLE_STORE = ("latest_step", "floor")

    def __init__(self, settings: ExchangeSettings) -> None:
        # with shards, the logits live in them: this store holds no samples, only the counters
        # of the calls served here (weights, refusals) and every replica's newest step
        super().__init__(settings, "broker", settings.store(num_train=0 if settings.shards > 1 else None))
        # weights store: replica -> (step, [ObjectRef]); the list keeps Ray from resolving the ref
        self._weights: dict[int, tuple[int, list]] = {}
        self.snapshot = Snapshot(settings.folder, "exchange.pkl") if settings.folder else None
        if self.snapshot is not None and (state := self.snapshot.load()) is not None:
            self.store.counters[:] = [Counters.from_totals(t) for t in state["counters"]]  # in place: shared lists
            self.store.latest_step[:] = state["latest_step"]
            self.store.floor.update(state["floor"])
            self.seen = state["seen"]
            if self.ledger is not None:
                self.ledger.note.remote("broker_reloaded")

    def _state(self) -> dict:
        """What the journal keeps: a few kilobytes. Counters as totals: the windows of recent ages
        and service times went to the ledger with the reports, and would make every snapshot, on
        the thread that serves fetches, megabytes at R = 8."""
        return {"seen": self.seen, "counters": [c.totals() for c in self.counters],
                **{k: getattr(self.store, k) for k in self._DURABLE_STORE}}

    def _after(self) -> bool:
        due = super()._after()
        if due and self.snapshot is not None:  # the same once-a-second gate as the reports
            self.snapshot.save(self._state, force=True)
        return due

    def register(self, replica: int, token: str, rank: int, start_step: int = 0) -> None:
        super().register(replica, token, rank, start_step)
        if self.snapshot is not None:  # rare, and a restart must not be mistaken for a start
            self.snapshot.save(self._state, force=True)

    # -- weights exchange -----------------------------------------------------------------------
    def put_weights(self, replica: int, token: str, step: int, ref: list, nbytes: int) -> None:
        """Keep only the newest state dict of a replica (`ref` is `[ObjectRef]`); the worker
        checked that its values are finite before it published them."""
        if not self.guard.refuse(replica, token):
            c = self.counters[replica]
            if step < self.store.floor.get((replica, 0), -1):
                c.reject("step")
            else:
                self.store.floor[(replica, 0)] = step
                self._weights[replica] = (step, ref)
                self.store.latest_step[replica] = max(self.store.latest_step[replica], step)
                c.publications += 1
                c.bytes_in += nbytes
        self._after()

    @ray.method(max_task_retries=0)  # superseded by the next call: never retried
    def get_weights(self, replica: int, token: str) -> dict[int, tuple[int, int, list]]:
        """Peers' newest weights: peer -> (weights step, peer's newest step, [ObjectRef])."""
        if self.guard.refuse(replica, token):
            answer = {}
        else:
            self.counters[replica].fetches += 1
            answer = {peer: (step, int(self.store.latest_step[peer]), ref)
                      for peer, (step, ref) in self._weights.items() if peer != replica}
        self._after()
        return answer

    def record_teacher(self, replica: int, token: str, step: int, hits: int, misses: int, ages: np.ndarray,
                       bytes_out: int, peer_ages: dict | None = None) -> None:
        """Weights mode: a worker's own teacher hits, ages and loaded bytes since its last
        record, at its step `step` (its newest step, which peers' teacher ages are counted from),
        and per peer the [sum, count] of its teachers' ages."""
        if not self.guard.refuse(replica, token):
            c = self.counters[replica]
            c.hits += hits
            c.misses += misses
            c.add_ages(np.asarray(ages, dtype=np.int64))
            for peer, (total, n) in (peer_ages or {}).items():
                c.add_peer_ages(peer, total, n)
            c.bytes_out += bytes_out
            self.store.latest_step[replica] = max(self.store.latest_step[replica], step)
        self._after()


# Ray restarts a killed broker and retries the calls it lost, except publications and fetches:
# the next one supersedes them
RemoteBroker = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=-1, max_task_retries=-1)(Broker)
RemoteShard = ray.remote(num_cpus=0, max_concurrency=1, max_restarts=-1)(StoreShard)


@dataclass
class BrokerHandle:
    """The driver's handles on an experiment's exchange: the broker and its shards."""

    broker: object
    shards: list

    @property
    def actors(self) -> list:
        return [self.broker, *self.shards]

    def reports(self, timeout_s: float = 60.0) -> list[dict]:
        """Every exchange actor's counters now (for the ledger: `Ledger.exchange_report`)."""
        return ray.get([a.report.remote() for a in self.actors], timeout=timeout_s)

    def memory(self, timeout_s: float = 60.0) -> dict:
        """Teacher bytes held over the broker and its shards, and the broker's peak resident memory."""
        held = ray.get([a.memory.remote() for a in self.actors], timeout=timeout_s)
        return {"teacher_bytes": sum(m["teacher_bytes"] for m in held), "peak_rss_bytes": held[0]["peak_rss_bytes"]}

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def start_broker(settings: ExchangeSettings, *, placement: dict | None = None) -> BrokerHandle:
    """Create the named broker actor of an experiment, and its shards (the driver's side).

    It is placed on the driver's node (softly: it may move if that node dies), so on a cluster
    of several nodes the experiment folder it journals into must be on storage every node can
    reach; `placement` (actor options: `label_selector`, `resources`) puts it on a chosen node
    instead. Shards are spread over the nodes by Ray. The ledger named in the settings (started
    first) receives the exchange's counters.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    where = placement or {
        "scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)}
    shards = [RemoteShard.options(name=shard_name(settings.experiment, s), namespace=NAMESPACE,
                                  scheduling_strategy="SPREAD").remote(settings, s)
              for s in range(settings.shards)] if settings.shards > 1 else []
    broker = RemoteBroker.options(name=broker_name(settings.experiment), namespace=NAMESPACE, lifetime=None,
                                  **where).remote(settings)
    handle = BrokerHandle(broker, shards)
    ray.get([a.ping.remote() for a in handle.actors])
    return handle


def get_broker(experiment: str):
    """The broker of a running experiment, from a worker or another driver on the cluster."""
    return ray.get_actor(broker_name(experiment), namespace=NAMESPACE)
