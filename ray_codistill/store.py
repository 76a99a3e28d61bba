"""The teacher store: per replica, the newest logits of every training sample and their step.

A sample's logits are [C] for a classifier, and [T, V] for a language model's window (`positions`
= T: a row of logits per token, filed under the window's index and served whole).

One store holds one shard of the training set: the samples whose index is `shard` modulo
`num_shards` (all of them when there is one shard; the broker then holds the store itself, and
with `codistill.broker_shards` > 1 each shard is its own actor, see `broker.start_broker`).
Modulo sharding spreads every batch over all shards, so each shard sees every replica's newest
step and the load is even.

With `topk` it keeps only the k largest logits of each sample (float16) and their classes, and
serves them as dense logits whose other classes are `TOPK_FILL` (softmax gives them no mass: the
KL teacher is the top-k distribution renormalised). Memory per replica and shard:
`ceil(N / shards) x (k x 2 + k x 2 + 8)` bytes with top-k, `ceil(N / shards) x (C x 2 + 8)` without;
for a language model T times the logits part (`T x k x 4 + 8`, `T x V x 2 + 8`).

A fetch turns the peers' stored logits into one teacher per sample by `codistill.teacher_rule`:
- `mean_logits`: the mean of the logits of the peers that hold the sample (within
  `max_staleness`);
- `mean_probs`: the mean of those peers' softmax(z / T), T the distillation temperature; the
  answer holds probabilities, not logits. With top-k a class in any answering peer's top-k keeps
  that peer's share of mass (under `mean_logits` a class outside one peer's top-k gets that peer's
  `TOPK_FILL` in the mean, so practically only classes in every answering peer's top-k survive);
- `random_peer`: one peer per fetch (a chunk of batches), drawn by `draw_peer` from the seed, the
  asking replica and the chunk's first step among the peers that have published to this store;
  only its logits are read, so the work of a fetch does not grow with R. A sample that peer does
  not hold (or holds older than `max_staleness`) is a miss: it is not filled in from another
  peer, which would mean reading every peer's steps for the chunk.
The age of a sample's teacher is the mean (rounded down) of the ages of the peers that made it;
each peer's own ages are also summed per pair (`Counters.peer_age`): replicas of different sizes
run at different speeds, and a fast replica's teachers from a slow peer are younger, in the
peer's steps, than the slow one's from the fast.
"""

from __future__ import annotations

import time

import numpy as np

from ray_codistill.counters import Counters

TOPK_FILL = -1.0e4  # logit of the classes outside a sample's top-k (exp(-1e4) is 0 in float32)


def draw_peer(seed: int, replica: int, step: int, candidates: list[int]) -> int:
    """The one teacher of `replica` for the chunk starting at `step` under `random_peer`: the same
    seed, replica, step and candidates always give the same peer, on any process or shard."""
    rng = np.random.default_rng([seed % 2**64, replica, int(step) % 2**64])  # SeedSequence: no negatives
    return candidates[int(rng.integers(len(candidates)))]


def softmax_(z: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(z / T) over classes (the last axis), in place in `z` (a float array the caller owns)."""
    if temperature != 1.0:
        z /= temperature
    z -= z.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


class TeacherStore:
    """Stored logits of one shard: publish with validation, fetch the teacher of the rule."""

    def __init__(self, num_replicas: int, num_train: int, num_classes: int, topk: int | None = None,
                 max_staleness: int | None = None, shard: int = 0, num_shards: int = 1,
                 teacher_rule: str = "mean_logits", temperature: float = 1.0, seed: int = 0,
                 positions: int | None = None) -> None:
        self.num_replicas, self.num_train, self.num_classes = num_replicas, num_train, num_classes
        self.item = (positions,) if positions else ()  # the shape of a sample's logits, less the classes
        self.topk, self.max_staleness = topk, max_staleness
        self.teacher_rule, self.temperature, self.seed = teacher_rule, temperature, seed
        self.shard, self.num_shards = shard, num_shards
        self.size = len(range(shard, num_train, num_shards))  # samples in this shard
        self.counters = [Counters() for _ in range(num_replicas)]
        self.latest_step = np.full(num_replicas, -1, dtype=np.int64)  # newest step each replica published
        self.floor: dict[tuple[int, int], int] = {}  # (replica, rank) -> newest step it published
        width = topk or num_classes
        self._values = [np.zeros((0, *self.item, width), np.float16)] * num_replicas  # allocated on first use
        self._classes = [np.zeros((0, *self.item, width), self._class_dtype())] * num_replicas
        self._step = [np.full(self.size, -1, dtype=np.int64) for _ in range(num_replicas)]

    def _class_dtype(self):
        return np.int16 if self.num_classes <= np.iinfo(np.int16).max else np.int32

    def nbytes(self) -> int:
        """Bytes held for teachers (values, classes and steps of every replica)."""
        return sum(a.nbytes for arrays in (self._values, self._classes, self._step) for a in arrays)

    def _local(self, indices: np.ndarray) -> np.ndarray:
        return indices // self.num_shards if self.num_shards > 1 else indices

    # -- publish --------------------------------------------------------------------------------
    def publish(self, replica: int, rank: int, step, indices, values, classes=None) -> str | None:
        """Store a publication; returns why it was refused (and counts it), or None."""
        sent = np.asarray(step)
        step = np.broadcast_to(sent, np.shape(indices))
        reason = self._invalid(replica, rank, step, indices, values, classes)
        c = self.counters[replica]
        if reason:
            c.reject(reason)
            return reason
        local = self._local(indices)
        if self._values[replica].shape[0] == 0:
            self._values[replica] = np.zeros((self.size, *values.shape[1:]), np.float16)
            if self.topk:
                self._classes[replica] = np.zeros((self.size, *classes.shape[1:]), self._class_dtype())
        self._values[replica][local] = values
        if self.topk:
            self._classes[replica][local] = classes
        self._step[replica][local] = step
        if step.size:
            self.floor[(replica, rank)] = int(step[-1])
            self.latest_step[replica] = max(self.latest_step[replica], int(step[-1]))
        c.publications += 1
        c.bytes_in += indices.nbytes + values.nbytes + sent.nbytes + (classes.nbytes if self.topk else 0)
        return None

    def _invalid(self, replica, rank, step, indices, values, classes) -> str | None:
        """Why a publication must not be stored and served, or None when it is fine."""
        arrays = (indices, values) + ((classes,) if self.topk else ())
        if not all(isinstance(a, np.ndarray) for a in arrays):
            return "dtype"
        width = self.topk or self.num_classes
        if (indices.ndim != 1 or values.shape[1:] != (*self.item, width) or len(indices) != len(values)):
            return "shape"
        if self.topk and classes.shape != values.shape:
            return "shape"
        if (not np.issubdtype(indices.dtype, np.integer) or not np.issubdtype(values.dtype, np.floating)
                or not np.issubdtype(step.dtype, np.integer)
                or (self.topk and not np.issubdtype(classes.dtype, np.integer))):
            return "dtype"
        if len(indices) and (indices.min() < 0 or indices.max() >= self.num_train
                             or np.any(indices % self.num_shards != self.shard)):
            return "index_range"
        if self.topk and classes.size and (classes.min() < 0 or classes.max() >= self.num_classes):
            return "index_range"
        if not np.isfinite(values).all():
            return "non_finite"
        # steps never go back: within a publication, nor behind what the same worker sent before
        if step.size and (np.any(np.diff(step) < 0) or step[0] < self.floor.get((replica, rank), -1)):
            return "step"
        return None

    # -- fetch ----------------------------------------------------------------------------------
    def fetch(self, replica: int, indices, step: int = 0) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
        """The teacher for `indices` (float16: logits, or probabilities under `mean_probs`), a mask
        of samples that have one, and its age; `step` is the first step of the asking chunk
        (`random_peer` draws its peer from it).

        The teacher is None when no peer has published anything for these samples yet.
        Age is counted in the teacher's own steps (its newest step minus the step the stored
        logits came from), averaged over the peers that answer for the sample; -1 where masked.
        The CPU time this takes is recorded in the asking replica's counters (`serve_ms_p50/p99`).
        """
        started = time.thread_time()
        indices = np.asarray(indices)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or (indices.size and (
                indices.min() < 0 or indices.max() >= self.num_train or np.any(indices % self.num_shards != self.shard))):
            self.counters[replica].reject("index_range")
            return None, np.zeros(indices.size, dtype=bool), np.full(indices.size, -1, dtype=np.int32)
        local = self._local(indices)
        total = None
        count = np.zeros(indices.size, dtype=np.int64)
        age_sum = np.zeros(indices.size, dtype=np.int64)
        peers = [p for p in range(self.num_replicas) if p != replica and self._values[p].shape[0]]
        if self.teacher_rule == "random_peer" and peers:
            peers = [draw_peer(self.seed, replica, step, peers)]
        for peer in peers:
            steps = self._step[peer][local]
            age = self.latest_step[peer] - steps
            valid = steps >= 0
            if self.max_staleness is not None:
                valid &= age <= self.max_staleness
            if not valid.any():
                continue
            peer_logits = self._dense(peer, local)
            if self.teacher_rule == "mean_probs":
                peer_logits = softmax_(peer_logits, self.temperature)  # _dense's own copy
            peer_logits[~valid] = 0.0
            total = peer_logits if total is None else total + peer_logits
            count += valid
            age_sum += np.where(valid, age, 0)
            self.counters[replica].add_peer_ages(peer, int(age[valid].sum()), int(valid.sum()))
        mask = count > 0
        if total is not None:
            total /= np.maximum(count, 1).reshape(-1, *[1] * (total.ndim - 1))
        teacher = None if total is None else total.astype(np.float16)
        age = np.where(mask, age_sum // np.maximum(count, 1), -1).astype(np.int32)
        c = self.counters[replica]
        c.fetches += 1
        c.hits += int(mask.sum())
        c.misses += int(indices.size - mask.sum())
        c.add_ages(age[mask])
        c.bytes_in += indices.nbytes
        c.bytes_out += (teacher.nbytes if teacher is not None else 0) + mask.nbytes + age.nbytes
        c.add_serve(time.thread_time() - started)
        return teacher, mask, age

    def _dense(self, peer: int, local: np.ndarray) -> np.ndarray:
        values = self._values[peer][local].astype(np.float32)
        if not self.topk:
            return values
        dense = np.full((len(local), *self.item, self.num_classes), TOPK_FILL, dtype=np.float32)
        np.put_along_axis(dense, self._classes[peer][local].astype(np.int64), values, axis=-1)
        return dense

    # -- restarts -------------------------------------------------------------------------------
    def registered(self, replica: int, rank: int, start_step: int, restart: bool) -> None:
        """A worker (re)started at `start_step`. After a replica's restart from its checkpoint,
        what it stored from the lost steps counts as `start_step` old, and its workers publish
        from `start_step` on."""
        if restart:
            self.latest_step[replica] = start_step
            np.minimum(self._step[replica], start_step, out=self._step[replica])
            self.floor = {k: v for k, v in self.floor.items() if k[0] != replica}
        self.floor[(replica, rank)] = start_step
