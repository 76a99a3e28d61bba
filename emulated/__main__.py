"""An emulated Ray cluster on this machine, by hand: bring one up and keep it until Ctrl-C, or
clear what crashed runs left. Needs root (namespaces, veth, tc) and iproute2.

    python -m emulated up --workers 2 --rate-mbit 100    # until Ctrl-C
    python -m emulated down                               # clear leftovers
"""

from __future__ import annotations

import argparse
import signal
import sys

from .cluster import EmulatedCluster
from .netns import IFNAME, clear_leftovers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emulated", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="bring a cluster up, print how to use it, keep it until Ctrl-C")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--rate-mbit", type=float, default=100.0)
    up.add_argument("--head-cpus", type=float, default=1.0)
    up.add_argument("--worker-cpus", type=float, default=1.0)
    sub.add_parser("down", help="clear what crashed earlier runs left (namespaces, processes, temp dirs)")
    args = ap.parse_args(argv)
    if args.command == "down":
        print(f"cleared slot(s): {clear_leftovers() or 'none'}")
        return 0
    cluster = EmulatedCluster(args.workers, args.rate_mbit, args.head_cpus, args.worker_cpus)
    with cluster:
        print(cluster.describe())
        print(f"measured n1 -> n0: {cluster.measure_rate(1, 0):.1f} Mbit/s" if args.workers else "")
        print(f"a driver: ip netns exec {cluster.head.ns} env RAY_AUTH_MODE=token RAY_AUTH_TOKEN={cluster.token} "
              f"GLOO_SOCKET_IFNAME={IFNAME} ray-codistill run configs/smoke.yaml --address {cluster.address}")
        print("Ctrl-C tears it down", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
