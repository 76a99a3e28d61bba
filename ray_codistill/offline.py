"""The offline baseline: knowledge distillation from a finished model (`method: distill`).

The two-stage way: a teacher trained first (any finished experiment: a large model alone, say),
then each replica of this experiment distilled from it as it trains: the teacher, loaded from
`codistill.teacher_from` (replica `codistill.teacher_replica`'s newest checkpoint), runs in eval
mode on the replica's own batch every step, with the loss and alpha of codistillation. Nothing
goes through the broker. The teacher must have been trained on the same data (the same `data`
config, so the same classes or vocabulary and windows): anything else is refused before the run
starts.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from ray_codistill.config import ExperimentConfig
from ray_codistill.errors import ConfigError, ModelError
from ray_codistill.models import build_model, check_model, describe_model
from ray_codistill.results import newest_state, read_config, replica_runs
from ray_codistill.teachers import forward_teacher

KEY = "codistill.teacher_from"
DATA_KEYS_IGNORED = ("num_workers", "root")  # how data is read, not what it is


def teacher_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The finished teacher's config, refused (ConfigError naming the key) unless its data are
    this experiment's and the replica exists."""
    folder = cfg.codistill.teacher_from
    try:
        tcfg = read_config(folder)
    except (FileNotFoundError, ConfigError) as err:
        raise ConfigError(f"{KEY}: {err}") from None
    mine, theirs = _data(cfg), _data(tcfg)
    if mine != theirs:
        diff = sorted(k for k in mine if mine[k] != theirs.get(k))
        raise ConfigError(f"{KEY}: {folder} was trained on other data ({', '.join(f'data.{k}' for k in diff)} "
                          f"differ): a teacher must answer for this experiment's samples and classes")
    if cfg.codistill.teacher_replica >= tcfg.num_models:
        raise ConfigError(f"codistill.teacher_replica: got {cfg.codistill.teacher_replica}, {folder} has "
                          f"{tcfg.num_models} model(s)")
    return tcfg


def _data(cfg: ExperimentConfig) -> dict:
    return {k: v for k, v in asdict(cfg.data).items() if k not in DATA_KEYS_IGNORED}


def check_teacher(cfg: ExperimentConfig, splits) -> str:
    """Refuse a teacher that cannot teach this experiment (other data, a model whose outputs do
    not fit, no checkpoint); returns what it is, for the console."""
    tcfg = teacher_config(cfg)
    r = cfg.codistill.teacher_replica
    model_cfg = tcfg.for_replica(r).model
    try:
        check_model(model_cfg, splits.input_shape, splits.num_classes, text=splits.is_text)
    except ModelError as err:
        raise ConfigError(f"{KEY}: its model does not fit this data: {err}") from None
    run = replica_runs(cfg.codistill.teacher_from, tcfg)[r]
    if not any(run.glob("checkpoint_*/state.pt")):
        raise ConfigError(f"{KEY}: no checkpoint of replica {r} under {run} (has that run finished?)")
    return f"{describe_model(model_cfg)} from {cfg.codistill.teacher_from} (replica {r})"


class FixedTeacher:
    """A finished model in eval mode, run on the replica's own batch each step: every sample has
    a teacher, of age 0 (it never changes)."""

    def __init__(self, cfg: ExperimentConfig, splits, device: torch.device) -> None:
        tcfg = teacher_config(cfg)
        r = cfg.codistill.teacher_replica
        state = newest_state(replica_runs(cfg.codistill.teacher_from, tcfg)[r])
        self.model = build_model(tcfg.for_replica(r).model, splits.input_shape, splits.num_classes)
        self.model.load_state_dict(state["model"])
        self.model.to(device).eval().requires_grad_(False)
        self.rule, self.temperature = cfg.codistill.teacher_rule, cfg.codistill.temperature

    def teacher(self, x: torch.Tensor, step: int, device: torch.device, upcoming):
        return forward_teacher([self.model], x, self.rule, self.temperature), None, np.zeros(x.shape[0], dtype=np.int64)

    def publish(self, step: int, idx: torch.Tensor, logits: torch.Tensor) -> None:
        pass  # nothing is exchanged

    def flush(self) -> None:
        pass
