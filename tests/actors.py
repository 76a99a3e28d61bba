"""An experiment's actors started as the launcher starts them, for tests that call them directly."""

from __future__ import annotations

from types import SimpleNamespace

import ray

from ray_codistill.broker import ExchangeSettings, start_broker
from ray_codistill.ledger import ledger_name, start_ledger

TOKEN = "secret-of-this-experiment"


def start_run(name: str, replicas: int, num_train: int = 100, num_classes: int = 3, probe_labels=None,
              folder: str | None = None, **settings) -> SimpleNamespace:
    """An experiment's ledger and broker (with its shards), as the launcher starts them."""
    ledger = start_ledger(experiment=name, num_replicas=replicas, token=TOKEN, probe_labels=probe_labels,
                          folder=folder, broker_shards=settings.get("shards", 1))
    handle = start_broker(ExchangeSettings(name, replicas, num_train, num_classes, token=TOKEN, folder=folder,
                                           ledger=ledger_name(name), **settings))
    return SimpleNamespace(name=name, broker=handle.broker, ledger=ledger, handle=handle)


def stop_run(run: SimpleNamespace) -> None:
    run.handle.stop()
    ray.kill(run.ledger)


def run_stats(run: SimpleNamespace) -> dict:
    """The ledger's stats once it has the exchange's counters of now (the launcher does the same
    at a run's end; while a run trains, they arrive at most a second late)."""
    ray.get(run.ledger.exchange_report.remote(*run.handle.reports()))
    return ray.get(run.ledger.stats.remote())
