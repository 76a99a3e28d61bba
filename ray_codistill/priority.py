"""The CPU priority of the broker's actors.

Ray starts every worker process, actors included, at niceness 15 (its `worker_niceness`), below
its own daemons (0). The broker and its shards would then compete for cores on equal terms with
the training workers they serve: on a node whose cores the replicas keep busy, a fetch waits for
the OS to give the broker a core (measured on 2 cores and 8 replicas, `benchmarks/broker_calls.py`:
the broker's execution of a fetch took 6 ms of wall time for 0.6 ms of CPU; 2 ms at niceness 0).
The broker's work is small and on every replica's path, so it asks for the daemons' priority
(`codistill.broker_niceness`, default 0).

Lowering a niceness needs CAP_SYS_NICE (root; in a container running as root, `docker run
--cap-add SYS_NICE`) or a matching RLIMIT_NICE; without it the process keeps Ray's niceness and
says so.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def _threads() -> list[int]:
    """The ids of this process's threads (Linux keeps a niceness per thread), or [0] (the process)."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: setpriority(PRIO_PROCESS, 0) covers the process
        return [0]


def niceness() -> int:
    """The niceness of the calling thread (the one an actor with max_concurrency=1 runs tasks on)."""
    return os.getpriority(os.PRIO_PROCESS, 0)


def take_niceness(target: int | None) -> int:
    """Run every thread of this process at niceness `target` (None: leave it) when allowed, and
    return the niceness this thread runs at. Threads started later inherit it from their creator."""
    if target is None:
        return niceness()
    for tid in _threads():
        try:
            os.setpriority(os.PRIO_PROCESS, tid, target)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
        except PermissionError as err:
            log.warning("cannot take niceness %d (kept %d): %s; lowering a niceness needs CAP_SYS_NICE",
                        target, niceness(), err)
            break
    return niceness()
