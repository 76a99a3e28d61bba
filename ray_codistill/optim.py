"""Optimizers and learning-rate schedules built from `OptimConfig` (torch's own classes)."""

from __future__ import annotations

import math

import torch

from ray_codistill.config import OptimConfig


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of `cfg.lr` at `step`: linear warm-up, then constant, cosine or step decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= m for m in cfg.milestones)
    return 1.0


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, total_steps: int):
    """The optimizer and a LambdaLR scheduler stepped once per optimizer step."""
    params = model.parameters()
    if cfg.name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                              weight_decay=cfg.weight_decay)
    elif cfg.name == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    else:
        # decoupled decay on matrices and embeddings; biases and norm gains are not decayed
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg, total_steps))
    return opt, sched
