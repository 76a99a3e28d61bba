"""What a run is judged by: accuracy for classifiers, loss per token for language models.

A language model's loss is the mean cross-entropy over tokens in nats; with characters as tokens,
bits per character is that loss / ln 2 and perplexity exp(loss). Selection (Tune, the R study)
maximises validation accuracy for classifiers and minimises validation loss for language models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str  # "classify" | "lm"
    metric: str  # the figure selection reads: "acc" or "loss"
    mode: str  # "max" or "min"
    label: str  # what the metric is, for tables and plots

    @property
    def is_lm(self) -> bool:
        return self.name == "lm"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b


CLASSIFY = Task("classify", "acc", "max", "accuracy")
LM = Task("lm", "loss", "min", "loss (nats/token)")


def task_of(cfg) -> Task:
    """The task of an ExperimentConfig (or of its `to_dict()`, as summary.json holds it), from the
    data alone."""
    name = (cfg.get("data") or {}).get("name") if isinstance(cfg, dict) else cfg.data.name
    return LM if name == "text" else CLASSIFY


def lm_figures(loss: float, prefix: str) -> dict:
    """Bits per character and perplexity of a loss in nats per token, keyed `<prefix>bpc`, `<prefix>ppl`."""
    return {f"{prefix}bpc": loss / math.log(2), f"{prefix}ppl": math.exp(min(loss, 700.0))}
