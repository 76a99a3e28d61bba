"""A worker's view of its experiment's actors: one typed method per call it makes.

- `BrokerClient`: the teacher exchange (`broker.py`): fire-and-forget publications, fetches asked
  ahead and resolved later, weights. With `codistill.broker_shards` > 1, publications and fetches
  go straight to the shard actors that own the samples (index modulo shards).
- `LedgerClient`: the run's bookkeeping (`ledger.py`): registration, the start rendezvous, metric
  rows, probe logits, the stop flag, the final result.

Every call carries the replica id and the experiment token. A failed or late call never stops
training: an exchange call that does not answer in time means "no teacher this step" (counted as
a miss by the caller); a row that cannot be sent is logged and dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import ray

from ray_codistill.broker import NAMESPACE, get_broker, shard_name
from ray_codistill.ledger import get_ledger

log = logging.getLogger(__name__)


class _Caller:
    """Calls of one replica's worker to one actor: submitted without waiting, resolved later."""

    def __init__(self, handle, replica: int, token: str, rank: int, timeout_s: float) -> None:
        self.handle, self.replica, self.token, self.rank, self.timeout_s = handle, replica, token, rank, timeout_s
        self.errors = 0

    def _remote(self, method, *args: Any):
        try:
            return method.remote(self.replica, self.token, *args)
        except Exception as err:  # the actor may be gone; training goes on without it
            self.errors += 1
            log.warning("%s call failed: %s", type(self).__name__, err)
            return None

    def resolve(self, ref, timeout_s: float | None = None) -> Any | None:
        """The answer of an earlier call, or None when it is late or failed."""
        if ref is None:
            return None
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        try:
            if isinstance(ref, _ShardedAnswer):
                return ref.merge(ray.get([r for _, r in ref.parts], timeout=timeout_s))
            return ray.get(ref, timeout=timeout_s)
        except Exception as err:  # GetTimeoutError, RayActorError, a failed shard call, ...
            self.errors += 1
            log.warning("%s answer missing: %s", type(self).__name__, type(err).__name__)
            return None


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


class BrokerClient(_Caller):
    """A worker's calls to the teacher exchange (the broker, or its shards for logits)."""

    def __init__(self, experiment: str, replica: int, timeout_s: float, token: str, rank: int = 0,
                 shards: int = 1) -> None:
        super().__init__(get_broker(experiment), replica, token, rank, timeout_s)
        self.shards = [ray.get_actor(shard_name(experiment, s), namespace=NAMESPACE)
                       for s in range(shards)] if shards > 1 else []
        # seconds from asking for teachers to the answer's arrival, one entry per answered fetch,
        # taken by a callback: the worker is training meanwhile, nothing waits to measure them
        self.fetch_s: list[float] = []

    def register(self, start_step: int) -> None:
        """This worker (re)starts at `start_step` (see `Broker.register`); the shards are told too."""
        for actor in (self.handle, *self.shards):
            self._remote(actor.register, self.rank, start_step)

    def publish(self, step: int | np.ndarray, indices: np.ndarray, values: np.ndarray,
                classes: np.ndarray | None = None) -> None:
        """Our logits (or top-k values and `classes`) of `indices` at `step` (one, or per sample)."""
        extra = () if classes is None else (classes,)
        if not self.shards:
            self._remote(self.handle.publish, self.rank, step, indices, values, *extra)
            return
        step = np.broadcast_to(np.asarray(step), indices.shape)
        owner = indices % len(self.shards)
        for s, shard in enumerate(self.shards):
            sel = owner == s
            if sel.any():
                self._remote(shard.publish, self.rank, step[sel], indices[sel], values[sel], *(e[sel] for e in extra))

    def fetch_async(self, indices: np.ndarray, step: int = 0):
        """Ask for the teachers of `indices`, a chunk whose first step is `step`; `resolve` it later
        to (teacher or None, mask, age)."""
        if not self.shards:
            return self._timed([self._remote(self.handle.fetch, indices, step)])[0]
        owner = indices % len(self.shards)
        sels = [owner == s for s in range(len(self.shards))]
        parts = [(sel, self._remote(shard.fetch, indices[sel], step)) for sel, shard in zip(sels, self.shards)
                 if sel.any()]
        self._timed([r for _, r in parts])
        return _ShardedAnswer(indices.size, parts)

    def get_weights_async(self):
        """Ask for the peers' newest weights; `resolve` it later to {peer: (step, peer's step, [ref])}."""
        return self._timed([self._remote(self.handle.get_weights)])[0]

    def put_weights(self, step: int, ref: list, nbytes: int) -> None:
        """Our newest state dict (`[ObjectRef]`, `nbytes` of tensors) at `step`."""
        self._remote(self.handle.put_weights, step, ref, nbytes)

    def record_teacher(self, step: int, hits: int, misses: int, ages: np.ndarray, bytes_out: int,
                       peer_ages: dict | None = None) -> None:
        """Weights mode: our teacher hits, misses, ages and loaded bytes since the last record, and
        per peer the [sum, count] of its teachers' ages (one per step it taught)."""
        self._remote(self.handle.record_teacher, step, hits, misses, ages, bytes_out, peer_ages or {})

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


class LedgerClient(_Caller):
    """A worker's calls to the run's ledger."""

    def __init__(self, experiment: str, replica: int, timeout_s: float, token: str, rank: int = 0) -> None:
        super().__init__(get_ledger(experiment), replica, token, rank, timeout_s)

    def register_worker(self, info: dict, start_step: int) -> None:
        """This worker (pid, host, node, device in `info`) (re)starts at `start_step`."""
        self._remote(self.handle.register_worker, self.rank, info, start_step)

    def replicas_up(self) -> int | None:
        """How many replicas have a registered worker (None: no answer in time)."""
        return self.resolve(self._remote(self.handle.replicas_up))

    def log(self, rows: list[dict]) -> None:
        self._remote(self.handle.log, rows)

    def probe(self, step: int, logits: np.ndarray) -> None:
        """Our logits on the probe set at `step`."""
        self._remote(self.handle.probe, step, logits)

    def stop_requested_async(self):
        """Ask whether a user asked the run to stop; `resolve` it later to a bool."""
        return self._remote(self.handle.stop_requested)

    def finish(self, result: dict, test_probs: np.ndarray, test_labels: np.ndarray, timeout_s: float) -> bool:
        """Our final figures and test predictions; whether the ledger took them within `timeout_s`."""
        return self.resolve(self._remote(self.handle.finish, result, test_probs, test_labels), timeout_s) is True
