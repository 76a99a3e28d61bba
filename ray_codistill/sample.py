"""`ray-codistill sample`: text from a trained language-model replica, or from the ensemble.

Reads an experiment folder: its config, its vocabulary (`vocab.json`) and each replica's newest
checkpoint under `train/` (the one with the highest step; Ray Train keeps two). Runs on a GPU when
this machine has one, else on the CPU; no Ray is started.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ray_codistill.errors import ReportError
from ray_codistill.gpt import sample_tokens
from ray_codistill.models import build_model
from ray_codistill.results import VOCAB_FILE, newest_state, read_config, replica_runs
from ray_codistill.text import Vocab


def load_models(folder: str | Path, replicas: list[int] | None = None, device: torch.device | None = None):
    """(models in eval mode, vocabulary, steps) of the chosen replicas (all by default)."""
    folder = Path(folder)
    try:
        cfg = read_config(folder)
    except FileNotFoundError as err:
        raise ReportError(str(err)) from None
    if not (folder / VOCAB_FILE).exists():
        raise ReportError(f"{folder}: no {VOCAB_FILE}: sampling needs a language model (data.name=text)")
    vocab = Vocab.from_json((folder / VOCAB_FILE).read_text())
    runs = replica_runs(folder, cfg)
    chosen = sorted(runs) if replicas is None else replicas
    for r in chosen:
        if r not in runs:
            raise ReportError(f"--replica {r}: the experiment has replica(s) {sorted(runs)}")
    models, steps = [], []
    for r in chosen:
        try:
            state = newest_state(runs[r])
        except FileNotFoundError as err:
            raise ReportError(f"{err} (has the replica finished a step?)") from None
        model = build_model(cfg.for_replica(r).model, (cfg.data.block_size,), len(vocab))
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
