"""Live statistics of a running experiment, from any process attached to its Ray cluster.

`get_stats(name)` asks the experiment's ledger (by name; `ledger.py`) for its figures: what
`ray-codistill stats NAME` prints, and what notebooks and Tune callbacks can call. The ledger is
not the broker: asking, however often, never delays the teacher exchange. The schema of the
answer is documented in docs/watching.md ("The --json schema"). `request_stop(name)` ends the
run early (`ray-codistill stop NAME`).
"""

from __future__ import annotations

import json
import os
import sys
import time

import ray

from ray_codistill.ledger import get_ledger
from ray_codistill.cluster import connect
from ray_codistill.errors import StatsError


def _ask(name: str, address: str | None, method: str, timeout_s: float):
    """Call a method of the running experiment's ledger, with one-line errors."""
    connect(address, start_local=False)
    try:
        ledger = get_ledger(name)
    except ValueError as err:
        raise StatsError(f"no running experiment named {name!r} on this cluster "
                         f"(its ledger is gone once the run has ended)") from err
    try:
        return ray.get(getattr(ledger, method).remote(), timeout=timeout_s)
    except Exception as err:  # the run ended between the lookup and the call
        raise StatsError(f"the ledger of {name!r} did not answer: {type(err).__name__}") from err


def get_stats(name: str, address: str | None = None, timeout_s: float = 10.0) -> dict:
    """The figures of experiment `name` (a dict, see docs/watching.md for the schema)."""
    return _ask(name, address, "stats", timeout_s)


def request_stop(name: str, address: str | None = None, timeout_s: float = 10.0) -> str:
    """Ask experiment `name` to stop early: each replica ends at its next metric row (every
    `log_every` steps) and writes its results as at a normal end, with status "stopped".
    Returns the run's status ("stopping", or what it was if the run was already ending)."""
    return _ask(name, address, "request_stop", timeout_s)


def _fmt(value, spec: str, width: int) -> str:
    text = "-" if value is None else (format(value, spec) if isinstance(value, (int, float)) else str(value))
    return text.rjust(width)


COLUMNS = "replica   step    loss     val   probe  samples/s    hits  age p50/p95/max   MB in/out  rejected  workers"


def format_stats(stats: dict) -> str:
    """A readable table of a run's figures."""
    lines = [f"experiment {stats['experiment']} ({stats['method']}, {stats['status']}, "
             f"up {stats['uptime_s']:.0f}s, {stats['probe_rounds']} probe rounds)", COLUMNS]
    for r, s in stats["replicas"].items():
        age = "/".join("-" if s[k] is None else f"{s[k]:.0f}" for k in ("age_p50", "age_p95", "age_max"))
        # the node: its IP tells nodes apart where hosts share a name (containers, namespaces)
        workers = ",".join(f"{w['pid']}@{w['host']}/{w['node_ip']}" if w.get("node_ip") else f"{w['pid']}@{w['host']}"
                           for w in s["workers"].values()) or "-"
        if s.get("restarts"):
            workers += f" (restarted {s['restarts']}x)"
        step = s["step"] if s["step"] >= 0 else None
        lines.append(
            f"{r:>7} {_fmt(step, 'd', 6)} {_fmt(s['train_loss'], '.3g', 7)} {_fmt(s['val_acc'], '.3f', 7)} "
            f"{_fmt(s['probe_acc'], '.3f', 7)} {_fmt(s['samples_per_s'], '.0f', 10)} {_fmt(s['hit_rate'], '.1%', 7)} "
            f"{age:>15} {s['bytes_in'] / 1e6:>5.1f}/{s['bytes_out'] / 1e6:<5.1f} "
            f"{sum(s['rejected'].values()):>9}  {workers}")
    div = stats.get("divergence")
    if div:
        lines.append(f"divergence at step {div['step']} (probe set), ensemble acc {div['ensemble_acc']:.3f}:")
        for p in div["pairs"]:
            lines.append(f"  replicas {p['replica_a']}-{p['replica_b']}: disagreement {p['disagreement']:.3f}  "
                         f"symmetric KL {p['sym_kl']:.3g}  logit L2 {p['l2']:.3g}")
    return "\n".join(lines)


def _stdout_for_json():
    """A stream on the real stdout for the JSON alone; everything else written to file descriptor
    1 from now on (Ray's own messages, from Python or C++, until exit) goes to stderr instead."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return out


def show(name: str, address: str | None = None, as_json: bool = False, watch_s: float | None = None) -> int:
    """Print the figures once, or every `watch_s` seconds until the run ends (with `as_json`,
    one JSON document per line)."""
    out = _stdout_for_json() if as_json else sys.stdout
    seen = False
    while True:
        try:
            stats = get_stats(name, address)
        except StatsError:
            if watch_s is None or not seen:
                raise
            print(f"experiment {name} has ended (its ledger is gone)", file=sys.stderr if as_json else out,
                  flush=True)
            return 0
        seen = True
        print(json.dumps(stats, default=str) if as_json else format_stats(stats), file=out, flush=True)
        if watch_s is None or stats["status"] not in ("running", "stopping"):
            return 0
        time.sleep(watch_s)
