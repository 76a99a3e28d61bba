"""Ray on the emulated network: a head and worker nodes, each `ray start --block` inside its own
namespace (`emulated.netns`), and what tests and benchmarks do with them: run a driver in a
node's namespace, list the nodes Ray sees, lose a whole node and start it again, reshape the
links, count the bytes through them and measure their rate.

Each node is `ray start --block` in a process group of its own, with its own `--temp-dir`,
`--node-ip-address`, `--num-cpus`, the label `emulated-node=n<i>`, and the same
`RAY_AUTH_MODE=token` / `RAY_AUTH_TOKEN` as every client; `GLOO_SOCKET_IFNAME=rcd0` makes
torch.distributed use the shaped link rather than loopback. Teardown kills only the processes
inside the cluster's own namespaces and deletes only its own namespaces.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .netns import (IFNAME, PREFIX, EmulatedClusterError, available, burst_bytes, claim_slot, clear_leftovers,
                    clear_slot, kill_namespace_processes, sh, wait_namespace_empty)

LABEL = "emulated-node"
GCS_PORT = 6379  # every node has its own network stack, so the default ports never clash
UNSHAPED_SIZING_MBIT = 4000  # measure_rate on an unshaped link sends what 4 Gbit/s would carry


@dataclass
class Node:
    index: int
    ns: str
    ip: str
    num_cpus: float
    temp_dir: str
    labels: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    up: bool = False  # started and not killed on purpose
    starts: int = 0  # `ray start` launches since the last kill

    @property
    def name(self) -> str:
        return f"n{self.index}"


class EmulatedCluster:
    """A head and `workers` worker nodes, each in its own namespace, every link shaped to `rate_mbit`.

    Use as a context manager, or `start()` / `stop()`. `env` is what a client needs (token auth);
    `run_in(node, cmd)` runs a command inside a node's namespace with it, as a user on that
    machine would (a driver must run in a node's namespace: the host's has no route to the nodes).
    """

    def __init__(self, workers: int = 2, rate_mbit: float | None = 100.0, head_cpus: float = 1.0,
                 worker_cpus: float = 1.0, object_store_mb: int = 300, resources: dict | None = None,
                 extra_env: dict | None = None):
        if not 0 <= workers <= 250:
            raise ValueError(f"workers: got {workers}, must be in [0, 250]")
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError(f"rate_mbit: got {rate_mbit}, must be > 0 (None: unshaped)")
        self.workers, self.rate_mbit = workers, rate_mbit
        self.head_cpus, self.worker_cpus, self.object_store_mb = head_cpus, worker_cpus, object_store_mb
        self.resources = resources or {}  # node index -> {custom resource: amount}
        self.extra_env = extra_env or {}
        self.slot: int | None = None
        self.nodes: list[Node] = []
        self.token = secrets.token_hex(32)
        self.measured_mbit: float | None = None  # set by measure_rate(): what a TCP transfer carried

    # -- names -------------------------------------------------------------------------------------
    @property
    def bridge_ns(self) -> str:
        return f"{PREFIX}{self.slot}-br"

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def env(self) -> dict:
        """The environment of every node and client: this interpreter's venv first on PATH (Ray
        starts workers with the `python` it finds), token auth, gloo on the shaped link."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "GLOO_SOCKET_IFNAME": IFNAME,
                    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", **self.extra_env})
        return env

    # -- bring-up ----------------------------------------------------------------------------------
    def start(self, timeout_s: float = 180) -> "EmulatedCluster":
        ok, why = available()
        if not ok:
            raise EmulatedClusterError(why)
        clear_leftovers()
        self.slot = claim_slot()
        try:
            self._network()
            self.nodes = [self._node(i) for i in range(self.workers + 1)]
            self._start_node(self.head)
            self.wait_for_nodes(1, timeout_s)
            for node in self.nodes[1:]:
                self._start_node(node)
            self.wait_for_nodes(len(self.nodes), timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _node(self, i: int) -> Node:
        return Node(index=i, ns=f"{PREFIX}{self.slot}-n{i}", ip=f"198.18.{self.slot}.{i + 1}",
                    num_cpus=self.head_cpus if i == 0 else self.worker_cpus,
                    temp_dir=f"/tmp/{PREFIX}{self.slot}n{i}",  # short: Ray's socket paths have a length limit
                    labels={LABEL: f"n{i}"}, resources=dict(self.resources.get(i, {})))

    def _network(self) -> None:
        br = self.bridge_ns
        sh("ip", "netns", "add", br)
        sh("ip", "link", "set", "lo", "up", ns=br)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=br)
        sh("ip", "link", "set", "br0", "up", ns=br)
        for i in range(self.workers + 1):
            ns = f"{PREFIX}{self.slot}-n{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
            # made in the bridge namespace, the node end moved into the node's: nothing in the host's
            sh("ip", "link", "add", f"v{i}", "type", "veth", "peer", "name", IFNAME, "netns", ns, ns=br)
            sh("ip", "link", "set", f"v{i}", "master", "br0", ns=br)
            sh("ip", "link", "set", f"v{i}", "up", ns=br)
            sh("ip", "addr", "add", f"198.18.{self.slot}.{i + 1}/24", "dev", IFNAME, ns=ns)
            sh("ip", "link", "set", IFNAME, "up", ns=ns)
        self.set_rate(self.rate_mbit)

    def _link_ends(self):
        """(device, namespace) of both ends of every node's link: tbf shapes egress, so both."""
        for i in range(self.workers + 1):
            yield IFNAME, f"{PREFIX}{self.slot}-n{i}"
            yield f"v{i}", self.bridge_ns

    def set_rate(self, rate_mbit: float | None) -> None:
        """Shape every link to `rate_mbit` each way (tbf at both ends), or None: unshaped (no
        qdisc: the veth's own speed, gigabits per second here). Works while the cluster runs."""
        if rate_mbit is not None and rate_mbit <= 0:
            raise ValueError(f"rate_mbit: got {rate_mbit}, must be > 0 (None: unshaped)")
        for dev, ns in self._link_ends():
            if rate_mbit is None:
                sh("tc", "qdisc", "del", "dev", dev, "root", ns=ns, check=False)  # none there: fine
            else:
                sh("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                    "burst", str(burst_bytes(rate_mbit)), "latency", "50ms", ns=ns)
        self.rate_mbit, self.measured_mbit = rate_mbit, None

    def _start_node(self, node: Node) -> None:
        ray = str(Path(sys.executable).with_name("ray"))
        cmd = [ray, "start", "--block", f"--node-ip-address={node.ip}", f"--num-cpus={node.num_cpus:g}",
               f"--temp-dir={node.temp_dir}", f"--object-store-memory={self.object_store_mb * 2**20}",
               "--labels=" + ",".join(f"{k}={v}" for k, v in node.labels.items()), "--disable-usage-stats"]
        if node.resources:
            cmd.append("--resources=" + json.dumps(node.resources))
        if node.index == 0:
            cmd += ["--head", f"--port={GCS_PORT}", "--include-dashboard=false"]
        else:
            cmd.append(f"--address={self.address}")
        node.up, node.starts = True, node.starts + 1
        log = open(f"{node.temp_dir}.log", "ab")
        node.proc = subprocess.Popen(["ip", "netns", "exec", node.ns, *cmd], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    # -- using it ----------------------------------------------------------------------------------
    def run_in(self, node: int, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        """Run `cmd` in node `node`'s namespace with the cluster's client environment."""
        kwargs.setdefault("env", self.env)
        return subprocess.run(["ip", "netns", "exec", self.nodes[node].ns, *cmd], **kwargs)

    def popen_in(self, node: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        kwargs.setdefault("env", self.env)
        return subprocess.Popen(["ip", "netns", "exec", self.nodes[node].ns, *cmd], **kwargs)

    def python_in(self, node: int, code: str, timeout_s: float = 120) -> str:
        out = self.run_in(node, [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            raise EmulatedClusterError(f"python in {self.nodes[node].ns} failed: {out.stderr.strip()[-2000:]}")
        return out.stdout

    def _nodes_code(self, count: int | None, timeout_s: float) -> str:
        # one process polls in a loop: an interpreter that imports Ray costs seconds of CPU
        return (f"import json, time, ray; ray.init(address={self.address!r}, logging_level='ERROR', "
                "log_to_driver=False, configure_logging=False)\n"
                f"deadline = time.monotonic() + {timeout_s}\n"
                "while True:\n"
                "    alive = [{'node_id': n['NodeID'], 'ip': n['NodeManagerAddress'], 'labels': n.get('Labels', {}), "
                "'resources': n['Resources']} for n in ray.nodes() if n['Alive']]\n"
                f"    if {count!r} is None or len(alive) == {count!r} or time.monotonic() > deadline:\n"
                "        break\n"
                "    time.sleep(0.5)\n"
                "print('RCDNODES', json.dumps(alive))\n")

    def ray_nodes(self, count: int | None = None, timeout_s: float = 0) -> list[dict]:
        """Alive Ray nodes as the head sees them: `{node_id, ip, labels, resources}` (with `count`:
        once that many are alive, or after `timeout_s`)."""
        out = self.python_in(0, self._nodes_code(count, timeout_s), timeout_s=timeout_s + 120)
        line, = [ln for ln in out.splitlines() if ln.startswith("RCDNODES ")]  # Ray may print on stdout too
        return json.loads(line[len("RCDNODES "):])

    def wait_for_nodes(self, count: int, timeout_s: float = 180) -> list[dict]:
        """Wait until exactly `count` nodes are alive (a dead node leaves the list within Ray's
        health-check period, about 15 s). A worker node's `ray start` that exits on its own (a port
        still held by its predecessor, say) is started again, twice at most."""
        deadline = time.monotonic() + timeout_s
        last: list = []
        error = ""
        while time.monotonic() < deadline:
            head = self.head.proc
            if head is not None and head.poll() is not None:
                raise EmulatedClusterError(f"the head's `ray start` exited ({head.returncode}): "
                                           f"{self._log_tail(self.head)}")
            for node in self.nodes[1:]:
                if node.up and node.proc is not None and node.proc.poll() is not None:
                    if node.starts >= 3:
                        raise EmulatedClusterError(f"{node.name}'s `ray start` exited {node.starts} times: "
                                                   f"{self._log_tail(node)}")
                    self._start_node(node)
            try:
                last = self.ray_nodes(count, max(1.0, min(15.0, deadline - time.monotonic())))
            except (EmulatedClusterError, subprocess.TimeoutExpired, ValueError) as err:
                last, error = [], str(err)[-500:]  # the head is not up yet, or Ray is slow to answer
                time.sleep(1)
            if len(last) == count:
                return last
        raise EmulatedClusterError(f"{count} alive node(s) expected within {timeout_s:.0f}s, saw "
                                   f"{[n['ip'] for n in last]}; last error: {error or 'none'}")

    @staticmethod
    def _log_tail(node: Node, chars: int = 1500) -> str:
        try:
            return Path(f"{node.temp_dir}.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def node_ids(self) -> dict[str, str]:
        """Ray node id -> emulated node name (`n0` is the head)."""
        return {n["node_id"]: n["labels"].get(LABEL, "?") for n in self.ray_nodes()}

    def kill_node(self, index: int) -> None:
        """A whole machine lost: SIGKILL every process of node `index` (its namespace holds only them)."""
        if index == 0:
            raise ValueError("the head runs the driver; kill a worker node")
        node = self.nodes[index]
        node.up, node.starts = False, 0
        kill_namespace_processes(node.ns)
        wait_namespace_empty(node.ns)
        if node.proc is not None:
            node.proc.wait(timeout=30)

    def restart_node(self, index: int) -> None:
        """Start node `index` again (a fresh temp dir: a new Ray node on the same address)."""
        node = self.nodes[index]
        shutil.rmtree(node.temp_dir, ignore_errors=True)
        self._start_node(node)

    def link_bytes(self, index: int) -> dict:
        """Bytes sent so far through node `index`'s link: `out` (node egress) and `in` (the bridge
        end's egress, i.e. towards the node). From the tbf qdiscs' counters (`tc -s`) when the
        link is shaped, else from the devices' own (`ip -s link`); each counts from when its
        qdisc or device was made, so take differences within one rate."""
        def sent(dev: str, ns: str) -> int:
            text = sh("tc", "-s", "qdisc", "show", "dev", dev, ns=ns)
            match = re.search(r"tbf.*?Sent (\d+) bytes", text, re.S)
            if match:
                return int(match.group(1))
            link, = json.loads(sh("ip", "-j", "-s", "link", "show", "dev", dev, ns=ns))
            return int(link["stats64"]["tx"]["bytes"])
        return {"out": sent(IFNAME, self.nodes[index].ns), "in": sent(f"v{index}", self.bridge_ns)}

    def measure_rate(self, src: int = 1, dst: int = 0, seconds: float = 2.0) -> float:
        """Mbit/s of a plain TCP transfer from node `src` to node `dst` (through both shaped links)."""
        port = 5201
        nbytes = int((self.rate_mbit or UNSHAPED_SIZING_MBIT) * 1e6 / 8 * seconds)
        server = self.popen_in(dst, [sys.executable, "-c", _RECEIVER, self.nodes[dst].ip, str(port), str(nbytes)],
                               stdout=subprocess.PIPE, text=True)
        try:
            self.run_in(src, [sys.executable, "-c", _SENDER, self.nodes[dst].ip, str(port), str(nbytes)],
                        check=True, timeout=seconds * 20 + 30)
            out, _ = server.communicate(timeout=seconds * 20 + 30)
        finally:
            if server.poll() is None:
                server.kill()
        self.measured_mbit = float(out.strip())
        return self.measured_mbit

    # -- teardown ----------------------------------------------------------------------------------
    def stop(self) -> None:
        if self.slot is None:
            return
        for node in reversed(self.nodes):  # workers first, then the head
            if node.proc is not None and node.proc.poll() is None:
                try:
                    os.killpg(node.proc.pid, signal.SIGTERM)  # --block takes its Ray processes down
                    node.proc.wait(timeout=5)  # then SIGKILL: the namespaces go anyway
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
        clear_slot(self.slot)  # whatever is left in the namespaces, the namespaces, the temp dirs
        for node in self.nodes:
            Path(f"{node.temp_dir}.log").unlink(missing_ok=True)
        self.slot = None

    def __enter__(self) -> "EmulatedCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        lines = [f"emulated Ray cluster (slot {self.slot}): head {self.address}, links shaped to "
                 + (f"{self.rate_mbit:g} Mbit/s each way (tbf at both ends)" if self.rate_mbit else "nothing (unshaped)")
                 + (f", measured {self.measured_mbit:.1f} Mbit/s" if self.measured_mbit else "")]
        for n in self.nodes:
            lines.append(f"  {n.name}: namespace {n.ns}, ip {n.ip}, {n.num_cpus:g} CPU, labels {n.labels}"
                         + (f", resources {n.resources}" if n.resources else ""))
        return "\n".join(lines)


_RECEIVER = """
import socket, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); srv.bind((ip, port)); srv.listen(1)
srv.settimeout(60)
conn, _ = srv.accept(); got = 0; start = None; first = 0
while got < n:
    chunk = conn.recv(1 << 20)
    if not chunk:
        break
    if start is None:  # the clock starts at the first read; what it returned had come in before
        start, first = time.perf_counter(), len(chunk)
    got += len(chunk)
print((got - first) * 8 / (time.perf_counter() - start) / 1e6)
"""

_SENDER = """
import socket, sys, time
ip, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for attempt in range(100):
    try:
        s = socket.create_connection((ip, port), timeout=60); break
    except OSError:
        time.sleep(0.1)
buf = b"\\0" * (1 << 20); sent = 0
while sent < n:
    sent += s.send(buf[: min(len(buf), n - sent)])
s.close()
"""
