"""Who may call an experiment's actors: its secret token and its replica ids.

The driver issues the token (`new_token`) when the experiment starts and gives it only to the
experiment's own workers. Every worker-facing method of the broker, its shards and the ledger
starts with `Guard.refuse`: another job on the cluster cannot inject teachers, rows or results,
nor read teachers. A refused call is counted per replica and reason, never stored or served.
"""

from __future__ import annotations

import secrets

import numpy as np

from ray_codistill.counters import Counters


def new_token() -> str:
    """An experiment's secret: only workers given it can publish to, or read from, its broker."""
    return secrets.token_hex(16)


class Guard:
    """The experiment token and replica-id check every worker-facing actor method starts with."""

    def __init__(self, token: str, counters: list[Counters]) -> None:
        self._token, self._counters = token, counters
        self.unknown = 0  # calls that named no replica of this experiment

    def refuse(self, replica, token) -> str | None:
        """Why a worker's call is refused: an unknown replica id or a wrong experiment token."""
        if not isinstance(replica, (int, np.integer)) or not 0 <= replica < len(self._counters):
            self.unknown += 1
            return "replica"
        if not secrets.compare_digest(str(token), self._token):
            self._counters[replica].reject("token")
            return "token"
        return None
