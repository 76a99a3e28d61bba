"""Several real Ray nodes on this machine (the emulated cluster, `emulated/` beside the package):
a head holding the broker and one node per replica, each in its own network namespace, joined by
links shaped to 100 Mbit/s. Runs are driven as a user would: `ray-codistill run --address HEAD`
in the head's namespace, and `ray-codistill stats --json --watch` read while they train.

Needs root (namespaces, veth, tc); without it every test here skips, saying why.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from emulated import UNSHAPED_SIZING_MBIT

from conftest import CONFIGS, ROOT
from live import ENDLESS, assert_every_row_once, registered_checkpoints, wait_for

RATE_MBIT = 100.0
PINNED = ["--set", "placement.replica_labels=[{emulated-node: n1}, {emulated-node: n2}]",
          "--set", "placement.broker_labels={emulated-node: n0}"]


def test_without_root_the_reason_is_given(monkeypatch):
    from emulated import netns
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert netns.available() == (False, "network namespaces, veth pairs and tc need root "
                                        "(this process is not root)")


@pytest.fixture(scope="module")
def cluster():
    from emulated import EmulatedCluster, available
    ok, why = available()
    if not ok:
        print(f"\ntest_emulated: skipped, {why}", file=sys.stderr)
        pytest.skip(f"emulated cluster unavailable: {why}")
    c = EmulatedCluster(workers=2, rate_mbit=RATE_MBIT, head_cpus=1, worker_cpus=1)
    c.start()
    try:
        measured = c.measure_rate(1, 0, seconds=1.5)
        print(f"\n{c.describe()}\nmeasured n1 -> n0: {measured:.1f} Mbit/s (configured {RATE_MBIT:g})")
        assert 0.8 * RATE_MBIT < measured < 1.05 * RATE_MBIT, measured  # the links are shaped, both tbf at work
        yield c
    finally:
        c.stop()


def test_links_are_reshaped_while_the_cluster_runs(cluster):
    """`set_rate`: a new rate takes effect at once, None removes the shaping (and the byte counts
    then come from the devices' own counters); the fixture's rate is restored after."""
    try:
        cluster.set_rate(20.0)
        slow = cluster.measure_rate(1, 0, seconds=1.0)
        assert 0.8 * 20 < slow < 1.05 * 20, f"shaped to 20 Mbit/s, measured {slow:.1f}"
        cluster.set_rate(None)
        before = cluster.link_bytes(1)
        fast = cluster.measure_rate(1, 0, seconds=0.5)
        after = cluster.link_bytes(1)
        sent = int(UNSHAPED_SIZING_MBIT * 1e6 / 8 * 0.5)
        print(f"\nunshaped n1 -> n0: {fast:,.0f} Mbit/s")
        assert fast > 5 * RATE_MBIT, f"unshaped, measured {fast:.1f} Mbit/s"
        assert after["out"] - before["out"] >= sent, (before, after, sent)
    finally:
        cluster.set_rate(RATE_MBIT)
    back = cluster.measure_rate(1, 0, seconds=1.0)
    assert 0.8 * RATE_MBIT < back < 1.05 * RATE_MBIT, f"shaped to {RATE_MBIT:g} Mbit/s again, measured {back:.1f}"


def _all_nodes_up(cluster) -> None:
    """Start again any worker node an earlier test left killed."""
    down = [n.index for n in cluster.nodes[1:] if n.proc is None or n.proc.poll() is not None]
    for i in down:
        cluster.restart_node(i)
    if down:
        cluster.wait_for_nodes(len(cluster.nodes), timeout_s=120)


def _run_args(cluster, tmp_path, name: str, *sets: str) -> list[str]:
    return ["run", str(CONFIGS / "smoke.yaml"), "--address", cluster.address, "--storage", str(tmp_path),
            "--name", name, *PINNED, *[a for s in sets for a in ("--set", s)]]


class Watcher:
    """`ray-codistill stats NAME --json --watch` in the head's namespace; keeps every document."""

    def __init__(self, cluster, name: str):
        self.docs: list[tuple[float, dict]] = []
        self.cond = threading.Condition()
        self.cluster, self.name = cluster, name
        self.proc = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while True:  # the broker appears seconds after the driver starts: start again until it answers
            self.proc = self.cluster.popen_in(0, [sys.executable, "-m", "ray_codistill.cli", "stats", self.name,
                                                  "--json", "--watch", "0.5", "--address", self.cluster.address],
                                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            for line in self.proc.stdout:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                with self.cond:
                    self.docs.append((time.time(), doc))
                    self.cond.notify_all()
            self.proc.wait()
            with self.cond:
                if self.docs and self.docs[-1][1]["status"] != "running" or getattr(self, "stopped", False):
                    return
                if self.docs:  # it lost the broker for a moment (a slow answer): watch on
                    continue
            time.sleep(1)

    def wait(self, ready, what: str, timeout_s: float = 300) -> dict:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for _, doc in reversed(self.docs):
                    if ready(doc):
                        return doc
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"stats never showed {what}; last: {self.docs[-1][1] if self.docs else None}")
                self.cond.wait(timeout=min(left, 5))

    def stop(self):
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


def _nodes_of(doc: dict) -> dict[str, set]:
    return {r: {w["node_id"] for w in s["workers"].values()} for r, s in doc["replicas"].items()}


def _stop(cluster, name: str) -> None:
    """`ray-codistill stop NAME` from the head's namespace: the runs here train until the test has
    seen what it waits for, so nothing it waits for can be skipped by a run that ended first."""
    out = cluster.run_in(0, [sys.executable, "-m", "ray_codistill.cli", "stop", name, "--address", cluster.address],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "stopping" in out.stdout, out.stderr[-2000:]


def _drive(cluster, tmp_path, name: str, *sets: str) -> subprocess.Popen:
    return cluster.popen_in(0, [sys.executable, "-m", "ray_codistill.cli", *_run_args(cluster, tmp_path, name, *sets)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run_until_stopped(cluster, tmp_path, name: str, sets: list[str], ready, what: str) -> tuple[dict, int, str]:
    """Drive a run from the head, wait until `stats` shows `ready`, stop it; returns the stats
    seen then, the driver's exit status and its output."""
    driver = _drive(cluster, tmp_path, name, *sets)
    watcher = Watcher(cluster, name)
    try:
        live = watcher.wait(ready, what)
        _stop(cluster, name)
        out, _ = driver.communicate(timeout=600)
    finally:
        watcher.stop()
        if driver.poll() is None:
            driver.kill()
    return live, driver.returncode, out


def test_codistill_replicas_run_on_their_nodes_and_exchange_over_the_links(cluster, tmp_path):
    _all_nodes_up(cluster)
    ids = {name: nid for nid, name in cluster.node_ids().items()}
    before = {i: cluster.link_bytes(i) for i in (1, 2)}
    live, code, out = _run_until_stopped(
        cluster, tmp_path, "emu-codistill", [f"steps={ENDLESS}"],
        lambda d: all(s["workers"] and s["hits"] > 0 and s["step"] >= 300 for s in d["replicas"].values()),
        "both replicas placed, 300 steps each, teachers served to both")
    assert code == 0, out[-3000:]
    after = {i: cluster.link_bytes(i) for i in (1, 2)}

    # each replica on its own node (node ids from `stats`), the broker on the head
    assert _nodes_of(live) == {"0": {ids["n1"]}, "1": {ids["n2"]}}
    assert live["broker_node"]["node_id"] == ids["n0"]
    summary = json.loads((tmp_path / "emu-codistill" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["replica_status"] == {"0": "stopped", "1": "stopped"}
    assert all(r["steps"] >= 300 and r["test_acc"] > 0.5 for r in summary["replicas"])
    # the teachers went through the broker on the head, so over each replica's link, both ways
    for i, r in ((1, "0"), (2, "1")):
        sent, got = after[i]["out"] - before[i]["out"], after[i]["in"] - before[i]["in"]
        assert sent >= 0.9 * summary["broker"][r]["bytes_in"], (i, sent, summary["broker"][r])  # publications
        assert got >= 0.9 * summary["broker"][r]["bytes_out"], (i, got, summary["broker"][r])  # teachers
        assert summary["broker"][r]["bytes_out"] > 0 and summary["broker"][r]["bytes_in"] > 0
    metrics = pd.read_parquet(tmp_path / "emu-codistill" / "metrics.parquet")
    assert metrics.groupby("replica")["step"].max().to_dict() == {r["replica"]: r["steps"] for r in summary["replicas"]}


def test_allreduce_workers_one_per_node_allreduce_over_the_links(cluster, tmp_path):
    _all_nodes_up(cluster)
    ids = {name: nid for nid, name in cluster.node_ids().items()}
    before = {i: cluster.link_bytes(i) for i in (1, 2)}
    live, code, out = _run_until_stopped(
        cluster, tmp_path, "emu-allreduce", ["method=allreduce", f"steps={ENDLESS}"],
        lambda d: len(d["replicas"]["0"]["workers"]) == 2 and d["replicas"]["0"]["step"] >= 200,
        "both all-reduce workers, 200 steps")
    assert code == 0, out[-3000:]
    after = {i: cluster.link_bytes(i) for i in (1, 2)}

    workers = live["replicas"]["0"]["workers"]
    assert {workers["0"]["node_id"], workers["1"]["node_id"]} == {ids["n1"], ids["n2"]}
    summary = json.loads((tmp_path / "emu-allreduce" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["replicas"][0]["steps"] >= 200
    assert summary["replicas"][0]["test_acc"] > 0.5
    # gloo's ring went through the shaped links (GLOO_SOCKET_IFNAME), not loopback: each link carried
    # at least its worker's share of the all-reduced gradient bytes, each way
    # (a ring of two: each worker sends about the gradient bytes once per step; seen here: 0.74x the
    # count of the comm hook, which counts the buckets rank 0 hands to DDP)
    grads = summary["allreduce_bytes"]
    assert grads > 0
    for i in (1, 2):
        assert after[i]["out"] - before[i]["out"] >= 0.5 * grads, (i, after[i], before[i], grads)
        assert after[i]["in"] - before[i]["in"] >= 0.5 * grads, (i, after[i], before[i], grads)


LOSS_RUN = {"steps": ENDLESS, "checkpoint_every": 500, "replica_max_failures": 1, "node_wait_s": 300,
            "log_every": 50, "eval_every": 5000, "codistill.probe_every": 1000, "codistill.probe_size": 64}


def _sets(run: dict) -> list[str]:
    return [f"{k}={v}" for k, v in run.items()]


def _restart_step(doc: dict, replica: int) -> int | None:
    steps = [e["step"] for e in doc["events"] if e["event"] == "restarted" and e["replica"] == replica]
    return steps[-1] if steps else None


def test_a_lost_node_comes_back_and_its_replica_resumes_from_its_checkpoint(cluster, tmp_path):
    """Node n2 (replica 1's; replica 0 is on n1) is killed whole, then started again: replica 0
    trains on through the outage; replica 1 comes back from its checkpoint on the new n2; every
    step is logged once. The run trains until the test stops it; n2 is killed once Ray Train has
    registered a checkpoint of replica 1 (its checkpoint manager's snapshot on the shared storage)."""
    name, timeline = "emu-loss", {}
    _all_nodes_up(cluster)
    driver = _drive(cluster, tmp_path, name, *_sets(LOSS_RUN))
    watcher = Watcher(cluster, name)
    try:
        ids = {n: nid for nid, n in cluster.node_ids().items()}
        registered = wait_for("a registered checkpoint of replica 1",
                              lambda: registered_checkpoints(tmp_path / name, f"{name}-r1"),
                              alive=lambda: driver.poll() is None)
        at_kill = watcher.wait(lambda d: d["replicas"]["1"]["step"] >= max(registered), "stats past the checkpoint")
        cluster.kill_node(2)
        timeline["kill"] = time.time()
        r0_at_kill = at_kill["replicas"]["0"]["step"]
        timeline["r0_step_at_kill"], timeline["r1_step_at_kill"] = r0_at_kill, at_kill["replicas"]["1"]["step"]
        # while n2 is down, replica 0 advances (an event, not a sleep) and Ray sees the node gone
        watcher.wait(lambda d: d["replicas"]["0"]["step"] >= r0_at_kill + 500, "replica 0 advancing while n2 is down")
        cluster.wait_for_nodes(2, timeout_s=120)
        timeline["node_dead_seen"] = time.time()
        timeline["r0_step_at_restart"] = watcher.docs[-1][1]["replicas"]["0"]["step"]
        cluster.restart_node(2)
        cluster.wait_for_nodes(3, timeout_s=120)
        timeline["node_back"] = time.time()
        new_ids = {n: nid for nid, n in cluster.node_ids().items()}
        back = watcher.wait(lambda d: d["replicas"]["1"]["restarts"] >= 1 and d["replicas"]["1"]["workers"]
                            and d["replicas"]["1"]["workers"]["0"]["node_id"] == new_ids["n2"]
                            and d["replicas"]["1"]["step"] > _restart_step(d, 1) + LOSS_RUN["log_every"],
                            "replica 1 restarted on the new n2 and training")
        _stop(cluster, name)
        out, _ = driver.communicate(timeout=600)
        timeline["finish"] = time.time()
    finally:
        watcher.stop()
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-4000:]
    assert new_ids["n2"] != ids["n2"]  # a new Ray node on the same address
    assert back["replicas"]["0"]["workers"]["0"]["node_id"] == ids["n1"] and back["replicas"]["0"]["restarts"] == 0

    folder = tmp_path / name
    summary = json.loads((folder / "summary.json").read_text())
    metrics = pd.read_parquet(folder / "metrics.parquet")
    assert summary["status"] == "stopped" and summary["restarts"] == {"0": 0, "1": 1}
    restart, = [e for e in summary["events"] if e["event"] == "restarted"]
    timeline["restart_event"], timeline["restart_step"] = restart["time"], restart["step"]
    assert restart["replica"] == 1 and restart["time"] > timeline["node_back"] - 1
    # from the newest checkpoint registered before the kill (or a newer one), not from scratch
    assert restart["step"] % LOSS_RUN["checkpoint_every"] == 0 and restart["step"] >= max(registered) > 0
    assert_every_row_once(metrics, summary, LOSS_RUN["log_every"], LOSS_RUN["eval_every"])

    # replica 0 during the outage (kill -> replica 1's restart) against before the kill, in whole
    # checkpoint periods (a checkpoint costs about 2 s here, more than the period's steps)
    r0 = metrics[metrics["replica"] == 0].sort_values("timestamp")
    outage = r0[(r0["timestamp"] > timeline["kill"]) & (r0["timestamp"] < restart["time"])]
    assert len(outage) > 0
    marks = r0[r0["step"] % LOSS_RUN["checkpoint_every"] == 0][["step", "timestamp"]].values.tolist()
    periods = [(t0, t1, s1 - s0) for (s0, t0), (s1, t1) in zip(marks, marks[1:])]
    rate = lambda ps: sum(p[2] for p in ps) / sum(p[1] - p[0] for p in ps) if ps else None  # noqa: E731
    gaps = outage["timestamp"].diff().dropna()
    timeline.update(r0_steps_during_outage=int(outage["step"].max() - timeline["r0_step_at_kill"]),
                    r0_steps_per_s_before=rate([p for p in periods if p[1] <= timeline["kill"]]),
                    r0_steps_per_s_outage=rate([p for p in periods if p[0] >= timeline["kill"]
                                                and p[1] <= restart["time"]]),
                    r0_longest_gap_s=float(gaps.max()) if len(gaps) else None)
    t0 = timeline["kill"]
    print("\nnode-loss timeline (s after the kill): " + json.dumps(
        {k: (round(v - t0, 1) if k in ("node_dead_seen", "node_back", "restart_event", "finish") else
             (round(v, 1) if isinstance(v, float) and k != "kill" else v)) for k, v in timeline.items() if k != "kill"}))
    assert timeline["r0_longest_gap_s"] is None or timeline["r0_longest_gap_s"] < 15  # no pause


def test_a_node_that_never_comes_back_fails_its_replica_and_keeps_the_others_results(cluster, tmp_path):
    """n2 killed for good: after node_wait_s replica 1 is marked failed, replica 0's results are
    written (stopped by the test once it trained on past the kill), and the exit status is 1."""
    _all_nodes_up(cluster)
    name, run = "emu-lost", {**LOSS_RUN, "node_wait_s": 10}
    driver = _drive(cluster, tmp_path, name, *_sets(run))
    watcher = Watcher(cluster, name)
    try:
        at_kill = watcher.wait(lambda d: d["replicas"]["1"]["step"] >= 500, "replica 1 past step 500")
        cluster.kill_node(2)
        killed = time.time()
        watcher.wait(lambda d: d["replicas"]["0"]["step"] >= at_kill["replicas"]["0"]["step"] + 500,
                     "replica 0 training on after the kill")
        _stop(cluster, name)  # replica 0 stops at its next row; replica 1 fails after node_wait_s
        out, _ = driver.communicate(timeout=600)
        ended = time.time()
    finally:
        watcher.stop()
        if driver.poll() is None:
            driver.kill()
    print(f"\nnode never back: run ended {ended - killed:.1f}s after the kill (node_wait_s 10), exit {driver.returncode}")
    assert driver.returncode == 1, out[-4000:]
    assert "replica 1 FAILED" in out and "results of the replicas that finished" in out, out[-4000:]
    folder = tmp_path / name
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["replica_status"] == {"0": "stopped", "1": "failed"}
    assert "1" in summary["errors"]
    survivor, = summary["replicas"]
    assert survivor["replica"] == 0 and survivor["steps"] > at_kill["replicas"]["0"]["step"]
    assert survivor["test_acc"] > 0.5
    metrics = pd.read_parquet(folder / "metrics.parquet")
    assert_every_row_once(metrics[metrics["replica"] == 0], summary, run["log_every"], run["eval_every"])
    assert metrics[metrics["replica"] == 1]["step"].max() >= 500  # the lost replica's rows are kept too
