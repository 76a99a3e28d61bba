"""The broker and the ledger actors, for real: logits store and fetch, staleness, weights,
counters (reported by the exchange to the ledger), rows, probes, restarts, niceness."""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray

from ray_codistill.broker import get_broker
from ray_codistill.client import BrokerClient, LedgerClient

from actors import TOKEN, run_stats, start_run, stop_run

@pytest.fixture
def broker(ray_cluster, request):
    name = f"test-broker-{request.node.name}".replace("[", "-").replace("]", "")
    run = start_run(name, getattr(request, "param", 2), max_staleness=5)
    yield run
    stop_run(run)


def _logits(value: float, n: int = 4, classes: int = 3) -> np.ndarray:
    return np.full((n, classes), value, dtype=np.float16)


def test_fetch_before_any_publication_has_no_teacher(broker):
    b = broker.broker
    teacher, mask, age = ray.get(b.fetch.remote(0, TOKEN, np.arange(4)))
    assert teacher is None and not mask.any() and (age == -1).all()
    assert run_stats(broker)["replicas"]["0"]["misses"] == 4


def test_peer_logits_are_served_with_mask_and_age(broker):
    b = broker.broker
    idx = np.array([3, 7, 11, 50])
    ray.get(b.publish.remote(1, TOKEN, 0, 10, idx[:2], _logits(2.0, n=2)))  # samples 3, 7 at peer step 10
    ray.get(b.publish.remote(1, TOKEN, 0, 12, idx[2:3], _logits(4.0, n=1)))  # sample 11 at peer step 12
    teacher, mask, age = ray.get(b.fetch.remote(0, TOKEN, idx))
    assert mask.tolist() == [True, True, True, False]
    np.testing.assert_array_equal(teacher[:3, 0], [2.0, 2.0, 4.0])
    assert teacher.dtype == np.float16
    assert age.tolist() == [2, 2, 0, -1]  # counted in the teacher's own steps: 12 - 10
    # a replica is never its own teacher
    _, own_mask, _ = ray.get(b.fetch.remote(1, TOKEN, idx))
    assert not own_mask.any()
    s = run_stats(broker)["replicas"]
    assert (s["0"]["hits"], s["0"]["misses"], s["0"]["age_max"]) == (3, 1, 2)
    assert s["1"]["publications"] == 2 and s["1"]["bytes_in"] > 0 and s["0"]["bytes_out"] > 0


def test_max_staleness_drops_old_teachers(broker):
    b = broker.broker  # max_staleness=5
    ray.get(b.publish.remote(1, TOKEN, 0, 1, np.array([0]), _logits(1.0, n=1)))
    ray.get(b.publish.remote(1, TOKEN, 0, 9, np.array([1]), _logits(1.0, n=1)))
    _, mask, age = ray.get(b.fetch.remote(0, TOKEN, np.array([0, 1])))
    assert mask.tolist() == [False, True] and age.tolist() == [-1, 0]


@pytest.mark.parametrize("broker", [3], indirect=True)
def test_teacher_is_the_mean_over_peers_that_have_the_sample(broker):
    b = broker.broker
    ray.get(b.publish.remote(1, TOKEN, 0, 4, np.array([0, 1]), np.array([[1, 0, 0], [1, 0, 0]], dtype=np.float16)))
    ray.get(b.publish.remote(2, TOKEN, 0, 4, np.array([0]), np.array([[3, 2, 0]], dtype=np.float16)))
    teacher, mask, _ = ray.get(b.fetch.remote(0, TOKEN, np.array([0, 1])))
    np.testing.assert_array_equal(teacher, [[2, 1, 0], [1, 0, 0]])  # sample 1 only has peer 1
    assert mask.all()


def test_weights_keep_only_the_newest_reference(broker):
    b = broker.broker
    for step in (50, 100):
        ref = ray.put({"w": np.full(3, step)})
        ray.get(b.put_weights.remote(0, TOKEN, step, [ref], 24))
    assert ray.get(b.get_weights.remote(0, TOKEN)) == {}  # not its own
    (peer, (step, latest, ref)), = ray.get(b.get_weights.remote(1, TOKEN)).items()
    assert (peer, step, latest) == (0, 100, 100)
    assert ray.get(ref[0])["w"].tolist() == [100, 100, 100]


def test_rows_get_the_replica_and_its_bytes(broker):
    b, ledger = broker.broker, broker.ledger
    ray.get(b.publish.remote(0, TOKEN, 0, 0, np.arange(4), _logits(0.0)))
    run_stats(broker)  # the exchange's counters reach the ledger
    ray.get(ledger.log.remote(0, TOKEN, [{"step": 10, "train/loss": 1.0}]))
    row, = ray.get(ledger.rows.remote())
    assert row["replica"] == 0 and row["comm/bytes"] == 4 * 8 + 4 * 3 * 2 + 8  # indices, fp16 logits, step
    assert ray.get(ledger.progress.remote())[0]["step"] == 10


def test_the_exchange_reports_its_counters_to_the_ledger_by_itself(broker):
    """No one asks the broker for its counters: it sends them to the ledger, at most once a
    second, at the end of one of its own calls, and never waits for the ledger."""
    b = broker.broker
    ray.get(b.publish.remote(1, TOKEN, 0, 3, np.arange(4), _logits(1.0)))

    def reported() -> dict | None:  # the ledger as a user sees it, without asking the broker
        ray.get(b.fetch.remote(0, TOKEN, np.arange(4)))  # a call of the exchange's own
        s = ray.get(broker.ledger.stats.remote())["replicas"]
        return s if s["1"]["publications"] == 1 and s["0"]["hits"] >= 4 else None

    from live import wait_for
    s = wait_for("the broker's report in the ledger", reported, deadline_s=60)
    assert s["0"]["age_p50"] == 0 and s["1"]["bytes_in"] > 0


def test_the_ledger_keeps_the_newest_totals_of_each_exchange_actor(broker):
    """Reports of one actor that arrive out of order: the totals of the newest count; a new life
    of the actor (Ray restarted it) starts its own order."""
    def report(instance: str, seq: int, fetches: int) -> dict:
        counters = [{"publications": 0, "fetches": fetches, "hits": 0, "misses": 0, "bytes_in": 0, "bytes_out": 0,
                     "age_max": 0, "rejected": {}, "ages": np.zeros(0, np.int64), "serve": np.zeros(0)}] * 2
        return {"source": "shard7", "instance": instance, "seq": seq, "latest_step": [0, 0], "counters": counters}

    ledger = broker.ledger
    ray.get(ledger.exchange_report.remote(report("a", 2, fetches=5), report("a", 1, fetches=3)))
    assert ray.get(ledger.stats.remote())["replicas"]["0"]["fetches"] == 5
    ray.get(ledger.exchange_report.remote(report("b", 1, fetches=1)))
    assert ray.get(ledger.stats.remote())["replicas"]["0"]["fetches"] == 1


def test_client_finds_the_broker_by_name_and_survives_its_loss(broker):
    name, b = broker.name, broker.broker
    assert get_broker(name)._actor_id == b._actor_id
    client = BrokerClient(name, replica=0, timeout_s=0.5, token=TOKEN)
    # a live broker answers (given time: a loaded machine can take longer than a fetch may wait)
    assert client.resolve(client.fetch_async(np.arange(3)), timeout_s=60)[0] is None
    assert LedgerClient(name, replica=0, timeout_s=60, token=TOKEN).replicas_up() == 0
    ray.kill(b)  # asynchronous: a call sent at once may still be served; wait until it is gone
    with pytest.raises(ray.exceptions.RayActorError):
        for _ in range(600):
            ray.get(b.ping.remote(), timeout=60)
    assert client.resolve(client.fetch_async(np.arange(3))) is None  # a miss, not a crash
    assert client.errors >= 1


@pytest.mark.parametrize("indices, logits, reason", [
    (np.arange(2), np.array([[np.nan, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float16), "non_finite"),
    (np.arange(2), np.array([[np.inf, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float16), "non_finite"),
    (np.arange(2), np.zeros((3, 3), dtype=np.float16), "shape"),
    (np.arange(2), np.zeros((2, 4), dtype=np.float16), "shape"),  # 4 classes, the data has 3
    (np.array([0, 100]), np.zeros((2, 3), dtype=np.float16), "index_range"),
    (np.array([-1, 0]), np.zeros((2, 3), dtype=np.float16), "index_range"),
    (np.array([0.0, 1.0]), np.zeros((2, 3), dtype=np.float16), "dtype"),
    (np.arange(2), np.zeros((2, 3), dtype=np.int64), "dtype"),
])
def test_bad_publications_are_rejected_and_never_served(broker, indices, logits, reason):
    b = broker.broker
    ray.get(b.publish.remote(1, TOKEN, 0, 5, indices, logits))
    stats = run_stats(broker)["replicas"]["1"]
    assert stats["rejected"] == {reason: 1} and stats["publications"] == 0
    teacher, mask, _ = ray.get(b.fetch.remote(0, TOKEN, np.arange(2)))
    assert teacher is None and not mask.any()


def test_wrong_token_or_unknown_replica_is_refused_and_never_served(broker):
    """Another job on the cluster, without the experiment's token, cannot inject teachers."""
    b = broker.broker
    z = _logits(9.0, n=2)
    ray.get(b.publish.remote(1, "guessed", 0, 5, np.arange(2), z))
    ray.get(b.publish.remote(7, TOKEN, 0, 5, np.arange(2), z))  # no replica 7 in this experiment
    ray.get(broker.ledger.log.remote(1, "guessed", [{"step": 5, "train/loss": 0.0}]))
    teacher, mask, _ = ray.get(b.fetch.remote(0, TOKEN, np.arange(2)))
    assert teacher is None and not mask.any()
    stats = run_stats(broker)
    assert stats["replicas"]["1"]["rejected"] == {"token": 2} and stats["replicas"]["1"]["publications"] == 0
    assert stats["rejected_unknown_replica"] == 1 and ray.get(broker.ledger.rows.remote()) == []
    # nor can it read them
    ray.get(b.publish.remote(1, TOKEN, 0, 5, np.arange(2), z))
    teacher, mask, _ = ray.get(b.fetch.remote(0, "guessed", np.arange(2)))
    assert teacher is None and not mask.any()


def test_steps_going_back_are_refused_per_worker(broker):
    b = broker.broker
    ray.get(b.publish.remote(1, TOKEN, 0, 10, np.array([0]), _logits(1.0, n=1)))
    ray.get(b.publish.remote(1, TOKEN, 0, 9, np.array([1]), _logits(2.0, n=1)))  # behind rank 0's step 10
    ray.get(b.publish.remote(1, TOKEN, 0, np.array([12, 11]), np.array([2, 3]), _logits(2.0, n=2)))
    ray.get(b.publish.remote(1, TOKEN, 1, 9, np.array([4]), _logits(3.0, n=1)))  # rank 1 has its own order
    stats = run_stats(broker)["replicas"]["1"]
    assert stats["rejected"] == {"step": 2} and stats["publications"] == 2
    _, mask, _ = ray.get(b.fetch.remote(0, TOKEN, np.arange(5)))
    assert mask.tolist() == [True, False, False, False, True]


def test_a_restarted_replica_drops_its_rows_after_the_checkpoint(broker):
    b, ledger = broker.broker, broker.ledger
    for start in (0, 20):  # its first start, then back from its step-20 checkpoint (the launch order)
        if start:
            ray.get(b.publish.remote(1, TOKEN, 0, 30, np.array([0]), _logits(1.0, n=1)))
        ray.get(b.register.remote(1, TOKEN, 0, start))
        ray.get(ledger.register_worker.remote(1, TOKEN, 0, {"pid": 1 + start}, start))
        if not start:
            ray.get(ledger.log.remote(1, TOKEN, [{"step": s, "train/loss": 1.0} for s in (10, 20, 30)]))
    assert [r["step"] for r in ray.get(ledger.rows.remote())] == [10, 20]
    ray.get(b.publish.remote(1, TOKEN, 0, 20, np.array([1]), _logits(1.0, n=1)))  # step 20 is fine again
    _, _, age = ray.get(b.fetch.remote(0, TOKEN, np.array([0, 1])))
    assert age.tolist() == [0, 0]  # the step-30 logits of the lost run count as step 20
    ray.get(ledger.log.remote(1, TOKEN, [{"step": 30, "train/loss": 0.5}]))
    rows = ray.get(ledger.rows.remote())
    assert [(r["step"], r["train/loss"]) for r in rows] == [(10, 1.0), (20, 1.0), (30, 0.5)]
    stats = run_stats(broker)
    assert stats["replicas"]["1"]["restarts"] == 1 and stats["replicas"]["1"]["rejected"] == {}
    assert [(e["replica"], e["event"], e["step"]) for e in stats["events"]] == [(1, "started", 0), (1, "restarted", 20)]


def test_killed_broker_and_ledger_are_restarted_with_their_history(ray_cluster, tmp_path):
    """SIGKILL the broker process: Ray restarts it, it reloads its counters from the experiment
    folder and tells the ledger, and the teacher store starts empty (fetches are misses). SIGKILL
    the ledger: it reloads rows, events and divergence, and calls made meanwhile are retried."""
    import signal
    run = start_run("test-broker-kill", 2, num_train=10, probe_labels=np.array([0, 1]), folder=str(tmp_path))
    b, ledger = run.broker, run.ledger
    try:
        ray.get(ledger.register_worker.remote(0, TOKEN, 0, {"pid": 1}, 0))
        ray.get(b.publish.remote(1, TOKEN, 0, 5, np.arange(4), _logits(1.0)))
        assert ray.get(b.fetch.remote(0, TOKEN, np.arange(4)))[1].all()
        # the broker's journal is written at most once a second, and at every registration:
        # counters of the last second before a kill may be lost, those before a registration not
        ray.get(b.register.remote(1, TOKEN, 0, 0))
        for r in (0, 1):
            ray.get(ledger.probe.remote(r, TOKEN, 10, np.eye(2, dtype=np.float32) * (1 + r)))
        ray.get(ledger.log.remote(0, TOKEN, [{"step": 10, "train/loss": 1.0}]))
        before = run_stats(run)
        pid = ray.get(b.ping.remote())
        os.kill(pid, signal.SIGKILL)
        assert ray.get(b.ping.remote(), timeout=60) != pid  # calls are retried on the restarted broker
        after = run_stats(run)
        for key in ("publications", "hits", "fetches", "bytes_in"):
            assert after["replicas"]["1"][key] == before["replicas"]["1"][key]
            assert after["replicas"]["0"][key] == before["replicas"]["0"][key]
        from live import wait_for  # the broker's note reaches the ledger without anyone waiting on it
        wait_for("broker_reloaded in the events", lambda: "broker_reloaded" in [
            e["event"] for e in ray.get(ledger.events.remote())], deadline_s=60)
        teacher, mask, _ = ray.get(b.fetch.remote(0, TOKEN, np.arange(4)))
        assert teacher is None and not mask.any()  # the store is not journalled: a miss, counted
        assert run_stats(run)["replicas"]["0"]["misses"] == before["replicas"]["0"]["misses"] + 4

        pid = ray.get(ledger.ping.remote())
        os.kill(pid, signal.SIGKILL)
        ray.get(ledger.log.remote(0, TOKEN, [{"step": 20, "train/loss": 0.5}]))  # retried on the new ledger
        assert ray.get(ledger.ping.remote(), timeout=60) != pid
        assert [r["step"] for r in ray.get(ledger.rows.remote())] == [10, 20]
        assert len(ray.get(ledger.divergence.remote())) == 1
        reloaded = run_stats(run)
        assert reloaded["probe_rounds"] == 1 and reloaded["events"][-1]["event"] == "ledger_reloaded"
        assert reloaded["replicas"]["1"]["publications"] == before["replicas"]["1"]["publications"]
    finally:
        stop_run(run)


def test_probe_rounds_and_stats_schema(ray_cluster):
    run = start_run("test-probes", 2, num_train=10, num_classes=2, probe_labels=np.array([0, 1, 1]))
    ledger = run.ledger
    try:
        z0 = np.array([[3.0, 0.0], [0.0, 3.0], [0.0, 3.0]], dtype=np.float32)
        z1 = np.array([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], dtype=np.float32)
        ray.get(ledger.probe.remote(0, TOKEN, 100, z0))
        assert run_stats(run)["divergence"] is None  # replica 1 has not reported yet
        ray.get(ledger.probe.remote(1, TOKEN, 100, z1))
        ray.get(ledger.probe.remote(1, TOKEN, 200, np.full((3, 2), np.inf, dtype=np.float32)))  # rejected
        ray.get(ledger.log.remote(0, TOKEN, [{"step": 100, "train/loss": 0.5, "val/acc": 0.9,
                                              "perf/samples_per_s": 10.0}]))
        stats = run_stats(run)
        assert stats["schema"] == "ray_codistill.stats/1" and stats["status"] == "running"
        assert stats["probe_rounds"] == 1
        div = stats["divergence"]
        assert div["step"] == 100 and div["pairs"][0]["disagreement"] == pytest.approx(1 / 3)
        # the second sample (label 1) is a 50/50 tie in the mean softmax: argmax takes class 0
        assert div["ensemble_acc"] == pytest.approx(2 / 3)
        r0, r1 = stats["replicas"]["0"], stats["replicas"]["1"]
        assert (r0["step"], r0["train_loss"], r0["val_acc"], r0["samples_per_s"]) == (100, 0.5, 0.9, 10.0)
        assert r0["probe_acc"] == 1.0 and r1["probe_acc"] == pytest.approx(2 / 3)
        assert r1["rejected"] == {"probe": 1}
        assert set(r0) >= {"publications", "fetches", "hits", "misses", "hit_rate", "age_p50", "age_p95",
                           "age_max", "bytes_in", "bytes_out", "workers"}
        row, = ray.get(ledger.divergence.remote())
        assert row["step"] == 100 and row["acc_a"] == 1.0
    finally:
        stop_run(run)


def test_a_replica_with_non_finite_outputs_raises_instead_of_publishing(broker):
    """The worker side: NaN logits or weights stop the replica (Ray Train then restarts it from
    its last checkpoint) before anything reaches the broker."""
    import torch

    from ray_codistill.errors import NonFiniteError
    from ray_codistill.teachers import LogitsTeacher, WeightsTeacher
    client = BrokerClient(broker.name, replica=1, timeout_s=5.0, token=TOKEN)
    teacher = LogitsTeacher(client, chunk=2, device=torch.device("cpu"))
    teacher.publish(0, torch.arange(2), torch.zeros(2, 3))
    with pytest.raises(NonFiniteError, match="non-finite logits at steps 0-1"):
        teacher.publish(1, torch.arange(2, 4), torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]))
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="non-finite weights at step 10"):
        WeightsTeacher(client, lambda: torch.nn.Linear(3, 2), every=10, device=torch.device("cpu")).publish_weights(
            10, model)
    stats = run_stats(broker)["replicas"]["1"]
    assert stats["publications"] == 0 and stats["rejected"] == {}


def _thread_niceness(pid: int) -> set[int]:
    """The niceness of every thread of a process on this machine (field 19 of /proc/.../stat)."""
    from pathlib import Path
    out = set()
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        out.add(int(stat.read_text().rsplit(")", 1)[1].split()[16]))
    return out


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="lowering a niceness needs root")
def test_the_broker_and_its_shards_take_the_niceness_they_are_given(ray_cluster, capsys):
    """Ray runs actors at its worker niceness (15), as low as the training workers they serve;
    the broker and its shards take the given niceness on every thread, or keep Ray's (None).
    A run whose broker did not get the niceness of its config says so."""
    from ray_codistill.launcher import _check_niceness
    ray_niceness = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())
    assert ray_niceness == 15  # Ray's default worker_niceness: what the broker starts at
    run = start_run("test-nice-0", 2, num_train=10, shards=2, niceness=0)
    try:
        assert run_stats(run)["broker_niceness"] == 0
        _check_niceness(run.handle, 0)
        assert capsys.readouterr().out == ""
        pids = ray.get([a.ping.remote() for a in run.handle.actors])
        assert len(set(pids)) == 3
        for pid in pids:
            assert _thread_niceness(pid) == {0}
    finally:
        stop_run(run)
    run = start_run("test-nice-none", 2, num_train=10, niceness=None)
    try:  # Ray's own choice: its task thread at 15 (some of Ray's threads stay at 0)
        assert run_stats(run)["broker_niceness"] == ray_niceness
        assert ray_niceness in _thread_niceness(ray.get(run.broker.ping.remote()))
        _check_niceness(run.handle, 0)  # as when the node refused: the config asked for 0
        assert "warning: the broker runs at niceness 15, not codistill.broker_niceness=0" in capsys.readouterr().out
    finally:
        stop_run(run)


def _take_niceness_as_nobody() -> str:
    """In a forked child at niceness 5 that drops root for user nobody: what take_niceness(0),
    then take_niceness(7), leave it at, and whether it logged why it could not."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            import io
            import logging

            from ray_codistill import priority
            logs = io.StringIO()
            logging.getLogger(priority.__name__).addHandler(logging.StreamHandler(logs))
            os.nice(5 - os.nice(0))  # from wherever the test runs, to 5
            os.setuid(65534)  # nobody: no CAP_SYS_NICE any more
            got = priority.take_niceness(0)
            raised = priority.take_niceness(7)  # raising it needs no right
            os.write(write, f"{got} {raised} {'CAP_SYS_NICE' in logs.getvalue()}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        answer = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return answer


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to drop to another user")
def test_without_the_right_to_lower_its_niceness_a_process_keeps_it_and_warns():
    """Unprivileged, taking a lower niceness fails softly: the process keeps its niceness, logs
    why, and says what it runs at; raising it needs no right."""
    assert _take_niceness_as_nobody() == "5 7 True"
