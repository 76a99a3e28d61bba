"""The teacher store: top-k logits and the store sharded over actors serve the same teachers as
the full, unsharded store (pure numpy, then through real broker and shard actors)."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from ray_codistill.broker import BrokerClient, start_broker, stop_broker
from ray_codistill.store import TOPK_FILL, TeacherStore

TOKEN = "store-token"
N, C = 200, 12


def _publications(seed: int = 0, replicas: int = 3, rounds: int = 4):
    """Random publications: (replica, step array, indices, logits), steps rising per replica."""
    rng = np.random.default_rng(seed)
    out = []
    for step in range(rounds):
        for r in range(replicas):
            idx = rng.choice(N, size=48, replace=False)
            out.append((r, np.full(idx.size, 10 * step + r), idx, rng.normal(size=(idx.size, C)).astype(np.float16)))
    return out


def _topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    classes = np.argsort(-logits.astype(np.float32), axis=1, kind="stable")[:, :k]
    return np.take_along_axis(logits, classes, axis=1), classes.astype(np.int16)


def test_topk_with_every_class_is_the_full_store():
    full, topk = TeacherStore(3, N, C), TeacherStore(3, N, C, topk=C)
    for r, step, idx, z in _publications():
        assert full.publish(r, 0, step, idx, z) is None
        assert topk.publish(r, 0, step, idx, *_topk(z, C)) is None
    idx = np.arange(N)
    for a, b in zip(full.fetch(0, idx), topk.fetch(0, idx)):
        np.testing.assert_array_equal(a, b)


def test_topk_teacher_is_the_renormalised_top_k_distribution():
    k = 3
    full, topk = TeacherStore(2, N, C), TeacherStore(2, N, C, topk=k)
    idx = np.arange(20)
    z = np.random.default_rng(1).normal(size=(20, C)).astype(np.float16)
    full.publish(1, 0, 5, idx, z)
    topk.publish(1, 0, 5, idx, *_topk(z, k))
    dense, mask, age = topk.fetch(0, idx)
    assert mask.all() and (age == 0).all()
    kept = np.argsort(-z.astype(np.float32), axis=1)[:, :k]
    np.testing.assert_array_equal(np.take_along_axis(dense, kept, 1), np.take_along_axis(z, kept, 1))
    assert (np.sort(dense, axis=1)[:, :C - k] == np.float16(TOPK_FILL)).all()
    p = np.exp(dense.astype(np.float32) - dense.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.exp(np.take_along_axis(z, kept, 1).astype(np.float32))
    np.testing.assert_allclose(np.take_along_axis(p, kept, 1), q / q.sum(1, keepdims=True), rtol=1e-5)
    # memory: k float16 values and k int16 classes per sample instead of C values (+ an int64 step
    # per sample and replica); only replica 1 published, so only its values are allocated
    assert full.nbytes() == N * C * 2 + 2 * N * 8
    assert topk.nbytes() == N * k * (2 + 2) + 2 * N * 8


def test_topk_publications_are_validated():
    store = TeacherStore(2, N, C, topk=2)
    values = np.zeros((2, 2), np.float16)
    assert store.publish(1, 0, 1, np.arange(2), values, np.array([[0, C], [1, 2]])) == "index_range"
    assert store.publish(1, 0, 1, np.arange(2), values, np.zeros((2, 3), np.int16)) == "shape"
    assert store.publish(1, 0, 1, np.arange(2), values, np.zeros((2, 2), np.float32)) == "dtype"
    assert store.publish(1, 0, 1, np.arange(2), np.zeros((2, C), np.float16), np.zeros((2, C), np.int16)) == "shape"
    assert store.counters[1].publications == 0


@pytest.mark.parametrize("topk", [None, 4])
def test_sharded_store_serves_the_same_teachers_as_one_store(ray_cluster, topk):
    """Through the real actors and the workers' client: 1 store vs 3 shard actors."""
    answers, stats = [], []
    for shards in (1, 3):
        name = f"test-shards-{shards}-{topk}"
        handle = start_broker(name, 3, num_train=N, num_classes=C, max_staleness=25, token=TOKEN,
                              topk=topk, shards=shards)
        try:
            clients = [BrokerClient(name, r, timeout_s=10.0, token=TOKEN, shards=shards) for r in range(3)]
            for r, step, idx, z in _publications():
                clients[r].publish(step, idx, *(_topk(z, topk) if topk else (z,)))
            ray.get(handle.ping.remote())
            for shard in ray.get(handle.shard_handles.remote()):
                ray.get(shard.nbytes.remote())  # publications are fire-and-forget: let them land
            query = np.random.default_rng(2).permutation(N)[:64]
            answers.append(clients[0].resolve(clients[0].fetch_async(query)))
            stats.append(ray.get(handle.stats.remote()))
            held = ray.get(handle.nbytes.remote())
            assert (held["broker"] > 0) == (shards == 1) and len(held["shards"]) == (shards if shards > 1 else 0)
        finally:
            stop_broker(handle)
    (t1, m1, a1), (t3, m3, a3) = answers
    assert m1.any() and not m1.all()  # some samples were never published
    np.testing.assert_array_equal(m1, m3)
    np.testing.assert_array_equal(a1, a3)
    np.testing.assert_array_equal(t1[m1], t3[m3])
    one, three = stats
    assert three["broker_shards"] == 3
    for r in ("0", "1", "2"):
        for key in ("hits", "misses", "bytes_in", "age_max"):
            assert one["replicas"][r][key] == three["replicas"][r][key], (r, key)
    # 3 shards take one call per shard for each publication and fetch
    assert three["replicas"]["1"]["publications"] == 3 * one["replicas"]["1"]["publications"]
