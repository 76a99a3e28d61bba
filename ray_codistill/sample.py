"""`ray-codistill sample`: text from a trained language-model replica, or from the ensemble.

Reads an experiment folder: its config, its vocabulary (`vocab.json`) and each replica's newest
checkpoint under `train/` (the one with the highest step; Ray Train keeps two). Runs on a GPU when
this machine has one, else on the CPU; no Ray is started.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ray_codistill.config import ExperimentConfig
from ray_codistill.errors import ReportError
from ray_codistill.gpt import sample_tokens
from ray_codistill.models import build_model
from ray_codistill.results import CONFIG_FILE, VOCAB_FILE
from ray_codistill.text import Vocab


def _run_dirs(folder: Path, cfg: ExperimentConfig) -> dict[int, Path]:
    if cfg.method == "allreduce":
        return {0: folder / "train" / f"{cfg.name}-allreduce"}
    return {r: folder / "train" / f"{cfg.name}-r{r}" for r in range(cfg.num_models)}


def newest_state(run_dir: Path) -> dict:
    """The saved state with the highest step among a worker group's checkpoints."""
    states = [torch.load(p, map_location="cpu", weights_only=False) for p in run_dir.glob("checkpoint_*/state.pt")]
    if not states:
        raise ReportError(f"{run_dir}: no checkpoint (has the replica finished a step?)")
    return max(states, key=lambda s: s["step"])


def load_models(folder: str | Path, replicas: list[int] | None = None, device: torch.device | None = None):
    """(models in eval mode, vocabulary, steps) of the chosen replicas (all by default)."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).exists():
        raise ReportError(f"{folder}: not an experiment folder (no {CONFIG_FILE})")
    cfg = ExperimentConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text()))
    if not (folder / VOCAB_FILE).exists():
        raise ReportError(f"{folder}: no {VOCAB_FILE}: sampling needs a language model (data.name=text)")
    vocab = Vocab.from_json((folder / VOCAB_FILE).read_text())
    runs = _run_dirs(folder, cfg)
    chosen = sorted(runs) if replicas is None else replicas
    for r in chosen:
        if r not in runs:
            raise ReportError(f"--replica {r}: the experiment has replica(s) {sorted(runs)}")
    models, steps = [], []
    for r in chosen:
        state = newest_state(runs[r])
        model = build_model(cfg.model, (cfg.data.block_size,), len(vocab))
        model.load_state_dict(state["model"])
        models.append(model.to(device or "cpu").eval())
        steps.append(state["step"])
    return models, vocab, steps


def sample_text(folder: str | Path, replica: int | None = 0, prompt: str = "\n", tokens: int = 300,
                temperature: float = 1.0, seed: int = 0) -> str:
    """`tokens` characters after `prompt`, from replica `replica` (None: the ensemble, the mean of
    every replica's next-token probabilities)."""
    if tokens < 1 or temperature < 0:
        raise ReportError(f"--tokens must be >= 1 and --temperature >= 0, got {tokens} and {temperature}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models, vocab, _ = load_models(folder, None if replica is None else [replica], device)
    context = vocab.encode(prompt or "\n")[None].to(device)
    out = sample_tokens(models, context, tokens, temperature,
                        generator=torch.Generator(device=device).manual_seed(seed))
    return vocab.decode(out[0].tolist())
