"""What the ledger and the broker must not lose when Ray restarts them: under `<experiment>/broker/`.

The ledger's (`ledger.py`):
- `rows.jsonl`: every metric row, appended (and flushed to the OS) as it arrives, so a killed
  ledger loses none; a row of a (replica, step) seen twice replaces the older one on reload;
- `state.pkl`: a snapshot of everything else (divergence history, progress, workers, events,
  status, the exchange counters it was last sent), rewritten atomically at most once per
  `every_s` and on rare events;
- `final-r<R>.pkl`: a replica's final figures and test predictions, written once.

The broker's (`broker.py`): `exchange.pkl`, a snapshot of its counters, steps and registered
workers. The teacher store itself is not kept: after a restart peers republish it within a pass
over their data, and until then a fetch is a miss. Each actor reloads its part when it starts, so
Ray's restart of a killed actor, and `ray-codistill run --resume`, start from what was recorded.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np

from ray_codistill.results import write_bytes


def _plain(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class Snapshot:
    """One actor's state file, rewritten atomically: the broker's `exchange.pkl`, the ledger's
    `state.pkl`. `save` writes at most once per `every_s` unless forced; the broker forces it on
    its own once-a-second gate (the one its counter reports go out on)."""

    def __init__(self, experiment_folder: str | os.PathLike, name: str, every_s: float = 1.0) -> None:
        folder = Path(experiment_folder) / "broker"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / name
        self.every_s = every_s
        self._saved = 0.0

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        with open(self.path, "rb") as f:
            return pickle.load(f)

    def save(self, state_fn, force: bool = False) -> None:
        """Save `state_fn()` when the last save is older than `every_s` (or when forced)."""
        now = time.monotonic()
        if force or now - self._saved >= self.every_s:
            self._saved = now
            write_bytes(self.path, pickle.dumps(state_fn()))


class Journal:
    """The ledger's journal: rows appended as they arrive, finals written once, and a snapshot."""

    def __init__(self, experiment_folder: str | os.PathLike, every_s: float = 1.0) -> None:
        self.state = Snapshot(experiment_folder, "state.pkl", every_s)
        self.folder = self.state.path.parent
        self.rows_path = self.folder / "rows.jsonl"

    # -- reload -----------------------------------------------------------------------------------
    def load_rows(self) -> dict[tuple[int, int], dict]:
        rows: dict[tuple[int, int], dict] = {}
        if self.rows_path.exists():
            for line in self.rows_path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill: the row was not acknowledged
                    continue
                rows[(row["replica"], row["step"])] = row
        return rows

    def load_final(self) -> dict[int, dict]:
        final = {}
        for path in sorted(self.folder.glob("final-r*.pkl")):
            with open(path, "rb") as f:
                final[int(path.stem.split("-r")[1])] = pickle.load(f)
        return final

    # -- write ------------------------------------------------------------------------------------
    def append_rows(self, rows: list[dict]) -> None:
        with open(self.rows_path, "a") as f:
            f.write("".join(json.dumps(row, default=_plain) + "\n" for row in rows))

    def rewrite_rows(self, rows: list[dict]) -> None:
        write_bytes(self.rows_path, "".join(json.dumps(row, default=_plain) + "\n" for row in rows).encode())

    def save_final(self, replica: int, final: dict) -> None:
        write_bytes(self.folder / f"final-r{replica}.pkl", pickle.dumps(final))
