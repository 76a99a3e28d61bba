"""An emulated cluster on one machine: real Ray nodes, each in its own network namespace, joined
by rate-shaped links. Infrastructure for tests and benchmarks, kept outside the library package
(not installed with it): the library never imports it (tests/test_packaging.py checks that with
the import system), and what runs on it runs unchanged on a real cluster with `--address`.
docs/multinode.md describes it.

Layout of one cluster (slot k, 0 <= k < MAX_SLOTS, so that several can coexist on a machine):

    namespace rcd<k>-br   bridge `br0` and the bridge ends `v<i>` of every veth pair
    namespace rcd<k>-n<i> node i (0 = head): veth end `rcd0`, address 198.18.<k>.<i+1>/24, lo

Every veth is shaped with `tc ... tbf` at both ends (tbf shapes egress only), so traffic between
two nodes crosses two shaped links. There is no delay emulation (no `netem` in this kernel): rate
only. Nothing is put in the host's own namespace, so the emulated nodes reach each other and
their own loopback only.

- `netns`: namespaces, links, shaping, slots, clearing leftovers (no Ray);
- `cluster`: `EmulatedCluster`, the Ray nodes on them and what tests do with them;
- `__main__`: by hand, from the repository root (a cluster whose owner process is gone, a
  crashed earlier run, is cleared by the next `EmulatedCluster.start()` or by `down`):

    python -m emulated up --workers 2 --rate-mbit 100    # until Ctrl-C
    python -m emulated down                               # clear leftovers

Needs root (namespaces, veth, tc) and iproute2.
"""

from .cluster import LABEL, UNSHAPED_SIZING_MBIT, EmulatedCluster, Node
from .netns import EmulatedClusterError, available, clear_leftovers

__all__ = ["LABEL", "UNSHAPED_SIZING_MBIT", "EmulatedCluster", "EmulatedClusterError", "Node", "available",
           "clear_leftovers"]
