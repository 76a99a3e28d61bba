"""Exchange counters: what the teacher exchange counts per replica, and how the counts reach the ledger.

Each actor of the exchange (the broker, and its shards with `codistill.broker_shards` > 1) counts
its own calls: publications, fetches, hits, misses, teacher ages, the CPU time it spent on each
fetch, bytes in and out, and refused calls by reason. It never waits on anyone to hand them over:
every `every_s` at most, at the end of one of its own calls, it sends a report to the ledger
without waiting for an answer (`CounterReport`). A report carries the totals and only the ages
and service times recorded since the previous report, so it stays small whatever the run's
length. The ledger keeps the newest totals of each source and merges the sources per replica
(`Counters.merged`) when a user, the driver or a metric row asks.
"""

from __future__ import annotations

import os
import time

import numpy as np

AGE_WINDOW = 65536  # recent teacher ages kept per replica for the percentiles
SERVE_WINDOW = 4096  # recent fetch service CPU times kept per replica for the percentiles


def _since(ring: np.ndarray, total: int, before: int) -> np.ndarray:
    """The entries of a ring buffer written after the first `before` of its `total`, oldest first."""
    n = min(total - before, ring.size)
    return ring[np.arange(total - n, total) % ring.size] if n > 0 else ring[:0].copy()


class Counters:
    """Exchange counters of one replica."""

    FIELDS = ("publications", "fetches", "hits", "misses", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self.publications = 0
        self.fetches = 0
        self.hits = 0
        self.misses = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.age_max = 0
        self.rejected: dict[str, int] = {}  # reason -> count
        # peer -> [sum, count] of the ages of the teachers that peer gave (in the peer's own steps):
        # replicas of different sizes run at different speeds, so each pair has its own age
        self.peer_age: dict[int, list[int]] = {}
        self._ages = np.zeros(AGE_WINDOW, dtype=np.int64)
        self._n_ages = 0
        # CPU seconds the store's thread spent answering each recent fetch (its share of one, in a
        # shard): the exchange's own work, without the queue in front of it, the trip to and from
        # the worker, or the time the OS gave its core to another process meanwhile
        self._serve = np.zeros(SERVE_WINDOW, dtype=np.float64)
        self._n_serve = 0
        self._reported = (0, 0)  # ages and service times already sent to the ledger

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def add_peer_ages(self, peer: int, total: int, count: int) -> None:
        if count:
            acc = self.peer_age.setdefault(int(peer), [0, 0])
            acc[0] += int(total)
            acc[1] += int(count)

    def add_ages(self, ages: np.ndarray) -> None:
        if ages.size == 0:
            return
        ages = ages[-AGE_WINDOW:]
        pos = self._n_ages % AGE_WINDOW
        first = min(ages.size, AGE_WINDOW - pos)
        self._ages[pos:pos + first] = ages[:first]
        self._ages[:ages.size - first] = ages[first:]
        self._n_ages += ages.size
        self.age_max = max(self.age_max, int(ages.max()))

    def ages(self) -> np.ndarray:
        return self._ages[:min(self._n_ages, AGE_WINDOW)]

    def add_serve(self, seconds) -> None:
        """Record fetch service CPU times (one, or an array), oldest first."""
        seconds = np.atleast_1d(np.asarray(seconds, dtype=np.float64))[-SERVE_WINDOW:]
        self._serve[(self._n_serve + np.arange(seconds.size)) % SERVE_WINDOW] = seconds
        self._n_serve += seconds.size

    def serve_times(self) -> np.ndarray:
        return self._serve[:min(self._n_serve, SERVE_WINDOW)]

    # -- reports to the ledger --------------------------------------------------------------------
    def take_report(self) -> dict:
        """Totals, and the ages and service times recorded since the last report."""
        new_ages = _since(self._ages, self._n_ages, self._reported[0])
        new_serve = _since(self._serve, self._n_serve, self._reported[1])
        self._reported = (self._n_ages, self._n_serve)
        return {**self.totals(), "ages": new_ages, "serve": new_serve}

    def absorb(self, report: dict, totals: bool = True) -> None:
        """Take a report of the same source into this mirror of its counters: the new ages and
        service times always, the totals unless a newer report has set them already."""
        if totals:
            for f in self.FIELDS:
                setattr(self, f, report[f])
            self.rejected = dict(report["rejected"])
            self.peer_age = {int(p): list(v) for p, v in report.get("peer_age", {}).items()}
        self.add_ages(np.asarray(report["ages"], dtype=np.int64))
        self.age_max = max(self.age_max, report["age_max"])
        self.add_serve(report["serve"])

    def totals(self) -> dict:
        """The counts without the windows of ages and service times (what a journal keeps)."""
        return {**{f: getattr(self, f) for f in self.FIELDS}, "age_max": self.age_max, "rejected": dict(self.rejected),
                "peer_age": {p: list(v) for p, v in self.peer_age.items()}}

    @classmethod
    def from_totals(cls, totals: dict) -> "Counters":
        out = cls()
        for f in cls.FIELDS:
            setattr(out, f, totals[f])
        out.age_max, out.rejected = totals["age_max"], dict(totals["rejected"])
        out.peer_age = {int(p): list(v) for p, v in totals.get("peer_age", {}).items()}
        return out

    @classmethod
    def merged(cls, parts: list["Counters"]) -> "Counters":
        """One replica's counters over several sources (the broker, its shards, the ledger)."""
        out = cls()
        for part in parts:
            for field in cls.FIELDS:
                setattr(out, field, getattr(out, field) + getattr(part, field))
            for reason, n in part.rejected.items():
                out.rejected[reason] = out.rejected.get(reason, 0) + n
            for peer, (total, n) in part.peer_age.items():
                out.add_peer_ages(peer, total, n)
            out.add_ages(part.ages())
            out.age_max = max(out.age_max, part.age_max)
            out.add_serve(part.serve_times())
        return out

    def as_dict(self) -> dict:
        ages = self.ages()
        p50, p95 = (np.percentile(ages, [50, 95]).tolist() if ages.size else (None, None))
        served = self.hits + self.misses
        serve = self.serve_times() * 1e3
        serve_p50, serve_p99 = np.percentile(serve, [50, 99]).tolist() if serve.size else (None, None)
        return {
            "publications": self.publications, "fetches": self.fetches,
            "hits": self.hits, "misses": self.misses,
            "hit_rate": self.hits / served if served else None,
            "age_p50": p50, "age_p95": p95, "age_max": self.age_max if ages.size else None,
            # the mean age of each peer's teachers, in that peer's own steps
            "age_by_peer": {str(p): total / n for p, (total, n) in sorted(self.peer_age.items()) if n},
            "serve_ms_p50": serve_p50, "serve_ms_p99": serve_p99,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "rejected": dict(self.rejected),
        }


class CounterReport:
    """An exchange actor's reports to the ledger: at most every `every_s`, never waited for.

    `source` names the actor ("broker", "shard1", ...); `instance` tells one life of it from the
    next (Ray restarts a killed actor), and `seq` orders the reports of one life, so the ledger
    keeps the newest totals even when a report sent on the driver's behalf (`now`) overtakes a
    periodic one.
    """

    def __init__(self, source: str, ledger, counters: list[Counters], latest_step: np.ndarray,
                 every_s: float = 1.0) -> None:
        self.source, self.ledger, self.counters, self.latest_step = source, ledger, counters, latest_step
        self.every_s = every_s
        self.instance = f"{os.getpid()}-{time.time_ns()}"
        self.seq = 0
        self.sent_at = 0.0
        self.extra: dict = {}  # figures of the actor itself (niceness, node, refused unknown replicas)

    def now(self) -> dict:
        """A report of everything since the last one."""
        self.seq += 1
        self.sent_at = time.monotonic()
        return {"source": self.source, "instance": self.instance, "seq": self.seq,
                "latest_step": self.latest_step.tolist(), "counters": [c.take_report() for c in self.counters],
                **self.extra}

    def maybe_send(self) -> bool:
        """Send a report when the last one is older than `every_s` (fire-and-forget). True when
        that once-a-second gate opened, so the actor can do its other periodic work there."""
        if time.monotonic() - self.sent_at < self.every_s:
            return False
        if self.ledger is None:  # nobody to send to: keep the windows for the driver's `now()`
            self.sent_at = time.monotonic()
            return True
        try:
            self.ledger.exchange_report.remote(self.now())
        except Exception:  # noqa: BLE001 - the ledger restarting: the next report carries the totals
            pass
        return True
