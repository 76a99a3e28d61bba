"""Broker latency, throughput and memory, on a local Ray (prints tables; asserts nothing).

1. Round trip: each of R load actors (separate processes, as replica workers are) plays a replica:
   it publishes the logits of a batch (`batch` x `classes` float16, fire-and-forget, as workers do)
   and then fetches its peers' logits for another batch, waiting for the answer, through the same
   `BrokerClient` workers use. Latency is the time of that pair; p50 / p99 over every pair after
   warm-up; pairs/s is all pairs done by all actors over the wall time of the slowest.
   Rows: classes 10 and 1000, R = 2, 4, 8, each teacher rule of `--rules`
   (`codistill.teacher_rule`: how a fetch makes one teacher of R - 1 peers; `random_peer` reads
   one peer per chunk, so its work per fetch does not grow with R), and broker shards 1, 2, 4
   (R = 2, the default rule).
   Beside them, Ray's own floor on this machine, measured the same way in the same run: the same
   R load actors making the same two calls with the same payloads, through the same client, to
   an actor that does no work (`NoWork`, registered under the broker's name: publish returns at
   once, fetch returns a ready answer of the right shapes), and a no-op call (no arguments, no
   answer) per pair. "x floor" is the broker's p50 over the no-work actor's: what the broker
   costs beyond what two Ray actor calls with these payloads cost here.
2. Memory: one replica publishes every sample of a dataset of N samples x 1000 classes into the
   store (dense, or `--topk` largest logits), over 1, 2 or 4 shards; reported are the bytes the
   store holds (exact) and the resident memory of the broker and shard processes (from /proc),
   per replica that published, against N and shards. ImageNet-1k is N = 1,281,167.

    python benchmarks/broker.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import pandas as pd
import ray
from common import load_average, start_ray

from ray_codistill.broker import NAMESPACE, ExchangeSettings, broker_name, start_broker
from ray_codistill.client import BrokerClient
from ray_codistill.config import TEACHER_RULES
from ray_codistill.fmt import human_bytes, to_markdown

TOKEN = "benchmark"
IMAGENET = 1_281_167


@ray.remote(num_cpus=0, max_concurrency=1)
class NoWork:
    """The broker's two calls, doing nothing: Ray's own cost for them (and a no-op call)."""

    def __init__(self, classes: int) -> None:
        self.classes, self.answers = classes, {}

    def publish(self, replica, token, rank, step, indices, values, classes=None) -> None:
        return None

    def fetch(self, replica, token, indices, step=0):
        n = len(indices)
        if n not in self.answers:  # made once: the answer's bytes, not their making, are timed
            self.answers[n] = (np.zeros((n, self.classes), np.float16), np.ones(n, bool), np.zeros(n, np.int32))
        return self.answers[n]

    def noop(self) -> None:
        return None


@ray.remote(num_cpus=0)
class LoadReplica:
    """Publishes then fetches, `pairs` times, like a replica worker; returns its latencies."""

    def __init__(self, name: str, replica: int, shards: int, num_train: int, classes: int, batch: int,
                 pairs: int, seed: int) -> None:
        self.client = BrokerClient(name, replica, timeout_s=60.0, token=TOKEN, shards=shards)
        rng = np.random.default_rng(seed)
        # made before the clock starts: only broker traffic is timed
        self.batches = [(rng.choice(num_train, batch, replace=False), rng.choice(num_train, batch, replace=False),
                         rng.normal(size=(batch, classes)).astype(np.float16)) for _ in range(pairs)]

    def noop(self, calls: int) -> list[float]:
        """Round trips of a no-op call to the actor the client talks to."""
        latencies = []
        for _ in range(calls):
            t0 = time.perf_counter()
            ray.get(self.client.handle.noop.remote())
            latencies.append(time.perf_counter() - t0)
        return latencies

    def run(self) -> tuple[list[float], float]:
        latencies = []
        start = time.perf_counter()
        for step, (publish_idx, fetch_idx, logits) in enumerate(self.batches):
            t0 = time.perf_counter()
            self.client.publish(np.full(publish_idx.size, step), publish_idx, logits)
            answer = self.client.resolve(self.client.fetch_async(fetch_idx))
            latencies.append(time.perf_counter() - t0)
            assert answer is not None, "the broker did not answer"
        return latencies, time.perf_counter() - start


def round_trip(classes: int, replicas: int, shards: int, rule: str, pairs: int, warmup: int, batch: int,
               num_train: int, floor: bool = False) -> dict:
    """Publish + fetch pairs of R load actors against the broker, or (`floor`) against `NoWork`."""
    name = f"bench-{classes}-{replicas}-{shards}-{rule}-{'floor' if floor else 'broker'}"
    if floor:
        actors_ = [NoWork.options(name=broker_name(name), namespace=NAMESPACE).remote(classes)]
        ray.get(actors_[0].noop.remote())
    else:
        handle = start_broker(ExchangeSettings(name, replicas, num_train, classes, token=TOKEN, shards=shards,
                                               teacher_rule=rule))
        actors_ = handle.actors
    noop = None
    try:
        actors = [LoadReplica.remote(name, r, shards, num_train, classes, batch, warmup + pairs, r)
                  for r in range(replicas)]
        results = ray.get([a.run.remote() for a in actors])
        lat = np.concatenate([np.asarray(lats[warmup:]) for lats, _ in results]) * 1e3
        wall = max(elapsed for _, elapsed in results)
        if floor:
            noop = np.concatenate(ray.get([a.noop.remote(warmup + pairs) for a in actors])) * 1e3
        for a in actors:
            ray.kill(a)
    finally:
        for a in actors_:
            ray.kill(a)
    row = {"logits": f"{batch} x {classes}", "replicas": replicas, "shards": shards,
           "teacher rule": "(no work)" if floor else rule,
           "p50 ms": np.percentile(lat, 50), "p99 ms": np.percentile(lat, 99),
           "pairs/s": replicas * (warmup + pairs) / wall}
    if noop is not None:
        row["no-op call p50 / p99 ms"] = f"{np.percentile(noop, 50):.2f} / {np.percentile(noop, 99):.2f}"
    return row


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def memory(num_train: int, classes: int, shards: int, topk: int | None, chunk: int = 8192) -> dict:
    name = f"bench-mem-{num_train}-{shards}-{topk}"
    handle = start_broker(ExchangeSettings(name, 2, num_train, classes, token=TOKEN, topk=topk, shards=shards))
    try:
        pids = ray.get([a.ping.remote() for a in handle.actors])
        before = sum(_rss(p) for p in pids)
        client = BrokerClient(name, 1, timeout_s=60.0, token=TOKEN, shards=shards)
        rng = np.random.default_rng(0)
        z = rng.normal(size=(chunk, classes)).astype(np.float16)
        if topk:
            classes_ids = np.argsort(-z.astype(np.float32), axis=1)[:, :topk].astype(np.int16)
            values = np.take_along_axis(z, classes_ids, axis=1)
        for lo in range(0, num_train, chunk):
            idx = np.arange(lo, min(lo + chunk, num_train))
            n = idx.size
            if topk:
                client.publish(0, idx, values[:n], classes_ids[:n])
            else:
                client.publish(0, idx, z[:n])
            if lo // chunk % 16 == 15:
                ray.get([a.ping.remote() for a in handle.actors])  # keep the object store from filling
        # asked by this process, so after all its publications (calls from one caller run in order)
        held = handle.memory()["teacher_bytes"]
        after = sum(_rss(p) for p in pids)
    finally:
        handle.stop()
    return {"samples": num_train, "classes": classes, "topk": topk or "all", "shards": shards,
            "store per replica": human_bytes(held), "bytes/sample": held / num_train,
            "RSS growth (all processes)": human_bytes(after - before)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer pairs and a smaller dataset (a few minutes)")
    ap.add_argument("--pairs", type=int, help="timed publish+fetch pairs per replica (default 1000, quick 200)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--num-train", type=int, default=50_000, help="samples in the store for the round trips")
    ap.add_argument("--memory-samples", type=int, nargs="+",
                    help=f"dataset sizes for the memory table (default 128000 {IMAGENET}; quick 128000)")
    ap.add_argument("--topk", type=int, default=10, help="k of the top-k rows of the memory table")
    ap.add_argument("--rules", nargs="+", default=list(TEACHER_RULES), choices=TEACHER_RULES,
                    help="teacher rules of the R = 2, 4, 8 rows (default: all)")
    args = ap.parse_args(argv)
    pairs = args.pairs or (200 if args.quick else 1000)
    warmup = max(20, pairs // 10)
    sizes = args.memory_samples or ([128_000] if args.quick else [128_000, IMAGENET])

    start_ray()
    print(f"# broker benchmark: {platform.node()}, {os.cpu_count()} CPUs, Ray {ray.__version__}, "
          f"Python {platform.python_version()}; load average at start: {load_average()}")
    print(f"command: {' '.join([sys.executable.split('/')[-1], *sys.argv])}\n")

    rows = []
    default = TEACHER_RULES[0]
    grid = [(c, r, 1, rule) for c in (10, 1000) for rule in args.rules for r in (2, 4, 8)]
    grid += [(c, 2, s, default) for c in (10, 1000) for s in (2, 4)]
    floors = {(c, r): None for c in (10, 1000) for r in (2, 8)}  # Ray's floor beside these rows
    for classes, replicas, shards, rule in grid:
        for floor in ([False, True] if shards == 1 and rule == default and (classes, replicas) in floors
                      else [False]):
            rows.append(round_trip(classes, replicas, shards, rule, pairs, warmup, args.batch, args.num_train, floor))
            print(f"  done: {rows[-1]['logits']}, {replicas} replicas, {shards} shard(s), "
                  f"{rows[-1]['teacher rule']} (load average {load_average()})", file=sys.stderr, flush=True)
        if rows[-1]["teacher rule"] == "(no work)":
            broker_row, floor_row = rows[-2], rows[-1]
            floor_row["x floor"] = broker_row["x floor"] = broker_row["p50 ms"] / floor_row["p50 ms"]
    table = pd.DataFrame(rows)
    if "x floor" in table:
        table["x floor"] = table["x floor"].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    table = table.fillna("")
    for col in ("p50 ms", "p99 ms"):
        table[col] = table[col].map(lambda v: f"{v:.2f}")
    table["pairs/s"] = table["pairs/s"].map(lambda v: f"{v:.0f}")
    print(f"## publish + fetch round trip ({pairs} timed pairs per replica after {warmup} warm-up; "
          f"load average at the end: {load_average()})\n")
    print(to_markdown(table) + "\n")

    rows = []
    for n in sizes:
        for shards in (1, 2, 4):
            for topk in (None, args.topk):
                rows.append(memory(n, 1000, shards, topk))
                print(f"  done: memory {n} samples, {shards} shard(s), topk {topk}", file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    table["bytes/sample"] = table["bytes/sample"].map(lambda v: f"{v:.0f}")
    print("## store memory for one replica's logits (1000 classes)\n")
    print(to_markdown(table))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
