"""The teacher store: the teacher rules for R > 2 replicas; top-k logits and the store sharded
over actors serve the same teachers as the full, unsharded store (pure numpy, then through real
broker and shard actors)."""

from __future__ import annotations

import numpy as np
import pytest
import ray

from ray_codistill.client import BrokerClient
from ray_codistill.counters import AGE_WINDOW, SERVE_WINDOW, Counters
from ray_codistill.store import TOPK_FILL, TeacherStore, draw_peer

from actors import TOKEN, run_stats, start_run, stop_run

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


def _softmax(z, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("rule", ["mean_logits", "mean_probs"])
def test_three_replicas_mean_rules_average_the_peers_that_have_the_sample(rule):
    """R = 3: replica 0's teacher is the mean of peers 1 and 2 where both have published the
    sample, the one peer's where only it has, and a miss where neither has; the age is the mean
    (rounded down) of the answering peers' ages, in each peer's own steps."""
    store = TeacherStore(3, N, C, teacher_rule=rule, temperature=2.0)
    rng = np.random.default_rng(3)
    z1, z2 = rng.normal(size=(7, C)).astype(np.float16), rng.normal(size=(3, C)).astype(np.float16)
    store.publish(1, 0, 10, np.arange(6), z1[:6])  # samples 0-5 at peer 1's step 10
    store.publish(1, 0, 15, np.array([6]), z1[6:])  # sample 6 at its step 15: peer 1 is at 15
    store.publish(2, 0, 3, np.arange(3), z2)  # samples 0-2 at peer 2's step 3 (its newest)
    teacher, mask, age = store.fetch(0, np.arange(8))
    assert mask.tolist() == [True] * 7 + [False]
    assert age.tolist() == [(5 + 0) // 2] * 3 + [5, 5, 5, 0, -1]
    as_rule = (lambda z: _softmax(z, 2.0)) if rule == "mean_probs" else (lambda z: z.astype(np.float64))
    expected = np.concatenate([(as_rule(z1[:3]) + as_rule(z2)) / 2, as_rule(z1[3:])])
    np.testing.assert_allclose(teacher[:7].astype(np.float64), expected, rtol=2e-3, atol=1e-4)
    assert teacher.dtype == np.float16
    if rule == "mean_probs":
        np.testing.assert_allclose(teacher[:7].astype(np.float64).sum(1), 1.0, atol=5e-3)
    c = store.counters[0]
    assert (c.hits, c.misses, c.age_max, sorted(c.ages().tolist())) == (7, 1, 5, [0, 2, 2, 2, 5, 5, 5])
    # per pair: peer 1 taught 7 samples aged 5 x 6 and 0; peer 2 taught 3 aged 0
    assert c.peer_age == {1: [30, 7], 2: [0, 3]} and c.as_dict()["age_by_peer"] == {"1": 30 / 7, "2": 0.0}
    # max_staleness drops the old peer's copy: samples 0-5 keep only what is fresh enough
    fresh = TeacherStore(3, N, C, teacher_rule=rule, max_staleness=4)
    for r, step, idx, z in ((1, 10, np.arange(6), z1[:6]), (1, 15, np.array([6]), z1[6:]), (2, 3, np.arange(3), z2)):
        fresh.publish(r, 0, step, idx, z)
    _, mask, age = fresh.fetch(0, np.arange(8))
    assert mask.tolist() == [True] * 3 + [False] * 3 + [True, False] and age.tolist() == [0] * 3 + [-1] * 3 + [0, -1]


def test_mean_probs_with_topk_keeps_each_peers_top_classes():
    """Top-k and R = 3: under mean_probs a class in one peer's top-k keeps that peer's share of
    mass; under mean_logits the other peer's TOPK_FILL in the mean leaves it none."""
    z1 = np.array([[4.0, 2.0, 0.0, 0.0]], np.float16)  # top-2: classes 0, 1
    z2 = np.array([[4.0, 0.0, 2.0, 0.0]], np.float16)  # top-2: classes 0, 2
    probs, logits = (TeacherStore(3, 10, 4, topk=2, teacher_rule=rule) for rule in ("mean_probs", "mean_logits"))
    for store in (probs, logits):
        store.publish(1, 0, 1, np.array([0]), *_topk(z1, 2))
        store.publish(2, 0, 1, np.array([0]), *_topk(z2, 2))
    p = probs.fetch(0, np.array([0]))[0].astype(np.float64)
    expected = (_softmax([[4.0, 2.0, TOPK_FILL, TOPK_FILL]]) + _softmax([[4.0, TOPK_FILL, 2.0, TOPK_FILL]])) / 2
    np.testing.assert_allclose(p, expected, atol=1e-3)
    assert p[0, 1] > 0.05 and p[0, 2] > 0.05 and p[0, 3] == 0
    assert _softmax(logits.fetch(0, np.array([0]))[0])[0, 1:].max() < 1e-6  # only class 0 survives


def _constant_peers(replicas: int, seed: int = 0, published=None) -> TeacherStore:
    """A random_peer store whose peer p holds logits all equal to p for every sample (or for
    `published[p]`), published at step 2p: a served row names its peer."""
    store = TeacherStore(replicas, N, C, teacher_rule="random_peer", seed=seed)
    for p in range(1, replicas):
        idx = np.arange(N) if published is None else published[p]
        if len(idx):
            store.publish(p, 0, 2 * p, idx, np.full((len(idx), C), p, np.float16))
    return store


def _served_peers(store: TeacherStore, steps, replica: int = 0) -> list[int]:
    out = []
    for step in steps:
        teacher, mask, age = store.fetch(replica, np.arange(0, N, 5), step)
        assert mask.all() and (age == 0).all()
        peer, = np.unique(teacher)  # one peer for the whole chunk
        out.append(int(peer))
    return out


def test_random_peer_serves_one_drawn_peer_per_chunk_reproducibly():
    steps = range(0, 320, 8)  # the first steps of 40 chunks
    served = _served_peers(_constant_peers(4), steps)
    assert set(served) == {1, 2, 3}  # different chunks, different peers; never the replica itself
    assert served == [draw_peer(0, 0, s, [1, 2, 3]) for s in steps]
    assert _served_peers(_constant_peers(4), steps) == served  # the same seed, replica and steps
    assert _served_peers(_constant_peers(4, seed=1), steps) != served
    assert _served_peers(_constant_peers(4), steps, replica=1) != served
    assert all(draw_peer(-5, 2, s, [0, 1]) in (0, 1) for s in steps)  # any seed


def test_random_peer_reads_one_peer_per_fetch_whatever_r(monkeypatch):
    """The broker's work per fetch: the values of one peer (one `_dense` gather), for 3 or 9
    replicas; the mean rules read every peer."""
    reads = []
    for replicas in (3, 9):
        store = _constant_peers(replicas)
        monkeypatch.setattr(store, "_dense", lambda peer, local, _d=store._dense: reads.append(peer) or _d(peer, local))
        store.fetch(0, np.arange(32), 7)
        assert len(reads) == 1
        reads.clear()
        store.teacher_rule = "mean_logits"
        store.fetch(0, np.arange(32), 7)
        assert sorted(reads) == list(range(1, replicas))
        reads.clear()


def test_each_answered_fetch_records_its_service_time():
    store = _constant_peers(3)
    assert store.counters[0].as_dict()["serve_ms_p50"] is None  # nothing answered yet
    store.fetch(0, np.arange(-1, 3))  # refused (index out of range): not an answer, not timed
    assert store.counters[0].serve_times().size == 0
    for step in range(5):
        store.fetch(0, np.arange(32), step)
    times = store.counters[0].serve_times()
    assert times.size == 5 and (times > 0).all() and store.counters[1].serve_times().size == 0
    c = store.counters[0].as_dict()
    assert c["serve_ms_p99"] >= c["serve_ms_p50"] > 0
    assert c["serve_ms_p50"] == pytest.approx(np.median(times) * 1e3)


def test_service_times_keep_a_window_and_merge_over_shards():
    a, b = Counters(), Counters()
    a.add_serve(np.arange(SERVE_WINDOW + 10) + 1.0)  # more than the window: the oldest 10 go
    assert a.serve_times().size == SERVE_WINDOW and a.serve_times().min() == 11.0
    b.add_serve(0.5)
    b.add_serve(np.array([1.5, 2.5]))
    assert sorted(b.serve_times()) == [0.5, 1.5, 2.5]
    merged = Counters.merged([b, b])
    assert sorted(merged.serve_times()) == [0.5, 0.5, 1.5, 1.5, 2.5, 2.5]
    assert merged.as_dict()["serve_ms_p50"] == pytest.approx(1500.0)


def test_counter_reports_carry_the_totals_and_only_what_is_new():
    """What an exchange actor sends the ledger: totals, and the ages and service times since its
    last report (at most a window's worth); a mirror takes a late, older report's ages but keeps
    the newer totals."""
    c = Counters()
    c.fetches, c.hits = 2, 6
    c.add_ages(np.array([1, 2, 3]))
    c.add_serve(0.25)
    first = c.take_report()
    assert (first["fetches"], first["hits"]) == (2, 6) and first["ages"].tolist() == [1, 2, 3]
    c.fetches += 1
    c.add_ages(np.array([9]))
    c.add_peer_ages(1, 9, 1)
    c.reject("token")
    second = c.take_report()
    assert second["ages"].tolist() == [9] and second["serve"].size == 0 and second["rejected"] == {"token": 1}
    assert c.take_report()["ages"].size == 0  # nothing new
    mirror = Counters()
    mirror.absorb(second)
    mirror.absorb(first, totals=False)  # overtaken by the second on its way
    assert (mirror.fetches, mirror.hits, mirror.rejected, mirror.age_max) == (3, 6, {"token": 1}, 9)
    assert mirror.peer_age == {1: [9, 1]} and Counters.from_totals(mirror.totals()).peer_age == {1: [9, 1]}
    assert Counters.merged([mirror, mirror]).peer_age == {1: [18, 2]}
    assert sorted(mirror.ages().tolist()) == [1, 2, 3, 9] and mirror.serve_times().tolist() == [0.25]
    c.add_ages(np.arange(AGE_WINDOW + 5))  # more than a window between two reports: the newest window
    ages = c.take_report()["ages"]
    assert ages.size == AGE_WINDOW and ages[0] == 5 and ages[-1] == AGE_WINDOW + 4


def test_random_peer_draws_among_peers_that_published_and_misses_what_its_peer_lacks():
    # peer 2 has published nothing yet: every chunk is drawn from peer 1 alone
    only_one = _constant_peers(3, published={1: np.arange(N), 2: []})
    assert _served_peers(only_one, range(0, 80, 8)) == [1] * 10
    # peer 2 holds only the even samples: a chunk drawn on it misses the odd ones, which are not
    # filled in from peer 1 (that would read every peer); ages are the drawn peer's
    store = _constant_peers(3, published={1: np.arange(N), 2: np.arange(0, N, 2)})
    idx = np.arange(10)
    drawn = {}
    for step in range(0, 160, 8):
        teacher, mask, age = store.fetch(0, idx, step)
        peer = draw_peer(0, 0, step, [1, 2])
        drawn[peer] = drawn.get(peer, 0) + 1
        assert mask.tolist() == ([True] * 10 if peer == 1 else [i % 2 == 0 for i in range(10)])
        assert (teacher[mask] == peer).all() and (age[mask] == 0).all() and (age[~mask] == -1).all()
    assert set(drawn) == {1, 2}
    c = store.counters[0]
    assert (c.hits, c.misses) == (10 * drawn[1] + 5 * drawn[2], 5 * drawn[2])


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


@pytest.mark.parametrize("topk, rule", [(None, "mean_logits"), (4, "mean_logits"), (None, "random_peer"),
                                        (4, "mean_probs")])
def test_sharded_store_serves_the_same_teachers_as_one_store(ray_cluster, topk, rule):
    """Through the real actors and the workers' client: 1 store vs 3 shard actors. Under
    random_peer every shard draws the same peer for a chunk (the same seed, replica and step,
    and every peer has published to every shard)."""
    answers, stats = [], []
    for shards in (1, 3):
        name = f"test-shards-{shards}-{topk}-{rule}"
        run = start_run(name, 3, num_train=N, num_classes=C, max_staleness=25, topk=topk, shards=shards,
                        teacher_rule=rule, temperature=2.0, seed=7)
        try:
            clients = [BrokerClient(name, r, timeout_s=10.0, token=TOKEN, shards=shards) for r in range(3)]
            for r, step, idx, z in _publications():
                clients[r].publish(step, idx, *(_topk(z, topk) if topk else (z,)))
            ray.get([a.ping.remote() for a in run.handle.actors])  # fire-and-forget: let them land
            query = np.random.default_rng(2).permutation(N)[:64]
            answers.append(clients[0].resolve(clients[0].fetch_async(query, 40)))
            stats.append(run_stats(run))
            held = ray.get([a.memory.remote() for a in run.handle.actors])
            assert (held[0]["teacher_bytes"] > 0) == (shards == 1) and len(held) == (shards + 1 if shards > 1 else 1)
        finally:
            stop_run(run)
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
