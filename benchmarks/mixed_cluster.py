"""A large and a small model codistilled on the emulated cluster, each on its own node
(docs/results-mixed.md, "On a cluster").

Needs root (network namespaces, veth, tc). Starts a 3-node Ray cluster on this machine (the head n0
holds the broker and the driver, n1 and n2 one CPU each, links shaped to --rate-mbit), runs one
codistillation of a large model (replica 0, on n1) and a small one (replica 1, on n2) through
`ray-codistill run --address`, prints `ray-codistill stats NAME` once both replicas are past half
their steps, then each replica's final figures from `summary.json`. Tears everything down.

    sudo .venv/bin/python benchmarks/mixed_cluster.py [--config configs/mnist1d.yaml]
        [--large model.channels=25] [--small model.channels=6] [--rate-mbit 100] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from common import (REPO, Clock, add_pair_options, command, experiment_parser, load_average, machine, out_folder,
                    pair_of)

from ray_codistill.config import load_config
from ray_codistill.fmt import markdown_table

sys.path.insert(0, str(REPO))  # the emulated cluster: in the checkout, beside the package (not installed)
from emulated import EmulatedCluster, available  # noqa: E402

NAME = "mixed-cluster"


def _cli(cluster: EmulatedCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return cluster.run_in(0, [sys.executable, "-m", "ray_codistill.cli", *args, "--address", cluster.address],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _stats(cluster: EmulatedCluster) -> dict | None:
    out = _cli(cluster, "stats", NAME, "--json")
    try:
        return json.loads(out.stdout) if out.returncode == 0 else None
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__)
    add_pair_options(parser)
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="each link's rate (default: 100)")
    parser.add_argument("--timeout", type=float, default=1200, help="give up after this many seconds")
    args = parser.parse_args(argv)
    ok, why = available()
    if not ok:
        print(f"mixed_cluster: {why}", file=sys.stderr)
        return 2
    large, small = pair_of(args)
    overrides = "[" + ", ".join("{" + ", ".join(f"{k}: {v}" for k, v in m.items()) + "}" for m in (large, small)) + "]"
    out = out_folder(args.out, "mixed-cluster")
    clock = Clock()
    print(f"machine: {machine()}; {load_average()}")
    print(f"command: {command()}")
    sets = [f"replica_overrides={overrides}", "placement.replica_labels=[{emulated-node: n1}, {emulated-node: n2}]",
            *args.set]
    steps = load_config(args.config, sets).steps  # refused here, before the cluster starts, if bad
    print(f"config: {args.config}; {' '.join(sets)}; links {args.rate_mbit:g} Mbit/s; results in {out}", flush=True)
    with EmulatedCluster(workers=2, rate_mbit=args.rate_mbit, head_cpus=1, worker_cpus=1) as cluster:
        print(f"[{clock}] cluster up: {cluster.describe()}", flush=True)
        driver = cluster.popen_in(0, [sys.executable, "-m", "ray_codistill.cli", "run", args.config, "--address",
                                      cluster.address, "--storage", str(out), "--name", NAME, "--overwrite",
                                      *[a for s in sets for a in ("--set", s)]],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline, shown = time.monotonic() + args.timeout, False
        while driver.poll() is None and time.monotonic() < deadline:
            doc = _stats(cluster)
            if not shown and doc and doc.get("replicas") and all(
                    r["step"] and r["step"] >= steps // 2 for r in doc["replicas"].values()):
                print(f"\n[{clock}] `ray-codistill stats {NAME}` at half way:\n")
                print(_cli(cluster, "stats", NAME).stdout, flush=True)
                shown = True
            time.sleep(2)  # a poll of a run in progress, not a wait on its result: the driver's exit ends it
        if driver.poll() is None:
            driver.kill()
            print(f"mixed_cluster: the run did not end within {args.timeout:g} s", file=sys.stderr)
            return 1
        log = driver.stdout.read()
        if driver.returncode != 0:
            print(log[-4000:], file=sys.stderr)
            return driver.returncode
        nodes = cluster.node_ids()
    summary = json.loads((out / NAME / "summary.json").read_text())
    print(f"\n[{clock}] finished in {summary['wall_time_s']:.0f} s; {load_average()}\n")
    rows = [[r["replica"], r["model"], f"{r['params']:,}", f"{100 * r['test_acc']:.1f}",
             ", ".join(f"peer {p}: {a:.1f}" for p, a in (summary["broker"][str(r["replica"])].get("age_by_peer") or {}).items())]
            for r in summary["replicas"]]
    print(markdown_table(["replica", "model", "params", "test acc (%)", "mean teacher age by peer (steps)"], rows))
    print(f"\nensemble test acc {100 * summary['ensemble_test_acc']:.1f} %; Ray nodes: {sorted(nodes.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
